"""``bvgls probe``: a short BVG-LS run that prints each group's mean bias-variance ratio and
selection frequency and recommends a fixed ``L<a>-<b>`` spec (:func:`bvgls.probe.recommend`)."""

from __future__ import annotations

from typing import Annotated, Any

from ..runner.config import DataOptions, FinetuneConfig
from . import CLIError, app, user_errors
from .options import SHARED, command, field_params, make_config, opt, param, require

#: training options of the config that a probe uses (the others do not apply to a short SGD run)
PROBE_FIELDS = ("lr", "seed", "batch_size", "momentum", "weight_decay", "device", "num_workers")

PROBE_OWN = [
    SHARED["model"],
    SHARED["data"],
    param("steps", Annotated[int, opt("--steps", "-n", min=1, help=(
        "Optimizer steps of the probe run (every step a BVG-LS step with statistics)."))], 50),
    SHARED["groups"],
    param("k", Annotated[int, opt("--k", min=1, help="Groups selected per step (BVG-LS k).")], 1),
    param("coverage", Annotated[float, opt("--coverage", min=0.0, max=1.0, help=(
        "Share of the selections the recommended range (ending at the head) must hold."))], 0.8),
]


def probe_fields() -> list:
    return [p for p in field_params(FinetuneConfig) if p.name in PROBE_FIELDS]


@command(app, PROBE_OWN + probe_fields(), DataOptions, no_args_is_help=True)
def probe(**values: Any) -> None:
    """Which layers should I finetune? Run BVG-LS for --steps steps and recommend a fixed L<a>-<b>.

    Prints, per layer group, the fraction of steps in which it was selected and its mean bias-variance ratio (over
    the steps where it is defined and its variance is not clamped), then the shortest range of groups ending at the
    head that holds --coverage of the selections, as a strategy spec for `bvgls finetune --strategy`. The model is
    not saved.
    """
    with user_errors():
        report = run_probe(values)
    print(report)


def run_probe(p: dict[str, Any]):
    import torch
    from torch.utils.data import DataLoader

    from ..grouping import layer_groups
    from ..probe import recommend
    from ..runner.data import load_dataset
    from ..runner.loop import resolve_device, seed_everything
    from ..runner.models import build_model

    if p["coverage"] <= 0:
        raise CLIError(f"--coverage must be in (0, 1], got {p['coverage']}")
    require(p, "model", "data")
    make_config(FinetuneConfig, p, epochs=1)  # the training options, checked with their flags
    data_options = make_config(DataOptions, p)
    shape = build_model(p["model"], 2, data_options.weights)
    layer_groups(shape, p["groups"])  # an unknown or unfitting scheme fails before the data is loaded
    splits = load_dataset(p["data"], data_options.data_root, data_options.download, shape.bvgls_input,
                          augment=data_options.augment_override)
    del shape
    seed_everything(p["seed"])
    net = build_model(p["model"], splits.num_classes, data_options.weights)
    workers = p["num_workers"] or 0
    loader = DataLoader(splits.train, batch_size=p["batch_size"], shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(p["seed"]))
    return recommend(net, loader, p["steps"], groups=lambda m: layer_groups(m, p["groups"]), lr=p["lr"],
                     momentum=p["momentum"], weight_decay=p["weight_decay"], k=p["k"], coverage=p["coverage"],
                     device=resolve_device(p["device"]), copy_model=False)
