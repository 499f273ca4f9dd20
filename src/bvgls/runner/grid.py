"""The grid runner behind ``bvgls compare``: strategies x datasets x seeds x learning rates -> Table A.

Each run lives in ``OUT/runs/<dataset>/<strategy>/lr<lr>/seed<seed>`` (``-refit`` appended for
refits) and is skipped when its ``result.json`` exists, resumed from its checkpoint when it was
interrupted. After every run ``OUT/results.csv`` and ``OUT/table.md`` are rewritten from all
finished runs found under ``OUT/runs``, so several processes (e.g. one per GPU) can fill
disjoint parts of one grid.

Learning rates: with several ``lrs`` every run trains on the training set minus a validation
split (``val_fraction``, carved from the training set, never the test set); for each dataset
and strategy the lr with the lowest mean final validation error over seeds is chosen, and the
grid is extended past an edge (:mod:`.lrsearch`, the benchmark's search; ``extend_lrs=False``
to turn it off). The table reports the test error of the runs at the chosen lr
(``refit=True``: of new runs at that lr on the full training set). Each strategy gets its own
best lr: one that updates one group per step may want a different lr than full finetuning.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..registry import ModelInput
from ..strategies import StrategySpec, parse_spec
from . import rundir
from .config import GRID_AXES, FinetuneConfig, result_keys
from .loop import finetune, resolve_device, seed_everything
from .lrsearch import LR_LADDER, TIE_BREAKS, LrChoice, search_lr
from .lrsens import FIGURE_NAME, lr_sensitivity, lr_sensitivity_lines, several_lrs
from .results import choose_lrs, collect_results, lr_text, mark_reported, read_results, slug  # noqa: F401

logger = logging.getLogger(__name__)

RESULT_COLUMNS = [
    "dataset",
    "strategy",
    "seed",
    "lr",
    "test_error",
    "test_loss",
    "val_error",
    "val_loss",
    "train_loss",
    "epochs",
    "wall_s",
    "phase",
    "chosen",
    "diverged",
    "run_dir",
]
#: besides the result options, what a reused run directory must agree on
RUN_IDENTITY = ("model", "weights", "augment", "image_size", "dataset", "phase")


@dataclass
class CompareResult:
    """Rows of ``results.csv`` (dicts), the chosen lr per (dataset, strategy), and the table."""

    rows: list[dict]
    chosen_lr: dict[tuple[str, str], float]
    table: str
    out_dir: str
    failed: list[str] = field(default_factory=list)
    #: per (dataset, strategy) with an lr search: what it tried and why it stopped
    searches: dict[tuple[str, str], LrChoice] = field(default_factory=dict)
    #: ``plots/lr_sensitivity.png`` where more than one lr was tried, else None
    lr_figure: str | None = None

    @property
    def csv_path(self) -> str:
        return os.path.join(self.out_dir, "results.csv")

    @property
    def table_path(self) -> str:
        return os.path.join(self.out_dir, "table.md")

    def test_errors(self, dataset: str, strategy: str) -> list[float]:
        """Test errors (percent) of the reported runs of one table cell, one per seed."""
        return [
            r["test_error"]
            for r in self.rows
            if r["chosen"] and r["dataset"] == dataset and r["strategy"] == strategy and r["test_error"] is not None
        ]


def check_lrs(lrs: Sequence[float], name: str = "lrs") -> list[float]:
    """``lrs`` as floats; ValueError (naming ``name``) unless every one is finite and > 0."""
    values = [float(x) for x in lrs]
    if not all(math.isfinite(x) and x > 0 for x in values):
        raise ValueError(f"{name} must be finite numbers > 0, got {', '.join(map(repr, values))}")
    return values


def run_dir_for(out_dir: str, dataset: str, strategy: str, lr: float, seed: int, refit: bool = False) -> str:
    return os.path.join(
        out_dir, "runs", slug(dataset), slug(strategy), f"lr{lr_text(lr)}", f"seed{seed}{'-refit' if refit else ''}"
    )


# ---------------------------------------------------------------------- inputs
DatasetSource = Any  # str (name or path) | DatasetSplits | fn(ModelInput) -> DatasetSplits


def dataset_entries(datasets) -> list[tuple[str, DatasetSource]]:
    from .data import dataset_label

    if isinstance(datasets, str):
        datasets = [d.strip() for d in datasets.split(",") if d.strip()]
    items = (
        list(datasets.items())
        if isinstance(datasets, Mapping)
        else [d if isinstance(d, tuple) else (dataset_label(d), d) for d in datasets]
    )
    labels = [label for label, _ in items]
    if not items:
        raise ValueError("no datasets given")
    if len(set(labels)) != len(labels):
        raise ValueError(f"dataset labels must be unique, got {labels}")
    return items


def load_source(source: DatasetSource, input, data_root, download, augment):
    from .data import load_dataset

    if isinstance(source, str):
        return load_dataset(source, data_root, download, input, augment=augment)
    if callable(source):
        return source(input)
    return source


def model_builder(model, weights, trust_pickle: bool = False) -> tuple[str, Callable[[int], nn.Module]]:
    if isinstance(model, str):
        from .models import build_model

        return model, lambda n: build_model(model, n, weights, trust_pickle=trust_pickle)
    if callable(model):
        return getattr(model, "__name__", repr(model)), model
    raise TypeError(f"model must be a model spec string or fn(num_classes) -> nn.Module, got {type(model).__name__}")


def parse_strategies(strategies: Sequence[str | StrategySpec] | str) -> list[StrategySpec]:
    """Spec strings (a list or comma-separated) parsed once, duplicates dropped, order kept."""
    if isinstance(strategies, str):
        strategies = strategies.split(",")
    specs = [
        parse_spec(s if isinstance(s, StrategySpec) else s.strip())
        for s in strategies
        if isinstance(s, StrategySpec) or s.strip()
    ]
    return list({spec.text: spec for spec in specs}.values())


def check_strategies(
    strategies: Sequence[str | StrategySpec], model: nn.Module, scheme: str = "auto"
) -> list[StrategySpec]:
    """Parse ``strategies`` and raise ValueError now, not hours into a grid, for specs with an
    unknown option, an option value the strategy refuses, or a group range that does not fit
    ``model``'s groups under the grouping ``scheme`` (each strategy is built once on a throwaway
    optimizer over ``model``)."""
    from ..grouping import layer_groups

    groups = layer_groups(model, scheme)
    specs = parse_strategies(list(strategies))
    for spec in specs:
        spec.check_options()  # an unknown option: its own message, naming the known ones
        try:
            spec.check_fits(len(groups))
        except ValueError as e:
            raise ValueError(
                f"strategy {spec.text!r} does not fit {type(model).__name__} "
                f"({len(groups)} groups: {', '.join(groups.names)}): {e}"
            ) from None
        try_build(spec, model, groups)
    return specs


def try_build(spec: StrategySpec, model: nn.Module, groups) -> None:
    """Build ``spec`` on a throwaway optimizer, so that bad option values (``probe=0``) are
    refused before any data is loaded; the model's trainable flags are restored."""
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    try:
        strategy = spec.build(torch.optim.SGD(groups.param_groups(), lr=0.1), groups)
        strategy.remove()
    except (ValueError, TypeError) as e:
        raise ValueError(f"strategy {spec.text!r}: {e}") from None
    finally:
        for p in model.parameters():
            p.requires_grad_(trainable[id(p)])


