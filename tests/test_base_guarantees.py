"""Core guarantees of every strategy: optimizer group state survives the
selection steps, non-finite steps are skipped, one strategy per optimizer, strict and
atomic state dicts, no step without gradients, FSDP2 without set-up refused."""

import copy
import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import batch, mlp
from torch import nn

import bvgls
from bvgls import distributed as bdist


def backward(model, step):
    x, y = batch(step)
    nn.functional.cross_entropy(model(x), y).backward()


def train(model, opt, strategy, steps, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        backward(model, step)
        (strategy or opt).step()


# ---------------------------------------------------------------------- optimizer group state
def _schedulefree(groups):
    schedulefree = pytest.importorskip("schedulefree")
    opt = schedulefree.SGDScheduleFree(groups, lr=0.05)
    opt.train()
    return opt


def _prodigy(groups):
    prodigyopt = pytest.importorskip("prodigyopt")
    return prodigyopt.Prodigy(groups, lr=1.0)


STEPS = 12


def trained_plain_and_fresh(make_optimizer):
    """An unwrapped optimizer trained for STEPS steps, and a fresh (model, groups, optimizer) to wrap."""
    plain_model = mlp()
    plain = make_optimizer(bvgls.layer_groups(plain_model).param_groups())
    train(plain_model, plain, None, STEPS)
    model = mlp()
    groups = bvgls.layer_groups(model)
    return plain, model, groups, make_optimizer(groups.param_groups())


@pytest.mark.parametrize("spec", ["bvgls", "llrd"])
def test_schedulefree_group_state_advances_as_unwrapped(spec):
    plain, model, groups, opt = trained_plain_and_fresh(_schedulefree)
    dicts = list(opt.param_groups)
    strategy = bvgls.make_strategy(spec, opt, groups)
    train(model, opt, strategy, STEPS)
    assert all(a is b for a, b in zip(opt.param_groups, dicts))  # the optimizer's own dicts, kept
    assert [g["k"] for g in opt.param_groups] == [STEPS] * len(dicts) == [g["k"] for g in plain.param_groups]
    assert [g["lr"] for g in opt.param_groups] == [0.05] * len(dicts)
    # the head steps with multiplier 1 in llrd and is selected at least once in bvgls: it saw the full lr
    head, plain_head = opt.param_groups[-1], plain.param_groups[-1]
    if spec == "llrd":
        assert head["lr_max"] == plain_head["lr_max"] == 0.05
        assert head["weight_sum"] == pytest.approx(plain_head["weight_sum"], rel=1e-12)
        assert opt.param_groups[0]["lr_max"] == pytest.approx(0.05 * strategy.multipliers[0], rel=1e-12)
    else:
        for group, count in zip(opt.param_groups, strategy.counts):
            assert group["lr_max"] == (0.05 if count else 0.0)  # a never-selected group only saw lr 0
        assert sum(g["weight_sum"] > 0 for g in opt.param_groups) == sum(c > 0 for c in strategy.counts)


def test_prodigy_d_and_k_advance_under_bvgls():
    plain, model, groups, opt = trained_plain_and_fresh(_prodigy)
    d0 = opt.param_groups[0]["d"]
    strategy = bvgls.BVGLS(opt, groups=groups)
    train(model, opt, strategy, STEPS)
    assert [g["k"] for g in opt.param_groups] == [STEPS] * len(opt.param_groups)
    assert len({g["d"] for g in opt.param_groups}) == 1  # Prodigy's d is global
    assert opt.param_groups[0]["d"] > d0 and plain.param_groups[0]["d"] > d0


def test_split_param_groups_write_back_what_the_optimizer_changed():
    """Selection groups that cut through param groups: each param group is split for the
    step; the optimizer's own keys come back from the sub-group with the largest multiplier."""
    model = mlp()
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = _schedulefree([{"params": decay}, {"params": no_decay, "lr": 0.02}])
    strategy = bvgls.make_strategy("llrd:decay=0.5", opt, bvgls.layer_groups(model))
    train(model, opt, strategy, STEPS)
    assert [g["k"] for g in opt.param_groups] == [STEPS, STEPS]
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.02]
    # the winner is the head's sub-group (multiplier 1): it saw each group's full lr
    assert [g["lr_max"] for g in opt.param_groups] == [0.05, 0.02]


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    ],
)
def test_torch_optimizers_groups_are_left_as_they_were(make_opt):
    model = mlp()
    groups = bvgls.layer_groups(model)
    opt = make_opt(groups.param_groups())
    before = copy.deepcopy(opt.state_dict()["param_groups"])
    dicts = list(opt.param_groups)
    strategy = bvgls.BVGLS(opt, groups=groups)
    train(model, opt, strategy, 5)
    assert all(a is b for a, b in zip(opt.param_groups, dicts))
    assert opt.state_dict()["param_groups"] == before


