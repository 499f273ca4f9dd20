"""The report of a ``sweep`` benchmark (every lr on every seed): the paper's comparison at each shared
lr, ours at each strategy's validation-chosen lr, each strategy's robustness to the lr, the error at
every evaluation when runs were evaluated more than once, and ``figures/lr_sensitivity.png``.

Only *whole* seeds are reported: a seed counts when every (task, strategy, lr) of the sweep has a
finished run with it, so a sweep cut short by the clock is compared on the same seeds everywhere."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from bvgls.runner.grid import choose_lrs, collect_results, lr_text
from bvgls.runner.lrsens import lr_sensitivity, lr_sensitivity_lines
from bvgls.strategies import is_partial_spec

from .protocols import Protocol
from .report import environment, fmt_ci, paired_ci

#: the robustness table: an lr counts as "near the best" within this many points of test error
NEAR_BEST = 2.0


# ---------------------------------------------------------------------- numbers
def sweep_rows(out: Path) -> list[dict]:
    """Every finished run of the sweep (``sweep/``), with ``path``, its run directory."""
    root = out / "sweep"
    rows = collect_results(str(root)) if root.is_dir() else []
    for r in rows:
        r["path"] = str(root / r["run_dir"])
    return rows


def whole_seeds(rows: Sequence[Mapping], protocol: Protocol) -> list[int]:
    """The protocol's seeds that have a finished run in every (task, strategy, lr) of the sweep."""
    have = {(r["dataset"], r["strategy"], r["lr"], r["seed"]) for r in rows}
    return [
        k
        for k in protocol.seeds
        if all(
            (t, s, lr, k) in have
            for t in protocol.tasks
            for s in protocol.strategies
            for lr in protocol.cell_grid(t, s)
        )
    ]


def errors(rows: Sequence[Mapping], key: str = "test_error") -> dict[tuple[str, str, float], dict[int, float]]:
    """(task, strategy, lr) -> seed -> ``key`` (a diverged run: inf)."""
    out: dict[tuple[str, str, float], dict[int, float]] = {}
    for r in rows:
        value = math.inf if r.get("diverged") or r.get(key) is None else float(r[key])
        out.setdefault((r["dataset"], r["strategy"], r["lr"]), {})[r["seed"]] = value
    return out


def mean_of(values: Mapping[int, float] | None) -> float:
    return statistics.fmean(values.values()) if values else math.nan


def best_partial(task: str, lr_of: Mapping[str, float], val: Mapping, strategies: Sequence[str]) -> str | None:
    """The fixed partial strategy (``L<a>-<b>`` or linear) with the lowest mean validation error, each
    at its lr in ``lr_of``."""
    pool = [s for s in strategies if (s == "linear" or is_partial_spec(s)) and s in lr_of]
    scored = [(mean_of(val.get((task, s, lr_of[s]))), s) for s in pool if val.get((task, s, lr_of[s]))]
    return min(scored)[1] if scored else None


def paired(test: Mapping, task: str, a: tuple[str, float], b: tuple[str, float]) -> tuple[float, float, float, int]:
    """Test error of ``a`` minus ``b`` (each (strategy, lr)) paired by seed: mean, 95% interval, pairs."""
    ea, eb = test.get((task, *a), {}), test.get((task, *b), {})
    seeds = sorted(set(ea) & set(eb))
    diffs = [ea[k] - eb[k] for k in seeds]
    return (*paired_ci(diffs), len(diffs)) if diffs else (math.nan, math.nan, math.nan, 0)


def robustness(points: Sequence, chosen: float | None) -> dict:
    """One strategy's sensitivity to its lr, from its lr-sensitivity points (ascending lr): the best mean
    test error and its lr, the lrs within :data:`NEAR_BEST` points of it and the width of their range in
    decades (log10 max/min), and the mean test error at 3x and 10x the validation-chosen lr."""
    finite = [p for p in points if p.test is not None and p.diverged == 0]
    if not finite:
        return {}
    best = min(finite, key=lambda p: p.test.mean)
    near = [p.lr for p in finite if p.test.mean <= best.test.mean + NEAR_BEST]
    at = {p.lr: p for p in points}

    def error_at(factor: float) -> float | None:
        if chosen is None:
            return None
        lr = next((x for x in at if math.isclose(x, chosen * factor, rel_tol=0.15)), None)  # grid steps: 3x or 3.33x
        if lr is None:
            return None
        return math.inf if at[lr].test is None or at[lr].diverged else at[lr].test.mean

    return {
        "best_lr": best.lr,
        "best_test_error": best.test.mean,
        "near_best_lrs": near,
        "width_decades": math.log10(max(near) / min(near)),
        "at_3x": error_at(3.0),
        "at_10x": error_at(10.0),
    }


