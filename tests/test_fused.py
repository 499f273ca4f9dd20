"""Fused BVG-LS (``fused=true``): statistics folded during backward, selection one step behind.

Checked against the unfused strategy (same EMA, same sums of squares on the same gradients)
and against a lag-1 reference built from :class:`bvgls.reference.NaiveBVR`: the groups
updated at step t are the top-k of the ratios after step t-1, none at the first step; the
other groups take the learning-rate-0 step (as in the paper), or are skipped under
``bvgls-skip`` and in lean mode.
"""

import copy
import math

import pytest
import torch
from tiny_models import batch, mlp, one_step
from tolerances import clear_top_k, largest_bias
from torch import nn

import bvgls
from bvgls.reference import NaiveBVR


def build(spec, lr=0.1, opt="sgd", seed=0):
    model = mlp(seed)
    groups = bvgls.layer_groups(model)
    if opt == "sgd":
        optimizer = torch.optim.SGD(groups.param_groups(), lr=lr, momentum=0.9, weight_decay=1e-3)
    else:
        optimizer = torch.optim.AdamW(groups.param_groups(), lr=lr)
    return model, optimizer, (None if spec is None else bvgls.make_strategy(spec, optimizer, groups))


@pytest.mark.parametrize("spec", ["bvgls", "bvgls:probe=3", "bvgls:ema=bfloat16", "bvgts"])
def test_fused_statistics_equal_unfused(spec):
    """At lr 0 both runs see the same gradients: the same EMA m, sums, step counts and ratios
    after every statistics step, and the fused selection is the unfused one of the step before."""
    plain, fused = build(spec, lr=0.0), build(spec + ":fused=true", lr=0.0)
    previous = []
    for step in range(7):
        for model, opt, s in (plain, fused):
            one_step(model, opt, s, step)
        p, f = plain[2], fused[2]
        for mp, mf in zip(p._m, f._m):
            assert (mp is None) == (mf is None)
            if mp is not None:
                assert torch.equal(mp, mf), f"step {step}: EMA differs"
        assert torch.equal(p._sq, f._sq) and torch.equal(p._t, f._t), f"step {step}"
        assert torch.equal(p.ratios.nan_to_num(-1.0), f.ratios.nan_to_num(-1.0)), f"step {step}"
        assert f.selected == previous, f"step {step}: not the lag-1 selection"
        previous = list(p.probe_selection)


def reference_run(steps, k=1, lr=0.1, opt="sgd", skip=False):
    """Lag-1 BVG-LS by hand: NaiveBVR ratios after each step choose the groups the next step updates
    (step 1 chooses by the largest bias, as the method defines); the unselected groups step at
    learning rate 0, or get no update at all with ``skip``."""
    model, optimizer, _ = build(None, lr=lr, opt=opt)
    lists = [g["params"] for g in optimizer.param_groups]
    naive = NaiveBVR(lists)
    chosen, trace = [], []
    for step in range(steps):
        optimizer.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        grads = [[p.grad.clone() for p in ps] for ps in lists]
        ratios = naive.update()
        for gi, group in enumerate(optimizer.param_groups):
            group["lr"] = lr if gi in chosen else 0.0
            if skip and gi not in chosen:
                for p in group["params"]:
                    p.grad = None
        optimizer.step()
        trace.append(list(chosen))
        chosen = largest_bias(grads, k) if step == 0 else clear_top_k(ratios, k)
        if chosen is None:  # a near-tie, decided by rounding: the comparison ends here
            break
    return model, optimizer, trace


