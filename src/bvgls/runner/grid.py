"""The grid runner behind ``bvgls compare``: strategies x datasets x seeds x learning rates -> Table A.

Each run lives in ``OUT/runs/<dataset>/<strategy>/lr<lr>/seed<seed>`` (``-refit`` appended for
refits) and is skipped when its ``result.json`` exists, resumed from its checkpoint when it was
interrupted. After every run ``OUT/results.csv`` and ``OUT/table.md`` are rewritten from all
finished runs found under ``OUT/runs``, so several processes (e.g. one per GPU) can fill
disjoint parts of one grid.

Learning rates: with several ``lrs`` every run trains on the training set minus a validation
split (``val_fraction``, carved from the training set, never the test set); for each dataset
and strategy the lr with the lowest mean final validation error over seeds is chosen and the
table reports the test error of the runs at that lr (``refit=True``: of new runs at that lr on
the full training set). Each strategy gets its own best lr: one that updates one group per
step may want a different lr than full finetuning.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..strategies import make_strategy, parse_strategy
from .loop import _RESUME_KEYS, finetune, seed_everything

RESULT_COLUMNS = ["dataset", "strategy", "seed", "lr", "test_error", "test_loss", "val_error", "val_loss",
                  "train_loss", "epochs", "wall_s", "phase", "chosen", "run_dir"]
_FINETUNE_DEFAULTS = {k: p.default for k, p in inspect.signature(finetune).parameters.items()
                      if p.default is not inspect.Parameter.empty and k in _RESUME_KEYS}
_COMPARED_KEYS = tuple(k for k in _RESUME_KEYS if k not in ("strategy", "lr", "seed", "val_fraction")) + (
    "model", "weights")


@dataclass
class CompareResult:
    """Rows of ``results.csv`` (dicts), the chosen lr per (dataset, strategy), and the table."""

    rows: list[dict]
    chosen_lr: dict[tuple[str, str], float]
    table: str
    out_dir: str
    failed: list[str] = field(default_factory=list)

    @property
    def csv_path(self) -> str:
        return os.path.join(self.out_dir, "results.csv")

    @property
    def table_path(self) -> str:
        return os.path.join(self.out_dir, "table.md")

    def test_errors(self, dataset: str, strategy: str) -> list[float]:
        """Test errors (percent) of the reported runs of one table cell, one per seed."""
        return [r["test_error"] for r in self.rows if r["chosen"] and r["dataset"] == dataset
                and r["strategy"] == strategy and r["test_error"] is not None]


def slug(text: str) -> str:
    """A directory-safe form of a strategy spec or dataset label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace(":", "__").replace("=", "-")).strip("_") or "_"


def _lr_text(lr: float) -> str:
    return f"{lr:g}"


def run_dir_for(out_dir: str, dataset: str, strategy: str, lr: float, seed: int, refit: bool = False) -> str:
    return os.path.join(out_dir, "runs", slug(dataset), slug(strategy), f"lr{_lr_text(lr)}",
                        f"seed{seed}{'-refit' if refit else ''}")


# ---------------------------------------------------------------------- inputs
DatasetSource = Any  # str (name or path) | DatasetSplits | fn(ModelInput) -> DatasetSplits


def _dataset_entries(datasets) -> list[tuple[str, DatasetSource]]:
    from .data import dataset_label

    if isinstance(datasets, str):
        datasets = [d for d in datasets.split(",") if d]
    items = list(datasets.items()) if isinstance(datasets, Mapping) else \
        [d if isinstance(d, tuple) else (dataset_label(d), d) for d in datasets]
    labels = [label for label, _ in items]
    if not items:
        raise ValueError("no datasets given")
    if len(set(labels)) != len(labels):
        raise ValueError(f"dataset labels must be unique, got {labels}")
    return items


def _load(source: DatasetSource, input, data_root, download, augment):
    from .data import load_dataset

    if isinstance(source, str):
        return load_dataset(source, data_root, download, input, augment=augment)
    if callable(source):
        return source(input)
    return source


def _model_builder(model, weights) -> tuple[str, Callable[[int], nn.Module]]:
    if isinstance(model, str):
        from .models import build_model
        return model, lambda n: build_model(model, n, weights)
    if callable(model):
        return getattr(model, "__name__", repr(model)), model
    raise TypeError(f"model must be a model spec string or fn(num_classes) -> nn.Module, got {type(model).__name__}")