# ---------------------------------------------------------------------- the grid
class Grid:
    """One ``compare`` invocation: runs cells, searches lrs, rewrites the reports."""

    def __init__(
        self,
        out_dir: str,
        specs: list[StrategySpec],
        labels: list[str],
        seeds: list[int],
        cfg: FinetuneConfig,
        identity: dict[str, Any],
        build: Callable[[int], nn.Module],
        *,
        keep_going: bool,
        title: str,
        total: int,
        tie_break: str = "lr",
        lr_ladder: Sequence[float] = LR_LADDER,
    ):
        self.out_dir, self.specs, self.labels, self.seeds, self.cfg = out_dir, specs, labels, seeds, cfg
        self.tie_break, self.lr_ladder = tie_break, tuple(lr_ladder)
        self.identity, self.build, self.keep_going, self.title = identity, build, keep_going, title
        self.failed: list[str] = []
        self.searches: dict[tuple[str, str], LrChoice] = {}
        self.done, self.total = 0, total

    def run(
        self,
        label: str,
        splits,
        spec: StrategySpec,
        seed: int,
        lr: float,
        phase: str,
        val_fraction: float,
        refit: bool = False,
    ) -> None:
        """One finetuning run (skipped when finished, resumed when interrupted)."""
        run_dir = run_dir_for(self.out_dir, label, spec.text, lr, seed, refit=refit)
        cfg = self.cfg.replace(strategy=spec.text, lr=lr, seed=seed, val_fraction=val_fraction)
        record = {**self.identity, "dataset": label, "phase": phase, "num_classes": splits.num_classes}
        check_existing(run_dir, {**cfg.record(), **record})
        self.done += 1
        if rundir.is_finished(run_dir):
            return
        logger.info(
            f"[{self.done}/{self.total}] {label} {spec.text} lr={lr_text(lr)} seed={seed} ({phase}) -> {run_dir}"
        )
        seed_everything(seed)
        net = self.build(splits.num_classes)
        try:
            history = finetune(
                net, splits, spec, out_dir=run_dir, resume=True, config=record, **cfg.options(without=("strategy",))
            )
        except Exception as e:  # with keep_going a failed run must not stop the grid
            if not self.keep_going:
                raise
            self.failed.append(f"{run_dir}: {type(e).__name__}: {e}")
            logger.info(f"  FAILED: {type(e).__name__}: {e}")
            return
        final = history.final
        if history.diverged:
            logger.info(f"  diverged at epoch {final['epoch']}: the training loss is not finite (lr {lr_text(lr)})")
            self.write()
            return
        msg = f"  test error {final['test_error']:.2f}%"
        if final.get("val_error") is not None:
            msg += f", val error {final['val_error']:.2f}%"
        logger.info(msg + f", {history.wall_s:.0f}s")
        self.write()

    def write(self) -> CompareResult:
        return write_reports(
            self.out_dir,
            strategies=[s.text for s in self.specs],
            datasets=self.labels,
            title=self.title,
            tie_break=self.tie_break,
        )

    def search(self, label: str, splits, spec: StrategySpec, lrs: Sequence[float], *, extend: bool) -> LrChoice:
        """The lr search of one (dataset, strategy) on the validation split."""

        def run(grid: list[float]) -> None:
            for seed in self.seeds:
                for lr in grid:
                    self.run(label, splits, spec, seed, lr, "search", self.cfg.val_fraction)

        def choose(grid: list[float]) -> tuple[float, set[float]]:
            rows = [
                r
                for r in collect_results(self.out_dir)
                if r["dataset"] == label and r["strategy"] == spec.text and r["phase"] == "search" and r["lr"] in grid
            ]
            diverged = {r["lr"] for r in rows if r["train_loss"] is None}
            return choose_lrs(rows, self.tie_break).get((label, spec.text)), diverged

        choice = search_lr(lrs, run, choose, extend=extend, label=f"{label} {spec.text}", ladder=self.lr_ladder)
        self.searches[(label, spec.text)] = choice
        return choice


