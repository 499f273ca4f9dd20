"""BVG-LS under ``torch.distributed`` (``torchrun``): DDP as it is, FSDP2 with one small all-reduce.

**DDP** all-reduces (averages) the gradients before the optimizer step, so every rank
folds the same gradients into the same statistics and selects the same groups: no
communication beyond DDP's own. :func:`assert_same_selection` checks that (one
all-gather of ``L`` values), :func:`verify_selection` does so every ``n`` steps.

**FSDP2** (``torch.distributed.fsdp.fully_shard``): every parameter and gradient is a
``DTensor`` of which each rank holds one shard. BVG-LS keeps its per-element EMA on
the local shard (so its memory is sharded like the optimizer state) and sums
``||m_hat||^2`` and ``v_hat`` over the local elements; :func:`shard_statistics` makes
it add those per-group sums over the ranks before forming the ratios: **one
all-reduce of 2*L float64 values (16*L bytes) per step**, L being the number of
groups. The ratios then equal a single-process run on the whole batch, and every
rank selects the same groups. FSDP1 (``FullyShardedDataParallel``) flattens the
parameters of a wrapped unit into one tensor and is not supported.

:func:`setup` does the right thing for whichever of the two is in use; :func:`shutdown`
leaves ``torch.distributed`` so that the process exits cleanly.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .base import GroupStrategy

__all__ = [
    "all_reduce_sums",
    "assert_same_selection",
    "reject_fsdp1",
    "setup",
    "shard_statistics",
    "sharding_groups",
    "shutdown",
    "verify_selection",
]


def _require_initialized() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group() "
            "first (torchrun sets up its environment variables)"
        )


def _is_dtensor(p: torch.Tensor) -> bool:
    return hasattr(p, "device_mesh") and hasattr(p, "placements")


def all_reduce_sums(groups: Sequence[Any] | Any = None):
    """A ``reduce_sums`` hook for :class:`~bvgls.BVGLS`: sum ``(bias, v_sum)`` over ranks.

    Both vectors travel in one float64 tensor of ``2 * L`` values, with one
    ``all_reduce(SUM)`` per process group in ``groups`` (one group, the default
    group if None, for plain FSDP; one per sharded mesh dimension otherwise).
    """
    _require_initialized()
    if groups is None or not isinstance(groups, (list, tuple)):
        groups = [groups]

    def reduce_sums(bias: torch.Tensor, v_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = bias.numel()
        packed = torch.cat([bias, v_sum])
        for group in groups:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        return packed[:n], packed[n:]

    reduce_sums.process_groups = list(groups)
    return reduce_sums


def sharding_groups(strategy: GroupStrategy) -> list[Any] | None:
    """The process groups over which ``strategy``'s parameters are sharded, or None
    if none of them is a ``DTensor`` (single process, DDP).

    Raises ``ValueError`` when some parameters are sharded and others are not, or
    when they are sharded in different ways: per-group sums would then be wrong.
    """
    layouts, plain = {}, []
    for name, params in zip(strategy.group_names, strategy.group_params):
        for p in params:
            if _is_dtensor(p):
                layouts.setdefault((p.device_mesh, tuple(p.placements)), name)
            else:
                plain.append(name)
    if not layouts:
        return None
    if plain:
        raise ValueError(
            f"some parameters are FSDP-sharded DTensors and others (in group {plain[0]!r}) are plain "
            "tensors; apply fully_shard to the root module as well, so that every parameter is sharded"
        )
    if len(layouts) > 1:
        kinds = "; ".join(f"{placements} on {mesh} (group {name!r})" for (mesh, placements), name in layouts.items())
        raise ValueError(f"the parameters are sharded in different ways ({kinds}); BVG-LS needs one layout")
    (mesh, placements), _ = layouts.popitem()
    if any(pl.is_partial() for pl in placements):
        raise ValueError(f"parameters with Partial placements {placements} are not supported")
    dims = [i for i, pl in enumerate(placements) if pl.is_shard()]
    return [mesh.get_group(mesh_dim=i) for i in dims]


def shard_statistics(strategy: GroupStrategy, groups: Sequence[Any] | Any = None) -> GroupStrategy:
    """Make a BVGLS / BVGTS on FSDP2-sharded parameters compute whole-model ratios.

    Installs :func:`all_reduce_sums` as the strategy's ``reduce_sums`` hook, over the
    process group(s) the parameters are sharded on (or ``groups`` if given).
    """
    if not hasattr(strategy, "reduce_sums"):
        raise TypeError(f"{type(strategy).__name__} keeps no gradient statistics; there is nothing to reduce")
    _require_initialized()
    if groups is None:
        groups = sharding_groups(strategy)
        if groups is None:
            raise ValueError(
                "none of the strategy's parameters is a DTensor, so they are not FSDP2-sharded; "
                "with DDP every rank already holds the whole gradient and needs no reduction"
            )
        if not groups:  # sharded on no mesh dimension: replicated DTensors
            return strategy
    strategy.reduce_sums = all_reduce_sums(groups)
    return strategy


def _collective_device(group=None) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def assert_same_selection(strategy: GroupStrategy, group: Any = None) -> None:
    """Raise ``RuntimeError`` unless every rank's last step used the same per-group
    learning-rate multipliers (i.e. selected the same groups). A collective: call it
    on every rank."""
    _require_initialized()
    mine = torch.tensor(
        [float(strategy.num_steps), *strategy.scales], dtype=torch.float64, device=_collective_device(group)
    )
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    if all(torch.equal(other, everyone[0]) for other in everyone[1:]):
        return
    lines = []
    for rank, row in enumerate(everyone):
        step, *scales = row.tolist()
        chosen = [name for name, s in zip(strategy.group_names, scales) if s > 0]
        lines.append(f"rank {rank} (step {int(step)}): {', '.join(chosen) or 'none'}")
    raise RuntimeError("ranks selected different groups: " + "; ".join(lines))


def verify_selection(strategy: GroupStrategy, every: int = 1, group: Any = None):
    """Call :func:`assert_same_selection` after every ``every``-th optimizer step.
    Returns the hook handle (``.remove()`` to stop)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    _require_initialized()

    def check(optimizer, args, kwargs):
        if strategy.num_steps % every == 0:
            assert_same_selection(strategy, group)

    return strategy.optimizer.register_step_post_hook(check)


