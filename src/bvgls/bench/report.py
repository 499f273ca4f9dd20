"""The offline transfer benchmark (``bvgls bench``) and its quick version (``bvgls demo``).

The protocol is frozen in ``docs/benchmark.md`` and encoded in :data:`BENCH`; :data:`DEMO`
is a cut-down version for the README's first command. Every task of the suite is exported
as an ImageFolder and run through the runner's generic path, :func:`bvgls.runner.grid.compare`:

1. **lr search** (``search_seeds``): every strategy on every task at each lr of the grid,
   trained on the few-shot set carved from the task's pool, scored by the final validation
   error (mean over the search seeds). If the best lr lies at an end of the grid, the grid
   is extended by the next value of :data:`LR_LADDER` on that side, until it does not
   (or the ladder ends; reported).
2. **final runs** (``seeds``): every strategy at its chosen lr, evaluated every
   ``eval_every`` epochs (the training-length axis).

The report gives Table A (test error mean ± std over seeds), paired differences of BVG-LS
(and BVG-TS) against full finetuning and the best fixed partial strategy with 95%
confidence intervals (paired by seed; each seed is its own draw of the few shots), test
error against training length, and figures B (losses, BVG-LS against full finetuning) and
C (selection frequency per group and epoch) for every task.

The commands ``pretrain``, ``export-task``, ``bench`` and ``demo`` are added to the ``bvgls``
CLI when this module is imported (the CLI imports it as a plugin).
"""

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

from . import tasks  # noqa: F401  (registers fmnist-resnet and the offline:* tasks)
from .tasks import SPLITS, TASKS, VAL_FRACTION, build_task, export_image_folder

#: learning rates the grid may be extended to (factor ~3 apart)
LR_LADDER = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
SUITE = ("fmnist-invert", "fmnist-noise", "digits", "font-letters", "fmnist-pairs")
STRATEGIES = ("full", "L2-6", "L3-6", "L4-6", "L5-6", "linear", "bvgls", "bvgts")
PARTIAL = ("L2-6", "L3-6", "L4-6", "L5-6")
SELECTIVE = ("bvgls", "bvgts")


def _is_partial_spec(spec: str) -> bool:
    import re
    return re.fullmatch(r"L\d+-\d+", spec) is not None


@dataclass(frozen=True)
class Protocol:
    """Everything a benchmark run depends on (recorded in ``protocol.json``)."""

    tasks: tuple[str, ...] = SUITE
    strategies: tuple[str, ...] = STRATEGIES
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    search_seeds: tuple[int, ...] = (0, 1)
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1)
    extend_grid: bool = True
    epochs: int = 20
    batch_size: int = 16
    eval_every: int = 5
    schedule: str = "constant"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = "none"
    model: str = "fmnist-resnet"
    weights: str = "DEFAULT"
    val_fraction: float = VAL_FRACTION
    task_seed: int = 0
    #: (task, strategy, lr) triples that skip the search and use that lr (the demo uses the bench's choices)
    fixed_lrs: tuple[tuple[str, str, float], ...] = ()

    def fixed_lr(self, task: str, strategy: str) -> float | None:
        return next((lr for t, s, lr in self.fixed_lrs if (t, s) == (task, strategy)), None)

    def train_options(self, eval_every: int) -> dict:
        return {"optimizer": "sgd", "momentum": self.momentum, "nesterov": True, "weight_decay": self.weight_decay,
                "schedule": self.schedule, "channels_last": True, "num_workers": 0, "eval_every": eval_every,
                "device": "cpu"}


#: the frozen protocol of docs/benchmark.md
BENCH = Protocol()
#: ``bvgls demo``: two tasks (input-level and label-level shift), one seed, four strategies, each at the lr
#: that ``bvgls bench``'s validation search chose for it (docs/benchmark.md), so no search: the demo's
#: numbers are the bench's seed-0 runs of these cells.
DEMO = Protocol(tasks=("fmnist-invert", "fmnist-pairs"), strategies=("full", "L3-6", "linear", "bvgls"),
                seeds=(0,), search_seeds=(), fixed_lrs=(
                    ("fmnist-invert", "full", 0.003), ("fmnist-invert", "L3-6", 0.003),
                    ("fmnist-invert", "linear", 0.03), ("fmnist-invert", "bvgls", 0.01),
                    ("fmnist-pairs", "full", 0.003), ("fmnist-pairs", "L3-6", 0.003),
                    ("fmnist-pairs", "linear", 0.01), ("fmnist-pairs", "bvgls", 0.003)))


