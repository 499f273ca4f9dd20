"""The recorded seed-to-seed spread of the demo's cells, shown next to its single-seed table.

``demo_spread.json`` (next to this module) holds, per demo suite, the mean, standard deviation
and number of seeds of each (task, strategy) cell's final runs in the recorded benchmark
(:data:`SOURCES`, under docs/); :func:`compute_spread` rebuilds it from those files and a test
checks that the two agree.
"""

from __future__ import annotations

import csv
import json
import os
import statistics

SPREAD_FILE = os.path.join(os.path.dirname(__file__), "demo_spread.json")
#: demo suite -> the recorded runs its cells come from (relative to docs/)
SOURCES = {"pretrained": "results/pretrained/mobilenet_v2/runs.csv", "fmnist": "results/offline/runs.csv"}


def compute_spread(suite: str, cells: list[tuple[str, str]], docs: str) -> list[dict]:
    """Mean, sd and seeds of the recorded final runs of each (task, strategy) in ``cells``."""
    errors: dict[tuple[str, str], list[float]] = {}
    with open(os.path.join(docs, SOURCES[suite])) as f:
        for row in csv.DictReader(f):
            key = (row["dataset"], row["strategy"])
            if key in cells and row.get("phase", "final") == "final" and row["test_error"]:
                errors.setdefault(key, []).append(float(row["test_error"]))
    return [
        {
            "task": t,
            "strategy": s,
            "mean": statistics.mean(errors[(t, s)]),
            "sd": statistics.stdev(errors[(t, s)]) if len(errors[(t, s)]) > 1 else None,
            "seeds": len(errors[(t, s)]),
            "source": SOURCES[suite],
        }
        for t, s in cells
        if (t, s) in errors
    ]


def recorded_spread(suite: str) -> list[dict]:
    with open(SPREAD_FILE) as f:
        return json.load(f).get(suite, [])


def spread_text(suite: str) -> str:
    """Lines for the demo's output: the recorded mean ± sd over seeds of its cells."""
    rows = recorded_spread(suite)
    if not rows:
        return ""
    lines = [
        f"Recorded seed-to-seed spread of these cells (final runs, docs/{rows[0]['source']}; test error %, "
        "mean ± sd over seeds): one seed is not a result, and per-seed numbers differ across CPUs."
    ]
    for r in rows:
        sd = "" if r["sd"] is None else f" ± {r['sd']:.2f}"
        lines.append(f"  {r['task']:<16} {r['strategy']:<8} {r['mean']:6.2f}{sd}  ({r['seeds']} seeds)")
    return "\n".join(lines)
