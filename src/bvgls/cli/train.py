"""``bvgls finetune`` and ``bvgls compare``: their own options plus the generated training
options (:class:`~bvgls.runner.config.FinetuneConfig`, :class:`~bvgls.runner.config.DataOptions`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ..runner.config import GRID_AXES, OUTPUT, RESULT, DataOptions, FinetuneConfig
from . import CLIError, app, check_tensorboard, console, numbers, user_errors
from .options import SHARED, command, make_config, opt, param, require, typed

#: runtime options that must still not change on resume: with DataLoader workers the augmentation
#: draws from per-worker streams, so another count would not reproduce the uninterrupted run
RESUME_KEEPS = ("num_workers",)
#: finetune options that may differ when a run is resumed (they do not change its results)
RESUME_RUNTIME = tuple(
    f.name for f in dataclasses.fields(FinetuneConfig) if f.metadata["kind"] != RESULT and f.name not in RESUME_KEEPS
) + ("tensorboard", "stop_after")


# ---------------------------------------------------------------------- finetune
@dataclasses.dataclass(frozen=True)
class FinetuneRun:
    """``bvgls finetune``'s own options (the training and data options are its configs)."""

    model: str
    data: str
    out: str | None
    resume: str | None
    stop_after: int | None
    keep_checkpoint: bool
    tensorboard: bool


FINETUNE_OWN = [
    param("ctx", typer.Context),  # to tell the options typed on the command line (resume)
    SHARED["model"],
    SHARED["data"],
    param(
        "out",
        Annotated[
            Path | None,
            opt(
                "--out",
                "-o",
                panel=OUTPUT,
                help=(
                    "Run directory (config.json, metrics.jsonl, checkpoint.pt, model.pt, result.json); "
                    "default runs/<data>_<strategy>_seed<seed>."
                ),
            ),
        ],
        None,
    ),
    param(
        "resume",
        Annotated[
            Path | None,
            opt(
                "--resume",
                panel=OUTPUT,
                help=("Continue the interrupted run in this directory with its recorded settings."),
            ),
        ],
        None,
    ),
    param(
        "stop_after",
        Annotated[
            int | None,
            opt(
                "--stop-after",
                min=1,
                panel=OUTPUT,
                help=("Exit after this many epochs (for time-limited jobs); continue later with --resume."),
            ),
        ],
        None,
    ),
    param(
        "keep_checkpoint",
        Annotated[bool, opt("--keep-checkpoint", panel=OUTPUT, help=("Keep checkpoint.pt after the run finished."))],
        False,
    ),
    param(
        "tensorboard",
        Annotated[
            bool,
            opt(
                "--tensorboard", panel=OUTPUT, help=("Also log to RUN_DIR/tensorboard (needs the tensorboard package).")
            ),
        ],
        False,
    ),
]


def finetune_arguments(values: dict[str, Any]) -> tuple[FinetuneRun, FinetuneConfig, DataOptions, dict[str, Any]]:
    """The command's typed options; with --resume those recorded in the run directory. The last item
    is the command line's values as ``config.json`` records them (for a later ``--resume``)."""
    ctx = values.pop("ctx")
    values = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
    if values["resume"] is not None:
        values = recorded_values(values["resume"], values, ctx)
    elif values["model"] is None or values["data"] is None:
        raise CLIError("--model and --data are required (or --resume RUN_DIR)")
    settings, data_options = make_config(FinetuneConfig, values), make_config(DataOptions, values)
    cli_record = {k: v for k, v in values.items() if k not in ("resume", "trust_pickle")}
    return typed(FinetuneRun, values), settings, data_options, cli_record


