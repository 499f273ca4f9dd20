"""The one learning-rate search, shared by ``bvgls compare`` and the lab's experiments.

Each (dataset, strategy) gets its own lr: the one with the lowest mean final validation
error over seeds. Strategies that update each group only part of the time need not share
full finetuning's best lr, so when the choice lies at an end of the grid that was tried,
the grid is extended by the next value of :data:`LR_LADDER` beyond it, until the choice is
interior, a run at the new lr diverges (non-finite training loss), or the ladder ends.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: learning rates a grid may be extended to (factor ~3 apart)
LR_LADDER = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
#: how a choice among equal mean validation errors is broken (see ``grid.choose_lrs``)
TIE_BREAKS = ("lr", "val_loss")

logger = logging.getLogger(__name__)


def next_lr(lr: float, step: int, ladder: Sequence[float] = LR_LADDER) -> float | None:
    """The first ladder value beyond ``lr`` in direction ``step`` (+1 up, -1 down); None past the
    end of the ladder. (Values within a relative 1e-6 of ``lr`` count as ``lr`` itself.)"""
    if step > 0:
        beyond = [x for x in ladder if x > lr * (1 + 1e-6)]
        return min(beyond) if beyond else None
    beyond = [x for x in ladder if x < lr * (1 - 1e-6)]
    return max(beyond) if beyond else None


@dataclass
class LrChoice:
    """The outcome of a search: the chosen lr, every lr tried, whether the choice still sits at
    an end of them (``edge``), and why the search stopped."""

    lr: float
    grid: list[float]
    edge: bool
    stopped: str  # "interior", "single lr", "not extended", "ladder end", "diverged"


def search_lr(
    lrs: Sequence[float],
    run: Callable[[list[float]], None],
    choose: Callable[[list[float]], tuple[float | None, set[float]]],
    *,
    extend: bool = True,
    label: str = "",
    ladder: Sequence[float] = LR_LADDER,
) -> LrChoice:
    """Run ``lrs`` (``run(lrs)`` trains every seed at each), choose (``choose(grid)`` -> the best
    lr and the set of lrs whose runs diverged), and extend past an edge of ``ladder`` while ``extend``."""
    grid = sorted(float(x) for x in lrs)
    run(grid)
    if len(grid) == 1:
        return LrChoice(grid[0], grid, False, "single lr")
    added = None
    while True:
        chosen, diverged = choose(grid)
        if chosen is None:  # every run failed (keep_going): nothing to choose from
            return LrChoice(math.nan, grid, False, "no finished runs")
        step = -1 if chosen == grid[0] else (+1 if chosen == grid[-1] else 0)
        if not step:
            return LrChoice(chosen, grid, False, "interior")
        if not extend:
            return LrChoice(chosen, grid, True, "not extended")
        if added is not None and added in diverged:
            return LrChoice(chosen, grid, True, "diverged")
        added = next_lr(chosen, step, ladder)
        if added is None:
            return LrChoice(chosen, grid, True, "ladder end")
        logger.info(f"{label}: lr {chosen:g} is at the edge of {grid}; adding {added:g}")
        grid = sorted(grid + [added])
        run([added])
