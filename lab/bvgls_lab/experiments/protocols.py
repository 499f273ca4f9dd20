"""The benchmarks' protocols: everything a run depends on, each frozen in a document before it
was run -- :data:`BENCH` (``docs/experiments/offline.md``), :data:`BENCH_V2` (its "Protocol version 2"),
:data:`PRETRAINED` and :data:`PRETRAINED_BATCH` (``docs/experiments/pretrained.md``) and its pilot
subset :data:`PRETRAINED_PILOT` -- and the demos' cut-down versions. :data:`SUITES` names them for
``bvgls-lab bench --protocol``: a suite is one or more (part, protocol) pairs, one per model."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from bvgls.runner.config import FinetuneConfig
from bvgls.runner.lrsearch import LR_LADDER, TIE_BREAKS

from ..offline_tasks import VAL_FRACTION

#: training options the protocol fixes (not protocol fields: they do not change between protocols)
BENCH_FIXED = {
    "optimizer": "sgd",
    "nesterov": True,
    "channels_last": True,
    "num_workers": 0,
    "device": "cpu",
    "progress": False,
}
SUITE = ("fmnist-invert", "fmnist-noise", "digits", "font-letters", "fmnist-pairs")
BENCH_STRATEGIES = ("full", "L2-6", "L3-6", "L4-6", "L5-6", "linear", "bvgls", "bvgts")
PARTIAL = ("L2-6", "L3-6", "L4-6", "L5-6")
SELECTIVE = ("bvgls", "bvgts")


@dataclass(frozen=True)
class Protocol:
    """Everything a benchmark run depends on (recorded in ``protocol.json``)."""

    tasks: tuple[str, ...] = SUITE
    strategies: tuple[str, ...] = BENCH_STRATEGIES
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
    #: a fraction of the pool, or "manifest": n_val / (n_train + n_val) of a built task's manifest.json
    val_fraction: float | str = VAL_FRACTION
    task_seed: int = 0
    #: (task, strategy, lr) triples that skip the search and use that lr (the demo uses the bench's choices)
    fixed_lrs: tuple[tuple[str, str, float], ...] = ()
    #: train/test crop size in px; None: the model's own input size
    image_size: int | None = None
    #: what the per-seed validation split is carved from: the task's "train" folder, or "train+val"
    #: (a built pretrained task's train/ and val/ together, so each seed re-draws the shots)
    pool: str = "train"
    #: lr choice among equal mean validation errors: "lr" (the smaller) or "val_loss" (lower mean loss first)
    tie_break: str = "lr"
    #: the values an lr grid may be extended to
    lr_ladder: tuple[float, ...] = LR_LADDER
    #: "search": an lr search on ``search_seeds``, then new final runs at the chosen lr on ``seeds``;
    #: "sweep": every lr (``lrs``, or the cell's own in ``cell_lrs``) on every seed, evaluated every
    #: ``eval_every`` epochs; the lr with the lowest mean validation error is the cell's choice and its
    #: runs are the cell's reported runs (a run does not depend on how often it is evaluated)
    design: str = "search"
    #: (task, strategy, lrs) triples: the lrs a "sweep" cell runs instead of ``lrs``
    cell_lrs: tuple[tuple[str, str, tuple[float, ...]], ...] = ()
    #: the layer grouping scheme (``bvgls list``); "auto": the model's stage groups
    groups: str = "auto"
    #: the head's dropout probability in place of the model's own (MobileNetV2: 0.2); None: the model's own
    head_dropout: float | None = None

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; known: {', '.join(POOLS)}")
        if self.tie_break not in TIE_BREAKS:
            raise ValueError(f"unknown tie_break {self.tie_break!r}; known: {', '.join(TIE_BREAKS)}")
        if self.design not in DESIGNS:
            raise ValueError(f"unknown design {self.design!r}; known: {', '.join(DESIGNS)}")
        if isinstance(self.val_fraction, str) and self.val_fraction != "manifest":
            raise ValueError(f"val_fraction must be a number or 'manifest', got {self.val_fraction!r}")

    def cell_grid(self, task: str, strategy: str) -> tuple[float, ...]:
        """The lrs a cell starts from: its own in ``cell_lrs``, else ``lrs``."""
        return next((tuple(lrs) for t, s, lrs in self.cell_lrs if (t, s) == (task, strategy)), tuple(self.lrs))

    def fixed_lr(self, task: str, strategy: str) -> float | None:
        return next((lr for t, s, lr in self.fixed_lrs if (t, s) == (task, strategy)), None)

    def training(self, eval_every: int, val_fraction: float | None = None) -> FinetuneConfig:
        """The runs' training options: this protocol's fields named like :class:`FinetuneConfig`'s
        (epochs, batch_size, momentum, ...), the rest fixed for a reproducible CPU benchmark.
        ``val_fraction``: the task's resolved fraction (needed when the protocol's is "manifest")."""
        fraction = self.val_fraction if val_fraction is None else val_fraction
        if isinstance(fraction, str):
            raise ValueError("a 'manifest' validation fraction must be resolved per task (pass val_fraction)")
        return FinetuneConfig.from_fields(self, lr=1.0, eval_every=eval_every, val_fraction=fraction, **BENCH_FIXED)

    @classmethod
    def from_record(cls, record: dict) -> dict:
        """A ``protocol.json`` record with the fields it lacks (written before they existed) at
        their defaults, so an older benchmark directory stays valid."""
        defaults = {f.name: getattr(cls(), f.name) for f in fields(cls)}
        return {**defaults, **record}


POOLS = ("train", "train+val")
DESIGNS = ("search", "sweep")


#: the frozen protocol of docs/experiments/offline.md
BENCH = Protocol()
#: v1's chosen lrs for full and bvgls (docs/results/offline/runs.csv, final runs); version 2 re-runs them only
V1_CHOSEN_LRS = (
    ("fmnist-invert", "full", 0.003),
    ("fmnist-invert", "bvgls", 0.01),
    ("fmnist-noise", "full", 0.001),
    ("fmnist-noise", "bvgls", 0.003),
    ("digits", "full", 0.03),
    ("digits", "bvgls", 0.03),
    ("font-letters", "full", 0.03),
    ("font-letters", "bvgls", 0.1),
    ("fmnist-pairs", "full", 0.003),
    ("fmnist-pairs", "bvgls", 0.003),
)
LEAN_V2 = ("bvgls:probe=10", "bvgls:static=50")
#: docs/experiments/offline.md, "Protocol version 2" (as revised before any run): v1's setting; full and bvgls
#: re-run at v1's chosen lrs (final runs only), the lean variants with their own v1-style lr search
BENCH_V2 = replace(BENCH, strategies=("full", "bvgls") + LEAN_V2, fixed_lrs=V1_CHOSEN_LRS)

#: docs/experiments/offline.md, "Protocol: fused BVG-LS" (frozen before it was run): v1's setting; bvgls and
#: bvgls:fused=true both at the lrs v1's validation search chose for bvgls (final runs only: the fused lr
#: search was cut, as the amendment there records, before any fused run); final seeds 0-2
_BVGLS_LRS = tuple(c for c in V1_CHOSEN_LRS if c[1] == "bvgls")
BENCH_FUSED = replace(
    BENCH,
    strategies=("bvgls", "bvgls:fused=true"),
    seeds=(0, 1, 2),
    fixed_lrs=_BVGLS_LRS + tuple((t, "bvgls:fused=true", lr) for t, _, lr in _BVGLS_LRS),
)
#: docs/experiments/offline.md, "Protocol: fused BVG-LS, version 2" (frozen before it was run): v1's setting;
#: bvgls at v1's chosen lrs (final runs only), bvgls:fused=true (learning-rate-0 steps during backward) with its
#: own v1-style lr search; final seeds 0-4
BENCH_FUSED_V2 = replace(BENCH, strategies=("bvgls", "bvgls:fused=true"), seeds=(0, 1, 2, 3, 4), fixed_lrs=_BVGLS_LRS)

#: docs/experiments/pretrained.md: shared by its parts
PT_COMMON = dict(
    seeds=(0, 1, 2, 3, 4),
    search_seeds=(0,),
    lrs=(0.003, 0.01, 0.03, 0.1),
    extend_grid=True,
    epochs=12,
    batch_size=16,
    eval_every=3,
    schedule="constant",
    momentum=0.9,
    weight_decay=5e-4,
    augment="light",
    weights="DEFAULT",
    task_seed=0,
    image_size=112,
    pool="train+val",
    val_fraction="manifest",
    tie_break="val_loss",
    lr_ladder=LR_LADDER,
)
PT_STRATEGIES_M = (
    "full",
    "L6-10",
    "L8-10",
    "linear",
    "bvgls",
    "bvgts",
    "auto-rgn",
    "auto-snr",
    "lisa",
    "llrd",
    "bvgls:probe=10",
    "bvgls:static=30",
)
#: the pilot subset run before the full protocol (docs/experiments/pretrained.md, "Pilot"), at the grid
#: as first frozen (final seeds cut from 0-2 to 0-1 during the run, as the pilot's text provides)
PRETRAINED_PILOT = Protocol(
    model="mobilenet_v2",
    tasks=("clipart-fine",),
    strategies=("full", "L6-10", "linear", "bvgls", "bvgls:probe=10", "auto-snr"),
    **{**PT_COMMON, "seeds": (0, 1)},
)
#: the amendment made after the pilot, before the first full run (docs/experiments/pretrained.md,
#: "Amendment"): four of the pilot's six choices sat at 0.001, the bottom of the ladder, so the grid
#: starts one step lower and the ladder reaches down to 1e-4
PT_AMENDED_LRS = dict(lrs=(0.001, 0.003, 0.01, 0.03), lr_ladder=(0.0001, 0.0003) + LR_LADDER)
PRETRAINED_M = Protocol(
    model="mobilenet_v2",
    tasks=("clipart-fine", "clipart-coarse"),
    strategies=PT_STRATEGIES_M,
    **{**PT_COMMON, **PT_AMENDED_LRS},
)
PRETRAINED_E = replace(
    PRETRAINED_M,
    model="efficientnet_lite0",
    tasks=("clipart-fine",),
    strategies=("full", "L5-9", "linear", "bvgls", "bvgls:probe=10"),
)
#: the batch-size ablation's batch-128 arm (its batch-16 arm is PRETRAINED_M's full, bvgls and L6-10 cells);
#: final seeds cut from 0-4 to 0-2 before the arm started, to fit the time the arm had (docs/experiments/pretrained.md)
PRETRAINED_BATCH = replace(
    PRETRAINED_M,
    strategies=("full", "bvgls", "L6-10"),
    batch_size=128,
    seeds=(0, 1, 2),
    lrs=(0.01, 0.03, 0.1, 0.3, 1.0),
    lr_ladder=PRETRAINED_M.lr_ladder + (3.0,),
)
#: docs/reproduction.md, "Protocol": the lr sweep (H1) -- part M's settings, every strategy at every lr on
#: every seed, evaluated once, at the end; the lr with the lowest mean validation error is a strategy's
#: own (tuned) lr, the same runs at one lr are the paper's shared-lr comparison. Cut for time before any
#: run finished (docs/reproduction.md, "Cuts"): clipart-fine only, without bvgts; seeds 0-2 at the three
#: central lrs (the core, where the lr is chosen), then seed 0 alone at the two outer lrs (the edges, for
#: robustness); run seed by seed, so what is finished at the deadline is whole seeds.
REPRO_SWEEP = replace(
    PRETRAINED_M,
    tasks=("clipart-fine",),
    strategies=("full", "bvgls", "L6-10", "linear"),
    design="sweep",
    lrs=(0.001, 0.003, 0.01),
    seeds=(0, 1, 2),
    search_seeds=(),
    extend_grid=False,
    eval_every=12,
)
REPRO_SWEEP_EDGES = replace(REPRO_SWEEP, lrs=(0.0003, 0.03), seeds=(0,))
#: the grouping and head arm (H3): bvgls with ``resolution`` groups, with the head's Dropout(0.2) and without,
#: each at its own lr chosen on validation from the sweep's core lrs, seeds 0-2 (compared with the sweep's bvgls
#: and full, stage groups with the Dropout). Full finetuning without the Dropout was cut for time before the arm
#: started (docs/reproduction.md).
REPRO_H3_GROUPS = replace(REPRO_SWEEP, strategies=("bvgls",), groups="resolution")
REPRO_H3_NODROP = replace(REPRO_SWEEP, strategies=("bvgls",), groups="resolution", head_dropout=0.0)
#: the training-length arm (H2): 48 epochs (4x), evaluated every 6, seeds 0-2, each strategy at the lr the
#: sweep's core chose for it on validation (``cell_lrs``, written in from the sweep's summary.json when the
#: core finished; cut for time from the core's three lrs before the arm started, docs/reproduction.md).
REPRO_H2 = replace(
    REPRO_SWEEP,
    strategies=("full", "bvgls", "L6-10"),
    epochs=48,
    eval_every=6,
    cell_lrs=(
        ("clipart-fine", "full", (0.001,)),
        ("clipart-fine", "bvgls", (0.003,)),
        ("clipart-fine", "L6-10", (0.001,)),
    ),
)
#: the lrs the full protocol's validation search chose on clipart-fine (docs/results/pretrained/mobilenet_v2/
#: summary.json; the pilot had chosen the same), for the demo
BENCH_CHOSEN_LRS = (
    ("clipart-fine", "full", 0.001),
    ("clipart-fine", "L6-10", 0.001),
    ("clipart-fine", "linear", 0.003),
    ("clipart-fine", "bvgls", 0.003),
)
#: the stage-group count each model's partial specs (L6-10, L8-10, L5-9) assume
EXPECTED_GROUPS = {"mobilenet_v2": 10, "efficientnet_lite0": 9}

#: ``bvgls-lab bench --protocol NAME``: (part, protocol) pairs, run one after the other
SUITES: dict[str, tuple[tuple[str, Protocol], ...]] = {
    "offline": (("fmnist-resnet", BENCH),),
    "offline-v2": (("fmnist-resnet", BENCH_V2),),
    "offline-fused": (("fmnist-resnet", BENCH_FUSED),),
    "offline-fused-v2": (("fmnist-resnet", BENCH_FUSED_V2),),
    "pretrained": (("mobilenet_v2", PRETRAINED_M), ("efficientnet_lite0", PRETRAINED_E)),
    "pretrained-batch": (("mobilenet_v2-b128", PRETRAINED_BATCH),),
    "pretrained-pilot": (("mobilenet_v2", PRETRAINED_PILOT),),
    "repro-sweep": (("core", REPRO_SWEEP), ("edges", REPRO_SWEEP_EDGES)),
    "repro-h3": (("resolution", REPRO_H3_GROUPS), ("resolution-nodropout", REPRO_H3_NODROP)),
    "repro-h2": (("mobilenet_v2-48ep", REPRO_H2),),
}


def suite(name: str) -> tuple[tuple[str, Protocol], ...]:
    """The named suite; ValueError listing the known names."""
    if name not in SUITES:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name]


#: ``bvgls-lab demo``: two tasks (input-level and label-level shift), one seed, four strategies, each at the lr
#: that ``bvgls-lab bench``'s validation search chose for it (docs/experiments/offline.md), so no search: the demo's
#: numbers are the bench's seed-0 runs of these cells.
DEMO = Protocol(
    tasks=("fmnist-invert", "fmnist-pairs"),
    strategies=("full", "L3-6", "linear", "bvgls"),
    seeds=(0,),
    search_seeds=(),
    fixed_lrs=(
        ("fmnist-invert", "full", 0.003),
        ("fmnist-invert", "L3-6", 0.003),
        ("fmnist-invert", "linear", 0.03),
        ("fmnist-invert", "bvgls", 0.01),
        ("fmnist-pairs", "full", 0.003),
        ("fmnist-pairs", "L3-6", 0.003),
        ("fmnist-pairs", "linear", 0.01),
        ("fmnist-pairs", "bvgls", 0.003),
    ),
)
#: ``bvgls-lab demo`` (the default): the real ImageNet MobileNetV2 on real clip art -- part M of the pretrained
#: protocol on clipart-fine, seed 0, four strategies, each at the lr its validation search chose
#: (docs/results/pretrained), so no search: the demo's numbers are the benchmark's seed-0 runs of these cells.
DEMO_PRETRAINED = replace(
    PRETRAINED_M,
    tasks=("clipart-fine",),
    strategies=("full", "L6-10", "linear", "bvgls"),
    seeds=(0,),
    search_seeds=(),
    fixed_lrs=BENCH_CHOSEN_LRS,
)
#: ``bvgls-lab demo --suite NAME``
DEMOS = {"pretrained": DEMO_PRETRAINED, "fmnist": DEMO}


def demo(name: str) -> Protocol:
    """The named demo; ValueError listing the known names."""
    if name not in DEMOS:
        raise ValueError(f"unknown demo suite {name!r}; known: {', '.join(DEMOS)}")
    return DEMOS[name]
