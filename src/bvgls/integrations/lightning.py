"""PyTorch Lightning: BVG-LS (or any bvgls strategy) on a LightningModule's optimizer.

Example::

    from bvgls.integrations.lightning import BVGLSCallback

    trainer = lightning.Trainer(max_epochs=10, callbacks=[BVGLSCallback("bvgls")])
    trainer.fit(module, train_loader)

At the start of fitting the callback attaches the strategy to the optimizer that
``configure_optimizers`` returned, with the layer groups of the module (looking
inside a module that only wraps one model, e.g. ``self.model = timm.create_model(...)``).
Through the module's loggers it logs, per group, ``bvgls/freq/<group>`` and
``bvgls/bvr/<group>`` (selection frequency and mean bias-variance ratio over the
steps since the previous log, every ``log_every_n_steps`` optimizer steps), and the
same over each epoch as ``bvgls/epoch/freq/<group>`` and ``bvgls/epoch/bvr/<group>``.
The strategy's statistics are saved in Lightning checkpoints and restored on resume.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from .. import distributed
from . import SelectionTracker, StrategyArg, build_strategy, detach, init_attachment, refuse_fused, unwrap_optimizer

__all__ = ["BVGLSCallback"]


class BVGLSCallback(Callback):
    """Run a bvgls strategy on a LightningModule's optimizer and log its selections.

    Args:
        strategy: a spec string (``"bvgls"``, ``"bvgls:k=2"``, ``"bvgts"``, ``"L3-6"``, ...)
            or a factory ``factory(optimizer, groups=...) -> GroupStrategy``.
        groups: None (auto-detect from the module), a grouping scheme name, a callable
            ``module -> groups``, or explicit groups (e.g. a :class:`bvgls.LayerGroups`).
        optimizer_index: which of ``configure_optimizers``' optimizers to drive.
        log_every_n_steps: optimizer steps between logs of the running statistics;
            default: the Trainer's ``log_every_n_steps``; 0 = epoch statistics only.
        log_prefix: prefix of the logged metric names.
        verify_selection_every: under DDP / FSDP, check every n-th step that all
            ranks selected the same groups (a small all-gather); 0 = never.

    After fitting starts: ``.strategy`` (the :class:`~bvgls.GroupStrategy`), ``.mode``
    (``"single"``, ``"ddp"`` or ``"fsdp"``), ``.tracker``.
    """

    def __init__(
        self,
        strategy: StrategyArg = "bvgls",
        groups: Any = None,
        *,
        optimizer_index: int = 0,
        log_every_n_steps: int | None = None,
        log_prefix: str = "bvgls/",
        verify_selection_every: int = 0,
    ):
        if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 0):
            raise ValueError(f"log_every_n_steps must be a non-negative int or None, got {log_every_n_steps!r}")
        init_attachment(self, strategy, groups, log_prefix, verify_selection_every)
        self.optimizer_index = optimizer_index
        self.log_every_n_steps = log_every_n_steps
        self._restored_state: dict | None = None

    # ------------------------------------------------------------------ lifecycle
    def on_fit_start(self, trainer, pl_module) -> None:
        optimizers = trainer.optimizers
        if not optimizers:
            raise RuntimeError("BVGLSCallback: configure_optimizers returned no optimizer")
        if not 0 <= self.optimizer_index < len(optimizers):
            raise ValueError(
                f"BVGLSCallback: optimizer_index={self.optimizer_index}, but configure_optimizers "
                f"returned {len(optimizers)} optimizer(s)"
            )
        self._detach()
        optimizer = unwrap_optimizer(optimizers[self.optimizer_index])
        self.strategy = build_strategy(self.spec, optimizer, pl_module, self.groups)
        refuse_fused(
            self.strategy,
            clip=trainer.gradient_clip_val,
            accumulation=trainer.accumulate_grad_batches,
            grad_scaler=str(trainer.precision).startswith("16"),
            names=("gradient_clip_val", "accumulate_grad_batches", "precision=16-mixed"),
        )
        if self._restored_state is not None:
            self.strategy.load_state_dict(self._restored_state)
            self._restored_state = None
        wrapped = getattr(trainer.strategy, "model", None)
        self.mode = distributed.setup(
            self.strategy,
            verify_every=self.verify_selection_every,
            modules=[m for m in (pl_module, wrapped) if isinstance(m, torch.nn.Module)],
        )
        self.tracker = SelectionTracker(self.strategy)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.strategy is not None:
            self.strategy.on_epoch_start(trainer.current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.tracker is None:
            return
        every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        if every and self.tracker.steps_since("log") >= every:
            self._log(pl_module, self.tracker.metrics("log", self.log_prefix), trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.tracker is not None:
            self._log(pl_module, self.tracker.metrics("epoch", f"{self.log_prefix}epoch/"), trainer.global_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._detach()  # leave the optimizer as it was; .strategy keeps its counts for inspection

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._detach()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy.state_dict()} if self.strategy is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("strategy")
        if state is not None and self.strategy is not None:  # restored after setup (e.g. DeepSpeed)
            self.strategy.load_state_dict(state)
        else:
            self._restored_state = state

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _log(pl_module, metrics: dict[str, float], step: int) -> None:
        if not metrics:
            return
        for logger in pl_module.loggers:
            logger.log_metrics(metrics, step=step)

    def _detach(self) -> None:
        detach(self.strategy, self.tracker)
        self.tracker = None