def check_existing(run_dir: str, expected: Mapping[str, Any]) -> None:
    """A run directory left by an earlier invocation must have the same settings."""
    path = os.path.join(run_dir, rundir.CONFIG_FILE)
    if not os.path.isfile(path):
        return
    old = rundir.read_json(path)
    # a key the old run did not record (made by an earlier version) cannot be compared
    keys = [k for k in result_keys() + RUN_IDENTITY if k in expected and k in old]
    changed = [f"{k}: {old.get(k)!r} -> {expected[k]!r}" for k in keys if old.get(k) != expected[k]]
    if changed:
        raise ValueError(
            f"{run_dir!r} holds a run with other settings ({'; '.join(changed)}); use a new --out directory"
        )


def compare(
    strategies: Sequence[str] | str,
    datasets: Sequence[DatasetSource] | Mapping[str, DatasetSource] | str,
    seeds: Sequence[int] = (0,),
    lrs: Sequence[float] = (0.01,),
    *,
    model: str | Callable[[int], nn.Module],
    out_dir: str | os.PathLike,
    weights: str | None = "DEFAULT",
    refit: bool = False,
    extend_lrs: bool = True,
    data_root: str | None = None,
    download: bool = False,
    augment: str | None = None,
    image_size: int | None = None,
    tie_break: str = "lr",
    lr_ladder: Sequence[float] = LR_LADDER,
    keep_going: bool = False,
    **options: Any,
) -> CompareResult:
    """Run every (dataset, strategy, seed, lr) and write ``results.csv`` and ``table.md``.

    ``strategies``: specs (``"full,L3-6,bvgls"`` or a list, see :func:`bvgls.make_strategy`); ``datasets``:
    names/paths (``load_dataset``), ``(label, DatasetSplits)`` pairs, or a dict label -> DatasetSplits or
    ``fn(model_input) -> DatasetSplits``; one run per seed (it seeds the head's init, shuffling and
    augmentation) and base learning rate (several need ``val_fraction``, see the module docstring).
    ``model``: a model spec (:func:`~bvgls.runner.models.build_model`, with ``weights``: ``DEFAULT``,
    ``none``, a file) or ``fn(num_classes) -> nn.Module``. ``out_dir``: where runs, ``results.csv`` and
    ``table.md`` go; rerunning skips finished runs. ``**options``: the training options,
    :class:`~bvgls.runner.config.FinetuneConfig`'s field names (``epochs``, ``batch_size``,
    ``val_fraction``, ...) but the grid's own ``lr``, ``seed`` and ``strategy``; a config ``cfg`` passes as
    ``**cfg.options(without=GRID_AXES)``. ``refit``: after choosing the lr, train again on the full
    training set at that lr; ``extend_lrs``: extend the lr grid past an edge, along ``lr_ladder``;
    ``tie_break``: lr choice among equal mean validation errors, ``"lr"`` (the smaller lr) or
    ``"val_loss"`` (the lower mean final validation loss, then the smaller lr). ``data_root``,
    ``download``, ``augment``: for :func:`bvgls.runner.data.load_dataset`; ``image_size``: crop size
    in px instead of the model's own. ``keep_going``: log a failed run and continue with the others
    (default: raise). Progress lines go to the ``bvgls.runner.grid`` logger.
    """
    lrs = check_lrs(lrs)
    cfg, specs, seeds = check_compare_arguments(strategies, seeds, lrs, refit, tie_break, image_size, options)
    entries = dataset_entries(datasets)
    rundir.prepare_out_dir(out_dir)
    if len(lrs) == 1:  # a directory of single-lr runs must not mix lrs
        check_no_stray_runs(str(out_dir), [label for label, _ in entries], [s.text for s in specs], lrs[0])
    model_label, build = model_builder(model, weights, cfg.trust_pickle)
    specs, input = check_model_fit(specs, build, image_size, cfg.groups)  # before any data is loaded
    identity = dict(model=model_label, weights=weights if isinstance(model, str) else None, augment=augment)
    identity["image_size"] = image_size
    grid_options = dict(refit=refit, keep_going=keep_going, tie_break=tie_break, lr_ladder=lr_ladder)
    grid = make_grid(str(out_dir), specs, entries, seeds, lrs, cfg, identity, build, **grid_options)
    for label, source in entries:
        splits = load_source(source, input, data_root, download, augment)
        run_dataset(grid, label, splits, lrs, search=len(lrs) > 1, refit=refit, extend=extend_lrs)
    lr_figure = draw_lr_sensitivity(str(out_dir))  # before the last report, which names it
    result = grid.write()
    result.failed, result.searches, result.lr_figure = grid.failed, grid.searches, lr_figure
    return result


