"""Peer layer-selection strategies on the offline benchmark (the frozen protocol of docs/experiments/offline.md).

    python -m bvgls_lab.experiments.peers --out peers-out                    # 3 tasks x 9 strategies x 5 seeds
    python -m bvgls_lab.experiments.peers --out peers-out --reuse bench-out  # reuse the runs of `bvgls-lab bench`

Same model, tasks, training and lr search as ``bvgls-lab bench``, with the strategies
full, linear, L4-6, bvgls, auto-rgn, lisa, bcd-cyclic, gradual-unfreeze and llrd, on one task
per kind of shift (the first of each in the suite's order). ``--reuse DIR`` copies the
finished runs of strategies both share from a ``bvgls-lab bench`` output directory; the runner
skips finished runs, so the results are the same as running them again.
"""

import argparse
import shutil
from dataclasses import replace
from pathlib import Path

from bvgls_lab.experiments.protocols import BENCH
from bvgls_lab.experiments.run import run_benchmark

PEERS = replace(
    BENCH,
    tasks=("fmnist-invert", "digits", "fmnist-pairs"),
    strategies=("full", "linear", "L4-6", "bvgls", "auto-rgn", "lisa", "bcd-cyclic", "gradual-unfreeze", "llrd"),
)


def reuse_runs(source: Path, out: Path) -> None:
    for phase in ("search", "final"):
        for task in PEERS.tasks:
            for strategy in PEERS.strategies:
                src = source / phase / "runs" / task / strategy
                dst = out / phase / "runs" / task / strategy
                if src.is_dir() and not dst.exists():
                    shutil.copytree(src, dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("peers-out"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reuse", type=Path, help="a `bvgls-lab bench` output directory")
    args = ap.parse_args()
    if args.reuse:
        reuse_runs(args.reuse, args.out)
    run_benchmark(args.out, PEERS, workers=args.workers)


if __name__ == "__main__":
    main()
