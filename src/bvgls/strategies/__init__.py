"""The strategy registry and spec strings (name -> builder).

Every strategy is a :class:`~bvgls.base.GroupStrategy`, so a training loop treats
them alike: ``make_strategy("L3-6", optimizer, groups)``, then ``.step()`` after
backward. Spec strings: ``full``, ``linear``, ``L<a>-<b>`` (groups a..b trainable,
1-indexed, inclusive), ``bvgls``, ``bvgts``, ``bvgls-skip``, any registered name, and
options after colons: ``bvgls:k=2:alpha=0.95``.

Options are checked the same way for every strategy, from the builder's signature: a
boolean option takes true/false/yes/no/1/0 (any case), an int or float option a number of
that type, and an option the builder does not have is refused, naming the ones it has.
"""

from __future__ import annotations

import ast
import inspect
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..base import GroupsSpec, GroupStrategy
from ..registry import Entry, Registry

PARTIAL_SPEC = re.compile(r"L(\d+)-(\d+)")
PARTIAL_FORM = "L<a>-<b>"
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def is_partial_spec(name: str) -> bool:
    """``L<a>-<b>``: partial finetuning of groups a..b."""
    return PARTIAL_SPEC.fullmatch(name) is not None


@dataclass
class StrategyEntry(Entry):
    """A registered strategy builder ``build(optimizer, groups, **options) -> GroupStrategy``."""

    declared_needs_all_gradients: bool | None = None  # for builders without a return annotation

    @property
    def strategy_class(self) -> type | None:
        """The class the builder returns, from its return annotation (None if not annotated)."""
        try:
            hint = typing.get_type_hints(self.build).get("return")
        except Exception:  # noqa: BLE001 - an unresolvable annotation is no annotation
            return None
        return hint if isinstance(hint, type) and issubclass(hint, GroupStrategy) else None

    @property
    def needs_all_gradients(self) -> bool:
        """Whether the strategy reads every group's gradient (so no group may be frozen):
        the class attribute of what the builder returns."""
        cls = self.strategy_class
        if cls is not None:
            return bool(cls.needs_all_gradients)
        return bool(self.declared_needs_all_gradients)


STRATEGIES: Registry = Registry(
    "strategy",
    entry_type=StrategyEntry,
    title="strategies (--strategy)",
    forms={PARTIAL_FORM: "partial finetuning: groups a..b (1-indexed)"},
)


def register_strategy(name: str, help: str = "", needs_all_gradients: bool | None = None):
    """Decorator: register ``build(optimizer, groups, **options) -> GroupStrategy`` under ``name``.

    Annotate the builder's return type (``-> MyStrategy``): ``needs_all_gradients`` is then read
    from the class; the argument is for builders without an annotation."""
    return STRATEGIES.register(name, help=help, declared_needs_all_gradients=needs_all_gradients)


def strategy_names() -> list[str]:
    return STRATEGIES.names() + [PARTIAL_FORM]


# ---------------------------------------------------------------------- spec strings
@dataclass
class StrategySpec:
    """A parsed spec string: the registered ``name`` (or ``L<a>-<b>``) and typed options."""

    text: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def partial_range(self) -> tuple[int, int] | None:
        m = PARTIAL_SPEC.fullmatch(self.name)
        return (int(m.group(1)), int(m.group(2))) if m else None

    @property
    def needs_all_gradients(self) -> bool:
        return self.partial_range is None and STRATEGIES[self.name].needs_all_gradients

    def builder(self) -> Callable[..., GroupStrategy]:
        if self.partial_range is not None:
            from .baselines import partial_finetuning

            first, last = self.partial_range
            return lambda optimizer, groups=None, **options: partial_finetuning(
                optimizer, first, last, groups, **options
            )
        return STRATEGIES.get(self.name)

    def check_fits(self, num_groups: int) -> None:
        """Raise ValueError if a partial range does not fit a model with ``num_groups`` groups."""
        if self.partial_range is not None:
            first, last = self.partial_range
            if not 1 <= first <= last <= num_groups:
                raise ValueError(
                    f"partial finetuning L{first}-{last} needs 1 <= first <= last <= {num_groups} "
                    f"(this model has {num_groups} groups)"
                )

    def check_options(self) -> None:
        """Raise ValueError for options the builder does not take, naming the ones it does."""
        unknown = sorted(set(self.options) - set(option_types(self)))
        if unknown:
            raise ValueError(
                f"strategy {self.text!r}: unknown option{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(unknown)}; the options of {self.name} are: "
                f"{', '.join(option_types(self)) or 'none'}"
            )

    def build(self, optimizer: torch.optim.Optimizer, groups: GroupsSpec = None) -> GroupStrategy:
        self.check_options()
        return self.builder()(optimizer, groups, **self.options)