def make_grid(
    out_dir, specs, entries, seeds, lrs, cfg, identity, build, *, refit, keep_going, tie_break, lr_ladder
) -> Grid:
    """The :class:`Grid` of a :func:`compare` call (its table's title and its run count)."""
    return Grid(
        out_dir,
        specs,
        [label for label, _ in entries],
        seeds,
        cfg,
        identity,
        build,
        keep_going=keep_going,
        title=table_title(identity["model"], cfg, lrs, refit),
        total=len(entries) * len(specs) * len(seeds) * len(lrs),
        tie_break=tie_break,
        lr_ladder=lr_ladder,
    )


def check_compare_arguments(strategies, seeds, lrs, refit, tie_break, image_size, options):
    """What :func:`compare` refuses before building anything; returns the config (lr: a
    placeholder, set per run), the parsed strategies and the seeds."""
    for reserved in GRID_AXES:
        if reserved in options:
            raise ValueError(f"compare takes {reserved!r} from its own arguments (lrs, seeds, strategies)")
    cfg = FinetuneConfig(**{"lr": 1.0, **options})
    specs = parse_strategies(strategies)
    seeds = [int(s) for s in seeds]
    check_grid_arguments(specs, seeds, lrs, cfg.val_fraction, refit)
    resolve_device(cfg.device)
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"unknown tie_break {tie_break!r}; known: {', '.join(TIE_BREAKS)}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return cfg, specs, seeds


