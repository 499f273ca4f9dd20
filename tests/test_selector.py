"""BVG-LS / BVG-TS against the method's formula (docs/method.md) and the behaviour users rely on."""

import copy
import math

import pytest
import torch
from tolerances import assert_ratios_match, clear_top_k, largest_bias
from torch import nn

import bvgls
from bvgls.reference import NaiveBVR


def small_cnn(channels_last=False):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )
    return model.to(memory_format=torch.channels_last) if channels_last else model


def batch(seed, n=8, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, torch.randint(0, 5, (n,), generator=g)


def backward(model, seed, channels_last=False):
    x, y = batch(seed, channels_last=channels_last)
    nn.functional.cross_entropy(model(x), y).backward()


def make(model, k=1, lr=0.1, momentum=0.0, **kw):
    groups = bvgls.layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=lr, momentum=momentum)
    return groups, opt, bvgls.BVGLS(opt, k=k, **kw)


def test_formula_against_hand_computed_example():
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "name": "a"}, {"params": [b], "name": "b"}], lr=0.0)
    sel = bvgls.BVGLS(opt, k=1, alpha=0.9)
    for ga, gb in [([1.0, 2.0], [1.0]), ([3.0, 0.0], [1.5])]:
        a.grad, b.grad = torch.tensor(ga), torch.tensor(gb)
        sel.step()
    # group a by hand: m2 = [0.39, 0.18], v2 = [0.99, 0.36], 1 - 0.9^2 = 0.19
    bias = (0.39**2 + 0.18**2) / 0.19**2
    variance = (0.99 + 0.36) / 0.19 - bias
    assert sel.ratios[0].item() == pytest.approx(bias / variance, rel=1e-6)
    assert bias / variance == pytest.approx(2.5625)
    # group b: m2 = 0.9*0.1 + 0.15 = 0.24, v2 = 0.9*0.1 + 0.225 = 0.315
    bias_b = 0.24**2 / 0.19**2
    var_b = 0.315 / 0.19 - bias_b
    assert sel.ratios[1].item() == pytest.approx(bias_b / var_b, rel=1e-5)  # float32 m, ratio 25.6
    assert sel.selected == [1] and bias_b / var_b > 2.5625
    assert sel.bias[0].item() == pytest.approx(bias, rel=1e-6)
    assert sel.variance[0].item() == pytest.approx(variance, rel=1e-6)


def test_first_step_variance_is_exactly_zero_and_clamped():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.0)
    sel = bvgls.BVGLS(opt)
    a.grad, b.grad = torch.tensor([0.3, -0.1, 0.7]), torch.tensor([1.0, 2.0, 3.0])
    sel.step()
    assert sel.variance.tolist() == [1e-10, 1e-10]
    assert sel.selected == [1]  # largest bias wins when every variance is 0


@pytest.mark.parametrize("channels_last", [False, pytest.param(True, marks=pytest.mark.isolated)])
def test_matches_naive_implementation_for_20_steps(channels_last):
    model = small_cnn(channels_last)
    groups, opt, sel = make(model, lr=0.05, momentum=0.9)
    naive = NaiveBVR([ps for _, ps in groups.named_param_lists()])
    compared = 0
    for step in range(20):
        opt.zero_grad()
        backward(model, step, channels_last)
        ref = naive.update()
        sel.step()
        if step == 0:  # step 1: ours uses the exact variance 0, the naive one rounding noise
            assert sel.selected == largest_bias([[p.grad for p in ps] for ps in sel.group_params])
            continue
        assert_ratios_match(sel.ratios.tolist(), ref, f"step {step + 1}")
        expected = clear_top_k(ref)
        if expected is not None:  # a near-tie is decided by rounding, in either implementation
            assert sel.selected == expected
            compared += 1
    assert compared >= 15


