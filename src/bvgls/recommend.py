"""Which layers should I finetune?": a short BVG-LS run that recommends a fixed ``L<a>-<b>`` spec.

:func:`recommend` runs BVG-LS (the paper's method, every step a probe) for ``steps``
optimizer steps on a copy of the model and reports, per layer group, the mean
bias-variance ratio and how often it was selected. The recommended spec is the
shortest range of groups **ending at the head** that accounts for at least
``coverage`` (default 0.8) of all selections: ``L<a>-<L>`` where ``a`` is the largest
group index (1-based) such that groups ``a..L`` were selected in at least
``coverage`` of the steps (so ``L<L>-<L>`` is the head alone, ``L1-<L>`` full finetuning).

The mean BVR of a group averages the steps where its ratio is defined and its
variance is not clamped (a tensor's first step has variance 0 by definition), so it
is undefined (None) when every step was clamped.

Stability: the report keeps the groups selected at each step; :meth:`RecommendReport.half_specs`
gives the recommendation of each half of the steps alone (agreement is the printed check), and
each frequency comes with a Wilson 95% interval (:func:`wilson_interval`; steps are not
independent, so it understates the uncertainty).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .base import GroupsSpec
from .selector import BVGLS

__all__ = ["RecommendReport", "recommend", "recommend_range"]


@dataclass
class RecommendReport:
    """Result of :func:`recommend` (``str(report)`` is a printable table)."""

    group_names: list[str]
    steps: int
    frequency: list[float]  # fraction of steps in which each group was selected
    mean_bvr: list[float | None]  # mean bias-variance ratio per group (None: never defined)
    spec: str  # the recommended fixed spec, ``L<a>-<b>``
    coverage: float
    nonfinite_steps: int = 0
    selections: list[list[int]] = field(default_factory=list)  # the groups selected at each step
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "groups": self.group_names,
            "steps": self.steps,
            "frequency": self.frequency,
            "interval": [list(wilson_interval(f, self.steps)) for f in self.frequency],
            "mean_bvr": self.mean_bvr,
            "spec": self.spec,
            "coverage": self.coverage,
            "half_specs": list(self.half_specs()),
            "nonfinite_steps": self.nonfinite_steps,
            "selections": self.selections,
        }

    def half_specs(self) -> tuple[str | None, str | None]:
        """The recommendation from the first and from the second half of the steps alone
        (None where a half selected nothing); agreement is the run's stability check."""
        half = len(self.selections) // 2
        if half == 0:
            return None, None
        n = len(self.group_names)
        return tuple(
            _spec_or_none(frequency_of(part, n), self.coverage)
            for part in (self.selections[:half], self.selections[half:])
        )

    def __str__(self) -> str:
        width = max(len("group"), *(len(n) for n in self.group_names))
        lines = [f"{'#':>3}  {'group':<{width}}  {'selected':>8}  {'95% interval':>13}  {'mean BVR':>10}"]
        for i, (name, f, b) in enumerate(zip(self.group_names, self.frequency, self.mean_bvr), 1):
            bvr = "-" if b is None else f"{b:10.4g}"
            low, high = wilson_interval(f, self.steps)
            lines.append(f"{i:>3}  {name:<{width}}  {f:8.1%}  {f'{low:.0%}-{high:.0%}':>13}  {bvr:>10}")
        lines.append(
            f"recommended: {self.spec} (the shortest range ending at the head that holds "
            f"{self.coverage:.0%} of the selections over {self.steps} steps)"
        )
        lines.append(self.stability_line())
        lines.append(
            f"a starting point, not a verdict: it depends on the run's batch, crop and lr; check it against "
            f"full finetuning (bvgls compare --strategies full,{self.spec}); its regret on the recorded "
            "benchmarks: docs/strategies.md"
        )
        return "\n".join(lines)

    def stability_line(self) -> str:
        first, second = self.half_specs()
        if first is None or second is None:
            return "stability: too few steps to compare the two halves of the run"
        verdict = (
            "stable: both halves agree"
            if first == second == self.spec
            else "NOT stable: the halves disagree, so the recommendation depends on the steps drawn; run more --steps"
        )
        return (
            f"stability: first half of the steps -> {first}, second half -> {second} ({verdict}); "
            "intervals: Wilson 95% per group, treating steps as independent (they are not: read them as "
            "a lower bound on the uncertainty)"
        )


