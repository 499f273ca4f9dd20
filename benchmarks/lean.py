"""Lean selection: per-step wall time and peak memory of each strategy, side by side.

    python benchmarks/lean.py                                   # the reference: batch 16 at 160 px, 40 steps
    python benchmarks/lean.py --batch 4 --size 64 --steps 8     # a smoke run (a few minutes on 2 cores)

torchvision ``wide_resnet50_2`` (weights=None: random weights, which is fine for timing),
split into the paper's 6 groups, SGD (momentum 0.9, Nesterov, weight decay 5e-4), random
inputs, CPU, ``--threads`` threads (default 2). Every variant runs in a **fresh
subprocess**, so its peak RSS (``ru_maxrss``) is its own: model, activations, gradients,
optimizer state and the strategy's statistics. Per variant: mean wall time per optimizer
step (forward + backward + step; ``--warmup`` untimed forward/backward passes come first and
take no step, so the strategy's first step, a probe step, is timed too: the mean is what a
run pays), the same in process CPU time (all threads; less sensitive than wall time to other
load on a shared machine), peak RSS, the optimizer and strategy state allocated at
the end (``strategy.state_bytes()``), and how often each group was updated (the saving
depends on it). Ratios are against ``full`` of the same run.

A variant ``SPEC@N`` runs every step whose backward runs through the whole network (the
first group trains: every step of ``full`` and paper ``bvgls``, the probe steps of lean
``bvgls`` and its steps that train the stem) in ``N`` chunks of the batch, backward one at
a time (the runner's ``full_backward_chunks``): the same gradient at a lower activation peak. The memory options of
lean BVG-LS are spec options:
``release_state=true`` (a frozen group's optimizer state is freed) and ``ema=bfloat16``
(the statistics buffer in bfloat16); ``--memory`` runs the variants that compare them.

The K of lisa and bcd-cyclic is ``--steps // 6`` by default (their defaults, 20 and 50,
would leave a short run on one draw / one block), the static probe fixes its groups
after ``--steps // 4`` steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def variants(steps: int, block: int | None) -> list[str]:
    k = block or max(1, steps // 6)
    return [
        "full",
        "bvgls",
        "bvgls:probe=5",
        "bvgls:probe=10",
        "bvgls:probe=20",
        f"bvgls:static={max(1, steps // 4)}",
        f"lisa:K={k}",
        f"bcd-cyclic:K={k}",
        "L4-6",
        "linear",
    ]


def memory_variants() -> list[str]:
    """Full finetuning against lean BVG-LS with each memory option, alone and together."""
    lean = "bvgls:probe=10"
    return [
        "full",
        "full@4",
        "bvgls",
        lean,
        f"{lean}:release_state=true",
        f"{lean}:ema=bfloat16",
        f"{lean}:release_state=true:ema=bfloat16",
        f"{lean}:release_state=true:ema=bfloat16@4",
        "L5-6",
    ]


def measure(variant: str, args) -> dict:
    """One variant, in this process: the figures as a dict."""
    import torch
    import torchvision

    import bvgls

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.wide_resnet50_2(weights=None, num_classes=args.classes)
    groups = bvgls.layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    spec, _, chunks = variant.partition("@")
    chunks = int(chunks or 1)
    strategy = bvgls.make_strategy(spec, opt, groups)
    gen = torch.Generator().manual_seed(1)
    times, cpu_times = [], []
    for step in range(args.warmup + args.steps):
        x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
        y = torch.randint(0, args.classes, (args.batch,), generator=gen)
        t0, c0 = time.perf_counter(), time.process_time()
        parts = chunks if strategy.backward_reaches_first_group() else 1  # as the runner's full_backward_chunks
        for xc, yc in zip(x.chunk(parts), y.chunk(parts)):
            (torch.nn.functional.cross_entropy(model(xc), yc) * (len(yc) / len(y))).backward()
        if step < args.warmup:  # warm-up: forward and backward only, so the strategy's schedule
            opt.zero_grad(set_to_none=True)  # (probe steps, draws, blocks) starts at the first timed step
            continue
        strategy.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    state = strategy.state_bytes()
    strategy.remove()
    return {
        "spec": variant,
        "step_s": statistics.fmean(times),
        "step_s_median": statistics.median(times),
        "cpu_s": statistics.fmean(cpu_times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "optimizer_state_mb": sum(state["optimizer"].values()) / 2**20,
        "strategy_state_mb": sum(state["strategy"].values()) / 2**20,
        "groups": list(strategy.group_names),
        "frequency": strategy.selection_frequency(),
    }


def table(results: list[dict]) -> str:
    full = next((r for r in results if r["spec"] == "full"), results[0])
    names = results[0]["groups"]
    head = (
        "| strategy | step s | x full | CPU s | x full | peak RSS MB | x full | opt state MB | stats MB | "
        + " | ".join(f"{n}" for n in names)
        + " |"
    )
    lines = [head, "|" + "---|" * (9 + len(names))]
    for r in results:
        freq = " | ".join(f"{f:.2f}" for f in r["frequency"])
        lines.append(
            f"| {r['spec']} | {r['step_s']:.3f} | {r['step_s'] / full['step_s']:.2f} | "
            f"{r['cpu_s']:.3f} | {r['cpu_s'] / full['cpu_s']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / full['peak_rss_mb']:.2f} | "
            f"{r['optimizer_state_mb']:.0f} | {r['strategy_state_mb']:.0f} | {freq} |"
        )
    return "\n".join(lines)


def run_variants(script: str, specs: list[str]) -> list[dict]:
    """Measure each spec in a fresh process (``script --worker SPEC``), so peak RSS is its own."""
    results = []
    for spec in specs:
        out = subprocess.run(
            [sys.executable, script, *sys.argv[1:], "--worker", spec], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            sys.exit(f"error: {spec} failed:\n{out.stderr[-2000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{spec}: {results[-1]['step_s']:.3f} s/step, {results[-1]['peak_rss_mb']:.0f} MB", file=sys.stderr)
    return results


def write_json(args, results: list[dict]) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--steps", type=int, default=40, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--block", type=int, help="K of lisa / bcd-cyclic (default: steps // 6)")
    ap.add_argument("--only", nargs="*", help="run only these variants (SPEC or SPEC@CHUNKS)")
    ap.add_argument("--memory", action="store_true", help="run the memory-option variants")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return
    chosen = args.only or (memory_variants() if args.memory else variants(args.steps, args.block))
    results = run_variants(__file__, chosen)
    print(
        f"wide_resnet50_2, batch {args.batch} at {args.size} px, {args.steps} steps (+{args.warmup} warm-up), "
        f"{args.threads} threads, CPU"
    )
    print(table(results))
    write_json(args, results)


if __name__ == "__main__":
    main()