def check_model_fit(specs, build, image_size, groups: str = "auto"):
    """Build the model once with a 2-class head (the shape model): the strategies must fit its
    ``groups``; returns them and its input spec (with ``image_size``)."""
    shape_model = build(2)
    specs = check_strategies(specs, shape_model, groups)
    input = shape_model.bvgls_input if hasattr(shape_model, "bvgls_input") else None
    if image_size is not None:
        input = dataclasses.replace(input or ModelInput(), size=image_size)
    return specs, input


def table_title(model_label: str, cfg: FinetuneConfig, lrs: Sequence[float], refit: bool) -> str:
    search = len(lrs) > 1
    lr_part = f"lr chosen on a {cfg.val_fraction:g} validation split" if search else "lr " + lr_text(lrs[0])
    return (
        f"# Table A: {model_label}, {cfg.epochs} epochs, batch {cfg.batch_size}, {lr_part}"
        f"{', refit on the full training set' if refit else ''}"
    )


def draw_lr_sensitivity(out_dir: str) -> str | None:
    """``out_dir/plots/lr_sensitivity.png`` when the grid tried more than one lr somewhere (else None)."""
    try:
        from .plots import write_lr_sensitivity

        return write_lr_sensitivity(collect_results(out_dir), os.path.join(out_dir, "plots"))
    except ImportError as e:  # matplotlib is optional for a grid
        logger.info("no lr-sensitivity figure: %s", e)
        return None


def check_grid_arguments(specs, seeds, lrs, val_fraction, refit) -> None:
    if not specs or not seeds or not lrs:
        raise ValueError("strategies, seeds and lrs must each have at least one entry")
    if len(set(lrs)) != len(lrs):
        raise ValueError(f"lrs has duplicates: {lrs}")
    if len(lrs) > 1 and not val_fraction:
        raise ValueError(
            "several --lrs need --val-fraction: the lr is chosen on a validation split carved "
            "from the training set, never on the test set"
        )
    if refit and len(lrs) == 1:
        raise ValueError("refit only makes sense with several lrs to choose from")


def check_no_stray_runs(out_dir: str, labels: Sequence[str], strategies: Sequence[str], lr: float) -> None:
    """A single-lr grid cannot report a cell that already has a finished run at another lr
    without a validation search (choosing between them would tune on the test set): refuse
    before training, naming that run's directory."""
    for r in collect_results(out_dir):
        if r["phase"] == "final" and r["dataset"] in labels and r["strategy"] in strategies and r["lr"] != lr:
            raise ValueError(
                f"{os.path.join(out_dir, r['run_dir'])} holds a {r['dataset']} / {r['strategy']} run at "
                f"lr {lr_text(r['lr'])} without a validation search, this grid runs lr {lr_text(lr)}; "
                "remove that directory or use another --out"
            )


