"""Learning-rate sensitivity of a grid: test and validation error against lr, per (dataset, strategy),
mean and spread over seeds -- the numbers behind ``lr_sensitivity.png`` and its table.

Every run at an lr counts (the lr search's runs and single-lr runs alike; refits are left out: they
train on another set), so a grid that tried several lrs shows how much each strategy depends on the
choice, not only where its best lr lies."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

FIGURE_NAME = "lr_sensitivity.png"


@dataclass(frozen=True)
class Spread:
    """Mean, standard deviation (nan with one value) and count of finite values."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not values:
            return None
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values))


@dataclass(frozen=True)
class LrPoint:
    """One (dataset, strategy, lr): its runs' test and validation error, and how many diverged."""

    lr: float
    test: Spread | None
    val: Spread | None
    runs: int
    diverged: int


Sensitivity = dict[tuple[str, str], list[LrPoint]]


def lr_sensitivity(rows: Sequence[Mapping]) -> Sensitivity:
    """Per (dataset, strategy), one point per lr tried (ascending), from ``results.csv``-style rows."""
    by_cell: dict[tuple[str, str], dict[float, list[Mapping]]] = {}
    for r in rows:
        if r.get("phase") == "refit":
            continue
        by_cell.setdefault((r["dataset"], r["strategy"]), {}).setdefault(float(r["lr"]), []).append(r)
    out: Sensitivity = {}
    for cell, by_lr in by_cell.items():
        points = []
        for lr in sorted(by_lr):
            runs = by_lr[lr]
            ok = [r for r in runs if not r.get("diverged")]
            points.append(
                LrPoint(
                    lr,
                    Spread.of([r["test_error"] for r in ok]),
                    Spread.of([r["val_error"] for r in ok]),
                    len(runs),
                    len(runs) - len(ok),
                )
            )
        out[cell] = points
    return out


def several_lrs(sens: Sensitivity) -> bool:
    """Whether any cell tried more than one lr (then the figure and table are worth drawing)."""
    return any(len(points) > 1 for points in sens.values())


def _cell_text(point: LrPoint | None, chosen: bool, counts: bool = False) -> str:
    if point is None:
        return "–"
    if point.test is None:
        return f"diverged ({point.diverged}/{point.runs})"
    text = f"{point.test.mean:.2f}" + (f" ± {point.test.std:.2f}" if not math.isnan(point.test.std) else "")
    if point.val is not None:
        text += f" ({point.val.mean:.2f})"
    if counts:
        text += f" n={point.test.n}"
    if point.diverged:
        text += f", {point.diverged} diverged"
    return f"**{text}**" if chosen else text


def lr_sensitivity_lines(
    sens: Sensitivity, chosen: Mapping[tuple[str, str], float] | None = None, figure: str | None = None
) -> list[str]:
    """A markdown table: one row per (dataset, strategy), one column per lr; test error mean ± std over
    seeds, the mean validation error in brackets (and the number of seeds where it differs between
    cells); the chosen lr (where given) in bold."""
    from .results import lr_text

    lrs = sorted({p.lr for points in sens.values() for p in points})
    lines = [
        "## Learning-rate sensitivity",
        "",
        "Test error (%) mean ± std over seeds at every lr tried, mean validation error in brackets"
        + ("; the lr chosen on validation in **bold**" if chosen else "")
        + "."
        + (f" Figure: `{figure}`." if figure else ""),
        "",
        "| Dataset | Strategy | " + " | ".join(f"lr {lr_text(x)}" for x in lrs) + " |",
        "|---|---|" + "---:|" * len(lrs),
    ]
    counts = len({p.test.n for points in sens.values() for p in points if p.test is not None}) > 1
    for (dataset, strategy), points in sens.items():
        at = {p.lr: p for p in points}
        pick = (chosen or {}).get((dataset, strategy))
        lines.append(
            f"| {dataset} | {strategy} | " + " | ".join(_cell_text(at.get(x), x == pick, counts) for x in lrs) + " |"
        )
    return lines
