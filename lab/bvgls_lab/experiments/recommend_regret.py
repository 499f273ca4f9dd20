"""How much does following ``bvgls recommend`` cost? Its recommendation's regret on the recorded benchmarks.

For every task of the recorded benchmarks (the offline benchmark's five tasks, the pretrained
benchmark's MobileNetV2 and EfficientNet-Lite0 tasks), each rule below turns a probe report
(``bvgls recommend --json``, several seeds) into a fixed range ``L<a>-<L>``; its **regret** is that
range's recorded mean test error minus the best recorded range's (``full`` = ``L1-<L>`` and
``linear`` = ``L<L>-<L>`` count as ranges). A range the benchmark did not run has no regret
(shown as "not run"). Usage::

    python -m bvgls_lab.experiments.recommend_regret --probes DIR [--out FILE.md]

where ``DIR`` holds ``<model>-<task>_seed<s>.json`` (offline tasks: ``offline-<task>_seed<s>.json``).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from bvgls.recommend import frequency_of, recommend_range

DOCS = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, os.pardir, "docs")


@dataclass(frozen=True)
class Task:
    label: str  # the probe files' prefix
    runs_csv: str  # recorded runs, relative to docs/
    dataset: str  # the dataset column in runs.csv
    groups: int


TASKS = [
    Task(f"offline-{t}", "results/offline/runs.csv", t, 6)
    for t in ("digits", "fmnist-invert", "fmnist-noise", "fmnist-pairs", "font-letters")
] + [
    Task("mobilenet_v2-clipart-fine", "results/pretrained/mobilenet_v2/runs.csv", "clipart-fine", 10),
    Task("mobilenet_v2-clipart-coarse", "results/pretrained/mobilenet_v2/runs.csv", "clipart-coarse", 10),
    Task("efficientnet_lite0-clipart-fine", "results/pretrained/efficientnet_lite0/runs.csv", "clipart-fine", 9),
]


def recorded_ranges(task: Task, docs: str = DOCS) -> dict[int, float]:
    """``{a: mean final test error of L<a>-<L>}`` over the recorded final runs."""
    errors: dict[int, list[float]] = {}
    with open(os.path.join(docs, task.runs_csv)) as f:
        for row in csv.DictReader(f):
            if row["dataset"] != task.dataset or row.get("phase", "final") != "final" or not row["test_error"]:
                continue
            name = row["strategy"]
            m = re.fullmatch(r"L(\d+)-(\d+)", name)
            a = (
                1
                if name == "full"
                else task.groups
                if name == "linear"
                else int(m.group(1))
                if m and int(m.group(2)) == task.groups
                else None
            )
            if a is not None:
                errors.setdefault(a, []).append(float(row["test_error"]))
    return {a: statistics.mean(v) for a, v in sorted(errors.items())}


def first_group(spec: str) -> int:
    return int(re.fullmatch(r"L(\d+)-\d+", spec).group(1))


# ---------------------------------------------------------------------- rules: probe report -> a
def coverage_rule(report: dict) -> int:
    """The shortest range ending at the head holding 80% of the selections (the old rule)."""
    return first_group(recommend_range(report["frequency"], 0.8))


def halves_rule(report: dict) -> int:
    """The coverage rule on each half of the steps; the longer of the two ranges."""
    n = len(report["groups"])
    half = len(report["selections"]) // 2
    parts = (report["selections"][:half], report["selections"][half:])
    return min(first_group(recommend_range(frequency_of(p, n), 0.8)) for p in parts if p)


def uniform_share_rule(report: dict) -> int:
    """From the lowest group selected at least its uniform share (1 / groups) of the steps."""
    n = len(report["groups"])
    return next(i + 1 for i, f in enumerate(report["frequency"]) if f >= 1 / n - 1e-12)


def last_half_rule(report: dict) -> int:
    """No probe: the last half of the groups (rounded up)."""
    n = len(report["groups"])
    return n - math.ceil(n / 2) + 1


def full_rule(report: dict) -> int:
    """No probe: full finetuning."""
    return 1


RULES: dict[str, Callable[[dict], int]] = {
    "coverage 80%": coverage_rule,
    "halves": halves_rule,
    "uniform share": uniform_share_rule,
    "last half": last_half_rule,
    "full": full_rule,
}


def task_rows(task: Task, probes: str, docs: str = DOCS) -> dict:
    recorded = recorded_ranges(task, docs)
    reports = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(probes, f"{task.label}_seed*.json")))]
    best_a = min(recorded, key=recorded.get)
    row = {
        "task": task.label,
        "recorded": recorded,
        "best": (best_a, recorded[best_a]),
        "seeds": len(reports),
        "rules": {},
    }
    for name, rule in RULES.items():
        picks = [rule(r) for r in reports] if reports else []
        regrets = [recorded[a] - recorded[best_a] for a in picks if a in recorded]
        row["rules"][name] = {
            "picks": picks,
            "regret": statistics.mean(regrets) if regrets else None,
            "not_run": sum(a not in recorded for a in picks),
        }
    return row


def table(rows: list[dict]) -> str:
    names = list(RULES)
    lines = [
        "| task | recorded ranges: mean test error | best | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for row in rows:
        n = next(t.groups for t in TASKS if t.label == row["task"])
        recorded = ", ".join(f"L{a}-{n} {e:.2f}" for a, e in row["recorded"].items())
        cells = []
        for name in names:
            r = row["rules"][name]
            picks = "/".join(f"L{a}" for a in r["picks"]) or "-"
            regret = "not run" if r["regret"] is None else f"{r['regret']:+.2f}"
            extra = f" ({r['not_run']} not run)" if r["not_run"] and r["regret"] is not None else ""
            cells.append(f"{picks}: {regret}{extra}")
        lines.append(
            f"| {row['task']} | {recorded} | L{row['best'][0]}-{n} {row['best'][1]:.2f} | " + " | ".join(cells) + " |"
        )
    means = []
    for name in names:
        vals = [row["rules"][name]["regret"] for row in rows if row["rules"][name]["regret"] is not None]
        means.append(f"{statistics.mean(vals):+.2f} over {len(vals)} tasks" if vals else "-")
    lines.append("| **mean regret** | | | " + " | ".join(means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="regret of bvgls recommend's range on the recorded benchmarks")
    parser.add_argument("--probes", required=True, help="directory of bvgls recommend --json files")
    parser.add_argument("--out", help="write the markdown table here (default: print)")
    args = parser.parse_args(argv)
    text = table([task_rows(t, args.probes) for t in TASKS])
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
