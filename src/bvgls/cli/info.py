"""``bvgls plot``, ``bvgls groups`` and ``bvgls list``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from ..runner.config import DataOptions, FinetuneConfig
from . import app, console, user_errors
from .options import SHARED, command, field_params, param, require, typed


@app.command(no_args_is_help=True)
def plot(
    paths: Annotated[list[Path], typer.Argument(help="Run directories and/or `bvgls compare` output directories.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help=("Where the comparison of several runs goes (default: the first run's directory).")
        ),
    ] = None,
) -> None:
    """Draw loss curves and selection-frequency heatmaps as PNGs next to the metrics.

    Each run directory gets loss.png (train/test loss and test error per epoch), selection.png (each group's
    selection frequency per epoch) and bvr.png (mean BVR per group). Several run directories also get
    loss_compare.png (e.g. BVG-LS against full finetuning); a compare directory gets plots/loss_<dataset>.png and
    plots/selection_<dataset>_<strategy>.png.
    """
    from ..runner.plots import plot_paths

    with user_errors():
        written = plot_paths([str(p) for p in paths], None if out is None else str(out))
    for path in written:
        typer.echo(path)


GROUPS_OWN = [
    SHARED["model"],
    *field_params(DataOptions, ["weights"]),
    param("num_classes", Annotated[int, typer.Option("--num-classes", min=1, help="Classes of the head.")], 1000),
    *field_params(FinetuneConfig, ["groups"]),
    param(
        "strategy",
        Annotated[
            str | None,
            typer.Option("--strategy", "-s", help=("Also show which groups this strategy trains (e.g. L3-6).")),
        ],
        None,
    ),
    *field_params(FinetuneConfig, ["trust_pickle"]),
]


@dataclasses.dataclass(frozen=True)
class GroupsQuery:
    """``bvgls groups``'s options: the model to group and the strategy to show on its groups."""

    model: str
    weights: str
    num_classes: int
    groups: str
    strategy: str | None
    trust_pickle: bool


def groups_arguments(values: dict[str, Any]) -> tuple[GroupsQuery]:
    require(values, "model")
    return (typed(GroupsQuery, values),)


@command(app, GROUPS_OWN, parse=groups_arguments, no_args_is_help=True)
def groups(query: GroupsQuery) -> None:
    """Print the layer groups a strategy selects from: index, name, tensors, parameters."""
    from ..grouping import layer_groups
    from ..runner.models import build_model

    with user_errors():
        net = build_model(query.model, query.num_classes, query.weights, trust_pickle=query.trust_pickle)
        lg = layer_groups(net, query.groups)
        typer.echo(lg.describe())
        if query.strategy:
            import torch

            from ..strategies import make_strategy

            opt = torch.optim.SGD(lg.param_groups(), lr=0.1)
            strat = make_strategy(query.strategy, opt, lg)
            trained = [n for n, ps in zip(strat.group_names, strat.group_params) if any(p.requires_grad for p in ps)]
            kind = "selects among" if strat.needs_all_gradients else "trains"
            typer.echo(f"{query.strategy} {kind}: {', '.join(trained)}")


@app.command(name="list")
def list_registered() -> None:
    """List the registered models, datasets, strategies and grouping schemes."""
    from rich.table import Table

    from ..grouping import GROUPING_SCHEMES
    from ..registry import DATASETS, MODELS
    from ..strategies import STRATEGIES

    out = console()
    for registry in (MODELS, DATASETS, STRATEGIES, GROUPING_SCHEMES):
        table = Table(title=registry.title, title_justify="left", show_header=False, box=None)
        for name, help_text in registry.rows():
            table.add_row(f"[bold]{name}[/]", help_text)
        out.print(table)
        out.print()
