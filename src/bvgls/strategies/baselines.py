"""The paper's strategies: the fixed baselines (full, partial ``L<a>-<b>``, linear probing)
and their registrations, with BVG-LS / BVG-TS (``bvgls``, ``bvgls-skip``, ``bvgts``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..base import GroupsSpec, GroupStrategy, as_named_lists
from ..selector import BVGLS, BVGTS
from . import register_strategy


class FixedGroups(GroupStrategy):
    """Update the same groups in every step: full, partial ("L3-6") and linear probing.

    Args:
        trained: 0-based indices of the groups to train.
        freeze: set ``requires_grad=False`` on every other group's parameters, so
            backward skips them (what partial finetuning means in practice). With
            ``freeze=False`` they still get gradients but learning rate 0.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        trained: Sequence[int],
        groups: GroupsSpec = None,
        *,
        freeze: bool = True,
        label: str | None = None,
    ):
        super().__init__(optimizer, groups)
        trained = sorted(set(int(i) for i in trained))
        bad = [i for i in trained if not 0 <= i < self.num_groups]
        if bad or not trained:
            raise ValueError(
                f"trained groups {[i + 1 for i in trained]} are not within 1..{self.num_groups} "
                f"(groups: {', '.join(self.group_names)})"
            )
        self.trained = trained
        self.label = label or f"groups {[i + 1 for i in trained]}"
        self.freeze = freeze
        if freeze:
            for i, params in enumerate(self.group_params):
                if i not in trained:
                    for p in params:
                        p.requires_grad_(False)
                        p.grad = None
        self._scales = [1.0 if i in trained else 0.0 for i in range(self.num_groups)]

    def _plan(self):
        return self._scales

    def __repr__(self) -> str:
        return f"FixedGroups({self.label}, trained={[self.group_names[i] for i in self.trained]})"


def count_groups(optimizer, groups) -> int:
    """How many groups a strategy on ``optimizer`` with ``groups`` would have."""
    return len(optimizer.param_groups) if groups is None else len(as_named_lists(groups))


def full_finetuning(optimizer, groups=None) -> FixedGroups:
    """Every group, every step."""
    n = count_groups(optimizer, groups)
    return FixedGroups(optimizer, range(n), groups, freeze=False, label="full")


def partial_finetuning(
    optimizer, first: int, last: int | None = None, groups=None, *, freeze: bool = True
) -> FixedGroups:
    """Groups ``first..last`` (1-indexed, inclusive; ``last`` defaults to the last group)."""
    n = count_groups(optimizer, groups)
    last = n if last is None else last
    if not 1 <= first <= last <= n:
        raise ValueError(
            f"partial finetuning L{first}-{last} needs 1 <= first <= last <= {n} (this model has {n} groups)"
        )
    return FixedGroups(optimizer, range(first - 1, last), groups, freeze=freeze, label=f"L{first}-{last}")


def linear_finetuning(optimizer, groups=None, *, freeze: bool = True) -> FixedGroups:
    """The last group (the head) only."""
    n = count_groups(optimizer, groups)
    return FixedGroups(optimizer, [n - 1], groups, freeze=freeze, label="linear")


# ---------------------------------------------------------------------- registrations
@register_strategy("full")
def _full(optimizer, groups=None) -> FixedGroups:
    """Full finetuning: every group, every step."""
    return full_finetuning(optimizer, groups)


@register_strategy("linear")
def _linear(optimizer, groups=None, freeze=True) -> FixedGroups:
    """Linear probing: only the last group (head)."""
    return linear_finetuning(optimizer, groups, freeze=freeze)


#: ``bvgls:ema=...``: the gradient EMA's dtype ("param": each parameter's own)
EMA_DTYPES = {"param": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_strategy("bvgls")
def _bvgls(
    optimizer,
    groups=None,
    k=1,
    alpha=0.9,
    probe=1,
    static=None,
    release_state=False,
    ema="param",
    fused=False,
    lag=1,
) -> BVGLS:
    """BVG-LS: the k groups with the largest gradient bias-variance ratio (paper: k=1); probe=P: statistics
    every P-th step, unselected groups frozen in between; static=N: keep the k most selected after N steps;
    release_state=True (lean only): free a frozen group's optimizer state; ema=param|bfloat16|float16: the
    gradient EMA's dtype; fused=True: fold each gradient during backward and free it (selection lags a step;
    lag=0: no lag, the best groups' gradients are held instead)."""
    if ema not in EMA_DTYPES:
        raise ValueError(f"strategy option ema must be one of {', '.join(EMA_DTYPES)}, got {ema!r}")
    return BVGLS(
        optimizer,
        k=k,
        alpha=alpha,
        groups=groups,
        probe=probe,
        static=static,
        release_state=release_state,
        ema_dtype=EMA_DTYPES[ema],
        fused=fused,
        lag=lag,
    )


@register_strategy("bvgls-fused")
def _bvgls_fused(optimizer, groups=None, k=1, alpha=0.9, probe=10, release_state=True, ema="bfloat16", lag=1) -> BVGLS:
    """The large-model preset: bvgls:fused=true:probe=10:release_state=true:ema=bfloat16 (options can be
    changed, e.g. bvgls-fused:probe=1 or bvgls-fused:lag=0)."""
    return _bvgls(
        optimizer,
        groups,
        k=k,
        alpha=alpha,
        probe=probe,
        release_state=release_state and probe > 1,
        ema=ema,
        fused=True,
        lag=lag,
    )


@register_strategy("bvgls-skip")
def _bvgls_skip(optimizer, groups=None, k=1, alpha=0.9, fused=False, lag=1) -> BVGLS:
    """BVG-LS variant: unselected groups skip the optimizer step entirely (no momentum update); fused=True
    and lag as for bvgls."""
    return BVGLS(optimizer, k=k, alpha=alpha, groups=groups, skip_unselected=True, fused=fused, lag=lag)


@register_strategy("bvgts")
def _bvgts(optimizer, groups=None, fraction=0.5, alpha=0.9, fused=False) -> BVGTS:
    """BVG-TS: the fraction of parameter tensors with the largest ratio; fused=True as for bvgls."""
    return BVGTS(optimizer, fraction=fraction, alpha=alpha, groups=groups, fused=fused)
