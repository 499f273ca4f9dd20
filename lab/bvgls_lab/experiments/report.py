"""The benchmark's report: Table A, paired differences of BVG-LS (and BVG-TS and the adaptive
peers) against full finetuning and the best fixed partial strategy with 95% confidence intervals
(paired by seed; each seed is its own draw of the few shots), the lean variants and the closest
peer against BVG-LS with the lean verdict, the paper's claims as judged by the protocols, the
cost of each strategy's final runs relative to full finetuning, the lr search's validation errors,
test error against training length, selection frequencies, and figures B (losses, BVG-LS against
full finetuning) and C (selection frequency per group and epoch) for every task (``report.md``,
``summary.json``, ``runs.csv``, ``figures/``)."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bvgls.runner.grid import collect_results, table_a_lines, text_grid_lines
from bvgls.runner.lrsens import FIGURE_NAME, lr_sensitivity, lr_sensitivity_lines, several_lrs
from bvgls.runner.plots import new_figure, plot_losses, plot_selection, save_figure, write_lr_sensitivity
from bvgls.runner.rundir import History
from bvgls.strategies import is_partial_spec

from .protocols import SELECTIVE, Protocol

#: adaptive peers also compared with the fixed baselines, as BVG-LS is
PEERS = ("auto-snr", "auto-rgn")
#: the lean verdict: mean difference to bvgls at most this many points ...
LEAN_MARGIN = 0.3
#: ... and the final runs' total wall time at most this fraction of full finetuning's
LEAN_COST = 0.6


# ---------------------------------------------------------------------- statistics
def t_quantile(df: int, q: float = 0.975) -> float:
    """Student-t quantile (scipy when installed; else a table for the 95% two-sided case)."""
    try:
        from scipy.stats import t

        return float(t.ppf(q, df))
    except ImportError:
        table = {
            1: 12.706,
            2: 4.303,
            3: 3.182,
            4: 2.776,
            5: 2.571,
            6: 2.447,
            7: 2.365,
            8: 2.306,
            9: 2.262,
            10: 2.228,
            15: 2.131,
            20: 2.086,
            30: 2.042,
        }
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
def final_rows(out: Path, seeds: Sequence[int] | None = None) -> list[dict]:
    """The reported runs (``final/``, of ``seeds`` when given), each with ``path``, its run directory."""
    rows = collect_results(str(out / "final"))
    for r in rows:
        r["path"] = str(out / "final" / r["run_dir"])
    return [r for r in rows if r["test_error"] is not None and (seeds is None or r["seed"] in seeds)]


def errors_by_seed(rows, task, strategy) -> dict[int, float]:
    return {r["seed"]: float(r["test_error"]) for r in rows if r["dataset"] == task and r["strategy"] == strategy}


def _mean_history(out: Path, rows, task, strategy):
    """The per-epoch records of a cell's final runs averaged over seeds (a History)."""
    hists = [History.load(r["path"]) for r in rows if r["dataset"] == task and r["strategy"] == strategy]
    if not hists:
        return None
    epochs = []
    for records in zip(*[h.epochs for h in hists]):
        avg = {}
        for key, value in records[0].items():
            values = [rec.get(key) for rec in records]
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and all(isinstance(v, (int, float)) for v in values)
            ):
                avg[key] = statistics.fmean(values)
            elif isinstance(value, list) and all(isinstance(v, list) for v in values):
                avg[key] = [
                    statistics.fmean(col) if all(isinstance(c, (int, float)) for c in col) else None
                    for col in zip(*values)
                ]
            else:
                avg[key] = value
        avg["epoch"] = records[0]["epoch"]
        epochs.append(avg)
    return History(
        {**hists[0].config, "seeds": len(hists)}, hists[0].group_names, hists[0].layer_group_names, epochs, True
    )


def fmt_ci(mean: float, lo: float, hi: float) -> str:
    return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]" if not math.isnan(lo) else f"{mean:+.2f}"


