"""The training loop behind ``bvgls finetune`` and ``bvgls compare``: finetune a model with any strategy.

Example::

    from bvgls import finetune
    history = finetune(model, (train_set, test_set), "bvgls", epochs=50, lr=0.01, out_dir="runs/x")
    history.final["test_error"]

Every epoch records train loss, test (and validation) loss and error, wall time, lr, the
fraction of steps in which each group was updated and, for strategies with ratios (BVG-LS,
BVG-TS), the mean bias-variance ratio of each group (:mod:`.tracker`). With ``out_dir`` the
loop writes a run directory (:mod:`.rundir`); ``resume=True`` continues from its checkpoint
and, on CPU, reproduces an uninterrupted run exactly.

The pieces: :func:`setup` (data, model, optimizer, strategy, schedule, resume),
:func:`train_one_epoch`, :func:`evaluate_epoch`, :func:`epoch_record`, :func:`save_epoch`
and :func:`finish`. Options are the fields of :class:`~.config.FinetuneConfig`.
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
from ..strategies import StrategySpec, make_strategy
from . import rundir
from .callbacks import Callback, TensorBoardLogger, TrainState, as_callback
from .config import FinetuneConfig, field_defaults, result_keys
from .models import save_model as write_model_file
from .nhwc import apply_channels_last, nhwc_crash_hazard  # noqa: F401  (re-exported)
from .rundir import History
from .tracker import SelectionTracker

__all__ = ["Callback", "History", "TrainState", "evaluate", "finetune", "resolve_device", "seed_everything"]


# ---------------------------------------------------------------------- helpers
def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: cuda if available, else mps, else cpu. Any other device must exist
    here (ValueError otherwise, before anything is loaded)."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device {str(device)!r} is not a device; use --device auto, cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index or 0) >= count:
            raise ValueError(
                f"device {str(device)!r} is not available here ({count} cuda device(s)); use --device cpu or auto"
            )
    elif dev.type == "mps" and not mps_available():
        raise ValueError(
            f"device {str(device)!r} is not available here (torch.backends.mps.is_available() is "
            "False); use --device cpu or auto"
        )
    elif dev.type not in ("cpu", "cuda", "mps"):
        module = getattr(torch, dev.type, None)
        if module is None or not getattr(module, "is_available", lambda: False)():
            raise ValueError(f"device {str(device)!r} is not available here; use --device cpu or auto")
    return dev


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


def epoch_rng_seed(seed: int, epoch: int) -> int:
    """The global RNG seed of an epoch's training: augmentation in the main process, dropout and
    any strategy drawing from the global streams. Re-seeded every epoch so that what ran before
    (evaluation draws DataLoader base seeds from the global stream, the caller may draw too)
    cannot change the trajectory; distinct from :func:`epoch_seed` so shuffling and augmentation
    are not drawn from the same stream."""
    return (seed * 1_000_003 + epoch + 0x5EED_0000_0000) % 2**63


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def split_data(data: Any) -> dict[str, Any]:
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


def make_optimizer(cfg: FinetuneConfig, param_groups) -> torch.optim.Optimizer:
    if callable(cfg.optimizer) and not isinstance(cfg.optimizer, str):
        return cfg.optimizer(param_groups, cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            param_groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def selection_text(strategy: GroupStrategy) -> str:
    sel = strategy.selected
    if len(sel) == strategy.num_groups:
        return "all"
    if len(sel) > 2:
        return f"{len(sel)}/{strategy.num_groups}"
    return ",".join(strategy.group_names[i] for i in sel) or "-"


def to_device(x, y, device, channels_last):
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None = None, channels_last: bool = False
) -> tuple[float, float]:
    """Mean cross-entropy and error (percent) of ``model`` on ``loader``; one host sync."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.long, device=device)
    n = 0
    for x, y in loader:
        x, y = to_device(x, y, device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        loss_sum += nn.functional.cross_entropy(out.float(), y, reduction="sum").double()
        wrong += (out.argmax(1) != y).sum()
        n += y.numel()
    if n == 0:
        raise ValueError("the evaluation set is empty")
    total, errors = torch.stack([loss_sum, wrong.double()]).tolist()
    return total / n, 100.0 * errors / n


# ---------------------------------------------------------------------- the run
@dataclass
class Run:
    """The live objects of one finetuning run (built by :func:`setup`)."""

    cfg: FinetuneConfig
    model: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    train_loader: Any
    eval_loaders: dict[str, Any]
    shuffle_gen: torch.Generator
    opt_steps: int
    batches_per_epoch: int
    groups: LayerGroups
    optimizer: torch.optim.Optimizer
    strategy: GroupStrategy
    scheduler: Any
    scaler: Any
    criterion: nn.Module
    history: History
    out_dir: str | None
    tracker: SelectionTracker | None = None
    state: TrainState | None = None
    callbacks: list[Callback] = field(default_factory=list)
    start_epoch: int = 0
    global_step: int = 0

    @property
    def checkpoint_path(self) -> str | None:
        return os.path.join(self.out_dir, rundir.CHECKPOINT_FILE) if self.out_dir else None


def make_loaders(data: Any, cfg: FinetuneConfig, device: torch.device):
    """Train and evaluation loaders (carving the validation split if asked), the shuffling
    generator, optimizer steps per epoch and batches per epoch."""
    splits = split_data(data)
    if cfg.val_fraction:
        if "val" in splits:
            raise ValueError("data already has a validation set; pass val_fraction=0")
        if isinstance(splits["train"], DataLoader):
            raise ValueError("val_fraction needs datasets, not DataLoaders (carve the split yourself)")
        from ..registry import DatasetSplits
        from .data import validation_split

        if not isinstance(data, DatasetSplits):
            data = DatasetSplits(splits["train"], splits["test"], 0)
        splits["train"], splits["val"] = validation_split(data, cfg.val_fraction, cfg.seed)
    workers = resolve_workers(cfg, device)
    shuffle_gen = torch.Generator()

    def loader(ds, train: bool):
        if isinstance(ds, DataLoader):
            return ds
        # an evaluation loader gets its own generator: without one, each pass would draw its
        # workers' base seed from the global RNG that training's augmentation and dropout use
        return DataLoader(
            ds,
            batch_size=cfg.batch_size,
            shuffle=train,
            generator=shuffle_gen if train else torch.Generator(),
            num_workers=workers,
            pin_memory=device.type == "cuda",
            drop_last=False,
        )

    train_loader = loader(splits["train"], True)
    eval_loaders = {k: loader(splits[k], False) for k in ("val", "test") if k in splits}
    batches = len(train_loader)
    if batches == 0:
        raise ValueError("the training set is empty")
    opt_steps = math.ceil(batches / cfg.grad_accum)
    if cfg.steps_per_epoch is not None:
        opt_steps = min(opt_steps, int(cfg.steps_per_epoch))
    return train_loader, eval_loaders, shuffle_gen, opt_steps, min(batches, opt_steps * cfg.grad_accum)


def resolve_workers(cfg: FinetuneConfig, device: torch.device) -> int:
    """DataLoader workers: the option, or 0 on CPU and up to 8 on a GPU."""
    if cfg.num_workers is not None:
        return int(cfg.num_workers)
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def prepare_model(model: nn.Module, cfg: FinetuneConfig, device: torch.device) -> bool:
    """Move ``model`` to ``device`` (NHWC if asked and safe: :mod:`.nhwc`); returns whether channels_last is on."""
    model.to(device)
    channels_last, refusal = apply_channels_last(model, device, cfg.channels_last)
    if refusal:
        warnings.warn(f"channels_last disabled: {refusal}", stacklevel=3)
    return channels_last


def attach_strategy(model, groups, strategy, cfg: FinetuneConfig):
    """Layer groups, optimizer and strategy for ``model``."""
    if groups is None or isinstance(groups, (str, Sequence, Mapping)) and not isinstance(groups, LayerGroups):
        groups = layer_groups(model, "auto" if groups is None else groups)
    opt = make_optimizer(cfg, groups.param_groups())
    if isinstance(strategy, (str, StrategySpec)):
        strat = make_strategy(strategy, opt, groups)
    else:
        strat = strategy(opt, groups)
    if not isinstance(strat, GroupStrategy):
        raise TypeError(f"strategy builder returned a {type(strat).__name__}, not a GroupStrategy")
    return groups, opt, strat


#: below this many expected updates per group, a selection strategy is warned about
FEW_UPDATES = 30


def few_updates_message(strategy: GroupStrategy, total_steps: int, label: str) -> str | None:
    """The warning for a strategy that updates only some groups per step and will give a group
    fewer than :data:`FEW_UPDATES` expected updates over ``total_steps``; None otherwise."""
    expected = strategy.expected_updates(total_steps)
    if expected is None or expected >= FEW_UPDATES:
        return None
    return (
        f"{label}: a layer group it rotates through gets about {expected:.1f} optimizer updates in this run "
        f"(expected updates per group = {total_steps} optimizer steps x groups updated per step / groups "
        f"selected from), fewer than {FEW_UPDATES}: selection strategies tend to trail full finetuning at "
        "so few updates; train more steps (more epochs, a smaller batch size) or use a fixed strategy"
    )


def check_fused(strategy: GroupStrategy, cfg: FinetuneConfig) -> None:
    """Fused BVG-LS folds each gradient once, during the one backward pass of an optimizer step, before
    any GradScaler could unscale it: refuse what would give it other gradients."""
    if not getattr(strategy, "fused", False):
        return
    if cfg.grad_accum > 1 or cfg.full_backward_chunks > 1:
        raise ValueError(
            f"{cfg.strategy}: fused=true folds each gradient once per optimizer step during its one "
            "backward pass; set grad_accum=1 and full_backward_chunks=1, or use fused=false"
        )
    if cfg.amp == "fp16":
        raise ValueError(
            f"{cfg.strategy}: fused=true cannot run under fp16's GradScaler (it would fold scaled "
            "gradients and steps the scaler skips); use amp=bf16 or none, or fused=false"
        )


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated on the GPU since the epoch began, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # Unix only: imported here so that importing the runner does not need it

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kibibytes on Linux


def prepare_run(model, data, strategy, groups, cfg: FinetuneConfig, out_dir: str | None, record: dict) -> Run:
    """Everything before the first epoch, except resuming (:func:`restore_or_seed`)."""
    device = resolve_device(cfg.device)
    if cfg.amp == "fp16" and device.type == "cpu":
        raise ValueError("amp='fp16' needs a GPU; on CPU use amp='bf16' or none")
    record = {**record, "device": str(device), "num_workers": resolve_workers(cfg, device)}
    train_loader, eval_loaders, shuffle_gen, opt_steps, batches_per_epoch = make_loaders(data, cfg, device)
    channels_last = prepare_model(model, cfg, device)
    groups, opt, strat = attach_strategy(model, cfg.groups if groups is None else groups, strategy, cfg)
    check_fused(strat, cfg)
    total_steps = opt_steps * cfg.epochs
    few = few_updates_message(strat, total_steps, cfg.strategy)
    if few:
        warnings.warn(few, UserWarning, stacklevel=3)
    warmup_steps = int(round(cfg.warmup_epochs * opt_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.schedule, total_steps, warmup_steps))
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    history = History(record, list(strat.group_names), list(groups.names))
    return Run(
        cfg,
        model,
        device,
        {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp),
        channels_last,
        train_loader,
        eval_loaders,
        shuffle_gen,
        opt_steps,
        batches_per_epoch,
        groups,
        opt,
        strat,
        scheduler,
        scaler,
        nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        history,
        out_dir,
    )


#: besides the result options, what a resumption must keep to reproduce the run exactly: with
#: DataLoader workers the augmentation draws from per-worker random streams (recorded resolved)
RESUME_EXACT = ("num_workers",)


def check_resumable(old: Mapping[str, Any], new: Mapping[str, Any], run_dir: str) -> None:
    """The result-changing settings of a run and its resumption must match."""
    keys = list(result_keys()) + [k for k in RESUME_EXACT if k in old]  # older checkpoints lack them
    old = {**field_defaults(), **old}  # an option added later ran at its default
    changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in keys if old.get(k) != new[k]]
    if changed:
        raise ValueError(f"cannot resume {run_dir!r} with different settings ({'; '.join(changed)})")