def option_types(spec: StrategySpec) -> dict[str, type | None]:
    """The options a strategy's builder takes, with the type each must have (from its default:
    bool, int, float, str; None when the default is None)."""
    if spec.partial_range is not None:
        return {"freeze": bool}
    params = list(inspect.signature(STRATEGIES.get(spec.name)).parameters.values())[1:]  # after the optimizer
    return {
        p.name: (type(p.default) if p.default is not None else None)
        for p in params
        if p.name != "groups"
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is not inspect.Parameter.empty
    }


def convert_option(spec_text: str, key: str, value: str, kind: type | None) -> Any:
    """``value`` as the type the option takes; ValueError naming the option otherwise."""

    def bad(what: str) -> ValueError:
        return ValueError(f"strategy {spec_text!r}: {key} must be {what}, got {value!r}")

    if kind is bool:
        low = value.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise bad("True or False (true/false, yes/no, 1/0)")
    if kind is int:
        try:
            return int(value)
        except ValueError:
            raise bad("an integer") from None
    if kind is float:
        try:
            return float(value)
        except ValueError:
            raise bad("a number") from None
    try:  # str or unknown type: a Python literal (e.g. refresh=5) or the text itself
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
    return parsed if kind is None or isinstance(parsed, (int, float)) and not isinstance(parsed, bool) else value


def parse_spec(spec: str | StrategySpec) -> StrategySpec:
    """``"bvgls:k=2:alpha=0.95"`` -> ``StrategySpec("bvgls", {"k": 2, "alpha": 0.95})``; options the
    builder declares are converted to its types (see the module docstring)."""
    if isinstance(spec, StrategySpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a strategy spec must be a non-empty string, got {spec!r}")
    text = spec.strip()
    name, *opts = text.split(":")
    if name not in STRATEGIES and not is_partial_spec(name):
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(strategy_names())}")
    parsed = StrategySpec(text, name)
    types = option_types(parsed)
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise ValueError(f"strategy option {opt!r} in {spec!r} is not key=value")
        parsed.options[key] = convert_option(text, key, value, types.get(key))
    return parsed


def parse_strategy(spec: str) -> tuple[str, dict]:
    """``"bvgls:k=2:alpha=0.95"`` -> ``("bvgls", {"k": 2, "alpha": 0.95})``."""
    parsed = parse_spec(spec)
    return parsed.name, parsed.options


def strategy_needs_all_gradients(spec: str) -> bool:
    return parse_spec(spec).needs_all_gradients


def make_strategy(
    spec: str | StrategySpec, optimizer: torch.optim.Optimizer, groups: GroupsSpec = None
) -> GroupStrategy:
    """Build a strategy from its spec string (see the module docstring)."""
    return parse_spec(spec).build(optimizer, groups)


# the other strategy modules register themselves; they import this module's registry, so they come last
from . import auto_snr, peers  # noqa: E402,F401  (auto-snr; auto-rgn, lisa, bcd-cyclic, gradual-unfreeze, llrd)
from .baselines import FixedGroups, full_finetuning, linear_finetuning, partial_finetuning  # noqa: E402

__all__ = [
    "STRATEGIES",
    "FixedGroups",
    "StrategyEntry",
    "StrategySpec",
    "full_finetuning",
    "is_partial_spec",
    "linear_finetuning",
    "make_strategy",
    "parse_spec",
    "parse_strategy",
    "partial_finetuning",
    "register_strategy",
    "strategy_names",
    "strategy_needs_all_gradients",
]