def test_matches_naive_on_large_tensors_that_are_chunked():
    torch.manual_seed(0)
    w = nn.Parameter(torch.zeros(300_000))  # > 2 chunks: the chunked norm path
    v = nn.Parameter(torch.zeros(1000, 300).t())  # non-contiguous: the whole-tensor path
    opt = torch.optim.SGD([{"params": [w]}, {"params": [v]}], lr=0.0)
    sel = bvgls.BVGLS(opt)
    naive = NaiveBVR([[w], [v]])
    for _ in range(5):
        w.grad = torch.randn(300_000) * 0.01 + 0.004
        v.grad = (torch.randn(1000, 300) * 0.01 + 0.002).t()
        ref = naive.update()
        sel.step()
    assert sel.ratios.tolist() == pytest.approx(ref, rel=1e-5)


def test_only_top_k_groups_move_with_plain_sgd():
    model = small_cnn()
    groups, opt, sel = make(model, k=2)
    for step in range(3):
        before = [p.detach().clone() for p in sel.params]
        opt.zero_grad()
        backward(model, step)
        sel.step()
        ratios = sel.ratios.tolist()
        assert sel.selected == sorted(sorted(range(len(ratios)), key=lambda i: -ratios[i])[:2])
        for p, b, g in zip(sel.params, before, sel.param_group_index):
            assert torch.equal(p, b) != (g in sel.selected)
    assert sum(sel.counts) == 6 and sel.num_steps == 3


def test_unselected_groups_keep_momentum_by_default_and_skip_variant_does_not():
    for skip in (False, True):
        model = small_cnn()
        groups, opt, sel = make(model, momentum=0.9, skip_unselected=skip)
        backward(model, 0)
        before = [p.detach().clone() for p in sel.params]
        sel.step()
        for p, b, g in zip(sel.params, before, sel.param_group_index):
            has_buffer = opt.state.get(p, {}).get("momentum_buffer") is not None
            if g in sel.selected:
                assert has_buffer and not torch.equal(p, b)
            else:
                assert torch.equal(p, b)
                assert has_buffer == (not skip)


def test_lr_scheduler_keeps_working():
    model = small_cnn()
    groups, opt, sel = make(model, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(3):
        opt.zero_grad()
        backward(model, step)
        lr_now = opt.param_groups[0]["lr"]
        before = [p.detach().clone() for p in sel.params]
        grads = [p.grad.clone() for p in sel.params]
        sel.step()
        sched.step()
        for p, b, g, gi in zip(sel.params, before, grads, sel.param_group_index):
            expected = b - lr_now * g if gi in sel.selected else b
            torch.testing.assert_close(p.detach(), expected)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.1 * 0.5**3)] * len(opt.param_groups)


def test_gradient_accumulation_takes_statistics_once_on_the_summed_gradient():
    model = small_cnn()
    groups, opt, sel = make(model)
    naive = NaiveBVR([ps for _, ps in groups.named_param_lists()])
    for step in range(3):
        opt.zero_grad()
        for micro in range(2):
            backward(model, 10 * step + micro)
        ref = naive.update()
        sel.step()
    assert sel.num_steps == 3
    assert_ratios_match(sel.ratios.tolist(), ref)