def write_report(
    out: str | os.PathLike,
    protocol: Protocol,
    cells: Sequence[dict] = (),
    *,
    wall_s: float | None = None,
    reference: str | os.PathLike | None = None,
) -> dict:
    """Table A, paired differences, error against training length and figures B/C, from the
    finished runs in ``out`` (``report.md``, ``summary.json``, ``runs.csv``, ``figures/``).
    ``reference``: an earlier benchmark's ``runs.csv`` whose final runs the same cells must reproduce."""
    out = Path(out)
    cell_info = _cell_info(out, cells)
    rows = final_rows(out, protocol.seeds)  # runs of other seeds (a protocol cut short) are not reported
    tasks = [t for t in protocol.tasks if any(r["dataset"] == t for r in rows)]
    strategies = [s for s in protocol.strategies if any(r["strategy"] == s for r in rows)]
    errors = {(t, s): errors_by_seed(rows, t, s) for t in tasks for s in strategies}

    lines = [f"# Transfer benchmark: {protocol.model} on few-shot target tasks", ""]
    lines += [f"Protocol: `{json.dumps(asdict(protocol))}`", ""]
    lines += _tasks_lines(out)
    lines += _table_a_section(out, tasks, strategies, errors)
    lines += _learning_rate_section(tasks, strategies, cell_info)
    summary = _new_summary(protocol, tasks, strategies, cell_info, errors)
    means = {cell: statistics.fmean(by_seed.values()) for cell, by_seed in errors.items() if by_seed}
    lines += _difference_section(tasks, strategies, errors, means, summary)
    lines += _pairs_section(tasks, strategies, errors, summary)
    lines += _cost_section(out, rows, strategies, summary)
    if reference is not None:
        lines += _reproduction_section(rows, Path(reference), summary)
    lines += _search_section(out, tasks, strategies, summary)
    lines += _length_section(out, rows, tasks, strategies, summary)
    lines += _selection_section(out, rows, tasks, strategies, summary)
    lines += _claims_section(out, rows, tasks, strategies, errors, summary)
    figures = _figures(out, rows, tasks, strategies)
    summary["figures"] = figures
    lines += ["## Figures", ""] + [f"- {k}: `{v}`" for k, v in figures.items()] + [""]
    lines += _run_section(out, rows, wall_s, summary)
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    write_runs_csv(out)
    return summary


def _cell_info(out: Path, cells: Sequence[dict]) -> dict[tuple[str, str], dict]:
    """The lr search's facts per (task, strategy): from ``cells``, else (a report rewritten later)
    from the earlier ``summary.json``."""
    if not cells and (out / "summary.json").is_file():
        cells = json.loads((out / "summary.json").read_text())["cells"]
    return {(c["task"], c["strategy"]): c for c in cells}


def _table_a_section(out: Path, tasks: list[str], strategies: list[str], errors: dict) -> list[str]:
    shift = {t: _task_manifest(out, t).get("shift", "") for t in tasks}
    cells = {(t, s): list(errors[(t, s)].values()) for t in tasks for s in strategies if errors[(t, s)]}
    lines = ["## Table A: test error (%), mean ± std over seeds (best per row in bold)", ""]
    lines += table_a_lines(tasks, strategies, cells, header="Task", extra=shift, extra_header="shift")
    return lines + [""]


def _learning_rate_section(tasks: list[str], strategies: list[str], cell_info: dict) -> list[str]:
    if not cell_info:
        return []
    lines = [
        "Learning rate per task and strategy: the one with the lowest mean final validation error over the "
        "search seeds, searched grid in brackets, **EDGE** = still at an end of the grid; (fixed) = given "
        "by the protocol.",
        "",
    ]
    lines += text_grid_lines(tasks, strategies, lambda t, s: lr_cell_text(cell_info.get((t, s))), header="Task")
    return lines + [""]


def _new_summary(protocol: Protocol, tasks: list[str], strategies: list[str], cell_info: dict, errors: dict) -> dict:
    """``summary.json``'s protocol, cells and Table A (mean, std and every seed's error per cell);
    the report's sections add the rest."""
    table: dict[str, dict] = {}
    for (t, s), by_seed in errors.items():
        table.setdefault(t, {})[s] = {
            "mean": statistics.fmean(by_seed.values()) if by_seed else None,
            "std": statistics.stdev(by_seed.values()) if len(by_seed) > 1 else None,
            "by_seed": by_seed,
        }
    return {
        "protocol": asdict(protocol),
        "tasks": tasks,
        "strategies": strategies,
        "cells": list(cell_info.values()),
        "table": table,
        "differences": {},
    }


