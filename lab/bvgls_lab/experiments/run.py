"""Running a benchmark protocol: one (task, strategy) cell per worker process, each an lr
search (the runner's, :mod:`bvgls.runner.lrsearch`, through :func:`bvgls.runner.grid.compare`)
then the final runs at the chosen lr. A suite (several models) runs its parts one after the other."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bvgls.runner.config import GRID_AXES
from bvgls.runner.grid import compare as run_grid
from bvgls.runner.lrsearch import LR_LADDER, next_lr  # noqa: F401  (re-exported: the benchmark's ladder)

from ..offline_tasks import TASKS, export_image_folder
from .protocols import BENCH, EXPECTED_GROUPS, Protocol, suite

logger = logging.getLogger(__name__)


@dataclass
class Cell:
    task: str
    strategy: str
    data_dir: str
    out_dir: str
    protocol: Protocol
    threads: int = 1
    #: the protocol's validation fraction, resolved for this task
    val_fraction: float = 0.0
    #: the seeds this cell runs (a sweep runs one cell per seed); None: the protocol's
    seeds: tuple[int, ...] | None = None

    def dataset(self):
        """The task as ``compare`` takes it: a folder, or a loader of its pooled train+val."""
        if self.protocol.pool == "train+val":
            return functools.partial(pooled_folder, self.data_dir, augment=self.protocol.augment)
        return self.data_dir

    def grid_options(self, eval_every: int) -> dict:
        p = self.protocol
        model = p.model if p.head_dropout is None else HeadDropoutModel(p.model, p.weights, p.head_dropout)
        return dict(
            model=model,
            **p.training(eval_every, self.val_fraction).options(without=GRID_AXES),
            weights=p.weights,
            augment=p.augment,
            image_size=p.image_size,
            tie_break=p.tie_break,
            lr_ladder=p.lr_ladder,
        )


class HeadDropoutModel:
    """Builds ``spec`` with every Dropout of its head (modules outside ``features``) at probability
    ``p``; a picklable, stably named model builder (its name is part of the run's identity)."""

    def __init__(self, spec: str, weights: str, p: float):
        self.spec, self.weights, self.p = spec, weights, p
        self.__name__ = f"{spec}+head_dropout={p:g}"

    def __call__(self, num_classes: int):
        from torch import nn

        from bvgls.runner.models import build_model

        model = build_model(self.spec, num_classes, self.weights)
        features = getattr(model, "features", None)
        inside = {id(m) for m in features.modules()} if features is not None else set()
        dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout) and id(m) not in inside]
        if not dropouts:
            raise ValueError(f"{self.spec} has no Dropout in its head")
        for m in dropouts:
            m.p = self.p
        return model


def pooled_folder(path: str, input, augment: str = "light"):
    """A built task's ``train/`` and ``val/`` together as the training pool (``test/`` as test),
    so that each seed's validation split re-draws the few shots."""
    from torch.utils.data import ConcatDataset
    from torchvision.datasets import ImageFolder

    from bvgls.registry import DatasetSplits
    from bvgls.runner.data import DatasetError, TransformedDataset, make_transform

    train, val, test = (ImageFolder(os.path.join(path, part)) for part in ("train", "val", "test"))
    if not train.classes == val.classes == test.classes:
        raise DatasetError(f"{path}: the class folders of train/, val/ and test/ differ")
    return DatasetSplits(
        train=TransformedDataset(ConcatDataset([train, val]), make_transform(input, True, augment)),
        test=TransformedDataset(test, make_transform(input, False, augment)),
        num_classes=len(train.classes),
        classes=list(train.classes),
        name=os.path.basename(path),
    )


@contextmanager
def lines_to(path: str):
    """Send the library's progress lines (the ``bvgls`` logger) to the file ``path`` only, while in
    the block: a cell's runs are logged beside its results, not on the console of the pool."""
    library = logging.getLogger("bvgls")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = library.handlers[:], library.propagate, library.level
    library.handlers, library.propagate = [handler], False
    library.setLevel(logging.INFO)
    try:
        yield
    finally:
        handler.close()
        library.handlers, library.propagate = saved[0], saved[1]
        library.setLevel(saved[2])


def search(cell: Cell) -> tuple[float, list[float], bool]:
    """The lr search of one (task, strategy): returns (chosen lr, searched grid, chosen at an edge)."""
    p = cell.protocol
    fixed = p.fixed_lr(cell.task, cell.strategy)
    if fixed is not None:
        return fixed, [fixed], False
    if len(p.lrs) == 1:
        return p.lrs[0], list(p.lrs), False
    result = run_grid(
        [cell.strategy],
        {cell.task: cell.dataset()},
        p.search_seeds,
        p.lrs,
        out_dir=os.path.join(cell.out_dir, "search"),
        extend_lrs=p.extend_grid,
        **cell.grid_options(eval_every=p.epochs),
    )
    choice = result.searches[(cell.task, cell.strategy)]  # search runs are evaluated once, at the end
    return choice.lr, choice.grid, choice.edge