# ---------------------------------------------------------------------- one strategy per optimizer
@pytest.mark.parametrize("first", ["bvgls", "lisa", "llrd", "full", "L2-3"])
def test_second_strategy_on_one_optimizer_is_refused(first):
    model = mlp()
    groups = bvgls.layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=0.1)
    one = bvgls.make_strategy(first, opt, groups)
    with pytest.raises(ValueError, match=r"already has a \w+ attached; call \.remove\(\)"):
        bvgls.make_strategy("bvgls", opt, groups)
    one.remove()
    two = bvgls.make_strategy("bvgls", opt, groups)  # detached: a new one may attach
    backward(model, 0)
    two.step()
    assert two.num_steps == 1 and one.num_steps == 0


def test_failed_construction_leaves_no_hook_behind():
    model = mlp()
    groups = bvgls.layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=0.1)
    with pytest.raises(ValueError, match="k=9"):
        bvgls.BVGLS(opt, k=9, groups=groups)
    strategy = bvgls.BVGLS(opt, k=1, groups=groups)  # not refused: the failed one never attached
    backward(model, 0)
    strategy.step()
    assert strategy.num_steps == 1


# ---------------------------------------------------------------------- non-finite gradients
@pytest.mark.parametrize("spec", ["bvgls", "bvgls-skip", "bvgls:probe=2", "lisa:K=2:gamma=1", "llrd"])
def test_a_non_finite_gradient_leaves_weights_and_statistics_untouched(spec):
    model = mlp()
    groups = bvgls.layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=0.1, momentum=0.9)
    strategy = bvgls.make_strategy(spec, opt, groups)
    train(model, opt, strategy, 3)
    state = copy.deepcopy(strategy.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]

    opt.zero_grad()
    backward(model, 3)
    next(p for p in strategy.params if p.grad is not None).grad.view(-1)[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="nan/inf"):
        strategy.step()
    assert strategy.nonfinite_steps == 1 and strategy.num_steps == 3
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    after = strategy.state_dict()
    for key, value in state.items():
        if key != "nonfinite_steps":
            _assert_same(value, after[key])
    _assert_same(opt_state, opt.state_dict())

    with warnings.catch_warnings():  # warned once: a second one is only counted
        warnings.simplefilter("error")
        opt.zero_grad()
        backward(model, 3)
        next(p for p in strategy.params if p.grad is not None).grad.view(-1)[0] = float("inf")
        strategy.step()
    assert strategy.nonfinite_steps == 2
    train(model, opt, strategy, 2, start=4)  # finite again: training goes on
    assert strategy.num_steps == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if hasattr(strategy, "ratios"):
        assert torch.isfinite(strategy.ratios).all()


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert (
            torch.equal(a, b)
            if a.is_floating_point() is False or not a.isnan().any()
            else torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
        )
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_nonfinite_selection_statistics_match_a_run_without_that_step():
    """The skipped step leaves no trace: ratios and choices equal a run that never saw it."""

    def run(poison):
        model = mlp()
        groups = bvgls.layer_groups(model)
        opt = torch.optim.SGD(groups.param_groups(), lr=0.1, momentum=0.9)
        s = bvgls.BVGLS(opt, groups=groups)
        picks = []
        for step in range(6):
            if poison and step == 3:
                opt.zero_grad()
                backward(model, 99)
                s.params[0].grad.view(-1)[1] = float("-inf")
                with pytest.warns(RuntimeWarning):
                    s.step()
            opt.zero_grad()
            backward(model, step)
            s.step()
            picks.append(list(s.selected))
        return picks, s.ratios, list(model.parameters())

    a, b = run(False), run(True)
    assert a[0] == b[0]
    assert torch.equal(a[1], b[1])
    assert all(torch.equal(p, q) for p, q in zip(a[2], b[2]))


def test_grad_scaler_still_skips_overflow_before_the_strategy():
    model = mlp()
    groups = bvgls.layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=0.1)
    strategy = bvgls.BVGLS(opt, groups=groups)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batch(0)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    strategy.params[0].grad.view(-1)[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert strategy.num_steps == 0 and strategy.nonfinite_steps == 0  # the scaler skipped it itself
    assert scaler.get_scale() < 2.0**10
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert strategy.num_steps == 1 and torch.isfinite(strategy.ratios).any()


# ---------------------------------------------------------------------- step() before backward()
@pytest.mark.parametrize("spec", ["bvgls", "lisa", "full"])
def test_step_without_any_gradient_is_refused_and_not_counted(spec):
    model = mlp()
    groups = bvgls.layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=0.1)
    strategy = bvgls.make_strategy(spec, opt, groups)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"no parameter has a gradient \(call loss.backward\(\)"):
        strategy.step()
    assert strategy.num_steps == 0 and strategy.counts == [0] * strategy.num_groups
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    backward(model, 0)
    strategy.step()
    assert strategy.num_steps == 1


