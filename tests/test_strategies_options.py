"""Strategy spec options: typed from the builder's signature and validated the same way for every strategy."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import bvgls


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


@pytest.mark.parametrize(
    "spec, match",
    [
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
    ],
)
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
        return subprocess.run(
            [sys.executable, "-m", "bvgls", "groups", "--model", "tiny-resnet", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )

    bad = run("--strategy", "linear:freeze=nope")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "freeze must be True or False" in bad.stderr
    assert "Traceback" not in bad.stderr
    frozen = run("--strategy", "linear:freeze=yes")
    assert frozen.returncode == 0 and "trains: fc" in frozen.stdout
    unfrozen = run("--strategy", "L3-6:freeze=no")
    assert unfrozen.returncode == 0 and "trains: stem, layer1, layer2, layer3, layer4, fc" in unfrozen.stdout
