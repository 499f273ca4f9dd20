"""Peak memory and step time of layer-selection strategies on GPT-2 language models (CPU).

    python benchmarks/memory_llm.py                               # the table: 124M, 355M, 774M x every variant
    python benchmarks/memory_llm.py --sizes 124M --variants full bvgls-fused      # a quick look
    python benchmarks/memory_llm.py --grow                        # the largest model full AdamW / bvgls-fused train

Hugging Face ``GPT2LMHeadModel`` built from a ``GPT2Config`` (random init: memory and time do not
depend on the weights), float32, torch ``AdamW`` (lr 1e-5) over ``bvgls.layer_groups`` (embeddings,
each block, final norm; GPT-2's output layer is the tied token embedding), one sequence of 256
random tokens per step, next-token loss. Every (size, variant) runs in a **fresh child process**:
one warm-up optimizer step, then ``--steps`` timed optimizer steps (forward, backward, step).

Memory: the child's peak RSS (``ru_maxrss`` from ``os.wait4``, the kernel's high-water mark of
the process: weights, gradients, optimizer and strategy state, activations, Python and library
overhead). The parent polls the child's RSS every 50 ms and kills it above ``--cap-gib`` (default
18 GiB) or when the machine's available memory falls below ``--reserve-gib`` (0.25 GiB); the child
also sets its ``oom_score_adj`` to 1000, so that the kernel's out-of-memory killer picks it before any
other process. Such a run is reported as "over cap" / "machine low on memory" / "killed by the
kernel" = did not complete. Variants run one at a time.

Time: wall and CPU seconds per timed step. For ``probe=P`` variants the timed steps after the
warm-up are not probe steps (the warm-up is the probe); their per-step time is also reported
amortized over a probe period, ``(t_warm-up + (P - 1) * t_step) / P``, which overstates it a
little (the warm-up also pays first-call costs).

Variants: ``full`` (AdamW on everything), ``bvgls`` (the paper), the lean spec, the fused
preset ``bvgls-fused`` (= ``bvgls:fused=true:probe=10:release_state=true:ema=bfloat16``), its
``probe=1`` form, ``lisa``, ``bcd-cyclic`` (BAdam-like) and ``last`` (the last block and the
final norm only; spelled ``L<n-1>-<n>``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time

#: GPT-2 configurations: name -> (n_layer, n_embd, n_head); any "<layers>x<width>" also works
SIZES = {"124M": (12, 768, 12), "355M": (24, 1024, 16), "774M": (36, 1280, 20), "1.5B": (48, 1600, 25)}
VARIANTS = [
    "full",
    "bvgls",
    "bvgls:probe=10:release_state=true:ema=bfloat16",
    "bvgls-fused",
    "bvgls-fused:probe=1",
    "lisa",
    "bcd-cyclic",
    "last",
]
#: the ladder --grow climbs for each of GROW_VARIANTS until a size does not complete
GROW = ["44x1280", "1.5B", "40x2048", "48x2048", "56x2048"]
GROW_VARIANTS = ["full", "bvgls-fused"]


def size_config(size: str) -> tuple[int, int, int]:
    if size in SIZES:
        return SIZES[size]
    layers, _, width = size.partition("x")
    width_i = int(width)
    return int(layers), width_i, max(1, width_i // 64)


# ---------------------------------------------------------------------- the child
def build(size: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_embd, n_head = size_config(size)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=1024, use_cache=False)
    return GPT2LMHeadModel(config)


def strategy_spec(variant: str, num_groups: int) -> str:
    return f"L{num_groups - 1}-{num_groups}" if variant == "last" else variant


def volunteer_for_oom_killer() -> None:
    """Ask the kernel to kill this process first if the machine runs out of memory, so that an
    out-of-memory never hits the other processes (raising one's own score needs no privilege)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def measure(args) -> dict:
    import torch

    import bvgls

    volunteer_for_oom_killer()

    torch.set_num_threads(args.threads)
    model = build(args.size)
    model.train()
    groups = bvgls.layer_groups(model)
    opt = torch.optim.AdamW(groups.param_groups(), lr=1e-5)
    strategy = bvgls.make_strategy(strategy_spec(args.worker, len(groups)), opt, groups)
    gen = torch.Generator().manual_seed(1)
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    walls, cpus, hwm, trained = [], [], [], []
    for _ in range(1 + args.steps):
        ids = torch.randint(0, model.config.vocab_size, (1, args.seq), generator=gen)
        t0, c0 = time.perf_counter(), time.process_time()
        model(input_ids=ids, labels=ids).loss.backward()
        strategy.step()
        opt.zero_grad(set_to_none=True)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        hwm.append((read_kib("/proc/self/status", "VmHWM") or 0) / 2**20)  # the peak so far, after each step
        trained.append(strategy.describe_selection())
    state = strategy.state_bytes()
    return {
        "size": args.size,
        "variant": args.worker,
        "params": sum(p.numel() for p in model.parameters()),
        "groups": len(groups),
        "wall_s": walls,
        "cpu_s": cpus,
        "probe": getattr(strategy, "probe", 1),
        "peak_rss_gib_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_after_build_gib": rss_built,
        "optimizer_state_gib": sum(state["optimizer"].values()) / 2**30,
        "strategy_state_gib": sum(state["strategy"].values()) / 2**30,
        "updates": sum(strategy.counts),
        "peak_after_step_gib": hwm,
        "trained": trained,
    }


# ---------------------------------------------------------------------- the parent
def read_kib(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_child(size: str, variant: str, args) -> dict:
    """One (size, variant) in a fresh process, killed above the cap; its figures or why it stopped."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--size",
        size,
        "--steps",
        str(args.steps),
        "--seq",
        str(args.seq),
        "--threads",
        str(args.threads),
    ]
    out_path = os.path.join(args.tmp, f"child-{os.getpid()}.json")
    with open(out_path, "w") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
    killed = None
    cap_kib, reserve_kib = args.cap_gib * 2**20, args.reserve_gib * 2**20
    available = read_kib("/proc/meminfo", "MemAvailable") or 0  # what the machine's other jobs left free
    t0 = time.perf_counter()
    while True:  # os.wait4 (not Popen.poll) reaps the child: its rusage holds the peak RSS
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        rss = read_kib(f"/proc/{child.pid}/status", "VmRSS") or 0
        avail = read_kib("/proc/meminfo", "MemAvailable") or cap_kib
        if not killed and (rss > cap_kib or avail < reserve_kib):
            killed = f"over cap ({args.cap_gib} GiB)" if rss > cap_kib else "machine low on memory"
            os.kill(child.pid, signal.SIGKILL)
        time.sleep(0.05)
    child.returncode = status
    stderr = child.stderr.read()
    base = {
        "size": size,
        "variant": variant,
        "peak_rss_gib": usage.ru_maxrss / 2**20,
        "available_gib_at_start": available / 2**20,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if killed or status != 0:
        reason = killed or ("killed by the kernel (OOM?)" if os.WIFSIGNALED(status) else stderr.strip()[-800:])
        return {**base, "completed": False, "reason": reason}
    with open(out_path) as f:
        return {**json.loads(f.read().strip().splitlines()[-1]), **base, "completed": True}


def per_step(r: dict) -> tuple[float, float, float]:
    """Mean wall and CPU seconds of the timed steps, and the wall time amortized over a probe period."""
    walls, cpus = r["wall_s"][1:], r["cpu_s"][1:]
    wall, cpu = sum(walls) / len(walls), sum(cpus) / len(cpus)
    p = r["probe"]
    amortized = (r["wall_s"][0] + (p - 1) * wall) / p if p > 1 else wall
    return wall, cpu, amortized


def row(r: dict, full: dict | None) -> str:
    if not r["completed"]:
        return f"| {r['size']} | {r['variant']} | - | did not complete: {r['reason']} | | | | | | |"
    wall, cpu, amort = per_step(r)
    ref = full if full and full["completed"] else None
    ratio = (lambda a, b: f"{a / b:.2f}") if ref else (lambda a, b: "-")
    fw, fc, fa = per_step(ref) if ref else (1, 1, 1)
    return (
        f"| {r['size']} | {r['variant']} | {r['params'] / 1e6:.0f}M | {r['peak_rss_gib']:.2f} | "
        f"{ratio(r['peak_rss_gib'], ref['peak_rss_gib'] if ref else 1)} | "
        f"{r['optimizer_state_gib']:.2f} | {r['strategy_state_gib']:.2f} | {wall:.2f} ({ratio(wall, fw)}) | "
        f"{cpu:.2f} ({ratio(cpu, fc)}) | {amort:.2f} ({ratio(amort, fa)}) |"
    )


HEADER = (
    "| size | variant | params | peak RSS GiB | x full | opt state GiB | stats GiB | wall s/step (x full) | "
    "CPU s/step (x full) | amortized wall s/step (x full) |\n|---|---|---|---|---|---|---|---|---|---|"
)


def describe_machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return f"{model}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start"


def report(results: list[dict], log) -> None:
    full_of = {r["size"]: r for r in results if r["variant"] == "full" and r["completed"]}
    print(HEADER, file=log)
    for r in results:
        print(row(r, full_of.get(r["size"])), file=log)
    log.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", default=["124M", "355M", "774M"])
    ap.add_argument("--variants", nargs="*", default=VARIANTS)
    ap.add_argument("--grow", action="store_true", help="climb GROW for full and bvgls-fused until a size fails")
    ap.add_argument("--grow-sizes", nargs="*", default=GROW)
    ap.add_argument("--grow-variants", nargs="*", default=GROW_VARIANTS)
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps after one warm-up step")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cap-gib", type=float, default=18.0)
    ap.add_argument(
        "--reserve-gib",
        type=float,
        default=0.25,
        help="also kill the child when the machine's available memory falls below this",
    )
    ap.add_argument("--json", help="append every result to this JSON-lines file")
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--table", nargs="*", help="print the table of these --json files and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure(args)))
        return
    if args.table:
        report([json.loads(line) for path in args.table for line in open(path) if line.strip()], sys.stdout)
        return
    print(f"# {describe_machine()}; cap {args.cap_gib} GiB; torch threads {args.threads}", flush=True)
    plan = (
        [(s, v) for v in args.grow_variants for s in args.grow_sizes]
        if args.grow
        else [(s, v) for s in args.sizes for v in args.variants]
    )
    results, failed = [], set()
    for size, variant in plan:
        if args.grow and variant in failed:
            continue
        r = run_child(size, variant, args)
        results.append(r)
        if not r["completed"]:
            failed.add(variant)
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    report(results, sys.stdout)


if __name__ == "__main__":
    main()