@pytest.mark.parametrize(
    ("spec", "opt"),
    [("bvgls:fused=true", "sgd"), ("bvgls:fused=true", "adamw"), ("bvgls-skip:fused=true", "sgd")],
)
def test_fused_equals_the_lag1_reference(spec, opt):
    """Same selections, weights and optimizer state (momentum, moments, step counts) as the lag-1
    reference: at probe=1 the learning-rate-0 steps taken during backward are the paper's."""
    steps, lr = 12, (0.1 if opt == "sgd" else 1e-2)
    ref_model, ref_opt, ref_trace = reference_run(steps, lr=lr, opt=opt, skip="skip" in spec)
    assert len(ref_trace) == steps, "the reference hit a near-tie: pick other seeds"
    model, optimizer, s = build(spec, lr=lr, opt=opt)
    trace = []
    for step in range(steps):
        one_step(model, optimizer, s, step)
        trace.append(list(s.selected))
    assert trace == ref_trace
    assert trace[0] == [] and len({tuple(t) for t in trace[1:]}) > 1  # the first step updates nothing
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert optimizer.state[p].keys() == ref_opt.state[q].keys()
        for key, value in optimizer.state[p].items():
            torch.testing.assert_close(value, ref_opt.state[q][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["bvgls:fused=true", "bvgls-skip:fused=true"])
def test_first_step_moves_no_weight(spec):
    model, opt, s = build(spec)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in model.parameters())  # nothing trains at step 0: every gradient freed
    s.step()
    assert s.num_steps == 1 and s.selected == [] and s.counts == [0] * s.num_groups
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(s.probe_selection) == 1  # chosen for step 2 from step 1's statistics
    if "skip" in spec:
        assert not opt.state  # nothing stepped: no optimizer state yet
    else:  # the learning-rate-0 step: SGD's first momentum is the gradient plus the weight-decay term
        twin = mlp(0)
        nn.functional.cross_entropy(twin(x), y).backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], q.grad + 1e-3 * q.detach())


def test_learning_rate_0_steps_in_backward_are_not_optimizer_steps():
    """The learning-rate-0 steps taken during backward run no step hook: a scheduler or a user's hook
    sees one optimizer step per training step."""
    model, opt, s = build("bvgls:fused=true")
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for step in range(4):
        one_step(model, opt, s, step)
        scheduler.step()
    assert calls == ["pre", "post"] * 4
    assert [g["lr"] for g in opt.param_groups] == [0.1 * 0.5**2] * len(opt.param_groups)


@pytest.mark.parametrize("spec", ["bvgls:fused=true", "bvgls:fused=true:probe=2"])
def test_only_the_updated_groups_keep_a_gradient_after_backward(spec):
    model, opt, s = build(spec)
    for step in range(6):
        opt.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        kept = {gi for gi, ps in enumerate(s.group_params) if any(p.grad is not None for p in ps)}
        assert kept == set(s.probe_selection), f"step {step}"
        s.step()


def test_fused_probe_steps_fold_every_gradient_others_only_the_trained():
    model, opt, s = build("bvgls-fused:probe=3")
    assert s.fused and s.probe == 3 and s.release_frozen_state and s.ema_dtype == torch.bfloat16
    for step in range(9):
        trained_before = set(s.probe_selection)
        frozen = set(s.frozen_groups())
        t_before = s._t.clone()
        one_step(model, opt, s, step)
        if step % 3 == 0:
            assert not frozen and torch.equal(s._t, t_before + 1), f"probe step {step} folds every tensor"
        else:
            assert frozen == set(s.group_names) - {s.group_names[g] for g in trained_before}
            assert torch.equal(s._t, t_before), f"step {step} folds nothing"
        assert s.selected == sorted(trained_before)
        group_of = {id(p): g for p, g in zip(s.params, s.param_group_index)}
        held = {group_of[id(p)] for p in opt.state}
        assert held <= set(s.probe_selection) | trained_before  # release_state: only trained groups hold state


@pytest.mark.parametrize("spec", ["bvgls-fused:probe=2", "bvgls-fused:probe=2:lag=0", "bvgls:fused=true"])
def test_resume_continues_identically(spec):
    model, opt, s = build(spec, opt="adamw", lr=1e-2)
    for step in range(5):
        one_step(model, opt, s, step)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), s.state_dict()))  # torch shares tensors
    model2, opt2, s2 = build(spec, opt="adamw", lr=1e-2, seed=1)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    s2.load_state_dict(saved[2])
    for step in range(5, 11):
        for m, o, st in ((model, opt, s), (model2, opt2, s2)):
            one_step(m, o, st, step)
        assert s.selected == s2.selected and s.probe_selection == s2.probe_selection
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="other options"):
        build("bvgls:probe=2:release_state=true:ema=bfloat16")[2].load_state_dict(saved[2])


