"""The ``bvgls-lab`` command (``python -m bvgls_lab``): ``pretrain``, ``export-task``, ``bench`` and
``demo``, the lab's experiments. Errors are worded as the ``bvgls`` command words them
(:func:`bvgls.cli.user_errors`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from bvgls.cli import CLIError, configure_logging, one_line_warning, user_errors, with_paragraph_help

from .experiments.protocols import DEMO, SUITES, Protocol, suite
from .offline_tasks import TASKS, build_task, export_image_folder

app = typer.Typer(
    name="bvgls-lab",
    help="The bvgls lab: the frozen accuracy experiments of BVG-LS against full, partial and linear finetuning, "
    "their source model and tasks, and the demo.",
    epilog="Examples: bvgls-lab demo  |  bvgls-lab bench --protocol offline --out bench-out  |  "
    "bvgls-lab export-task digits DIR. Set BVGLS_DEBUG=1 for tracebacks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
    callback=lambda: configure_logging("bvgls", "bvgls_lab"),
)


def get_app() -> typer.Typer:
    """The app, with the lab's models and datasets registered (and the library's)."""
    from bvgls import runner  # noqa: F401  (the library's models and datasets)

    from . import plugin  # noqa: F401  (the lab's)

    return with_paragraph_help(app)


def main() -> None:
    """Console-script entry point (``bvgls-lab``)."""
    import warnings

    warnings.formatwarning = one_line_warning
    get_app()(prog_name="bvgls-lab")


DataRoot = Annotated[
    str | None,
    typer.Option(
        "--data-root",
        help=(
            "Directory with the Fashion-MNIST .gz files, or where --download puts them (default: the Debian "
            "package's /usr/share/datasets/fashion-mnist)."
        ),
    ),
]
Download = Annotated[bool, typer.Option("--download", help="Fetch Fashion-MNIST with torchvision if missing.")]


@app.command("pretrain")
def pretrain_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the checkpoint (.pt).")],
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Epochs over Fashion-MNIST train.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seeds init, shuffling and augmentation.")] = 0,
    lr: Annotated[float, typer.Option("--lr", help="Peak lr of the one-cycle schedule.")] = 0.1,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 128,
    threads: Annotated[
        int, typer.Option("--threads", min=1, help=("torch threads; 1 is fastest on a shared machine."))
    ] = 1,
    data_root: Annotated[
        str | None,
        typer.Option(
            "--data-root", help=("Directory with the Fashion-MNIST .gz files (default: the Debian package's).")
        ),
    ] = None,
    download: Download = False,
) -> None:
    """Pretrain the fmnist-resnet source model on the Fashion-MNIST train split (seeded).

    The shipped checkpoint was made with: bvgls-lab pretrain --out fmnist_resnet.pt --epochs 8 --seed 0 --threads 1
    """
    from .source_model import pretrain

    with user_errors():
        meta = pretrain(
            out,
            epochs=epochs,
            seed=seed,
            lr=lr,
            batch_size=batch_size,
            threads=threads,
            data_root=data_root,
            download=download,
        )
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
    typer.echo(
        f"{path}: {task.name} ({task.shift}-level shift), {task.num_classes} classes, {sizes}; "
        f"{task.shots} shots per class after --val-fraction {task.val_fraction:.4f}"
    )


def refuse_foreign_directory(out: Path) -> None:
    """Before building the task (seconds): ``out`` must be empty, or an earlier export (its
    task.json is then compared with the task by :func:`export_image_folder`)."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out} is an existing file, not a directory; choose an empty directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "task.json").is_file():
        raise CLIError(f"{out} is not empty and is not an export of a task; choose an empty directory")


def _run(
    out: Path, protocol: Protocol, workers: int, data_root: str | None, download: bool, demo_suite: str | None = None
) -> None:
    from .experiments.run import run_benchmark
    from .experiments.spread import spread_text

    with user_errors():
        summary = run_benchmark(out, protocol, workers=workers, data_root=data_root, download=download)
    _show(out, summary)
    if demo_suite is not None:  # a single seed: show what the seeds spread to, from the recorded benchmark
        typer.echo("")
        typer.echo(spread_text(demo_suite))


def _show(out: Path, summary: dict) -> None:
    from .experiments.report import print_table

    typer.echo("")
    typer.echo(print_table(out))
    typer.echo("")
    for key, path in summary.get("figures", {}).items():
        if "all tasks" in key or key == "lr sensitivity":
            typer.echo(f"figure {key}: {out / path}")
    total = f"; total {summary['wall_s'] / 60:.1f} min" if summary.get("wall_s") is not None else ""
    typer.echo(f"full report: {out / 'report.md'} (per-task figures in {out / 'figures'}){total}")


#: ``bvgls-lab bench`` options
ProtocolName = Annotated[
    str,
    typer.Option(
        "--protocol",
        "-p",
        help=(
            f"Which frozen protocol: {', '.join(SUITES)} (docs/experiments/offline.md, docs/experiments/pretrained.md)."
        ),
    ),
]
ReportOnly = Annotated[
    bool,
    typer.Option("--report-only", help=("Rewrite the report from the runs finished in --out so far; train nothing.")),
]
Reference = Annotated[
    Path | None,
    typer.Option(
        "--reference",
        help=(
            "An earlier benchmark's runs.csv: the report checks that final runs of the same cells reproduce it "
            "(offline-v2: docs/results/offline/runs.csv)."
        ),
        exists=True,
        dir_okay=False,
    ),
]
Batch16 = Annotated[
    Path | None,
    typer.Option(
        "--batch16",
        help=(
            "With --protocol pretrained-batch: the --out of a `--protocol pretrained` benchmark "
            "(or its mobilenet_v2/ "
            "part); the batch-size ablation report (OUT/ablation.md) then sets its batch-16 cells beside the "
            "batch-128 arm."
        ),
    ),
]