def test_grad_scaler_skipped_step_does_not_touch_statistics():
    model = small_cnn()
    groups, opt, sel = make(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    naive = NaiveBVR([ps for _, ps in groups.named_param_lists()])
    x, y = batch(0)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    naive.update()  # the reference sees unscaled gradients
    scaler.step(opt)
    scaler.update()
    state = copy.deepcopy(sel.state_dict())
    params = [p.detach().clone() for p in sel.params]

    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    sel.params[0].grad[0] = float("inf")  # overflow: the scaler must skip this step
    scaler.step(opt)
    scaler.update()
    assert sel.num_steps == 1
    after = sel.state_dict()
    for m0, m1 in zip(state["m"], after["m"]):
        assert torch.equal(m0, m1)
    assert all(torch.equal(p, q) for p, q in zip(params, sel.params))

    opt.zero_grad()
    x, y = batch(1)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    ref = naive.update()
    scaler.step(opt)
    assert sel.num_steps == 2
    assert_ratios_match(sel.ratios.tolist(), ref)


def test_none_grads_are_skipped_and_gradless_groups_never_selected():
    a, b, c = (nn.Parameter(torch.zeros(4)) for _ in range(3))
    opt = torch.optim.SGD(
        [{"params": [a]}, {"params": [b, c]}, {"params": [torch.nn.Parameter(torch.zeros(2))]}], lr=1.0
    )
    sel = bvgls.BVGLS(opt, k=2)
    naive = NaiveBVR([[a], [b, c], opt.param_groups[2]["params"]])
    torch.manual_seed(0)
    for step in range(4):
        a.grad = torch.randn(4) * 5
        b.grad = torch.randn(4) + 1.0
        c.grad = None if step % 2 else torch.randn(4)
        ref = naive.update()
        sel.step()
        assert math.isnan(sel.ratios[2].item()) and 2 not in sel.selected
        if step == 0:  # variance exactly 0, clamped; the naive v_hat - m_hat^2 is rounding noise here
            assert sel.variance[:2].tolist() == [1e-10, 1e-10]
        else:
            assert_ratios_match(sel.ratios[:2].tolist(), ref[:2], f"step {step + 1}")
    assert sel.counts[2] == 0


def test_frozen_group_is_never_selected():
    model = small_cnn()
    for p in model[0].parameters():
        p.requires_grad_(False)
    groups, opt, sel = make(model, k=3)
    for step in range(3):
        opt.zero_grad()
        backward(model, step)
        sel.step()
    assert groups.names[0] == "0" and sel.group_names[0] != "0"  # frozen group not even in the optimizer


def test_state_dict_resume_gives_the_same_run():
    def run(n_steps, model, opt, sel, start=0):
        picks = []
        for step in range(start, start + n_steps):
            opt.zero_grad()
            backward(model, step)
            sel.step()
            picks.append(list(sel.selected))
        return picks

    model = small_cnn()
    _, opt, sel = make(model, momentum=0.9)
    full = run(10, model, opt, sel)

    model2 = small_cnn()
    _, opt2, sel2 = make(model2, momentum=0.9)
    first = run(5, model2, opt2, sel2)
    saved = copy.deepcopy({"model": model2.state_dict(), "opt": opt2.state_dict(), "sel": sel2.state_dict()})

    model3 = small_cnn()
    _, opt3, sel3 = make(model3, momentum=0.9)
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    sel3.load_state_dict(saved["sel"])
    second = run(5, model3, opt3, sel3, start=5)
    assert first + second == full
    assert sel3.counts == sel.counts
    for p, q in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, q)


def test_calling_optimizer_step_directly_also_selects():
    model = small_cnn()
    _, opt, sel = make(model)
    backward(model, 0)
    opt.step()
    assert sel.num_steps == 1 and len(sel.selected) == 1
    sel.remove()
    opt.step()
    assert sel.num_steps == 1


def test_selection_groups_differ_from_optimizer_param_groups():
    model = small_cnn()
    groups = bvgls.layer_groups(model)
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "lr": 0.05}], lr=0.1)
    sel = bvgls.BVGLS(opt, k=1, groups=groups)
    original_groups = opt.param_groups
    backward(model, 0)
    before = {p: p.detach().clone() for p in model.parameters()}
    grads = {p: p.grad.clone() for p in model.parameters()}
    sel.step()
    assert opt.param_groups is original_groups and [g["lr"] for g in opt.param_groups] == [0.1, 0.05]
    chosen = {id(p) for p in sel.group_params[sel.selected[0]]}
    for p in model.parameters():
        if id(p) in chosen:
            lr = 0.1 if p.dim() > 1 else 0.05
            torch.testing.assert_close(p.detach(), before[p] - lr * grads[p])
        else:
            assert torch.equal(p, before[p])


def test_at_most_one_host_sync_per_step():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) in ("aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default"):
                Reads.n += 1
            return func(*args, **(kwargs or {}))

    model = small_cnn()
    _, opt, sel = make(model)
    tolist = torch.Tensor.tolist
    calls = []
    backward(model, 0)
    sel.step()  # first step builds caches
    opt.zero_grad()
    backward(model, 1)
    try:
        torch.Tensor.tolist = lambda t: calls.append(1) or tolist(t)
        with Reads():
            sel.step()
    finally:
        torch.Tensor.tolist = tolist
    assert Reads.n + len(calls) <= 1


