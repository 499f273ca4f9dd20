"""Finetune with BVG-LS on several processes: DDP (default) or FSDP2 (--fsdp), CPU / gloo.

    torchrun --nproc_per_node 2 examples/ddp_finetune.py
    torchrun --nproc_per_node 2 examples/ddp_finetune.py --fsdp
    torchrun --nproc_per_node 2 examples/ddp_finetune.py --strategy bvgls:k=2 --epochs 5

Offline and small: a 4-group CNN (stem, block1, block2, head) is first trained on the
digits 0-4 of scikit-learn's bundled 8x8 digits (the "pretrained source model"; every
rank trains the same one), gets a new head, and is then finetuned on the digits 5-9
with the strategy, each rank on its share of every batch. Rank 0 prints the loss, test
accuracy and per-group selection frequency of every epoch.

DDP needs nothing beyond DDP's own gradient all-reduce: all ranks see the same
gradients and select the same groups. FSDP2 shards every gradient, so
``bvgls.distributed.setup`` adds one all-reduce of 2 * groups float64 values per step.
``--verify-every N`` checks every N steps that all ranks selected the same groups.
Needs scikit-learn (``pip install bvgls[cli]``) for the data.
"""

from __future__ import annotations

import argparse
import os
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before init_process_group: see main()
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import bvgls
from bvgls import distributed as bvgls_distributed
from bvgls.integrations import SelectionTracker


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", default="bvgls", help="bvgls strategy spec (bvgls, bvgls:k=2, full, L3-4, ...)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 fully_shard instead of DDP")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--verify-every", type=int, default=1, help="check identical selections every N steps (0: never)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def make_head(num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, num_classes))


def make_model(num_classes: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        stem=nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()),
        block1=nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        block2=nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()),
        head=make_head(num_classes),
    ))


def digits(classes: range, seed: int):
    """(train, test) TensorDatasets of the 8x8 digits in ``classes``, labels shifted to 0..n-1."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("this example needs scikit-learn for its offline data: pip install scikit-learn") from None
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    keep = (y >= classes.start) & (y < classes.stop)
    x, y = x[keep], y[keep] - classes.start
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.75 * len(y))
    return TensorDataset(x[order[:cut]], y[order[:cut]]), TensorDataset(x[order[cut:]], y[order[cut:]])


def pretrain_source_model(args) -> nn.Sequential:
    """The same source model on every rank: seeded, single-threaded, local training."""
    torch.manual_seed(args.seed)
    model = make_model(5)
    train, _ = digits(range(0, 5), args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(args.pretrain_epochs):
        for x, y in DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(args.seed)):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return model


@torch.no_grad()
def evaluate(model, test) -> float:
    # every rank runs the whole (small) test set: FSDP's forward is a collective
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in DataLoader(test, batch_size=256))
    return correct / len(test)


def main():
    """Clean shutdown, so that every rank exits with status 0:

    * ``torch.distributed.nn`` is imported before ``init_process_group`` (see the imports):
      torch imports it lazily (via torch._dynamo, on the first optimizer) and, imported
      after, it binds the default gloo group into default arguments for good;
    * the barrier keeps every rank connected until all are done;
    * ``bvgls.distributed.shutdown()`` destroys the process groups and frees them, including
      the ones FSDP2's device mesh keeps (torch's DTensor caches keep the mesh alive). A gloo
      group left alive runs its threads into interpreter shutdown, which aborts the process
      ("terminate called without an active exception")."""
    args = parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        finetune(args)
        dist.barrier()
    finally:
        bvgls_distributed.shutdown()


def finetune(args):
    rank, world = dist.get_rank(), dist.get_world_size()

    model = pretrain_source_model(args)
    model.head = make_head(5)  # new task: digits 5-9
    for tensor in model.state_dict().values():  # identical start everywhere (FSDP shards each rank's copy)
        dist.broadcast(tensor, src=0)
    train, test = digits(range(5, 10), args.seed)

    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for name in ("stem", "block1", "block2", "head"):
            fully_shard(getattr(model, name), mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)

    groups = bvgls.layer_groups(model)  # the unwrapped module: stem, block1, block2, head
    optimizer = torch.optim.SGD(groups.param_groups(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    strategy = bvgls.make_strategy(args.strategy, optimizer, groups)
    mode = bvgls_distributed.setup(strategy, verify_every=args.verify_every)
    tracker = SelectionTracker(strategy)
    if rank == 0:
        print(groups.describe())
        extra = f"one all-reduce of {2 * strategy.num_groups} float64 = {16 * strategy.num_groups} bytes per step" \
            if mode == "fsdp" and hasattr(strategy, "reduce_sums") else "none beyond the data-parallel all-reduce"
        print(f"{world} processes, {mode}, strategy {args.strategy}; extra communication: {extra}")

    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        strategy.on_epoch_start(epoch)
        total = torch.zeros(2, dtype=torch.float64)
        for x, y in loader:
            loss = nn.functional.cross_entropy(wrapped(x), y)
            loss.backward()
            strategy.step()
            strategy.zero_grad()
            total += torch.tensor([loss.item() * len(y), len(y)], dtype=torch.float64)
        dist.all_reduce(total)
        accuracy = evaluate(wrapped, test)
        stats = tracker.take("epoch")
        if rank == 0:
            freq = "  ".join(f"{n} {f:.2f}" for n, f in zip(strategy.group_names, stats["frequency"]))
            print(f"epoch {epoch + 1}: train loss {total[0] / total[1]:.4f}  test acc {accuracy:.3f}  "
                  f"selected: {freq}")
    if args.verify_every:
        bvgls_distributed.assert_same_selection(strategy)
        if rank == 0:
            print(f"all {world} ranks selected the same groups in all {strategy.num_steps} steps "
                  f"(checked every {args.verify_every})")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
