"""``bvgls recommend``: a short BVG-LS run that prints each group's mean bias-variance ratio and
selection frequency and recommends a fixed ``L<a>-<b>`` spec (:func:`bvgls.recommend.recommend`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from typing import Annotated, Any

from ..runner.config import MODEL_AND_DATA, DataOptions, FinetuneConfig
from . import CLIError, app, user_errors
from .options import SHARED, command, field_params, make_config, opt, param, require, typed

#: training options of the config that a recommendation run uses (the others do not apply to a short SGD run)
RECOMMEND_FIELDS = ("lr", "seed", "groups", "momentum", "weight_decay", "device", "num_workers", "progress")
#: data options it uses; --image-size is its own (its default depends on the device)
RECOMMEND_DATA_FIELDS = ("weights", "data_root", "download", "augment")
#: on CPU a recommendation run is small: step time and activation memory grow with batch x size^2, and the
#: selection statistics need steps more than pixels (MobileNetV2, 20 steps: about 0.6 CPU-s a
#: step and 1 GB peak at 16 x 128 px, against 1.9 CPU-s and 2.4 GB at 16 x 224 px)
CPU_BATCH, CPU_IMAGE_SIZE = 16, 128
#: on an accelerator: the model's own input size and a batch that keeps the statistics' noise low
ACCELERATOR_BATCH = 64

RECOMMEND_OWN = [
    SHARED["model"],
    SHARED["data"],
    param(
        "steps",
        Annotated[
            int,
            opt(
                "--steps", "-n", min=1, help=("Optimizer steps of the run (every step a BVG-LS step with statistics).")
            ),
        ],
        50,
    ),
    param("k", Annotated[int, opt("--k", min=1, help="Groups selected per step (BVG-LS k).")], 1),
    param(
        "coverage",
        Annotated[
            float,
            opt(
                "--coverage",
                min=0.0,
                max=1.0,
                help=("Share of the selections the recommended range (ending at the head) must hold."),
            ),
        ],
        0.8,
    ),
    param(
        "batch_size",
        Annotated[
            int | None,
            opt(
                "--batch-size",
                "-b",
                min=1,
                help=(f"Examples per step (default: {CPU_BATCH} on CPU, {ACCELERATOR_BATCH} on a GPU)."),
            ),
        ],
        None,
    ),
    param(
        "image_size",
        Annotated[
            int | None,
            opt(
                "--image-size",
                min=1,
                panel=MODEL_AND_DATA,
                help=(
                    f"Crop size in px (default: {CPU_IMAGE_SIZE} on CPU, or the model's own if smaller; "
                    "the model's own "
                    "input size on a GPU)."
                ),
            ),
        ],
        None,
    ),
    param(
        "json_out",
        Annotated[
            str | None,
            opt(
                "--json",
                help=(
                    "Also write the report (frequencies, intervals, per-step selections, settings) to this JSON file."
                ),
            ),
        ],
        None,
    ),
]


def recommend_fields() -> list:
    return [p for p in field_params(FinetuneConfig) if p.name in RECOMMEND_FIELDS] + field_params(
        DataOptions, RECOMMEND_DATA_FIELDS
    )


@dataclasses.dataclass(frozen=True)
class RecommendRun:
    """``bvgls recommend``'s own options (the training and data options it uses are its configs)."""

    model: str
    data: str
    steps: int
    k: int
    coverage: float
    batch_size: int | None
    image_size: int | None
    json_out: str | None


def recommend_arguments(values: dict[str, Any]) -> tuple[RecommendRun, FinetuneConfig, DataOptions]:
    """The command's typed options; the training options are checked with their flags."""
    run = typed(RecommendRun, values)
    if run.coverage <= 0:
        raise CLIError(f"--coverage must be in (0, 1], got {run.coverage}")
    require(values, "model", "data")
    settings = make_config(FinetuneConfig, values, epochs=1, batch_size=1)
    return run, settings, make_config(DataOptions, values)


