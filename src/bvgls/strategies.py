"""The paper's baselines and the strategy registry (name -> builder).

Every strategy is a :class:`~bvgls.base.GroupStrategy`, so a training loop treats
them alike: ``make_strategy("L3-6", optimizer, groups)``, then ``.step()`` after
backward. Spec strings: ``full``, ``linear``, ``L<a>-<b>`` (groups a..b trainable,
1-indexed, inclusive), ``bvgls``, ``bvgts``, ``bvgls-skip``, and options after
colons: ``bvgls:k=2:alpha=0.95``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .base import GroupsSpec, GroupStrategy, _as_named_lists
from .selector import BVGLS, BVGTS


class FixedGroups(GroupStrategy):
    """Update the same groups in every step: full, partial ("L3-6") and linear probing.

    Args:
        trained: 0-based indices of the groups to train.
        freeze: set ``requires_grad=False`` on every other group's parameters, so
            backward skips them (what partial finetuning means in practice). With
            ``freeze=False`` they still get gradients but learning rate 0.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, trained: Sequence[int], groups: GroupsSpec = None, *,
                 freeze: bool = True, label: str | None = None):
        super().__init__(optimizer, groups)
        trained = sorted(set(int(i) for i in trained))
        bad = [i for i in trained if not 0 <= i < self.num_groups]
        if bad or not trained:
            raise ValueError(f"trained groups {[i + 1 for i in trained]} are not within 1..{self.num_groups} "
                             f"(groups: {', '.join(self.group_names)})")
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


def full_finetuning(optimizer, groups=None) -> FixedGroups:
    """Every group, every step."""
    n = _count_groups(optimizer, groups)
    return FixedGroups(optimizer, range(n), groups, freeze=False, label="full")


def partial_finetuning(optimizer, first: int, last: int | None = None, groups=None, *, freeze: bool = True) -> FixedGroups:
    """Groups ``first..last`` (1-indexed, inclusive; ``last`` defaults to the last group)."""
    n = _count_groups(optimizer, groups)
    last = n if last is None else last
    if not 1 <= first <= last <= n:
        raise ValueError(f"partial finetuning L{first}-{last} needs 1 <= first <= last <= {n} "
                         f"(this model has {n} groups)")
    return FixedGroups(optimizer, range(first - 1, last), groups, freeze=freeze, label=f"L{first}-{last}")


def linear_probing(optimizer, groups=None, *, freeze: bool = True) -> FixedGroups:
    """The last group (the head) only."""
    n = _count_groups(optimizer, groups)
    return FixedGroups(optimizer, [n - 1], groups, freeze=freeze, label="linear")


def _count_groups(optimizer, groups) -> int:
    return len(optimizer.param_groups) if groups is None else len(_as_named_lists(groups))


# ---------------------------------------------------------------------- registry
@dataclass
class StrategyEntry:
    name: str
    build: Callable[..., GroupStrategy]  # build(optimizer, groups, **options)
    help: str
    needs_all_gradients: bool = False


STRATEGIES: dict[str, StrategyEntry] = {}
_PARTIAL = re.compile(r"L(\d+)-(\d+)")


def register_strategy(name: str, help: str = "", needs_all_gradients: bool = False):
    """Decorator: register ``build(optimizer, groups, **options) -> GroupStrategy`` under ``name``."""
    def deco(build):
        STRATEGIES[name] = StrategyEntry(name, build, help or (build.__doc__ or "").strip().split("\n")[0],
                                         needs_all_gradients)
        return build
    return deco


def strategy_names() -> list[str]:
    return sorted(STRATEGIES) + ["L<a>-<b>"]


def parse_strategy(spec: str) -> tuple[str, dict]:
    """``"bvgls:k=2:alpha=0.95"`` -> ``("bvgls", {"k": 2, "alpha": 0.95})``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a strategy spec must be a non-empty string, got {spec!r}")
    name, *opts = spec.strip().split(":")
    options = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise ValueError(f"strategy option {opt!r} in {spec!r} is not key=value")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    if name not in STRATEGIES and not _PARTIAL.fullmatch(name):
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(strategy_names())}")
    return name, options


def strategy_needs_all_gradients(spec: str) -> bool:
    name, _ = parse_strategy(spec)
    return name in STRATEGIES and STRATEGIES[name].needs_all_gradients


def make_strategy(spec: str, optimizer: torch.optim.Optimizer, groups: GroupsSpec = None) -> GroupStrategy:
    """Build a strategy from its spec string (see the module docstring)."""
    name, options = parse_strategy(spec)
    m = _PARTIAL.fullmatch(name)
    try:
        if m:
            return partial_finetuning(optimizer, int(m.group(1)), int(m.group(2)), groups, **options)
        return STRATEGIES[name].build(optimizer, groups, **options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise ValueError(f"strategy {spec!r}: {e}") from None
        raise


@register_strategy("full")
def _full(optimizer, groups=None):
    """Full finetuning: every group, every step."""
    return full_finetuning(optimizer, groups)


@register_strategy("linear")
def _linear(optimizer, groups=None, freeze=True):
    """Linear probing: only the last group (head)."""
    return linear_probing(optimizer, groups, freeze=freeze)


@register_strategy("bvgls", needs_all_gradients=True)
def _bvgls(optimizer, groups=None, k=1, alpha=0.9, probe=1, static=None):
    """BVG-LS: the k groups with the largest gradient bias-variance ratio (paper: k=1); probe=P: statistics
    every P-th step, unselected groups frozen in between; static=N: keep the k most selected after N steps."""
    return BVGLS(optimizer, k=k, alpha=alpha, groups=groups, probe=probe, static=static)


@register_strategy("bvgls-skip", needs_all_gradients=True)
def _bvgls_skip(optimizer, groups=None, k=1, alpha=0.9):
    """BVG-LS variant: unselected groups skip the optimizer step entirely (no momentum update)."""
    return BVGLS(optimizer, k=k, alpha=alpha, groups=groups, skip_unselected=True)


@register_strategy("bvgts", needs_all_gradients=True)
def _bvgts(optimizer, groups=None, fraction=0.5, alpha=0.9):
    """BVG-TS: the fraction of parameter tensors with the largest ratio."""
    return BVGTS(optimizer, fraction=fraction, alpha=alpha, groups=groups)
