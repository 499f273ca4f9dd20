"""BVG-LS and BVG-TS: update the groups whose gradient bias-variance ratio is largest.

The method: ``docs/method.md``. Per parameter tensor we keep one per-element buffer ``m``
(EMA of the gradient) and one scalar ``s`` (EMA of ``||g||^2``), since
``sum(v)`` over a tensor is linear in the EMA. For a group ``l`` and per-tensor
bias-correction ``c = 1 / (1 - a^t)``::

    bias_l     = sum_i c_i^2 ||m_i||^2
    variance_l = max(sum_i c_i s_i - bias_l, eps)
    BVR_l      = bias_l / variance_l

All tensor work is done with ``torch._foreach_*`` kernels and a handful of small
vector ops; the only device-to-host transfer per step is the top-k indices (with
the flag that says whether every gradient was finite).

**Probe steps** (``probe=P``, lean BVG-LS): steps ``0, P, 2P, ...`` (0-based, counting
optimizer steps that were taken) are *probe steps*: every group computes its
gradient, the statistics are updated exactly as above and the top-k groups are
selected. On the ``P - 1`` steps after a probe the statistics are **not** touched
(they are an EMA over probe steps only, so with ``P > 1`` one EMA step spans ``P``
optimizer steps), the selection of the last probe is kept, and every other group is
frozen for real (``requires_grad=False``: no gradient, no optimizer update, no
optimizer state). Unselected groups skip the optimizer step on probe steps too (no
learning-rate-0 step: no momentum, moment or weight-decay update, and no optimizer
state for a group before it is first selected). ``probe=1`` (default) is the paper's
method, unchanged. A step
skipped for a non-finite gradient (here or by ``GradScaler``) is not counted, so the
schedule is not advanced: the same step (probe or not) runs again. With gradient
accumulation a probe covers the whole accumulated optimizer step, since freezing
changes only when an optimizer step ends.

**Static** (``static=N``): steps ``0 .. N-1`` run as above (probes every ``P``-th
step); after step ``N`` the ``k`` groups selected most often on the probe steps
(ties: the group nearer the head) are kept for the rest of the run, the others
frozen, and the gradient EMAs are freed (no statistics are needed any more).

**Fused** (``fused=True``): each tensor's gradient is folded into ``m``, ``s`` and ``t`` by
a post-accumulate-grad hook as soon as autograd has produced it (the same kernels as above,
one tensor at a time), and freed unless its group is updated in this step, so the gradients
of the other groups never coexist. The groups updated at step t are therefore the top-k
after step t-1 (with ``probe=P``: after the previous probe): step 0 updates no weight. A
tensor whose group is not trained in the step takes the reference's learning-rate-0 optimizer
step right after its fold, during backward (momentum, moments and step counts evolve as in the
paper; weights stay put), and its gradient is then freed: only the selection differs from the
paper, by one step. In lean mode (``probe > 1``, ``static``) and with ``skip_unselected``,
unselected groups are skipped instead, as without ``fused``. Gradient accumulation, GradScaler
and torch.distributed are refused (``FUSED_*`` messages). A non-finite gradient skips the step
(no weight moves), but the tensors folded before it are already folded and, at probe=1, have
already taken their learning-rate-0 step (with the non-finite elements as 0).

``lag=0`` removes the lag: a group's ratio depends only on its own tensors, so it is final once
the group's last gradient is folded; the hook then keeps the gradients of the k best groups so
far and releases the others (as above), and the step trains the top-k of its own statistics,
exactly as without ``fused``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from .base import GroupsSpec, GroupStrategy, StepReport, as_named_lists, is_sharded, local_tensor

_CHUNK = 1 << 16

# (bias, v_sum) -> (bias, v_sum): e.g. an all-reduce when gradients are sharded (FSDP)
SumReducer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``_foreach_norm``, accumulated in float32 for half-precision tensors (e.g. a bfloat16 EMA)."""
    if all(t.element_size() >= 4 for t in tensors):
        return list(torch._foreach_norm(tensors))
    low = [i for i, t in enumerate(tensors) if t.element_size() < 4]
    high = [i for i, t in enumerate(tensors) if t.element_size() >= 4]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for indices, kwargs in ((low, {"dtype": torch.float32}), (high, {})):
        if indices:
            for i, n in zip(indices, torch._foreach_norm([tensors[i] for i in indices], **kwargs)):
                out[i] = n.float()
    return out