# ---------------------------------------------------------------------- running
@dataclass
class _Cell:
    task: str
    strategy: str
    data_dir: str
    out_dir: str
    protocol: Protocol
    threads: int = 1


def _log_to(path: str) -> Callable[[str], None]:
    def log(line: str) -> None:
        with open(path, "a") as f:
            f.write(line.rstrip() + "\n")
    return log


def _search(cell: _Cell, log: Callable[[str], None]) -> tuple[float, list[float], bool]:
    """The lr search of one (task, strategy): returns (chosen lr, searched grid, chosen at an edge)."""
    from ..runner.grid import choose_lrs, collect_results
    from ..runner.grid import compare as run_grid

    p = cell.protocol
    fixed = p.fixed_lr(cell.task, cell.strategy)
    if fixed is not None:
        return fixed, [fixed], False
    grid = sorted(p.lrs)
    if len(grid) == 1:
        return grid[0], grid, False
    search_dir = os.path.join(cell.out_dir, "search")
    while True:  # search runs are evaluated once, at the end
        run_grid([cell.strategy], {cell.task: cell.data_dir}, p.search_seeds, grid, model=p.model,
                 out_dir=search_dir, epochs=p.epochs, batch_size=p.batch_size, weights=p.weights,
                 val_fraction=p.val_fraction, augment=p.augment, train_options=p.train_options(eval_every=p.epochs),
                 progress=False, log=log)
        rows = [r for r in collect_results(search_dir) if r["dataset"] == cell.task and r["strategy"] == cell.strategy
                and r["lr"] in grid]
        chosen = choose_lrs(rows)[(cell.task, cell.strategy)]
        step = -1 if chosen == grid[0] else (+1 if chosen == grid[-1] else 0)
        extra = _next_lr(chosen, step) if step else None
        if not p.extend_grid or extra is None:
            return chosen, grid, step != 0
        log(f"{cell.task} {cell.strategy}: lr {chosen:g} is at the edge of {grid}; adding {extra:g}")
        grid = sorted(grid + [extra])


def _next_lr(lr: float, step: int) -> float | None:
    i = min(range(len(LR_LADDER)), key=lambda j: abs(math.log(LR_LADDER[j] / lr)))
    j = i + step
    return LR_LADDER[j] if 0 <= j < len(LR_LADDER) else None


def _run_cell(cell: _Cell) -> dict:
    """The lr search, then the final runs, of one (task, strategy); runs in a worker process."""
    import torch

    from ..runner.grid import compare as run_grid

    torch.set_num_threads(cell.threads)
    p = cell.protocol
    log = _log_to(os.path.join(cell.out_dir, "logs", f"{cell.task}__{cell.strategy}.log"))
    start = time.time()
    lr, grid, edge = _search(cell, log)
    run_grid([cell.strategy], {cell.task: cell.data_dir}, p.seeds, [lr], model=p.model,
             out_dir=os.path.join(cell.out_dir, "final"), epochs=p.epochs, batch_size=p.batch_size,
             weights=p.weights, val_fraction=p.val_fraction, augment=p.augment,
             train_options=p.train_options(eval_every=p.eval_every), progress=False, log=log)
    return {"task": cell.task, "strategy": cell.strategy, "lr": lr, "grid": grid, "edge": edge,
            "fixed": p.fixed_lr(cell.task, cell.strategy) is not None, "wall_s": round(time.time() - start, 1)}


