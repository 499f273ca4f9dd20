"""BVG-LS and BVG-TS: update the groups whose gradient bias-variance ratio is largest.

Spec: ``shared/METHOD.md``. Per parameter tensor we keep one per-element buffer ``m``
(EMA of the gradient) and one scalar ``s`` (EMA of ``||g||^2``), since
``sum(v)`` over a tensor is linear in the EMA. For a group ``l`` and per-tensor
bias-correction ``c = 1 / (1 - a^t)``::

    bias_l     = sum_i c_i^2 ||m_i||^2
    variance_l = max(sum_i c_i s_i - bias_l, eps)
    BVR_l      = bias_l / variance_l

All tensor work is done with ``torch._foreach_*`` kernels and a handful of small
vector ops; the only device-to-host transfer per step is the top-k indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .base import GroupsSpec, GroupStrategy, _as_named_lists

_CHUNK = 1 << 16


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 gradients); any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t

# (bias, v_sum) -> (bias, v_sum): e.g. an all-reduce when gradients are sharded (FSDP)
SumReducer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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
    """

    needs_all_gradients = True

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 1, alpha: float = 0.9,
                 groups: GroupsSpec = None, *, skip_unselected: bool = False, eps: float = 1e-10,
                 reduce_sums: SumReducer | None = None):
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        super().__init__(optimizer, groups, skip_unselected=skip_unselected)
        nonempty = sum(1 for ps in self.group_params if ps)
        if nonempty < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 non-empty groups to select between, "
                             f"got {nonempty} (groups: {self.group_names})")
        self._check_k(k, nonempty)
        self.k = int(k) if k is not None else None
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.reduce_sums = reduce_sums
        n = len(self.params)
        self._device = self.params[0].device
        # float64 for the per-tensor scalars: bias and variance are differences of sums
        self._stat_dtype = torch.float32 if self._device.type == "mps" else torch.float64
        self._m: list[torch.Tensor | None] = [None] * n
        self._sq = torch.zeros(n, dtype=self._stat_dtype, device=self._device)
        self._t = torch.zeros(n, dtype=self._stat_dtype, device=self._device)
        self._group_of = torch.tensor(self.param_group_index, dtype=torch.long, device=self._device)
        self._owner_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._index_cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, int]] = {}
        self.ratios = torch.full((self.num_groups,), float("nan"), dtype=self._stat_dtype, device=self._device)
        self.bias = torch.zeros_like(self.ratios)
        self.variance = torch.zeros_like(self.ratios)

    @staticmethod
    def _check_k(k, nonempty):
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {k!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > nonempty:
            raise ValueError(f"k={k} is larger than the number of non-empty groups ({nonempty})")

    # ------------------------------------------------------------------ statistics
    def _present(self) -> tuple[list[int], torch.Tensor, torch.Tensor, int]:
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        key = tuple(idx)
        cached = self._index_cache.get(key)
        if cached is None:
            if len(self._index_cache) > 64:
                self._index_cache.clear()
            present_groups = sorted({self.param_group_index[i] for i in idx})
            mask = torch.zeros(self.num_groups, dtype=torch.bool)
            mask[present_groups] = True
            cached = (torch.tensor(idx, dtype=torch.long, device=self._device),
                      mask.to(self._device), len(present_groups))
            self._index_cache[key] = cached
        return (idx, *cached)

    @torch.no_grad()
    def update_statistics(self) -> torch.Tensor:
        """Fold the current gradients into the EMAs and return the per-group ratios."""
        idx, index, group_mask, self._num_present = self._present()
        if not idx:
            self.ratios.fill_(float("nan"))
            return self.ratios
        grads = []
        for i in idx:
            g = _local(self.params[i].grad)
            if g.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients")
            if self._m[i] is None:
                self._m[i] = torch.zeros_like(g, memory_format=torch.preserve_format)
            grads.append(g)
        ms = [self._m[i] for i in idx]
        a = self.alpha
        torch._foreach_lerp_(ms, grads, 1.0 - a)  # m <- a m + (1 - a) g
        g_sq = self._squared_norms(grads)
        m_sq = self._squared_norms(ms)
        t = self._t.index_add_(0, index, torch.ones_like(g_sq)).index_select(0, index)
        sq = self._sq.index_select(0, index).mul_(a).add_(g_sq, alpha=1.0 - a)
        self._sq.index_copy_(0, index, sq)
        correction = torch.pow(a, t).neg_().add_(1.0).reciprocal_()  # 1 / (1 - a^t)
        bias_i = m_sq.mul_(correction.square())
        # at a tensor's first step m_hat = g and v_hat = g^2 exactly: its variance is 0,
        # not the rounding noise of v_hat - m_hat^2
        v_i = torch.where(t == 1, bias_i, sq.mul_(correction))
        groups = self._group_of.index_select(0, index)
        bias = torch.zeros_like(self.ratios).index_add_(0, groups, bias_i)
        v_sum = torch.zeros_like(self.ratios).index_add_(0, groups, v_i)
        if self.reduce_sums is not None:
            bias, v_sum = self.reduce_sums(bias, v_sum)
        variance = (v_sum - bias).clamp_min_(self.eps)
        self.bias, self.variance = bias, variance
        self.ratios = torch.where(group_mask, bias / variance, torch.nan)
        return self.ratios

    def _squared_norms(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``||x||^2`` of every tensor, as one vector in the statistics dtype.

        Tensors longer than two chunks are cut into chunk views first: the CPU
        ``_foreach_norm`` accumulates a whole tensor in one float32 sum (about 3e-5
        relative error on a few million elements); chunk-wise partial norms, summed
        in float64, are accurate to about 1e-7 at the same speed.
        """
        pieces, owners = [], []
        for i, x in enumerate(tensors):
            n = x.numel()
            if n > 2 * _CHUNK and (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
                parts = x.as_strided((n,), (1,), x.storage_offset()).split(_CHUNK)  # memory order: same norm
            else:
                parts = (x,)
            pieces.extend(parts)
            owners.append(len(parts))
        norms = torch.stack(torch._foreach_norm(pieces)).to(self._device, self._stat_dtype).square_()
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

    def _plan(self):
        self.update_statistics()
        kk = self._num_to_select(self._num_present)
        scales = [0.0] * self.num_groups
        if kk > 0:
            scores = self.ratios.nan_to_num(nan=-math.inf)
            for i in torch.topk(scores, kk).indices.tolist():  # the one host sync of a step
                scales[i] = 1.0
        return scales

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(k=self.k, alpha=self.alpha, eps=self.eps, m=list(self._m), sq=self._sq.clone(),
                     t=self._t.clone(), ratios=self.ratios.clone())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        m = list(state["m"])
        if len(m) != len(self.params):
            raise ValueError(f"state_dict has {len(m)} gradient buffers for {len(self.params)} parameters")
        for i, (buf, p) in enumerate(zip(m, self.params)):
            if buf is not None and buf.shape != _local(p).shape:  # FSDP2: the EMA is this rank's shard
                raise ValueError(f"gradient buffer {i} has shape {tuple(buf.shape)}, parameter has "
                                 f"{tuple(_local(p).shape)}")
        self.alpha, self.eps = float(state["alpha"]), float(state["eps"])
        self.k = state["k"]
        self._m = [None if b is None else b.to(p.device, p.dtype).clone() for b, p in zip(m, self.params)]
        self._sq = state["sq"].to(self._device, self._stat_dtype).clone()
        self._t = state["t"].to(self._device, self._stat_dtype).clone()
        self.ratios = state["ratios"].to(self._device, self._stat_dtype).clone()


class BVGTS(BVGLS):
    """Bias-Variance Guided Tensor Selection: one group per parameter tensor.

    Each step the ``ceil(fraction * n)`` tensors with the largest ratio are updated,
    ``n`` being the number of tensors that have a gradient in this step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, fraction: float = 0.5, alpha: float = 0.9,
                 groups: GroupsSpec = None, *, skip_unselected: bool = False, eps: float = 1e-10,
                 reduce_sums: SumReducer | None = None):
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)
        if groups is None:
            groups = [(f"{g.get('name', f'group{gi}')}.{j}", [p])
                      for gi, g in enumerate(optimizer.param_groups) for j, p in enumerate(g["params"])]
        elif hasattr(groups, "tensor_groups"):  # bvgls.LayerGroups: qualified parameter names
            groups = groups.tensor_groups()
        else:  # one group per tensor of the given groups, names kept
            groups = [(f"{name}.{j}" if len(ps) > 1 else name, [p])
                      for name, ps in _as_named_lists(groups) for j, p in enumerate(ps)]
        super().__init__(optimizer, k=1, alpha=alpha, groups=groups, skip_unselected=skip_unselected,
                         eps=eps, reduce_sums=reduce_sums)
        self.k = None

    def _num_to_select(self, num_present: int) -> int:
        return min(num_present, max(1, math.ceil(self.fraction * num_present)))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["fraction"] = self.fraction
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.fraction = float(state["fraction"])