FUSED_DISTRIBUTED = (
    "fused=true is not supported under torch.distributed (DDP / FSDP2): their reducers need every "
    "gradient after the backward pass, and fused mode frees the unselected ones during it; use "
    "fused=false (e.g. bvgls:probe=10:release_state=true:ema=bfloat16)"
)
FUSED_TWICE = (
    "fused=true folds each gradient into the statistics once per optimizer step, as autograd accumulates "
    "it, but this backward pass reached a parameter already folded since the last optimizer step "
    "(gradient accumulation, several backward passes per step, or a GradScaler that skipped a step): "
    "run one backward pass per optimizer step, or use fused=false"
)
FUSED_SCALER = (
    "fused=true cannot run under a GradScaler: the gradients it folds during backward are still scaled, "
    "and a step the scaler skips for an overflow has already been folded; use bfloat16 autocast without "
    "a scaler, or fused=false"
)


def refuse_distributed_fused() -> None:
    """Fused mode frees gradients during backward, which DDP's and FSDP's reducers need afterwards."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(FUSED_DISTRIBUTED)


def called_by_grad_scaler(depth: int = 16) -> bool:
    """Is this call inside ``GradScaler.step`` (a frame whose ``self`` is a GradScaler)?"""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        if isinstance(frame.f_locals.get("self"), torch.amp.GradScaler):
            return True
        frame = frame.f_back
    return False


class BVGLS(GroupStrategy):
    """Bias-Variance Guided Layer Selection (Tomita et al., ACCV 2024).

    Example::

        groups = bvgls.layer_groups(model)
        opt = torch.optim.SGD(groups.param_groups(), lr=0.01, momentum=0.9)
        selector = bvgls.BVGLS(opt, k=1)
        ...
        loss.backward(); selector.step(); selector.zero_grad()

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        k: number of groups updated per step.
        alpha: EMA coefficient ``a`` of the gradient statistics, in (0, 1).
        groups: selection groups if they differ from the optimizer's param groups.
        skip_unselected: leave unselected groups out of the optimizer step entirely
            (variant "bvgls-skip"); default False = the paper's learning-rate-0 step.
        eps: lower clamp of the variance.
        reduce_sums: called with the per-group (bias, v_sum) vectors before the
            ratios are formed; used to all-reduce them when gradients are sharded.
        probe: statistics and selection every ``probe``-th step, unselected groups
            frozen in between (see the module docstring); 1 = the paper.
        static: after ``static`` steps keep the ``k`` most often selected groups for
            good (see the module docstring); None = never.
        release_state: lean mode only: free a group's optimizer state (momentum,
            moments) when it is frozen, so only the selected groups hold any; a group
            selected again starts it afresh (as BAdam does at a block switch).
        ema_dtype: dtype of the gradient EMA ``m``, e.g. ``torch.bfloat16`` to halve
            the statistics buffer; None = each parameter's dtype. The EMA update runs
            in float32 and is rounded once per step.
        fused: fold each gradient into the statistics during backward and free it unless
            its group is trained in this step (an unselected group takes its learning-rate-0
            step first, unless lean or ``skip_unselected``); the selection lags one step (see
            the module docstring). One backward pass per optimizer step; not with a GradScaler
            or DDP/FSDP.
        lag: fused mode only. 1: the groups trained at (probe) step t are the top-k after step
            t-1. 0: the top-k of step t itself, as without ``fused``: as each group's last
            gradient is folded, its ratio is final, so the gradients of the k groups with the
            largest ratio so far are held and every other group's are freed (one host sync per
            group and step; at most k + 1 groups' gradients at once).
    """

    needs_all_gradients = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        k: int = 1,
        alpha: float = 0.9,
        groups: GroupsSpec = None,
        *,
        skip_unselected: bool = False,
        eps: float = 1e-10,
        reduce_sums: SumReducer | None = None,
        probe: int = 1,
        static: int | None = None,
        release_state: bool = False,
        ema_dtype: torch.dtype | None = None,
        fused: bool = False,
        lag: int = 1,
    ):
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.probe = _positive_int("probe (steps between two probe steps)", probe)
        self.static = None if static is None else _positive_int("static (probing steps before fixing)", static)
        self.fused = bool(fused)
        if lag not in (0, 1) or isinstance(lag, bool):
            raise ValueError(f"lag must be 0 or 1, got {lag!r}")
        if lag == 0 and not self.fused:
            raise ValueError("lag=0 is an option of fused mode (fused=true); without it the selection never lags")
        self.lag = int(lag)
        super().__init__(optimizer, groups, skip_unselected=skip_unselected)
        nonempty = sum(1 for ps in self.group_params if ps)
        if nonempty < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 non-empty groups to select between, "
                f"got {nonempty} (groups: {self.group_names})"
            )
        self.check_k(k, nonempty)
        self.k = int(k) if k is not None else None
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.reduce_sums = reduce_sums
        self.lean = self.probe > 1 or self.static is not None
        if release_state and not self.lean:
            raise ValueError(
                "release_state needs lean mode (probe > 1 or static): without freezing every group "
                "is updated every step and holds its optimizer state"
            )
        self.release_frozen_state = bool(release_state)
        if ema_dtype is not None and not (isinstance(ema_dtype, torch.dtype) and ema_dtype.is_floating_point):
            raise ValueError(f"ema_dtype must be a floating-point torch.dtype, got {ema_dtype!r}")
        self.ema_dtype = ema_dtype
        self._allocate_statistics(reduce_sums)

    def _allocate_statistics(self, reduce_sums: SumReducer | None) -> None:
        """The per-tensor statistics (EMA ``m`` allocated at a tensor's first fold), the per-group
        ratios and the bookkeeping of probe, static and fused mode."""
        n = len(self.params)
        self._device = self.params[0].device
        # float64 for the per-tensor scalars: bias and variance are differences of sums
        self._stat_dtype = torch.float32 if self._device.type == "mps" else torch.float64
        self._sharded = any(is_sharded(p) for p in self.params)
        if self.fused and (self._sharded or reduce_sums is not None):
            raise ValueError(FUSED_DISTRIBUTED)
        self._m: list[torch.Tensor | None] = [None] * n
        self._sq = torch.zeros(n, dtype=self._stat_dtype, device=self._device)
        self._t = torch.zeros(n, dtype=self._stat_dtype, device=self._device)
        self._group_of = torch.tensor(self.param_group_index, dtype=torch.long, device=self._device)
        self._owner_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._index_cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, int]] = {}
        self.ratios = torch.full((self.num_groups,), float("nan"), dtype=self._stat_dtype, device=self._device)
        self.bias = torch.zeros_like(self.ratios)
        self.variance = torch.zeros_like(self.ratios)
        self.probe_selection: list[int] = []  # top-k of the last probe step
        self.probe_counts = [0] * self.num_groups  # selections on probe steps
        self.static_groups: list[int] | None = None  # the groups kept after ``static`` steps
        self.probed = False  # did the last optimizer.step() update the statistics (``ratios`` are its own)?
        # fused mode: ||m||^2 of each tensor after its last fold, the tensors folded since the last
        # step and whether all their gradients were finite (a 0-dim tensor: no host sync per tensor)
        self._msq = torch.zeros(n, dtype=self._stat_dtype, device=self._device)
        self._arange = torch.arange(n, device=self._device)
        self._fold_set: set[int] = set()
        self._fold_ok: torch.Tensor | None = None
        # fused, lag 0: the ratio of each group whose gradients are held, and per group the
        # tensors expected / folded in this backward pass (None before its first fold)
        self._candidates: dict[int, float] = {}
        self._group_tensors: list[list[int]] = [[] for _ in range(self.num_groups)]
        for i, g in enumerate(self.param_group_index):
            self._group_tensors[g].append(i)
        self._expected: list[int] | None = None
        self._folded_in_group = [0] * self.num_groups
        # fused, not lean: an unselected tensor takes its learning-rate-0 step as soon as its
        # gradient is folded (the reference's step, run early so that the gradient can be freed)
        self._lr0_in_backward = self.fused and not self.lean and not self.skip_unselected
        if self.fused:
            self._nonfinite_effect = (
                "weights untouched; as fused mode frees the gradients during backward, the "
                "finite ones were already folded into the statistics"
                + (
                    " and the groups not trained in this step already took their learning-rate-0 "
                    "step (their optimizer state saw the gradient with nan/inf as 0)"
                    if self._lr0_in_backward
                    else ""
                )
            )

    @staticmethod
    def check_k(k, nonempty):
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {k!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > nonempty:
            raise ValueError(f"k={k} is larger than the number of non-empty groups ({nonempty})")

    # ------------------------------------------------------------------ statistics
    def _present(self) -> tuple[list[int], torch.Tensor, torch.Tensor, int]:
        return self._index_info([i for i, p in enumerate(self.params) if p.grad is not None])

    def _index_info(self, idx: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor, int]:
        """``idx`` (tensor indices), as a device index, the mask of groups they cover and its count."""
        key = tuple(idx)
        cached = self._index_cache.get(key)
        if cached is None:
            if len(self._index_cache) > 64:
                self._index_cache.clear()
            present_groups = sorted({self.param_group_index[i] for i in idx})
            mask = torch.zeros(self.num_groups, dtype=torch.bool)
            mask[present_groups] = True
            cached = (
                torch.tensor(idx, dtype=torch.long, device=self._device),
                mask.to(self._device),
                len(present_groups),
            )
            self._index_cache[key] = cached
        return (idx, *cached)

    def update_statistics(self) -> torch.Tensor:
        """Fold the current gradients into the EMAs and return the per-group ratios
        (unchanged if a gradient is not finite)."""
        self._fold_statistics()
        return self.ratios

    @torch.no_grad()
    def _fold_statistics(self) -> torch.Tensor:
        """Fold the current gradients into the EMAs; returns a 0-dim bool tensor, False
        (and every statistic untouched) when a gradient holds nan/inf. No host sync."""
        if self._sharded and self.reduce_sums is None:
            raise RuntimeError(
                f"{type(self).__name__}: the gradients are FSDP2-sharded DTensors, so each rank "
                "would select from its own shard; call bvgls.distributed.setup(strategy) once "
                "after creating the strategy (it sums the statistics over the ranks)"
            )
        idx, index, group_mask, self._num_present = self._present()
        grads = self._present_gradients()  # raises if there is none
        for g, i in zip(grads, idx):
            if g.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients")
            if self._m[i] is None:
                self._m[i] = torch.zeros_like(g, dtype=self.ema_dtype, memory_format=torch.preserve_format)
        ms = [self._m[i] for i in idx]
        ok, m_sq = self._fold_tensors(index, grads, ms)
        return self._set_ratios(index, group_mask, m_sq, ok)

    def _fold_tensors(
        self, index: torch.Tensor, grads: list[torch.Tensor], ms: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold ``grads`` into their EMAs ``ms``, ``self._sq`` and ``self._t`` (at ``index``); returns the
        0-dim finite flag (False: every statistic of these tensors untouched) and their ``||m||^2``."""
        a = self.alpha
        g_sq = self._squared_norms(grads)
        ok = g_sq.isfinite().all()
        for g in grads:  # the identity on a finite step; a non-finite one is skipped anyway
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        weight = ok.to(torch.float32) * (1.0 - a)  # 0 on a non-finite step: m + 0 * (g - m) = m
        self._lerp_ema(ms, grads, weight)  # m <- a m + (1 - a) g
        self._t.index_add_(0, index, ok.to(self._stat_dtype).expand(len(grads)))
        old_sq = self._sq.index_select(0, index)
        self._sq.index_copy_(0, index, torch.where(ok, old_sq.mul(a).add_(g_sq, alpha=1.0 - a), old_sq))
        return ok, self._squared_norms(ms)

    def _set_ratios(
        self, index: torch.Tensor, group_mask: torch.Tensor, m_sq: torch.Tensor, ok: torch.Tensor
    ) -> torch.Tensor:
        """The per-group bias, variance and ratios of the tensors at ``index`` (whose EMAs have just
        been folded, ``||m||^2`` given), kept as they were unless ``ok``; returns ``ok`` (after a
        reduction over ranks, if any)."""
        bias, v_sum = self._group_sums(index, m_sq)
        if self.reduce_sums is not None:
            # a non-finite shard on any rank makes every rank skip the step
            v_sum = torch.where(ok, v_sum, torch.nan)
            bias, v_sum = self.reduce_sums(bias, v_sum)
            ok = v_sum.isfinite().all() & bias.isfinite().all()
        variance = (v_sum - bias).clamp_min_(self.eps)
        self.bias = torch.where(ok, bias, self.bias)
        self.variance = torch.where(ok, variance, self.variance)
        self.ratios = torch.where(ok, torch.where(group_mask, bias / variance, torch.nan), self.ratios)
        return ok

    def _group_sums(self, index: torch.Tensor, m_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group, the bias-corrected ``sum m_hat^2`` and ``sum v_hat`` of the tensors at ``index``
        (``||m||^2`` given; overwritten)."""
        a = self.alpha
        t, sq = self._t.index_select(0, index), self._sq.index_select(0, index)
        correction = torch.pow(a, t).neg_().add_(1.0).reciprocal_()  # 1 / (1 - a^t)
        bias_i = m_sq.mul_(correction.square())
        # at a tensor's first step m_hat = g and v_hat = g^2 exactly: its variance is 0,
        # not the rounding noise of v_hat - m_hat^2
        v_i = torch.where(t == 1, bias_i, sq * correction)
        groups = self._group_of.index_select(0, index)
        bias = torch.zeros_like(self.ratios).index_add_(0, groups, bias_i)
        v_sum = torch.zeros_like(self.ratios).index_add_(0, groups, v_i)
        return bias, v_sum

    @staticmethod
    def _lerp_ema(ms: list[torch.Tensor], grads: list[torch.Tensor], weight: torch.Tensor) -> None:
        same = [i for i, (m, g) in enumerate(zip(ms, grads)) if m.dtype == g.dtype]
        if same:
            torch._foreach_lerp_([ms[i] for i in same], [grads[i] for i in same], [weight] * len(same))
        for m, g in zip(ms, grads):  # a lower-precision EMA: float32 per tensor, one rounding
            if m.dtype != g.dtype:
                m.copy_(m.float().lerp_(g.float(), weight))

    def _squared_norms(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``||x||^2`` of every tensor, as one vector in the statistics dtype.

        Tensors longer than two chunks are cut into chunk views first: the CPU
        ``_foreach_norm`` accumulates a whole tensor in one float32 sum (about 3e-5
        relative error on a few million elements); chunk-wise partial norms, summed
        in float64, are accurate to about 1e-7 at the same speed.
        """
        pieces, owners = [], []
        for x in tensors:
            n = x.numel()
            dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
            if n > 2 * _CHUNK and dense:
                parts = x.as_strided((n,), (1,), x.storage_offset()).split(_CHUNK)  # memory order: same norm
            else:
                parts = (x,)
            pieces.extend(parts)
            owners.append(len(parts))
        norms = torch.stack(_norms(pieces)).to(self._device, self._stat_dtype).square_()
        if len(pieces) == len(tensors):
            return norms
        key = tuple(owners)
        owner = self._owner_cache.get(key)
        if owner is None:  # built once per set of shapes: no host-to-device copy in a steady state
            owner = torch.repeat_interleave(torch.arange(len(owners)), torch.tensor(owners)).to(self._device)
            self._owner_cache = {key: owner}
        return torch.zeros(len(tensors), dtype=self._stat_dtype, device=self._device).index_add_(0, owner, norms)

    def _num_to_select(self, num_present: int) -> int:
        return min(self.k, num_present)

    def expected_updates(self, total_steps: int) -> float | None:
        """``total_steps x k / groups`` (BVG-TS: ``x ceil(fraction n) / n``); None for ``static``,
        which trains its ``k`` groups every step after the first ``static`` steps."""
        if self.static is not None:
            return None
        n = sum(1 for ps in self.group_params if ps)
        return total_steps * self._num_to_select(n) / n

    # ------------------------------------------------------------------ selection
    def is_probe_step(self, step: int | None = None) -> bool:
        """Does (0-based) optimizer step ``step`` (default: the next one) update the statistics?"""
        step = self.num_steps if step is None else step
        if self.static is not None and step >= self.static:
            return False
        return step % self.probe == 0

    def _binary(self, active) -> list[float]:
        scales = [0.0] * self.num_groups
        for i in active:
            scales[i] = 1.0
        return scales

    def _top(self, ok: torch.Tensor, num_present: int, among: list[int] | None = None) -> tuple[bool, list[int]]:
        """The finite flag and the top-k groups by ratio (of the groups ``among``, default all), in
        the one host sync of a step."""
        kk = self._num_to_select(num_present)
        ratios = self.ratios.nan_to_num(nan=-math.inf)
        if among is not None:
            ratios = torch.full_like(ratios, -math.inf).index_copy_(0, self._arange[among], ratios[among])
        top = torch.topk(ratios, kk).indices if kk > 0 else ok.new_zeros(0)
        flag, *chosen = torch.cat([ok.view(1).long(), top.long()]).tolist()
        return bool(flag), chosen

    def _plan_step(self):
        self.probed = False  # stays False when the step is skipped (non-finite gradient)
        if self.fused and self.is_probe_step():
            return self._plan_fused_probe()
        if not self.is_probe_step():
            kept = self.static_groups if self.static_groups is not None else self.probe_selection
            if not self._gradients_finite():
                return None
            return self._binary(kept)
        flag, chosen = self._top(self._fold_statistics(), self._num_present)
        if not flag:
            return None
        self._record_probe(chosen)
        return self._binary(chosen)

    def _record_probe(self, chosen: list[int]) -> None:
        self.probed = True
        self.probe_selection = sorted(chosen)
        for i in chosen:
            self.probe_counts[i] += 1

    # ------------------------------------------------------------------ fused statistics
    def _attach(self) -> None:
        if self.fused:
            refuse_distributed_fused()
        super()._attach()
        if self.fused:
            self._handles += [
                p.register_post_accumulate_grad_hook(self._fold_hook(i)) for i, p in enumerate(self.params)
            ]

    def _fold_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            self._fold_now(i, param)

        return hook

    @torch.no_grad()
    def _fold_now(self, i: int, param: torch.Tensor) -> None:
        """Fused mode, as soon as autograd has accumulated tensor ``i``'s gradient: on a probe step
        fold it into the statistics and free it unless its group is updated in this step."""
        if not self.is_probe_step():
            return  # only the trained groups compute a gradient between probes: nothing to fold
        if i in self._fold_set:
            raise RuntimeError(FUSED_TWICE)
        g = param.grad
        if g.is_sparse:
            raise ValueError(f"{type(self).__name__} does not support sparse gradients")
        if self._m[i] is None:
            self._m[i] = torch.zeros_like(g, dtype=self.ema_dtype, memory_format=torch.preserve_format)
        index = self._arange[i : i + 1]  # a view: no host-to-device copy per tensor
        ok, m_sq = self._fold_tensors(index, [g], [self._m[i]])
        self._msq.index_copy_(0, index, m_sq)
        self._fold_ok = ok if self._fold_ok is None else self._fold_ok & ok
        self._fold_set.add(i)
        if self.lag == 0:
            self._hold_best_groups(i)
        elif self.param_group_index[i] not in self.probe_selection:
            self._release([i])

    def _release(self, indices: list[int]) -> None:
        """Free these tensors' gradients (the point of fused mode: they never coexist with the others),
        after their learning-rate-0 step where the paper's semantics apply."""
        if self._lr0_in_backward:
            self._step_now(indices, 0.0)
        for i in indices:
            self.params[i].grad = None

    def _hold_best_groups(self, i: int) -> None:
        """Lag 0: once tensor ``i``'s group has folded all its gradients its ratio is final; keep the
        gradients of the k groups with the largest ratios so far (and of any tied with the k-th),
        release the others'. Groups still being folded keep theirs until the step."""
        g = self.param_group_index[i]
        if self._expected is None:  # the first fold of this backward pass
            self._expected = [sum(p.requires_grad for p in ps) for ps in self.group_params]
            self._folded_in_group = [0] * self.num_groups
        self._folded_in_group[g] += 1
        if self._folded_in_group[g] < self._expected[g]:
            return
        index = self._arange[self._group_tensors[g]]
        bias, v_sum = self._group_sums(index, self._msq.index_select(0, index))
        ratio = float(bias[g] / (v_sum[g] - bias[g]).clamp_min(self.eps))  # a host sync per group
        self._candidates[g] = -math.inf if math.isnan(ratio) else ratio
        ranked = sorted(self._candidates.values(), reverse=True)
        if len(ranked) > self.k:
            kth = ranked[self.k - 1]
            for loser in [h for h, r in self._candidates.items() if r < kth]:
                del self._candidates[loser]
                self._release([j for j in self._group_tensors[loser] if self.params[j].grad is not None])

    def _plan_fused_probe(self):
        """A fused probe step: choose from the statistics the backward pass just folded; update the
        groups chosen at the previous probe (none at the first step), or with lag 0 the ones just
        chosen (among the groups whose gradients were held)."""
        refuse_distributed_fused()
        if called_by_grad_scaler():
            raise RuntimeError(FUSED_SCALER)
        folded, self._fold_set = sorted(self._fold_set), set()
        ok, self._fold_ok = self._fold_ok, None
        if not folded:
            raise RuntimeError(
                f"{type(self).__name__}.step() called but no gradient was folded since the last "
                "step: call loss.backward() first; nothing was updated or counted"
            )
        _, index, group_mask, num_present = self._index_info(folded)
        ok = self._set_ratios(index, group_mask, self._msq.index_select(0, index), ok)
        kept = list(self.probe_selection)
        held = None
        if self.lag == 0:  # choose among the groups whose gradients are still held
            held = [g for g, ps in enumerate(self.group_params) if any(p.grad is not None for p in ps)]
            self._candidates, self._expected = {}, None
        flag, chosen = self._top(ok, num_present, among=held)
        if not flag:
            return None
        self._record_probe(chosen)
        return self._binary(chosen if self.lag == 0 else kept)

    def _plan(self):
        return self._plan_step()

    def _step_finished(self) -> None:
        if self.static is not None and self.static_groups is None and self.num_steps >= self.static:
            order = sorted(range(self.num_groups), key=lambda g: (self.probe_counts[g], g), reverse=True)
            self.static_groups = sorted(order[: self._num_to_select(self.num_groups)])
            self._m = [None] * len(self.params)  # the statistics are not needed any more

    def _upcoming_active(self):
        if self.static_groups is not None:
            return self.static_groups
        return None if self.is_probe_step() else self.probe_selection

    def step_report(self) -> StepReport:
        """:meth:`GroupStrategy.step_report` plus the ratios of the last probe step, the mask of
        informative groups and whether the last step was a probe (computed those ratios)."""
        report = super().step_report()
        report.ratios = self.ratios
        report.informative = torch.isfinite(self.ratios) & (self.variance > self.eps)
        report.probed = self.probed
        return report

    def _statistics_bytes(self) -> list[int]:
        """Per tensor with statistics: its gradient EMA and its per-tensor scalars (running sum of
        squares, step count and, fused, ``||m||^2``)."""
        scalars = (self._sq, self._t) + ((self._msq,) if self.fused else ())
        per_tensor = sum(v.element_size() for v in scalars)
        return [0 if m is None else per_tensor + m.numel() * m.element_size() for m in self._m]

    # ------------------------------------------------------------------ state
    def _options(self) -> dict[str, Any]:
        return {
            **super()._options(),
            "k": self.k,
            "alpha": self.alpha,
            "eps": self.eps,
            "probe": self.probe,
            "static": self.static,
            "release_state": self.release_frozen_state,
            "ema_dtype": None if self.ema_dtype is None else str(self.ema_dtype).removeprefix("torch."),
            # only when on: checkpoints saved before the option existed still load
            **({"fused": True} if self.fused else {}),
            **({"lag": 0} if self.lag == 0 else {}),
        }

    def state_dict(self) -> dict[str, Any]:
        if self._fold_set:
            raise RuntimeError(
                "fused=true: state_dict() was called between backward() and the optimizer step, "
                "when this step's gradients are folded but not yet counted; save after the step"
            )
        state = super().state_dict()
        state.update(
            m=[None if b is None else b.clone() for b in self._m],
            sq=self._sq.clone(),
            t=self._t.clone(),
            ratios=self.ratios.clone(),
            bias=self.bias.clone(),
            variance=self.variance.clone(),
            probe_selection=list(self.probe_selection),
            probe_counts=list(self.probe_counts),
            static_groups=None if self.static_groups is None else list(self.static_groups),
        )
        return state

    def _check_state(self, state: Mapping[str, Any]) -> None:
        super()._check_state(state)
        missing = [
            k
            for k in ("m", "sq", "t", "ratios", "bias", "variance", "probe_selection", "probe_counts", "static_groups")
            if k not in state
        ]
        if missing:
            raise ValueError(f"state_dict lacks {', '.join(missing)} (not a state of this bvgls version)")
        m = list(state["m"])
        if len(m) != len(self.params):
            raise ValueError(f"state_dict has {len(m)} gradient buffers for {len(self.params)} parameters")
        for i, (buf, p) in enumerate(zip(m, self.params)):
            if buf is not None and (not isinstance(buf, torch.Tensor) or buf.shape != local_tensor(p).shape):
                # FSDP2: the EMA is this rank's shard
                raise ValueError(
                    f"gradient buffer {i} has shape {tuple(getattr(buf, 'shape', ()))}, parameter "
                    f"has {tuple(local_tensor(p).shape)}"
                )
        for key, size in (
            ("sq", len(self.params)),
            ("t", len(self.params)),
            ("ratios", self.num_groups),
            ("bias", self.num_groups),
            ("variance", self.num_groups),
        ):
            if not isinstance(state[key], torch.Tensor) or tuple(state[key].shape) != (size,):
                raise ValueError(f"state_dict entry {key!r} must be a tensor of shape ({size},)")
        if len(state["probe_counts"]) != self.num_groups:
            raise ValueError(f"state_dict has {len(state['probe_counts'])} probe counts for {self.num_groups} groups")
        kept = list(state["probe_selection"]) + list(state["static_groups"] or [])
        if any(not 0 <= int(i) < self.num_groups for i in kept):
            raise ValueError(f"state_dict selects groups outside 0..{self.num_groups - 1}")

    def _set_state(self, state: Mapping[str, Any]) -> None:
        super()._set_state(state)
        self._m = [
            None if b is None else b.to(p.device, self.ema_dtype or p.dtype).clone()
            for b, p in zip(state["m"], self.params)
        ]
        self._sq, self._t, self.ratios, self.bias, self.variance = (
            state[key].to(self._device, self._stat_dtype).clone() for key in ("sq", "t", "ratios", "bias", "variance")
        )
        self.probe_selection = [int(i) for i in state["probe_selection"]]
        self.probe_counts = [int(c) for c in state["probe_counts"]]
        self.static_groups = None if state["static_groups"] is None else [int(i) for i in state["static_groups"]]


class BVGTS(BVGLS):
    """Bias-Variance Guided Tensor Selection: one group per parameter tensor.

    Each step the ``ceil(fraction * n)`` tensors with the largest ratio are updated,
    ``n`` being the number of tensors that have a gradient in this step.

    ``options`` are the keyword options of :class:`BVGLS` that apply to tensor selection,
    with BVGLS's meaning and defaults: ``skip_unselected``, ``eps``, ``reduce_sums`` and
    ``fused``; the lean options (``probe``, ``static``, ``release_state``) and ``ema_dtype`` are
    BVG-LS's only.
    """

    #: the keyword options of BVGLS that BVGTS passes on
    OPTIONS = ("skip_unselected", "eps", "reduce_sums", "fused")

    def __init__(
        self, optimizer: Optimizer, fraction: float = 0.5, alpha: float = 0.9, groups: GroupsSpec = None, **options
    ):
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise TypeError(
                f"BVGTS got unexpected keyword argument(s) {', '.join(unknown)}; "
                f"its options are {', '.join(self.OPTIONS)}"
            )
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)
        if groups is None:
            groups = [
                (f"{g.get('name', f'group{gi}')}.{j}", [p])
                for gi, g in enumerate(optimizer.param_groups)
                for j, p in enumerate(g["params"])
            ]
        elif hasattr(groups, "tensor_groups"):  # bvgls.LayerGroups: qualified parameter names
            groups = groups.tensor_groups()
        else:  # one group per tensor of the given groups, names kept
            groups = [
                (f"{name}.{j}" if len(ps) > 1 else name, [p])
                for name, ps in as_named_lists(groups)
                for j, p in enumerate(ps)
            ]
        super().__init__(optimizer, k=1, alpha=alpha, groups=groups, **options)
        self.k = None

    def _num_to_select(self, num_present: int) -> int:
        return min(num_present, max(1, math.ceil(self.fraction * num_present)))

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "fraction": self.fraction}
