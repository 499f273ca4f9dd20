"""Every training option, declared once.

:class:`FinetuneConfig` holds the options of one finetuning run. Each field's metadata
says how the option is shown on the command line (flags, help, panel, bounds, choices) and
what kind of option it is:

- ``result``: changes the numbers a run produces; recorded in ``config.json``, must match
  when a run is resumed, and when ``bvgls compare`` reuses a run directory;
- ``recorded``: recorded, but free to differ (device, evaluation cadence);
- ``runtime``: neither (workers, progress bar).

The CLI (``bvgls finetune``, ``bvgls compare``) builds its options from these fields, the
loop validates and records them, the resume check and the grid's reuse check read
:func:`result_keys`, and the benchmark protocol passes its same-named fields through
(:meth:`FinetuneConfig.from_fields`). Adding an option is one field here (plus using it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
AMP_MODES = ("none", "bf16", "fp16")
AUGMENTS = ("default", "paper", "light", "none")

MODEL_AND_DATA, TRAINING, SPEED, OUTPUT = "Model and data", "Training", "Speed", "Output"
RESULT, RECORDED, RUNTIME = "result", "recorded", "runtime"


def option(default: Any = dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] | None = None,
           kind: str = RESULT, panel: str = TRAINING, cli: bool = True, cli_default: Any = dataclasses.MISSING,
           min: float | None = None, max: float | None = None, choices: tuple[str, ...] | None = None):
    """A config field with its CLI and bookkeeping metadata. ``cli=False``: the commands declare
    it themselves (e.g. ``--lr`` in finetune, ``--lrs`` in compare). ``cli_default``: the CLI's
    default for a field the Python API requires."""
    meta = {"help": help, "flags": flags, "kind": kind, "panel": panel, "cli": cli, "cli_default": cli_default,
            "min": min, "max": max, "choices": choices}
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class FinetuneConfig:
    """The options of one finetuning run (see the module docstring for the field kinds)."""

    epochs: int = option(help="Epochs (paper: 50).", flags=("--epochs", "-e"), min=1, cli_default=50)
    lr: float = option(help="Base learning rate.", cli=False)
    strategy: str = option("bvgls", "Strategy spec.", cli=False)
    batch_size: int = option(128, "Examples per step (paper: 128).", flags=("--batch-size", "-b"), min=1)
    optimizer: str | Callable = option("sgd", "sgd: momentum + Nesterov, as in the paper; or adamw.",
                                       choices=OPTIMIZERS)
    momentum: float = option(0.9, "SGD momentum.")
    nesterov: bool = option(True, "Nesterov momentum (SGD).", cli=False)
    weight_decay: float = option(5e-4, "Weight decay (paper: 5e-4).")
    schedule: str = option("cosine", "Learning-rate schedule, per step.", choices=SCHEDULES)
    warmup_epochs: float = option(0.0, "Linear warmup length in epochs.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.", min=1)
    full_backward_chunks: int = option(
        1, "Split the batch of every step whose backward runs through the whole network (the first group trains: "
           "every step of full finetuning and paper BVG-LS, lean BVG-LS's probe steps and steps that train the "
           "stem) into this many chunks, backward one at a time: the same gradient (batch-norm layers see the "
           "smaller chunks) at a lower activation-memory peak.",
        panel=SPEED, min=1)
    label_smoothing: float = option(0.0, "Label smoothing of the training loss.")
    steps_per_epoch: int | None = option(None, "Cap on steps per epoch (smoke tests).", min=1)
    groups: str = option("auto", "Layer grouping scheme the strategy selects from (see `bvgls list`): auto "
                                 "detects the model's stages; resolution: stem, one group per feature-map "
                                 "resolution, head.", flags=("--groups",), panel=MODEL_AND_DATA)
    seed: int = option(0, "Seeds init of the head, shuffling, augmentation.", cli=False)
    val_fraction: float = option(0.0, "Hold out this fraction of the training set as a validation split "
                                      "(reported every epoch; compare chooses the lr on it, never on the test set).")
    amp: str | None = option(None, "Mixed precision: bf16 or fp16 (GPU).", panel=SPEED, choices=AMP_MODES)
    channels_last: bool = option(False, "NHWC memory format (faster convolutions on CPU and GPUs).",
                                 flags=("--channels-last/--no-channels-last",), panel=SPEED)
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda:1, ...", kind=RECORDED, panel=SPEED)
    eval_every: int = option(1, "Evaluate every this many epochs (and after the last).", kind=RECORDED, cli=False)
    num_workers: int | None = option(None, "DataLoader workers; default 0 on CPU, up to 8 on a GPU.",
                                     flags=("--workers",), kind=RUNTIME, panel=SPEED, min=0)
    progress: bool = option(True, "A progress bar per epoch.", flags=("--progress/--no-progress",), kind=RUNTIME,
                            panel=OUTPUT)
    trust_pickle: bool = option(False, "Allow full unpickling of model, weights and checkpoint files (runs code "
                                       "from the file; only for files you trust).", flags=("--trust-pickle",),
                                kind=RUNTIME, panel=MODEL_AND_DATA)

    def __post_init__(self):
        if self.amp == "none":
            self.amp = None
        if self.device is None:
            self.device = "auto"
        self.validate()

    def validate(self) -> None:
        """One ValueError naming the first bad option."""
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        for name, (low, high) in NUMBER_RANGES.items():
            check_number(name, getattr(self, name), low, high)
        if self.batch_size < 1 or self.grad_accum < 1 or self.eval_every < 1 or self.full_backward_chunks < 1:
            raise ValueError("batch_size, grad_accum, full_backward_chunks and eval_every must be >= 1")
        for name in ("schedule", "amp"):
            choices = self.field_meta(name)["choices"]
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise ValueError(f"unknown {name} {value!r}; known: {', '.join(choices)}")
        if isinstance(self.optimizer, str) and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)} (or a callable)")

    # ------------------------------------------------------------------ metadata
    @classmethod
    def field_meta(cls, name: str) -> Mapping[str, Any]:
        return {f.name: f.metadata for f in dataclasses.fields(cls)}[name]

    @classmethod
    def from_fields(cls, source: Any, **overrides) -> FinetuneConfig:
        """A config from the same-named attributes of ``source`` (e.g. a benchmark protocol)
        or keys of a mapping, then ``overrides``."""
        get = source.get if isinstance(source, Mapping) else (lambda k, d: getattr(source, k, d))
        values = {f.name: get(f.name, _MISSING) for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in values.items() if v is not _MISSING}, **overrides})

    def replace(self, **changes) -> FinetuneConfig:
        return dataclasses.replace(self, **changes)

    def record(self) -> dict[str, Any]:
        """The ``result`` and ``recorded`` options as plain JSON values (for ``config.json``)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata["kind"] != RUNTIME:
                value = getattr(self, f.name)
                out[f.name] = value if value is None or isinstance(value, (str, int, float, bool)) else \
                    getattr(value, "__name__", repr(value))
        return out