# ---------------------------------------------------------------------- report
def write_sweep_report(out: str | os.PathLike, protocol: Protocol, wall_s: float | None = None) -> dict:
    """``report.md``, ``summary.json``, ``runs.csv`` and ``figures/lr_sensitivity.png`` of a sweep."""
    from bvgls.runner.plots import write_lr_sensitivity

    from .report import write_runs_csv

    out = Path(out)
    rows = sweep_rows(out)
    seeds = whole_seeds(rows, protocol)
    rows = [r for r in rows if r["seed"] in seeds]
    test, val = errors(rows), errors(rows, "val_error")
    chosen = choose_lrs([{**r, "phase": "search"} for r in rows], protocol.tie_break) if rows else {}
    summary: dict = {
        "protocol": protocol.__class__.__name__,
        "seeds": seeds,
        "runs": len(rows),
        "wall_s": wall_s,
        "chosen_lr": {f"{t} {s}": lr for (t, s), lr in chosen.items()},
        "environment": environment(),
    }
    sens = lr_sensitivity(rows)
    title = (
        f"{protocol.model}, {protocol.epochs} epochs: test (solid) and validation (dashed) error against lr, "
        "mean ± std over seeds"
    )
    figure = write_lr_sensitivity(rows, str(out / "figures"), title) if rows else None
    lines = [
        f"# Learning-rate sweep: {protocol.model}, {', '.join(protocol.tasks)}",
        "",
        f"Every strategy at every lr on seeds {', '.join(map(str, seeds)) or '(none complete yet)'} "
        f"({len(rows)} runs; a seed counts only when it has finished at every lr of every strategy); "
        f"{protocol.epochs} epochs, batch {protocol.batch_size}, {protocol.image_size} px, evaluated every "
        f"{protocol.eval_every} epochs; lr chosen on the mean validation error over the seeds.",
        "",
    ]
    summary["figures"] = {"lr sensitivity": os.path.relpath(figure, out)} if figure else {}
    lines += lr_sensitivity_lines(sens, chosen, summary["figures"].get("lr sensitivity")) + [""]
    lines += _shared_lr_section(protocol, test, val, summary)
    lines += _tuned_section(protocol, test, val, chosen, summary)
    lines += _robustness_section(protocol, sens, chosen, summary)
    lines += _train_loss_section(protocol, rows, chosen)
    lines += _by_epoch_section(protocol, rows, chosen, summary)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    write_runs_csv(out)
    return summary