def _run_section(out: Path, rows: list[dict], wall_s: float | None, summary: dict) -> list[str]:
    """How and when the runs were made (a report redrawn later keeps those of the run it reports)."""
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    if wall_s is not None or "environment" not in previous:
        env = environment()
        summary["wall_s"] = None if wall_s is None else round(wall_s, 1)
    else:
        env = previous["environment"]
        summary["wall_s"] = previous.get("wall_s")
    summary["environment"] = env
    lines = [
        "## Run",
        "",
        f"- command: `{env['command']}`",
        f"- hardware: {env['cpu']}, {env['cores']} cores, torch {env['torch']} ({env['threads']} thread(s) per run)",
        f"- date: {env['date']}",
    ]
    if summary.get("wall_s") is not None:
        lines.append(f"- total wall time: {summary['wall_s'] / 60:.1f} min")
    searched = f"; {_count_search(out)} in the lr search" if (out / "search").is_dir() else ""
    lines.append(f"- runs: {len(rows)} reported" + searched)
    return lines


def write_runs_csv(out: Path) -> None:
    """Every finished run, search then final, as one table (``runs.csv``)."""
    from bvgls.runner.grid import RESULT_COLUMNS

    columns = [c for c in RESULT_COLUMNS if c != "chosen"]
    rows = [
        r for part in ("search", "sweep", "final") if (out / part).is_dir() for r in collect_results(str(out / part))
    ]
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in columns})


def _tasks_lines(out: Path) -> list[str]:
    """Where a pretrained task came from: its manifest's checksum and counts per class."""
    path = out / "tasks.json"
    if not path.is_file():
        return []
    lines = ["Tasks (built by `bash scripts/setup_pretrained.sh`; images train / val / test per class):", ""]
    for name, info in json.loads(path.read_text()).items():
        counts = ", ".join(f"{c} {v['train']}/{v['val']}/{v['test']}" for c, v in info["counts"].items())
        lines.append(
            f"- `{name}`: manifest sha256 `{info['manifest_sha256'][:16]}`; validation fraction of the "
            f"pool {info['val_fraction']:.4f}; {counts}"
        )
    return lines + [""]


def lr_cell_text(cell: dict | None) -> str:
    """A cell's lr with its searched grid (or ``(fixed)``) and ``**EDGE**`` if still at an end."""
    if cell is None:
        return "–"
    if cell.get("fixed"):
        return f"{cell['lr']:g} (fixed)"
    return f"{cell['lr']:g} [{'-'.join(f'{x:g}' for x in cell['grid'])}]" + (" **EDGE**" if cell["edge"] else "")


def _task_manifest(out: Path, task: str) -> dict:
    path = out / "data" / task / "task.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _count_search(out: Path) -> int:
    return len(collect_results(str(out / "search")))


