"""The batch-size / learning-rate ablation of docs/experiments/pretrained.md ("Ablation: batch size
and learning rate"). Its batch-16 arm is part M of ``pretrained`` (only the
full, bvgls and L6-10 cells on the two clip-art tasks), its batch-128 arm is ``pretrained-batch``.
:func:`write_batch_ablation` sets the two side by side -- test errors, chosen lrs, the validation
error over every searched grid (a table and a figure), paired differences to full finetuning at
each batch size and their difference between the batch sizes, updates per group -- and judges
the section's three statements. It reports whatever runs have finished: a missing cell is listed
and every statement that needs it is "not judged", never guessed."""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from bvgls.runner.grid import collect_results, mean_std_text, text_grid_lines
from bvgls.runner.rundir import History

from .protocols import Protocol, suite
from .report import errors_by_seed, final_rows, fmt_ci, lr_cell_text, paired_differences
from .run import cell_records, protocol_differences

TASKS = ("clipart-fine", "clipart-coarse")
ABLATION_STRATEGIES = ("full", "bvgls", "L6-10")
CELLS = tuple((t, s) for t in TASKS for s in ABLATION_STRATEGIES)
#: the strategies compared with full finetuning
VERSUS_FULL = ("bvgls", "L6-10")
#: statement 2: BVG-LS's chosen lr is at least this multiple of full finetuning's
LR_FACTOR = 3.0
#: (suite, part) that holds each arm
B16_PART = ("pretrained", "mobilenet_v2")
B128_PART = ("pretrained-batch", "mobilenet_v2-b128")
FIGURE = "ablation_val_error.png"

STATEMENTS = {
    "steps": "*BVG-LS needs steps*: the task-averaged difference of differences of `bvgls − full` (batch 128 "
    "minus batch 16) has its 95% interval above 0.",
    "lr": "*BVG-LS wants a larger lr than full finetuning*: its chosen lr is at least 3x full's on both tasks at "
    "both batch sizes (the validation curves over the grid show by how much it loses at full's lr).",
    "competitive": "*Where BVG-LS is competitive*: the batch size(s) at which the task-averaged `bvgls − full` "
    "interval includes 0 or lies below 0 (with each at its own lr).",
}


@dataclass
class Updates:
    """Optimizer steps of a cell's final runs and how many of them updated each group (means over seeds)."""

    groups: list[str]
    steps: float
    per_group: list[float]


@dataclass
class Arm:
    """One batch size's cells, as far as they have run."""

    batch: int
    path: Path
    seeds: tuple[int, ...]
    errors: dict[tuple[str, str], dict[int, float]]  # test error per seed
    cells: dict[tuple[str, str], dict]  # lr facts (run.cell_records)
    val_grid: dict[tuple[str, str], dict[float, float]]  # mean val error per searched lr (inf: diverged)
    updates: dict[tuple[str, str], Updates]

    @property
    def name(self) -> str:
        return f"batch {self.batch}"


# ---------------------------------------------------------------------- reading the arms
def locate_part(path: str | os.PathLike, suite_name: str, part: str) -> tuple[Path, Protocol]:
    """The directory of ``suite_name``'s ``part``, given the suite's ``--out`` or the part's own
    directory; ValueError when neither records that part's protocol."""
    protocol = dict(suite(suite_name))[part]
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory (expected the --out of `bvgls-lab bench --protocol {suite_name}`)")
    for candidate in (path, path / part):
        diff = protocol_differences(candidate, protocol)
        if diff == []:
            return candidate, protocol
        if diff:
            raise ValueError(
                f"{candidate} holds a benchmark with another protocol than part {part} of "
                f"`{suite_name}` (differs in {', '.join(diff)})"
            )
    raise ValueError(f"{path} holds no `{suite_name}` benchmark (no protocol.json in it or in {path / part})")


def load_arm(path: Path, protocol: Protocol) -> Arm:
    rows = [r for r in final_rows(path, protocol.seeds) if (r["dataset"], r["strategy"]) in CELLS]
    errors = {c: errors_by_seed(rows, *c) for c in CELLS}
    records = cell_records(path, protocol)
    updates = {c: group_updates([r for r in rows if (r["dataset"], r["strategy"]) == c]) for c in CELLS}
    return Arm(
        protocol.batch_size,
        path,
        protocol.seeds,
        {c: e for c, e in errors.items() if e},
        {c: records[c] for c in CELLS if c in records},
        searched_grid(path),
        {c: u for c, u in updates.items() if u is not None},
    )


