"""Running a benchmark protocol: one (task, strategy) cell per worker process, each an lr
search (the runner's, :mod:`bvgls.runner.lrsearch`, through :func:`bvgls.runner.grid.compare`)
then the final runs at the chosen lr."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..runner.grid import compare as run_grid
from ..runner.lrsearch import LR_LADDER, next_lr  # noqa: F401  (re-exported: the benchmark's ladder)
from .protocol import BENCH, Protocol
from .tasks import export_image_folder


@dataclass
class Cell:
    task: str
    strategy: str
    data_dir: str
    out_dir: str
    protocol: Protocol
    threads: int = 1


def log_to(path: str) -> Callable[[str], None]:
    def log(line: str) -> None:
        with open(path, "a") as f:
            f.write(line.rstrip() + "\n")
    return log


def search(cell: Cell, log: Callable[[str], None]) -> tuple[float, list[float], bool]:
    """The lr search of one (task, strategy): returns (chosen lr, searched grid, chosen at an edge)."""
    p = cell.protocol
    fixed = p.fixed_lr(cell.task, cell.strategy)
    if fixed is not None:
        return fixed, [fixed], False
    if len(p.lrs) == 1:
        return p.lrs[0], list(p.lrs), False
    result = run_grid([cell.strategy], {cell.task: cell.data_dir}, p.search_seeds, p.lrs, model=p.model,
                      out_dir=os.path.join(cell.out_dir, "search"), settings=p.training(eval_every=p.epochs),
                      weights=p.weights, augment=p.augment, extend_lrs=p.extend_grid, log=log)
    choice = result.searches[(cell.task, cell.strategy)]  # search runs are evaluated once, at the end
    return choice.lr, choice.grid, choice.edge


def run_cell(cell: Cell) -> dict:
    """The lr search, then the final runs, of one (task, strategy); runs in a worker process."""
    import torch

    torch.set_num_threads(cell.threads)
    p = cell.protocol
    log = log_to(os.path.join(cell.out_dir, "logs", f"{cell.task}__{cell.strategy}.log"))
    start = time.time()
    lr, grid, edge = search(cell, log)
    run_grid([cell.strategy], {cell.task: cell.data_dir}, p.seeds, [lr], model=p.model,
             out_dir=os.path.join(cell.out_dir, "final"), settings=p.training(eval_every=p.eval_every),
             weights=p.weights, augment=p.augment, log=log)
    return {"task": cell.task, "strategy": cell.strategy, "lr": lr, "grid": grid, "edge": edge,
            "fixed": p.fixed_lr(cell.task, cell.strategy) is not None, "wall_s": round(time.time() - start, 1)}


def run_benchmark(out_dir: str | os.PathLike, protocol: Protocol = BENCH, *, workers: int = 2, threads: int = 1,
                  data_root: str | None = None, download: bool = False, log: Callable[[str], Any] = print) -> dict:
    """Run ``protocol`` into ``out_dir`` (resumable: finished runs are skipped) and write the report.

    ``workers`` processes run (task, strategy) cells in parallel, each with ``threads`` torch
    threads. ``data_root``/``download``: where Fashion-MNIST is, or may be fetched to, when the
    Debian package is not installed. Returns the summary that is also written to ``out_dir/summary.json``.
    """
    from .report import write_report

    out = Path(out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    check_protocol(out, protocol)
    start = time.time()
    data_dirs = {}
    for name in protocol.tasks:
        data_dirs[name] = str(export_image_folder(name, out / "data" / name, seed=protocol.task_seed,
                                                  data_root=data_root, download=download))
    log(f"exported {len(data_dirs)} task(s) to {out / 'data'} ({time.time() - start:.0f} s)")
    cells = [Cell(t, s, data_dirs[t], str(out), protocol, threads) for t in protocol.tasks for s in protocol.strategies]
    log(f"{len(cells)} (task, strategy) cells: {plan_text(protocol, cells)}, {workers} at a time; "
        f"logs in {out / 'logs'}")
    results = []
    for res in map_cells(cells, workers):
        results.append(res)
        log(cell_line(res, len(results), len(cells), start))
    wall = time.time() - start
    summary = write_report(out, protocol, results, wall_s=wall)
    log(f"total {wall / 60:.1f} min; report: {out / 'report.md'}")
    return summary


def map_cells(cells: list[Cell], workers: int):
    """``run_cell`` over ``cells``, in this process or a spawned pool, results as they finish."""
    if workers <= 1:
        yield from map(run_cell, cells)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(run_cell, cells)


def plan_text(protocol: Protocol, cells: list[Cell]) -> str:
    searched = [c for c in cells if protocol.fixed_lr(c.task, c.strategy) is None]
    plan = f"{len(cells) * len(protocol.seeds)} runs"
    if searched and len(protocol.lrs) > 1:
        plan = (f"{len(searched) * len(protocol.search_seeds) * len(protocol.lrs)} lr-search runs (more if a grid "
                f"is extended) + {plan}")
    return plan


def cell_line(res: dict, done: int, total: int, start: float) -> str:
    return (f"[{done}/{total}] {res['task']} {res['strategy']}: lr {res['lr']:g} (grid {', '.join(f'{x:g}' for x in res['grid'])}"
            f"{', EDGE' if res['edge'] else ''}) {res['wall_s']:.0f} s; {(time.time() - start) / 60:.1f} min so far")


def check_protocol(out: Path, protocol: Protocol) -> None:
    path = out / "protocol.json"
    current = json.loads(json.dumps(asdict(protocol)))
    if path.is_file():
        old = json.loads(path.read_text())
        if old != current:
            diff = sorted(k for k in current if old.get(k) != current[k])
            raise ValueError(f"{out} holds a benchmark with another protocol (differs in {', '.join(diff)}); "
                             "use a new output directory")
    path.write_text(json.dumps(current, indent=2) + "\n")