def _difference_section(tasks, strategies, errors, means, summary) -> list[str]:
    partial = [s for s in strategies if is_partial_spec(s)]
    fixed = [s for s in strategies if s in ("full", "linear") or is_partial_spec(s)]  # not adaptive peers
    lines = []
    for sel in [s for s in SELECTIVE + PEERS if s in strategies]:
        lines += [
            f"## Paired differences: {sel} minus baselines (test error points; negative = {sel} better)",
            "",
            "Mean over seeds [95% t-interval], paired by seed (same few-shot draw). *Best partial* = the "
            "one of " + (", ".join(partial) or "(none run)") + " with the lowest mean test error on that task, "
            "*best fixed* = "
            "the best of " + ", ".join(fixed) + " (both chosen with hindsight on the test set, as in the "
            "paper's comparison).",
            "",
        ]
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
                    "reference": ref,
                    "mean": mean,
                    "ci95": [lo, hi],
                    "n": len(diffs),
                }
                row.append(fmt_ci(mean, lo, hi) + (f" ({ref})" if kind != "full" else ""))
            lines.append("| " + " | ".join(row) + " |")
        if len(tasks) > 1:
            row = ["Average over tasks"]
            for kind in ("full", "partial", "fixed"):
                diffs = [statistics.fmean(v) for k, v in sorted(per_seed_avg[kind].items()) if len(v) == len(tasks)]
                if diffs:
                    mean, lo, hi = paired_ci(diffs)
                    summary["differences"].setdefault(sel, {}).setdefault("average", {})[kind] = {
                        "mean": mean,
                        "ci95": [lo, hi],
                        "n": len(diffs),
                    }
                    row.append(fmt_ci(mean, lo, hi))
                else:
                    row.append("–")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def paired_differences(tasks, errors, a: str, b: str) -> dict[str, tuple[float, float, float, int]]:
    """``a − b`` test error paired by seed: per task, and (with several tasks) the per-seed average
    over the tasks as ``"average"``; each as (mean, ci low, ci high, pairs)."""
    out: dict[str, tuple[float, float, float, int]] = {}
    per_seed: dict[int, list[float]] = {}
    for t in tasks:
        ea, eb = errors.get((t, a), {}), errors.get((t, b), {})
        seeds = sorted(set(ea) & set(eb))
        if not seeds:
            continue
        diffs = [ea[k] - eb[k] for k in seeds]
        for k, d in zip(seeds, diffs):
            per_seed.setdefault(k, []).append(d)
        out[t] = (*paired_ci(diffs), len(diffs))
    if len(tasks) > 1:
        avg = [statistics.fmean(v) for _, v in sorted(per_seed.items()) if len(v) == len(tasks)]
        if avg:
            out["average"] = (*paired_ci(avg), len(avg))
    return out


def lean_keeps_accuracy(mean: float, lo: float) -> bool:
    """The lean rule: mean at most +0.3 points, and the 95% interval includes 0 or lies below it."""
    return mean <= LEAN_MARGIN and not lo > 0


def _pairs_section(tasks, strategies, errors, summary) -> list[str]:
    """The lean variants and the closest peer by statistic against BVG-LS."""
    if "bvgls" not in strategies:
        return []
    others = [s for s in strategies if s.startswith("bvgls:") or s == "auto-snr"]
    if not others:
        return []
    lines = [
        "## Against BVG-LS (test error points, paired by seed; negative = better than bvgls)",
        "",
        f"Lean verdict: *keeps the accuracy* iff the mean is at most +{LEAN_MARGIN} points and "
        "the 95% interval includes 0 or lies below it (judged on the average over tasks, or on the one task).",
        "",
    ]
    keys = [t for t in tasks] + (["average"] if len(tasks) > 1 else [])
    lines.append("| Difference | " + " | ".join(keys) + " | verdict |")
    lines.append("|---|" + "---:|" * len(keys) + "---|")
    for s in others:
        diffs = paired_differences(tasks, errors, s, "bvgls")
        judged = diffs.get("average") or (diffs.get(tasks[0]) if len(tasks) == 1 else None)
        verdict = "–"
        if judged and s.startswith("bvgls:") and not math.isnan(judged[1]):
            verdict = "keeps the accuracy" if lean_keeps_accuracy(judged[0], judged[1]) else "does not keep it"
        summary.setdefault("against_bvgls", {})[s] = {
            k: {"mean": m, "ci95": [lo, hi], "n": n} for k, (m, lo, hi, n) in diffs.items()
        }
        summary["against_bvgls"][s]["verdict"] = verdict
        lines.append(
            f"| {s} − bvgls | "
            + " | ".join(fmt_ci(*diffs[k][:3]) if k in diffs else "–" for k in keys)
            + f" | {verdict} |"
        )
    return lines + [""]


def _run_seconds(rows) -> tuple[float, float]:
    """Total ``wall_s`` (results) and ``train_s`` (summed over epochs) of some runs."""
    wall = sum(float(r["wall_s"]) for r in rows if r.get("wall_s") is not None)
    train = sum(float(e.get("train_s") or 0.0) for r in rows if r.get("path") for e in History.load(r["path"]).epochs)
    return wall, train