@app.command("bench")
def bench_cmd(
    protocol: ProtocolName = "offline",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (resumable).")] = Path("bench-out"),
    workers: Annotated[int, typer.Option("--workers", "-j", min=1, help="Runs in parallel (one CPU core each).")] = 2,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the protocol and the number of runs only.")] = False,
    report_only: ReportOnly = False,
    reference: Reference = None,
    batch16: Batch16 = None,
    data_root: DataRoot = None,
    download: Download = False,
) -> None:
    """Run a frozen benchmark protocol; default: the offline benchmark (docs/experiments/offline.md), 5 tasks x 8
    strategies x 5 seeds, lr searched per strategy (76 min measured on 2 shared CPU cores).

    Writes report.md (Table A, paired differences with 95% CIs, error against training length, selection
    frequencies), summary.json and figures/ (B and C per task); a suite of several models, one such
    directory per model under --out.
    """
    from .experiments.run import report_suite, run_suite

    with user_errors():
        parts = suite(protocol)
        if batch16 is not None:  # checked before anything runs
            _check_batch16(protocol, batch16)
    if dry_run:
        _print_plan(parts)
        return
    with user_errors():
        summaries = (
            report_suite(out, protocol, reference)
            if report_only
            else run_suite(out, protocol, workers=workers, data_root=data_root, download=download, reference=reference)
        )
    for (part, _), summary in zip(parts, summaries):
        if summary is None:
            typer.echo(f"{part}: not started, no report")
            continue
        _show(out if len(parts) == 1 else out / part, summary)
    if batch16 is not None:
        from .experiments.ablation import write_batch_ablation

        with user_errors():
            write_batch_ablation(batch16, out, out / "ablation.md")
        typer.echo(f"batch-size ablation report: {out / 'ablation.md'}")


def _print_plan(parts) -> None:
    """``--dry-run``: each part's protocol and how many runs it makes."""
    for part, p in parts:
        typer.echo(f"{part}: " + json.dumps(asdict(p), indent=2))
        if p.design == "sweep":
            runs = sum(len(p.cell_grid(t, s)) for t in p.tasks for s in p.strategies) * len(p.seeds)
            typer.echo(f"{len(p.tasks) * len(p.strategies)} cells; a sweep: {runs} runs (every lr x every seed)")
            continue
        searched = sum(p.fixed_lr(t, s) is None for t in p.tasks for s in p.strategies)
        cells = len(p.tasks) * len(p.strategies)
        typer.echo(
            f"{cells} cells; {searched * len(p.search_seeds) * len(p.lrs)} search runs "
            f"(+{len(p.search_seeds)} per grid extension) and {cells * len(p.seeds)} final runs"
        )


def _check_batch16(protocol: str, batch16: Path) -> None:
    """``--batch16`` goes with the batch-128 arm and must hold part M of ``pretrained``."""
    from .experiments.ablation import B16_PART, locate_part

    if protocol != "pretrained-batch":
        raise CLIError(
            f"--batch16 goes with --protocol pretrained-batch (the ablation's batch-128 arm), not {protocol}"
        )
    locate_part(batch16, *B16_PART)


@app.command("demo")
def demo_cmd(
    suite: Annotated[
        str,
        typer.Option(
            "--suite",
            help=(
                "pretrained: ImageNet MobileNetV2 on Open Clip Art "
                "(needs bash scripts/setup_pretrained.sh; falls back to "
                "fmnist with a notice where it is not set up); fmnist: the Fashion-MNIST ResNet demo."
            ),
        ),
    ] = "pretrained",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help=("Output directory (default: bvgls-demo, or bvgls-demo-fmnist for the Fashion-MNIST demo)."),
        ),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", min=1, help="Runs in parallel (one CPU core each).")] = 2,
    data_root: DataRoot = None,
    download: Download = False,
) -> None:
    """Quick demo (a few minutes on 2 CPU cores): BVG-LS against full, partial and linear finetuning of the
    real ImageNet MobileNetV2 on a few-shot clip-art task (or, with --suite fmnist or where that is not set
    up, of a Fashion-MNIST-pretrained ResNet on two few-shot tasks), each strategy at the lr the benchmark
    chose; prints Table A and the figures' paths."""
    from .experiments.protocols import demo
    from .experiments.run import missing_assets

    with user_errors():
        protocol = demo(suite)
    if suite == "pretrained":
        reason = missing_assets(protocol)
        if reason is not None:
            typer.echo(f"notice: {reason.rstrip('.')}; running the Fashion-MNIST demo instead", err=True)
            protocol, suite = DEMO, "fmnist"
    default_out = Path("bvgls-demo" if suite == "pretrained" else "bvgls-demo-fmnist")
    _run(out or default_out, protocol, workers, data_root, download, demo_suite=suite)