def searched_grid(path: Path) -> dict[tuple[str, str], dict[float, float]]:
    """Per cell, the mean final validation error over the search seeds at every lr it tried (inf: diverged)."""
    runs = collect_results(str(path / "search")) if (path / "search").is_dir() else []
    by_cell: dict[tuple[str, str], dict[float, list[float]]] = {}
    for r in runs:
        error = math.inf if r["diverged"] else r["val_error"]
        if (r["dataset"], r["strategy"]) in CELLS and error is not None:
            by_cell.setdefault((r["dataset"], r["strategy"]), {}).setdefault(r["lr"], []).append(float(error))
    return {c: {lr: statistics.fmean(v) for lr, v in sorted(by_lr.items())} for c, by_lr in by_cell.items()}


def run_updates(history: History) -> tuple[int, list[float]]:
    """A run's optimizer steps and, per group, how many of them updated it (each epoch's steps ×
    that epoch's selection frequency)."""
    done, per_group = 0, [0.0] * len(history.group_names)
    for record in history.epochs:
        steps, done = record["steps"] - done, record["steps"]
        for i, frequency in enumerate(record.get("selection_frequency") or []):
            per_group[i] += steps * frequency
    return done, per_group


def group_updates(rows: list[dict]) -> Updates | None:
    runs = [History.load(r["path"]) for r in rows]
    if not runs:
        return None
    counted = [run_updates(h) for h in runs]
    return Updates(
        runs[0].group_names,
        statistics.fmean(s for s, _ in counted),
        [statistics.fmean(col) for col in zip(*(g for _, g in counted))],
    )


# ---------------------------------------------------------------------- statistics
def versus_full(arm: Arm, strategy: str) -> dict[str, tuple[float, float, float, int]]:
    """``strategy − full`` paired by seed, per task and averaged over the tasks per seed."""
    return paired_differences(TASKS, arm.errors, strategy, "full")


def difference_of_differences(b16: Arm, b128: Arm, strategy: str) -> dict[str, tuple[float, float, float, int]]:
    """``(strategy − full) at batch 128 − (strategy − full) at batch 16``, paired by (task, seed)."""
    gaps = {}
    for arm in (b16, b128):
        for t in TASKS:
            mine, full = arm.errors.get((t, strategy), {}), arm.errors.get((t, "full"), {})
            gaps[(t, arm.name)] = {k: mine[k] - full[k] for k in sorted(set(mine) & set(full))}
    return paired_differences(TASKS, gaps, b128.name, b16.name)


def judge_steps(dod: dict) -> dict:
    """Statement 1 on the task-averaged difference of differences of ``bvgls − full``."""
    average = dod.get("average")
    if average is None or math.isnan(average[1]):
        return {"verdict": "not judged", "detail": "needs both tasks' four cells at two or more common seeds"}
    return {
        "verdict": "holds" if average[1] > 0 else "does not hold",
        "detail": f"{fmt_ci(*average[:3])} over {average[3]} seeds",
    }


def judge_lr(arms: list[Arm]) -> dict:
    """Statement 2: bvgls's chosen lr at least LR_FACTOR × full's in every (task, batch)."""
    checks, missing = [], []
    for arm in arms:
        for t in TASKS:
            mine, full = arm.cells.get((t, "bvgls")), arm.cells.get((t, "full"))
            if mine is None or full is None:
                missing.append(f"{t} at {arm.name}")
                continue
            ratio = mine["lr"] / full["lr"]
            grid = arm.val_grid.get((t, "bvgls"), {})
            cost = (
                f" (bvgls at full's lr: {val_points(grid[full['lr']] - grid[mine['lr']])})"
                if full["lr"] in grid and mine["lr"] in grid
                else ""
            )
            ok = ratio >= LR_FACTOR * (1 - 1e-9)  # 0.03 / 0.01 is 2.9999999999999996
            checks.append((ok, f"{t}, {arm.name}: {mine['lr']:g} / {full['lr']:g} = {ratio:.3g}x{cost}"))
    verdict = "does not hold" if not all(ok for ok, _ in checks) else "not judged" if missing else "holds"
    detail = "; ".join(text for _, text in checks) + (f"; no chosen lr yet for {', '.join(missing)}" if missing else "")
    return {"verdict": verdict, "detail": detail}


