"""Peer strategies (auto-rgn, lisa, bcd-cyclic, gradual-unfreeze, llrd): each moves
exactly the groups its rule says, at the rates its formula says, and resumes from a
state_dict exactly where it left off."""

import io
import math

import pytest
import torch
from torch import nn

import bvgls
from bvgls import layer_groups, make_strategy
from bvgls.strategies.peers import LISA, AutoRGN, BlockCoordinateDescent, GradualUnfreezing, normalization_parameters

torch.set_num_threads(1)
LR = 0.1
PEERS = ["auto-rgn", "lisa", "bcd-cyclic", "gradual-unfreeze", "llrd"]


class Tiny(nn.Module):
    """5 layer groups under the generic scheme: embed, norm, block, mid, head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh())
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.block(self.norm(self.embed(x))))))


def mlp(n_groups=5):
    torch.manual_seed(0)
    layers = [nn.Linear(4, 6)]
    for _ in range(n_groups - 2):
        layers += [nn.Tanh(), nn.Linear(6, 6)]
    layers += [nn.Tanh(), nn.Linear(6, 3)]
    return nn.Sequential(*layers)


def setup(spec, model=None, **sgd):
    model = model if model is not None else mlp()
    groups = layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=LR, **sgd)
    return model, groups, opt, make_strategy(spec, opt, groups)


def step_with_ones(strategy):
    """Step with every gradient = 1; return the indices of the groups whose weights moved."""
    before = [[p.detach().clone() for p in ps] for ps in strategy.group_params]
    for p in strategy.params:
        p.grad = torch.ones_like(p)
    strategy.step()
    return [
        g
        for g, (ps, bs) in enumerate(zip(strategy.group_params, before))
        if any(not torch.equal(p, b) for p, b in zip(ps, bs))
    ]


def position(strategy, param):
    """Index of ``param`` in ``strategy.params`` (by identity: ``list.index`` compares values)."""
    return next(i for i, p in enumerate(strategy.params) if p is param)


def batch(step, n=16):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def backward(model, step):
    x, y = batch(step)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


# ---------------------------------------------------------------------- registry
def test_peers_are_registered_by_import_bvgls():
    for name in PEERS:
        assert name in bvgls.STRATEGIES and name in bvgls.strategy_names()
        assert bvgls.STRATEGIES[name].help
    assert bvgls.STRATEGIES["auto-rgn"].needs_all_gradients
    assert not any(bvgls.STRATEGIES[n].needs_all_gradients for n in PEERS if n != "auto-rgn")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("lisa:gamma=4", r"gamma=4 is larger than the number of middle groups \(3"),
        ("lisa:gamma=-1", "gamma must be a non-negative integer"),
        ("lisa:K=0", "K must be >= 1"),
        ("lisa:K=1.5", "K must be an integer"),
        ("lisa:seed=-3", "seed must be a non-negative integer"),
        ("bcd-cyclic:K=0", "K must be >= 1"),
        ("bcd-cyclic:order=sideways", "order must be one of ascending, descending, random"),
        ("bcd-cyclic:reset_state=2", "reset_state must be True or False"),
        ("gradual-unfreeze:every=0", "every must be >= 1"),
        ("llrd:decay=0", r"decay must be a number in \(0, 1\]"),
        ("llrd:decay=1.5", r"decay must be a number in \(0, 1\]"),
        ("llrd:decay=fast", r"decay must be a number"),
        ("auto-rgn:refresh=sometimes", "refresh must be 'epoch', 'step' or a number of steps"),
        ("auto-rgn:refresh=0", "refresh .* must be >= 1"),
        ("auto-rgn:batches=0", "batches must be >= 1"),
        ("auto-rgn:norm=train", "norm must be one of freeze, rgn"),
        ("auto-rgn:skip=maybe", "skip must be True or False"),
        ("lisa:k=2", "unknown option k"),
    ],
)
def test_bad_options_give_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        setup(spec)


def test_lisa_needs_middle_groups():
    with pytest.raises(ValueError, match=r"gamma=2 is larger than the number of middle groups \(0"):
        setup("lisa", mlp(2))
    _, _, _, s = setup("lisa:gamma=0", mlp(2))
    assert step_with_ones(s) == [0, 1]


# ---------------------------------------------------------------------- llrd
def test_llrd_updates_are_lr_times_decay_power_times_grad():
    model, groups, opt, s = setup("llrd:decay=0.5")
    backward(model, 0)
    before = [p.detach().clone() for p in s.params]
    grads = [p.grad.clone() for p in s.params]
    s.step()
    L = s.num_groups
    assert s.scales == [0.5 ** (L - 1 - g) for g in range(L)]
    for p, b, g, gi in zip(s.params, before, grads, s.param_group_index):
        torch.testing.assert_close(p.detach(), b - LR * 0.5 ** (L - 1 - gi) * g, rtol=0, atol=1e-7)
    assert [grp["lr"] for grp in opt.param_groups] == [LR] * L  # the temporary rates are undone
    assert s.selection_frequency() == [1.0] * L


def test_llrd_follows_an_lr_schedule():
    model, groups, opt, s = setup("llrd:decay=0.8")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    backward(model, 0)
    s.step()
    sched.step()  # base lr is now LR / 2
    backward(model, 1)
    before = [p.detach().clone() for p in s.params]
    grads = [p.grad.clone() for p in s.params]
    s.step()
    L = s.num_groups
    for p, b, g, gi in zip(s.params, before, grads, s.param_group_index):
        torch.testing.assert_close(p.detach(), b - LR / 2 * 0.8 ** (L - 1 - gi) * g, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------- lisa
def test_lisa_active_set_is_redrawn_every_K_steps_and_keeps_first_and_last():
    K, gamma = 3, 2
    _, _, _, s = setup(f"lisa:K={K}:gamma={gamma}:seed=5")
    global_rng = torch.random.get_rng_state()
    sets = []
    for t in range(10 * K):
        moved = step_with_ones(s)
        assert moved == s.selected
        assert moved[0] == 0 and moved[-1] == 4  # embedding and head always
        assert len(moved) == 2 + gamma
        if t % K:
            assert moved == sets[-1], f"the set changed at step {t}, not a multiple of K"
        sets.append(moved)
    assert len({tuple(x) for x in sets[::K]}) > 1  # it does redraw
    assert torch.equal(torch.random.get_rng_state(), global_rng)  # own generator only


def test_lisa_draws_middle_groups_uniformly_and_reproducibly():
    _, _, _, s = setup("lisa:K=1:gamma=1:seed=0")
    draws = [tuple(step_with_ones(s)) for _ in range(600)]
    for g in (1, 2, 3):
        share = sum(g in d for d in draws) / len(draws)
        assert abs(share - 1 / 3) < 0.07, (g, share)  # 5 sigma ~ 0.096; binomial sd ~ 0.019
    _, _, _, again = setup("lisa:K=1:gamma=1:seed=0")
    assert [tuple(step_with_ones(again)) for _ in range(50)] == draws[:50]
    _, _, _, other = setup("lisa:K=1:gamma=1:seed=1")
    assert [tuple(step_with_ones(other)) for _ in range(50)] != draws[:50]


def test_lisa_skips_inactive_groups_by_default():
    model, groups, opt, s = setup("lisa:K=100:gamma=1", momentum=0.9)
    step_with_ones(s)
    inactive = [g for g in range(5) if g not in s.selected]
    assert all(p not in opt.state for g in inactive for p in s.group_params[g])  # no momentum update
    model, groups, opt, s = setup("lisa:K=100:gamma=1:skip=False", momentum=0.9)
    step_with_ones(s)
    assert all("momentum_buffer" in opt.state[p] for p in s.params)


# ---------------------------------------------------------------------- bcd-cyclic
@pytest.mark.parametrize("order, expected", [("ascending", [0, 1, 2, 3, 4]), ("descending", [4, 3, 2, 1, 0])])
def test_bcd_cyclic_visits_groups_in_order(order, expected):
    K = 2
    _, _, _, s = setup(f"bcd-cyclic:K={K}:order={order}")
    moved = [step_with_ones(s) for _ in range(2 * 5 * K)]
    assert moved == [[g] for g in expected for _ in range(K)] * 2


def test_bcd_cyclic_random_order_is_a_fresh_permutation_each_cycle():
    K = 2
    _, _, _, s = setup(f"bcd-cyclic:K={K}:order=random:seed=3")
    moved = [step_with_ones(s) for _ in range(4 * 5 * K)]
    assert all(len(m) == 1 for m in moved)
    cycles = []
    for c in range(4):
        visits = [m[0] for m in moved[c * 5 * K : (c + 1) * 5 * K]]
        assert all(visits[i] == visits[i + 1] for i in range(0, len(visits), K))  # K steps per group
        order = visits[::K]
        assert sorted(order) == [0, 1, 2, 3, 4]  # each group exactly once per cycle
        cycles.append(tuple(order))
    assert len(set(cycles)) > 1
    _, _, _, again = setup(f"bcd-cyclic:K={K}:order=random:seed=3")
    assert [step_with_ones(again) for _ in range(4 * 5 * K)] == moved


@pytest.mark.parametrize("reset", [True, False])
def test_bcd_cyclic_resets_the_optimizer_state_of_the_new_block(reset):
    # skip=False: inactive groups keep accumulating momentum at lr 0, so a reset shows
    _, _, opt, s = setup(f"bcd-cyclic:K=1:order=ascending:skip=False:reset_state={reset}", momentum=0.9)
    step_with_ones(s)  # group 0 active; every group's buffer = 1
    step_with_ones(s)  # group 1 active
    buf = opt.state[s.group_params[1][0]]["momentum_buffer"]
    assert torch.allclose(buf, torch.full_like(buf, 1.0 if reset else 1.9))
    buf = opt.state[s.group_params[2][0]]["momentum_buffer"]  # not yet active: never reset
    assert torch.allclose(buf, torch.full_like(buf, 1.9))


def test_frozen_bcd_cyclic_holds_optimizer_state_only_for_the_active_block():
    # freed when a block is frozen, so every block restarts its momentum: moves lr * 1, then lr * 1.9
    _, _, opt, s = setup("bcd-cyclic:K=2:order=ascending", momentum=0.9)
    for step in range(4 * 2):
        first = [p.detach().clone() for p in s.group_params[step // 2 % 5]]
        assert step_with_ones(s) == [step // 2 % 5]
        moved = first[0] - s.group_params[step // 2 % 5][0].detach()
        torch.testing.assert_close(moved, torch.full_like(moved, LR * (1.0 if step % 2 == 0 else 1.9)))
        holding = {s.param_group_index[i] for i, p in enumerate(s.params) if p in opt.state}
        assert holding <= {step // 2 % 5}


# ---------------------------------------------------------------------- gradual-unfreeze
def test_gradual_unfreeze_adds_one_group_from_the_top_each_epoch():
    _, _, _, s = setup("gradual-unfreeze")
    for epoch in range(7):
        s.on_epoch_start(epoch)
        for _ in range(2):
            assert step_with_ones(s) == list(range(4 - min(epoch, 4), 5))
        s.on_epoch_start(epoch)  # announcing the same epoch again changes nothing
        assert step_with_ones(s) == list(range(4 - min(epoch, 4), 5))


def test_gradual_unfreeze_every_n_steps():
    _, _, _, s = setup("gradual-unfreeze:every=3")
    moved = [step_with_ones(s) for _ in range(18)]
    assert moved == [list(range(4 - min(t // 3, 4), 5)) for t in range(18)]


def test_gradual_unfreeze_warns_without_epoch_calls():
    _, _, _, s = setup("gradual-unfreeze")
    with pytest.warns(UserWarning, match="on_epoch_start"):
        assert step_with_ones(s) == [4]


# ---------------------------------------------------------------------- auto-rgn
def reference_auto_rgn(history, opens, window, frozen):
    """Weights w_i = mean RGN_i / max_j mean RGN_j from the recorded (grad, param) pairs
    of every step, straight from the formula; windows open at the steps in ``opens``."""
    weights, sums, counts, steps_in_window, zero_norm = [], None, None, 0, None
    for t, pairs in enumerate(history):
        n = len(pairs)
        if t in opens or sums is None:
            sums, counts, steps_in_window, zero_norm = [0.0] * n, [0] * n, 0, [False] * n
        if steps_in_window < window:
            for i, (g, p) in enumerate(pairs):
                if frozen[i]:
                    continue
                gn, pn = torch.linalg.vector_norm(g.double()).item(), torch.linalg.vector_norm(p.double()).item()
                if pn == 0:
                    zero_norm[i] |= gn > 0
                else:
                    sums[i] += gn / pn
                counts[i] += 1
            steps_in_window += 1
            means = [s / c if c else 0.0 for s, c in zip(sums, counts)]
            top = max(m for m, c, z in zip(means, counts, zero_norm) if c and not z)
            w = [1.0 if z else m / top for m, z in zip(means, zero_norm)]
        weights.append(w)
    return weights


@pytest.mark.parametrize(
    "spec, epoch_len, opens_every, window",
    [
        ("auto-rgn:batches=3", 5, None, 3),  # the first 3 steps of each 5-step epoch
        ("auto-rgn:refresh=4:batches=2", None, 4, 2),
        ("auto-rgn:refresh=step", None, 1, 1),
    ],
)
def test_auto_rgn_update_is_weight_times_lr_times_grad(spec, epoch_len, opens_every, window):
    model, groups, opt, s = setup(spec, Tiny())
    with torch.no_grad():
        model.mid.bias.zero_()  # a zero-norm tensor: weight 1 while its gradient is non-zero
    norms = [*model.norm.parameters(), *model.block[1].parameters()]
    frozen = [any(p is q for q in norms) for p in s.params]
    # found by the module types layer_groups records: the LayerNorm and the BatchNorm inside the Sequential
    assert s.norm_param_count == 4 and s.is_norm == frozen
    history, updates, weights, scales = [], [], [], []
    steps = 12
    for t in range(steps):
        if epoch_len and t % epoch_len == 0:
            s.on_epoch_start(t // epoch_len)
        backward(model, t)
        before = [p.detach().clone() for p in s.params]
        history.append([(p.grad.clone(), p.detach().clone()) for p in s.params])
        s.step()
        updates.append([(b - p.detach()) for p, b in zip(s.params, before)])
        weights.append(list(s.tensor_weights))
        scales.append(list(s.scales))
    opens = set(range(0, steps, epoch_len or opens_every))
    expected = reference_auto_rgn(history, opens, window, frozen)
    for t in range(steps):
        for i, (u, (g, _)) in enumerate(zip(updates[t], history[t])):
            assert weights[t][i] == pytest.approx(expected[t][i], rel=1e-5, abs=1e-12), (t, i)
            torch.testing.assert_close(u, LR * expected[t][i] * g, rtol=1e-4, atol=1e-7)
        assert max(weights[t]) == pytest.approx(1.0)
        # the per-group scale of the heatmap: mean weight of the group's tensors
        for gi, params in enumerate(s.group_params):
            idx = [position(s, p) for p in params]
            assert scales[t][gi] == pytest.approx(sum(weights[t][i] for i in idx) / len(idx))
    mid_bias = position(s, model.mid.bias)
    assert all(w[mid_bias] == 1.0 for w in weights[:1])
    assert all(u[i].abs().max() == 0 for u in updates for i, f in enumerate(frozen) if f)  # norm frozen
    if epoch_len:  # weights fixed between windows, then refreshed
        assert weights[3] == weights[2] == weights[4] and weights[5] != weights[4]


def test_auto_rgn_normalisation_layers():
    model = Tiny()
    by_type = normalization_parameters(model)
    assert {id(p) for p in by_type} == {id(p) for m in (model.norm, model.block[1]) for p in m.parameters()}
    groups = layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=LR)
    s = AutoRGN(opt, groups, model=model)  # by module type: also the BatchNorm inside the Sequential
    assert s.norm_param_count == 4
    backward(model, 0)
    before = [p.detach().clone() for p in by_type]
    s.step()
    assert all(torch.equal(p, b) for p, b in zip(by_type, before))
    s.remove()
    s = AutoRGN(opt, groups, model=model, norm="rgn")  # treated like any other tensor
    backward(model, 1)
    before = [p.detach().clone() for p in by_type]
    s.step()
    assert all(not torch.equal(p, b) for p, b in zip(by_type, before))
    assert all(w > 0 for w in s.tensor_weights)


def test_auto_rgn_tensor_without_gradient_gets_weight_zero():
    model, groups, opt, s = setup("auto-rgn:refresh=step")
    backward(model, 0)
    model[-1].bias.grad = None
    s.step()
    assert s.tensor_weights[position(s, model[-1].bias)] == 0.0
    assert max(s.tensor_weights) == 1.0


# ---------------------------------------------------------------------- checkpoint / resume
ROUND_TRIP = [
    "auto-rgn:batches=3",
    "auto-rgn:refresh=3:batches=2",
    "lisa:K=2:gamma=1:seed=7",
    "bcd-cyclic:K=3:order=random",
    "bcd-cyclic:K=2:order=ascending",
    "gradual-unfreeze",
    "gradual-unfreeze:every=3",
    "llrd:decay=0.5",
]


def run(model, opt, s, steps, epoch_len=4, resumed=False):
    trace = []
    for t in steps:
        if t % epoch_len == 0 or (resumed and t == steps[0]):  # a resumed loop announces its epoch
            s.on_epoch_start(t // epoch_len)
        backward(model, t)
        s.step()
        trace.append(list(s.scales))
    return trace


@pytest.mark.parametrize("spec", ROUND_TRIP)
def test_state_round_trips_mid_run(spec):
    total, cut = 15, 6  # cut in the middle of epoch 1
    model, groups, opt, s = setup(spec, momentum=0.9, weight_decay=1e-3)
    run(model, opt, s, range(cut))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "strategy": s.state_dict()}, buf)
    uninterrupted = run(model, opt, s, range(cut, total))

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, groups2, opt2, s2 = setup(spec, momentum=0.9, weight_decay=1e-3)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    s2.load_state_dict(ckpt["strategy"])
    resumed = run(model2, opt2, s2, range(cut, total), resumed=True)  # re-announcing epoch 1: a no-op

    assert resumed == uninterrupted
    assert s2.counts == s.counts and s2.num_steps == s.num_steps == total
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    if not spec.startswith("llrd"):
        assert len({tuple(x) for x in uninterrupted}) > 1  # the choices did change after the cut


def test_state_dict_from_other_options_is_refused():
    _, _, _, s = setup("lisa:K=2:gamma=1")
    step_with_ones(s)
    _, _, _, other = setup("lisa:K=3:gamma=1")
    with pytest.raises(ValueError, match="K: saved 2, now 3"):
        other.load_state_dict(s.state_dict())
    _, _, _, bcd = setup("bcd-cyclic")
    with pytest.raises(ValueError, match="from a LISA, not a BlockCoordinateDescent"):
        bcd.load_state_dict(s.state_dict())


def test_python_api_matches_spec_strings():
    model = mlp()
    groups = layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=LR)
    lisa = LISA(opt, groups, K=10, gamma=1)
    assert isinstance(lisa, LISA)
    lisa.remove()  # one strategy per optimizer
    bcd = BlockCoordinateDescent(opt, groups, order="ascending")
    assert isinstance(bcd, BlockCoordinateDescent)
    bcd.remove()
    g = GradualUnfreezing(opt, groups, every=2)
    assert "every=2 steps" in repr(g)
    g.remove()
    assert math.isclose(make_strategy("llrd", opt, groups).multipliers[0], 0.75**4)


# ---------------------------------------------------------------------- a real model
@pytest.mark.parametrize(
    "spec", ["auto-rgn:batches=2", "lisa:K=2", "bcd-cyclic:K=1", "gradual-unfreeze:every=1", "llrd"]
)
def test_peers_train_a_torchvision_resnet(spec):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=3)
    groups = layer_groups(model)  # the paper's 6 groups
    opt = torch.optim.AdamW(groups.param_groups(), lr=1e-3)
    s = make_strategy(spec, opt, groups)
    if spec.startswith("auto-rgn"):  # the name heuristic finds every BatchNorm, downsample.1 included
        assert {id(p) for p, n in zip(s.params, s.is_norm) if n} == {id(p) for p in normalization_parameters(model)}
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    losses = []
    for _ in range(4):
        s.on_epoch_start(0)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        s.step()
        losses.append(loss.item())
        assert len(s.scales) == 6 and s.selected
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert [g["lr"] for g in opt.param_groups] == [1e-3] * 6
