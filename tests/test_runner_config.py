"""The one declaration of every training option (FinetuneConfig) and its checks, from Python and the CLI."""

import dataclasses

import pytest

from bvgls.runner.config import FinetuneConfig, result_keys


# ---------------------------------------------------------------------- one declaration
def test_every_cli_field_is_an_option_of_finetune_and_compare():
    from bvgls.cli import get_app
    from bvgls.runner.config import GRID_AXES, DataOptions, cli_fields

    app = get_app()
    import typer.main

    command = typer.main.get_command(app)
    for name in ("finetune", "compare"):
        params = {p.name for p in command.commands[name].params}
        for cls in (FinetuneConfig, DataOptions):
            grid_axes = GRID_AXES if name == "compare" else ()  # compare's own --lrs, --seeds, --strategies
            assert {f.name for f in cli_fields(cls, grid_axes)} <= params, name


def test_resume_keys_are_the_result_fields():
    kinds = {f.name: f.metadata["kind"] for f in dataclasses.fields(FinetuneConfig)}
    assert set(result_keys()) == {k for k, v in kinds.items() if v == "result"}
    assert {"epochs", "lr", "strategy", "seed", "batch_size"} <= set(result_keys())
    assert "num_workers" not in result_keys() and "device" not in result_keys()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="lr must be > 0"):
        FinetuneConfig(epochs=1, lr=float("inf"))
    with pytest.raises(ValueError, match="unknown schedule"):
        FinetuneConfig(epochs=1, lr=0.1, schedule="linear")
    assert FinetuneConfig(epochs=1, lr=0.1, amp="none").amp is None


def test_bench_protocol_fields_pass_through_to_the_config():
    from bvgls_lab.experiments.protocols import BENCH

    cfg = BENCH.training(eval_every=5)
    assert (cfg.epochs, cfg.batch_size, cfg.schedule, cfg.val_fraction) == (
        BENCH.epochs,
        BENCH.batch_size,
        BENCH.schedule,
        BENCH.val_fraction,
    )


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("steps_per_epoch", 0, "steps_per_epoch must be >= 1"),
        ("num_workers", -1, "num_workers must be >= 0"),
        ("batch_size", 2.5, "batch_size must be >= 1 (an integer)"),
        ("grad_accum", True, "grad_accum must be >= 1 (an integer)"),
        ("momentum", 1.0, "momentum must be >= 0 and < 1"),
        ("label_smoothing", float("nan"), "label_smoothing must be >= 0 and <= 1"),
        ("progress", 1, "progress must be true or false"),
        ("amp", "fp8", "unknown amp 'fp8'"),
    ],
)
def test_every_field_is_checked_from_its_declaration_in_python(option, value, words):
    # the same checks the command line gets: the field's type, bounds and choices
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        FinetuneConfig(epochs=1, lr=0.1, **{option: value})


def test_data_options_are_checked_from_their_declaration():
    from bvgls.runner.config import DataOptions

    with pytest.raises(ValueError, match="image_size must be >= 1"):
        DataOptions(image_size=0)
    with pytest.raises(ValueError, match="unknown augment 'heavy'"):
        DataOptions(augment="heavy")