def _cost_section(out, rows, strategies, summary) -> list[str]:
    """Each strategy's final runs (and lr-search runs) in seconds and relative to full finetuning."""
    if "full" not in strategies:
        return []
    search_rows = collect_results(str(out / "search")) if (out / "search").is_dir() else []
    cost = {}
    for s in strategies:
        wall, train = _run_seconds([r for r in rows if r["strategy"] == s])
        search = sum(float(r["wall_s"]) for r in search_rows if r["strategy"] == s and r.get("wall_s") is not None)
        cost[s] = {
            "runs": sum(r["strategy"] == s for r in rows),
            "wall_s": wall,
            "train_s": train,
            "search_wall_s": search,
        }
    full = cost["full"]
    lines = [
        f"## Cost of the final runs (sum over tasks and seeds; ratio to full finetuning's; lean target <= "
        f"{LEAN_COST}x wall)",
        "",
        "| Strategy | runs | wall_s | × full | train_s | × full | lr-search wall_s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s, c in cost.items():
        c["wall_ratio"] = c["wall_s"] / full["wall_s"] if full["wall_s"] else math.nan
        c["train_ratio"] = c["train_s"] / full["train_s"] if full["train_s"] else math.nan
        lines.append(
            f"| {s} | {c['runs']} | {c['wall_s']:.0f} | {c['wall_ratio']:.2f} | {c['train_s']:.0f} | "
            f"{c['train_ratio']:.2f} | {c['search_wall_s']:.0f} |"
        )
    summary["cost"] = cost
    return lines + [
        "",
        "Wall times come from one run of the benchmark on a shared machine: they carry its load "
        "(other jobs), which differs between cells run at different times.",
        "",
    ]


def _reproduction_section(rows, reference: Path, summary) -> list[str]:
    """The final runs' test errors against an earlier benchmark's ``runs.csv`` (same cells)."""
    with open(reference, newline="") as f:
        ref = {
            (r["dataset"], r["strategy"], int(r["seed"]), float(r["lr"])): float(r["test_error"])
            for r in csv.DictReader(f)
            if r.get("phase") == "final" and r.get("test_error")
        }
    matched, differ = 0, []
    for r in rows:
        key = (r["dataset"], r["strategy"], int(r["seed"]), float(r["lr"]))
        if key in ref:
            matched += 1
            if not math.isclose(ref[key], float(r["test_error"]), abs_tol=1e-9):
                differ.append(f"{key[0]} {key[1]} seed {key[2]}: {ref[key]:.2f} -> {float(r['test_error']):.2f}")
    summary["reproduction"] = {"reference": str(reference), "compared": matched, "differ": differ}
    lines = [
        f"## Reproduction of `{reference}`",
        "",
        f"{matched} final runs have a counterpart (task, strategy, seed, lr) there; "
        f"{matched - len(differ)} have the identical test error, {len(differ)} differ.",
    ]
    return lines + ([""] + [f"- {d}" for d in differ] if differ else []) + [""]


def _search_section(out, tasks, strategies, summary) -> list[str]:
    """Mean final validation error at every lr each searched cell tried."""
    if not (out / "search").is_dir():
        return []
    by_cell: dict[tuple[str, str], dict[float, list[float]]] = {}
    for r in collect_results(str(out / "search")):
        if r["val_error"] is not None:
            by_cell.setdefault((r["dataset"], r["strategy"]), {}).setdefault(r["lr"], []).append(r["val_error"])
    if not by_cell:
        return []
    summary["search_val_error"] = {
        f"{t} {s}": {format(lr, "g"): statistics.fmean(v) for lr, v in sorted(c.items())}
        for (t, s), c in by_cell.items()
    }
    lines = ["## lr search: mean final validation error (%) at every lr tried", ""]

    def order(kv):
        (t, s), _ = kv
        return tasks.index(t) if t in tasks else 99, strategies.index(s) if s in strategies else 99

    for (t, s), c in sorted(by_cell.items(), key=order):
        lines.append(f"- {t} / {s}: " + ", ".join(f"{lr:g}: {statistics.fmean(v):.1f}" for lr, v in sorted(c.items())))
    sens = lr_sensitivity(collect_results(str(out / "search")))
    if several_lrs(sens):  # the search runs (its seeds, one final evaluation) at every lr, test error too
        lines += [""] + lr_sensitivity_lines(sens, figure=f"figures/{FIGURE_NAME}")[2:]
    return lines + [""]


def _first_eval_losses(rows, task, strategy) -> dict[int, float]:
    """Per seed, the test loss at the first evaluated epoch."""
    out = {}
    for r in rows:
        if r["dataset"] == task and r["strategy"] == strategy:
            evaluated = [e for e in History.load(r["path"]).epochs if e.get("test_loss") is not None]
            if evaluated:
                out[r["seed"]] = float(evaluated[0]["test_loss"])
    return out


def _side(lo: float, hi: float) -> str:
    return "better" if hi < 0 else ("worse" if lo > 0 else "tie")


def _claims_section(out, rows, tasks, strategies, errors, summary) -> list[str]:
    """The paper's claims A, B and C as docs/experiments/pretrained.md judges them (where the
    strategies they need were run)."""
    if not {"bvgls", "full"} <= set(strategies):
        return []
    judged = {
        "A": _claim_a(tasks, strategies, errors),
        "B": _claim_b(rows, tasks),
        "C": _claim_c(summary.get("selection", {}).get("bvgls", {})),
    }
    judged = {name: verdict_line for name, verdict_line in judged.items() if verdict_line is not None}
    summary["claims"] = {name: verdict for name, (verdict, _) in judged.items()}
    return ["## The paper's claims, as judged by the protocol", ""] + [line for _, line in judged.values()] + [""]


def _claim_a(tasks, strategies, errors) -> tuple[str, str] | None:
    """Claim A (BVG-LS beats full finetuning and the best partial strategy): verdict and report line;
    None without a partial strategy."""
    partial = [s for s in strategies if is_partial_spec(s)]
    if not partial:
        return None
    vs_full = paired_differences(tasks, errors, "bvgls", "full")
    best = {
        t: min((s for s in partial if errors.get((t, s))), key=lambda s, t=t: statistics.fmean(errors[(t, s)].values()))
        for t in tasks
    }
    per_task = {t: paired_differences([t], errors, "bvgls", best[t]).get(t) for t in tasks}
    key = "average" if len(tasks) > 1 else tasks[0]
    part_avg = paired_differences(
        tasks, {(t, "best"): errors[(t, best[t])] for t in tasks} | errors, "bvgls", "best"
    ).get(key)
    below = [d is not None and not math.isnan(d[2]) and d[2] < 0 for d in (vs_full.get(key), part_avg)]
    above = [d is not None and not math.isnan(d[1]) and d[1] > 0 for d in (vs_full.get(key), part_avg)]
    verdicts = {2: "reproduced", 1: "partly reproduced", 0: "not reproduced"}
    verdict = "contradicted" if any(above) else verdicts[sum(below)]
    line = (
        f"- **A** (BVG-LS beats full finetuning and the best partial strategy): **{verdict}** "
        f"(bvgls − full {fmt_ci(*vs_full[key][:3])}, bvgls − best partial {fmt_ci(*part_avg[:3])}, "
        f"{'averaged over tasks' if len(tasks) > 1 else key}); per task: "
        + "; ".join(
            f"{t} vs full {_side(*vs_full[t][1:3])}, vs {best[t]} {_side(*per_task[t][1:3])}"
            for t in tasks
            if t in vs_full and per_task[t]
        )
    )
    return verdict, line


def _claim_b(rows, tasks) -> tuple[str, str] | None:
    """Claim B (faster test-loss descent than full finetuning): verdict and report line; None
    without runs of both evaluated at a common first epoch."""
    loss = {t: (_first_eval_losses(rows, t, "bvgls"), _first_eval_losses(rows, t, "full")) for t in tasks}
    diffs = {
        t: paired_ci([b[k] - f[k] for k in sorted(set(b) & set(f))]) for t, (b, f) in loss.items() if set(b) & set(f)
    }
    if not diffs:
        return None
    lower = all(m < 0 for m, _, _ in diffs.values()) and len(diffs) == len(tasks)
    one_ci = any(not math.isnan(hi) and hi < 0 for _, _, hi in diffs.values())
    verdict = "reproduced" if lower and one_ci else "not reproduced"
    line = (
        f"- **B** (faster test-loss descent: lower test loss than full at the first evaluation on every "
        f"task, interval below 0 on at least one): **{verdict}** (bvgls − full test loss: "
        + "; ".join(f"{t} {fmt_ci(*d)}" for t, d in diffs.items())
        + ")"
    )
    return verdict, line


def _claim_c(selection: dict) -> tuple[str, str] | None:
    """Claim C (first epoch: the head most selected, the input group second), from BVG-LS's
    selection summary per task: verdict and report line; None without one."""
    if not selection:
        return None
    holds = []
    for v in selection.values():
        order = sorted(range(len(v["first_epoch"])), key=lambda i: -v["first_epoch"][i])
        holds.append((order[0] == len(order) - 1, order[1] == 0))
    head, stem = all(h for h, _ in holds), all(s for _, s in holds)
    verdict = "reproduced" if head and stem else ("partly reproduced" if head or stem else "not reproduced")
    line = (
        f"- **C** (first epoch: the head most selected, the input group second): **{verdict}** "
        f"(head first on {sum(h for h, _ in holds)}/{len(holds)} tasks, input group second on "
        f"{sum(s for _, s in holds)}/{len(holds)}; frequencies in the selection table above)"
    )
    return verdict, line


def _length_section(out, rows, tasks, strategies, summary) -> list[str]:
    """Mean test error at every evaluated epoch (each strategy at its chosen lr)."""
    curves: dict[str, dict[str, dict[int, float]]] = {}
    for t in tasks:
        for s in strategies:
            hist = _mean_history(out, rows, t, s)
            if hist is None:
                continue
            curves.setdefault(t, {})[s] = {
                r["epoch"]: r["test_error"] for r in hist.epochs if r.get("test_error") is not None
            }
    summary["test_error_by_epoch"] = curves
    epochs = sorted({e for t in curves for s in curves[t] for e in curves[t][s]})
    if len(epochs) < 2:
        return []
    lines = [
        "## Test error (%) against training length (average over tasks; each strategy at its chosen lr, "
        "constant schedule, so epoch e is where an e-epoch run would stop)",
        "",
    ]
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
            texts.append(
                "–" if s not in vals else (f"**{vals[s]:.2f}**" if math.isclose(vals[s], best) else f"{vals[s]:.2f}")
            )
        lines.append(f"| {e} | " + " | ".join(texts) + " |")
    lines.append("")
    return lines


def _selection_section(out, rows, tasks, strategies, summary) -> list[str]:
    lines = []
    for sel in [s for s in strategies if s.split(":")[0] in SELECTIVE]:
        table = {}
        for t in tasks:
            hist = _mean_history(out, rows, t, sel)
            if hist is None or not hist.epochs:
                continue
            key = (
                "layer_selection_frequency"
                if hist.epochs[0].get("layer_selection_frequency")
                else "selection_frequency"
            )
            names = hist.layer_group_names if key == "layer_selection_frequency" else hist.group_names
            first = hist.epochs[0][key]
            overall = [statistics.fmean(col) for col in zip(*[r[key] for r in hist.epochs])]
            table[t] = {"groups": names, "first_epoch": first, "overall": overall}
        if not table:
            continue
        summary.setdefault("selection", {})[sel] = table
        names = next(iter(table.values()))["groups"]
        what = (
            "mean over the group's tensors of the fraction of steps" if sel.startswith("bvgts") else "fraction of steps"
        )
        lines += [f"## {sel}: selection frequency per group ({what}; mean over seeds), first epoch / whole run", ""]
        lines.append("| Task | " + " | ".join(f"{i + 1} {n}" for i, n in enumerate(names)) + " |")
        lines.append("|---|" + "---:|" * len(names))
        for t, v in table.items():
            lines.append(
                f"| {t} | " + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(v["first_epoch"], v["overall"])) + " |"
            )
        lines.append("")
    return lines