# ---------------------------------------------------------------------- state dicts
def _bvgls(model, **kw):
    groups = bvgls.layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=0.1)
    return opt, bvgls.BVGLS(opt, groups=groups, **kw)


@pytest.mark.parametrize(
    "saved, now, message",
    [
        ({"k": 2, "alpha": 0.5}, {"k": 1}, "alpha: saved 0.5, now 0.9, k: saved 2, now 1"),
        ({"probe": 4}, {}, "probe: saved 4, now 1"),
        ({"skip_unselected": True}, {}, "skip_unselected: saved True, now False"),
    ],
)
def test_state_saved_with_other_options_is_refused(saved, now, message):
    model = mlp()
    opt, s = _bvgls(model, **saved)
    train(model, opt, s, 2)
    model2 = mlp()
    _, other = _bvgls(model2, **now)
    with pytest.raises(ValueError, match=f"saved with other options \\({message}\\)"):
        other.load_state_dict(s.state_dict())


def _trained_pair():
    """Two BVG-LS strategies trained 3 and 1 steps: a saved state and a strategy to load it into."""
    model = mlp()
    opt, s = _bvgls(model)
    train(model, opt, s, 3)
    model2 = mlp(seed=1)
    opt2, s2 = _bvgls(model2)
    train(model2, opt2, s2, 1)
    return s, s2


def test_failed_load_leaves_the_strategy_untouched():
    s, s2 = _trained_pair()
    before = copy.deepcopy(s2.state_dict())
    for corrupt in (
        lambda st: st["m"].__setitem__(2, torch.zeros(5)),  # a buffer of the wrong shape
        lambda st: st.__setitem__("t", torch.zeros(2)),
        lambda st: st.__setitem__("selected", [17]),
        lambda st: st.pop("probe_counts"),
    ):
        state = copy.deepcopy(s.state_dict())
        corrupt(state)
        with pytest.raises(ValueError):
            s2.load_state_dict(state)
        _assert_same(before, s2.state_dict())


def test_a_failure_while_assigning_rolls_back(monkeypatch):
    s, s2 = _trained_pair()
    before = copy.deepcopy(s2.state_dict())
    state = s.state_dict()
    state["probe_counts"] = ["x"] * s2.num_groups  # passes the length check, fails when converted
    with pytest.raises(ValueError):
        s2.load_state_dict(state)
    _assert_same(before, s2.state_dict())


def test_state_dict_is_a_snapshot():
    model = mlp()
    opt, s = _bvgls(model)
    train(model, opt, s, 2)
    state = s.state_dict()
    kept = copy.deepcopy(state)
    train(model, opt, s, 3, start=2)
    _assert_same(kept, state)  # later steps did not change the snapshot
    model2 = mlp()
    opt2, s2 = _bvgls(model2)
    train(model2, opt2, s2, 2)
    _assert_same(state, s2.state_dict())  # and it is the state after step 2


# ---------------------------------------------------------------------- distributed
WORLD = 2


def _dist_worker(rank, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    results = []
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = mlp()
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt, s = _bvgls(model)
        backward(model, rank)
        before = [p.to_local().clone() for p in model.parameters()]
        try:
            s.step()
            results.append("fsdp-no-setup: stepped")
        except RuntimeError as e:
            unchanged = all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
            results.append(f"fsdp-no-setup: {'setup(strategy)' in str(e) and unchanged and s.num_steps == 0}")
        s.remove()
        # lean mode needs the same trainable parameters every step: refused under DDP / FSDP2
        ddp_model = mlp()
        nn.parallel.DistributedDataParallel(ddp_model)
        for spec in ("bvgls:probe=4", "bvgls:static=3", "lisa", "bcd-cyclic", "gradual-unfreeze"):
            groups = bvgls.layer_groups(ddp_model)
            opt = torch.optim.SGD(groups.param_groups(), lr=0.1)
            try:
                bvgls.make_strategy(spec, opt, groups)
                results.append(f"{spec}: accepted")
            except ValueError as e:
                ok = "not supported under torch.distributed" in str(e) and "probe=1" in str(e)
                results.append(f"{spec}: {ok and all(p.requires_grad for p in ddp_model.parameters())}")
        groups = bvgls.layer_groups(ddp_model)
        opt = torch.optim.SGD(groups.param_groups(), lr=0.1)
        bvgls.make_strategy("lisa:freeze=False", opt, groups)  # without freezing: accepted
        results.append("lisa:freeze=False: True")
    finally:
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(results))
        bdist.shutdown()  # frees the gloo group the FSDP2 mesh keeps: no abort at exit


def test_unsupported_distributed_cases_fail_clearly(tmp_path):
    mp.spawn(_dist_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert len(lines) == 7, lines
        assert all(line.endswith(": True") for line in lines), lines
