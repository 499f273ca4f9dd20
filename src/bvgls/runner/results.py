"""The results of a compare directory: finished runs read back as rows (``runs/**/result.json``
or ``results.csv``), the lr each (dataset, strategy) is reported at, and the names runs and lrs are
written under. Shared by the grid that writes them, the plots and the lr-sensitivity table that
read them, so that none of those needs another."""

from __future__ import annotations

import csv
import math
import os
import re
import statistics
from collections.abc import Mapping, Sequence

from . import rundir


def slug(text: str) -> str:
    """A directory-safe form of a strategy spec or dataset label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace(":", "__").replace("=", "-")).strip("_") or "_"


def lr_text(lr: float) -> str:
    """``lr`` short (``:g``) where that is exact, else in full: lrs that differ beyond 6 significant
    digits get different run directories, and the usual ones keep their names (``lr0.01``)."""
    short = f"{lr:g}"
    return short if float(short) == lr else repr(float(lr))


def collect_results(out_dir: str) -> list[dict]:
    """One row per finished run under ``out_dir/runs`` (``chosen`` not yet set)."""
    rows = []
    root = os.path.join(out_dir, "runs")
    for dirpath, _, files in sorted(os.walk(root)):
        if "result.json" not in files:
            continue
        result = rundir.read_json(os.path.join(dirpath, "result.json"))
        cfg, final = result["config"], result["final"]
        rows.append(
            {
                "dataset": cfg.get("dataset", "?"),
                "strategy": cfg["strategy"],
                "seed": int(cfg["seed"]),
                "lr": float(cfg["lr"]),
                "test_error": final.get("test_error"),
                "test_loss": final.get("test_loss"),
                "val_error": final.get("val_error"),
                "val_loss": final.get("val_loss"),
                "train_loss": final.get("train_loss"),
                "epochs": int(final["epoch"]),
                "wall_s": round(float(result.get("wall_s", 0.0)), 2),
                "phase": cfg.get("phase", "final"),
                "chosen": False,
                "diverged": bool(result.get("diverged", False)),
                "run_dir": os.path.relpath(dirpath, out_dir),
            }
        )
    return rows


def choose_lrs(rows: Sequence[dict], tie_break: str = "lr") -> dict[tuple[str, str], float]:
    """Per (dataset, strategy): the search lr with the lowest mean validation error over seeds
    (a diverged run counts as infinitely bad; ties: the smaller lr, or with ``tie_break="val_loss"``
    first the lower mean validation loss). Cells without a search have the single lr they ran with."""
    cells: dict[tuple[str, str], dict[float, list[tuple[float, float]]]] = {}
    for r in rows:
        if r["phase"] == "search" and (r["val_error"] is not None or r.get("diverged")):
            error = math.inf if r.get("diverged") else r["val_error"]
            loss = r["val_loss"] if r.get("val_loss") is not None and not r.get("diverged") else math.inf
            cells.setdefault((r["dataset"], r["strategy"]), {}).setdefault(r["lr"], []).append((error, loss))

    def rank(runs: list[tuple[float, float]], lr: float) -> tuple[float, ...]:
        error = statistics.fmean(e for e, _ in runs)
        return (error, statistics.fmean(v for _, v in runs), lr) if tie_break == "val_loss" else (error, lr)

    chosen = {cell: min(by_lr, key=lambda lr: rank(by_lr[lr], lr)) for cell, by_lr in cells.items()}
    single: dict[tuple[str, str], dict[float, str]] = {}
    for r in rows:
        if r["phase"] == "final" and (r["dataset"], r["strategy"]) not in cells:
            single.setdefault((r["dataset"], r["strategy"]), {}).setdefault(r["lr"], r.get("run_dir", "?"))
    for cell, lrs in single.items():
        if len(lrs) > 1:  # choosing among them by test error would tune on the test set
            raise ValueError(
                f"{cell[0]} / {cell[1]} has runs at several lrs without a validation search "
                f"({', '.join(lrs[lr] for lr in sorted(lrs))}); remove all but one, put them in "
                "separate --out directories or use --lrs with --val-fraction"
            )
        chosen[cell] = next(iter(lrs))
    return chosen


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


def read_results(csv_path: str | os.PathLike) -> list[dict]:
    """``results.csv`` back as typed rows."""
    rows = []
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            for k in ("test_error", "test_loss", "val_error", "val_loss", "train_loss", "lr", "wall_s"):
                r[k] = float(r[k]) if r.get(k) not in (None, "") else None
            r["seed"], r["epochs"] = int(r["seed"]), int(r["epochs"])
            r["chosen"] = r["chosen"] == "True"
            r["diverged"] = r.get("diverged") == "True"
            rows.append(r)
    return rows