def run_dataset(grid: Grid, label: str, splits, lrs: list[float], *, search: bool, refit: bool, extend: bool) -> None:
    """Every strategy on one dataset: at the single lr, or searched (then refit if asked)."""
    if not search:
        for seed in grid.seeds:
            for spec in grid.specs:
                grid.run(label, splits, spec, seed, lrs[0], "final", grid.cfg.val_fraction)
        return
    for spec in grid.specs:
        grid.search(label, splits, spec, lrs, extend=extend)
    if refit:
        chosen = choose_lrs(collect_results(grid.out_dir), grid.tie_break)
        for seed in grid.seeds:
            for spec in grid.specs:
                lr = chosen.get((label, spec.text))
                if lr is not None:
                    grid.run(label, splits, spec, seed, lr, "refit", 0.0, refit=True)


# ---------------------------------------------------------------------- reports
def _lr_grid(rows: Sequence[dict]) -> dict[tuple[str, str], list[float]]:
    grid: dict[tuple[str, str], set[float]] = {}
    for r in rows:
        if r["phase"] == "search":
            grid.setdefault((r["dataset"], r["strategy"]), set()).add(r["lr"])
    return {k: sorted(v) for k, v in grid.items()}


def _ordered(values: Sequence[str], preferred: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(v for v in preferred if v in values))
    return seen + sorted(v for v in dict.fromkeys(values) if v not in seen)