def _shared_lr_section(protocol: Protocol, test, val, summary) -> list[str]:
    """The paper's comparison: all strategies at one shared lr, each lr separately."""
    if not {"bvgls", "full"} <= set(protocol.strategies):
        return []
    lines = [
        "## The paper's comparison: every strategy at one shared lr",
        "",
        "bvgls minus a baseline, test error points, mean over seeds [95% t-interval] paired by seed (negative: "
        "bvgls better). *Best partial* = the one of L-specs and linear with the lower mean validation error "
        "at that lr.",
        "",
        "| Task | lr | bvgls | full | bvgls − full | best partial | bvgls − best partial |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for t in protocol.tasks:
        for lr in protocol.cell_grid(t, "bvgls"):
            if not test.get((t, "full", lr)):  # full did not run at this lr (cells with their own lrs)
                continue
            b = mean_of(test.get((t, "bvgls", lr)))
            f = mean_of(test.get((t, "full", lr)))
            vs_full = paired(test, t, ("bvgls", lr), ("full", lr))
            partial = best_partial(t, {s: lr for s in protocol.strategies}, val, protocol.strategies)
            vs_part = paired(test, t, ("bvgls", lr), (partial, lr)) if partial else (math.nan,) * 3 + (0,)
            summary.setdefault("shared_lr", {}).setdefault(t, {})[lr_text(lr)] = {
                "bvgls": b,
                "full": f,
                "bvgls_minus_full": vs_full,
                "best_partial": partial,
                "bvgls_minus_best_partial": vs_part,
            }
            lines.append(
                f"| {t} | {lr_text(lr)} | {b:.2f} | {f:.2f} | {fmt_ci(*vs_full[:3])} | {partial or '–'} | "
                f"{fmt_ci(*vs_part[:3]) if partial else '–'} |"
            )
    return lines + [""]


def _tuned_section(protocol: Protocol, test, val, chosen, summary) -> list[str]:
    """Ours: each strategy at its own validation-chosen lr."""
    lines = [
        "## Each strategy at its own lr (chosen on validation)",
        "",
        "| Task | Strategy | lr | test error | val error |",
        "|---|---|---:|---:|---:|",
    ]
    for t in protocol.tasks:
        for s in protocol.strategies:
            lr = chosen.get((t, s))
            if lr is None:
                continue
            e = list(test.get((t, s, lr), {}).values())
            sd = f" ± {statistics.stdev(e):.2f}" if len(e) > 1 else ""
            lines.append(
                f"| {t} | {s} | {lr_text(lr)} | {statistics.fmean(e):.2f}{sd} | {mean_of(val.get((t, s, lr))):.2f} |"
            )
    lines.append("")
    if not {"bvgls", "full"} <= set(protocol.strategies):
        return lines
    for t in protocol.tasks:
        if (t, "bvgls") not in chosen:
            continue
        own = {s: chosen[(t, s)] for s in protocol.strategies if (t, s) in chosen}
        facts = {}
        for name, ref in (("full", "full"), ("best partial", best_partial(t, own, val, protocol.strategies))):
            if ref and ref in own:
                facts[name] = (ref, paired(test, t, ("bvgls", own["bvgls"]), (ref, own[ref])))
        summary.setdefault("tuned", {})[t] = {k: {"reference": r, "diff": d} for k, (r, d) in facts.items()}
        lines.append(
            f"{t}, each at its own lr: "
            + "; ".join(f"bvgls − {name} ({ref}) {fmt_ci(*d[:3])}" for name, (ref, d) in facts.items())
            + "."
        )
    return lines + [""]


def _robustness_section(protocol: Protocol, sens, chosen, summary) -> list[str]:
    lines = [
        "## Robustness to the lr",
        "",
        f"Per strategy: its best mean test error on the grid and that lr; the grid lrs whose mean test error is "
        f"within {NEAR_BEST:g} points of it and the width of their range in decades (log10 max/min; 0 = only "
        "one lr); the mean test error at about 3x and 10x its validation-chosen lr (one and two grid steps up; "
        "– where off the grid).",
        "",
        "| Task | Strategy | chosen lr | best (lr) | lrs within 2 points | width (decades) | at ~3x | at ~10x |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for (t, s), points in sens.items():
        r = robustness(points, chosen.get((t, s)))
        if not r:
            continue
        summary.setdefault("robustness", {}).setdefault(t, {})[s] = r

        def fmt(x):
            return "–" if x is None else "diverged" if math.isinf(x) else f"{x:.2f}"

        lines.append(
            f"| {t} | {s} | {lr_text(chosen[(t, s)]) if (t, s) in chosen else '–'} | "
            f"{r['best_test_error']:.2f} ({lr_text(r['best_lr'])}) | "
            f"{', '.join(lr_text(x) for x in r['near_best_lrs'])} | {r['width_decades']:.2f} | "
            f"{fmt(r['at_3x'])} | {fmt(r['at_10x'])} |"
        )
    return lines + [""]


def _train_loss_section(protocol: Protocol, rows, chosen) -> list[str]:
    """Mean final training loss per strategy and lr: under- or over-stepping shows here first."""
    cells: dict[tuple[str, str, float], list[float]] = {}
    for r in rows:
        if r.get("train_loss") is not None and not r.get("diverged"):
            cells.setdefault((r["dataset"], r["strategy"], r["lr"]), []).append(float(r["train_loss"]))
    lrs = sorted({k[2] for k in cells})
    lines = [
        "## Final training loss (mean over seeds)",
        "",
        "| Task | Strategy | " + " | ".join(f"lr {lr_text(x)}" for x in lrs) + " |",
        "|---|---|" + "---:|" * len(lrs),
    ]
    for t in protocol.tasks:
        for s in protocol.strategies:
            lines.append(
                f"| {t} | {s} | "
                + " | ".join(f"{statistics.fmean(cells[(t, s, x)]):.3f}" if (t, s, x) in cells else "–" for x in lrs)
                + " |"
            )
    return lines + [""]


def eval_curves(rows) -> dict[tuple[str, str, float], dict[int, dict[int, tuple[float, float]]]]:
    """(task, strategy, lr) -> seed -> epoch -> (test error, val error), at every evaluation of each run."""
    from bvgls.runner.rundir import History

    out: dict = {}
    for r in rows:
        if r.get("diverged"):
            continue
        hist = History.load(r["path"])
        evals = {
            e["epoch"]: (e["test_error"], e.get("val_error")) for e in hist.epochs if e.get("test_error") is not None
        }
        out.setdefault((r["dataset"], r["strategy"], r["lr"]), {})[r["seed"]] = evals
    return out


def early_stopped(curve: Mapping[int, tuple[float, float]]) -> tuple[int, float]:
    """(epoch, test error) at the evaluation with the lowest validation error (ties: the earlier)."""
    epoch = min(curve, key=lambda e: (curve[e][1] if curve[e][1] is not None else math.inf, e))
    return epoch, curve[epoch][0]


def _by_epoch_section(protocol: Protocol, rows, chosen, summary) -> list[str]:
    """Runs evaluated more than once (training length): test error at every evaluation, each strategy
    at its chosen lr, and bvgls − full paired by seed at each evaluation and at each run's
    validation-chosen evaluation."""
    if protocol.eval_every >= protocol.epochs or not rows:
        return []
    curves = eval_curves(rows)
    epochs = sorted({e for c in curves.values() for run in c.values() for e in run})
    lines = [
        "## Test error at every evaluation (each strategy at its chosen lr)",
        "",
        "| Task | Strategy | lr | " + " | ".join(f"ep {e}" for e in epochs) + " | at best val (epoch) |",
        "|---|---|---:|" + "---:|" * len(epochs) + "---:|",
    ]
    for t in protocol.tasks:
        for s in protocol.strategies:
            lr = chosen.get((t, s))
            runs = curves.get((t, s, lr), {})
            if not runs:
                continue
            means = [statistics.fmean(run[e][0] for run in runs.values() if e in run) for e in epochs]
            stops = [early_stopped(run) for run in runs.values()]
            summary.setdefault("by_epoch", {}).setdefault(t, {})[s] = {
                "lr": lr,
                "test_error": dict(zip(epochs, means)),
                "early_stopped": stops,
            }
            lines.append(
                f"| {t} | {s} | {lr_text(lr)} | "
                + " | ".join(f"{m:.2f}" for m in means)
                + f" | {statistics.fmean(x for _, x in stops):.2f} ({', '.join(str(e) for e, _ in stops)}) |"
            )
    lines.append("")
    if "bvgls" in protocol.strategies and "full" in protocol.strategies:
        lines += [
            "bvgls − full (each at its chosen lr), test error paired by seed:",
            "",
            "| Task | " + " | ".join(f"ep {e}" for e in epochs) + " | at best val |",
            "|---|" + "---:|" * (len(epochs) + 1),
        ]
        for t in protocol.tasks:
            b = curves.get((t, "bvgls", chosen.get((t, "bvgls"))), {})
            f = curves.get((t, "full", chosen.get((t, "full"))), {})
            seeds = sorted(set(b) & set(f))
            if not seeds:
                continue
            cells = [paired_ci([b[k][e][0] - f[k][e][0] for k in seeds]) for e in epochs]
            stop = paired_ci([early_stopped(b[k])[1] - early_stopped(f[k])[1] for k in seeds])
            summary.setdefault("by_epoch_diff", {})[t] = {"epochs": dict(zip(epochs, cells)), "early_stopped": stop}
            lines.append(f"| {t} | " + " | ".join(fmt_ci(*c) for c in cells) + f" | {fmt_ci(*stop)} |")
        lines.append("")
    return lines


# ---------------------------------------------------------------------- several sweeps together
def write_combined(
    dest: str | os.PathLike, parts: Sequence[tuple[str | os.PathLike, Protocol]], chosen_from: int = 0
) -> dict:
    """One lr-sensitivity table, robustness table and figure over the runs of several sweeps of the
    same cells at different lrs (e.g. a 3-seed core and 1-seed outer lrs), into ``dest``
    (``report.md``, ``summary.json``, ``lr_sensitivity.png``). Each part contributes its whole seeds;
    the chosen lrs are those of part ``chosen_from`` (the one whose seeds the choice was made on)."""
    from bvgls.runner.plots import write_lr_sensitivity

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rows, chosen = [], {}
    for k, (out, protocol) in enumerate(parts):
        part = sweep_rows(Path(out))
        part = [r for r in part if r["seed"] in whole_seeds(part, protocol)]
        rows += part
        if k == chosen_from and part:
            chosen = choose_lrs([{**r, "phase": "search"} for r in part], protocol.tie_break)
    sens = lr_sensitivity(rows)
    figure = (
        write_lr_sensitivity(
            rows, str(dest), "test (solid) and validation (dashed) error against lr, mean ± std over seeds"
        )
        if rows
        else None
    )
    names = [Path(out).name for out, _ in parts]  # the parts by name: the report may be copied elsewhere
    summary: dict = {"parts": names, "runs": len(rows), "chosen_lr": {f"{t} {s}": lr for (t, s), lr in chosen.items()}}
    lines = [
        "# Learning-rate sweep, all parts together",
        "",
        f"Runs of the parts {', '.join(names)} (whole seeds of each); lr chosen on validation in {names[chosen_from]}.",
        "",
    ]
    lines += lr_sensitivity_lines(sens, chosen, os.path.basename(figure) if figure else None) + [""]
    lines += _robustness_section(parts[chosen_from][1], sens, chosen, summary)
    (dest / "report.md").write_text("\n".join(lines) + "\n")
    (dest / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bvgls_lab.experiments.sweep_report DEST SUITE OUT``: the combined report of a suite's sweep
    parts (``OUT/<part>``), the lr chosen in its first part."""
    import sys

    from .protocols import suite

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        raise SystemExit("error: usage: python -m bvgls_lab.experiments.sweep_report DEST SUITE OUT")
    dest, name, out = args
    write_combined(dest, [(Path(out) / part, protocol) for part, protocol in suite(name)])
    print(Path(dest) / "report.md")


if __name__ == "__main__":
    main()


def chosen_errors(
    out: str | os.PathLike, protocol: Protocol, task: str, strategy: str
) -> tuple[float, dict[int, float]]:
    """A sweep cell's validation-chosen lr and its test error per whole seed there."""
    rows = sweep_rows(Path(out))
    rows = [r for r in rows if r["seed"] in whole_seeds(rows, protocol)]
    lr = choose_lrs([{**r, "phase": "search"} for r in rows], protocol.tie_break)[(task, strategy)]
    return lr, errors(rows)[(task, strategy, lr)]


def arm_difference(a: tuple, b: tuple, task: str) -> dict:
    """Test error of cell ``a`` minus cell ``b``, each ``(out_dir, protocol, strategy)`` of a sweep at its
    own validation-chosen lr, paired by seed (the seeds both have): mean, 95% interval, pairs, lrs."""
    lr_a, ea = chosen_errors(a[0], a[1], task, a[2])
    lr_b, eb = chosen_errors(b[0], b[1], task, b[2])
    seeds = sorted(set(ea) & set(eb))
    mean, lo, hi = paired_ci([ea[k] - eb[k] for k in seeds])
    return {
        "lr_a": lr_a,
        "lr_b": lr_b,
        "mean": mean,
        "ci95": [lo, hi],
        "n": len(seeds),
        "a": mean_of({k: ea[k] for k in seeds}),
        "b": mean_of({k: eb[k] for k in seeds}),
    }