def sweep(cell: Cell) -> tuple[float, list[float]]:
    """Every lr of the cell's grid on every seed (``sweep/``): returns (chosen lr, grid)."""
    p = cell.protocol
    grid = list(p.cell_grid(cell.task, cell.strategy))
    result = run_grid(
        [cell.strategy],
        {cell.task: cell.dataset()},
        cell.seeds or p.seeds,
        grid,
        out_dir=os.path.join(cell.out_dir, "sweep"),
        extend_lrs=False,
        **cell.grid_options(eval_every=p.eval_every),
    )
    return (result.searches[(cell.task, cell.strategy)].lr if len(grid) > 1 else grid[0]), grid


def run_cell(cell: Cell) -> dict:
    """The lr search, then the final runs, of one (task, strategy); runs in a worker process."""
    import torch

    torch.set_num_threads(cell.threads)
    p = cell.protocol
    start = time.time()
    with lines_to(os.path.join(cell.out_dir, "logs", f"{cell.task}__{cell.strategy}.log")):
        if p.design == "sweep":
            lr, grid = sweep(cell)
            return {
                "task": cell.task,
                "strategy": cell.strategy,
                "lr": lr,
                "grid": grid,
                "edge": False,
                "fixed": False,
                "wall_s": round(time.time() - start, 1),
            }
        lr, grid, edge = search(cell)
        run_grid(
            [cell.strategy],
            {cell.task: cell.dataset()},
            p.seeds,
            [lr],
            out_dir=os.path.join(cell.out_dir, "final"),
            **cell.grid_options(eval_every=p.eval_every),
        )
    return {
        "task": cell.task,
        "strategy": cell.strategy,
        "lr": lr,
        "grid": grid,
        "edge": edge,
        "fixed": p.fixed_lr(cell.task, cell.strategy) is not None,
        "wall_s": round(time.time() - start, 1),
    }


def report_of(protocol: Protocol):
    """The report writer of a protocol's design: the search design's Table A and verdicts, or the
    sweep design's shared-lr / tuned comparisons and robustness."""
    if protocol.design != "sweep":
        from .report import write_report

        return write_report
    from .sweep_report import write_sweep_report

    return lambda out, protocol, cells=(), *, wall_s=None, reference=None: write_sweep_report(out, protocol, wall_s)


def run_benchmark(
    out_dir: str | os.PathLike,
    protocol: Protocol = BENCH,
    *,
    workers: int = 2,
    threads: int = 1,
    data_root: str | None = None,
    download: bool = False,
    reference: str | os.PathLike | None = None,
) -> dict:
    """Run ``protocol`` into ``out_dir`` (resumable: finished runs are skipped) and write the report.

    ``workers`` processes run (task, strategy) cells in parallel, each with ``threads`` torch
    threads. ``data_root``/``download``: where Fashion-MNIST is, or may be fetched to, when the
    Debian package is not installed. ``reference``: an earlier benchmark's ``runs.csv`` that the
    final runs of the same cells are compared with in the report. Returns the summary that is also written to
    ``out_dir/summary.json``.
    """
    out = Path(out_dir)
    check_model(protocol)
    tasks = {name: locate_task(name, protocol) for name in protocol.tasks if name not in TASKS}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    check_protocol(out, protocol)
    start = time.time()
    data_dirs = _data_dirs(out, protocol, tasks, data_root, download)
    logger.info(f"{len(data_dirs)} task(s) ready ({time.time() - start:.0f} s)")
    if tasks:
        (out / "tasks.json").write_text(json.dumps(tasks, indent=2) + "\n")
    cells = _cells(out, protocol, tasks, data_dirs, threads)
    logger.info(
        f"{len(cells)} (task, strategy) cells: {plan_text(protocol, cells)}, {workers} at a time; "
        f"logs in {out / 'logs'}"
    )
    results = []
    for res in map_cells(cells, workers):
        results.append(res)
        logger.info(cell_line(res, len(results), len(cells), start))
    wall = time.time() - start
    summary = report_of(protocol)(out, protocol, results, wall_s=wall, reference=reference)
    logger.info(f"total {wall / 60:.1f} min; report: {out / 'report.md'}")
    return summary


