"""Lean selection: freezing autograd sees, BVG-LS probe / static steps, lazy state.

The refusal of lean mode under torch.distributed is tested with 2 gloo processes in
tests/test_core_reliability.py::test_unsupported_distributed_cases_fail_clearly.
"""

import io

import pytest
import torch
from tiny_models import batch, mlp, one_step
from torch import nn

import bvgls
from bvgls.recommend import recommend, recommend_range
from bvgls.reference import NaiveBVR

LEAN = ["lisa:K=2:gamma=1", "bcd-cyclic:K=2", "gradual-unfreeze:every=3", "bvgls:probe=3", "bvgls:static=4:probe=2"]


def setup(spec, model=None, opt="sgd"):
    model = model or mlp()
    groups = bvgls.layer_groups(model)
    if opt == "sgd":
        optimizer = torch.optim.SGD(groups.param_groups(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    else:
        optimizer = torch.optim.AdamW(groups.param_groups(), lr=1e-2)
    return model, optimizer, bvgls.make_strategy(spec, optimizer, groups)


def run(model, opt, s, steps):
    """Per step: the frozen groups before its forward pass, and the groups it updated."""
    trace = []
    for step in steps:
        frozen = s.frozen_groups()
        one_step(model, opt, s, step)
        trace.append((frozen, list(s.selected)))
    return trace


# ---------------------------------------------------------------------- probe=1 is the paper
def test_probe_1_reproduces_bvgls_exactly():
    results = []
    for spec in ("bvgls", "bvgls:probe=1"):
        model, opt, s = setup(spec)
        assert not s.lean
        trace = run(model, opt, s, range(8))
        results.append((trace, s.ratios.clone(), [p.detach().clone() for p in model.parameters()]))
        assert all(p.requires_grad for p in model.parameters())
    (t1, r1, w1), (t2, r2, w2) = results
    assert t1 == t2 and torch.equal(r1, r2)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))
    assert all(frozen == [] for frozen, _ in t1)


def test_probe_statistics_are_an_ema_over_probe_steps_only():
    model, opt, s = setup("bvgls:probe=3")
    naive = NaiveBVR([list(ps) for ps in s.group_params])
    for step in range(10):
        opt.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        if s.is_probe_step():
            assert s.frozen_groups() == []
            ref = naive.update()
        s.step()
        if step in (3, 6, 9):  # the 2nd..4th probes: variance is defined (not the first-step clamp)
            assert s.ratios.tolist() == pytest.approx(ref, rel=1e-4)
    assert sum(s.probe_counts) == 4 and sum(s.counts) == 10


# ---------------------------------------------------------------------- freezing
@pytest.mark.parametrize("spec", LEAN)
def test_frozen_groups_get_no_grad_no_state_and_no_change(spec):
    model, opt, s = setup(spec, opt="adam")
    assert s.lean
    ever_updated = set()
    saw_frozen = False
    for step in range(10):
        frozen = set(s.frozen_groups())
        saw_frozen |= bool(frozen)
        before = {name: [p.detach().clone() for p in ps] for name, ps in zip(s.group_names, s.group_params)}
        opt.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        for name, ps in zip(s.group_names, s.group_params):
            if name in frozen:
                assert all(p.grad is None and not p.requires_grad for p in ps)
        s.step()
        ever_updated |= {s.group_names[i] for i in s.selected}
        for name, ps in zip(s.group_names, s.group_params):
            moved = any(not torch.equal(a, p) for a, p in zip(before[name], ps))
            assert moved == (s.group_names.index(name) in s.selected), (step, name)
            assert name not in frozen or not moved
    assert saw_frozen
    with_state = {name for name, b in s.state_bytes()["optimizer"].items() if b > 0}
    # lazy optimizer state: only groups that were updated; bcd-cyclic (reset_state) also frees a block's
    # state when it is frozen, and drops it when the block takes over again (planned when step 10 ends)
    expected = ever_updated
    if spec.startswith("bcd"):
        expected = ever_updated - set(s.frozen_groups()) - {s.group_names[s.active]}
    assert with_state == expected