def restore_or_seed(run: Run, resume: bool) -> None:
    """Load the checkpoint when resuming one, else seed everything; then write the run's metadata."""
    ckpt_path = run.checkpoint_path
    if resume and os.path.isfile(ckpt_path):
        ckpt = rundir.load_checkpoint(ckpt_path, trust_pickle=run.cfg.trust_pickle)
        check_resumable(ckpt["config"], run.history.config, run.out_dir)
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.strategy.load_state_dict(ckpt["strategy"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        if run.scaler is not None and ckpt.get("scaler"):
            run.scaler.load_state_dict(ckpt["scaler"])
        rundir.set_rng_state(ckpt["rng"])
        config = {**run.history.config, "resumed_from_epoch": ckpt["epoch"]}
        run.history = History.from_dict(ckpt["history"])
        run.history.config = config
        run.start_epoch, run.global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
    else:
        seed_everything(run.cfg.seed)
    if run.out_dir:
        rundir.prepare_out_dir(run.out_dir, "out_dir")
        rundir.write_json(os.path.join(run.out_dir, rundir.CONFIG_FILE), run.history.config)
        rundir.write_history(run.out_dir, run.history)


def progress_bar_factory(enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


# ---------------------------------------------------------------------- one epoch
@dataclass
class EpochTraining:
    loss_sum: torch.Tensor
    seen: int
    step_lr: float
    seconds: float


def optimizer_step(run: Run) -> None:
    """One strategy step (through the GradScaler under fp16: it unscales first)."""
    if run.scaler is not None:
        run.scaler.step(run.optimizer)  # runs the strategy's hooks on unscaled gradients
        run.scaler.update()
    else:
        run.strategy.step()
    run.optimizer.zero_grad(set_to_none=True)


def forward_backward(run: Run, x: torch.Tensor, y: torch.Tensor, window: int) -> torch.Tensor:
    """Forward and backward of one batch (``1 / window`` of an optimizer step); its mean loss, detached.
    A step whose backward runs through the whole network (the first group trains) runs in
    ``full_backward_chunks`` chunks: the same summed gradient at a lower activation peak."""
    chunks = run.cfg.full_backward_chunks if run.strategy.backward_reaches_first_group() else 1
    parts = list(zip(x.chunk(chunks), y.chunk(chunks)))
    losses = []
    for xc, yc in parts:
        with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            loss = run.criterion(run.model(xc).float(), yc)
        if len(parts) > 1:  # each chunk's share of the batch mean, as one pass would give
            loss = loss * (yc.numel() / y.numel())
        scaled = loss / window
        (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        losses.append(loss.detach())
    return losses[0] if len(losses) == 1 else torch.stack(losses).sum()


def train_one_epoch(run: Run, epoch: int, bar=None) -> EpochTraining:
    """One pass over the training loader (at most ``opt_steps`` optimizer steps)."""
    cfg, model = run.cfg, run.model
    run.strategy.on_epoch_start(epoch)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    model.train()
    seed_everything(epoch_rng_seed(cfg.seed, epoch))
    run.shuffle_gen.manual_seed(epoch_seed(cfg.seed, epoch))
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    seen, last_shown, step_lr = 0, 0.0, run.optimizer.param_groups[0]["lr"]
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(run.train_loader):
        if i >= run.batches_per_epoch:
            break
        x, y = to_device(x, y, run.device, run.channels_last)
        window_start = i - i % cfg.grad_accum
        window = min(cfg.grad_accum, run.batches_per_epoch - window_start)
        loss = forward_backward(run, x, y, window)
        loss_sum += loss.double() * y.numel()
        seen += y.numel()
        if i + 1 - window_start < window:
            continue
        optimizer_step(run)
        step_lr = run.optimizer.param_groups[0]["lr"]
        run.scheduler.step()
        run.global_step += 1
        run.state.global_step = run.global_step
        for cb in run.callbacks:
            cb.on_step_end(run.state, loss.detach())
        if bar is not None:
            bar.update(1)
            now = time.perf_counter()
            if now - last_shown > 0.5:  # loss.item() syncs: only when the bar is redrawn
                bar.set_postfix(loss=f"{loss.item():.4f}", sel=selection_text(run.strategy), refresh=False)
                last_shown = now
    return EpochTraining(loss_sum, seen, float(step_lr), time.perf_counter() - t0)


def evaluate_epoch(run: Run, epoch: int) -> tuple[dict[str, tuple[float, float] | None], float]:
    """Validation and test loss/error when this epoch is evaluated; and the seconds it took."""
    t1 = time.perf_counter()
    evals: dict[str, tuple[float, float] | None] = {"val": None, "test": None}
    if (epoch + 1) % run.cfg.eval_every == 0 or epoch + 1 == run.cfg.epochs:
        for name, loader in run.eval_loaders.items():
            evals[name] = evaluate(run.model, loader, run.device, run.amp_dtype, run.channels_last)
    return evals, time.perf_counter() - t1


def epoch_record(run: Run, epoch: int, trained: EpochTraining, evals: Mapping, eval_s: float) -> dict[str, Any]:
    """The epoch's line of ``metrics.jsonl`` (see :class:`History`)."""
    stats = run.tracker.take("epoch")
    freq = stats["frequency"]
    train_s = trained.seconds
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "steps": run.global_step,
        "lr": trained.step_lr,
        "train_loss": finite_or_none(trained.loss_sum.item() / max(trained.seen, 1)),
        "test_loss": finite_or_none(evals["test"][0]) if evals["test"] else None,
        "test_error": evals["test"][1] if evals["test"] else None,
        "val_loss": finite_or_none(evals["val"][0]) if evals["val"] else None,
        "val_error": evals["val"][1] if evals["val"] else None,
        "train_s": round(train_s, 3),
        "eval_s": round(eval_s, 3),
        "wall_s": round(train_s + eval_s, 3),
        "peak_mem_mb": round(peak_memory_mb(run.device), 1),
        "selection_frequency": freq,
        "mean_bvr": [finite_or_none(v) for v in stats["bvr"]] if run.tracker.has_ratios else None,
        "mean_scale": stats["scale"],
    }
    if run.strategy.group_names != run.groups.names:  # per-tensor strategies (BVG-TS): also per layer group
        record["layer_selection_frequency"] = layer_frequency(run, freq)
    return record


def layer_frequency(run: Run, freq: Sequence[float]) -> list[float]:
    """Strategy-group frequencies averaged over the layer group each strategy group lies in."""
    layer_of_param = {id(p): li for li, (_, ps) in enumerate(run.groups.named_param_lists()) for p in ps}
    strat_to_layer = [layer_of_param.get(id(ps[0])) if ps else None for ps in run.strategy.group_params]
    out = []
    for li in range(len(run.groups)):
        members = [f for f, lj in zip(freq, strat_to_layer) if lj == li]
        out.append(sum(members) / len(members) if members else 0.0)
    return out


def loss_text(value: float | None) -> str:
    return "not finite" if value is None else f"{value:.4f}"


def epoch_summary(record: Mapping[str, Any], epochs: int) -> str:
    parts = [f"train loss {loss_text(record['train_loss'])}"]
    for split in ("val", "test"):
        if record[f"{split}_error"] is not None:
            parts.append(
                f"{split} loss {loss_text(record[f'{split}_loss'])}, {split} error {record[f'{split}_error']:.2f}%"
            )
    memory = f", peak memory {record['peak_mem_mb']:.0f} MB" if record.get("peak_mem_mb") is not None else ""
    return f"epoch {record['epoch']}/{epochs}: {'; '.join(parts)} ({record['wall_s']:.1f} s{memory})"


def save_epoch(run: Run, epoch: int) -> None:
    """Metrics and an atomic checkpoint after an epoch."""
    if run.out_dir:
        rundir.write_metrics(run.out_dir, run.history)
        rundir.save_checkpoint(
            run.checkpoint_path,
            model=run.model,
            optimizer=run.optimizer,
            strategy=run.strategy,
            scheduler=run.scheduler,
            scaler=run.scaler,
            epoch=epoch + 1,
            global_step=run.global_step,
            history=run.history,
        )


def finish(run: Run, *, save_model: bool, keep_checkpoint: bool) -> None:
    """Mark the run finished (all epochs done, or diverged) and write its result files
    (no model.pt for a diverged run: its weights are not finite)."""
    run.history.finished = len(run.history.epochs) == run.cfg.epochs or run.history.diverged
    if run.out_dir and run.history.finished:
        if save_model and not run.history.diverged:
            write_model_file(run.model, os.path.join(run.out_dir, "model.pt"))
        rundir.write_history(run.out_dir, run.history)
        rundir.write_result(run.out_dir, run.history)
        if not keep_checkpoint and os.path.isfile(run.checkpoint_path):
            os.remove(run.checkpoint_path)


def run_epochs(run: Run, stop_after: int | None, bar_factory) -> None:
    epochs = run.cfg.epochs
    for epochs_run, epoch in enumerate(range(run.start_epoch, epochs)):
        if stop_after is not None and epochs_run >= stop_after:
            break
        run.state.epoch = epoch
        bar = (
            bar_factory(
                total=run.opt_steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=True, dynamic_ncols=True
            )
            if bar_factory
            else None
        )
        trained = train_one_epoch(run, epoch, bar)
        if bar is not None:
            bar.close()
        evals, eval_s = evaluate_epoch(run, epoch)
        record = epoch_record(run, epoch, trained, evals, eval_s)
        if record["train_loss"] is None:  # non-finite: the statistics and weights are lost, stop here
            record["diverged"] = run.history.diverged = True
        run.history.epochs.append(record)
        if bar is not None:
            bar.write(epoch_summary(record, epochs))
        save_epoch(run, epoch)
        for cb in run.callbacks:
            cb.on_epoch_end(run.state, record)
        if run.history.diverged:
            break


# ---------------------------------------------------------------------- the entry point
def resolve_config(strategy, options: Mapping[str, Any]) -> FinetuneConfig:
    """The config of ``options`` (its field names), with the strategy spec recorded."""
    if isinstance(strategy, (str, StrategySpec)):
        label = strategy if isinstance(strategy, str) else strategy.text
    else:
        label = getattr(strategy, "__name__", repr(strategy))
    known = set(FinetuneConfig.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"finetune() got unknown option(s) {', '.join(unknown)}; options: {', '.join(sorted(known))}")
    return FinetuneConfig(**{**options, "strategy": label})


def check_run_arguments(data: Any, out_dir, resume: bool, tensorboard: bool) -> None:
    """What :func:`finetune` refuses before building anything."""
    num_classes = getattr(data, "num_classes", None)
    if isinstance(num_classes, int) and 0 < num_classes < 2:
        raise ValueError(f"the data has {num_classes} class; classification needs at least 2")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (the run directory to resume)")
    if tensorboard and not out_dir:
        raise ValueError("tensorboard=True needs out_dir")


def finetune(
    model: nn.Module,
    data: Any,
    strategy: str | Callable[..., GroupStrategy] = "bvgls",
    groups: LayerGroups | str | Sequence | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    keep_checkpoint: bool = False,
    save_model: bool = False,
    callbacks: Sequence[Callback | Callable[[dict], Any]] = (),
    tensorboard: bool = False,
    config: Mapping[str, Any] | None = None,
    **options: Any,
) -> History:
    """Finetune ``model`` with a layer-selection ``strategy``; returns the :class:`History`.

    ``model``: the network (e.g. from :func:`bvgls.runner.models.build_model`), moved to the device;
    partial/linear strategies set ``requires_grad=False`` on frozen groups during the run, restored
    afterwards. ``data``: a ``DatasetSplits``, ``(train, test)``, ``(train, val, test)`` or a dict with
    ``train``/``test`` (``val`` optional) of datasets or DataLoaders; datasets give exact resumption
    (shuffling is seeded per epoch), DataLoaders are used as given. ``strategy``: a spec (``full``,
    ``L3-6``, ``linear``, ``bvgls``, ``bvgls:k=2``, ``bvgts``, any registered name) or
    ``fn(optimizer, groups) -> GroupStrategy``; ``groups``: :class:`LayerGroups`, a grouping scheme
    name, or patterns (default ``layer_groups(model)``). ``**options``: the training options,
    :class:`~bvgls.runner.config.FinetuneConfig`'s field names (``epochs``, ``lr``, ``batch_size``,
    ``optimizer``, ``momentum``, ``schedule``, ``amp``, ``device``, ``seed``, ``val_fraction``, ...),
    checked by the config before anything is built; a config ``cfg`` passes as ``**cfg.options()``.

    ``out_dir``: run directory for config, metrics, checkpoint and result (None: nothing written);
    ``resume``: continue from ``out_dir/checkpoint.pt`` if there is one (the settings must match);
    ``stop_after``: return after this many epochs *in this call* (time-limited jobs; resume later);
    ``keep_checkpoint``: keep ``checkpoint.pt`` after the run finished (default: deleted);
    ``save_model``: write the finetuned weights to ``out_dir/model.pt`` (loadable as a model spec);
    ``callbacks``: :class:`Callback` objects, or ``fn(record)`` called after every epoch;
    ``tensorboard``: log to ``out_dir/tensorboard`` (needs the tensorboard package); ``config``: extra
    entries recorded in ``config.json`` (e.g. model and dataset names).
    """
    if isinstance(groups, str):  # a scheme name is the config's ``groups`` option, recorded with the others
        groups, options = None, {**options, "groups": groups}
    cfg = resolve_config(strategy, options)
    check_run_arguments(data, out_dir, resume, tensorboard)
    out_dir = None if out_dir is None else str(out_dir)
    if resume and rundir.is_finished(out_dir):  # a finished run is not run again
        return History.load(out_dir)
    record = config_record(cfg, config)
    trainable_before = {id(p): p.requires_grad for p in model.parameters()}  # strategies may freeze groups
    run = prepare_run(model, data, strategy, groups, cfg, out_dir, record)
    try:
        train_run(
            run, resume, stop_after, callbacks, tensorboard, save_model=save_model, keep_checkpoint=keep_checkpoint
        )
    finally:
        if run.tracker is not None:
            run.tracker.close()
        run.strategy.remove()
        for p in model.parameters():
            p.requires_grad_(trainable_before.get(id(p), True))
    return run.history


def config_record(cfg: FinetuneConfig, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """What ``config.json`` records: the caller's entries and the settings, as plain JSON types
    (it goes into config.json and into weights_only checkpoints)."""
    return json.loads(json.dumps({**dict(config or {}), **cfg.record(), "torch": str(torch.__version__)}, default=str))


def train_run(
    run: Run,
    resume: bool,
    stop_after: int | None,
    callbacks,
    tensorboard: bool,
    *,
    save_model: bool,
    keep_checkpoint: bool,
) -> None:
    """Restore or seed, then the epochs with their callbacks, then the result files."""
    restore_or_seed(run, resume)
    run.tracker = SelectionTracker(run.strategy)
    run.callbacks = [as_callback(c) for c in callbacks]
    if tensorboard:
        run.callbacks.append(TensorBoardLogger(os.path.join(run.out_dir, "tensorboard")))
    run.state = TrainState(
        run.model, run.optimizer, run.strategy, run.history, run.start_epoch, run.global_step, run.out_dir
    )
    for cb in run.callbacks:
        cb.on_train_start(run.state)
    flush_denormal = run.device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        run_epochs(run, stop_after, progress_bar_factory(run.cfg.progress))
        finish(run, save_model=save_model, keep_checkpoint=keep_checkpoint)
        for cb in run.callbacks:
            cb.on_train_end(run.state)
    finally:
        if flush_denormal:
            torch.set_flush_denormal(False)