def judge_competitive(arms: list[Arm]) -> dict:
    """Statement 3: per batch size, whether the task-averaged ``bvgls − full`` interval reaches 0 or below."""
    per_batch, texts = {}, []
    for arm in arms:
        average = versus_full(arm, "bvgls").get("average")
        if average is None or math.isnan(average[1]):
            per_batch[arm.batch], text = "not judged", "no task-averaged interval yet"
        else:
            per_batch[arm.batch] = "holds" if not average[1] > 0 else "does not hold"
            text = fmt_ci(*average[:3])
        texts.append(f"{per_batch[arm.batch]} at {arm.name} ({text})")
    competitive = [f"batch {b}" for b, v in per_batch.items() if v == "holds"]
    unjudged = [f"batch {b}" for b, v in per_batch.items() if v == "not judged"]
    if len(unjudged) == len(per_batch):
        verdict = "not judged"
    else:
        neither = "neither judged batch size" if unjudged else "neither batch size"
        verdict = "competitive at " + (" and ".join(competitive) or neither)
        verdict += f" ({' and '.join(unjudged)} not judged)" if unjudged else ""
    return {"verdict": verdict, "detail": "; ".join(texts), "per_batch": per_batch}


def val_points(x: float) -> str:
    return "diverged" if math.isinf(x) else f"{x:+.1f} validation points"


# ---------------------------------------------------------------------- the report
def write_batch_ablation(
    b16_dir: str | os.PathLike, b128_dir: str | os.PathLike, out_file: str | os.PathLike | None = None
) -> dict:
    """The ablation report from the runs finished so far in both arms: ``out_file`` (markdown;
    default ``<batch-128 part>/ablation.md``), its numbers next to it as ``.json`` and, where
    matplotlib is installed, ``figures/ablation_val_error.png`` beside it. ``b16_dir``: the
    ``--out`` of ``bvgls-lab bench --protocol pretrained`` or its ``mobilenet_v2`` part; ``b128_dir``:
    that of ``--protocol pretrained-batch``. Returns the numbers."""
    b16 = load_arm(*locate_part(b16_dir, *B16_PART))
    b128 = load_arm(*locate_part(b128_dir, *B128_PART))
    out_file = Path(out_file) if out_file is not None else b128.path / "ablation.md"
    arms = [b16, b128]
    figure = plot_val_grids(out_file.parent / "figures" / FIGURE, arms)
    versus = {s: {arm.batch: versus_full(arm, s) for arm in arms} for s in VERSUS_FULL}
    dod = {s: difference_of_differences(b16, b128, s) for s in VERSUS_FULL}
    verdicts = {"steps": judge_steps(dod["bvgls"]), "lr": judge_lr(arms), "competitive": judge_competitive(arms)}
    lines = [
        "# Ablation: batch size and learning rate",
        "",
        f"Batch 16: `{b16.path}` (part M of `pretrained`: its {', '.join(ABLATION_STRATEGIES)} cells on "
        f"{' and '.join(TASKS)}); batch 128: `{b128.path}` (`pretrained-batch`). Test and validation "
        "errors in %; paired differences in points, mean [95% t-interval], paired by seed (the same "
        "few-shot draw), negative = better than full finetuning.",
        "",
    ]
    gaps = incomplete_cells(arms)
    lines += missing_lines(gaps) + error_lines(arms) + lr_lines(arms) + grid_lines(arms, figure, out_file.parent)
    lines += difference_lines(arms, versus) + dod_lines(dod) + update_lines(arms) + statement_lines(verdicts, gaps)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text("\n".join(lines) + "\n")
    numbers = ablation_numbers(arms, versus, dod, verdicts, figure) | {"incomplete": gaps}
    out_file.with_suffix(".json").write_text(json.dumps(numbers, indent=2, default=str) + "\n")
    return numbers


def incomplete_cells(arms: list[Arm]) -> list[str]:
    """The cells that have not finished all their final runs."""
    gaps = []
    for arm in arms:
        for t, s in CELLS:
            done = len(arm.errors.get((t, s), {}))
            if done < len(arm.seeds):
                gaps.append(f"{t} / {s} at {arm.name}: {done} of {len(arm.seeds)} final runs")
    return gaps