def _figures(out: Path, rows, tasks, strategies) -> dict[str, str]:
    """Per task: B (bvgls vs full, mean over seeds) and C (bvgls selection heatmap); and the two
    summary figures over all tasks."""
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    written: dict[str, str] = {}
    means = {}
    for t in tasks:
        for s in ("bvgls", "full"):
            if s in strategies:
                means[(t, s)] = _mean_history(out, rows, t, s)
        runs = [
            (f"{s} (mean of {means[(t, s)].config['seeds']} seeds)", means[(t, s)])
            for s in ("bvgls", "full")
            if means.get((t, s)) is not None
        ]
        if runs:
            written[f"B {t}"] = plot_losses(runs, str(fig_dir / f"B_loss_{t}.png"), f"{t}: BVG-LS vs full finetuning")
        if means.get((t, "bvgls")) is not None:
            written[f"C {t}"] = plot_selection(
                means[(t, "bvgls")],
                str(fig_dir / f"C_selection_{t}.png"),
                f"{t}: BVG-LS selection frequency per epoch (mean over seeds)",
            )
    search = collect_results(str(out / "search")) if (out / "search").is_dir() else []
    lr_figure = write_lr_sensitivity(
        search,
        str(fig_dir),
        "lr search runs: test (solid) and validation (dashed) error against lr, mean ± std over the search seeds",
    )
    if lr_figure:
        written["lr sensitivity"] = lr_figure
    if any(means.get((t, "bvgls")) for t in tasks):
        written["B all tasks"] = _summary_losses(fig_dir / "B_test_loss_all.png", tasks, means)
        written["C all tasks"] = _summary_selection(fig_dir / "C_selection_all.png", tasks, means)
    return {k: os.path.relpath(v, out) for k, v in written.items()}