def run_benchmark(out_dir: str | os.PathLike, protocol: Protocol = BENCH, *, workers: int = 2, threads: int = 1,
                  data_root: str | None = None, download: bool = False, log: Callable[[str], Any] = print) -> dict:
    """Run ``protocol`` into ``out_dir`` (resumable: finished runs are skipped) and write the report.

    ``workers`` processes run (task, strategy) cells in parallel, each with ``threads`` torch
    threads. ``data_root``/``download``: where Fashion-MNIST is, or may be fetched to, when the
    Debian package is not installed. Returns the summary that is also written to ``out_dir/summary.json``.
    """
    out = Path(out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    _check_protocol(out, protocol)
    start = time.time()
    data_dirs = {}
    for name in protocol.tasks:
        data_dirs[name] = str(export_image_folder(name, out / "data" / name, seed=protocol.task_seed,
                                                  data_root=data_root, download=download))
    log(f"exported {len(data_dirs)} task(s) to {out / 'data'} ({time.time() - start:.0f} s)")
    cells = [_Cell(t, s, data_dirs[t], str(out), protocol, threads) for t in protocol.tasks for s in protocol.strategies]
    searched = [c for c in cells if protocol.fixed_lr(c.task, c.strategy) is None]
    plan = f"{len(cells) * len(protocol.seeds)} runs"
    if searched and len(protocol.lrs) > 1:
        plan = (f"{len(searched) * len(protocol.search_seeds) * len(protocol.lrs)} lr-search runs (more if a grid "
                f"is extended) + {plan}")
    log(f"{len(cells)} (task, strategy) cells: {plan}, {workers} at a time; logs in {out / 'logs'}")
    results = []
    if workers <= 1:
        for cell in cells:
            results.append(_run_cell(cell))
            log(_cell_line(results[-1], len(results), len(cells), start))
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for res in pool.imap_unordered(_run_cell, cells):
                results.append(res)
                log(_cell_line(res, len(results), len(cells), start))
    wall = time.time() - start
    summary = write_report(out, protocol, results, wall_s=wall)
    log(f"total {wall / 60:.1f} min; report: {out / 'report.md'}")
    return summary


def _cell_line(res: dict, done: int, total: int, start: float) -> str:
    return (f"[{done}/{total}] {res['task']} {res['strategy']}: lr {res['lr']:g} (grid {', '.join(f'{x:g}' for x in res['grid'])}"
            f"{', EDGE' if res['edge'] else ''}) {res['wall_s']:.0f} s; {(time.time() - start) / 60:.1f} min so far")


def _check_protocol(out: Path, protocol: Protocol) -> None:
    path = out / "protocol.json"
    current = json.loads(json.dumps(asdict(protocol)))
    if path.is_file():
        old = json.loads(path.read_text())
        if old != current:
            diff = sorted(k for k in current if old.get(k) != current[k])
            raise ValueError(f"{out} holds a benchmark with another protocol (differs in {', '.join(diff)}); "
                             "use a new output directory")
    path.write_text(json.dumps(current, indent=2) + "\n")


# ---------------------------------------------------------------------- statistics
def t_quantile(df: int, q: float = 0.975) -> float:
    """Student-t quantile (scipy when installed; else a table for the 95% two-sided case)."""
    try:
        from scipy.stats import t
        return float(t.ppf(q, df))
    except ImportError:
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
                 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}
        return table.get(df) or table[max(k for k in table if k <= df)] if df >= 1 else math.nan