def _data_dirs(out: Path, protocol: Protocol, tasks: dict, data_root: str | None, download: bool) -> dict[str, str]:
    """Each task's image folder: a located task's own, else one exported under ``out/data``."""
    data_dirs = {}
    for name in protocol.tasks:
        data_dirs[name] = (
            tasks[name]["path"]
            if name in tasks
            else str(
                export_image_folder(
                    name, out / "data" / name, seed=protocol.task_seed, data_root=data_root, download=download
                )
            )
        )
    return data_dirs


def _cells(out: Path, protocol: Protocol, tasks: dict, data_dirs: dict[str, str], threads: int) -> list[Cell]:
    """The (task, strategy) cells in the order they run."""
    cells = [
        Cell(
            t,
            s,
            data_dirs[t],
            str(out),
            protocol,
            threads,
            tasks.get(t, {}).get("val_fraction", 0.0) if protocol.val_fraction == "manifest" else protocol.val_fraction,
        )
        for s in protocol.strategies
        for t in protocol.tasks
    ]  # by strategy: a cut-short run has whole ones
    if protocol.design == "sweep":  # seed by seed: a cut-short sweep has whole seeds of every cell
        cells = [replace(c, seeds=(seed,)) for seed in protocol.seeds for c in cells]
    return cells


def run_suite(out_dir: str | os.PathLike, name: str = "offline", **options) -> list[dict]:
    """Run the named suite (:data:`~bvgls_lab.experiments.protocols.SUITES`): one part into ``out_dir``, or
    each of several parts into ``out_dir/<part>``. Every part is checked before any runs."""
    parts = suite(name)
    for _, protocol in parts:
        check_model(protocol)
        for task in protocol.tasks:
            if task not in TASKS:
                locate_task(task, protocol)
    return [
        run_benchmark(Path(out_dir) if len(parts) == 1 else Path(out_dir) / part, protocol, **options)
        for part, protocol in parts
    ]


def report_suite(
    out_dir: str | os.PathLike, name: str, reference: str | os.PathLike | None = None
) -> list[dict | None]:
    """Rewrite the reports of a suite's parts from the runs finished so far (also of a run still going
    or cut short: the lr of a cell comes from its final runs, the grid from its search runs). A later
    part that never started (the suite was stopped before it) gets None."""
    parts = suite(name)
    started = [part for part, _ in parts if (Path(out_dir) / part / "protocol.json").is_file()]
    summaries: list[dict | None] = []
    for part, protocol in parts:
        out = Path(out_dir) if len(parts) == 1 else Path(out_dir) / part
        if len(parts) > 1 and started and part not in started:  # a later part that never started: nothing to report
            summaries.append(None)
            continue
        if not (out / "protocol.json").is_file():
            raise ValueError(f"{out} holds no benchmark (no protocol.json)")
        check_protocol(out, protocol)
        cells = [] if protocol.design == "sweep" else list(cell_records(out, protocol).values())  # a sweep's: its runs
        summaries.append(report_of(protocol)(out, protocol, cells, reference=reference))
    return summaries


def cell_records(out: Path, protocol: Protocol) -> dict[tuple[str, str], dict]:
    """Per (task, strategy): its lr facts, as the run recorded them in ``summary.json``, else read
    back from its runs (a run still going or cut short: the lr from the final runs, the grid from
    the search runs)."""
    known = json.loads((out / "summary.json").read_text())["cells"] if (out / "summary.json").is_file() else []
    cells = {(c["task"], c["strategy"]): c for c in cells_from_runs(out, protocol)}
    cells.update({(c["task"], c["strategy"]): c for c in known})  # the run's own record of its searches
    return cells


def cells_from_runs(out: Path, protocol: Protocol) -> list[dict]:
    """The cells' lr facts as :func:`run_cell` returns them, read back from the run directories."""
    from bvgls.runner.grid import collect_results

    search = collect_results(str(out / "search")) if (out / "search").is_dir() else []
    final = collect_results(str(out / "final")) if (out / "final").is_dir() else []
    cells = []
    for t in protocol.tasks:
        for s in protocol.strategies:
            lrs = {r["lr"] for r in final if (r["dataset"], r["strategy"]) == (t, s)}
            if len(lrs) != 1:
                continue
            lr = lrs.pop()
            grid = sorted({r["lr"] for r in search if (r["dataset"], r["strategy"]) == (t, s)}) or [lr]
            fixed = protocol.fixed_lr(t, s) is not None
            cells.append(
                {
                    "task": t,
                    "strategy": s,
                    "lr": lr,
                    "grid": grid,
                    "fixed": fixed,
                    "edge": len(grid) > 1
                    and lr in (grid[0], grid[-1])
                    and lr in (min(protocol.lr_ladder), max(protocol.lr_ladder)),
                }
            )
    return cells


