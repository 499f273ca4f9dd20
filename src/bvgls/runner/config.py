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
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
AMP_MODES = ("none", "bf16", "fp16")
AUGMENTS = ("default", "paper", "light", "none")

#: the options a grid of runs (``compare``) sets per run itself, so not among its training options
GRID_AXES = ("lr", "seed", "strategy")

MODEL_AND_DATA, TRAINING, SPEED, OUTPUT = "Model and data", "Training", "Speed", "Output"
RESULT, RECORDED, RUNTIME = "result", "recorded", "runtime"


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flags: tuple[str, ...] | None = None,
    kind: str = RESULT,
    panel: str = TRAINING,
    cli: bool = True,
    cli_default: Any = dataclasses.MISSING,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    choices: tuple[str, ...] | None = None,
):
    """A config field with its CLI and bookkeeping metadata, and the checks of its value: the
    field's type, ``min``/``max`` (inclusive, or exclusive with ``min_open``/``max_open``) and
    ``choices``. Those checks run when the dataclass is built (:func:`check_fields`), from Python
    and from the command line alike. ``cli=False``: not a command-line option (set by the
    command, e.g. the evaluation cadence). ``cli_default``: the CLI's default for a field the
    Python API requires."""
    meta = {
        "help": help,
        "flags": flags,
        "kind": kind,
        "panel": panel,
        "cli": cli,
        "cli_default": cli_default,
        "min": min,
        "max": max,
        "min_open": min_open,
        "max_open": max_open,
        "choices": choices,
    }
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class FinetuneConfig:
    """The options of one finetuning run (see the module docstring for the field kinds)."""

    epochs: int = option(help="Epochs (paper: 50).", flags=("--epochs", "-e"), min=1, cli_default=50)
    lr: float = option(help="Base learning rate (paper, WRN-50-2: 0.01).", min=0.0, min_open=True, cli_default=0.01)
    strategy: str = option(
        "bvgls",
        "bvgls, bvgls:k=2, bvgts, full, linear, L<a>-<b> (groups a..b, 1-indexed), or any registered one.",
        flags=("--strategy", "-s"),
    )
    batch_size: int = option(128, "Examples per step (paper: 128).", flags=("--batch-size", "-b"), min=1)
    optimizer: str | Callable = option(
        "sgd", "sgd: momentum + Nesterov, as in the paper; or adamw.", choices=OPTIMIZERS
    )
    momentum: float = option(0.9, "SGD momentum.", min=0.0, max=1.0, max_open=True)
    nesterov: bool = option(True, "Nesterov momentum (SGD).", cli=False)
    weight_decay: float = option(5e-4, "Weight decay (paper: 5e-4).", min=0.0)
    schedule: str = option("cosine", "Learning-rate schedule, per step.", choices=SCHEDULES)
    warmup_epochs: float = option(0.0, "Linear warmup length in epochs.", min=0.0)
    grad_accum: int = option(1, "Micro-batches per optimizer step.", min=1)
    full_backward_chunks: int = option(
        1,
        "Split the batch of every step whose backward runs through the whole network (the first group trains: "
        "every step of full finetuning and paper BVG-LS, lean BVG-LS's probe steps and steps that train the "
        "stem) into this many chunks, backward one at a time: the same gradient (batch-norm layers see the "
        "smaller chunks) at a lower activation-memory peak.",
        panel=SPEED,
        min=1,
    )
    label_smoothing: float = option(0.0, "Label smoothing of the training loss.", min=0.0, max=1.0)
    steps_per_epoch: int | None = option(None, "Cap on steps per epoch (smoke tests).", min=1)
    groups: str = option(
        "auto",
        "Layer grouping scheme the strategy selects from (see `bvgls list`): auto "
        "detects the model's stages; resolution: stem, one group per feature-map "
        "resolution, head.",
        flags=("--groups",),
        panel=MODEL_AND_DATA,
    )
    seed: int = option(0, "Seeds init of the head, shuffling, augmentation.")
    val_fraction: float = option(
        0.0,
        "Hold out this fraction of the training set as a validation split "
        "(reported every epoch; compare chooses the lr on it, never on the test set).",
        min=0.0,
        max=1.0,
        max_open=True,
    )
    amp: str | None = option(None, "Mixed precision: bf16 or fp16 (GPU).", panel=SPEED, choices=AMP_MODES)
    channels_last: bool = option(
        False,
        "NHWC memory format (faster convolutions on CPU and GPUs).",
        flags=("--channels-last/--no-channels-last",),
        panel=SPEED,
    )
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda:1, ...", kind=RECORDED, panel=SPEED)
    eval_every: int = option(
        1, "Evaluate every this many epochs (and after the last).", kind=RECORDED, cli=False, min=1
    )
    num_workers: int | None = option(
        None,
        "DataLoader workers; default 0 on CPU, up to 8 on a GPU.",
        flags=("--workers",),
        kind=RUNTIME,
        panel=SPEED,
        min=0,
    )
    progress: bool = option(
        True, "A progress bar per epoch.", flags=("--progress/--no-progress",), kind=RUNTIME, panel=OUTPUT
    )
    trust_pickle: bool = option(
        False,
        "Allow full unpickling of model, weights and checkpoint files (runs code "
        "from the file; only for files you trust).",
        flags=("--trust-pickle",),
        kind=RUNTIME,
        panel=MODEL_AND_DATA,
    )

    def __post_init__(self):
        if self.amp == "none":
            self.amp = None
        if self.device is None:
            self.device = "auto"
        check_fields(self)

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

    def options(self, *, without: Sequence[str] = ()) -> dict[str, Any]:
        """The fields as the keyword options :func:`~bvgls.runner.loop.finetune` and
        :func:`~bvgls.runner.grid.compare` take, less the names in ``without``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in without}

    def record(self) -> dict[str, Any]:
        """The ``result`` and ``recorded`` options as plain JSON values (for ``config.json``)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata["kind"] != RUNTIME:
                value = getattr(self, f.name)
                out[f.name] = (
                    value
                    if value is None or isinstance(value, (str, int, float, bool))
                    else getattr(value, "__name__", repr(value))
                )
        return out