def reject_fsdp1(strategy: GroupStrategy, modules: Sequence[torch.nn.Module] = ()) -> None:
    """Raise ``ValueError`` if FSDP1 (``FullyShardedDataParallel``) manages the parameters:
    it flattens a whole wrapped unit into one tensor and shards that, so per-layer sums
    cannot be formed (and with ``use_orig_params=True`` each rank would silently see only
    part of every layer)."""
    flat = [
        name
        for name, ps in zip(strategy.group_names, strategy.group_params)
        if any(getattr(p, "_is_flat_param", False) for p in ps)
    ]
    wrapped = False
    if modules:
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel
        except ImportError:  # pragma: no cover - torch built without distributed
            FullyShardedDataParallel = ()
        wrapped = any(isinstance(m, FullyShardedDataParallel) for module in modules for m in module.modules())
    if flat or wrapped:
        raise ValueError(
            "FSDP1 (FullyShardedDataParallel) is not supported: it shards flattened units, not "
            "layers. Shard with FSDP2 (torch.distributed.fsdp.fully_shard) instead"
        )


def setup(
    strategy: GroupStrategy, *, verify_every: int = 0, group: Any = None, modules: Sequence[torch.nn.Module] = ()
) -> str:
    """Prepare ``strategy`` for the current ``torch.distributed`` setting.

    Returns ``"single"`` (not distributed, or one process: nothing to do), ``"fsdp"``
    (DTensor parameters: per-group sums are all-reduced, see :func:`shard_statistics`)
    or ``"ddp"`` (replicated parameters: nothing to do). With ``verify_every=n``,
    every n-th step checks that all ranks selected the same groups. ``modules``: the
    (wrapped) model(s), checked for FSDP1, which is not supported.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return "single"
    reject_fsdp1(strategy, modules)
    mode = "ddp"
    if sharding_groups(strategy) is not None:
        mode = "fsdp"
        if hasattr(strategy, "reduce_sums"):
            shard_statistics(strategy)
    if verify_every:
        verify_selection(strategy, verify_every, group)
    return mode


def shutdown() -> None:
    """Destroy every process group so that none outlives it; call it on every rank, last.

    ``torch.distributed.destroy_process_group()`` alone unregisters the groups but does not
    free them while something still refers to them, and a gloo group that is not freed
    keeps its threads running into interpreter shutdown, where they abort the process
    (``terminate called without an active exception``, SIGABRT). With FSDP2 something
    always does: every ``DeviceMesh`` keeps its process groups (``_pg_registry``), and
    torch's DTensor caches (sharding propagation, redistribution plans) keep the meshes
    alive for the life of the process. So this function

    1. frees what only reference cycles keep (FSDP2 modules, optimizers, strategies),
    2. destroys the process groups (``destroy_process_group``), then
    3. empties the group registry of every remaining ``DeviceMesh`` (its groups are
       destroyed, the mesh is unusable anyway), so that the groups are freed here and
       their threads joined while every rank is still connected.

    Call ``torch.distributed.barrier()`` before it on the normal path (so no rank tears
    down while another is still communicating). A no-op when not initialized. Groups that
    live objects still hold are not freed: let the wrapped model (DDP / FSDP2 modules) and
    the strategy (its ``reduce_sums`` hook sums over the group) go first, e.g. by training
    in a function that returns before this call; and import ``torch.distributed.nn`` before
    ``init_process_group`` (imported after, it binds the default group into default
    arguments for good). bvgls itself keeps no process group outside its strategies.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.destroy_process_group()
    device_mesh = sys.modules.get("torch.distributed.device_mesh")  # loaded only if a mesh was made
    mesh_type = getattr(device_mesh, "DeviceMesh", None)
    if not isinstance(mesh_type, type):
        return
    for obj in gc.get_objects():
        if issubclass(type(obj), mesh_type):
            registry = getattr(obj, "_pg_registry", None)  # absent where meshes hold no groups
            if isinstance(registry, dict):
                registry.clear()
