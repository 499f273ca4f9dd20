"""The runner/CLI redesign (issue 9) and typed strategy options (issue 10, item 6): options are
validated the same way for every strategy, compare's lr search extends past an edge, one config
declares every training option, and the layers import only downward."""

import dataclasses
import subprocess
import sys

import pytest
import torch
from torch import nn

import bvgls
from bvgls.runner.config import FinetuneConfig, result_keys
from bvgls.runner.lrsearch import LR_LADDER, next_lr, search_lr


def six_group_model():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(6, 6) for _ in range(5)], nn.Linear(6, 3))


def build(spec):
    model = six_group_model()
    groups = bvgls.layer_groups(model)
    return model, bvgls.make_strategy(spec, torch.optim.SGD(groups.param_groups(), lr=0.1), groups)


def frozen_groups(model):
    return [i for i, layer in enumerate(model) if not any(p.requires_grad for p in layer.parameters())]


# ---------------------------------------------------------------------- boolean options
@pytest.mark.parametrize("value", ["false", "False", "FALSE", "no", "No", "0"])
def test_false_values_do_not_freeze(value):
    for spec in (f"linear:freeze={value}", f"L3-6:freeze={value}"):
        model, strategy = build(spec)
        assert frozen_groups(model) == [] and strategy.freeze is False, spec


@pytest.mark.parametrize("value", ["true", "True", "yes", "YES", "1"])
def test_true_values_freeze(value):
    model, _ = build(f"linear:freeze={value}")
    assert frozen_groups(model) == [0, 1, 2, 3, 4]
    model, _ = build(f"L3-6:freeze={value}")
    assert frozen_groups(model) == [0, 1]


@pytest.mark.parametrize("spec, match", [
    ("linear:freeze=maybe", "freeze must be True or False"),
    ("L3-6:freeze=2", "freeze must be True or False"),
    ("lisa:skip=sometimes", "skip must be True or False"),
    ("bvgls:k=two", "k must be an integer"),
    ("bvgls:k=1.5", "k must be an integer"),
    ("bvgts:fraction=half", "fraction must be a number"),
    ("bvgls:alpha=", "alpha must be a number"),
    ("linear:k=2", r"unknown option k; the options of linear are: freeze"),
    ("full:freeze=true", "unknown option freeze; the options of full are: none"),
    ("bvgls:beta=1", "the options of bvgls are: k, alpha"),
])
def test_bad_option_values_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        build(spec)


def test_every_registered_strategy_parses_its_defaults_back():
    """Each builder option, written as text, parses to the type of its default (one declaration)."""
    from bvgls.strategies import option_types, parse_spec

    for name in bvgls.STRATEGIES:
        for key, kind in option_types(parse_spec(name)).items():
            if kind in (bool, int, float):
                text = {bool: "yes", int: "3", float: "0.5"}[kind]
                value = parse_spec(f"{name}:{key}={text}").options[key]
                assert type(value) is kind, (name, key, value)


def test_numbers_parse_to_the_options_type():
    assert bvgls.parse_strategy("bvgls:k=2:alpha=1") == ("bvgls", {"k": 2, "alpha": 1.0})
    assert isinstance(bvgls.parse_strategy("bvgls:alpha=1")[1]["alpha"], float)


def test_cli_refuses_a_bad_boolean_and_honours_false():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "bvgls", "groups", "--model", "tiny-resnet", *args],
                              capture_output=True, text=True, timeout=300)

    bad = run("--strategy", "linear:freeze=nope")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "freeze must be True or False" in bad.stderr
    assert "Traceback" not in bad.stderr
    frozen = run("--strategy", "linear:freeze=yes")
    assert frozen.returncode == 0 and "trains: fc" in frozen.stdout
    unfrozen = run("--strategy", "L3-6:freeze=no")
    assert unfrozen.returncode == 0 and "trains: stem, layer1, layer2, layer3, layer4, fc" in unfrozen.stdout


# ---------------------------------------------------------------------- lr search
def test_next_lr_steps_beyond_the_edge():
    assert next_lr(0.1, +1) == 0.3 and next_lr(0.01, -1) == 0.003
    assert next_lr(1.0, +1) is None and next_lr(0.001, -1) is None
    assert next_lr(0.05, +1) == 0.1 and next_lr(0.05, -1) == 0.03  # off the ladder: the next value beyond it
    assert all(next_lr(a, +1) == b for a, b in zip(LR_LADDER, LR_LADDER[1:]))


def fake_search(best: float, lrs, *, diverge_above=None, extend=True):
    """search_lr on a validation error that is lowest at ``best`` (log distance)."""
    import math

    ran = []

    def choose(grid):
        errors = {lr: abs(math.log(lr / best)) for lr in grid}
        diverged = {lr for lr in grid if diverge_above is not None and lr > diverge_above}
        for lr in diverged:
            errors[lr] = 99.0
        return min(grid, key=lambda lr: (errors[lr], lr)), diverged

    choice = search_lr(lrs, ran.extend, choose, extend=extend)
    return choice, ran


