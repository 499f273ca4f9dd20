"""The ``bvgls`` command line: finetune, compare, plot, groups, list.

Built on typer (help rendered by rich). Adding commands from another module::

    # src/bvgls/mymodule.py
    from bvgls.cli import app

    @app.command()
    def bench(...): ...

and list the module in :data:`PLUGIN_MODULES` (or expose it through the ``bvgls.plugins``
entry-point group, or name it in the ``BVGLS_PLUGINS`` environment variable, comma
separated). :func:`main` imports those modules before parsing the command line, so they can
register commands, models (``bvgls.registry.MODELS``), datasets and strategies. Tests call
``typer.testing.CliRunner().invoke(get_app(), [...])``.

Bad input (unknown names, missing data, a strategy that does not fit the model) ends with a
one-line ``error: ...`` and exit code 2; set ``BVGLS_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

#: modules imported before the command line is parsed; they may add commands to ``app`` and
#: entries to the model / dataset / strategy registries. Missing optional ones are skipped.
PLUGIN_MODULES: list[str] = ["bvgls.runner.models", "bvgls.runner.data"]
OPTIONAL_PLUGIN_MODULES: list[str] = ["bvgls.bench.report"]
ENTRY_POINT_GROUP = "bvgls.plugins"

app = typer.Typer(
    name="bvgls",
    help="BVG-LS finetuning: update, at every step, the layer group whose gradient has the largest "
         "bias-variance ratio; compare it against full, partial and linear finetuning.",
    epilog="Examples: bvgls finetune --model resnet50 --data pets --download --epochs 50 --lr 0.01 --out runs/pets  "
           "|  bvgls compare --model tiny-resnet --weights none --data digits --strategies full,bvgls --epochs 3 "
           "--out cmp  |  bvgls plot runs/pets. Set BVGLS_DEBUG=1 for tracebacks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)

_plugins_loaded = False


def load_plugins() -> None:
    """Import :data:`PLUGIN_MODULES`, present :data:`OPTIONAL_PLUGIN_MODULES`, ``BVGLS_PLUGINS``
    and the ``bvgls.plugins`` entry points (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for name in PLUGIN_MODULES:
        importlib.import_module(name)
    for name in OPTIONAL_PLUGIN_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    for name in filter(None, (s.strip() for s in os.environ.get("BVGLS_PLUGINS", "").split(","))):
        importlib.import_module(name)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def get_app() -> typer.Typer:
    """The app with every plugin's commands attached."""
    load_plugins()
    return app


def main() -> None:
    """Console-script entry point (``bvgls``)."""
    get_app()(prog_name="bvgls")


# ---------------------------------------------------------------------- helpers
class CLIError(Exception):
    """Raised by commands for bad input; printed as one line."""


@contextmanager
def user_errors():
    """Turn errors caused by the user's input into ``error: <message>`` and exit code 2."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except (CLIError, ValueError, KeyError, FileNotFoundError, NotADirectoryError, ImportError) as e:
        if os.environ.get("BVGLS_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        typer.echo(f"error: {' '.join(str(msg).split())}", err=True)
        raise typer.Exit(2) from None


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise CLIError(f"{what} is empty")
    return values


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise CLIError(f"{what} is empty")
    return values


def _console():
    from rich.console import Console
    return Console(stderr=False, highlight=False, soft_wrap=True)


def _check_tensorboard() -> None:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise CLIError("--tensorboard needs the tensorboard package: pip install tensorboard") from None


class Optim(str, Enum):
    sgd = "sgd"
    adamw = "adamw"


class Schedule(str, Enum):
    cosine = "cosine"
    constant = "constant"


class Amp(str, Enum):
    none = "none"
    bf16 = "bf16"
    fp16 = "fp16"


class Augment(str, Enum):
    default = "default"
    paper = "paper"
    light = "light"
    none = "none"


# ---------------------------------------------------------------------- shared options
_MD = "Model and data"
_TR = "Training"
_SP = "Speed"
_OUT = "Output"

ModelOpt = Annotated[str, typer.Option("--model", "-m", rich_help_panel=_MD, help=(
    "Registered name (see `bvgls list`), timm:<name>, or a model file (a bvgls model.pt or a pickled "
    "nn.Module)."))]
WeightsOpt = Annotated[str, typer.Option("--weights", rich_help_panel=_MD, help=(
    "DEFAULT (the model's pretrained weights; none exist for tiny-*), a torchvision weights name, "
    "none (random init), or a state-dict file."))]
DataRootOpt = Annotated[str, typer.Option("--data-root", rich_help_panel=_MD,
                                          help="Where registered datasets are stored / downloaded to.")]
DownloadOpt = Annotated[bool, typer.Option("--download", rich_help_panel=_MD,
                                           help="Download a missing registered dataset (needs internet).")]
AugmentOpt = Annotated[Augment, typer.Option("--augment", rich_help_panel=_MD, help=(
    "Training augmentation: paper (RandomResizedCrop + flip), light, none; default: the dataset's own."))]
EpochsOpt = Annotated[int, typer.Option("--epochs", "-e", min=1, rich_help_panel=_TR, help="Epochs (paper: 50).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, rich_help_panel=_TR,
                                       help="Examples per step (paper: 128).")]
OptimOpt = Annotated[Optim, typer.Option("--optimizer", rich_help_panel=_TR,
                                         help="sgd: momentum + Nesterov, as in the paper; or adamw.")]
MomentumOpt = Annotated[float, typer.Option("--momentum", rich_help_panel=_TR, help="SGD momentum.")]
WdOpt = Annotated[float, typer.Option("--weight-decay", rich_help_panel=_TR, help="Weight decay (paper: 5e-4).")]
ScheduleOpt = Annotated[Schedule, typer.Option("--schedule", rich_help_panel=_TR,
                                               help="Learning-rate schedule, per step.")]
WarmupOpt = Annotated[float, typer.Option("--warmup-epochs", min=0.0, rich_help_panel=_TR,
                                          help="Linear warmup length in epochs.")]
AccumOpt = Annotated[int, typer.Option("--grad-accum", min=1, rich_help_panel=_TR,
                                       help="Micro-batches per optimizer step.")]
SmoothOpt = Annotated[float, typer.Option("--label-smoothing", min=0.0, max=1.0, rich_help_panel=_TR,
                                          help="Label smoothing of the training loss.")]
StepsOpt = Annotated[int | None, typer.Option("--steps-per-epoch", min=1, rich_help_panel=_TR,
                                              help="Cap on steps per epoch (smoke tests).")]
AmpOpt = Annotated[Amp, typer.Option("--amp", rich_help_panel=_SP, help="Mixed precision: bf16 or fp16 (GPU).")]
DeviceOpt = Annotated[str, typer.Option("--device", rich_help_panel=_SP, help="auto (cuda > mps > cpu), cpu, cuda:1, ...")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", min=0, rich_help_panel=_SP,
                                                help="DataLoader workers; default 0 on CPU, up to 8 on a GPU.")]
ChannelsLastOpt = Annotated[bool, typer.Option("--channels-last/--no-channels-last", rich_help_panel=_SP,
                                               help="NHWC memory format (faster convolutions on CPU and GPUs).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", rich_help_panel=_OUT,
                                           help="A progress bar per epoch.")]


def _train_options(*, optimizer, momentum, weight_decay, schedule, warmup_epochs, grad_accum, label_smoothing,
                   steps_per_epoch, amp, device, workers, channels_last) -> dict[str, Any]:
    return dict(optimizer=optimizer.value, momentum=momentum, weight_decay=weight_decay, schedule=schedule.value,
                warmup_epochs=warmup_epochs, grad_accum=grad_accum, label_smoothing=label_smoothing,
                steps_per_epoch=steps_per_epoch, amp=None if amp == Amp.none else amp.value, device=device,
                num_workers=workers, channels_last=channels_last)


# ---------------------------------------------------------------------- finetune
_RUNTIME_ONLY = ("device", "workers", "progress", "tensorboard", "stop_after")


@app.command(no_args_is_help=True)
def finetune(
    model: Annotated[str | None, typer.Option("--model", "-m", rich_help_panel=_MD, help=(
        "Registered name (see `bvgls list`), timm:<name>, or a model file (a bvgls model.pt or a pickled "
        "nn.Module)."))] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", rich_help_panel=_MD, help=(
        "Registered dataset (see `bvgls list`) or an ImageFolder root with train/ and test/ (or val/)."))] = None,
    strategy: Annotated[str, typer.Option("--strategy", "-s", rich_help_panel=_TR, help=(
        "bvgls, bvgls:k=2, bvgts, full, linear, L<a>-<b> (groups a..b, 1-indexed), or any registered one."))] = "bvgls",
    lr: Annotated[float, typer.Option("--lr", min=0.0, rich_help_panel=_TR, help="Base learning rate (paper, WRN-50-2: 0.01).")] = 0.01,
    epochs: EpochsOpt = 50,
    batch_size: BatchOpt = 128,
    seed: Annotated[int, typer.Option("--seed", rich_help_panel=_TR, help="Seeds init of the head, shuffling, augmentation.")] = 0,
    val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.0, max=0.9, rich_help_panel=_TR, help=(
        "Hold out this fraction of the training set and report validation loss/error each epoch."))] = 0.0,
    weights: WeightsOpt = "DEFAULT",
    data_root: DataRootOpt = "data",
    download: DownloadOpt = False,
    augment: AugmentOpt = Augment.default,
    optimizer: OptimOpt = Optim.sgd,
    momentum: MomentumOpt = 0.9,
    weight_decay: WdOpt = 5e-4,
    schedule: ScheduleOpt = Schedule.cosine,
    warmup_epochs: WarmupOpt = 0.0,
    grad_accum: AccumOpt = 1,
    label_smoothing: SmoothOpt = 0.0,
    steps_per_epoch: StepsOpt = None,
    amp: AmpOpt = Amp.none,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    channels_last: ChannelsLastOpt = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", rich_help_panel=_OUT, help=(
        "Run directory (config.json, metrics.jsonl, checkpoint.pt, model.pt, result.json); "
        "default runs/<data>_<strategy>_seed<seed>."))] = None,
    resume: Annotated[Path | None, typer.Option("--resume", rich_help_panel=_OUT, help=(
        "Continue the interrupted run in this directory with its recorded settings."))] = None,
    stop_after: Annotated[int | None, typer.Option("--stop-after", min=1, rich_help_panel=_OUT, help=(
        "Exit after this many epochs (for time-limited jobs); continue later with --resume."))] = None,
    keep_checkpoint: Annotated[bool, typer.Option("--keep-checkpoint", rich_help_panel=_OUT, help=(
        "Keep checkpoint.pt after the run finished."))] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", rich_help_panel=_OUT, help=(
        "Also log to RUN_DIR/tensorboard (needs the tensorboard package)."))] = False,
    progress: ProgressOpt = True,
) -> None:
    """Finetune one model on one dataset with one strategy.

    Writes in the run directory: config.json (resolved settings), metrics.jsonl (per epoch: losses, test error %, lr, wall time, selection frequency and mean BVR of every group), an atomic checkpoint.pt after every epoch, and model.pt + result.json at the end.
    """
    params = {k: (v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else v)
              for k, v in locals().items()}
    with user_errors():
        if resume is not None:
            run_dir = str(resume)
            cfg_path = os.path.join(run_dir, "config.json")
            if not os.path.isfile(cfg_path):
                raise CLIError(f"{run_dir!r} is not a bvgls run directory (no config.json)")
            with open(cfg_path) as f:
                recorded = json.load(f).get("cli")
            if not recorded:
                raise CLIError(f"{run_dir!r} was not started by `bvgls finetune`; resume it with bvgls.runner.loop.finetune")
            params = {**recorded, **{k: params[k] for k in _RUNTIME_ONLY}, "resume": run_dir, "out": run_dir}
        elif params["model"] is None or params["data"] is None:
            raise CLIError("--model and --data are required (or --resume RUN_DIR)")
        _run_finetune(params)


def _run_finetune(p: dict[str, Any]) -> None:
    from ..runner.grid import check_strategies
    from ..runner.data import load_dataset
    from ..runner.models import build_model
    from ..strategies import parse_strategy
    from ..runner.loop import finetune as train
    from ..runner.loop import seed_everything

    console = _console()
    parse_strategy(p["strategy"])
    if p["tensorboard"]:
        _check_tensorboard()
    resuming = p["resume"] is not None
    run_dir = p["out"] or os.path.join("runs", f"{_slug(p['data'])}_{_slug(p['strategy'])}_seed{p['seed']}")
    if not resuming:
        if os.path.isfile(os.path.join(run_dir, "result.json")):
            raise CLIError(f"{run_dir!r} already holds a finished run; choose another --out")
        if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
            raise CLIError(f"{run_dir!r} holds an interrupted run; continue it with --resume {run_dir} "
                           "or choose another --out")
    probe = build_model(p["model"], 2, p["weights"])
    check_strategies([p["strategy"]], probe)
    augment = None if p["augment"] == "default" else p["augment"]
    splits = load_dataset(p["data"], p["data_root"], p["download"], probe.bvgls_input, augment=augment)
    del probe
    seed_everything(p["seed"])
    net = build_model(p["model"], splits.num_classes, p["weights"])
    console.print(f"[bold]{p['strategy']}[/] on [bold]{splits.name}[/] ({len(splits.train)} train / "
                  f"{len(splits.test)} test, {splits.num_classes} classes) with {p['model']} -> {run_dir}")
    options = _train_options(
        optimizer=Optim(p["optimizer"]), momentum=p["momentum"], weight_decay=p["weight_decay"],
        schedule=Schedule(p["schedule"]), warmup_epochs=p["warmup_epochs"], grad_accum=p["grad_accum"],
        label_smoothing=p["label_smoothing"], steps_per_epoch=p["steps_per_epoch"], amp=Amp(p["amp"]),
        device=p["device"], workers=p["workers"], channels_last=p["channels_last"])
    config = {"model": p["model"], "weights": p["weights"], "dataset": splits.name, "data": p["data"],
              "num_classes": splits.num_classes, "cli": {k: v for k, v in p.items() if k != "resume"}}
    history = train(net, splits, p["strategy"], epochs=p["epochs"], lr=p["lr"], batch_size=p["batch_size"],
                    seed=p["seed"], val_fraction=p["val_fraction"], out_dir=run_dir, resume=resuming,
                    stop_after=p["stop_after"], keep_checkpoint=p["keep_checkpoint"], save_model=True,
                    progress=p["progress"], tensorboard=p["tensorboard"], config=config, **options)
    final = history.final
    if not history.finished:
        console.print(f"stopped after epoch {final.get('epoch', 0)}/{p['epochs']}; continue with "
                      f"[bold]bvgls finetune --resume {run_dir}[/]")
        return
    text = f"done: test error {final['test_error']:.2f}%, test loss {final['test_loss']:.4f}"
    if final.get("val_error") is not None:
        text += f", val error {final['val_error']:.2f}%"
    console.print(text + f", {history.wall_s:.1f}s. Metrics: {os.path.join(run_dir, 'metrics.jsonl')}; "
                  f"figures: bvgls plot {run_dir}")


def _slug(text: str) -> str:
    from ..runner.grid import slug
    from ..runner.data import dataset_label
    return slug(dataset_label(text))


# ---------------------------------------------------------------------- compare
@app.command(no_args_is_help=True)
def compare(
    data: Annotated[str, typer.Option("--data", "-d", rich_help_panel=_MD, help=(
        "Comma-separated datasets (registered names or ImageFolder roots)."))],
    out: Annotated[Path, typer.Option("--out", "-o", rich_help_panel=_OUT, help=(
        "Output directory: runs/, results.csv, table.md. Rerunning skips finished runs."))],
    model: ModelOpt = "wide_resnet50_2",
    strategies: Annotated[str, typer.Option("--strategies", "-s", rich_help_panel=_TR, help=(
        "Comma-separated strategy specs (columns of the table)."))] = "full,L2-6,L3-6,L4-6,L5-6,linear,bvgls",
    seeds: Annotated[str, typer.Option("--seeds", rich_help_panel=_TR, help="Comma-separated seeds.")] = "0,1,2",
    lrs: Annotated[str, typer.Option("--lrs", "--lr", rich_help_panel=_TR, help=(
        "Comma-separated base learning rates; several need --val-fraction and each strategy gets the one "
        "with the lowest validation error."))] = "0.01",
    val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.0, max=0.9, rich_help_panel=_TR, help=(
        "Validation split carved from each training set for choosing the lr (never the test set)."))] = 0.0,
    refit: Annotated[bool, typer.Option("--refit", rich_help_panel=_TR, help=(
        "After choosing the lr, retrain at it on the full training set and report those runs."))] = False,
    epochs: EpochsOpt = 50,
    batch_size: BatchOpt = 128,
    weights: WeightsOpt = "DEFAULT",
    data_root: DataRootOpt = "data",
    download: DownloadOpt = False,
    augment: AugmentOpt = Augment.default,
    optimizer: OptimOpt = Optim.sgd,
    momentum: MomentumOpt = 0.9,
    weight_decay: WdOpt = 5e-4,
    schedule: ScheduleOpt = Schedule.cosine,
    warmup_epochs: WarmupOpt = 0.0,
    grad_accum: AccumOpt = 1,
    label_smoothing: SmoothOpt = 0.0,
    steps_per_epoch: StepsOpt = None,
    amp: AmpOpt = Amp.none,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    channels_last: ChannelsLastOpt = False,
    keep_going: Annotated[bool, typer.Option("--keep-going", rich_help_panel=_OUT, help=(
        "Continue with the other runs when one fails (exit code 1 at the end)."))] = False,
    progress: ProgressOpt = True,
) -> None:
    """Run strategies x datasets x seeds (x learning rates) and write the paper's Table A.

    results.csv has one row per finished run (dataset, strategy, seed, lr, test_error in %, test_loss, val_error, epochs, wall_s, ...); table.md gives the test error mean ± std per dataset and strategy, an average row, the best per row in bold, and the lr each strategy used. Rerunning with the same --out skips finished runs and resumes interrupted ones.
    """
    from ..runner.grid import compare as run_grid

    console = _console()
    with user_errors():
        augment_value = None if augment == Augment.default else augment.value
        result = run_grid(
            strategies, data, _ints(seeds, "--seeds"), _floats(lrs, "--lrs"), model=model, out_dir=out,
            epochs=epochs, batch_size=batch_size, weights=weights, val_fraction=val_fraction, refit=refit,
            data_root=data_root, download=download, augment=augment_value, keep_going=keep_going,
            progress=progress, log=lambda s: console.print(s, markup=False),
            train_options=_train_options(optimizer=optimizer, momentum=momentum, weight_decay=weight_decay,
                                         schedule=schedule, warmup_epochs=warmup_epochs, grad_accum=grad_accum,
                                         label_smoothing=label_smoothing, steps_per_epoch=steps_per_epoch,
                                         amp=amp, device=device, workers=workers, channels_last=channels_last))
    console.print(result.table, markup=False)
    console.print(f"wrote {result.csv_path} and {result.table_path}")
    if result.failed:
        typer.echo(f"{len(result.failed)} run(s) failed:\n  " + "\n  ".join(result.failed), err=True)
        raise typer.Exit(1)


# ---------------------------------------------------------------------- plot
@app.command(no_args_is_help=True)
def plot(
    paths: Annotated[list[Path], typer.Argument(help="Run directories and/or `bvgls compare` output directories.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help=(
        "Where the comparison of several runs goes (default: the first run's directory)."))] = None,
) -> None:
    """Draw loss curves and selection-frequency heatmaps as PNGs next to the metrics.

    Each run directory gets loss.png (train/test loss and test error per epoch), selection.png (each group's selection frequency per epoch) and bvr.png (mean BVR per group). Several run directories also get loss_compare.png (e.g. BVG-LS against full finetuning); a compare directory gets plots/loss_<dataset>.png and plots/selection_<dataset>_<strategy>.png.
    """
    from ..runner.plots import plot_paths

    with user_errors():
        written = plot_paths([str(p) for p in paths], None if out is None else str(out))
    for path in written:
        typer.echo(path)


# ---------------------------------------------------------------------- groups
@app.command(no_args_is_help=True)
def groups(
    model: ModelOpt,
    weights: Annotated[str, typer.Option("--weights", help=(
        "Weights to build the model with; the grouping does not depend on them."))] = "none",
    num_classes: Annotated[int, typer.Option("--num-classes", min=1, help="Classes of the head.")] = 1000,
    grouping: Annotated[str, typer.Option("--grouping", help="Grouping scheme (auto detects).")] = "auto",
    strategy: Annotated[str | None, typer.Option("--strategy", "-s", help=(
        "Also show which groups this strategy trains (e.g. L3-6)."))] = None,
) -> None:
    """Print the layer groups a strategy selects from: index, name, tensors, parameters."""
    from ..grouping import layer_groups
    from ..runner.models import build_model

    with user_errors():
        net = build_model(model, num_classes, weights)
        lg = layer_groups(net, grouping)
        typer.echo(lg.describe())
        if strategy:
            import torch

            from ..strategies import make_strategy
            opt = torch.optim.SGD(lg.param_groups(), lr=0.1)
            strat = make_strategy(strategy, opt, lg)
            trained = [n for n, ps in zip(strat.group_names, strat.group_params) if any(p.requires_grad for p in ps)]
            kind = "selects among" if strat.needs_all_gradients else "trains"
            typer.echo(f"{strategy} {kind}: {', '.join(trained)}")


# ---------------------------------------------------------------------- list
@app.command(name="list")
def list_registered() -> None:
    """List the registered models, datasets, strategies and grouping schemes."""
    from rich.table import Table

    from ..grouping import GROUPING_SCHEMES
    from ..registry import DATASETS, MODELS
    from ..strategies import STRATEGIES

    console = _console()
    for title, names, help_of in (
        ("models (--model)", MODELS.names() + ["timm:<name>", "<model file>"],
         lambda n: MODELS.help(n) if n in MODELS else ("any timm model (needs timm)" if n.startswith("timm")
                                                       else "bvgls model.pt or a pickled nn.Module")),
        ("datasets (--data)", DATASETS.names() + ["<directory>"],
         lambda n: DATASETS.help(n) if n in DATASETS else "ImageFolder root with train/ and test/ (or val/)"),
        ("strategies (--strategy)", sorted(STRATEGIES) + ["L<a>-<b>"],
         lambda n: STRATEGIES[n].help if n in STRATEGIES else "partial finetuning: groups a..b (1-indexed)"),
        ("grouping schemes (--grouping)", sorted(GROUPING_SCHEMES),
         lambda n: (GROUPING_SCHEMES[n].build.__doc__ or "").strip().split("\n")[0]),
    ):
        table = Table(title=title, title_justify="left", show_header=False, box=None)
        for name in names:
            table.add_row(f"[bold]{name}[/]", help_of(name))
        console.print(table)
        console.print()


if __name__ == "__main__":
    main()
