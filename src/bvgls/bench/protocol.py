"""The benchmark's protocol: everything a run depends on, frozen in ``docs/benchmark.md``
(:data:`BENCH`), and the demo's cut-down version (:data:`DEMO`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..runner.config import FinetuneConfig
from .tasks import VAL_FRACTION

#: training options the protocol fixes (not protocol fields: they do not change between protocols)
BENCH_FIXED = {"optimizer": "sgd", "nesterov": True, "channels_last": True, "num_workers": 0, "device": "cpu",
               "progress": False}
SUITE = ("fmnist-invert", "fmnist-noise", "digits", "font-letters", "fmnist-pairs")
STRATEGIES = ("full", "L2-6", "L3-6", "L4-6", "L5-6", "linear", "bvgls", "bvgts")
PARTIAL = ("L2-6", "L3-6", "L4-6", "L5-6")
SELECTIVE = ("bvgls", "bvgts")


@dataclass(frozen=True)
class Protocol:
    """Everything a benchmark run depends on (recorded in ``protocol.json``)."""

    tasks: tuple[str, ...] = SUITE
    strategies: tuple[str, ...] = STRATEGIES
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    search_seeds: tuple[int, ...] = (0, 1)
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1)
    extend_grid: bool = True
    epochs: int = 20
    batch_size: int = 16
    eval_every: int = 5
    schedule: str = "constant"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = "none"
    model: str = "fmnist-resnet"
    weights: str = "DEFAULT"
    val_fraction: float = VAL_FRACTION
    task_seed: int = 0
    #: (task, strategy, lr) triples that skip the search and use that lr (the demo uses the bench's choices)
    fixed_lrs: tuple[tuple[str, str, float], ...] = ()

    def fixed_lr(self, task: str, strategy: str) -> float | None:
        return next((lr for t, s, lr in self.fixed_lrs if (t, s) == (task, strategy)), None)

    def training(self, eval_every: int) -> FinetuneConfig:
        """The runs' training options: this protocol's fields named like :class:`FinetuneConfig`'s
        (epochs, batch_size, momentum, ...), the rest fixed for a reproducible CPU benchmark."""
        return FinetuneConfig.from_fields(self, lr=1.0, eval_every=eval_every, **BENCH_FIXED)


#: the frozen protocol of docs/benchmark.md
BENCH = Protocol()
#: ``bvgls demo``: two tasks (input-level and label-level shift), one seed, four strategies, each at the lr
#: that ``bvgls bench``'s validation search chose for it (docs/benchmark.md), so no search: the demo's
#: numbers are the bench's seed-0 runs of these cells.
DEMO = Protocol(tasks=("fmnist-invert", "fmnist-pairs"), strategies=("full", "L3-6", "linear", "bvgls"),
                seeds=(0,), search_seeds=(), fixed_lrs=(
                    ("fmnist-invert", "full", 0.003), ("fmnist-invert", "L3-6", 0.003),
                    ("fmnist-invert", "linear", 0.03), ("fmnist-invert", "bvgls", 0.01),
                    ("fmnist-pairs", "full", 0.003), ("fmnist-pairs", "L3-6", 0.003),
                    ("fmnist-pairs", "linear", 0.01), ("fmnist-pairs", "bvgls", 0.003)))