_MISSING = object()


class SettingError(ValueError):
    """An option whose value is refused by its field's declaration; :meth:`for_option` words it
    for a command-line flag. ``choices``: the value is not one of them."""

    def __init__(self, name: str, requirement: str, value: Any, choices: tuple[str, ...] | None = None):
        self.name, self.requirement, self.value, self.choices = name, requirement, value, choices
        super().__init__(self.for_option(name))

    def for_option(self, option: str) -> str:
        if self.choices:
            return f"unknown {option} {self.value!r}; known: {', '.join(self.choices)}"
        return f"{option} must be {self.requirement}, got {self.value!r}"


def check_fields(obj: Any) -> None:
    """Check every field of the dataclass ``obj`` against its declaration (type, bounds,
    choices); :class:`SettingError` naming the first bad one."""
    hints = _type_hints(type(obj))
    for f in dataclasses.fields(obj):
        check_value(f.name, getattr(obj, f.name), hints[f.name], f.metadata)


def check_value(name: str, value: Any, hint: Any, meta: Mapping[str, Any]) -> None:
    """One field's value against its type hint and its metadata's ``min``/``max``/``choices``."""
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in kinds:
        return
    number = next((k for k in (bool, int, float) if k in kinds), None)
    if number is not None and not (_is_a(value, number) and _within(value, meta)):
        bounds = _bounds_text(meta)
        raise SettingError(name, f"{bounds} ({_NOUNS[number]})" if bounds else _NOUNS[number], value)
    choices = meta.get("choices")
    if choices and isinstance(value, str) and value not in choices:
        raise SettingError(name, "", value, choices=tuple(choices))


_NOUNS = {bool: "true or false", int: "an integer", float: "a finite number"}


def _is_a(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        return False
    return kind is int or math.isfinite(value)


def _within(value: float, meta: Mapping[str, Any]) -> bool:
    if isinstance(value, bool):
        return True
    low, high = meta.get("min"), meta.get("max")
    if low is not None and (value <= low if meta.get("min_open") else value < low):
        return False
    return high is None or (value < high if meta.get("max_open") else value <= high)


def _bounds_text(meta: Mapping[str, Any]) -> str:
    parts = [] if meta.get("min") is None else [f"{'>' if meta.get('min_open') else '>='} {meta['min']:g}"]
    parts += [] if meta.get("max") is None else [f"{'<' if meta.get('max_open') else '<='} {meta['max']:g}"]
    return " and ".join(parts)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def result_keys(cls: type = FinetuneConfig) -> tuple[str, ...]:
    """The options that change results: they must match on resume and when a run is reused."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("kind") == RESULT)


def field_defaults(cls: type = FinetuneConfig) -> dict[str, Any]:
    """Each field's default (for records written before the field existed)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def cli_fields(cls: type, without: Sequence[str] = ()) -> list[dataclasses.Field]:
    """The fields the shared CLI options are generated from (less those named in ``without``)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli") and f.name not in without]


@dataclass(kw_only=True)
class DataOptions:
    """How the model and datasets are loaded (shared by ``finetune`` and ``compare``)."""

    weights: str = option(
        "DEFAULT",
        "DEFAULT (the model's pretrained weights; none exist for tiny-*), a torchvision "
        "weights name, none (random init), or a state-dict file.",
        panel=MODEL_AND_DATA,
    )
    data_root: str = option(
        "data", "Where registered datasets are stored / downloaded to.", kind=RUNTIME, panel=MODEL_AND_DATA
    )
    download: bool = option(
        False, "Download a missing registered dataset (needs internet).", kind=RUNTIME, panel=MODEL_AND_DATA
    )
    augment: str = option(
        "default",
        "Training augmentation: paper (RandomResizedCrop + flip), light, none; default: the dataset's own.",
        panel=MODEL_AND_DATA,
        choices=AUGMENTS,
    )
    image_size: int | None = option(
        None, "Train and test crop size in px (default: the model's own input size).", panel=MODEL_AND_DATA, min=1
    )

    def __post_init__(self):
        check_fields(self)

    @property
    def augment_override(self) -> str | None:
        """The augmentation to ask the dataset for (None: its own)."""
        return None if self.augment == "default" else self.augment

    def loading(self) -> dict[str, Any]:
        """The options as the keyword arguments :func:`~bvgls.runner.grid.compare` takes (``augment``:
        None for the dataset's own)."""
        return {**dataclasses.asdict(self), "augment": self.augment_override}

    def model_input(self, input):
        """The model's ``ModelInput`` with the crop size replaced by ``image_size`` (when given)."""
        return input if self.image_size is None or input is None else dataclasses.replace(input, size=self.image_size)