def test_search_extends_until_the_choice_is_interior():
    choice, ran = fake_search(0.3, [0.01, 0.1])
    assert choice.lr == 0.3 and choice.grid == [0.01, 0.1, 0.3, 1.0] and not choice.edge
    assert ran == [0.01, 0.1, 0.3, 1.0] and choice.stopped == "interior"
    choice, _ = fake_search(0.001, [0.01, 0.03])
    assert choice.lr == 0.001 and choice.edge and choice.stopped == "ladder end"
    choice, ran = fake_search(0.3, [0.01, 0.1], extend=False)
    assert choice.lr == 0.1 and choice.edge and ran == [0.01, 0.1] and choice.stopped == "not extended"


def test_search_stops_when_the_new_lr_diverges():
    choice, ran = fake_search(1.0, [0.03, 0.1], diverge_above=0.1)
    assert ran == [0.03, 0.1, 0.3] and choice.lr == 0.1 and not choice.edge  # 0.3 diverged: 0.1 is interior


def test_compare_extends_the_grid_by_default(image_root, tmp_path, cli):
    args = ("compare", "--data", image_root, "--strategies", "full", "--seeds", "0", "--epochs", "1",
            "--val-fraction", "0.3", "--model", "tiny-resnet", "--weights", "none", "--batch-size", "8",
            "--no-progress", "--steps-per-epoch", "1")
    res = cli(*args, "--lrs", "0.001,0.003", "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    from bvgls.runner.grid import read_results
    rows = read_results(tmp_path / "a" / "results.csv")
    tried = sorted({r["lr"] for r in rows})
    chosen = {r["lr"] for r in rows if r["chosen"]}
    assert len(chosen) == 1
    [lr] = chosen
    # the choice is inside what was tried, or at the ladder's end
    assert tried[0] < lr < tried[-1] or lr in (LR_LADDER[0], LR_LADDER[-1])
    assert len(tried) >= 2 and set(tried) <= set(LR_LADDER)
    res = cli(*args, "--lrs", "0.001,0.003", "--out", tmp_path / "b", "--no-extend-lrs")
    assert res.exit_code == 0, res.output
    assert sorted({r["lr"] for r in read_results(tmp_path / "b" / "results.csv")}) == [0.001, 0.003]


# ---------------------------------------------------------------------- one declaration
def test_every_cli_field_is_an_option_of_finetune_and_compare():
    from bvgls.cli import get_app
    from bvgls.runner.config import DataOptions, cli_fields

    app = get_app()
    import typer.main
    command = typer.main.get_command(app)
    for name in ("finetune", "compare"):
        params = {p.name for p in command.commands[name].params}
        for cls in (FinetuneConfig, DataOptions):
            assert {f.name for f in cli_fields(cls)} <= params, name


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
    from bvgls.bench.protocol import BENCH

    cfg = BENCH.training(eval_every=5)
    assert (cfg.epochs, cfg.batch_size, cfg.schedule, cfg.val_fraction) == (BENCH.epochs, BENCH.batch_size,
                                                                            BENCH.schedule, BENCH.val_fraction)


# ---------------------------------------------------------------------- layers
def test_import_bvgls_loads_the_library_only():
    code = ("import sys, bvgls; mods = [m for m in sys.modules if m.startswith('bvgls')];"
            "bad = [m for m in mods if m.startswith(('bvgls.runner', 'bvgls.cli', 'bvgls.bench'))];"
            "assert not bad, bad; assert bvgls.finetune.__module__ == 'bvgls.runner.loop';"
            "assert bvgls.History.__module__ == 'bvgls.runner.rundir'; assert callable(bvgls.compare)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_runner_and_bench_do_not_import_the_cli():
    code = ("import sys, bvgls.bench.run, bvgls.bench.report, bvgls.bench.ablation, bvgls.runner.grid, "
            "bvgls.runner.plots;"
            "assert not [m for m in sys.modules if m.startswith('bvgls.cli')]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_list_covers_every_registry(cli):
    res = cli("list")
    assert res.exit_code == 0
    for name in ("tiny-resnet", "timm:<name>", "digits", "<directory>", "bvgls", "lisa", "L<a>-<b>", "resnet"):
        assert name in res.output, name


#: imported by the pretrained set-up but installed another way: the PIL/numpy that torchvision
#: requires, and cairosvg (scripts/setup_pretrained.sh installs it; the emoji tasks are optional)
NOT_IN_THE_EXTRA = {"PIL", "numpy", "cairosvg"}
DISTRIBUTION = {"sklearn": "scikit-learn"}


def test_cli_extra_installs_what_the_pretrained_set_up_imports():
    import ast
    import re
    import sys
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~\[ ]", r)[0].lower() for r in project["dependencies"] +
                project["optional-dependencies"]["cli"]}
    imported = set()
    for path in (root / "src" / "bvgls" / "pretrained").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "bvgls"} - NOT_IN_THE_EXTRA
    missing = sorted(m for m in third_party if DISTRIBUTION.get(m, m).lower() not in declared)
    assert not missing, f"the cli extra lacks {missing}"
