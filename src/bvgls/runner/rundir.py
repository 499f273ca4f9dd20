"""A run directory on disk: its :class:`History`, atomic writes, checkpoints and RNG state.

Layout written by :func:`bvgls.finetune` with ``out_dir``: ``config.json`` (the resolved
settings), ``history.json`` (config and group names), ``metrics.jsonl`` (one line per
epoch), ``checkpoint.pt`` (atomic, after every epoch), ``model.pt`` and ``result.json``
(when finished). The grid (``bvgls compare``) and the benchmark read runs through the
public names here.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

CHECKPOINT_FORMAT = "bvgls-checkpoint-v1"
CHECKPOINT_FILE = "checkpoint.pt"
RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"


@dataclass
class History:
    """What a run recorded: its resolved config, its groups and one dict per finished epoch.

    Epoch dicts have ``epoch`` (1-based), ``steps``, ``lr``, ``train_loss``, ``test_loss``,
    ``test_error`` (percent), ``val_loss``/``val_error`` (None without a validation split),
    ``train_s``, ``eval_s``, ``wall_s``, ``peak_mem_mb`` (peak memory so far: GPU memory allocated
    during the epoch, or the process's peak RSS on CPU), ``selection_frequency`` (per strategy group),
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
    #: the training loss became non-finite; the run stopped there (its last epoch has ``diverged``)
    diverged: bool = False

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
        return {
            "config": self.config,
            "group_names": self.group_names,
            "layer_group_names": self.layer_group_names,
            "epochs": self.epochs,
            "finished": self.finished,
            "diverged": self.diverged,
        }

    def meta(self) -> dict:
        """Everything but the epochs (``history.json``)."""
        return {k: v for k, v in self.to_dict().items() if k != "epochs"}

    @classmethod
    def from_dict(cls, d: Mapping) -> History:
        return cls(
            dict(d.get("config", {})),
            list(d.get("group_names", [])),
            list(d.get("layer_group_names", [])),
            [dict(r) for r in d.get("epochs", [])],
            bool(d.get("finished", False)),
            bool(d.get("diverged", False)),
        )

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> History:
        """Read a run directory's ``history.json`` and ``metrics.jsonl``."""
        run_dir = str(run_dir)
        meta_path = os.path.join(run_dir, "history.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{run_dir!r} is not a bvgls run directory (no history.json)")
        meta = read_json(meta_path)
        metrics = os.path.join(run_dir, "metrics.jsonl")
        meta["epochs"] = read_json_lines(metrics) if os.path.isfile(metrics) else []
        return cls.from_dict(meta)


# ---------------------------------------------------------------------- atomic files
def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary name, then rename over ``path`` (readers never see half a file)."""
    path = str(path)
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file; ValueError naming the file when it is not valid JSON (e.g. truncated)."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON (truncated?): {e.msg} at line {e.lineno}") from None


def read_json_lines(path: str | os.PathLike) -> list:
    """One JSON value per non-empty line (``metrics.jsonl``); ValueError naming the file and line."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {i} is not valid JSON (truncated?): {e.msg}") from None
    return out


#: directories :func:`prepare_out_dir` created in this process (a failed command removes those still empty)
CREATED_DIRS: list[str] = []


def prepare_out_dir(path: str | os.PathLike, option: str = "--out") -> str:
    """Create the output directory ``path`` (if needed) and check that it can be written to,
    before any work is done; ValueError naming ``option`` and the path otherwise."""
    path = str(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path} is an existing file, not a directory; choose another {option}")
    try:
        missing = []  # this directory and the parents it creates, innermost first
        head = os.path.abspath(path)
        while not os.path.exists(head):
            missing.append(head)
            head = os.path.dirname(head)
        os.makedirs(path, exist_ok=True)
        CREATED_DIRS.extend(missing)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".bvgls-write-test"):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to {option} {path} ({e.strerror or e})") from None
    return path


def remove_empty_created_dirs() -> None:
    """Remove the directories this process created that are still empty (innermost first)."""
    for path in sorted(set(CREATED_DIRS), key=len, reverse=True):
        try:
            os.rmdir(path)  # only succeeds when empty
        except OSError:
            pass
    CREATED_DIRS.clear()


def write_metrics(out_dir: str, history: History) -> None:
    write_text(os.path.join(out_dir, "metrics.jsonl"), "".join(json.dumps(rec) + "\n" for rec in history.epochs))


def write_history(out_dir: str, history: History) -> None:
    write_json(os.path.join(out_dir, "history.json"), history.meta())


def write_result(out_dir: str, history: History) -> None:
    write_json(
        os.path.join(out_dir, RESULT_FILE),
        {
            "finished": True,
            "diverged": history.diverged,
            "final": history.final,
            "wall_s": history.wall_s,
            "config": history.config,
        },
    )


def is_finished(run_dir: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(str(run_dir), RESULT_FILE))


# ---------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Python, torch (and cuda, numpy when present) generator states, for exact resumption."""
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


def set_rng_state(state: Mapping) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


# ---------------------------------------------------------------------- checkpoints
def save_checkpoint(
    path: str, *, model, optimizer, strategy, scheduler, scaler, epoch: int, global_step: int, history: History
) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "global_step": global_step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "strategy": strategy.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "history": history.to_dict(),
        "config": history.config,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str, *, trust_pickle: bool = False) -> dict:
    """A checkpoint written by :func:`save_checkpoint` (see :func:`load_torch_file` for ``trust_pickle``)."""
    ckpt = load_torch_file(path, what="checkpoint", trust_pickle=trust_pickle)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a bvgls checkpoint")
    return ckpt


# ---------------------------------------------------------------------- torch files
def load_torch_file(path: str | os.PathLike, *, what: str, trust_pickle: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors, plain containers and registered safe
    globals: nothing from the file is executed). A file that needs a full unpickle is loaded only
    with ``trust_pickle=True``; otherwise, and for a damaged file, ValueError naming ``what`` and
    the path. Every file bvgls writes loads without ``trust_pickle``; a strategy whose state holds
    its own types registers them with ``torch.serialization.add_safe_globals``."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} {path} is empty")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if not str(e).startswith("Weights only load failed"):
                raise
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # reads, never executes
            if not unsafe:
                raise
    except Exception as e:  # noqa: BLE001 - any failure to read is reported as a damaged file
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise ValueError(
            f"{what} {path} is not a readable torch file (damaged or truncated?): {type(e).__name__}: {first}"
        ) from None
    if not trust_pickle:
        raise ValueError(
            f"{what} {path} holds Python objects ({', '.join(unsafe[:3])}) that only a full unpickle "
            "can load, and unpickling runs code from the file; pass trust_pickle=True (--trust-pickle) "
            "if you trust it"
        )
    return torch.load(path, map_location="cpu", weights_only=False)