def paired_ci(diffs: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% t confidence interval of paired differences (nan bounds with one pair)."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, math.nan, math.nan
    half = t_quantile(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


# ---------------------------------------------------------------------- report
def _final_rows(out: Path) -> list[dict]:
    """The reported runs (``final/``), each with ``path``, its run directory."""
    from ..runner.grid import collect_results

    rows = collect_results(str(out / "final"))
    for r in rows:
        r["path"] = str(out / "final" / r["run_dir"])
    return [r for r in rows if r["test_error"] is not None]


def _errors_by_seed(rows, task, strategy) -> dict[int, float]:
    return {r["seed"]: float(r["test_error"]) for r in rows if r["dataset"] == task and r["strategy"] == strategy}


def _mean_history(out: Path, rows, task, strategy):
    """The per-epoch records of a cell's final runs averaged over seeds (a History)."""
    from ..runner.loop import History

    hists = [History.load(r["path"]) for r in rows
             if r["dataset"] == task and r["strategy"] == strategy]
    if not hists:
        return None
    epochs = []
    for records in zip(*[h.epochs for h in hists]):
        avg = {}
        for key, value in records[0].items():
            values = [rec.get(key) for rec in records]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and all(
                    isinstance(v, (int, float)) for v in values):
                avg[key] = statistics.fmean(values)
            elif isinstance(value, list) and all(isinstance(v, list) for v in values):
                avg[key] = [statistics.fmean(col) if all(isinstance(c, (int, float)) for c in col) else None
                            for col in zip(*values)]
            else:
                avg[key] = value
        avg["epoch"] = records[0]["epoch"]
        epochs.append(avg)
    return History({**hists[0].config, "seeds": len(hists)}, hists[0].group_names, hists[0].layer_group_names,
                   epochs, True)


def _fmt(values: Sequence[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else \
        f"{values[0]:.2f}"


def _fmt_ci(mean: float, lo: float, hi: float) -> str:
    return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]" if not math.isnan(lo) else f"{mean:+.2f}"


def write_report(out: str | os.PathLike, protocol: Protocol, cells: Sequence[dict] = (), *,
                 wall_s: float | None = None) -> dict:
    """Table A, paired differences, error against training length and figures B/C, from the
    finished runs in ``out`` (``report.md``, ``summary.json``, ``figures/``)."""
    out = Path(out)
    cell_info = {(c["task"], c["strategy"]): c for c in cells}
    if not cell_info and (out / "summary.json").is_file():  # report rewritten later: keep the search facts
        cell_info = {(c["task"], c["strategy"]): c for c in json.loads((out / "summary.json").read_text())["cells"]}
    rows = _final_rows(out)
    tasks = [t for t in protocol.tasks if any(r["dataset"] == t for r in rows)]
    strategies = [s for s in protocol.strategies if any(r["strategy"] == s for r in rows)]
    errors = {(t, s): _errors_by_seed(rows, t, s) for t in tasks for s in strategies}
    shift = {t: _task_manifest(out, t).get("shift", "") for t in tasks}

    lines = ["# Offline transfer benchmark: fmnist-resnet on few-shot target tasks", ""]
    lines += [f"Protocol: `{json.dumps(asdict(protocol))}`", ""]
    # ---- Table A
    lines += ["## Table A: test error (%), mean ± std over seeds (best per row in bold)", ""]
    lines.append("| Task | shift | " + " | ".join(strategies) + " |")
    lines.append("|---|---|" + "---:|" * len(strategies))
    means: dict[tuple[str, str], float] = {}
    for t in tasks:
        cells_t = {s: list(errors[(t, s)].values()) for s in strategies if errors[(t, s)]}
        for s, v in cells_t.items():
            means[(t, s)] = statistics.fmean(v)
        best = min(means[(t, s)] for s in cells_t)
        texts = [(f"**{_fmt(cells_t[s])}**" if math.isclose(means[(t, s)], best) else _fmt(cells_t[s]))
                 if s in cells_t else "–" for s in strategies]
        lines.append(f"| {t} | {shift[t]} | " + " | ".join(texts) + " |")
    if len(tasks) > 1:
        avg = {s: statistics.fmean(means[(t, s)] for t in tasks) for s in strategies
               if all((t, s) in means for t in tasks)}
        best = min(avg.values()) if avg else None
        lines.append("| Average | | " + " | ".join(
            (f"**{avg[s]:.2f}**" if math.isclose(avg[s], best) else f"{avg[s]:.2f}") if s in avg else "–"
            for s in strategies) + " |")
    lines.append("")
    # ---- learning rates
    if cell_info:
        lines += ["Learning rate per task and strategy: the one with the lowest mean final validation error over the "
                  "search seeds, searched grid in brackets, **EDGE** = still at an end of the grid; (fixed) = given "
                  "by the protocol.", ""]
        lines.append("| Task | " + " | ".join(strategies) + " |")
        lines.append("|---|" + "---:|" * len(strategies))
        for t in tasks:
            texts = []
            for s in strategies:
                c = cell_info.get((t, s))
                if c is None:
                    texts.append("–")
                elif c.get("fixed"):
                    texts.append(f"{c['lr']:g} (fixed)")
                else:
                    texts.append(f"{c['lr']:g} [{'-'.join(f'{x:g}' for x in c['grid'])}]"
                                 + (" **EDGE**" if c["edge"] else ""))
            lines.append(f"| {t} | " + " | ".join(texts) + " |")
        lines.append("")
    # ---- paired differences
    summary: dict[str, Any] = {"protocol": asdict(protocol), "tasks": tasks, "strategies": strategies,
                               "cells": list(cell_info.values()), "table": {}, "differences": {}}
    for (t, s), by_seed in errors.items():
        summary["table"].setdefault(t, {})[s] = {"mean": statistics.fmean(by_seed.values()) if by_seed else None,
                                                 "std": statistics.stdev(by_seed.values()) if len(by_seed) > 1 else None,
                                                 "by_seed": by_seed}
    diff_lines = _difference_section(tasks, strategies, errors, means, summary)
    lines += diff_lines
    # ---- training length
    lines += _length_section(out, rows, tasks, strategies, summary)
    # ---- selection
    lines += _selection_section(out, rows, tasks, summary)
    # ---- figures
    figures = _figures(out, rows, tasks, strategies)
    summary["figures"] = figures
    lines += ["## Figures", ""] + [f"- {k}: `{v}`" for k, v in figures.items()] + [""]
    # ---- environment
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    if wall_s is not None or "environment" not in previous:
        env = environment()
        summary["wall_s"] = None if wall_s is None else round(wall_s, 1)
    else:  # the report of an earlier run, redrawn: keep how and when that run was made
        env = previous["environment"]
        summary["wall_s"] = previous.get("wall_s")
    summary["environment"] = env
    lines += ["## Run", "", f"- command: `{env['command']}`", f"- hardware: {env['cpu']}, {env['cores']} cores, "
              f"torch {env['torch']} ({env['threads']} thread(s) per run)", f"- date: {env['date']}"]
    if summary.get("wall_s") is not None:
        lines.append(f"- total wall time: {summary['wall_s'] / 60:.1f} min")
    lines.append(f"- runs: {len(rows)} reported" + (f"; {_count_search(out)} in the lr search" if (out / 'search').is_dir() else ""))
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _task_manifest(out: Path, task: str) -> dict:
    path = out / "data" / task / "task.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _count_search(out: Path) -> int:
    from ..runner.grid import collect_results
    return len(collect_results(str(out / "search")))


def _difference_section(tasks, strategies, errors, means, summary) -> list[str]:
    partial = [s for s in PARTIAL if s in strategies]
    fixed = [s for s in strategies if s in ("full", "linear") or s in PARTIAL or _is_partial_spec(s)]  # not adaptive peers
    lines = []
    for sel in [s for s in SELECTIVE if s in strategies]:
        lines += [f"## Paired differences: {sel} minus baselines (test error points; negative = {sel} better)", "",
                  "Mean over seeds [95% t-interval], paired by seed (same few-shot draw). *Best partial* = the "
                  "one of " + ", ".join(partial) + " with the lowest mean test error on that task, *best fixed* = "
                  "the best of " + ", ".join(fixed) + " (both chosen with hindsight on the test set, as in the "
                  "paper's comparison).", ""]
        lines.append("| Task | vs full | vs best partial | vs best fixed |")
        lines.append("|---|---:|---:|---:|")
        per_seed_avg: dict[str, dict[int, list[float]]] = {"full": {}, "partial": {}, "fixed": {}}
        for t in tasks:
            row = [t]
            for kind, pool in (("full", ["full"]), ("partial", partial), ("fixed", fixed)):
                pool = [s for s in pool if (t, s) in means]
                if not pool or (t, sel) not in means:
                    row.append("–")
                    continue
                ref = min(pool, key=lambda s: means[(t, s)])
                seeds = sorted(set(errors[(t, sel)]) & set(errors[(t, ref)]))
                diffs = [errors[(t, sel)][k] - errors[(t, ref)][k] for k in seeds]
                for k, d in zip(seeds, diffs):
                    per_seed_avg[kind].setdefault(k, []).append(d)
                mean, lo, hi = paired_ci(diffs)
                summary["differences"].setdefault(sel, {}).setdefault(t, {})[kind] = {
                    "reference": ref, "mean": mean, "ci95": [lo, hi], "n": len(diffs)}
                row.append(_fmt_ci(mean, lo, hi) + (f" ({ref})" if kind != "full" else ""))
            lines.append("| " + " | ".join(row) + " |")
        if len(tasks) > 1:
            row = ["Average over tasks"]
            for kind in ("full", "partial", "fixed"):
                diffs = [statistics.fmean(v) for k, v in sorted(per_seed_avg[kind].items()) if len(v) == len(tasks)]
                if diffs:
                    mean, lo, hi = paired_ci(diffs)
                    summary["differences"].setdefault(sel, {}).setdefault("average", {})[kind] = {
                        "mean": mean, "ci95": [lo, hi], "n": len(diffs)}
                    row.append(_fmt_ci(mean, lo, hi))
                else:
                    row.append("–")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _length_section(out, rows, tasks, strategies, summary) -> list[str]:
    """Mean test error at every evaluated epoch (each strategy at its chosen lr)."""
    curves: dict[str, dict[str, dict[int, float]]] = {}
    for t in tasks:
        for s in strategies:
            hist = _mean_history(out, rows, t, s)
            if hist is None:
                continue
            curves.setdefault(t, {})[s] = {r["epoch"]: r["test_error"] for r in hist.epochs
                                           if r.get("test_error") is not None}
    summary["test_error_by_epoch"] = curves
    epochs = sorted({e for t in curves for s in curves[t] for e in curves[t][s]})
    if len(epochs) < 2:
        return []
    lines = ["## Test error (%) against training length (average over tasks; each strategy at its chosen lr, "
             "constant schedule, so epoch e is where an e-epoch run would stop)", ""]
    lines.append("| Epoch | " + " | ".join(strategies) + " |")
    lines.append("|---:|" + "---:|" * len(strategies))
    for e in epochs:
        texts = []
        vals = {}
        for s in strategies:
            per_task = [curves[t][s][e] for t in tasks if s in curves.get(t, {}) and e in curves[t][s]]
            if len(per_task) == len(tasks):
                vals[s] = statistics.fmean(per_task)
        best = min(vals.values()) if vals else None
        for s in strategies:
            texts.append("–" if s not in vals else (f"**{vals[s]:.2f}**" if math.isclose(vals[s], best)
                                                    else f"{vals[s]:.2f}"))
        lines.append(f"| {e} | " + " | ".join(texts) + " |")
    lines.append("")
    return lines


def _selection_section(out, rows, tasks, summary) -> list[str]:
    lines = []
    for sel in SELECTIVE:
        table = {}
        for t in tasks:
            hist = _mean_history(out, rows, t, sel)
            if hist is None or not hist.epochs:
                continue
            key = "layer_selection_frequency" if hist.epochs[0].get("layer_selection_frequency") else \
                "selection_frequency"
            names = hist.layer_group_names if key == "layer_selection_frequency" else hist.group_names
            first = hist.epochs[0][key]
            overall = [statistics.fmean(col) for col in zip(*[r[key] for r in hist.epochs])]
            table[t] = {"groups": names, "first_epoch": first, "overall": overall}
        if not table:
            continue
        summary.setdefault("selection", {})[sel] = table
        names = next(iter(table.values()))["groups"]
        what = "fraction of steps" if sel == "bvgls" else "mean over the group's tensors of the fraction of steps"
        lines += [f"## {sel}: selection frequency per group ({what}; mean over seeds), first epoch / whole run", ""]
        lines.append("| Task | " + " | ".join(f"{i + 1} {n}" for i, n in enumerate(names)) + " |")
        lines.append("|---|" + "---:|" * len(names))
        for t, v in table.items():
            lines.append(f"| {t} | " + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(v["first_epoch"], v["overall"]))
                         + " |")
        lines.append("")
    return lines


def _figures(out: Path, rows, tasks, strategies) -> dict[str, str]:
    """Per task: B (bvgls vs full, mean over seeds) and C (bvgls selection heatmap); and the two
    summary figures over all tasks."""
    from ..runner.plots import plot_losses, plot_selection

    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    written: dict[str, str] = {}
    means = {}
    for t in tasks:
        for s in ("bvgls", "full"):
            if s in strategies:
                means[(t, s)] = _mean_history(out, rows, t, s)
        runs = [(f"{s} (mean of {means[(t, s)].config['seeds']} seeds)", means[(t, s)])
                for s in ("bvgls", "full") if means.get((t, s)) is not None]
        if runs:
            written[f"B {t}"] = plot_losses(runs, str(fig_dir / f"B_loss_{t}.png"), f"{t}: BVG-LS vs full finetuning")
        if means.get((t, "bvgls")) is not None:
            written[f"C {t}"] = plot_selection(means[(t, "bvgls")], str(fig_dir / f"C_selection_{t}.png"),
                                               f"{t}: BVG-LS selection frequency per epoch (mean over seeds)")
    if any(means.get((t, "bvgls")) for t in tasks):
        written["B all tasks"] = _summary_losses(fig_dir / "B_test_loss_all.png", tasks, means)
        written["C all tasks"] = _summary_selection(fig_dir / "C_selection_all.png", tasks, means)
    return {k: os.path.relpath(v, out) for k, v in written.items()}


def _summary_losses(path: Path, tasks, means) -> str:
    from ..runner.plots import _figure, _save

    fig = _figure((max(7.0, 3.0 * len(tasks)), 5.4))
    axes = fig.subplots(2, len(tasks), squeeze=False)
    for i, t in enumerate(tasks):
        for s, color in (("full", "C1"), ("bvgls", "C0")):
            hist = means.get((t, s))
            if hist is None:
                continue
            for row, key in ((0, "train_loss"), (1, "test_loss")):
                pts = [(r["epoch"], r[key]) for r in hist.epochs if r.get(key) is not None]
                if pts:
                    axes[row][i].plot(*zip(*pts), marker="o", markersize=2.5, color=color,
                                      lw=2.2 if s == "bvgls" else 1.4, label="BVG-LS" if s == "bvgls" else "full")
        axes[0][i].set_title(t, fontsize=10)
        axes[1][i].set_xlabel("epoch")
        for row in (0, 1):
            axes[row][i].grid(alpha=0.3)
    axes[0][0].set_ylabel("train loss")
    axes[1][0].set_ylabel("test loss")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("(B) loss per epoch: BVG-LS vs full finetuning (mean over seeds, each at its chosen lr)",
                 fontsize=10)
    return _save(fig, str(path))


def _summary_selection(path: Path, tasks, means) -> str:
    import numpy as np

    from ..runner.plots import _figure, _save

    present = [t for t in tasks if means.get((t, "bvgls")) is not None]
    fig = _figure((max(7.0, 3.0 * len(present) + 1.0), 3.2))
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    im = None
    for ax, t in zip(axes, present):
        hist = means[(t, "bvgls")]
        data = np.array([r["selection_frequency"] for r in hist.epochs], dtype=float).T
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest",
                       extent=(0.5, len(hist.epochs) + 0.5, len(hist.group_names) - 0.5, -0.5))
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_yticks(range(len(hist.group_names)), hist.group_names if ax is axes[0] else [""] * len(hist.group_names),
                      fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=list(axes), label="fraction of steps")
    fig.suptitle("(C) BVG-LS: fraction of each epoch's steps that updated each group (mean over seeds)",
                 fontsize=10)
    return _save(fig, str(path))


def environment() -> dict:
    import datetime

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"command": " ".join(["bvgls"] + sys.argv[1:]) if sys.argv and sys.argv[0].endswith("bvgls") else
            " ".join(sys.argv), "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": 1, "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}


def print_table(out: str | os.PathLike) -> str:
    """The Table A section of a report (for the CLI)."""
    text = (Path(out) / "report.md").read_text()
    start = text.index("## Table A")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None].strip()