@command(app, RECOMMEND_OWN + recommend_fields(), parse=recommend_arguments, no_args_is_help=True)
def recommend(run: RecommendRun, settings: FinetuneConfig, data_options: DataOptions) -> None:
    """Which layers should I finetune? Run BVG-LS for --steps steps and recommend a fixed L<a>-<b>.

    Prints, per layer group, the fraction of steps in which it was selected and its mean bias-variance ratio (over
    the steps where it is defined and its variance is not clamped), then the shortest range of groups ending at the
    head that holds --coverage of the selections, as a strategy spec for `bvgls finetune --strategy`. The model is
    not saved.
    """
    with user_errors():
        report = run_recommend(run, settings, data_options)
    print(report)
    print(
        f"settings: batch {report.extra['batch_size']}, {report.extra['image_size']} px, "
        f"{report.steps} steps, lr {settings.lr:g}, device {report.extra['device']}",
        file=sys.stderr,
    )


def run_sizes(device, model_size: int, batch_size: int | None, image_size: int | None) -> tuple[int, int]:
    """The batch size and crop size of a run: the given ones, else the device's defaults."""
    on_cpu = device.type == "cpu"
    batch = batch_size or (CPU_BATCH if on_cpu else ACCELERATOR_BATCH)
    size = image_size or (min(CPU_IMAGE_SIZE, model_size) if on_cpu else model_size)
    return batch, size


@contextlib.contextmanager
def step_bar(enabled: bool, steps: int):
    """Yields ``on_step(done)``, advancing a progress bar on stderr (None when disabled); flushes
    denormals to zero while inside, as the runner does (they slow CPU steps)."""
    import torch

    bar = None
    if enabled:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="recommend", unit="step", file=sys.stderr, dynamic_ncols=True)
    flush = torch.set_flush_denormal(True)
    try:
        yield None if bar is None else (lambda done: bar.update(done - bar.n))
    finally:
        if bar is not None:
            bar.close()
        if flush:
            torch.set_flush_denormal(False)


def run_recommend(run: RecommendRun, settings: FinetuneConfig, data_options: DataOptions):
    """The command's run: data, model, the BVG-LS run with a bar, the report (and its JSON)."""
    from ..grouping import layer_groups
    from ..recommend import recommend as recommend_layers
    from ..runner.loop import resolve_device, seed_everything
    from ..runner.models import build_model

    device = resolve_device(settings.device)
    splits, batch, size = load_data(run, settings.groups, data_options, device)
    example_shape = list(splits.train[0][0].shape)  # what the model is fed (before seeding: it draws a crop)
    seed_everything(settings.seed)
    net = build_model(run.model, splits.num_classes, data_options.weights)
    loader = train_loader(splits.train, batch, settings.num_workers, settings.seed, device)
    with step_bar(settings.progress, run.steps) as on_step:
        report = recommend_layers(
            net,
            loader,
            run.steps,
            groups=lambda m: layer_groups(m, settings.groups),
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            k=run.k,
            coverage=run.coverage,
            device=device,
            copy_model=False,
            on_step=on_step,
        )
    report.extra.update(
        batch_size=batch,
        image_size=size,
        example_shape=example_shape,
        device=str(device),
        model=run.model,
        data=run.data,
        seed=settings.seed,
        lr=settings.lr,
    )
    if run.json_out:
        with open(run.json_out, "w") as f:
            json.dump({**report.to_dict(), "settings": report.extra}, f)
    return report


def load_data(run: RecommendRun, grouping: str, data_options: DataOptions, device):
    """The dataset at the run's crop size, its batch size and crop size; an unknown or unfitting
    grouping, or a k above the groups, fails before the data is loaded."""
    from ..grouping import layer_groups
    from ..runner.data import load_dataset
    from ..runner.models import build_model
    from ..selector import BVGLS

    shape = build_model(run.model, 2, data_options.weights)
    groups = layer_groups(shape, grouping)
    BVGLS.check_k(run.k, sum(1 for _, params in groups.named_param_lists() if params))
    batch, size = run_sizes(device, int(shape.bvgls_input.size), run.batch_size, run.image_size)
    splits = load_dataset(
        run.data,
        data_options.data_root,
        data_options.download,
        dataclasses.replace(shape.bvgls_input, size=size),
        augment=data_options.augment_override,
    )
    return splits, batch, size


def train_loader(dataset, batch: int, num_workers: int | None, seed: int, device):
    """Shuffled batches seeded by ``seed``; workers: the option, else 0 on CPU and up to 8 on a GPU."""
    import torch
    from torch.utils.data import DataLoader

    workers = num_workers if num_workers is not None else (0 if device.type == "cpu" else min(8, os.cpu_count() or 1))
    return DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, generator=torch.Generator().manual_seed(seed)
    )