def _summary_losses(path: Path, tasks, means) -> str:
    fig = new_figure((max(7.0, 3.0 * len(tasks)), 5.4))
    axes = fig.subplots(2, len(tasks), squeeze=False)
    for i, t in enumerate(tasks):
        for s, color in (("full", "C1"), ("bvgls", "C0")):
            hist = means.get((t, s))
            if hist is None:
                continue
            for row, key in ((0, "train_loss"), (1, "test_loss")):
                pts = [(r["epoch"], r[key]) for r in hist.epochs if r.get(key) is not None]
                if pts:
                    axes[row][i].plot(
                        *zip(*pts),
                        marker="o",
                        markersize=2.5,
                        color=color,
                        lw=2.2 if s == "bvgls" else 1.4,
                        label="BVG-LS" if s == "bvgls" else "full",
                    )
        axes[0][i].set_title(t, fontsize=10)
        axes[1][i].set_xlabel("epoch")
        for row in (0, 1):
            axes[row][i].grid(alpha=0.3)
    axes[0][0].set_ylabel("train loss")
    axes[1][0].set_ylabel("test loss")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("(B) loss per epoch: BVG-LS vs full finetuning (mean over seeds, each at its chosen lr)", fontsize=10)
    return save_figure(fig, str(path))


def _summary_selection(path: Path, tasks, means) -> str:
    import numpy as np

    present = [t for t in tasks if means.get((t, "bvgls")) is not None]
    fig = new_figure((max(7.0, 3.0 * len(present) + 1.0), 3.2))
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    im = None
    for ax, t in zip(axes, present):
        hist = means[(t, "bvgls")]
        data = np.array([r["selection_frequency"] for r in hist.epochs], dtype=float).T
        im = ax.imshow(
            data,
            aspect="auto",
            cmap="viridis",
            vmin=0.0,
            vmax=1.0,
            interpolation="nearest",
            extent=(0.5, len(hist.epochs) + 0.5, len(hist.group_names) - 0.5, -0.5),
        )
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_yticks(
            range(len(hist.group_names)),
            hist.group_names if ax is axes[0] else [""] * len(hist.group_names),
            fontsize=8,
        )
    if im is not None:
        fig.colorbar(im, ax=list(axes), label="fraction of steps")
    fig.suptitle("(C) BVG-LS: fraction of each epoch's steps that updated each group (mean over seeds)", fontsize=10)
    return save_figure(fig, str(path))


def environment() -> dict:
    import datetime

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "command": " ".join(["bvgls"] + sys.argv[1:])
        if sys.argv and sys.argv[0].endswith("bvgls")
        else " ".join(sys.argv),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": 1,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def print_table(out: str | os.PathLike) -> str:
    """The Table A section of a report (for the CLI)."""
    text = (Path(out) / "report.md").read_text()
    start = text.find("## Table A")
    if start < 0:  # a sweep's report: its first table, the lr sensitivity
        start = text.index("## ")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None].strip()