def test_state_bytes_cover_ema_sums_and_optimizer_state():
    model, opt, s = build("bvgls-fused:probe=2", opt="adamw")
    for step in range(2):  # step 1 trains the group chosen at step 0, which holds AdamW state
        one_step(model, opt, s, step)
    state = s.state_bytes()
    ema = sum(m.numel() * 2 for m in s._m if m is not None)  # bfloat16
    assert sum(state["strategy"].values()) == ema + len(s.params) * 3 * 8  # sq, t, ||m||^2 in float64
    opt_bytes = sum(
        v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)
    )
    assert sum(state["optimizer"].values()) == opt_bytes > 0


def test_gradient_accumulation_is_refused():
    model, opt, s = build("bvgls:fused=true")
    for step in (0, 1):
        x, y = batch(step)
        if step == 0:
            nn.functional.cross_entropy(model(x), y).backward()
        else:
            with pytest.raises(RuntimeError, match="once per optimizer step"):
                nn.functional.cross_entropy(model(x), y).backward()


def test_grad_scaler_is_refused():
    model, opt, s = build("bvgls:fused=true")
    one_step(model, opt, s, 0)  # the first step keeps no gradient, and GradScaler.step asserts on that itself
    scaler = torch.amp.GradScaler("cpu")
    x, y = batch(1)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt)


def test_distributed_and_misuse_are_refused(monkeypatch):
    model, opt, s = build("bvgls:fused=true")
    with pytest.raises(RuntimeError, match="call loss.backward"):
        s.step()
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="between backward"):
        s.state_dict()
    s.step()
    s.remove()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="DDP / FSDP2"):
        build("bvgls:fused=true")


def test_nonfinite_gradient_skips_the_step_and_warns():
    model, opt, s = build("bvgls:fused=true")
    one_step(model, opt, s, 0)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(1)
    (nn.functional.cross_entropy(model(x), y) * math.inf).backward()
    with pytest.warns(RuntimeWarning, match="already folded"):
        s.step()
    assert s.num_steps == 1 and s.nonfinite_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(m is None or m.isfinite().all() for m in s._m)
    assert all(v.isfinite().all() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize(
    ("spec", "opt"),
    [
        ("bvgls", "sgd"),
        ("bvgls", "adamw"),
        ("bvgls:k=2", "sgd"),
        ("bvgls-skip", "sgd"),
        ("bvgls:probe=3", "sgd"),
        ("bvgls:probe=3:release_state=true:ema=bfloat16", "adamw"),
    ],
)
def test_lag0_is_the_unfused_method(spec, opt):
    """lag=0 holds the best groups' gradients instead of lagging: selections, weights, optimizer
    state and statistics are the unfused strategy's."""
    lr = 0.1 if opt == "sgd" else 1e-2
    plain, fused = build(spec, lr=lr, opt=opt), build(spec + ":fused=true:lag=0", lr=lr, opt=opt)
    for step in range(10):
        for model, optimizer, s in (plain, fused):
            one_step(model, optimizer, s, step)
        assert fused[2].selected == plain[2].selected, f"step {step}"
        assert torch.equal(plain[2].ratios.nan_to_num(-1.0), fused[2].ratios.nan_to_num(-1.0)), f"step {step}"
    assert sum(c > 0 for c in plain[2].counts) > 1 and sum(plain[2].counts) >= 10  # the selection moved
    for p, q in zip(plain[0].parameters(), fused[0].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        for key, value in plain[1].state[p].items():
            torch.testing.assert_close(fused[1].state[q][key], value, rtol=1e-6, atol=1e-7)


def test_lag0_holds_at_most_the_best_groups_gradients():
    """During backward at most k + 1 groups hold a gradient (the best so far and the one being
    folded); after it, only the candidates."""
    model, opt, s = build("bvgls:fused=true:lag=0:k=2")
    most = []

    def count(_):
        most.append(sum(any(p.grad is not None for p in ps) for ps in s.group_params))

    handles = [p.register_post_accumulate_grad_hook(count) for p in model.parameters()]  # after the fold hooks
    for step in range(4):
        opt.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        assert sum(any(p.grad is not None for p in ps) for ps in s.group_params) <= 3
        s.step()
    assert max(most) <= 3 and s.num_groups > 3
    for h in handles:
        h.remove()


def test_lag_is_checked():
    with pytest.raises(ValueError, match="option of fused mode"):
        build("bvgls:lag=0")
    with pytest.raises(ValueError, match="lag must be 0 or 1"):
        build("bvgls:fused=true:lag=2")
