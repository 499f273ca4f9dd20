"""The paper's baselines and the strategy registry."""

import pytest
import torch
from torch import nn

import bvgls


def six_group_model():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(6, 6) for _ in range(5)], nn.Linear(6, 3))


def build(spec, model=None):
    model = model or six_group_model()
    groups = bvgls.layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=0.1)
    return model, opt, bvgls.make_strategy(spec, opt, groups)


def one_step(model, strategy):
    before = [p.detach().clone() for p in model.parameters()]
    strategy.zero_grad()
    x = torch.randn(4, 6)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    strategy.step()
    return [i // 2 for i, (p, b) in enumerate(zip(model.parameters(), before)) if not torch.equal(p, b)]


@pytest.mark.parametrize(
    "spec, trained",
    [
        ("full", [0, 1, 2, 3, 4, 5]),
        ("linear", [5]),
        ("L3-6", [2, 3, 4, 5]),
        ("L5-6", [4, 5]),
        ("L2-4", [1, 2, 3]),
    ],
)
def test_fixed_strategies_move_exactly_their_groups(spec, trained):
    model, opt, strategy = build(spec)
    moved = sorted(set(one_step(model, strategy)))
    assert moved == trained
    assert strategy.selected == trained and strategy.counts == [int(i in trained) for i in range(6)]
    assert strategy.mean_scales() == [float(i in trained) for i in range(6)]
    frozen = [i for i, m in enumerate(model) if not m.weight.requires_grad]
    assert frozen == ([] if spec == "full" else [i for i in range(6) if i not in trained])


def test_bvgls_spec_with_options():
    model, opt, strategy = build("bvgls:k=2:alpha=0.95")
    assert isinstance(strategy, bvgls.BVGLS) and strategy.k == 2 and strategy.alpha == 0.95
    assert len(set(one_step(model, strategy))) == 2
    assert bvgls.strategies.strategy_needs_all_gradients("bvgls") is True
    assert bvgls.strategies.strategy_needs_all_gradients("L3-6") is False
    _, _, skip = build("bvgls-skip")
    assert skip.skip_unselected
    _, _, ts = build("bvgts:fraction=0.25")
    assert ts.num_groups == 12 and ts.fraction == 0.25


@pytest.mark.parametrize(
    "spec, match",
    [
        ("L9-6", "1 <= first <= last <= 6"),
        ("L3-7", "this model has 6 groups"),
        ("L0-2", "1 <= first"),
        ("nope", "unknown strategy 'nope'; known: .*bvgls"),
        ("bvgls:k", "not key=value"),
        ("bvgls:q=3", "unknown option q"),
        ("", "non-empty"),
    ],
)
def test_bad_specs_name_the_problem(spec, match):
    model = six_group_model()
    opt = torch.optim.SGD(bvgls.layer_groups(model).param_groups(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        bvgls.make_strategy(spec, opt, bvgls.layer_groups(model))


def test_parse_and_registry():
    assert bvgls.parse_strategy("bvgls:k=2:alpha=0.9:name=x") == ("bvgls", {"k": 2, "alpha": 0.9, "name": "x"})
    assert "L<a>-<b>" in bvgls.strategy_names() and "full" in bvgls.strategy_names()

    @bvgls.register_strategy("test-every-other")
    def _every_other(optimizer, groups=None):
        return bvgls.FixedGroups(optimizer, [0, 2, 4], groups, freeze=False)

    try:
        model, opt, strategy = build("test-every-other")
        assert sorted(set(one_step(model, strategy))) == [0, 2, 4]
    finally:
        del bvgls.STRATEGIES["test-every-other"]


def test_fixed_groups_state_round_trip():
    _, _, s = build("L4-6")
    state = s.state_dict()
    _, _, s2 = build("L4-6")
    s2.load_state_dict(state)
    assert s2.counts == s.counts and s2.num_steps == s.num_steps