class BackwardProbe:
    """Records which Linear layers the backward pass reached (a hook on each layer's output)."""

    def __init__(self, model):
        self.reached = set()
        self.linears = [m for m in model if isinstance(m, nn.Linear)]
        for i, layer in enumerate(self.linears):
            layer.register_forward_hook(self._hook(i))

    def _hook(self, i):
        def forward_hook(module, inputs, output):
            if output.requires_grad:
                output.register_hook(lambda grad: self.reached.add(i))

        return forward_hook


def test_backward_stops_below_the_lowest_active_group():
    model, opt, s = setup("bcd-cyclic:K=1:order=descending")
    seen = BackwardProbe(model)
    for step in range(5):
        seen.reached.clear()
        one_step(model, opt, s, step)
        lowest = min(s.selected)
        assert seen.reached == set(range(lowest, 5)), (step, s.selected)


def test_bvgls_probe_backward_runs_fully_only_on_probe_steps():
    model, opt, s = setup("bvgls:probe=4")
    seen = BackwardProbe(model)
    for step in range(9):
        probe = s.is_probe_step()
        seen.reached.clear()
        one_step(model, opt, s, step)
        expected = set(range(5)) if probe else set(range(min(s.probe_selection), 5))
        assert seen.reached == expected, (step, probe, s.probe_selection)


def test_only_head_selected_means_the_stem_never_runs_backward():
    model, opt, s = setup("bcd-cyclic:K=3:order=descending")  # the head for the first 3 steps
    seen = BackwardProbe(model)
    for step in range(3):
        one_step(model, opt, s, step)
        assert s.selected == [4]
    assert seen.reached == {4}


# ---------------------------------------------------------------------- requires_grad restored
def test_requires_grad_restored_by_remove_but_user_freezes_kept():
    model = mlp()
    user_frozen = model[2].bias
    user_frozen.requires_grad_(False)
    groups = bvgls.layer_groups(model)
    opt = torch.optim.SGD([p for ps in groups.param_groups() for p in ps["params"]] + [user_frozen], lr=0.1)
    s = bvgls.make_strategy("bcd-cyclic:K=1", opt, groups)
    run(model, opt, s, range(3))
    assert s.frozen_groups()
    s.remove()
    assert all(p.requires_grad for p in model.parameters() if p is not user_frozen)
    assert not user_frozen.requires_grad and s.frozen_groups() == []


def test_requires_grad_restored_when_a_with_block_raises():
    model, opt, s = setup("lisa:K=2:gamma=1")
    with pytest.raises(KeyError):
        with s:
            run(model, opt, s, range(3))
            assert not all(p.requires_grad for p in model.parameters())
            raise KeyError("boom")
    assert all(p.requires_grad for p in model.parameters())
    one_step(model, opt, s, 5)  # detached: a plain step
    assert s.num_steps == 3


@pytest.mark.parametrize("spec", LEAN + ["bvgls:probe=2:release_state=true"])
def test_resume_in_lean_mode_makes_the_same_choices(spec):
    total, cut = 10, 5
    model, opt, s = setup(spec)
    first = run(model, opt, s, range(cut))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "strategy": s.state_dict()}, buf)
    flags = [p.requires_grad for p in model.parameters()]
    rest = run(model, opt, s, range(cut, total))

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2, s2 = setup(spec)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    s2.load_state_dict(ckpt["strategy"])
    assert [p.requires_grad for p in model2.parameters()] == flags  # frozen as the uninterrupted run was
    resumed = run(model2, opt2, s2, range(cut, total))
    assert resumed == rest
    assert len({tuple(sel) for _, sel in first + rest}) > 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


# ---------------------------------------------------------------------- accumulation, GradScaler, static
def test_a_probe_covers_a_whole_accumulated_step():
    model, opt, s = setup("bvgls:probe=2")
    naive = NaiveBVR([list(ps) for ps in s.group_params])
    for step in range(7):
        opt.zero_grad()
        flags = [p.requires_grad for p in model.parameters()]
        for micro in range(3):
            x, y = batch(10 * step + micro)
            (nn.functional.cross_entropy(model(x), y) / 3).backward()
            assert [p.requires_grad for p in model.parameters()] == flags  # toggles only at optimizer steps
        if s.is_probe_step():
            ref = naive.update()
        s.step()
        if step in (2, 4, 6):
            assert s.ratios.tolist() == pytest.approx(ref, rel=1e-4)


