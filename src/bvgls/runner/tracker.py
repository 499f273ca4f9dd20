"""Per-group selection frequency, mean lr multiplier and mean bias-variance ratio over windows
of optimizer steps: the one bookkeeping shared by the training loop (epoch records) and the
framework integrations (Hugging Face / Lightning logs).

The tracker reads a strategy only through ``strategy.step_report()`` (a
:class:`bvgls.base.StepReport`). Ratios are counted once per statistics update: between
BVG-LS probe steps (``bvgls:probe=P``) the ratios are the last probe's and are not added
again, and a step skipped for a non-finite gradient adds nothing. Only torch is needed.
"""

from __future__ import annotations

import torch

from ..base import GroupStrategy


class SelectionTracker:
    """Selection frequency and mean bias-variance ratio of every group, per window of steps.

    Registers an optimizer step post-hook that adds the step's ratios to a running sum on the
    device (no host sync per step) when the step computed them (``report.probed``).
    :meth:`take` reads one named window (e.g. ``"log"``, ``"epoch"``): the statistics of the
    steps since that window was last taken, then restarts it. Windows are independent of each other.
    """

    def __init__(self, strategy: GroupStrategy):
        self.strategy = strategy
        report = strategy.step_report()
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
        return (
            torch.zeros(n, dtype=torch.float64, device=self._device),
            torch.zeros(n, dtype=torch.float64, device=self._device),
        )

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        if not self.has_ratios:
            return
        report = self.strategy.step_report()
        if not report.probed:  # between probes (the last probe's ratios) or a skipped step
            return
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
        (bvr: mean over the steps that computed ratios, e.g. the probe steps)
        (frequency: fraction of steps with a multiplier > 0; scale: mean multiplier,
        the same as the frequency for select-or-not strategies)."""
        report = self.strategy.step_report()
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
