"""The training loop behind ``bvgls finetune`` and ``bvgls compare``: finetune a model with any strategy.

Example::

    from bvgls import finetune
    history = finetune(model, (train_set, test_set), "bvgls", epochs=50, lr=0.01, out_dir="runs/x")
    history.final["test_error"]

Every epoch records train loss, test (and validation) loss and error, wall time, lr, the
fraction of steps in which each group was updated and, for strategies with ``.ratios``
(BVG-LS, BVG-TS), the mean bias-variance ratio of each group. With ``out_dir`` the loop
writes ``config.json``, ``metrics.jsonl`` (one line per epoch), an atomic ``checkpoint.pt``
after every epoch and ``result.json`` when done; ``resume=True`` continues from the
checkpoint and, on CPU, reproduces an uninterrupted run exactly.

Only torch is needed at import time (tqdm and tensorboard are imported when used).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..base import GroupStrategy
from ..grouping import LayerGroups, layer_groups
from ..strategies import make_strategy

CHECKPOINT_FORMAT = "bvgls-checkpoint-v1"
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
AMP_MODES = (None, "bf16", "fp16")
# settings that must not change between an interrupted run and its resumption
_RESUME_KEYS = ("strategy", "epochs", "lr", "batch_size", "optimizer", "momentum", "nesterov", "weight_decay",
                "schedule", "warmup_epochs", "grad_accum", "amp", "seed", "val_fraction", "label_smoothing",
                "steps_per_epoch", "channels_last")


# ---------------------------------------------------------------------- history
@dataclass
class History:
    """What a run recorded: its resolved config, its groups and one dict per finished epoch.

    Epoch dicts have ``epoch`` (1-based), ``steps``, ``lr``, ``train_loss``, ``test_loss``,
    ``test_error`` (percent), ``val_loss``/``val_error`` (None without a validation split),
    ``train_s``, ``eval_s``, ``wall_s``, ``selection_frequency`` (per strategy group),
    ``mean_bvr`` (per strategy group: mean over the epoch's steps, leaving out steps where the
    group's variance was still clamped to eps (its first step), None where not defined),
    ``mean_scale`` (per strategy group, the mean learning-rate multiplier; differs from the
    selection frequency for graded strategies such as llrd) and, when the strategy's groups
    are not the layer groups (BVG-TS), ``layer_selection_frequency``.
    """

    config: dict = field(default_factory=dict)
    group_names: list[str] = field(default_factory=list)
    layer_group_names: list[str] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    finished: bool = False

    @property
    def final(self) -> dict:
        """The last epoch's record (empty before the first epoch)."""
        return self.epochs[-1] if self.epochs else {}

    @property
    def wall_s(self) -> float:
        return float(sum(r["wall_s"] for r in self.epochs))

    def column(self, key: str) -> list:
        return [r.get(key) for r in self.epochs]

    def to_dict(self) -> dict:
        return {"config": self.config, "group_names": self.group_names, "layer_group_names": self.layer_group_names,
                "epochs": self.epochs, "finished": self.finished}

    @classmethod
    def from_dict(cls, d: Mapping) -> History:
        return cls(dict(d.get("config", {})), list(d.get("group_names", [])), list(d.get("layer_group_names", [])),
                   [dict(r) for r in d.get("epochs", [])], bool(d.get("finished", False)))

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> History:
        """Read a run directory's ``config.json`` and ``metrics.jsonl``."""
        run_dir = str(run_dir)
        meta_path = os.path.join(run_dir, "history.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{run_dir!r} is not a bvgls run directory (no history.json)")
        with open(meta_path) as f:
            meta = json.load(f)
        epochs = []
        metrics = os.path.join(run_dir, "metrics.jsonl")
        if os.path.isfile(metrics):
            with open(metrics) as f:
                epochs = [json.loads(line) for line in f if line.strip()]
        meta["epochs"] = epochs
        return cls.from_dict(meta)


# ---------------------------------------------------------------------- callbacks
@dataclass
class TrainState:
    """What callbacks see: the live objects of the run."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    strategy: GroupStrategy
    history: History
    epoch: int = 0
    global_step: int = 0
    out_dir: str | None = None


class Callback:
    """Hooks into :func:`finetune`; override what you need. A plain callable passed in
    ``callbacks`` is called as ``fn(record)`` at the end of every epoch."""

    def on_train_start(self, state: TrainState) -> None: ...

    def on_step_end(self, state: TrainState, loss: torch.Tensor) -> None: ...

    def on_epoch_end(self, state: TrainState, record: dict) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...


class _FunctionCallback(Callback):
    def __init__(self, fn: Callable[[dict], Any]):
        self.fn = fn

    def on_epoch_end(self, state, record):
        self.fn(record)


class TensorBoardLogger(Callback):
    """Epoch metrics, selection frequency and mean BVR per group to TensorBoard."""

    def __init__(self, log_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir)

    def on_epoch_end(self, state, record):
        step = record["epoch"]
        for key in ("train_loss", "test_loss", "test_error", "val_loss", "val_error", "lr"):
            if record.get(key) is not None:
                self.writer.add_scalar(key, record[key], step)
        names = state.history.group_names
        for name, freq in zip(names, record["selection_frequency"]):
            self.writer.add_scalar(f"selection/{name}", freq, step)
        for name, bvr in zip(names, record.get("mean_bvr") or []):
            if bvr is not None:
                self.writer.add_scalar(f"bvr/{name}", bvr, step)
        self.writer.flush()

    def on_train_end(self, state):
        self.writer.close()


# ---------------------------------------------------------------------- helpers
def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: cuda if available, else mps, else cpu."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy (if installed) and torch (all devices)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def epoch_seed(seed: int, epoch: int) -> int:
    """The DataLoader shuffling seed of an epoch. Not ``seed + epoch``: that would give seed 1
    the shuffles of seed 0 shifted by one epoch."""
    return (seed * 1_000_003 + epoch) % 2**63


def _rng_state() -> dict:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))
    except ImportError:
        pass
    return state


def _set_rng_state(state: Mapping) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _atomic_write_bytes(path: str, write: Callable[[str], None]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: str, obj: Any) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    _atomic_write_bytes(path, write)


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _split_data(data: Any) -> dict[str, Any]:
    """``DatasetSplits`` | (train, test) | (train, val, test) | {"train", "test", "val"?} -> dict."""
    if hasattr(data, "train") and hasattr(data, "test"):
        out = {"train": data.train, "test": data.test}
        if getattr(data, "val", None) is not None:
            out["val"] = data.val
        return out
    if isinstance(data, Mapping):
        if "train" not in data or "test" not in data:
            raise ValueError(f"data needs 'train' and 'test' entries, got {sorted(data)}")
        return {k: data[k] for k in ("train", "val", "test") if data.get(k) is not None}
    if isinstance(data, Sequence) and len(data) in (2, 3):
        return dict(zip(("train", "test") if len(data) == 2 else ("train", "val", "test"), data))
    raise TypeError("data must be a DatasetSplits, (train, test), (train, val, test) or a dict of datasets/loaders")


def _make_optimizer(optimizer, param_groups, lr, momentum, nesterov, weight_decay) -> torch.optim.Optimizer:
    if callable(optimizer) and not isinstance(optimizer, str):
        return optimizer(param_groups, lr)
    if optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)} (or a callable)")


def _lr_lambda(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _selection_text(strategy: GroupStrategy) -> str:
    sel = strategy.selected
    if len(sel) == strategy.num_groups:
        return "all"
    if len(sel) > 2:
        return f"{len(sel)}/{strategy.num_groups}"
    return ",".join(strategy.group_names[i] for i in sel) or "-"


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and error (percent) of ``model`` on ``loader``; one host sync."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.long, device=device)
    n = 0
    for x, y in loader:
        x, y = _to_device(x, y, device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        loss_sum += nn.functional.cross_entropy(out.float(), y, reduction="sum").double()
        wrong += (out.argmax(1) != y).sum()
        n += y.numel()
    if n == 0:
        raise ValueError("the evaluation set is empty")
    total, errors = torch.stack([loss_sum, wrong.double()]).tolist()
    return total / n, 100.0 * errors / n


def _nhwc_crash_hazard(model: nn.Module) -> str | None:
    """The first 1x1 strided conv with 4-15 input channels (segfaults in NHWC backward on CPU, torch 2.14)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) and max(mod.stride) > 1 \
                and 3 < mod.in_channels < 16:
            return name
    return None


