"""Auto-SNR (surgical finetuning's eb-criterion): every tensor steps with learning rate
w_i * lr, w_i = 1 if the window's mean of mean(g^2 / (var over dim 0 + 1e-8)) reaches the
threshold, else 0; checked against that formula computed independently here."""

import io
import math

import pytest
import torch
from torch import nn

import bvgls
from bvgls import layer_groups, make_strategy
from bvgls.strategies.auto_snr import AutoSNR
from bvgls.strategies.peers import normalization_parameters

torch.set_num_threads(1)
LR = 0.1
EPS = 1e-8  # the authors' constant


class Net(nn.Module):
    """Groups (generic scheme): embed, norm, mid, gate, head. ``gate.weight`` is [1, 8]:
    a tensor without a variance over its first dimension."""

    def __init__(self, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.mid = nn.Linear(8, 8)
        self.gate = nn.Linear(8, 1)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        h = torch.tanh(self.mid(self.norm(self.embed(x))))
        return self.head(h * torch.sigmoid(self.gate(h)))


def setup(spec, model=None, **sgd):
    model = model if model is not None else Net()
    groups = layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=LR, **sgd)
    return model, groups, opt, make_strategy(spec, opt, groups)


def batch(step, n=16):
    g = torch.Generator().manual_seed(2000 + step)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # a learnable rule: consistent gradients


def backward(model, step):
    x, y = batch(step)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


def same(a, b):
    """Equal lists of floats, NaN (not scored) equal to NaN."""
    return torch.equal(torch.tensor(a).nan_to_num(-1.0), torch.tensor(b).nan_to_num(-1.0))


def position(strategy, param):
    return next(i for i, p in enumerate(strategy.params) if p is param)


# ---------------------------------------------------------------------- the reference
def reference_score(g):
    """mean(g^2 / (unbiased variance along dim 0 + eps)) in float64, written out; None
    when dim 0 has fewer than 2 entries (no variance)."""
    g = g.double()
    if g.dim() == 0 or g.shape[0] < 2:
        return None
    centred = g - g.sum(0, keepdim=True) / g.shape[0]
    var = (centred * centred).sum(0, keepdim=True) / (g.shape[0] - 1)
    return (g * g / (var + EPS)).mean().item()


def reference_auto_snr(grads, opens, window, frozen, threshold=0.95):
    """Per step: (weights, window mean scores) from the recorded gradients of every step."""
    out, sums, counts, no_var, steps_in_window = [], None, None, None, 0
    for t, gs in enumerate(grads):
        if t in opens or sums is None:
            sums, counts, no_var, steps_in_window = [0.0] * len(gs), [0] * len(gs), [False] * len(gs), 0
        if steps_in_window < window:
            for i, g in enumerate(gs):
                if frozen[i]:
                    continue
                score = reference_score(g)
                if score is None:
                    no_var[i] = True
                else:
                    sums[i] += score
                    counts[i] += 1
            steps_in_window += 1
            means = [s / c if c else None for s, c in zip(sums, counts)]
            weights = [1.0 if v or (m is not None and m >= threshold) else 0.0 for m, v in zip(means, no_var)]
        out.append((weights, means))
    return out


# ---------------------------------------------------------------------- registry and options
def test_auto_snr_is_registered_by_import_bvgls():
    assert "auto-snr" in bvgls.STRATEGIES and "auto-snr" in bvgls.strategy_names()
    assert bvgls.STRATEGIES["auto-snr"].needs_all_gradients
    assert "threshold=0.95" in bvgls.STRATEGIES["auto-snr"].help
    _, _, _, s = setup("auto-snr")
    assert isinstance(s, AutoSNR) and (s.refresh, s.batches, s.threshold, s.norm) == ("epoch", 5, 0.95, "freeze")
    assert not s.skip_unselected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("auto-snr:threshold=-0.1", "threshold must be a finite number >= 0"),
        ("auto-snr:threshold=high", "threshold must be a number"),
        ("auto-snr:threshold=True", "threshold must be a number"),
        ("auto-snr:threshold=1e999", "threshold must be a finite number >= 0"),
        ("auto-snr:refresh=sometimes", "refresh must be 'epoch', 'step' or a number of steps"),
        ("auto-snr:refresh=0", "refresh .* must be >= 1"),
        ("auto-snr:batches=0", "batches must be >= 1"),
        ("auto-snr:batches=2.5", "batches must be an integer"),
        ("auto-snr:norm=rgn", "norm must be one of freeze, snr"),
        ("auto-snr:skip=maybe", "skip must be"),
        ("auto-snr:alpha=0.9", "unknown option alpha"),
    ],
)
def test_bad_options_give_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        setup(spec)


