"""Hugging Face ``transformers.Trainer``: BVG-LS (or any bvgls strategy) in one line.

Example::

    from bvgls.integrations.hf import attach

    trainer = Trainer(model=model, args=args, train_dataset=train)
    attach(trainer)                  # or attach(trainer, "bvgls:k=2"), attach(trainer, "L3-6"), ...
    trainer.train()

or ``Trainer(..., callbacks=[BVGLSCallback()])``. At the start of training the callback
attaches the strategy to the Trainer's own optimizer (whatever ``args.optim`` built;
its decay / no-decay param groups are kept) with the model's layer groups
(``bvgls.layer_groups``: embeddings, each block, final norm + head for transformers
models). Every Trainer log then carries, per group, ``bvgls/freq/<group>`` (fraction
of the optimizer steps since the previous log in which the group was updated) and
``bvgls/bvr/<group>`` (mean bias-variance ratio over those steps).

Note: ``TrainingArguments.max_grad_norm`` (1.0 by default) clips the gradients before
the optimizer step, so BVG-LS sees clipped gradients; the paper does not clip (set
``max_grad_norm=0`` to match it). Fused BVG-LS (``bvgls:fused=true``, ``bvgls-fused``)
folds and frees the gradients during backward, so it needs ``max_grad_norm=0``,
``gradient_accumulation_steps=1`` and no ``fp16`` (bf16 is fine); the callback refuses
other settings when training starts.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import distributed
from . import SelectionTracker, StrategyArg, build_strategy, detach, init_attachment, refuse_fused

__all__ = ["BVGLSCallback", "attach"]

logger = logging.getLogger(__name__)

STATE_FILE = "bvgls_strategy.pt"


class BVGLSCallback(TrainerCallback):
    """Run a bvgls strategy on the Trainer's optimizer and log its selections.

    Args:
        strategy: a spec string (``"bvgls"``, ``"bvgls:k=2:alpha=0.95"``, ``"bvgts"``,
            ``"L3-6"``, ...; see :func:`bvgls.make_strategy`) or a factory
            ``factory(optimizer, groups=...) -> GroupStrategy``.
        groups: None (auto-detect from the model), a grouping scheme name, a callable
            ``model -> groups``, or explicit groups (e.g. a :class:`bvgls.LayerGroups`).
        log_prefix: prefix of the logged metric names.
        verify_selection_every: under DDP / FSDP, check every n-th step that all
            ranks selected the same groups (a small all-gather); 0 = never.
        save_state: save the strategy's statistics in every checkpoint folder and
            restore them when training resumes from one.

    After ``on_train_begin``: ``.strategy`` (the :class:`~bvgls.GroupStrategy`),
    ``.mode`` (``"single"``, ``"ddp"`` or ``"fsdp"``), ``.tracker``.
    """

    def __init__(
        self,
        strategy: StrategyArg = "bvgls",
        groups: Any = None,
        *,
        log_prefix: str = "bvgls/",
        verify_selection_every: int = 0,
        save_state: bool = True,
    ):
        init_attachment(self, strategy, groups, log_prefix, verify_selection_every)
        self.save_state = save_state

    # ------------------------------------------------------------------ lifecycle
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is None:
            raise RuntimeError("BVGLSCallback: the Trainer passed no optimizer to on_train_begin")
        self._detach()
        self.strategy = build_strategy(self.spec, optimizer, model, self.groups)
        refuse_fused(
            self.strategy,
            clip=args.max_grad_norm,
            accumulation=args.gradient_accumulation_steps,
            grad_scaler=bool(args.fp16),
            names=("max_grad_norm", "gradient_accumulation_steps", "fp16"),
        )
        self.mode = distributed.setup(
            self.strategy, verify_every=self.verify_selection_every, modules=[model] if model is not None else []
        )
        if self.save_state and state.global_step > 0:
            self._restore(args, state)
        self.tracker = SelectionTracker(self.strategy)
        if args.max_grad_norm and args.max_grad_norm > 0 and getattr(self.strategy, "needs_all_gradients", False):
            logger.info(
                "bvgls: max_grad_norm=%s clips the gradients before %s sees them; the paper does not clip",
                args.max_grad_norm,
                type(self.strategy).__name__,
            )

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.strategy is not None:
            self.strategy.on_epoch_start(math.floor((state.epoch or 0.0) + 1e-6))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.tracker is None or logs is None:
            return
        metrics = self.tracker.metrics("log", self.log_prefix)
        if not metrics:
            return  # no optimizer step since the last log (e.g. an evaluation log)
        logs.update(metrics)
        # Trainer.log appended a copy of the logs to the history before calling us
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_save(self, args, state, control, **kwargs):
        if not self.save_state or self.strategy is None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            return
        if self.mode == "fsdp":  # the gradient EMAs are sharded: every rank keeps its own
            torch.save(self.strategy.state_dict(), os.path.join(folder, self._rank_file()))
        elif state.is_world_process_zero:
            torch.save(self.strategy.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        self._detach()  # leave the optimizer as it was; .strategy keeps its counts for inspection

    # ------------------------------------------------------------------ helpers
    def _rank_file(self) -> str:
        return f"bvgls_strategy_rank{torch.distributed.get_rank()}.pt"

    def _restore(self, args, state) -> None:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = os.path.join(folder, self._rank_file() if self.mode == "fsdp" else STATE_FILE)
        if os.path.isfile(path):
            self.strategy.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            logger.warning(
                "bvgls: resuming at step %d but %s does not exist; the gradient statistics start afresh",
                state.global_step,
                path,
            )

    def _detach(self) -> None:
        detach(self.strategy, self.tracker)
        self.tracker = None


def attach(trainer, strategy: StrategyArg = "bvgls", groups: Any = None, **options) -> BVGLSCallback:
    """Add a :class:`BVGLSCallback` to ``trainer`` and return it.

    It goes first in the Trainer's callback list, so that the reporting integrations
    (TensorBoard, W&B, ...), which come before callbacks passed to ``Trainer(callbacks=...)``,
    also receive the selection statistics. ``options`` go to :class:`BVGLSCallback`.
    """
    if any(isinstance(cb, BVGLSCallback) for cb in trainer.callback_handler.callbacks):
        raise ValueError("this Trainer already has a BVGLSCallback; two strategies cannot drive one optimizer")
    callback = BVGLSCallback(strategy, groups, **options)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