def missing_lines(gaps: list[str]) -> list[str]:
    if not gaps:
        return ["Every cell has all its final runs.", ""]
    return (
        [
            "**Incomplete**: the numbers below use the runs finished so far (differences over the seeds both "
            "sides have); a statement that needs a cell without runs is *not judged*.",
            "",
        ]
        + [f"- {g}" for g in gaps]
        + [""]
    )


def row_names(arms: list[Arm]) -> list[tuple[str, Arm]]:
    return [(t, arm) for t in TASKS for arm in arms]


def error_lines(arms: list[Arm]) -> list[str]:
    rows = {f"{t}, {arm.name}": (t, arm) for t, arm in row_names(arms)}

    def text(row: str, s: str) -> str:
        t, arm = rows[row]
        errors = arm.errors.get((t, s), {})
        return mean_std_text(list(errors.values())) + (f" (n={len(errors)})" if errors else "")

    return (
        ["## Test error (%), mean ± std over seeds", ""]
        + text_grid_lines(list(rows), ABLATION_STRATEGIES, text, header="Task, batch")
        + [""]
    )


def lr_lines(arms: list[Arm]) -> list[str]:
    rows = {f"{t}, {arm.name}": (t, arm) for t, arm in row_names(arms)}

    def text(row: str, column: str) -> str:
        t, arm = rows[row]
        if column != "bvgls ÷ full":
            return lr_cell_text(arm.cells.get((t, column)))
        mine, full = arm.cells.get((t, "bvgls")), arm.cells.get((t, "full"))
        return f"{mine['lr'] / full['lr']:.3g}x" if mine and full else "–"

    return (
        ["## Chosen lr (searched grid in brackets; **EDGE** = still at an end of it)", ""]
        + text_grid_lines(list(rows), ABLATION_STRATEGIES + ("bvgls ÷ full",), text, header="Task, batch")
        + [""]
    )


def grid_lines(arms: list[Arm], figure: str | None, where: Path) -> list[str]:
    """Per task: the mean validation error at every lr each (strategy, batch) tried, the chosen one in bold."""
    lines = [
        "## Validation error (%) over the searched grid (search seeds' mean; **bold** = chosen, div = "
        "diverged, – = not tried)",
        "",
    ]
    for t in TASKS:
        lrs = sorted({lr for arm in arms for s in ABLATION_STRATEGIES for lr in arm.val_grid.get((t, s), {})})
        if not lrs:
            lines += [f"{t}: no search run has finished.", ""]
            continue
        lines += [
            f"{t}:",
            "",
            "| Strategy, batch | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
            "|---|" + "---:|" * len(lrs),
        ]
        for s in ABLATION_STRATEGIES:
            for arm in arms:
                grid, chosen = arm.val_grid.get((t, s), {}), arm.cells.get((t, s), {}).get("lr")
                texts = [
                    "–"
                    if lr not in grid
                    else "div"
                    if math.isinf(grid[lr])
                    else (f"**{grid[lr]:.1f}**" if lr == chosen else f"{grid[lr]:.1f}")
                    for lr in lrs
                ]
                lines.append(f"| {s}, {arm.name} | " + " | ".join(texts) + " |")
        lines.append("")
    figure_text = (
        f"Figure: `{os.path.relpath(figure, where)}` (validation error against lr, one curve per "
        "strategy and batch size, a star at the chosen lr; diverged lrs left out)."
        if figure
        else "No figure: matplotlib is not installed (or no search run has finished)."
    )
    return lines + [figure_text, ""]


def difference_lines(arms: list[Arm], versus: dict) -> list[str]:
    lines = [
        "## Paired differences to full finetuning (each strategy at its own lr)",
        "",
        "| Difference | batch | " + " | ".join(TASKS) + " | average over tasks |",
        "|---|---:|" + "---:|" * 3,
    ]
    for s in VERSUS_FULL:
        for arm in arms:
            d = versus[s][arm.batch]
            lines.append(
                f"| {s} − full | {arm.batch} | "
                + " | ".join(fmt_ci(*d[k][:3]) if k in d else "–" for k in TASKS + ("average",))
                + " |"
            )
    return lines + [""]


def dod_lines(dod: dict) -> list[str]:
    lines = [
        "## Difference of differences: (strategy − full) at batch 128 minus at batch 16, paired by task and "
        "seed (positive = the gap to full finetuning is larger at batch 128)",
        "",
        "| Difference of | " + " | ".join(TASKS) + " | average over tasks |",
        "|---|" + "---:|" * 3,
    ]
    for s, d in dod.items():
        lines.append(
            f"| {s} − full | "
            + " | ".join(f"{fmt_ci(*d[k][:3])} (n={d[k][3]})" if k in d else "–" for k in TASKS + ("average",))
            + " |"
        )
    return lines + [""]