_MISSING = object()

#: the float options' ranges: (low, high), ``(x, True)`` meaning inclusive; None: unbounded
NUMBER_RANGES: dict[str, tuple[tuple[float, bool] | None, tuple[float, bool] | None]] = {
    "lr": ((0.0, False), None),
    "momentum": ((0.0, True), (1.0, False)),
    "weight_decay": ((0.0, True), None),
    "warmup_epochs": ((0.0, True), None),
    "label_smoothing": ((0.0, True), (1.0, True)),
    "val_fraction": ((0.0, True), (1.0, False)),
}


class SettingError(ValueError):
    """A number option outside its range; :meth:`for_option` words it for a command-line flag."""

    def __init__(self, name: str, requirement: str, value: Any):
        self.name, self.requirement, self.value = name, requirement, value
        super().__init__(self.for_option(name))

    def for_option(self, option: str) -> str:
        return f"{option} must be {self.requirement} (a finite number), got {self.value!r}"


def check_number(name: str, value: Any, low: tuple[float, bool] | None, high: tuple[float, bool] | None) -> None:
    """Raise :class:`SettingError` unless ``value`` is a finite real number within ``low``/``high``."""
    parts = [f"{'>=' if low[1] else '>'} {low[0]:g}"] if low else []
    parts += [f"{'<=' if high[1] else '<'} {high[0]:g}"] if high else []
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low:
        ok = value >= low[0] if low[1] else value > low[0]
    if ok and high:
        ok = value <= high[0] if high[1] else value < high[0]
    if not ok:
        raise SettingError(name, " and ".join(parts), value)


def result_keys(cls: type = FinetuneConfig) -> tuple[str, ...]:
    """The options that change results: they must match on resume and when a run is reused."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("kind") == RESULT)


def field_defaults(cls: type = FinetuneConfig) -> dict[str, Any]:
    """Each field's default (for records written before the field existed)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields the shared CLI options are generated from."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]


@dataclass(kw_only=True)
class DataOptions:
    """How the model and datasets are loaded (shared by ``finetune`` and ``compare``)."""

    weights: str = option("DEFAULT", "DEFAULT (the model's pretrained weights; none exist for tiny-*), a torchvision "
                                     "weights name, none (random init), or a state-dict file.", panel=MODEL_AND_DATA)
    data_root: str = option("data", "Where registered datasets are stored / downloaded to.", kind=RUNTIME,
                            panel=MODEL_AND_DATA)
    download: bool = option(False, "Download a missing registered dataset (needs internet).", kind=RUNTIME,
                            panel=MODEL_AND_DATA)
    augment: str = option("default", "Training augmentation: paper (RandomResizedCrop + flip), light, none; "
                                     "default: the dataset's own.", panel=MODEL_AND_DATA, choices=AUGMENTS)
    image_size: int | None = option(None, "Train and test crop size in px (default: the model's own input size).",
                                    panel=MODEL_AND_DATA, min=1)

    @property
    def augment_override(self) -> str | None:
        """The augmentation to ask the dataset for (None: its own)."""
        return None if self.augment == "default" else self.augment

    def model_input(self, input):
        """The model's ``ModelInput`` with the crop size replaced by ``image_size`` (when given)."""
        return input if self.image_size is None or input is None else dataclasses.replace(input, size=self.image_size)
