"""Lean selection through the Hugging Face Trainer: per-step wall time of each strategy, side by side.

    python benchmarks/lean_hf.py                                  # 6 layers, 256 wide, seq 128, 200 steps
    python benchmarks/lean_hf.py --steps 20 --layers 2 --width 64  # a smoke run

A randomly initialised GPT-2-style causal LM from a ``GPT2Config`` (``--layers`` blocks,
``--width`` wide, ``--heads`` heads, context ``--seq``, a ``--vocab``-token vocabulary),
trained by ``transformers.Trainer`` (AdamW, lr 1e-4, no gradient clipping, no logging or
checkpoints) on uniformly random token sequences, CPU, ``--threads`` threads. Each variant
runs in a **fresh subprocess** (peak RSS is its own): ``full`` is the plain Trainer, the
others attach the strategy with ``bvgls.integrations.hf.attach`` (layer groups:
embeddings, each block, final norm + head). Per variant: mean wall time per optimizer step
over the steps after ``--warmup`` untimed ones (timed from the end of step ``warmup`` to the
end of the last step: forward, backward, strategy and optimizer step, data loading), the
same in process CPU time (less sensitive to other load on a shared machine), peak RSS, and
how often each group was updated. Ratios are against ``full`` of the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from lean import run_variants, write_json  # benchmarks/ is on sys.path when run as a script

VARIANTS = ["full", "bvgls", "bvgls:probe=10", "lisa", "linear"]


def measure(spec: str, args) -> dict:
    """One variant, in this process: the figures as a dict."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=args.layers, n_embd=args.width, n_head=args.heads, n_positions=args.seq, vocab_size=args.vocab
    )
    model = GPT2LMHeadModel(config)
    total = args.warmup + args.steps
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (total * args.batch, args.seq), generator=g)
    data = [{"input_ids": t, "labels": t} for t in tokens]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks = {}

        def on_step_end(self, a, state, control, **kwargs):
            self.marks[state.global_step] = (time.perf_counter(), time.process_time())

    clock = StepClock()
    train_args = TrainingArguments(
        output_dir=args.scratch,
        max_steps=total,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-4,
        max_grad_norm=0.0,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=train_args, train_dataset=data, callbacks=[clock])
    callback = None
    if spec != "full":
        from bvgls.integrations.hf import attach

        callback = attach(trainer, spec)
    frequency, groups = [], []
    if callback is not None:  # read the strategy before the callback detaches it at the end

        class Keep(TrainerCallback):
            def on_train_end(self, a, state, control, **kwargs):
                frequency.extend(callback.strategy.selection_frequency())
                groups.extend(callback.strategy.group_names)

        trainer.add_callback(Keep())
        trainer.callback_handler.callbacks.insert(0, trainer.callback_handler.callbacks.pop())
    trainer.train()
    (wall1, cpu1), (wall0, cpu0) = clock.marks[total], clock.marks[args.warmup]
    return {
        "spec": spec,
        "step_s": (wall1 - wall0) / args.steps,
        "cpu_s": (cpu1 - cpu0) / args.steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "groups": groups,
        "frequency": frequency,
    }


def table(results: list[dict]) -> str:
    full = next((r for r in results if r["spec"] == "full"), results[0])
    lines = [
        "| strategy | step s | x full | CPU s | x full | peak RSS MB | x full | selection frequency per group |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        freq = " ".join(f"{f:.2f}" for f in r["frequency"]) or "all 1.00"
        lines.append(
            f"| {r['spec']} | {r['step_s']:.3f} | {r['step_s'] / full['step_s']:.2f} | "
            f"{r['cpu_s']:.3f} | {r['cpu_s'] / full['cpu_s']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / full['peak_rss_mb']:.2f} | {freq} |"
        )
    groups = next((r["groups"] for r in results if r["groups"]), [])
    return "\n".join(lines) + (f"\n\ngroups: {', '.join(groups)}" if groups else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="run only these specs")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--scratch", default="/tmp/bvgls-lean-hf", help="Trainer output_dir (nothing is saved)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return
    results = run_variants(__file__, args.only or VARIANTS)
    print(
        f"GPT-2-style LM ({results[0]['params_m']:.1f}M parameters: {args.layers} layers, {args.width} wide, "
        f"{args.heads} heads, vocab {args.vocab}), batch {args.batch} x {args.seq} tokens, {args.steps} steps "
        f"(+{args.warmup} warm-up), {args.threads} threads, CPU, transformers Trainer"
    )
    print(table(results))
    write_json(args, results)


if __name__ == "__main__":
    main()
