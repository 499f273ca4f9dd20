"""Training-framework integrations and the pieces they share.

``bvgls.integrations.hf`` (needs transformers) and ``bvgls.integrations.lightning``
(needs lightning) hold the framework callbacks; this module needs only torch:

- :func:`build_strategy`: a strategy (spec string or factory) on a framework's optimizer,
  grouped by :func:`model_groups`;
- :class:`SelectionTracker`: per-group selection frequency and mean BVR over a window
  of steps (since the last log, since the start of the epoch), accumulated on the
  device without a host sync per step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..base import GroupsSpec, GroupStrategy
from ..grouping import GROUPING_SCHEMES, LayerGroups, layer_groups
from ..strategies import make_strategy

#: a spec string ("bvgls", "bvgls:k=2", "L3-6", ...) or ``factory(optimizer, groups=...) -> GroupStrategy``
StrategySpec = Any

__all__ = ["SelectionTracker", "build_strategy", "model_groups", "unwrap_optimizer"]


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
    return any(s.detect is not None and s.name != "generic" and s.detect(module)
               for s in GROUPING_SCHEMES.values())


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


def build_strategy(strategy: StrategySpec, optimizer: Any, model: nn.Module | None,
                   groups: Any = None) -> GroupStrategy:
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
    raise TypeError(f"strategy must be a spec string like 'bvgls' or a factory(optimizer, groups=...), "
                    f"got {type(strategy).__name__}")


class SelectionTracker:
    """Selection frequency and mean bias-variance ratio of every group, per window of steps.

    Registers an optimizer step post-hook that adds the step's ratios to a running
    sum on the device (no host sync per step). :meth:`take` reads one named window
    (e.g. ``"log"``, ``"epoch"``): the statistics of the steps since that window was
    last taken, then restarts it. Windows are independent of each other.

    A group's ratio counts towards its mean only in steps where it is defined and its
    variance is above the clamp ``eps`` (at a tensor's first step the variance is 0 and
    the ratio is ``bias / eps``, a number that says nothing about the gradient).
    """

    def __init__(self, strategy: GroupStrategy):
        self.strategy = strategy
        n = strategy.num_groups
        ratios = getattr(strategy, "ratios", None)
        self.has_ratios = isinstance(ratios, torch.Tensor) and ratios.numel() == n
        dtype = ratios.dtype if self.has_ratios else torch.float64
        device = ratios.device if self.has_ratios else torch.device("cpu")
        self._ratio_sum = torch.zeros(n, dtype=dtype, device=device)
        self._ratio_count = torch.zeros(n, dtype=dtype, device=device)
        self._start = self._snapshot()
        self._marks: dict[str, tuple] = {}
        self._handle = strategy.optimizer.register_step_post_hook(self._after_step)

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        if not self.has_ratios:
            return
        ratios = self.strategy.ratios
        valid = torch.isfinite(ratios)
        variance = getattr(self.strategy, "variance", None)
        if isinstance(variance, torch.Tensor) and variance.shape == ratios.shape:
            valid &= variance > getattr(self.strategy, "eps", 0.0)
        self._ratio_sum += torch.where(valid, ratios, torch.zeros_like(ratios))
        self._ratio_count += valid

    def _snapshot(self) -> tuple:
        scale_sums = list(getattr(self.strategy, "scale_sums", self.strategy.counts))
        return (self.strategy.num_steps, list(self.strategy.counts), self._ratio_sum.clone(), self._ratio_count.clone(),
                scale_sums)

    def steps_since(self, window: str) -> int:
        """Optimizer steps taken since ``window`` was last taken."""
        return self.strategy.num_steps - self._marks.get(window, self._start)[0]

    def take(self, window: str) -> dict[str, list]:
        """Statistics of the steps since ``window`` was last taken: ``{"steps": n,
        "frequency": [per group], "scale": [per group], "bvr": [per group, None where undefined]}``
        (frequency: fraction of steps with a multiplier > 0; scale: mean multiplier,
        the same as the frequency for select-or-not strategies)."""
        now = self._snapshot()
        steps0, counts0, sum0, count0, scales0 = self._marks.get(window, self._start)
        self._marks[window] = now
        steps = now[0] - steps0
        freq = [(c - c0) / steps if steps else 0.0 for c, c0 in zip(now[1], counts0)]
        scale = [(s - s0) / steps if steps else 0.0 for s, s0 in zip(now[4], scales0)]
        bvr: list[float | None] = [None] * len(freq)
        if self.has_ratios and steps:
            sums = (now[2] - sum0).tolist()
            counts = (now[3] - count0).tolist()
            bvr = [s / c if c > 0 else None for s, c in zip(sums, counts)]
        return {"steps": steps, "frequency": freq, "scale": scale, "bvr": bvr}

    def metrics(self, window: str, prefix: str = "bvgls/") -> dict[str, float]:
        """:meth:`take` as flat metrics: ``{prefix}freq/<group>``, ``{prefix}bvr/<group>`` and,
        for strategies with graded multipliers (llrd, auto-rgn), ``{prefix}scale/<group>``;
        empty when no step was taken in the window."""
        stats = self.take(window)
        if not stats["steps"]:
            return {}
        names = self.strategy.group_names
        out = {f"{prefix}freq/{name}": f for name, f in zip(names, stats["frequency"])}
        if any(abs(s - f) > 1e-9 for s, f in zip(stats["scale"], stats["frequency"])):
            out.update({f"{prefix}scale/{name}": s for name, s in zip(names, stats["scale"])})
        out.update({f"{prefix}bvr/{name}": b for name, b in zip(self.strategy.group_names, stats["bvr"])
                    if b is not None})
        return out

    def close(self) -> None:
        """Remove the step hook."""
        self._handle.remove()


def detach(strategy: GroupStrategy | None, tracker: SelectionTracker | None) -> None:
    """Undo a callback's attachment: stop tracking and leave the optimizer as it was."""
    if tracker is not None:
        tracker.close()
    if strategy is not None:
        strategy.remove()