def wilson_interval(frequency: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``frequency`` observed over ``n`` trials."""
    if n <= 0:
        return 0.0, 1.0
    centre = (frequency + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(frequency * (1 - frequency) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def frequency_of(selections: list[list[int]], num_groups: int) -> list[float]:
    """Fraction of the steps in ``selections`` in which each group was selected."""
    counts = [0] * num_groups
    for step in selections:
        for i in step:
            counts[i] += 1
    return [c / max(len(selections), 1) for c in counts]


def _spec_or_none(frequency: list[float], coverage: float) -> str | None:
    return recommend_range(frequency, coverage) if sum(frequency) > 0 else None


def recommend_range(frequency: list[float], coverage: float = 0.8) -> str:
    """``L<a>-<L>``: the shortest suffix of groups whose selection frequencies sum to at
    least ``coverage`` of their total."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    n = len(frequency)
    total = sum(frequency)
    if n == 0 or total <= 0:
        raise ValueError("no group was ever selected: nothing to recommend")
    held = 0.0
    for a in range(n, 0, -1):
        held += frequency[a - 1]
        if held >= coverage * total * (1 - 1e-12):
            return f"L{a}-{n}"
    return f"L1-{n}"


def _batches(loader: Iterable, steps: int):
    """``steps`` batches, cycling through ``loader`` as often as needed."""
    taken = 0
    while taken < steps:
        before = taken
        for item in loader:
            yield item
            taken += 1
            if taken == steps:
                return
        if taken == before:
            raise ValueError("the data loader yields no batch")


def recommend(
    model: nn.Module,
    loader: Iterable,
    steps: int,
    groups: GroupsSpec | Callable | None = None,
    *,
    loss_fn: Callable = nn.functional.cross_entropy,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    k: int = 1,
    alpha: float = 0.9,
    coverage: float = 0.8,
    device: torch.device | str | None = None,
    copy_model: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> RecommendReport:
    """Run BVG-LS for ``steps`` steps and recommend which layer groups to finetune.

    Args:
        model: the (pretrained) model; a deep copy is trained unless ``copy_model=False``.
        loader: yields ``(inputs, targets)`` batches; cycled if shorter than ``steps``.
        steps: number of optimizer steps (each one a BVG-LS step with statistics).
        groups: the layer groups: None for :func:`bvgls.layer_groups` of the model, a
            callable ``model -> groups`` (called on the copy), or groups of the model
            passed itself with ``copy_model=False``.
        loss_fn: ``loss_fn(model(inputs), targets)``.
        lr, momentum, weight_decay: SGD (Nesterov) as in the paper.
        k, alpha: BVG-LS options.
        coverage: share of the selections the recommended range must hold.
        device: where to run (default: where the model's parameters are).
        on_step: called with the number of steps done after each step (a progress bar).
    """
    _check_arguments(steps, coverage, groups, copy_model)
    work, selector = _selector_on(model, groups, copy_model, device, lr, momentum, weight_decay, k, alpha)
    try:
        mean_bvr, selections = _run(work, selector, loader, steps, loss_fn, on_step)
    finally:
        selector.remove()
    frequency = selector.selection_frequency()
    return RecommendReport(
        group_names=list(selector.group_names),
        steps=selector.num_steps,
        frequency=frequency,
        mean_bvr=mean_bvr,
        spec=recommend_range(frequency, coverage),
        coverage=coverage,
        nonfinite_steps=selector.nonfinite_steps,
        selections=selections,
    )


def _check_arguments(steps, coverage, groups, copy_model) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    if groups is not None and not callable(groups) and copy_model:
        raise ValueError(
            "groups given as parameters belong to the original model: pass a callable "
            "model -> groups, or copy_model=False"
        )


def _selector_on(model, groups, copy_model, device, lr, momentum, weight_decay, k, alpha):
    """The model to train (a copy unless ``copy_model=False``, on ``device``) and a BVG-LS selector
    around its SGD optimizer."""
    from .grouping import layer_groups  # grouping pulls in model-family rules: only when needed

    work = copy.deepcopy(model) if copy_model else model
    if device is not None:
        work = work.to(device)
    work.train()
    chosen = layer_groups(work) if groups is None else (groups(work) if callable(groups) else groups)
    trainable = (
        chosen.param_groups() if hasattr(chosen, "param_groups") else [p for p in work.parameters() if p.requires_grad]
    )
    opt = torch.optim.SGD(trainable, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    return work, BVGLS(opt, k=k, alpha=alpha, groups=chosen)


def _run(work, selector, loader, steps, loss_fn, on_step) -> tuple[list[float | None], list[list[int]]]:
    """``steps`` BVG-LS steps; returns each group's mean BVR (over the steps where it is defined and
    its variance is not clamped) and the groups selected at each step."""
    device = next(work.parameters()).device
    opt = selector.optimizer
    bvr_sum = torch.zeros(selector.num_groups, dtype=torch.float64)
    bvr_n = torch.zeros(selector.num_groups, dtype=torch.float64)
    selections: list[list[int]] = []
    for done, (x, y) in enumerate(_batches(loader, steps), 1):
        opt.zero_grad(set_to_none=True)
        loss_fn(work(x.to(device)), y.to(device)).backward()
        before = selector.num_steps
        selector.step()
        if selector.num_steps > before:
            ratios = selector.ratios.double().cpu()
            valid = ~torch.isnan(ratios) & (selector.variance.double().cpu() > selector.eps)
            bvr_sum += torch.where(valid, ratios, 0.0)
            bvr_n += valid
            selections.append(list(selector.selected))
        if on_step is not None:
            on_step(done)
    mean = [None if n == 0 else s / n for s, n in zip(bvr_sum.tolist(), bvr_n.tolist())]
    return [None if m is None or not math.isfinite(m) else m for m in mean], selections