def test_grad_scaler_skip_does_not_advance_the_probe_schedule():
    model, opt, s = setup("bvgls:probe=2")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def scaled_step(step, poison=False):
        opt.zero_grad()
        x, y = batch(step)
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if poison:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()

    scaled_step(0)
    frozen = s.frozen_groups()
    assert s.num_steps == 1 and not s.is_probe_step() and frozen
    scaled_step(1, poison=True)  # skipped by the scaler: same step again, same frozen groups
    assert s.num_steps == 1 and s.frozen_groups() == frozen and not s.is_probe_step()
    scaled_step(1)
    assert s.num_steps == 2 and s.is_probe_step() and s.frozen_groups() == []


def test_static_keeps_the_most_selected_groups_and_frees_the_statistics():
    model, opt, s = setup("bvgls:static=6:k=2")
    run(model, opt, s, range(6))
    assert s.static_groups is not None and len(s.static_groups) == 2
    by_count = sorted(range(s.num_groups), key=lambda g: (s.probe_counts[g], g), reverse=True)[:2]
    assert s.static_groups == sorted(by_count)
    assert sum(s.state_bytes()["strategy"].values()) == 0
    kept = [s.group_names[g] for g in s.static_groups]
    assert set(s.frozen_groups()) == set(s.group_names) - set(kept)
    trace = run(model, opt, s, range(6, 10))
    assert all(sel == s.static_groups for _, sel in trace)


def test_statistics_buffer_is_allocated_per_tensor_and_reported():
    model, opt, s = setup("bvgls:probe=2")
    assert sum(s.state_bytes()["strategy"].values()) == 0
    run(model, opt, s, range(2))
    per_group = s.state_bytes()["strategy"]
    for name, ps in zip(s.group_names, s.group_params):
        # the EMA m of each tensor plus its two float64 scalars (running sum of squares, step count)
        assert per_group[name] == sum(p.numel() * p.element_size() + 2 * 8 for p in ps)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bvgls:probe=0", "probe .* must be a positive integer"),
        ("bvgls:probe=2.5", "probe must be an integer"),
        ("bvgls:static=0", "static .* must be a positive integer"),
        ("lisa:skip=False:freeze=True", "freeze=True needs skip=True"),
        ("bcd-cyclic:freeze=maybe", "freeze must be True or False"),
    ],
)
def test_bad_lean_options(spec, message):
    model = mlp()
    groups = bvgls.layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=0.1)
    with pytest.raises(ValueError, match=message):
        bvgls.make_strategy(spec, opt, groups)
    assert all(p.requires_grad for p in model.parameters())


def test_freeze_false_keeps_every_gradient():
    model, opt, s = setup("lisa:K=2:gamma=1:freeze=False")
    assert not s.lean
    trace = run(model, opt, s, range(4))
    assert all(frozen == [] for frozen, _ in trace)
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------- which layers?
def test_recommend_reports_frequency_bvr_and_a_range_ending_at_the_head():
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    data = [batch(i) for i in range(3)]
    report = recommend(model, data, steps=8)
    assert report.steps == 8 and len(report.frequency) == 5
    assert sum(report.frequency) == pytest.approx(1.0)
    assert report.spec == recommend_range(report.frequency, 0.8)
    assert report.spec.endswith("-5") and report.spec in str(report)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model was copied
    assert all(b is None or b >= 0 for b in report.mean_bvr)


@pytest.mark.parametrize(
    "frequency, coverage, spec",
    [
        ([0.0, 0.0, 0.1, 0.2, 0.7], 0.8, "L4-5"),
        ([0.3, 0.0, 0.0, 0.0, 0.7], 0.8, "L1-5"),
        ([0.0, 0.0, 0.0, 0.0, 1.0], 0.8, "L5-5"),
        ([0.1, 0.1, 0.1, 0.2, 0.5], 0.5, "L5-5"),
    ],
)
def test_recommended_range_rule(frequency, coverage, spec):
    assert recommend_range(frequency, coverage) == spec


def test_recommend_bad_input():
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        recommend(mlp(), [batch(0)], steps=0)
    with pytest.raises(ValueError, match="yields no batch"):
        recommend(mlp(), [], steps=2)
