"""``bvgls pretrain``, ``export-task``, ``bench`` and ``demo``: the offline benchmark's commands."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from ..bench.protocol import BENCH, DEMO, Protocol
from ..bench.tasks import TASKS, build_task, export_image_folder
from . import CLIError, app, user_errors

DataRoot = Annotated[str | None, typer.Option("--data-root", help=(
    "Directory with the Fashion-MNIST .gz files, or where --download puts them (default: the Debian "
    "package's /usr/share/datasets/fashion-mnist)."))]
Download = Annotated[bool, typer.Option("--download", help="Fetch Fashion-MNIST with torchvision if missing.")]

@app.command("pretrain")
def pretrain_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the checkpoint (.pt).")],
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Epochs over Fashion-MNIST train.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seeds init, shuffling and augmentation.")] = 0,
    lr: Annotated[float, typer.Option("--lr", help="Peak lr of the one-cycle schedule.")] = 0.1,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 128,
    threads: Annotated[int, typer.Option("--threads", min=1, help=(
        "torch threads; 1 is fastest on a shared machine."))] = 1,
    data_root: Annotated[str | None, typer.Option("--data-root", help=(
        "Directory with the Fashion-MNIST .gz files (default: the Debian package's)."))] = None,
    download: Annotated[bool, typer.Option("--download", help="Fetch Fashion-MNIST with torchvision if missing.")] = False,
) -> None:
    """Pretrain the fmnist-resnet source model on the Fashion-MNIST train split (seeded).

    The shipped checkpoint was made with: bvgls pretrain --out fmnist_resnet.pt --epochs 8 --seed 0 --threads 1
    """
    from ..bench.source_model import pretrain

    with user_errors():
        meta = pretrain(out, epochs=epochs, seed=seed, lr=lr, batch_size=batch_size, threads=threads,
                        data_root=data_root, download=download)
    typer.echo(f"use it with: --model fmnist-resnet --weights {out}   (sha256 {meta['sha256']})")

@app.command("export-task", no_args_is_help=True)
def export_task_cmd(
    name: Annotated[str, typer.Argument(help=f"Task: {', '.join(TASKS)}.")],
    out: Annotated[Path, typer.Argument(help="Empty directory to write train/ and test/ class folders to.")],
    seed: Annotated[int, typer.Option("--seed", help="Task construction seed.")] = 0,
    data_root: DataRoot = None,
    download: Download = False,
) -> None:
    """Write an offline target task as an ImageFolder (train/ = few shots + validation pool, test/).

    Use it with: bvgls compare --model fmnist-resnet --data DIR --val-fraction 0.7143 --augment none ...
    """
    with user_errors():
        refuse_foreign_directory(out)
        task = build_task(name, seed=seed, data_root=data_root, download=download)
        path = export_image_folder(task, out)
    sizes = ", ".join(f"{s} {n}" for s, n in task.sizes().items())
    typer.echo(f"{path}: {task.name} ({task.shift}-level shift), {task.num_classes} classes, {sizes}; "
               f"{task.shots} shots per class after --val-fraction {task.val_fraction:.4f}")

def refuse_foreign_directory(out: Path) -> None:
    """Before building the task (seconds): ``out`` must be empty, or an earlier export (its
    task.json is then compared with the task by :func:`export_image_folder`)."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out} is an existing file, not a directory; choose an empty directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "task.json").is_file():
        raise CLIError(f"{out} is not empty and is not an export of a task; choose an empty directory")


def _run(out: Path, protocol: Protocol, workers: int, data_root: str | None, download: bool) -> None:
    from ..bench.report import print_table
    from ..bench.run import run_benchmark

    with user_errors():
        summary = run_benchmark(out, protocol, workers=workers, data_root=data_root, download=download)
    typer.echo("")
    typer.echo(print_table(out))
    typer.echo("")
    for key, path in summary["figures"].items():
        if "all tasks" in key:
            typer.echo(f"figure {key}: {out / path}")
    typer.echo(f"full report: {out / 'report.md'} (per-task figures in {out / 'figures'}); "
               f"total {summary['wall_s'] / 60:.1f} min")

@app.command("bench")
def bench_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (resumable).")] = Path("bench-out"),
    workers: Annotated[int, typer.Option("--workers", "-j", min=1, help="Runs in parallel (one CPU core each).")] = 2,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the protocol and the number of runs only.")] = False,
    data_root: DataRoot = None,
    download: Download = False,
) -> None:
    """Run the frozen offline benchmark (docs/benchmark.md): 5 tasks x 8 strategies x 5 seeds, lr searched per strategy.

    Writes report.md (Table A, paired differences with 95% CIs, error against training length, selection
    frequencies), summary.json and figures/ (B and C per task). 76 min measured on 2 shared CPU cores.
    """
    if dry_run:
        typer.echo(json.dumps(asdict(BENCH), indent=2))
        cells = len(BENCH.tasks) * len(BENCH.strategies)
        typer.echo(f"{cells} cells; {cells * len(BENCH.search_seeds) * len(BENCH.lrs)} search runs (+2 per grid "
                   f"extension) and {cells * len(BENCH.seeds)} final runs")
        return
    _run(out, BENCH, workers, data_root, download)

@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("bvgls-demo"),
    workers: Annotated[int, typer.Option("--workers", "-j", min=1, help="Runs in parallel (one CPU core each).")] = 2,
    data_root: DataRoot = None,
    download: Download = False,
) -> None:
    """Quick offline demo (about 2 minutes on 2 CPU cores): BVG-LS vs full, partial (L3-6) and linear finetuning
    of a Fashion-MNIST-pretrained ResNet on two few-shot tasks, each strategy at the lr the benchmark chose;
    prints Table A and the figures' paths."""
    _run(out, DEMO, workers, data_root, download)

