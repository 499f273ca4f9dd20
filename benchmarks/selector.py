"""Selector cost, memory and agreement with the naive formula, side by side in one run.

    python benchmarks/selector.py                      # wide_resnet50_2, 20 steps
    python benchmarks/selector.py --model resnet18 --steps 10

Every step runs a real forward/backward of torchvision's model (weights=None) on a
small random batch, then times, on the same gradients:
  * the plain optimizer step (SGD, momentum 0.9, Nesterov, weight decay 5e-4);
  * bvgls.BVGLS's statistics update + top-k selection;
  * the naive per-parameter implementation (bvgls.reference.NaiveBVR).
and checks that both give the same ratios and selections. It also reports the extra
state bytes against the model's parameter bytes, and counts host syncs per step
(``.item()``/``bool()``/``.tolist()`` calls, seen through a TorchDispatchMode and a
wrapper on ``Tensor.tolist``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

import bvgls
from bvgls.reference import NaiveBVR


class SyncCounter(TorchDispatchMode):
    """Counts ops that read tensor data back to the host."""

    HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default"}

    def __init__(self):
        super().__init__()
        self.count = 0
        self._tolist = None

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.count += 1
            return counter._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="wide_resnet50_2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = getattr(torchvision.models, args.model)(weights=None, num_classes=100)
    groups = bvgls.layer_groups(model)
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        f"{args.model}: {n_params / 1e6:.1f} M parameters in {len(groups)} groups "
        f"({groups.scheme} scheme), {torch.get_num_threads()} threads, {args.steps} steps"
    )

    def sgd():
        return torch.optim.SGD(groups.param_groups(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    plain_opt = sgd()  # times the plain step
    selector = bvgls.BVGLS(sgd(), k=1)  # its optimizer is never stepped here: we time the statistics
    sync_probe = bvgls.BVGLS(sgd(), k=1)
    naive = NaiveBVR([ps for _, ps in groups.named_param_lists()])

    # the plain step moves the weights; keep them fixed so every run sees the same model
    snapshot = [p.detach().clone() for p in model.parameters()]
    t_plain, t_ours, t_naive, syncs, rel_diffs, same_sel = [], [], [], [], [], []
    for step in range(args.steps):
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
        y = torch.randint(0, 100, (args.batch_size,))
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

        _, dt = timed(selector._plan)
        t_ours.append(dt)
        ours = selector.ratios.tolist()
        ours_top = max(range(len(ours)), key=lambda i: ours[i])
        counter = SyncCounter()  # a second selector, so the counting mode does not slow the timed one
        with counter:
            sync_probe._plan()
        syncs.append(counter.count)

        ref, dt = timed(naive.update)
        t_naive.append(dt)
        ref_top = max(range(len(ref)), key=lambda i: ref[i])

        _, dt = timed(plain_opt.step)
        t_plain.append(dt)
        with torch.no_grad():
            for p, s in zip(model.parameters(), snapshot):
                p.copy_(s)

        if step > 0:  # step 1: variance is 0 exactly (ours) vs rounding noise (naive)
            rel_diffs.append(max(abs(a - b) / abs(b) for a, b in zip(ours, ref)))
            same_sel.append(ours_top == ref_top)

    def med(xs):
        return statistics.median(xs[1:] if len(xs) > 2 else xs)  # first step allocates buffers

    extra = sum(m.numel() * m.element_size() for m in selector._m if m is not None)
    extra += selector._sq.numel() * selector._sq.element_size() + selector._t.numel() * selector._t.element_size()
    naive_extra = sum(st["m"].numel() * st["m"].element_size() * 2 for st in naive.state.values())

    print(f"\nper-step time (median of steps 2..{args.steps}):")
    print(f"  plain SGD step          {med(t_plain) * 1e3:9.1f} ms")
    print(f"  bvgls statistics+select {med(t_ours) * 1e3:9.1f} ms")
    print(f"  naive per-parameter     {med(t_naive) * 1e3:9.1f} ms")
    print("ratios:")
    print(f"  bvgls / plain SGD step  {med(t_ours) / med(t_plain):9.3f}   (target <= 1.0)")
    print(f"  bvgls / naive           {med(t_ours) / med(t_naive):9.3f}   (target <= 0.2)")
    print(f"  naive / plain SGD step  {med(t_naive) / med(t_plain):9.3f}")
    print("extra state / parameter bytes:")
    print(f"  bvgls                   {extra / param_bytes:9.4f}   (target <= 1.05)")
    print(f"  naive                   {naive_extra / param_bytes:9.4f}")
    print(f"host syncs per step (bvgls): max {max(syncs)}, steps {syncs[:5]}...   (target <= 1)")
    print(
        f"max relative difference of ratios vs naive, steps 2..{args.steps}: {max(rel_diffs):.2e} "
        f"(after step {args.steps}: {rel_diffs[-1]:.2e}; target <= 1e-4)"
    )
    print(f"same top-1 selection as naive in {sum(same_sel)}/{len(same_sel)} steps")
    ok = (
        med(t_ours) <= med(t_plain)
        and med(t_ours) <= 0.2 * med(t_naive)
        and extra <= 1.05 * param_bytes
        and max(syncs) <= 1
        and rel_diffs[-1] <= 1e-4
        and all(same_sel)
    )
    print("ALL TARGETS MET" if ok else "SOME TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
