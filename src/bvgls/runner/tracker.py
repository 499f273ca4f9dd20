"""Per-group selection frequency, mean lr multiplier and mean bias-variance ratio over windows
of optimizer steps: the one bookkeeping shared by the training loop (epoch records) and the
framework integrations (Hugging Face / Lightning logs).

The tracker reads a strategy only through :func:`step_report`, the single adapter between
strategies and this bookkeeping. Only torch is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import GroupStrategy


@dataclass
class StepReport:
    """What a strategy reports after a step: cumulative step and selection counts, cumulative
    lr multipliers, and (for ratio-based strategies) this step's per-group ratios with the mask
    of groups whose ratio carries signal (defined, and variance above the clamp ``eps``: at a
    tensor's first step the variance is 0 and the ratio is ``bias / eps``)."""

    num_steps: int
    counts: list[int]
    scale_sums: list[float]
    ratios: torch.Tensor | None = None
    informative: torch.Tensor | None = None


def step_report(strategy: GroupStrategy) -> StepReport:
    """The adapter from a strategy's public attributes to a :class:`StepReport` (meant to
    become ``GroupStrategy.step_report()``, overridden by ratio-based strategies)."""
    ratios = getattr(strategy, "ratios", None)
    if not (isinstance(ratios, torch.Tensor) and ratios.numel() == strategy.num_groups):
        return StepReport(strategy.num_steps, list(strategy.counts), list(strategy.scale_sums))
    informative = torch.isfinite(ratios)
    variance, eps = getattr(strategy, "variance", None), getattr(strategy, "eps", None)
    if isinstance(variance, torch.Tensor) and variance.shape == ratios.shape and isinstance(eps, float):
        informative = informative & (variance > eps)
    return StepReport(strategy.num_steps, list(strategy.counts), list(strategy.scale_sums), ratios, informative)


class SelectionTracker:
    """Selection frequency and mean bias-variance ratio of every group, per window of steps.

    Registers an optimizer step post-hook that adds the step's ratios to a running sum on the
    device (no host sync per step). :meth:`take` reads one named window (e.g. ``"log"``,
    ``"epoch"``): the statistics of the steps since that window was last taken, then restarts
    it. Windows are independent of each other.
    """

    def __init__(self, strategy: GroupStrategy):
        self.strategy = strategy
        report = step_report(strategy)
        self.has_ratios = report.ratios is not None
        self._device = report.ratios.device if self.has_ratios else torch.device("cpu")
        # per window: ratio sums since it was last taken (reset, not differenced, so a window's mean
        # does not depend on how long the run has been going: resumed runs reproduce exactly)
        self._since_start = self._zeros()
        self._sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._start = (report.num_steps, report.counts, report.scale_sums)
        self._marks: dict[str, tuple] = {}
        self._handle = strategy.optimizer.register_step_post_hook(self._after_step)

    def _zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.strategy.num_groups
        return (torch.zeros(n, dtype=torch.float64, device=self._device),
                torch.zeros(n, dtype=torch.float64, device=self._device))

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        if not self.has_ratios:
            return
        report = step_report(self.strategy)
        ratios = torch.where(report.informative, report.ratios.to(torch.float64), 0.0)
        for ratio_sum, ratio_count in (self._since_start, *self._sums.values()):
            ratio_sum += ratios
            ratio_count += report.informative

    def steps_since(self, window: str) -> int:
        """Optimizer steps taken since ``window`` was last taken."""
        return self.strategy.num_steps - self._marks.get(window, self._start)[0]

    def take(self, window: str) -> dict[str, list]:
        """Statistics of the steps since ``window`` was last taken: ``{"steps": n,
        "frequency": [per group], "scale": [per group], "bvr": [per group, None where undefined]}``
        (frequency: fraction of steps with a multiplier > 0; scale: mean multiplier,
        the same as the frequency for select-or-not strategies)."""
        report = step_report(self.strategy)
        steps0, counts0, scales0 = self._marks.get(window, self._start)
        ratio_sum, ratio_count = self._sums.get(window, self._since_start)
        self._marks[window] = (report.num_steps, report.counts, report.scale_sums)
        self._sums[window] = self._zeros()
        steps = report.num_steps - steps0
        freq = [(c - c0) / steps if steps else 0.0 for c, c0 in zip(report.counts, counts0)]
        scale = [(s - s0) / steps if steps else 0.0 for s, s0 in zip(report.scale_sums, scales0)]
        bvr: list[float | None] = [None] * len(freq)
        if self.has_ratios and steps:
            bvr = [s / c if c > 0 else None for s, c in zip(ratio_sum.tolist(), ratio_count.tolist())]
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
        out.update({f"{prefix}bvr/{name}": b for name, b in zip(names, stats["bvr"]) if b is not None})
        return out

    def close(self) -> None:
        """Remove the step hook."""
        self._handle.remove()