def update_lines(arms: list[Arm]) -> list[str]:
    """Steps per run and updates per group (steps × selection frequency), means over the final runs' seeds."""
    known = [u for arm in arms for u in arm.updates.values()]
    if not known:
        return ["## Updates per group", "", "No final run has finished.", ""]
    groups = known[0].groups
    lines = [
        "## Updates per group (optimizer steps × the group's selection frequency; per run, mean over seeds)",
        "",
        "| Task, batch, strategy | steps | mean per group | " + " | ".join(groups) + " |",
        "|---|---:|---:|" + "---:|" * len(groups),
    ]
    for t, arm in row_names(arms):
        for s in ABLATION_STRATEGIES:
            u = arm.updates.get((t, s))
            if u is not None:
                lines.append(
                    f"| {t}, {arm.name}, {s} | {u.steps:.0f} | {statistics.fmean(u.per_group):.1f} | "
                    + " | ".join(f"{x:.1f}" for x in u.per_group)
                    + " |"
                )
    return lines + [""]


def statement_lines(verdicts: dict, gaps: list[str]) -> list[str]:
    lines = ["## The three judged statements (docs/experiments/pretrained.md)", ""]
    if gaps:
        lines += [
            "**Preliminary**: judged on the runs finished so far (some cells are incomplete, listed at the "
            "top); a verdict may change when they finish.",
            "",
        ]
    for i, (key, v) in enumerate(verdicts.items(), 1):
        lines.append(f"{i}. {STATEMENTS[key]} **{v['verdict'].capitalize()}**: {v['detail']}.")
    return lines + [""]


def ablation_numbers(arms: list[Arm], versus: dict, dod: dict, verdicts: dict, figure: str | None) -> dict:
    """The report's numbers, with string keys (``ablation.json``)."""

    def ci(d: dict) -> dict:
        return {k: {"mean": m, "ci95": [lo, hi], "n": n} for k, (m, lo, hi, n) in d.items()}

    return {
        "arms": {
            arm.batch: {
                "path": str(arm.path),
                "test_error": {f"{t} {s}": e for (t, s), e in arm.errors.items()},
                "cells": {f"{t} {s}": c for (t, s), c in arm.cells.items()},
                "val_error": {
                    f"{t} {s}": {format(lr, "g"): v for lr, v in g.items()} for (t, s), g in arm.val_grid.items()
                },
                "updates": {f"{t} {s}": vars(u) for (t, s), u in arm.updates.items()},
            }
            for arm in arms
        },
        "versus_full": {s: {b: ci(d) for b, d in by_batch.items()} for s, by_batch in versus.items()},
        "difference_of_differences": {s: ci(d) for s, d in dod.items()},
        "statements": verdicts,
        "figure": figure,
    }


def plot_val_grids(path: Path, arms: list[Arm]) -> str | None:
    """Validation error against lr per task, one curve per strategy and batch size; None without
    matplotlib or without a finished search run."""
    tasks = [t for t in TASKS if any(arm.val_grid.get((t, s)) for arm in arms for s in ABLATION_STRATEGIES)]
    if not tasks:
        return None
    try:
        from bvgls.runner.plots import new_figure, save_figure

        fig = new_figure((5.0 * len(tasks), 4.0))
    except ImportError:
        return None
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, t in zip(axes, tasks):
        for color, s in zip(("C1", "C0", "C2"), ABLATION_STRATEGIES):
            for style, arm in zip(("-", "--"), arms):
                grid = arm.val_grid.get((t, s), {})
                points = [(lr, v) for lr, v in grid.items() if math.isfinite(v)]
                if not points:
                    continue
                ax.plot(*zip(*points), style, color=color, marker="o", markersize=3, label=f"{s}, {arm.name}")
                chosen = arm.cells.get((t, s), {}).get("lr")
                if chosen in grid and math.isfinite(grid[chosen]):
                    ax.plot([chosen], [grid[chosen]], "*", color=color, markersize=12)
        ax.set_xscale("log")
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("lr")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation error (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Validation error over the searched lrs (star: chosen lr)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, str(path))