def check_strategies(strategies: Sequence[str], model: nn.Module) -> None:
    """Raise ValueError now, not hours into a grid, for specs that do not fit ``model``'s groups."""
    from ..grouping import layer_groups

    trainable = [(p, p.requires_grad) for p in model.parameters()]
    for spec in strategies:
        parse_strategy(spec)
        groups = layer_groups(model)
        opt = torch.optim.SGD(groups.param_groups(), lr=0.1)
        try:
            make_strategy(spec, opt, groups).remove()
        except (ValueError, TypeError) as e:
            raise ValueError(f"strategy {spec!r} does not fit {type(model).__name__} "
                             f"({len(groups)} groups: {', '.join(groups.names)}): {e}") from None
        finally:
            for p, flag in trainable:  # partial strategies freeze groups
                p.requires_grad_(flag)


# ---------------------------------------------------------------------- the grid
def compare(
    strategies: Sequence[str] | str,
    datasets: Sequence[DatasetSource] | Mapping[str, DatasetSource] | str,
    seeds: Sequence[int] = (0,),
    lrs: Sequence[float] = (0.01,),
    *,
    model: str | Callable[[int], nn.Module],
    out_dir: str | os.PathLike,
    epochs: int,
    batch_size: int = 128,
    weights: str | None = "DEFAULT",
    val_fraction: float = 0.0,
    refit: bool = False,
    data_root: str | None = None,
    download: bool = False,
    augment: str | None = None,
    train_options: Mapping[str, Any] | None = None,
    keep_going: bool = False,
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> CompareResult:
    """Run every (dataset, strategy, seed, lr) and write ``results.csv`` and ``table.md``.

    Args:
        strategies: specs (``"full,L3-6,bvgls"`` or a list), see :func:`bvgls.make_strategy`.
        datasets: names/paths (``load_dataset``), ``(label, DatasetSplits)`` pairs, or a dict
            label -> DatasetSplits or ``fn(model_input) -> DatasetSplits``.
        seeds: one run per seed (seeds the head's init, shuffling and augmentation).
        lrs: base learning rates; more than one needs ``val_fraction`` (see module docstring).
        model: a model spec for :func:`bvgls.runner.models.build_model`, or ``fn(num_classes) -> nn.Module``.
        out_dir: where runs, ``results.csv`` and ``table.md`` go; rerunning skips finished runs.
        epochs, batch_size: passed to :func:`bvgls.runner.loop.finetune`.
        weights: weights for a model spec (``DEFAULT``, ``none``, a file).
        val_fraction: validation split carved from the training set for choosing the lr.
        refit: after choosing the lr, train again on the full training set at that lr.
        data_root, download, augment: passed to :func:`bvgls.runner.data.load_dataset`.
        train_options: more :func:`finetune` arguments (optimizer, momentum, weight_decay,
            schedule, warmup_epochs, amp, device, channels_last, num_workers, grad_accum, ...).
        keep_going: log a failed run and continue with the others (default: raise).
        log: where progress lines go.
    """
    if isinstance(strategies, str):
        strategies = [s for s in strategies.split(",") if s]
    strategies = list(dict.fromkeys(strategies))
    seeds = [int(s) for s in seeds]
    lrs = [float(x) for x in lrs]
    if not strategies or not seeds or not lrs:
        raise ValueError("strategies, seeds and lrs must each have at least one entry")
    if len(set(lrs)) != len(lrs):
        raise ValueError(f"lrs has duplicates: {lrs}")
    if len(lrs) > 1 and not val_fraction:
        raise ValueError("several --lrs need --val-fraction: the lr is chosen on a validation split carved "
                         "from the training set, never on the test set")
    if refit and len(lrs) == 1:
        raise ValueError("refit only makes sense with several lrs to choose from")
    out_dir = str(out_dir)
    train_options = dict(train_options or {})
    for reserved in ("epochs", "lr", "batch_size", "seed", "out_dir", "resume", "val_fraction", "config"):
        if reserved in train_options:
            raise ValueError(f"train_options may not set {reserved!r}; it is an argument of compare")
    entries = _dataset_entries(datasets)
    model_label, build = _model_builder(model, weights)
    probe = build(2)
    check_strategies(strategies, probe)
    input = probe.bvgls_input if hasattr(probe, "bvgls_input") else None
    del probe
    os.makedirs(out_dir, exist_ok=True)
    labels = [label for label, _ in entries]
    title = (f"# Table A: {model_label}, {epochs} epochs, batch {batch_size}, "
             f"{'lr chosen on a ' + format(val_fraction, 'g') + ' validation split' if len(lrs) > 1 else 'lr ' + _lr_text(lrs[0])}"
             f"{', refit on the full training set' if refit else ''}")
    search = len(lrs) > 1
    search_val = float(val_fraction) if val_fraction else 0.0
    failed: list[str] = []
    total = len(entries) * len(strategies) * len(seeds) * len(lrs)
    done = 0

    def one_run(label, splits, spec, seed, lr, vf, phase, run_dir):
        nonlocal done
        config = {"model": model_label, "weights": weights if isinstance(model, str) else None, "dataset": label,
                  "phase": phase, "num_classes": splits.num_classes}
        _check_existing(run_dir, {**_FINETUNE_DEFAULTS, **config, **train_options, "epochs": epochs,
                                  "batch_size": batch_size, "val_fraction": vf})
        if os.path.isfile(os.path.join(run_dir, "result.json")):
            return
        log(f"[{done + 1}/{total}] {label} {spec} lr={_lr_text(lr)} seed={seed} ({phase}) -> {run_dir}")
        seed_everything(seed)
        net = build(splits.num_classes)
        try:
            history = finetune(net, splits, spec, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                               val_fraction=vf, out_dir=run_dir, resume=True, progress=progress, config=config,
                               **train_options)
        except Exception as e:  # with keep_going a failed run must not stop the grid
            if not keep_going:
                raise
            failed.append(f"{run_dir}: {type(e).__name__}: {e}")
            log(f"  FAILED: {type(e).__name__}: {e}")
            return
        final = history.final
        msg = f"  test error {final['test_error']:.2f}%"
        if final.get("val_error") is not None:
            msg += f", val error {final['val_error']:.2f}%"
        log(msg + f", {history.wall_s:.0f}s")
        write_reports(out_dir, strategies=strategies, datasets=labels, title=title)

    for label, source in entries:
        splits = _load(source, input, data_root, download, augment)
        for seed in seeds:
            for spec in strategies:
                for lr in lrs:
                    one_run(label, splits, spec, seed, lr, search_val, "search" if search else "final",
                            run_dir_for(out_dir, label, spec, lr, seed))
                    done += 1
        if refit:
            chosen = choose_lrs(collect_results(out_dir))
            for seed in seeds:
                for spec in strategies:
                    lr = chosen.get((label, spec))
                    if lr is not None:
                        one_run(label, splits, spec, seed, lr, 0.0, "refit",
                                run_dir_for(out_dir, label, spec, lr, seed, refit=True))
    result = write_reports(out_dir, strategies=strategies, datasets=labels, title=title)
    result.failed = failed
    return result


def _check_existing(run_dir: str, expected: Mapping[str, Any]) -> None:
    """A run directory left by an earlier invocation must have the same settings."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f)
    keys = [k for k in _COMPARED_KEYS + ("dataset", "phase", "val_fraction") if k in expected]
    changed = [f"{k}: {old.get(k)!r} -> {expected[k]!r}" for k in keys if old.get(k) != expected[k]]
    if changed:
        raise ValueError(f"{run_dir!r} holds a run with other settings ({'; '.join(changed)}); "
                         "use a new --out directory")


# ---------------------------------------------------------------------- reports
def collect_results(out_dir: str) -> list[dict]:
    """One row per finished run under ``out_dir/runs`` (``chosen`` not yet set)."""
    rows = []
    root = os.path.join(out_dir, "runs")
    for dirpath, _, files in sorted(os.walk(root)):
        if "result.json" not in files:
            continue
        with open(os.path.join(dirpath, "result.json")) as f:
            result = json.load(f)
        cfg, final = result["config"], result["final"]
        rows.append({
            "dataset": cfg.get("dataset", "?"), "strategy": cfg["strategy"], "seed": int(cfg["seed"]),
            "lr": float(cfg["lr"]), "test_error": final.get("test_error"), "test_loss": final.get("test_loss"),
            "val_error": final.get("val_error"), "val_loss": final.get("val_loss"),
            "train_loss": final.get("train_loss"), "epochs": int(final["epoch"]),
            "wall_s": round(float(result.get("wall_s", 0.0)), 2), "phase": cfg.get("phase", "final"),
            "chosen": False, "run_dir": os.path.relpath(dirpath, out_dir),
        })
    return rows


def choose_lrs(rows: Sequence[dict]) -> dict[tuple[str, str], float]:
    """Per (dataset, strategy): the search lr with the lowest mean validation error over seeds
    (ties: the smaller lr). Cells without a search have the single lr they ran with."""
    cells: dict[tuple[str, str], dict[float, list[float]]] = {}
    for r in rows:
        if r["phase"] == "search" and r["val_error"] is not None:
            cells.setdefault((r["dataset"], r["strategy"]), {}).setdefault(r["lr"], []).append(r["val_error"])
    chosen = {cell: min(by_lr, key=lambda lr: (statistics.fmean(by_lr[lr]), lr)) for cell, by_lr in cells.items()}
    single: dict[tuple[str, str], set[float]] = {}
    for r in rows:
        if r["phase"] == "final" and (r["dataset"], r["strategy"]) not in cells:
            single.setdefault((r["dataset"], r["strategy"]), set()).add(r["lr"])
    for cell, lrs in single.items():
        if len(lrs) > 1:  # choosing among them by test error would tune on the test set
            raise ValueError(f"{cell[0]} / {cell[1]} has runs at several lrs ({', '.join(map(_lr_text, sorted(lrs)))}) "
                             "without a validation search; put them in separate --out directories or use "
                             "--lrs with --val-fraction")
        chosen[cell] = next(iter(lrs))
    return chosen


def _lr_grid(rows: Sequence[dict]) -> dict[tuple[str, str], list[float]]:
    grid: dict[tuple[str, str], set[float]] = {}
    for r in rows:
        if r["phase"] == "search":
            grid.setdefault((r["dataset"], r["strategy"]), set()).add(r["lr"])
    return {k: sorted(v) for k, v in grid.items()}


def mark_reported(rows: list[dict], chosen: Mapping[tuple[str, str], float]) -> list[dict]:
    """Set ``chosen=True`` on the rows the table reports: refits where present, else the runs
    at the chosen lr."""
    phases: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        phases.setdefault((r["dataset"], r["strategy"]), set()).add(r["phase"])
    for r in rows:
        cell = (r["dataset"], r["strategy"])
        want = next(p for p in ("refit", "search", "final") if p in phases[cell])
        r["chosen"] = r["phase"] == want and chosen.get(cell) == r["lr"]
    return rows


def _ordered(values: Sequence[str], preferred: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(v for v in preferred if v in values))
    return seen + sorted(v for v in dict.fromkeys(values) if v not in seen)


def format_table(rows: Sequence[dict], chosen: Mapping[tuple[str, str], float], *,
                 strategies: Sequence[str] = (), datasets: Sequence[str] = (), title: str = "") -> str:
    """The paper's Table A as markdown: test error (%) mean ± std over seeds, datasets x strategies,
    an average row (over datasets, for strategies with every dataset), the best of each row in bold;
    then the lr each strategy used, flagged when it sits at the edge of the searched grid."""
    reported = [r for r in rows if r["chosen"] and r["test_error"] is not None]
    strategy_cols = _ordered([r["strategy"] for r in reported], strategies)
    dataset_rows = _ordered([r["dataset"] for r in reported], datasets)
    cell: dict[tuple[str, str], list[float]] = {}
    for r in reported:
        cell.setdefault((r["dataset"], r["strategy"]), []).append(float(r["test_error"]))

    def fmt(values: list[float]) -> str:
        mean = statistics.fmean(values)
        return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"

    def row_cells(means: dict[str, float], texts: dict[str, str]) -> list[str]:
        best = min(means.values()) if means else None
        return [f"**{texts[s]}**" if s in means and math.isclose(means[s], best) else texts.get(s, "–")
                for s in strategy_cols]

    lines = []
    if title:
        lines += [title, ""]
    lines.append("Test error (%), mean ± std over seeds; lower is better; best per row in **bold**.")
    lines.append("")
    lines.append("| Dataset | " + " | ".join(strategy_cols) + " |")
    lines.append("|---|" + "---:|" * len(strategy_cols))
    per_strategy: dict[str, list[float]] = {s: [] for s in strategy_cols}
    seeds_used = set()
    for d in dataset_rows:
        means = {s: statistics.fmean(cell[(d, s)]) for s in strategy_cols if (d, s) in cell}
        texts = {s: fmt(cell[(d, s)]) for s in means}
        for s, m in means.items():
            per_strategy[s].append(m)
            seeds_used.add(len(cell[(d, s)]))
        lines.append(f"| {d} | " + " | ".join(row_cells(means, texts)) + " |")
    if len(dataset_rows) > 1:
        avg = {s: statistics.fmean(v) for s, v in per_strategy.items() if len(v) == len(dataset_rows)}
        lines.append("| Average | " + " | ".join(row_cells(avg, {s: f"{m:.2f}" for s, m in avg.items()})) + " |")
    lines.append("")
    if seeds_used:
        lines.append(f"Seeds per cell: {', '.join(str(n) for n in sorted(seeds_used))}. "
                     "Each cell's runs are listed in results.csv (rows with chosen=True).")
    grid = _lr_grid(rows)
    lines.append("")
    if grid:
        lines.append("Learning rate chosen per strategy on the validation split (lowest mean final validation "
                     "error); _edge_ = at the end of the searched grid, so a better lr may lie outside it.")
        lines.append("")
        lines.append("| Dataset | " + " | ".join(strategy_cols) + " |")
        lines.append("|---|" + "---:|" * len(strategy_cols))
        for d in dataset_rows:
            texts = []
            for s in strategy_cols:
                lr, lrs_tried = chosen.get((d, s)), grid.get((d, s), [])
                if lr is None:
                    texts.append("–")
                    continue
                edge = len(lrs_tried) > 1 and lr in (lrs_tried[0], lrs_tried[-1])
                texts.append(f"{_lr_text(lr)}{' _edge_' if edge else ''}")
            lines.append(f"| {d} | " + " | ".join(texts) + " |")
        tried = sorted({lr for v in grid.values() for lr in v})
        lines.append("")
        lines.append(f"Grid: {', '.join(_lr_text(x) for x in tried)}.")
    else:
        lrs = sorted({lr for (d, s), lr in chosen.items()})
        lines.append(f"Learning rate: {', '.join(_lr_text(x) for x in lrs)} (no search).")
    return "\n".join(lines) + "\n"


def write_reports(out_dir: str | os.PathLike, *, strategies: Sequence[str] = (),
                  datasets: Sequence[str] = (), title: str = "") -> CompareResult:
    """Rewrite ``results.csv`` and ``table.md`` in ``out_dir`` from every finished run there."""
    out_dir = str(out_dir)
    rows = collect_results(out_dir)
    chosen = choose_lrs(rows)
    mark_reported(rows, chosen)
    table = format_table(rows, chosen, strategies=strategies, datasets=datasets, title=title)
    os.makedirs(out_dir, exist_ok=True)

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: ("" if r[k] is None else r[k]) for k in RESULT_COLUMNS})

    from .loop import _atomic_write_bytes
    _atomic_write_bytes(os.path.join(out_dir, "results.csv"), write_csv)

    def write_md(tmp):
        with open(tmp, "w") as f:
            f.write(table)
    _atomic_write_bytes(os.path.join(out_dir, "table.md"), write_md)
    return CompareResult(rows, chosen, table, out_dir)


def read_results(csv_path: str | os.PathLike) -> list[dict]:
    """``results.csv`` back as typed rows."""
    rows = []
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            for k in ("test_error", "test_loss", "val_error", "val_loss", "train_loss", "lr", "wall_s"):
                r[k] = float(r[k]) if r.get(k) not in (None, "") else None
            r["seed"], r["epochs"] = int(r["seed"]), int(r["epochs"])
            r["chosen"] = r["chosen"] == "True"
            rows.append(r)
    return rows