# ---------------------------------------------------------------------- the update
@pytest.mark.parametrize(
    "spec, epoch_len, opens_every, window",
    [
        ("auto-snr:batches=3", 5, None, 3),  # the first 3 steps of each 5-step epoch
        ("auto-snr:refresh=4:batches=2", None, 4, 2),
        ("auto-snr:refresh=step", None, 1, 1),
    ],
)
def test_update_is_weight_times_lr_times_grad(spec, epoch_len, opens_every, window):
    model, groups, opt, s = setup(spec)
    frozen = [any(p is q for q in model.norm.parameters()) for p in s.params]
    assert s.norm_param_count == 2 and s.is_norm == frozen  # found by name: norm.weight, norm.bias
    grads, updates, weights, scores, scales = [], [], [], [], []
    steps = 12
    for t in range(steps):
        if epoch_len and t % epoch_len == 0:
            s.on_epoch_start(t // epoch_len)
        backward(model, t)
        before = [p.detach().clone() for p in s.params]
        grads.append([p.grad.clone() for p in s.params])
        s.step()
        updates.append([b - p.detach() for p, b in zip(s.params, before)])
        weights.append(list(s.tensor_weights))
        scores.append(list(s.scores))
        scales.append(list(s.scales))
    expected = reference_auto_snr(grads, set(range(0, steps, epoch_len or opens_every)), window, frozen)
    for t, (w_ref, m_ref) in enumerate(expected):
        for i, m in enumerate(m_ref):
            if m is None:
                assert math.isnan(scores[t][i]), (t, i)
            else:  # decisions far from the threshold, so float32 vs float64 cannot flip them
                assert scores[t][i] == pytest.approx(m, rel=1e-4), (t, i)
                assert abs(m - 0.95) > 1e-3, (t, i)
        assert weights[t] == w_ref, t
        for i, (u, g) in enumerate(zip(updates[t], grads[t])):
            if w_ref[i] == 0.0:
                assert torch.count_nonzero(u) == 0, (t, i)
            else:
                torch.testing.assert_close(u, LR * g, rtol=1e-4, atol=1e-7)
        for gi, params in enumerate(s.group_params):  # heatmap value: fraction of the group's tensors on
            idx = [position(s, p) for p in params]
            assert scales[t][gi] == pytest.approx(sum(weights[t][i] for i in idx) / len(idx))
    every = [w for w, _ in expected]
    assert any(1.0 in w and 0.0 in [x for x, f in zip(w, frozen) if not f] for w in every)  # a real split
    assert all(w[position(s, model.gate.weight)] == 1.0 for w in weights)  # no variance over dim 0
    assert all(w[i] == 0.0 for w in weights for i, f in enumerate(frozen) if f)


def test_scores_by_hand_and_the_role_of_eps():
    """Gradients set by hand: the scores the formula gives, the 1e-8 that switches off
    small gradients, and the tensors without a variance."""
    shapes = {"a": (2, 1), "b": (2, 1), "a_small": (2, 1), "zero": (3,), "row": (1, 3), "scalar": ()}
    params = {k: nn.Parameter(torch.zeros(shape)) for k, shape in shapes.items()}
    opt = torch.optim.SGD(params.values(), lr=LR)
    s = AutoSNR(opt, {k: [p] for k, p in params.items()}, refresh="step")
    grads = {
        "a": [[1.0], [3.0]],
        "b": [[1.0], [-1.0]],
        "a_small": [[1e-5], [3e-5]],
        "zero": [0.0, 0.0, 0.0],
        "row": [[1.0, 2.0, 3.0]],
        "scalar": 5.0,
    }
    for k, p in params.items():
        p.grad = torch.tensor(grads[k])
    s.step()
    # column [1, 3]: mean 2, unbiased variance 2; [1, -1]: variance 2; the small one: 2e-10
    expected = {
        "a": (1 + 9) / 2 / (2 + EPS),
        "b": (1 + 1) / 2 / (2 + EPS),
        "a_small": (1e-10 + 9e-10) / 2 / (2e-10 + EPS),
        "zero": 0.0,
    }
    order = list(params)
    for k, value in expected.items():
        assert s.scores[order.index(k)] == pytest.approx(value, rel=1e-5, abs=1e-12), k
    assert math.isnan(s.scores[order.index("row")]) and math.isnan(s.scores[order.index("scalar")])
    assert dict(zip(order, s.tensor_weights)) == {
        "a": 1.0,
        "b": 0.0,
        "a_small": 0.0,
        "zero": 0.0,
        "row": 1.0,
        "scalar": 1.0,
    }
    assert params["a"].detach().flatten().tolist() == pytest.approx([-LR * 1.0, -LR * 3.0])
    assert params["row"].detach().flatten().tolist() == pytest.approx([-LR * 1.0, -LR * 2.0, -LR * 3.0])
    assert torch.count_nonzero(params["b"]) == 0 and torch.count_nonzero(params["a_small"]) == 0
    # the threshold is an option: at 0.4 the [1, -1] column is on too
    s.remove()
    low = AutoSNR(opt, {k: [p] for k, p in params.items()}, refresh="step", threshold=0.4)
    for k, p in params.items():
        p.grad = torch.tensor(grads[k])
    low.step()
    assert low.tensor_weights[order.index("b")] == 1.0


@pytest.mark.parametrize("classes", [3, 25])
def test_the_head_scores_about_classes_minus_one_over_classes(classes):
    """Cross-entropy gradients sum to 0 over the classes, so each column of the head's
    gradient has mean 0 and the score is (C - 1) / C (while the variance >> 1e-8): the
    authors' criterion trains the head only with >= 20 classes."""
    model, groups, opt, s = setup("auto-snr:refresh=step", Net(classes))
    x, _ = batch(0)
    y = torch.arange(16) % classes
    nn.functional.cross_entropy(model(x), y).backward()
    s.step()
    i = position(s, model.head.weight)
    assert s.scores[i] == pytest.approx((classes - 1) / classes, rel=1e-3)
    assert s.tensor_weights[i] == (1.0 if classes >= 20 else 0.0)


# ---------------------------------------------------------------------- refresh timing
def test_refresh_per_epoch_through_on_epoch_start():
    model, groups, opt, s = setup("auto-snr:batches=2")
    window_scores = []
    for t in range(6):
        if t in (0, 4):
            s.on_epoch_start(t // 4)
        if t == 2:
            s.on_epoch_start(0)  # the same epoch again (a resumed run): nothing reopens
        backward(model, t)
        own = [reference_score(p.grad) for p in s.params]
        s.step()
        window_scores.append((list(s.scores), own))
    mid = position(s, model.mid.weight)
    (s0, own0), (s1, own1), (s2, _), (s3, _), (s4, own4), (s5, own5) = window_scores
    assert s0[mid] == pytest.approx(own0[mid], rel=1e-4)  # window of epoch 0 opens
    assert s1[mid] == pytest.approx((own0[mid] + own1[mid]) / 2, rel=1e-4)  # 2 batches averaged
    assert s3[mid] == s2[mid] == s1[mid]  # then fixed
    assert s4[mid] == pytest.approx(own4[mid], rel=1e-4)  # epoch 1: a fresh window
    assert s5[mid] == pytest.approx((own4[mid] + own5[mid]) / 2, rel=1e-4)


def test_without_epoch_calls_the_first_window_is_kept():
    model, groups, opt, s = setup("auto-snr:batches=2")
    seen = []
    for t in range(5):
        backward(model, t)
        s.step()
        seen.append(list(s.scores))
    assert all(same(seen[1], later) for later in seen[2:]) and not same(seen[0], seen[1])


def test_tensor_without_gradient_in_the_window_gets_weight_zero():
    model, groups, opt, s = setup("auto-snr:refresh=step:threshold=0")
    backward(model, 0)
    model.mid.bias.grad = None
    s.step()
    i = position(s, model.mid.bias)
    assert s.tensor_weights[i] == 0.0 and math.isnan(s.scores[i])
    assert s.tensor_weights[position(s, model.mid.weight)] == 1.0  # threshold 0: every scored tensor on


# ---------------------------------------------------------------------- normalisation layers
def test_normalisation_layers_frozen_by_default_or_scored():
    model = Net()
    groups = layer_groups(model)
    norm = normalization_parameters(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=LR)
    s = AutoSNR(opt, groups, model=model, refresh="step", threshold=0)
    assert s.norm_param_count == 2
    backward(model, 0)
    before = [p.detach().clone() for p in norm]
    s.step()
    assert all(torch.equal(p, b) for p, b in zip(norm, before))
    assert all(math.isnan(s.scores[position(s, p)]) for p in norm)
    s.remove()
    s = make_strategy("auto-snr:norm=snr:refresh=step:threshold=0", opt, groups)
    backward(model, 1)
    before = [p.detach().clone() for p in norm]
    s.step()
    assert all(not torch.equal(p, b) for p, b in zip(norm, before))
    assert all(s.scores[position(s, p)] >= 0 for p in norm)


# ---------------------------------------------------------------------- checkpoint / resume
def run(model, s, steps, epoch_len=4, resumed=False):
    trace = []
    for t in steps:
        if t % epoch_len == 0 or (resumed and t == steps[0]):
            s.on_epoch_start(t // epoch_len)
        backward(model, t)
        s.step()
        trace.append((list(s.tensor_weights), list(s.scores)))
    return trace


@pytest.mark.parametrize(
    "spec, cut",
    [
        ("auto-snr:batches=3", 5),  # inside the epoch-1 window
        ("auto-snr:refresh=3:batches=2:skip=True", 7),
    ],
)
def test_state_round_trips_mid_run(spec, cut):
    total = 14
    model, groups, opt, s = setup(spec, momentum=0.9, weight_decay=1e-3)
    run(model, s, range(cut))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "strategy": s.state_dict()}, buf)
    uninterrupted = run(model, s, range(cut, total))

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, groups2, opt2, s2 = setup(spec, momentum=0.9, weight_decay=1e-3)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    s2.load_state_dict(ckpt["strategy"])
    resumed = run(model2, s2, range(cut, total), resumed=True)

    torch.testing.assert_close(resumed, uninterrupted, rtol=0, atol=0, equal_nan=True)
    assert s2.counts == s.counts and s2.num_steps == s.num_steps == total
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_state_dict_with_other_options_or_type_is_refused():
    model, groups, opt, s = setup("auto-snr:batches=2")
    backward(model, 0)
    s.step()
    _, _, _, other = setup("auto-snr:batches=2:threshold=0.5")
    with pytest.raises(ValueError, match="threshold: saved 0.95, now 0.5"):
        other.load_state_dict(s.state_dict())
    assert other.num_steps == 0  # nothing adopted
    _, _, _, rgn = setup("auto-rgn:batches=2")
    with pytest.raises(ValueError, match="from a AutoSNR, not a AutoRGN"):
        rgn.load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="from a AutoRGN, not a AutoSNR"):
        other.load_state_dict(rgn.state_dict())


# ---------------------------------------------------------------------- a real model
def test_auto_snr_trains_a_torchvision_resnet_with_adamw():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=3)
    groups = layer_groups(model)
    opt = torch.optim.AdamW(groups.param_groups(), lr=1e-3)
    s = make_strategy("auto-snr:batches=2", opt, groups)
    assert isinstance(s, AutoSNR)
    # the name heuristic finds every BatchNorm (the authors freeze the "bn" parameters)
    assert {id(p) for p, n in zip(s.params, s.is_norm) if n} == {id(p) for p in normalization_parameters(model)}
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    frozen_before = {id(p): p.detach().clone() for p in normalization_parameters(model)}
    head_before = model.fc.weight.detach().clone()
    for _ in range(3):
        s.on_epoch_start(0)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        s.step()
        assert math.isfinite(loss.item())
    assert all(torch.equal(p, frozen_before[id(p)]) for p in normalization_parameters(model))
    assert torch.equal(model.fc.weight, head_before)  # 3 classes: score 2/3 < 0.95
    assert s.tensor_weights[position(s, model.conv1.weight)] == 1.0  # 64 output channels: >= 63/64
