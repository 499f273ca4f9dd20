"""Training-framework integrations and the pieces they share.

``bvgls.integrations.hf`` (needs transformers) and ``bvgls.integrations.lightning``
(needs lightning) hold the framework callbacks; this module needs only torch:

- :func:`build_strategy`: a strategy (spec string or factory) on a framework's optimizer,
  grouped by :func:`model_groups`;
- :class:`SelectionTracker` (from :mod:`bvgls.runner.tracker`, the loop's own): per-group
  selection frequency and mean BVR over a window of steps (since the last log, since the
  start of the epoch), accumulated on the device without a host sync per step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..base import GroupsSpec, GroupStrategy
from ..grouping import GROUPING_SCHEMES, LayerGroups, layer_groups
from ..runner.tracker import SelectionTracker
from ..strategies import make_strategy

#: a spec string ("bvgls", "bvgls:k=2", "L3-6", ...) or ``factory(optimizer, groups=...) -> GroupStrategy``
StrategyArg = Any

__all__ = ["SelectionTracker", "build_strategy", "detach", "init_attachment", "model_groups", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside framework wrappers (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``): the strategy hooks the one that really steps."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}")
    return optimizer


def _has_specific_scheme(module: nn.Module) -> bool:
    return any(s.detect is not None and s.name != "generic" and s.detect(module) for s in GROUPING_SCHEMES.entries())


def _core_module(model: nn.Module) -> nn.Module:
    """Descend through wrappers (DDP's ``.module``, a LightningModule holding one model)
    until a module that a specific grouping scheme recognises, if there is one."""
    module = model
    while not _has_specific_scheme(module):
        if any(True for _ in module.parameters(recurse=False)):
            return model
        children = [c for c in module.children() if any(True for _ in c.parameters())]
        if len(children) != 1:
            return model
        module = children[0]
    return module


def model_groups(model: nn.Module, groups: Any = None) -> GroupsSpec:
    """The selection groups for ``model``.

    ``groups``: None (auto-detect, looking inside single-child wrappers), a scheme
    name for :func:`bvgls.layer_groups`, a callable ``model -> groups``, or anything
    a :class:`~bvgls.GroupStrategy` accepts (``LayerGroups``, ``{name: params}``, ...).
    """
    if groups is None:
        return layer_groups(_core_module(model))
    if isinstance(groups, str):
        return layer_groups(_core_module(model), groups)
    if callable(groups) and not isinstance(groups, (LayerGroups, Mapping, Sequence, nn.Module)):
        return groups(model)
    return groups


def build_strategy(strategy: StrategyArg, optimizer: Any, model: nn.Module | None, groups: Any = None) -> GroupStrategy:
    """Attach ``strategy`` to ``optimizer`` (unwrapped), grouping ``model``'s parameters.

    ``strategy`` is a spec string (see :func:`bvgls.make_strategy`) or a factory called
    as ``factory(optimizer, groups=groups)`` (e.g. ``functools.partial(bvgls.BVGLS, k=2)``).
    """
    opt = unwrap_optimizer(optimizer)
    if model is None and groups is None:
        resolved = None  # the optimizer's param groups
    else:
        resolved = model_groups(model, groups) if model is not None else groups
    if isinstance(strategy, str):
        return make_strategy(strategy, opt, resolved)
    if callable(strategy):
        built = strategy(opt, groups=resolved)
        if not isinstance(built, GroupStrategy):
            raise TypeError(f"the strategy factory returned a {type(built).__name__}, not a bvgls.GroupStrategy")
        return built
    raise TypeError(
        f"strategy must be a spec string like 'bvgls' or a factory(optimizer, groups=...), "
        f"got {type(strategy).__name__}"
    )


def refuse_fused(
    strategy: GroupStrategy, *, clip: float | None, accumulation: int, grad_scaler: bool, names: tuple[str, str, str]
) -> None:
    """Fused BVG-LS (``fused=true``) frees every gradient it does not update during backward and folds
    each once per optimizer step: refuse, detaching it, a framework setting that needs all gradients
    after backward (clipping by their norm), several backward passes per step (accumulation) or
    scaled gradients (a GradScaler). ``names``: the framework's names of those three settings."""
    problem = None
    if clip:
        problem = (
            f"{names[0]}={clip} clips with the norm of all gradients, which fused mode no longer holds "
            f"after backward; set {names[0]}=0"
        )
    elif accumulation > 1:
        problem = (
            f"{names[1]}={accumulation} runs several backward passes per optimizer step and fused mode "
            f"folds each gradient once per step; set {names[1]}=1"
        )
    elif grad_scaler:
        problem = f"{names[2]} uses a GradScaler, whose scaled gradients fused mode would fold; use bf16 instead"
    if getattr(strategy, "fused", False) and problem:
        strategy.remove()
        raise ValueError(f"bvgls fused=true: {problem}, or use fused=false")


def init_attachment(
    callback: Any, strategy: StrategyArg, groups: Any, log_prefix: str, verify_selection_every: int
) -> None:
    """The attributes both framework callbacks hold: what to attach, how to log, and (once
    attached) ``.strategy``, ``.tracker`` and ``.mode``."""
    callback.spec = strategy
    callback.groups = groups
    callback.log_prefix = log_prefix
    callback.verify_selection_every = verify_selection_every
    callback.strategy = None
    callback.tracker = None
    callback.mode = None


def detach(strategy: GroupStrategy | None, tracker: SelectionTracker | None) -> None:
    """Undo a callback's attachment: stop tracking and leave the optimizer as it was."""
    if tracker is not None:
        tracker.close()
    if strategy is not None:
        strategy.remove()
