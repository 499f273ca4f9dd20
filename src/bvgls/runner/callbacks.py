"""Hooks into :func:`bvgls.finetune`: :class:`Callback`, what it sees (:class:`TrainState`),
and the TensorBoard logger."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..base import GroupStrategy
from .rundir import History


@dataclass
class TrainState:
    """What callbacks see: the live objects of the run."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    strategy: GroupStrategy
    history: History
    epoch: int = 0
    global_step: int = 0
    out_dir: str | None = None


class Callback:
    """Hooks into :func:`finetune`; override what you need. A plain callable passed in
    ``callbacks`` is called as ``fn(record)`` at the end of every epoch."""

    def on_train_start(self, state: TrainState) -> None: ...

    def on_step_end(self, state: TrainState, loss: torch.Tensor) -> None: ...

    def on_epoch_end(self, state: TrainState, record: dict) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...


class FunctionCallback(Callback):
    """``fn(record)`` at the end of every epoch."""

    def __init__(self, fn: Callable[[dict], Any]):
        self.fn = fn

    def on_epoch_end(self, state, record):
        self.fn(record)


def as_callback(cb: Callback | Callable[[dict], Any]) -> Callback:
    return cb if isinstance(cb, Callback) else FunctionCallback(cb)


class TensorBoardLogger(Callback):
    """Epoch metrics, selection frequency and mean BVR per group to TensorBoard."""

    def __init__(self, log_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir)

    def on_epoch_end(self, state, record):
        step = record["epoch"]
        for key in ("train_loss", "test_loss", "test_error", "val_loss", "val_error", "lr"):
            if record.get(key) is not None:
                self.writer.add_scalar(key, record[key], step)
        names = state.history.group_names
        for name, freq in zip(names, record["selection_frequency"]):
            self.writer.add_scalar(f"selection/{name}", freq, step)
        for name, bvr in zip(names, record.get("mean_bvr") or []):
            if bvr is not None:
                self.writer.add_scalar(f"bvr/{name}", bvr, step)
        self.writer.flush()

    def on_train_end(self, state):
        self.writer.close()