def test_bvgts_updates_a_fraction_of_tensors():
    model = small_cnn()
    groups = bvgls.layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=0.1)
    sel = bvgls.BVGTS(opt, fraction=0.3, groups=groups)
    n = len(list(model.parameters()))
    assert sel.num_groups == n and sel.group_names[0] == "0.weight"
    for step in range(3):
        opt.zero_grad()
        backward(model, step)
        before = [p.detach().clone() for p in sel.params]
        sel.step()
        assert len(sel.selected) == math.ceil(0.3 * n)
        ratios = sel.ratios.tolist()
        assert min(ratios[i] for i in sel.selected) >= max(r for i, r in enumerate(ratios) if i not in sel.selected)
        moved = [i for i, (p, b) in enumerate(zip(sel.params, before)) if not torch.equal(p, b)]
        assert moved == sel.selected
    sel2 = bvgls.BVGTS(torch.optim.SGD(model.parameters(), lr=0.1))
    assert sel2.num_groups == n


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k must be >= 1"),
        ({"k": 99}, "larger than the number"),
        ({"k": 1.5}, "k must be an int"),
        ({"alpha": 1.0}, "alpha must be in"),
        ({"alpha": 0.0}, "alpha must be in"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = small_cnn()
    opt = torch.optim.SGD(bvgls.layer_groups(model).param_groups(), lr=0.1)
    with pytest.raises((ValueError, TypeError), match=match):
        bvgls.BVGLS(opt, **kwargs)


def test_bad_groups():
    model = small_cnn()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="at least 2 non-empty groups"):
        bvgls.BVGLS(torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="missing from every group"):
        bvgls.BVGLS(torch.optim.SGD(params, lr=0.1), groups={"a": params[:2], "b": params[2:4]})
    with pytest.raises(ValueError, match="in both group"):
        bvgls.BVGLS(torch.optim.SGD(params, lr=0.1), groups={"a": params, "b": params[:1]})
    with pytest.raises(ValueError, match="not in the optimizer"):
        bvgls.BVGLS(torch.optim.SGD(params[:2], lr=0.1), groups={"a": params[:1], "b": params[1:3]})
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        bvgls.BVGLS(params)
    with pytest.raises(ValueError, match="fraction"):
        bvgls.BVGTS(torch.optim.SGD(params, lr=0.1), fraction=0.0)


def test_load_state_dict_rejects_other_groups():
    _, _, sel = make(small_cnn())
    other = bvgls.BVGLS(
        torch.optim.SGD(
            [{"params": [nn.Parameter(torch.zeros(1))]}, {"params": [nn.Parameter(torch.zeros(1))]}], lr=0.1
        )
    )
    with pytest.raises(ValueError, match="do not match"):
        other.load_state_dict(sel.state_dict())
    sel.remove()  # one strategy per optimizer
    with pytest.raises(ValueError, match="not a BVGTS"):
        bvgls.BVGTS(sel.optimizer).load_state_dict(sel.state_dict())


def test_closure_is_evaluated_before_the_selection():
    model = small_cnn()
    _, opt, sel = make(model)

    def closure():
        opt.zero_grad()
        x, y = batch(0)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    calls = []
    counted = lambda: calls.append(1) or closure()  # noqa: E731
    loss = sel.step(counted)
    assert loss.item() > 0 and sel.num_steps == 1 and len(calls) == 1
    # a framework passing the closure to optimizer.step (Lightning does) gets the same
    opt.zero_grad()
    opt.step(counted)
    assert sel.num_steps == 2 and len(calls) == 2 and not math.isnan(sel.ratios[0].item())
    with pytest.raises(TypeError, match="LBFGS"):
        bvgls.BVGLS(torch.optim.LBFGS(model.parameters()))