def mean_std_text(values: Sequence[float]) -> str:
    """``mean ± std`` (two decimals; the mean alone for one value, ``–`` for none)."""
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def text_grid_lines(
    row_names: Sequence[str], columns: Sequence[str], text: Callable[[str, str], str], *, header: str = "Dataset"
) -> list[str]:
    """A markdown table with one text per (row, column), e.g. the lr each strategy used."""
    lines = ["| " + header + " | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    return lines + [f"| {r} | " + " | ".join(text(r, c) for c in columns) + " |" for r in row_names]


def table_a_lines(
    row_names: Sequence[str],
    columns: Sequence[str],
    cells: Mapping[tuple[str, str], list[float]],
    *,
    header: str = "Dataset",
    extra: Mapping[str, str] | None = None,
    extra_header: str = "",
) -> list[str]:
    """The paper's Table A as markdown lines: mean ± std per (row, column), the best (lowest)
    mean of each row in bold, and with several rows an average row over the columns that have
    every row. ``extra``: one more text column after the row name (e.g. the kind of shift)."""
    lead = f"| {header} | " + (f"{extra_header} | " if extra is not None else "")
    rule = "|---|" + ("---|" if extra is not None else "") + "---:|" * len(columns)
    lines = [lead + " | ".join(columns) + " |", rule]

    def row(name: str, means: Mapping[str, float], texts: Mapping[str, str], extra_text: str | None) -> str:
        best = min(means.values()) if means else None
        cols = [
            f"**{texts[c]}**" if c in means and math.isclose(means[c], best) else texts.get(c, "–") for c in columns
        ]
        lead_cells = f"| {name} | " + ("" if extra_text is None else f"{extra_text} | " if extra_text else "| ")
        return lead_cells + " | ".join(cols) + " |"

    per_column: dict[str, list[float]] = {c: [] for c in columns}
    for name in row_names:
        means = {c: statistics.fmean(cells[(name, c)]) for c in columns if cells.get((name, c))}
        for c, m in means.items():
            per_column[c].append(m)
        lines.append(
            row(
                name,
                means,
                {c: mean_std_text(cells[(name, c)]) for c in means},
                None if extra is None else extra.get(name, ""),
            )
        )
    if len(row_names) > 1:
        avg = {c: statistics.fmean(v) for c, v in per_column.items() if len(v) == len(row_names)}
        lines.append(row("Average", avg, {c: f"{m:.2f}" for c, m in avg.items()}, None if extra is None else ""))
    return lines


def format_table(
    rows: Sequence[dict],
    chosen: Mapping[tuple[str, str], float],
    *,
    strategies: Sequence[str] = (),
    datasets: Sequence[str] = (),
    title: str = "",
) -> str:
    """The paper's Table A as markdown: test error (%) mean ± std over seeds, datasets x strategies,
    an average row (over datasets, for strategies with every dataset), the best of each row in bold;
    then the lr each strategy used, flagged when it sits at the edge of the searched grid."""
    reported = [r for r in rows if r["chosen"] and r["test_error"] is not None and not r.get("diverged")]
    strategy_cols = _ordered([r["strategy"] for r in reported], strategies)
    dataset_rows = _ordered([r["dataset"] for r in reported], datasets)
    cell: dict[tuple[str, str], list[float]] = {}
    for r in reported:
        cell.setdefault((r["dataset"], r["strategy"]), []).append(float(r["test_error"]))
    lines = [title, ""] if title else []
    lines += ["Test error (%), mean ± std over seeds; lower is better; best per row in **bold**.", ""]
    lines += table_a_lines(dataset_rows, strategy_cols, cell)
    lines.append("")
    seeds_used = {len(v) for v in cell.values()}
    if seeds_used:
        lines.append(
            f"Seeds per cell: {', '.join(str(n) for n in sorted(seeds_used))}. "
            "Each cell's runs are listed in results.csv (rows with chosen=True)."
        )
    lines += diverged_lines(rows)
    lines.append("")
    lines += lr_lines(rows, chosen, dataset_rows, strategy_cols)
    return "\n".join(lines) + "\n"


def diverged_lines(rows: Sequence[dict]) -> list[str]:
    """A note on the reported cells with diverged runs (left out of the means above)."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["chosen"]:
            cells.setdefault((r["dataset"], r["strategy"]), []).append(r)
    bad = [
        f"{d} / {s}: {sum(r['diverged'] for r in rs)} of {len(rs)} seeds"
        for (d, s), rs in cells.items()
        if any(r.get("diverged") for r in rs)
    ]
    return [f"Runs that diverged (training loss not finite), left out of the table: {'; '.join(bad)}."] if bad else []


def lr_lines(
    rows: Sequence[dict],
    chosen: Mapping[tuple[str, str], float],
    dataset_rows: Sequence[str],
    strategy_cols: Sequence[str],
) -> list[str]:
    """The lr each strategy used per dataset; ``_edge_`` where it is at an end of the searched grid."""
    grid = _lr_grid(rows)
    if not grid:
        lrs = sorted({lr for (d, s), lr in chosen.items()})
        return [f"Learning rate: {', '.join(lr_text(x) for x in lrs)} (no search)."]
    lines = [
        "Learning rate chosen per strategy on the validation split (lowest mean final validation "
        "error); _edge_ = at the end of the searched grid, so a better lr may lie outside it.",
        "",
    ]

    def text(d: str, s: str) -> str:
        lr, lrs_tried = chosen.get((d, s)), grid.get((d, s), [])
        if lr is None:
            return "–"
        edge = len(lrs_tried) > 1 and lr in (lrs_tried[0], lrs_tried[-1])
        return f"{lr_text(lr)}{' _edge_' if edge else ''}"

    lines += text_grid_lines(dataset_rows, strategy_cols, text)
    tried = sorted({lr for v in grid.values() for lr in v})
    return lines + ["", f"Grid: {', '.join(lr_text(x) for x in tried)}."]


def write_reports(
    out_dir: str | os.PathLike,
    *,
    strategies: Sequence[str] = (),
    datasets: Sequence[str] = (),
    title: str = "",
    tie_break: str = "lr",
) -> CompareResult:
    """Rewrite ``results.csv`` and ``table.md`` in ``out_dir`` from every finished run there."""
    out_dir = str(out_dir)
    rows = collect_results(out_dir)
    chosen = choose_lrs(rows, tie_break)
    mark_reported(rows, chosen)
    table = format_table(rows, chosen, strategies=strategies, datasets=datasets, title=title)
    sens = lr_sensitivity(rows)
    if several_lrs(sens):
        figure = os.path.join("plots", FIGURE_NAME)
        table += (
            "\n"
            + "\n".join(
                lr_sensitivity_lines(sens, chosen, figure if os.path.isfile(os.path.join(out_dir, figure)) else None)
            )
            + "\n"
        )
    os.makedirs(out_dir, exist_ok=True)

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: ("" if r[k] is None else r[k]) for k in RESULT_COLUMNS})

    rundir.atomic_write(os.path.join(out_dir, "results.csv"), write_csv)
    rundir.write_text(os.path.join(out_dir, "table.md"), table)
    return CompareResult(rows, chosen, table, out_dir)
