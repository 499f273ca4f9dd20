"""``bvgls finetune`` and ``bvgls compare``: their own options plus the generated training
options (:class:`~bvgls.runner.config.FinetuneConfig`, :class:`~bvgls.runner.config.DataOptions`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ..runner.config import MODEL_AND_DATA, OUTPUT, TRAINING, DataOptions, FinetuneConfig
from . import CLIError, app, check_tensorboard, console, numbers, user_errors
from .options import command, param, split_values

MODEL_HELP = ("Registered name (see `bvgls list`), timm:<name>, or a model file (a bvgls model.pt or a pickled "
              "nn.Module).")
#: finetune options that may differ when a run is resumed (they do not change its results)
RESUME_RUNTIME = ("device", "num_workers", "progress", "tensorboard", "stop_after")


def _opt(*flags: str, panel: str = TRAINING, **kwargs) -> Any:
    return typer.Option(*flags, rich_help_panel=panel, **kwargs)


# ---------------------------------------------------------------------- finetune
FINETUNE_OWN = [
    param("model", Annotated[str | None, _opt("--model", "-m", panel=MODEL_AND_DATA, help=MODEL_HELP)], None),
    param("data", Annotated[str | None, _opt("--data", "-d", panel=MODEL_AND_DATA, help=(
        "Registered dataset (see `bvgls list`) or an ImageFolder root with train/ and test/ (or val/)."))], None),
    param("strategy", Annotated[str, _opt("--strategy", "-s", help=(
        "bvgls, bvgls:k=2, bvgts, full, linear, L<a>-<b> (groups a..b, 1-indexed), or any registered one."))],
          "bvgls"),
    param("lr", Annotated[float, _opt("--lr", min=0.0, help="Base learning rate (paper, WRN-50-2: 0.01).")], 0.01),
    param("seed", Annotated[int, _opt("--seed", help="Seeds init of the head, shuffling, augmentation.")], 0),
    param("out", Annotated[Path | None, _opt("--out", "-o", panel=OUTPUT, help=(
        "Run directory (config.json, metrics.jsonl, checkpoint.pt, model.pt, result.json); "
        "default runs/<data>_<strategy>_seed<seed>."))], None),
    param("resume", Annotated[Path | None, _opt("--resume", panel=OUTPUT, help=(
        "Continue the interrupted run in this directory with its recorded settings."))], None),
    param("stop_after", Annotated[int | None, _opt("--stop-after", min=1, panel=OUTPUT, help=(
        "Exit after this many epochs (for time-limited jobs); continue later with --resume."))], None),
    param("keep_checkpoint", Annotated[bool, _opt("--keep-checkpoint", panel=OUTPUT, help=(
        "Keep checkpoint.pt after the run finished."))], False),
    param("tensorboard", Annotated[bool, _opt("--tensorboard", panel=OUTPUT, help=(
        "Also log to RUN_DIR/tensorboard (needs the tensorboard package)."))], False),
]


@command(app, FINETUNE_OWN, FinetuneConfig, DataOptions, no_args_is_help=True)
def finetune(**values: Any) -> None:
    """Finetune one model on one dataset with one strategy.

    Writes in the run directory: config.json (resolved settings), metrics.jsonl (per epoch: losses, test error %, lr, wall time, selection frequency and mean BVR of every group), an atomic checkpoint.pt after every epoch, and model.pt + result.json at the end.
    """
    values = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
    with user_errors():
        if values["resume"] is not None:
            values = recorded_values(values["resume"], values)
        elif values["model"] is None or values["data"] is None:
            raise CLIError("--model and --data are required (or --resume RUN_DIR)")
        run_finetune(values)


def recorded_values(run_dir: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options a ``bvgls finetune`` run was started with, with this call's runtime options."""
    from ..runner import rundir

    cfg_path = os.path.join(run_dir, rundir.CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise CLIError(f"{run_dir!r} is not a bvgls run directory (no config.json)")
    recorded = rundir.read_json(cfg_path).get("cli")
    if not recorded:
        raise CLIError(f"{run_dir!r} was not started by `bvgls finetune`; resume it with bvgls.finetune")
    if "workers" in recorded:  # recorded before the option was named after its config field
        recorded["num_workers"] = recorded.pop("workers")
    return {**recorded, **{k: given[k] for k in RESUME_RUNTIME}, "resume": run_dir, "out": run_dir}


def run_finetune(p: dict[str, Any]) -> None:
    from ..runner.data import dataset_label, load_dataset
    from ..runner.grid import check_strategies, slug
    from ..runner.loop import finetune as train
    from ..runner.loop import seed_everything
    from ..runner.models import build_model

    out = console()
    settings = FinetuneConfig(**split_values(p, FinetuneConfig))
    data_options = DataOptions(**split_values(p, DataOptions))
    if p["tensorboard"]:
        check_tensorboard()
    resuming = p["resume"] is not None
    run_dir = p["out"] or os.path.join("runs", f"{slug(dataset_label(p['data']))}_{slug(p['strategy'])}_seed{p['seed']}")
    if not resuming:
        refuse_used_run_dir(run_dir)
    probe = build_model(p["model"], 2, data_options.weights)
    [spec] = check_strategies([p["strategy"]], probe)
    splits = load_dataset(p["data"], data_options.data_root, data_options.download,
                          data_options.model_input(probe.bvgls_input), augment=data_options.augment_override)
    del probe
    seed_everything(settings.seed)
    net = build_model(p["model"], splits.num_classes, data_options.weights)
    out.print(f"[bold]{spec.text}[/] on [bold]{splits.name}[/] ({len(splits.train)} train / "
              f"{len(splits.test)} test, {splits.num_classes} classes) with {p['model']} -> {run_dir}")
    config = {"model": p["model"], "weights": data_options.weights, "image_size": data_options.image_size,
              "dataset": splits.name, "data": p["data"],
              "num_classes": splits.num_classes, "cli": {k: v for k, v in p.items() if k != "resume"}}
    history = train(net, splits, spec, settings=settings, out_dir=run_dir, resume=resuming,
                    stop_after=p["stop_after"], keep_checkpoint=p["keep_checkpoint"], save_model=True,
                    tensorboard=p["tensorboard"], config=config)
    report_finetune(out, history, run_dir, settings.epochs)


def refuse_used_run_dir(run_dir: str) -> None:
    if os.path.isfile(os.path.join(run_dir, "result.json")):
        raise CLIError(f"{run_dir!r} already holds a finished run; choose another --out")
    if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        raise CLIError(f"{run_dir!r} holds an interrupted run; continue it with --resume {run_dir} "
                       "or choose another --out")


def report_finetune(out, history, run_dir: str, epochs: int) -> None:
    final = history.final
    if not history.finished:
        out.print(f"stopped after epoch {final.get('epoch', 0)}/{epochs}; continue with "
                  f"[bold]bvgls finetune --resume {run_dir}[/]")
        return
    text = f"done: test error {final['test_error']:.2f}%, test loss {final['test_loss']:.4f}"
    if final.get("val_error") is not None:
        text += f", val error {final['val_error']:.2f}%"
    out.print(text + f", {history.wall_s:.1f}s. Metrics: {os.path.join(run_dir, 'metrics.jsonl')}; "
              f"figures: bvgls plot {run_dir}")


# ---------------------------------------------------------------------- compare
COMPARE_OWN = [
    param("data", Annotated[str, _opt("--data", "-d", panel=MODEL_AND_DATA, help=(
        "Comma-separated datasets (registered names or ImageFolder roots)."))]),
    param("out", Annotated[Path, _opt("--out", "-o", panel=OUTPUT, help=(
        "Output directory: runs/, results.csv, table.md. Rerunning skips finished runs."))]),
    param("model", Annotated[str, _opt("--model", "-m", panel=MODEL_AND_DATA, help=MODEL_HELP)], "wide_resnet50_2"),
    param("strategies", Annotated[str, _opt("--strategies", "-s", help=(
        "Comma-separated strategy specs (columns of the table)."))], "full,L2-6,L3-6,L4-6,L5-6,linear,bvgls"),
    param("seeds", Annotated[str, _opt("--seeds", help="Comma-separated seeds.")], "0,1,2"),
    param("lrs", Annotated[str, _opt("--lrs", "--lr", help=(
        "Comma-separated base learning rates; several need --val-fraction and each strategy gets the one "
        "with the lowest validation error (the grid is extended past an edge, see --extend-lrs)."))], "0.01"),
    param("extend_lrs", Annotated[bool, _opt("--extend-lrs/--no-extend-lrs", help=(
        "When a strategy's chosen lr is at an end of the grid, also try the next lr of the ladder "
        "0.001, 0.003, ..., 1.0 beyond it, until the choice is interior (or a run diverges, or the "
        "ladder ends)."))], True),
    param("refit", Annotated[bool, _opt("--refit", help=(
        "After choosing the lr, retrain at it on the full training set and report those runs."))], False),
    param("keep_going", Annotated[bool, _opt("--keep-going", panel=OUTPUT, help=(
        "Continue with the other runs when one fails (exit code 1 at the end)."))], False),
]


@command(app, COMPARE_OWN, FinetuneConfig, DataOptions, no_args_is_help=True)
def compare(**values: Any) -> None:
    """Run strategies x datasets x seeds (x learning rates) and write the paper's Table A.

    results.csv has one row per finished run (dataset, strategy, seed, lr, test_error in %, test_loss, val_error, epochs, wall_s, ...); table.md gives the test error mean ± std per dataset and strategy, an average row, the best per row in bold, and the lr each strategy used. Rerunning with the same --out skips finished runs and resumes interrupted ones.
    """
    from ..runner.grid import compare as run_grid

    out = console()
    with user_errors():
        options = split_values(values, FinetuneConfig)
        data_options = DataOptions(**split_values(values, DataOptions))
        result = run_grid(
            values["strategies"], values["data"], numbers(values["seeds"], "--seeds", int), numbers(values["lrs"], "--lrs"),
            model=values["model"], out_dir=values["out"], weights=data_options.weights, refit=values["refit"],
            extend_lrs=values["extend_lrs"], data_root=data_options.data_root, download=data_options.download,
            augment=data_options.augment_override, image_size=data_options.image_size, keep_going=values["keep_going"],
            log=lambda s: out.print(s, markup=False), **options)
    out.print(result.table, markup=False)
    out.print(f"wrote {result.csv_path} and {result.table_path}")
    if result.failed:
        typer.echo(f"{len(result.failed)} run(s) failed:\n  " + "\n  ".join(result.failed), err=True)
        raise typer.Exit(1)