def _to_device(x, y, device, channels_last):
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


# ---------------------------------------------------------------------- the loop
def finetune(
    model: nn.Module,
    data: Any,
    strategy: str | Callable[..., GroupStrategy] = "bvgls",
    groups: LayerGroups | str | Sequence | None = None,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    optimizer: str | Callable[[list, float], torch.optim.Optimizer] = "sgd",
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    warmup_epochs: float = 0.0,
    grad_accum: int = 1,
    amp: str | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    channels_last: bool = False,
    val_fraction: float = 0.0,
    num_workers: int | None = None,
    label_smoothing: float = 0.0,
    eval_every: int = 1,
    steps_per_epoch: int | None = None,
    stop_after: int | None = None,
    keep_checkpoint: bool = False,
    save_model: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callback | Callable[[dict], Any]] = (),
    tensorboard: bool = False,
    config: Mapping[str, Any] | None = None,
) -> History:
    """Finetune ``model`` with a layer-selection ``strategy``; returns the :class:`History`.

    Args:
        model: the network (e.g. from :func:`bvgls.runner.models.build_model`); moved to ``device``.
            Partial/linear strategies set ``requires_grad=False`` on frozen groups during the
            run; the flags are restored afterwards.
        data: a ``DatasetSplits``, ``(train, test)``, ``(train, val, test)`` or a dict with
            ``train``/``test`` (``val`` optional) holding datasets or DataLoaders. Datasets give
            exact resumption (shuffling is seeded per epoch); DataLoaders are used as given.
        strategy: a spec (``full``, ``L3-6``, ``linear``, ``bvgls``, ``bvgls:k=2``, ``bvgts``, any
            registered name) or ``fn(optimizer, groups) -> GroupStrategy``.
        groups: :class:`LayerGroups`, a grouping scheme name, or patterns; default
            ``layer_groups(model)``.
        epochs, lr, batch_size: as in the paper (50, 0.01 for WRN-50-2, 128).
        optimizer: ``"sgd"`` (momentum, Nesterov, weight decay as given; the paper's),
            ``"adamw"``, or ``fn(param_groups, lr) -> Optimizer``.
        schedule: ``"cosine"`` (to 0 over the run) or ``"constant"``, per step, after a
            linear warmup of ``warmup_epochs``.
        grad_accum: micro-batches per optimizer step (the strategy sees the summed gradient).
        amp: ``None``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast + GradScaler; GPU only).
        device: ``"auto"``/None (cuda > mps > cpu), or any torch device.
        seed: seeds python/numpy/torch at the start and the shuffling of every epoch.
        out_dir: run directory for config, metrics, checkpoint and result; None: nothing written.
        resume: continue from ``out_dir/checkpoint.pt`` if there is one (the settings must match).
        channels_last: NHWC memory format (faster convolutions on CPU and tensor cores);
            on CPU, denormals are flushed to zero during the run for speed.
        val_fraction: carve this fraction out of the training set (stratified, by ``seed``) and
            evaluate on it every epoch; the test set is never used for it.
        num_workers: DataLoader workers; None: 0 on CPU, min(8, cpu count) on accelerators.
        label_smoothing: of the training loss (evaluation losses are plain cross-entropy).
        eval_every: evaluate every this many epochs (and always after the last one).
        steps_per_epoch: cap on optimizer steps per epoch (smoke tests); None: a full pass.
        stop_after: return after this many epochs *in this call* (time-limited jobs; resume later).
        keep_checkpoint: keep ``checkpoint.pt`` after the run finished (default: deleted).
        save_model: write the finetuned weights to ``out_dir/model.pt`` (loadable as a model spec).
        progress: tqdm bar per epoch showing steps, loss and the selected group.
        callbacks: :class:`Callback` objects, or ``fn(record)`` called after every epoch.
        tensorboard: log to ``out_dir/tensorboard`` (needs the tensorboard package).
        config: extra entries recorded in ``config.json`` (e.g. model and dataset names).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if batch_size < 1 or grad_accum < 1 or eval_every < 1:
        raise ValueError("batch_size, grad_accum and eval_every must be >= 1")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if amp not in AMP_MODES:
        raise ValueError(f"unknown amp mode {amp!r}; known: none, bf16, fp16")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (the run directory to resume)")
    device = resolve_device(device)
    if amp == "fp16" and device.type == "cpu":
        raise ValueError("amp='fp16' needs a GPU; on CPU use amp='bf16' or none")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    out_dir = None if out_dir is None else str(out_dir)

    # a finished run is not run again
    if resume and os.path.isfile(os.path.join(out_dir, "result.json")):
        return History.load(out_dir)

    strategy_label = strategy if isinstance(strategy, str) else getattr(strategy, "__name__", repr(strategy))
    settings = dict(strategy=strategy_label, epochs=epochs, lr=lr, batch_size=batch_size,
                    optimizer=optimizer if isinstance(optimizer, str) else repr(optimizer), momentum=momentum,
                    nesterov=nesterov, weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
                    grad_accum=grad_accum, amp=amp, seed=seed, val_fraction=val_fraction,
                    label_smoothing=label_smoothing, steps_per_epoch=steps_per_epoch, channels_last=channels_last,
                    eval_every=eval_every, device=str(device))
    # plain JSON types only: the config goes into config.json and into weights_only checkpoints
    full_config = json.loads(json.dumps({**dict(config or {}), **settings, "torch": str(torch.__version__)},
                                        default=str))

    # ---- data
    splits = _split_data(data)
    if val_fraction:
        if "val" in splits:
            raise ValueError("data already has a validation set; pass val_fraction=0")
        if isinstance(splits["train"], DataLoader):
            raise ValueError("val_fraction needs datasets, not DataLoaders (carve the split yourself)")
        from .data import validation_split
        from ..registry import DatasetSplits
        if not isinstance(data, DatasetSplits):
            data = DatasetSplits(splits["train"], splits["test"], 0)
        splits["train"], splits["val"] = validation_split(data, val_fraction, seed)
    if num_workers is None:
        num_workers = 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)
    pin = device.type == "cuda"
    shuffle_gen = torch.Generator()

    def loader(ds, train: bool):
        if isinstance(ds, DataLoader):
            return ds
        return DataLoader(ds, batch_size=batch_size, shuffle=train, generator=shuffle_gen if train else None,
                          num_workers=num_workers, pin_memory=pin, drop_last=False)

    train_loader = loader(splits["train"], True)
    eval_loaders = {k: loader(splits[k], False) for k in ("val", "test") if k in splits}
    batches = len(train_loader)
    if batches == 0:
        raise ValueError("the training set is empty")
    opt_steps = math.ceil(batches / grad_accum)
    if steps_per_epoch is not None:
        opt_steps = min(opt_steps, int(steps_per_epoch))
    batches_per_epoch = min(batches, opt_steps * grad_accum)

    # ---- model, optimizer, strategy, schedule
    model.to(device)
    hazard = _nhwc_crash_hazard(model) if channels_last and device.type == "cpu" else None
    if hazard:
        warnings.warn(f"channels_last disabled: on CPU, oneDNN's weight gradient of 1x1 strided convolutions with "
                      f"fewer than 16 input channels ({hazard}) can crash the process (uxlfoundation/oneDNN#6035)",
                      stacklevel=2)
        channels_last = False
    if channels_last:
        model.to(memory_format=torch.channels_last)
    trainable_before = {id(p): p.requires_grad for p in model.parameters()}
    if groups is None or isinstance(groups, (str, Sequence, Mapping)) and not isinstance(groups, LayerGroups):
        groups = layer_groups(model, "auto" if groups is None else groups)
    opt = _make_optimizer(optimizer, groups.param_groups(), lr, momentum, nesterov, weight_decay)
    strat = make_strategy(strategy, opt, groups) if isinstance(strategy, str) else strategy(opt, groups)
    if not isinstance(strat, GroupStrategy):
        raise TypeError(f"strategy builder returned a {type(strat).__name__}, not a GroupStrategy")
    total_steps = opt_steps * epochs
    warmup_steps = int(round(warmup_epochs * opt_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(schedule, total_steps, warmup_steps))
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    # strategy groups -> layer groups (they differ for per-tensor strategies such as BVG-TS)
    layer_of_param = {id(p): li for li, (_, ps) in enumerate(groups.named_param_lists()) for p in ps}
    strat_to_layer = [layer_of_param.get(id(ps[0])) if ps else None for ps in strat.group_params]
    per_layer = strat.group_names != groups.names
    history = History(full_config, list(strat.group_names), list(groups.names))
    ratios = getattr(strat, "ratios", None)
    has_ratios = isinstance(ratios, torch.Tensor) and ratios.numel() == strat.num_groups
    clamped_variance = has_ratios and isinstance(getattr(strat, "variance", None), torch.Tensor) \
        and isinstance(getattr(strat, "eps", None), float)

    # ---- resume or start
    start_epoch, global_step = 0, 0
    ckpt_path = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    if resume and os.path.isfile(ckpt_path):
        ckpt = _load_checkpoint(ckpt_path)
        old = ckpt["config"]
        changed = [f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in _RESUME_KEYS if old.get(k) != settings[k]]
        if changed:
            raise ValueError(f"cannot resume {out_dir!r} with different settings ({'; '.join(changed)})")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        strat.load_state_dict(ckpt["strategy"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        history = History.from_dict(ckpt["history"])
        history.config = {**full_config, "resumed_from_epoch": ckpt["epoch"]}
        start_epoch, global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
    else:
        seed_everything(seed)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        _write_json(os.path.join(out_dir, "config.json"), history.config)
        _write_json(os.path.join(out_dir, "history.json"),
                    {k: v for k, v in history.to_dict().items() if k != "epochs"})

    cbs: list[Callback] = [c if isinstance(c, Callback) else _FunctionCallback(c) for c in callbacks]
    if tensorboard:
        if not out_dir:
            raise ValueError("tensorboard=True needs out_dir")
        cbs.append(TensorBoardLogger(os.path.join(out_dir, "tensorboard")))
    state = TrainState(model, opt, strat, history, start_epoch, global_step, out_dir)
    for cb in cbs:
        cb.on_train_start(state)

    bar_factory = None
    if progress:
        try:
            from tqdm.auto import tqdm as bar_factory
        except ImportError:
            bar_factory = None

    flush_denormal = device.type == "cpu" and torch.set_flush_denormal(True)
    epochs_run = 0
    try:
        for epoch in range(start_epoch, epochs):
            if stop_after is not None and epochs_run >= stop_after:
                break
            state.epoch = epoch
            strat.on_epoch_start(epoch)
            model.train()
            shuffle_gen.manual_seed(epoch_seed(seed, epoch))
            counts_before, steps_before = list(strat.counts), strat.num_steps
            scale_sums_before = list(getattr(strat, "scale_sums", []))
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            seen = 0
            if has_ratios:
                bvr_sum = torch.zeros(strat.num_groups, dtype=torch.float64, device=device)
                bvr_n = torch.zeros(strat.num_groups, dtype=torch.float64, device=device)
            bar = bar_factory(total=opt_steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=True,
                              dynamic_ncols=True) if bar_factory else None
            last_shown, step_lr = 0.0, opt.param_groups[0]["lr"]
            t0 = time.perf_counter()
            for i, (x, y) in enumerate(train_loader):
                if i >= batches_per_epoch:
                    break
                x, y = _to_device(x, y, device, channels_last)
                window_start = i - i % grad_accum
                window = min(grad_accum, batches_per_epoch - window_start)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = model(x)
                    loss = criterion(out.float(), y)
                scaled = loss / window
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_sum += loss.detach().double() * y.numel()
                seen += y.numel()
                if i + 1 - window_start < window:
                    continue
                stepped_before = strat.num_steps
                if scaler is not None:
                    scaler.step(opt)  # runs the strategy's hooks on unscaled gradients
                    scaler.update()
                else:
                    strat.step()
                if has_ratios and strat.num_steps > stepped_before:
                    ratios = strat.ratios.to(torch.float64)
                    valid = ~torch.isnan(ratios)
                    if clamped_variance:  # a group's first step has variance 0: BVR = bias / eps, no signal
                        valid &= strat.variance > strat.eps
                    bvr_sum += torch.where(valid, ratios, 0.0)
                    bvr_n += valid
                opt.zero_grad(set_to_none=True)
                step_lr = opt.param_groups[0]["lr"]
                scheduler.step()
                global_step += 1
                state.global_step = global_step
                for cb in cbs:
                    cb.on_step_end(state, loss.detach())
                if bar is not None:
                    bar.update(1)
                    now = time.perf_counter()
                    if now - last_shown > 0.5:  # loss.item() syncs: only when the bar is redrawn
                        bar.set_postfix(loss=f"{loss.item():.4f}", sel=_selection_text(strat), refresh=False)
                        last_shown = now
            train_s = time.perf_counter() - t0
            if bar is not None:
                bar.close()

            t1 = time.perf_counter()
            evals: dict[str, tuple[float, float] | None] = {"val": None, "test": None}
            if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
                for name, ld in eval_loaders.items():
                    evals[name] = evaluate(model, ld, device, amp_dtype, channels_last)
            eval_s = time.perf_counter() - t1

            steps = strat.num_steps - steps_before
            freq = [(c - c0) / steps if steps else 0.0 for c, c0 in zip(strat.counts, counts_before)]
            record: dict[str, Any] = {
                "epoch": epoch + 1, "steps": global_step, "lr": float(step_lr),
                "train_loss": _finite(loss_sum.item() / max(seen, 1)),
                "test_loss": _finite(evals["test"][0]) if evals["test"] else None,
                "test_error": evals["test"][1] if evals["test"] else None,
                "val_loss": _finite(evals["val"][0]) if evals["val"] else None,
                "val_error": evals["val"][1] if evals["val"] else None,
                "train_s": round(train_s, 3), "eval_s": round(eval_s, 3), "wall_s": round(train_s + eval_s, 3),
                "selection_frequency": freq,
                "mean_bvr": [_finite(v) for v in (bvr_sum / bvr_n).tolist()] if has_ratios else None,
            }
            if len(scale_sums_before) == strat.num_groups:  # graded strategies (llrd, auto-rgn): mean lr multiplier
                record["mean_scale"] = [(a - b) / steps if steps else 0.0
                                        for a, b in zip(strat.scale_sums, scale_sums_before)]
            if per_layer:
                layer_freq = []
                for li in range(len(groups)):
                    members = [f for f, lj in zip(freq, strat_to_layer) if lj == li]
                    layer_freq.append(sum(members) / len(members) if members else 0.0)
                record["layer_selection_frequency"] = layer_freq
            history.epochs.append(record)
            epochs_run += 1
            if bar is not None:
                parts = [f"train loss {record['train_loss']:.4f}"]
                for split in ("val", "test"):
                    if record[f"{split}_error"] is not None:
                        parts.append(f"{split} loss {record[f'{split}_loss']:.4f}, "
                                     f"{split} error {record[f'{split}_error']:.2f}%")
                bar.write(f"epoch {epoch + 1}/{epochs}: {'; '.join(parts)} ({record['wall_s']:.1f} s)")
            if out_dir:
                _write_metrics(out_dir, history)
                _save_checkpoint(ckpt_path, model, opt, strat, scheduler, scaler, epoch + 1, global_step, history)
            for cb in cbs:
                cb.on_epoch_end(state, record)

        history.finished = len(history.epochs) == epochs
        if out_dir and history.finished:
            if save_model:
                _save_model(model, os.path.join(out_dir, "model.pt"))
            _write_json(os.path.join(out_dir, "history.json"),
                        {k: v for k, v in history.to_dict().items() if k != "epochs"})
            _write_json(os.path.join(out_dir, "result.json"),
                        {"finished": True, "final": history.final, "wall_s": history.wall_s,
                         "config": history.config})
            if not keep_checkpoint and os.path.isfile(ckpt_path):
                os.remove(ckpt_path)
        for cb in cbs:
            cb.on_train_end(state)
    finally:
        strat.remove()
        for p in model.parameters():
            p.requires_grad_(trainable_before.get(id(p), True))
        if flush_denormal:
            torch.set_flush_denormal(False)
    return history


# ---------------------------------------------------------------------- files
def _write_metrics(out_dir: str, history: History) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            for rec in history.epochs:
                f.write(json.dumps(rec) + "\n")
    _atomic_write_bytes(os.path.join(out_dir, "metrics.jsonl"), write)


def _save_checkpoint(path, model, opt, strat, scheduler, scaler, epoch, global_step, history) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT, "epoch": epoch, "global_step": global_step,
        "model": model.state_dict(), "optimizer": opt.state_dict(), "strategy": strat.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(), "history": history.to_dict(), "config": history.config,
    }
    _atomic_write_bytes(path, lambda tmp: torch.save(payload, tmp))


def _load_checkpoint(path: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a third-party strategy state with python objects; we wrote this file
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is not a bvgls checkpoint")
    return ckpt


def _save_model(model: nn.Module, path: str) -> None:
    if hasattr(model, "bvgls_spec"):
        from .models import save_model_file
        save_model_file(model, path)
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        _atomic_write_bytes(path, lambda tmp: torch.save(state, tmp))