@command(app, FINETUNE_OWN, FinetuneConfig, DataOptions, parse=finetune_arguments, no_args_is_help=True)
def finetune(run: FinetuneRun, settings: FinetuneConfig, data_options: DataOptions, cli_record: dict[str, Any]) -> None:
    """Finetune one model on one dataset with one strategy.

    Writes in the run directory: config.json (resolved settings), metrics.jsonl (per epoch: losses, test error %,
    lr, wall time, selection frequency and mean BVR of every group), an atomic checkpoint.pt after every epoch, and
    model.pt + result.json at the end.
    """
    with user_errors():
        run_finetune(run, settings, data_options, cli_record)


def recorded_values(run_dir: str, given: dict[str, Any], ctx: typer.Context) -> dict[str, Any]:
    """The options a ``bvgls finetune`` run was started with, with this call's runtime options;
    CLIError for an option given on this command line with another value than recorded."""
    from ..runner import rundir

    cfg_path = os.path.join(run_dir, rundir.CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise CLIError(f"{run_dir!r} is not a bvgls run directory (no config.json)")
    config = rundir.read_json(cfg_path)
    recorded = config.get("cli")
    if not recorded:
        raise CLIError(f"{run_dir!r} was not started by `bvgls finetune`; resume it with bvgls.finetune")
    if "workers" in recorded:  # recorded before the option was named after its config field
        recorded["num_workers"] = recorded.pop("workers")
    # a default the run resolved itself (the worker count) is compared, and resumed, as resolved
    resolved = {
        k: config[k] if v is None and config.get(k) is not None else v for k, v in recorded.items() if k in RESUME_KEEPS
    }
    recorded = {**recorded, **resolved}
    refuse_changed_options(given, recorded, ctx)
    return {**recorded, **{k: given[k] for k in RESUME_RUNTIME if k in given}, "resume": run_dir, "out": run_dir}


def refuse_changed_options(given: dict[str, Any], recorded: dict[str, Any], ctx: typer.Context) -> None:
    """A resumed run keeps its settings: options typed on the command line must agree with them
    (all differences named in one line)."""
    changed, keeps = [], False
    for p in ctx.command.params:
        if p.name in RESUME_RUNTIME or p.name in ("resume", "out") or p.name not in recorded:
            continue
        source = ctx.get_parameter_source(p.name)
        typed = source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")
        if typed and given[p.name] != recorded[p.name]:
            old = "default" if recorded[p.name] is None else recorded[p.name]
            changed.append(f"{p.opts[0]} {given[p.name]} (recorded: {old})")
            keeps = keeps or p.name in RESUME_KEEPS
    if changed:
        why = (
            (
                " (with DataLoader workers the augmentation streams depend on their number, so the resumed run "
                "would not reproduce the uninterrupted one)"
            )
            if keeps
            else ""
        )
        raise CLIError(
            f"{', '.join(changed)} differ{'s' if len(changed) == 1 else ''} from the run's recorded "
            f"settings{why}; a resumed run keeps its settings (start a new --out to change them)"
        )


def run_finetune(
    run: FinetuneRun, settings: FinetuneConfig, data_options: DataOptions, cli_record: dict[str, Any]
) -> None:
    """One finetuning run from the command's typed options; ``cli_record``: the command line's
    values, recorded in ``config.json`` for ``--resume``."""
    from ..runner.data import load_dataset
    from ..runner.grid import check_strategies
    from ..runner.loop import epoch_summary, resolve_device, seed_everything
    from ..runner.loop import finetune as train
    from ..runner.models import build_model

    out = console()
    if run.tensorboard:
        check_tensorboard()
    resolve_device(settings.device)
    resuming = run.resume is not None
    run_dir = prepare_run_dir(run, settings, resuming)
    trust = settings.trust_pickle
    shape_model = build_model(run.model, 2, data_options.weights, trust_pickle=trust)  # input spec and groups
    [spec] = check_strategies([settings.strategy], shape_model, settings.groups)
    splits = load_dataset(
        run.data,
        data_options.data_root,
        data_options.download,
        data_options.model_input(shape_model.bvgls_input),
        augment=data_options.augment_override,
    )
    del shape_model
    seed_everything(settings.seed)
    net = build_model(run.model, splits.num_classes, data_options.weights, trust_pickle=trust)
    out.print(
        f"[bold]{spec.text}[/] on [bold]{splits.name}[/] ({len(splits.train)} train / "
        f"{len(splits.test)} test, {splits.num_classes} classes) with {run.model} -> {run_dir}"
    )
    config = {
        "model": run.model,
        "weights": data_options.weights,
        "image_size": data_options.image_size,
        "dataset": splits.name,
        "data": run.data,
        "num_classes": splits.num_classes,
        "cli": cli_record,
    }
    # without bars the per-epoch summary lines (which a bar would print under itself) still show
    summaries = [] if settings.progress else [lambda record: out.print(epoch_summary(record, settings.epochs))]
    history = train(
        net,
        splits,
        spec,
        **settings.options(without=("strategy",)),
        out_dir=run_dir,
        resume=resuming,
        stop_after=run.stop_after,
        keep_checkpoint=run.keep_checkpoint,
        save_model=True,
        tensorboard=run.tensorboard,
        config=config,
        callbacks=summaries,
    )
    report_finetune(out, history, run_dir, settings.epochs)


def prepare_run_dir(run: FinetuneRun, settings: FinetuneConfig, resuming: bool) -> str:
    """The run's directory (--out, else runs/<data>_<strategy>_seed<seed>), created; a finished or
    interrupted run there is refused unless resuming."""
    from ..runner.data import dataset_label
    from ..runner.grid import slug
    from ..runner.rundir import prepare_out_dir

    default_dir = f"{slug(dataset_label(run.data))}_{slug(settings.strategy)}_seed{settings.seed}"
    run_dir = run.out or os.path.join("runs", default_dir)
    if not resuming:
        refuse_used_run_dir(run_dir)
    prepare_out_dir(run_dir)
    return run_dir


def refuse_used_run_dir(run_dir: str) -> None:
    if os.path.isfile(os.path.join(run_dir, "result.json")):
        raise CLIError(f"{run_dir!r} already holds a finished run; choose another --out")
    if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        raise CLIError(
            f"{run_dir!r} holds an interrupted run; continue it with --resume {run_dir} or choose another --out"
        )


def report_finetune(out, history, run_dir: str, epochs: int) -> None:
    final = history.final
    if history.diverged:
        out.print(
            f"diverged at epoch {final['epoch']}: the training loss is not finite (lr {history.config['lr']:g}); "
            f"try a smaller --lr. Recorded in {os.path.join(run_dir, 'result.json')}"
        )
        raise typer.Exit(1)
    if not history.finished:
        out.print(
            f"stopped after epoch {final.get('epoch', 0)}/{epochs}; continue with "
            f"[bold]bvgls finetune --resume {run_dir}[/]"
        )
        return
    text = f"done: test error {final['test_error']:.2f}%, test loss {final['test_loss']:.4f}"
    if final.get("val_error") is not None:
        text += f", val error {final['val_error']:.2f}%"
    out.print(
        text + f", {history.wall_s:.1f}s. Metrics: {os.path.join(run_dir, 'metrics.jsonl')}; "
        f"figures: bvgls plot {run_dir}"
    )


# ---------------------------------------------------------------------- compare
@dataclasses.dataclass(frozen=True)
class CompareGrid:
    """``bvgls compare``'s own options, parsed (the training and data options are its configs)."""

    model: str
    data: str
    out: Path
    strategies: str
    seeds: list[int]
    lrs: list[float]
    extend_lrs: bool
    refit: bool
    keep_going: bool

    def arguments(self) -> dict[str, Any]:
        """The grid as :func:`~bvgls.runner.grid.compare`'s arguments (its names for --data and --out)."""
        arguments = dataclasses.asdict(self)
        arguments["datasets"], arguments["out_dir"] = arguments.pop("data"), arguments.pop("out")
        return arguments


COMPARE_OWN = [
    param(
        "out",
        Annotated[
            Path,
            opt(
                "--out",
                "-o",
                panel=OUTPUT,
                help=("Output directory: runs/, results.csv, table.md. Rerunning skips finished runs."),
            ),
        ],
    ),
    SHARED["model"],
    SHARED["data"],
    param(
        "strategies",
        Annotated[str, opt("--strategies", "-s", help=("Comma-separated strategy specs (columns of the table)."))],
        "full,L2-6,L3-6,L4-6,L5-6,linear,bvgls",
    ),
    param("seeds", Annotated[str, opt("--seeds", help="Comma-separated seeds.")], "0,1,2"),
    param(
        "lrs",
        Annotated[
            str,
            opt(
                "--lrs",
                "--lr",
                help=(
                    "Comma-separated base learning rates; several need --val-fraction and each strategy gets the one "
                    "with the lowest validation error (the grid is extended past an edge, see --extend-lrs)."
                ),
            ),
        ],
        "0.01",
    ),
    param(
        "extend_lrs",
        Annotated[
            bool,
            opt(
                "--extend-lrs/--no-extend-lrs",
                help=(
                    "When a strategy's chosen lr is at an end of the grid, also try the next lr of the ladder "
                    "0.001, 0.003, ..., 1.0 beyond it, until the choice is interior (or a run diverges, or the "
                    "ladder ends)."
                ),
            ),
        ],
        True,
    ),
    param(
        "refit",
        Annotated[
            bool,
            opt(
                "--refit", help=("After choosing the lr, retrain at it on the full training set and report those runs.")
            ),
        ],
        False,
    ),
    param(
        "keep_going",
        Annotated[
            bool,
            opt(
                "--keep-going",
                panel=OUTPUT,
                help=("Continue with the other runs when one fails (exit code 1 at the end)."),
            ),
        ],
        False,
    ),
]


def compare_arguments(values: dict[str, Any]) -> tuple[CompareGrid, FinetuneConfig, DataOptions]:
    """The command's typed options: the grid (its number lists parsed) and the configs."""
    from ..runner.grid import check_lrs

    require(values, "model", "data")
    lrs = check_lrs(numbers(values["lrs"], "--lrs"), "--lrs")
    grid = typed(CompareGrid, {**values, "lrs": lrs, "seeds": numbers(values["seeds"], "--seeds", int)})
    settings = make_config(FinetuneConfig, values, lr=lrs[0])  # the lr is set per run by the grid
    return grid, settings, make_config(DataOptions, values)


@command(
    app, COMPARE_OWN, FinetuneConfig, DataOptions, parse=compare_arguments, without=GRID_AXES, no_args_is_help=True
)
def compare(grid: CompareGrid, settings: FinetuneConfig, data_options: DataOptions) -> None:
    """Run strategies x datasets x seeds (x learning rates) and write the paper's Table A.

    results.csv has one row per finished run (dataset, strategy, seed, lr, test_error in %, test_loss, val_error,
    epochs, wall_s, ...); table.md gives the test error mean ± std per dataset and strategy, an average row, the
    best per row in bold, and the lr each strategy used; where more than one lr was tried, also test and validation
    error at every lr (mean ± std over seeds), drawn in plots/lr_sensitivity.png. --lrs 0.01 --no-extend-lrs runs
    every strategy at that one shared lr, with no search. Rerunning with the same --out skips finished runs and
    resumes interrupted ones.
    """
    from ..runner.grid import compare as run_grid

    out = console()
    with user_errors():
        result = run_grid(**grid.arguments(), **data_options.loading(), **settings.options(without=GRID_AXES))
    out.print(result.table, markup=False)
    out.print(f"wrote {result.csv_path} and {result.table_path}")
    if result.lr_figure:
        out.print(f"lr sensitivity (test and validation error against lr): {result.lr_figure}")
    if result.failed:
        typer.echo(f"{len(result.failed)} run(s) failed:\n  " + "\n  ".join(result.failed), err=True)
        raise typer.Exit(1)