# ---------------------------------------------------------------------- CLI
def _attach_cli() -> None:
    try:
        import typer

        from ..cli import app, user_errors
    except ImportError:  # the CLI extras are not installed
        return

    DataRoot = Annotated[str | None, typer.Option("--data-root", help=(
        "Directory with the Fashion-MNIST .gz files, or where --download puts them (default: the Debian "
        "package's /usr/share/datasets/fashion-mnist)."))]
    Download = Annotated[bool, typer.Option("--download", help="Fetch Fashion-MNIST with torchvision if missing.")]

    @app.command("pretrain")
    def pretrain_cmd(
        out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the checkpoint (.pt).")],
        epochs: Annotated[int, typer.Option("--epochs", min=1, help="Epochs over Fashion-MNIST train.")] = 8,
        seed: Annotated[int, typer.Option("--seed", help="Seeds init, shuffling and augmentation.")] = 0,
        lr: Annotated[float, typer.Option("--lr", help="Peak lr of the one-cycle schedule.")] = 0.1,
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 128,
        threads: Annotated[int, typer.Option("--threads", min=1, help=(
            "torch threads; 1 is fastest on a shared machine."))] = 1,
        data_root: Annotated[str | None, typer.Option("--data-root", help=(
            "Directory with the Fashion-MNIST .gz files (default: the Debian package's)."))] = None,
        download: Annotated[bool, typer.Option("--download", help="Fetch Fashion-MNIST with torchvision if missing.")] = False,
    ) -> None:
        """Pretrain the fmnist-resnet source model on the Fashion-MNIST train split (seeded).

        The shipped checkpoint was made with: bvgls pretrain --out fmnist_resnet.pt --epochs 8 --seed 0 --threads 1
        """
        from .source_model import pretrain

        with user_errors():
            meta = pretrain(out, epochs=epochs, seed=seed, lr=lr, batch_size=batch_size, threads=threads,
                            data_root=data_root, download=download)
        typer.echo(f"use it with: --model fmnist-resnet --weights {out}   (sha256 {meta['sha256']})")

    @app.command("export-task", no_args_is_help=True)
    def export_task_cmd(
        name: Annotated[str, typer.Argument(help=f"Task: {', '.join(TASKS)}.")],
        out: Annotated[Path, typer.Argument(help="Empty directory to write train/ and test/ class folders to.")],
        seed: Annotated[int, typer.Option("--seed", help="Task construction seed.")] = 0,
        data_root: DataRoot = None,
        download: Download = False,
    ) -> None:
        """Write an offline target task as an ImageFolder (train/ = few shots + validation pool, test/).

        Use it with: bvgls compare --model fmnist-resnet --data DIR --val-fraction 0.7143 --augment none ...
        """
        with user_errors():
            task = build_task(name, seed=seed, data_root=data_root, download=download)
            path = export_image_folder(task, out)
        sizes = ", ".join(f"{s} {n}" for s, n in task.sizes().items())
        typer.echo(f"{path}: {task.name} ({task.shift}-level shift), {task.num_classes} classes, {sizes}; "
                   f"{task.shots} shots per class after --val-fraction {task.val_fraction:.4f}")

    def _run(out: Path, protocol: Protocol, workers: int, data_root: str | None, download: bool) -> None:
        with user_errors():
            summary = run_benchmark(out, protocol, workers=workers, data_root=data_root, download=download)
        typer.echo("")
        typer.echo(print_table(out))
        typer.echo("")
        for key, path in summary["figures"].items():
            if "all tasks" in key:
                typer.echo(f"figure {key}: {out / path}")
        typer.echo(f"full report: {out / 'report.md'} (per-task figures in {out / 'figures'}); "
                   f"total {summary['wall_s'] / 60:.1f} min")

    @app.command("bench")
    def bench_cmd(
        out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (resumable).")] = Path("bench-out"),
        workers: Annotated[int, typer.Option("--workers", "-j", min=1, help="Runs in parallel (one CPU core each).")] = 2,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the protocol and the number of runs only.")] = False,
        data_root: DataRoot = None,
        download: Download = False,
    ) -> None:
        """Run the frozen offline benchmark (docs/benchmark.md): 5 tasks x 8 strategies x 5 seeds, lr searched per strategy.

        Writes report.md (Table A, paired differences with 95% CIs, error against training length, selection
        frequencies), summary.json and figures/ (B and C per task). 76 min measured on 2 shared CPU cores.
        """
        if dry_run:
            typer.echo(json.dumps(asdict(BENCH), indent=2))
            cells = len(BENCH.tasks) * len(BENCH.strategies)
            typer.echo(f"{cells} cells; {cells * len(BENCH.search_seeds) * len(BENCH.lrs)} search runs (+2 per grid "
                       f"extension) and {cells * len(BENCH.seeds)} final runs")
            return
        _run(out, BENCH, workers, data_root, download)

    @app.command("demo")
    def demo_cmd(
        out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("bvgls-demo"),
        workers: Annotated[int, typer.Option("--workers", "-j", min=1, help="Runs in parallel (one CPU core each).")] = 2,
        data_root: DataRoot = None,
        download: Download = False,
    ) -> None:
        """Quick offline demo (about 2 minutes on 2 CPU cores): BVG-LS vs full, partial (L3-6) and linear finetuning
        of a Fashion-MNIST-pretrained ResNet on two few-shot tasks, each strategy at the lr the benchmark chose;
        prints Table A and the figures' paths."""
        _run(out, DEMO, workers, data_root, download)


_attach_cli()
