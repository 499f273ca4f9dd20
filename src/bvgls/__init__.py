"""bvgls: Bias-Variance Guided Layer Selection for finetuning, as a drop-in optimizer wrapper."""

from .base import GroupStrategy
from .grouping import LayerGroups, grouping_names, layer_groups, register_grouping
from .selector import BVGLS, BVGTS
from .strategies import (
    STRATEGIES,
    FixedGroups,
    full_finetuning,
    linear_probing,
    make_strategy,
    parse_strategy,
    partial_finetuning,
    register_strategy,
    strategy_names,
)
from .train import History, finetune
from . import peers  # noqa: F401  (registers auto-rgn, lisa, bcd-cyclic, gradual-unfreeze, llrd)
from . import auto_snr  # noqa: F401  (registers auto-snr)

__version__ = "0.1.0"

__all__ = [
    "BVGLS", "BVGTS", "FixedGroups", "GroupStrategy", "History", "LayerGroups", "STRATEGIES", "finetune",
    "full_finetuning", "grouping_names", "layer_groups", "linear_probing", "make_strategy",
    "parse_strategy", "partial_finetuning", "register_grouping", "register_strategy", "strategy_names",
]
