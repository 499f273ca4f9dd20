"""Step time of the paper mode (``bvgls``) against full finetuning on ``fmnist-resnet``, for
one or more versions of the library side by side, interleaved.

    python benchmarks/paper_step_time.py                           # this checkout
    python benchmarks/paper_step_time.py --src src --src /tmp/old/src --rounds 5

Each (source tree, strategy) runs in its own process (``PYTHONPATH=<src>``), ``--steps``
optimizer steps of SGD (momentum 0.9, Nesterov, weight decay 5e-4) on random 28x28 batches
of ``--batch`` images after 5 warm-up steps, through ``bvgls.make_strategy(spec, optimizer,
layer_groups(model))`` and ``strategy.step()``; the variants alternate round by round, so a
machine shared with other jobs slows them alike. Reported per variant: the median wall and CPU
time of a step over all rounds, and per source tree the ratio bvgls / full of those medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WARMUP = 5


def fmnist_resnet():
    for module in ("bvgls_lab.source_model", "bvgls.bench.source_model"):
        try:
            return __import__(module, fromlist=["FMNISTResNet"]).FMNISTResNet(10)
        except ImportError:
            continue
    raise ImportError("no fmnist-resnet (FMNISTResNet) in this bvgls")


def worker(spec: str, steps: int, batch: int) -> dict:
    import torch

    import bvgls

    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    model = fmnist_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    strategy = bvgls.make_strategy(spec, opt, bvgls.layer_groups(model))
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    wall, cpu = [], []
    for i in range(WARMUP + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        strategy.step()
        if i >= WARMUP:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"wall": wall, "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", action="append", help="source tree(s) to put on PYTHONPATH (default: src)")
    ap.add_argument("--strategies", default="full,bvgls")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per process")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch)))
        return
    sources = [os.path.abspath(s) for s in (args.src or ["src"])]
    specs = args.strategies.split(",")
    times: dict[tuple[str, str], dict[str, list[float]]] = {
        (s, p): {"wall": [], "cpu": []} for s in sources for p in specs
    }
    for r in range(args.rounds):
        for src in sources if r % 2 == 0 else sources[::-1]:
            for spec in specs if r % 2 == 0 else specs[::-1]:
                env = {**os.environ, "PYTHONPATH": src}
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        spec,
                        "--steps",
                        str(args.steps),
                        "--batch",
                        str(args.batch),
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                got = json.loads(out.stdout.strip().splitlines()[-1])
                times[(src, spec)]["wall"] += got["wall"]
                times[(src, spec)]["cpu"] += got["cpu"]
    print(
        f"fmnist-resnet, batch {args.batch}, {args.rounds} rounds x {args.steps} steps, threads {got['threads']}, "
        f"torch {got['torch']}"
    )
    for src in sources:
        med = {p: {k: statistics.median(v) * 1e3 for k, v in times[(src, p)].items()} for p in specs}
        for p in specs:
            print(f"{src}  {p:>8}: median step {med[p]['wall']:.2f} ms wall, {med[p]['cpu']:.2f} ms CPU")
        for p in specs[1:]:
            print(
                f"{src}  {p} / {specs[0]}: {med[p]['wall'] / med[specs[0]]['wall']:.3f}x wall, "
                f"{med[p]['cpu'] / med[specs[0]]['cpu']:.3f}x CPU"
            )


if __name__ == "__main__":
    main()