def missing_assets(protocol: Protocol) -> str | None:
    """Why ``protocol`` cannot run on this machine (a pretrained task not built, ImageNet weights not
    set up), or None. Offline tasks and models are always available."""
    for task in protocol.tasks:
        if task not in TASKS:
            try:
                locate_task(task, protocol)
            except ValueError as e:
                return str(e)
    if protocol.model in EXPECTED_GROUPS and str(protocol.weights).lower() == "default":
        from ..pretrained import weights
        from ..pretrained.image_tasks import BUILD_HINT

        path = {"mobilenet_v2": weights.mobilenet_v2_path, "efficientnet_lite0": weights.efficientnet_lite0_path}[
            protocol.model
        ]()
        if not path.is_file():
            return f"the {protocol.model} ImageNet weights are not set up ({path} is missing); set up: {BUILD_HINT}"
    return None


def check_model(protocol: Protocol) -> None:
    """Refuse a model whose stage-group count is not what the protocol's partial specs assume."""
    expected = EXPECTED_GROUPS.get(protocol.model)
    if expected is None or protocol.groups != "auto":  # the partial specs' numbering is the stage groups'
        return
    from bvgls.grouping import layer_groups
    from bvgls.runner.models import build_model

    groups = layer_groups(build_model(protocol.model, 2, "none"))
    if len(groups) != expected:
        raise ValueError(
            f"{protocol.model} has {len(groups)} groups ({', '.join(groups.names)}), the protocol's "
            f"partial strategies assume {expected}: the grouping changed; the protocol cannot run "
            "as frozen"
        )


def locate_task(name: str, protocol: Protocol) -> dict:
    """A built pretrained task: its folder, manifest checksum and counts, and the resolved
    validation fraction (DatasetError with the set-up hint when it is not built)."""
    from ..pretrained.image_tasks import task_path

    path = task_path(name)
    manifest = path / "manifest.json"
    counts = json.loads(manifest.read_text())["counts"]
    n_train = sum(c["train"] for c in counts.values())
    n_val = sum(c["val"] for c in counts.values())
    if protocol.pool == "train+val" and not n_val:
        raise ValueError(f"task {name!r} has no val/ images to pool")
    return {
        "path": str(path),
        "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
        "counts": counts,
        "val_fraction": n_val / (n_train + n_val),
    }


def map_cells(cells: list[Cell], workers: int):
    """``run_cell`` over ``cells``, in this process or a spawned pool, results as they finish."""
    if workers <= 1:
        yield from map(run_cell, cells)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(run_cell, cells)


def plan_text(protocol: Protocol, cells: list[Cell]) -> str:
    if protocol.design == "sweep":
        runs = sum(len(protocol.cell_grid(c.task, c.strategy)) * len(c.seeds or protocol.seeds) for c in cells)
        return f"{runs} runs (a sweep: every lr on every seed)"
    searched = [c for c in cells if protocol.fixed_lr(c.task, c.strategy) is None]
    plan = f"{len(cells) * len(protocol.seeds)} runs"
    if searched and len(protocol.lrs) > 1:
        plan = (
            f"{len(searched) * len(protocol.search_seeds) * len(protocol.lrs)} lr-search runs (more if a grid "
            f"is extended) + {plan}"
        )
    return plan


def cell_line(res: dict, done: int, total: int, start: float) -> str:
    grid = ", ".join(f"{x:g}" for x in res["grid"])
    return (
        f"[{done}/{total}] {res['task']} {res['strategy']}: lr {res['lr']:g} (grid {grid}"
        f"{', EDGE' if res['edge'] else ''}) {res['wall_s']:.0f} s; {(time.time() - start) / 60:.1f} min so far"
    )


def protocol_differences(out: Path, protocol: Protocol) -> list[str] | None:
    """The fields in which the benchmark recorded in ``out/protocol.json`` differs from
    ``protocol`` (empty: the same protocol), or None where ``out`` records none. Reads only."""
    path = out / "protocol.json"
    if not path.is_file():
        return None
    current = json.loads(json.dumps(asdict(protocol)))
    old = json.loads(json.dumps(Protocol.from_record(json.loads(path.read_text()))))
    old = {k: v for k, v in old.items() if k in current}  # e.g. v1's "two_phase" note
    return sorted(k for k in current if old.get(k) != current[k])


def check_protocol(out: Path, protocol: Protocol) -> None:
    diff = protocol_differences(out, protocol)
    if diff:
        raise ValueError(
            f"{out} holds a benchmark with another protocol (differs in {', '.join(diff)}); use a new output directory"
        )
    (out / "protocol.json").write_text(json.dumps(asdict(protocol), indent=2) + "\n")
