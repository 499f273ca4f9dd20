"""bvgls: Bias-Variance Guided Layer Selection for finetuning, as a drop-in optimizer wrapper.

``import bvgls`` loads the library only (strategies, grouping, distributed helpers); the
training runner (:func:`finetune`, :func:`compare`, :class:`History`) is imported on first use.
"""

from . import recommend  # noqa: F401  (bvgls.recommend is usable after import bvgls)
from .base import GroupStrategy, StepReport
from .grouping import LayerGroups, grouping_names, layer_groups, register_grouping
from .selector import BVGLS, BVGTS
from .strategies import (
    STRATEGIES,
    FixedGroups,
    full_finetuning,
    linear_finetuning,
    make_strategy,
    parse_strategy,
    partial_finetuning,
    register_strategy,
    strategy_names,
)

__version__ = "0.1.0"

#: names served lazily from the runner (it needs more than torch at run time, and is not the library)
_RUNNER_EXPORTS = {"finetune": "bvgls.runner.loop", "History": "bvgls.runner.loop", "compare": "bvgls.runner.grid"}

__all__ = [
    "BVGLS",
    "BVGTS",
    "FixedGroups",
    "GroupStrategy",
    "History",
    "LayerGroups",
    "STRATEGIES",
    "StepReport",
    "compare",
    "finetune",
    "full_finetuning",
    "grouping_names",
    "layer_groups",
    "linear_finetuning",
    "make_strategy",
    "parse_strategy",
    "partial_finetuning",
    "register_grouping",
    "register_strategy",
    "strategy_names",
]


def __getattr__(name: str):
    if name in _RUNNER_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_RUNNER_EXPORTS[name]), name)
    raise AttributeError(f"module 'bvgls' has no attribute {name!r}")
