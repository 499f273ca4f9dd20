"""Lean selection wired through the package: ``step_report()`` and the tracker,
``bvgls.recommend`` after ``import bvgls``, the finetune runner (accumulation, AMP skip, resume,
channels_last) and the Hugging Face / Lightning callbacks."""

import pytest
import torch
from tiny_models import tensor_data
from torch import nn

import bvgls
from bvgls.runner.callbacks import Callback
from bvgls.runner.tracker import SelectionTracker


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    )


def batch(step, n=8):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def strategy_for(spec, model):
    groups = bvgls.layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=0.05, momentum=0.9)
    return opt, bvgls.make_strategy(spec, opt, groups)


def train(model, opt, strategy, steps, poison=()):
    """Per step: the report after it; steps in ``poison`` get a nan gradient (skipped)."""
    reports = []
    for step in range(steps):
        opt.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        if step in poison:
            next(p for p in model.parameters() if p.grad is not None).grad[0] = float("nan")
        strategy.step()
        report = strategy.step_report()
        ratios = (
            None
            if report.ratios is None
            else (report.ratios.clone(), report.informative.clone(), strategy.variance.clone())
        )
        reports.append((report, *(ratios or (None, None, None))))
    return reports


def expected_bvr(reports, n):
    sums, counts = [0.0] * n, [0] * n
    for report, ratios, informative, _ in reports:
        if report.probed:
            for g in range(n):
                if informative[g]:
                    sums[g] += float(ratios[g])
                    counts[g] += 1
    return [s / c if c else None for s, c in zip(sums, counts)]


def test_step_report_of_a_fixed_strategy_has_counts_and_no_ratios():
    model = mlp()
    opt, s = strategy_for("L3-4", model)
    train(model, opt, s, 3)
    report = s.step_report()
    assert isinstance(report, bvgls.StepReport)
    assert report.num_steps == 3 and report.counts == [0, 0, 3, 3] and report.ratios is None
    assert not report.probed


def test_step_report_marks_probe_steps_and_the_informative_groups():
    model = mlp()
    opt, s = strategy_for("bvgls:probe=3", model)
    reports = train(model, opt, s, 7)
    assert [r[0].probed for r in reports] == [True, False, False, True, False, False, True]
    for _report, ratios, informative, variance in reports:
        assert torch.equal(informative, torch.isfinite(ratios) & (variance > s.eps))
    assert torch.equal(reports[1][1], reports[0][1])  # between probes: the last probe's ratios
    first = reports[0][2]
    assert not first.any()  # a tensor's first step has variance 0 (clamped): no signal


def test_tracker_counts_each_probe_once_not_the_steps_in_between():
    model = mlp()
    opt, s = strategy_for("bvgls:probe=3", model)
    tracker = SelectionTracker(s)
    reports = train(model, opt, s, 10)
    stats = tracker.take("epoch")
    want = expected_bvr(reports, s.num_groups)
    assert stats["steps"] == 10
    assert any(w is not None for w in want)
    assert_bvr_matches(stats["bvr"], want)
    # counting every step would weight the probes 3:2:2:1 (steps 0-2, 3-5, 6-8, 9) instead of 1:1:1:1
    tracker.close()


def assert_bvr_matches(got_bvr, want):
    """Per group: both absent, or equal to the reference mean over probe steps."""
    for got, w in zip(got_bvr, want):
        assert (got is None) == (w is None)
        if w is not None:
            assert got == pytest.approx(w, rel=1e-9)


def test_tracker_adds_nothing_for_a_skipped_nonfinite_step():
    model = mlp()
    opt, s = strategy_for("bvgls", model)
    tracker = SelectionTracker(s)
    with pytest.warns(RuntimeWarning, match="nan/inf"):
        reports = train(model, opt, s, 6, poison={3})
    assert s.nonfinite_steps == 1 and s.num_steps == 5
    assert not reports[3][0].probed
    stats = tracker.take("epoch")
    want = expected_bvr(reports, s.num_groups)
    assert stats["steps"] == 5
    assert_bvr_matches(stats["bvr"], want)
    tracker.close()


def test_probe_module_is_loaded_by_import_bvgls():
    import subprocess
    import sys

    code = "import bvgls, sys; print(bvgls.recommend.recommend.__name__, 'bvgls.runner' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["recommend", "False"]


# ---------------------------------------------------------------------- few updates per group
def test_expected_updates_per_group_follow_the_stated_rule():
    model = mlp()  # 4 groups
    assert strategy_for("bvgls", model)[1].expected_updates(100) == pytest.approx(25.0)
    assert strategy_for("bvgls:k=2", mlp())[1].expected_updates(100) == pytest.approx(50.0)
    assert strategy_for("lisa:gamma=1", mlp())[1].expected_updates(100) == pytest.approx(50.0)  # 2 middle groups
    assert strategy_for("bcd-cyclic", mlp())[1].expected_updates(100) == pytest.approx(25.0)
    for fixed in ("full", "L3-4", "linear", "llrd", "bvgls:static=5"):
        assert strategy_for(fixed, mlp())[1].expected_updates(100) is None


def test_finetune_warns_before_training_when_groups_get_few_updates():
    seen_at_first_epoch = []
    with pytest.warns(
        UserWarning,
        match=r"bvgls: a layer group it rotates through gets about 4\.0 optimizer "
        r"updates in this run \(expected updates per group = 16 optimizer steps",
    ):
        bvgls.finetune(
            mlp(),
            tensor_data(),
            "bvgls",
            epochs=2,
            batch_size=8,
            lr=0.05,
            progress=False,
            callbacks=[lambda record: seen_at_first_epoch.append(record["epoch"])],
        )
    assert seen_at_first_epoch  # trained after the warning


def test_finetune_does_not_warn_for_full_or_enough_updates(recwarn):
    bvgls.finetune(mlp(), tensor_data(), "full", epochs=1, batch_size=8, lr=0.05, progress=False)
    bvgls.finetune(mlp(), tensor_data(n=128 * 8), "bvgls", epochs=1, batch_size=8, lr=0.05, progress=False)
    assert not [w for w in recwarn if "optimizer updates in this run" in str(w.message)]


# ---------------------------------------------------------------------- auto-rgn / auto-snr on the runner's path
@pytest.mark.parametrize("spec", ["auto-rgn", "auto-snr"])
def test_runner_path_finds_the_batchnorm_layers_of_mobilenet_v2(spec):
    torchvision = pytest.importorskip("torchvision")
    from bvgls.strategies.peers import normalization_parameters

    model = torchvision.models.mobilenet_v2(weights=None, num_classes=4)
    want = {id(p) for p in normalization_parameters(model)}
    assert len(want) == 104  # 52 BatchNorm2d layers, weight + bias
    # what the runner does (loop.attach_strategy): a spec on LayerGroups, no model= given
    groups = bvgls.layer_groups(model)
    opt = torch.optim.SGD(groups.param_groups(), lr=0.01)
    strategy = bvgls.make_strategy(spec, opt, groups)
    assert strategy.norm_param_count == 104
    assert {id(p) for p, is_norm in zip(strategy.params, strategy.is_norm) if is_norm} == want
    strategy.remove()


def test_groups_without_module_types_fall_back_to_the_name_heuristic():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None, num_classes=4)
    built = bvgls.layer_groups(model)
    assert built.module_types["bn1.weight"] is nn.BatchNorm2d and built.module_types["fc.weight"] is nn.Linear
    names_only = bvgls.LayerGroups(built.groups)  # e.g. groups assembled by hand: names, no module types
    opt = torch.optim.SGD(names_only.param_groups(), lr=0.01)
    strategy = bvgls.make_strategy("auto-rgn", opt, names_only)
    assert strategy.norm_param_count == 40  # bn1, bn2, downsample.1 of a ResNet: found by name
    strategy.remove()


# ---------------------------------------------------------------------- lean through finetune (the runner)
class Recorder(Callback):
    """A runner callback that records, per forward pass, the groups frozen (requires_grad off)
    and, per optimizer call, the weights of every group before and after, and what the strategy did."""

    def __init__(self, poison_forward=None):
        self.forwards, self.steps, self.poison_forward = [], [], poison_forward
        self.final = None

    def on_train_start(self, state):
        s, model = state.strategy, state.model
        self.strategy, self._before = s, None
        model.register_forward_pre_hook(lambda m, args: self.forwards.append(self.frozen()))
        if self.poison_forward is not None:  # a nan loss on one forward pass: GradScaler-style skip
            model.register_forward_hook(
                lambda m, args, out: out * float("nan") if len(self.forwards) - 1 == self.poison_forward else out
            )
        state.optimizer.register_step_pre_hook(lambda *a: setattr(self, "_before", self.weights()))
        state.optimizer.register_step_post_hook(
            lambda *a: self.steps.append(
                {
                    "frozen": self.frozen(),
                    "before": self._before,
                    "after": self.weights(),
                    "num_steps": s.num_steps,
                    "probed": getattr(s, "probed", None),
                    "selected": list(s.selected),
                    "forwards": len(self.forwards),
                }
            )
        )

    def frozen(self):
        return tuple(i for i, ps in enumerate(self.strategy.group_params) if not any(p.requires_grad for p in ps))

    def weights(self):
        return [torch.cat([p.detach().flatten().clone() for p in ps]) for ps in self.strategy.group_params]

    def on_train_end(self, state):
        self.final = {"nonfinite": state.strategy.nonfinite_steps, "num_steps": state.strategy.num_steps}


def frozen_at_each_step(rec, accum):
    """The frozen set seen by the forwards of each optimizer call (asserting they agree)."""
    out, start = [], 0
    for step in rec.steps:
        seen = set(rec.forwards[start : step["forwards"]])
        assert len(seen) == 1, f"micro-batches of one optimizer step saw different frozen groups: {seen}"
        assert step["forwards"] - start == accum
        out.append(seen.pop())
        start = step["forwards"]
    return out


def assert_frozen_groups_unchanged(rec, frozen_per_step):
    for step, frozen in zip(rec.steps, frozen_per_step):
        for g in frozen:
            assert torch.equal(step["before"][g], step["after"][g]), (step["num_steps"], g)


@pytest.mark.parametrize("accum", [1, 2])
def test_finetune_lean_probe_with_grad_accumulation(accum):
    rec = Recorder()
    model = mlp()
    before = [p.requires_grad for p in model.parameters()]
    bvgls.finetune(
        model,
        tensor_data(),
        "bvgls:probe=3",
        epochs=1,
        batch_size=4,
        grad_accum=accum,
        lr=0.05,
        progress=False,
        callbacks=[rec],
    )
    frozen = frozen_at_each_step(rec, accum)
    n = len(rec.steps)
    assert n == 16 // accum and rec.final["num_steps"] == n
    last_probe = None
    for t, (step, f) in enumerate(zip(rec.steps, frozen)):
        assert step["probed"] == (t % 3 == 0)
        if t % 3 == 0:
            assert f == ()  # a probe step: every group computes its gradient
            last_probe = step["selected"]
        else:  # in between: the last probe's selection trains, the others are frozen for real
            assert step["selected"] == last_probe
            assert set(f) == set(range(4)) - set(last_probe)
    assert_frozen_groups_unchanged(rec, frozen)
    assert [p.requires_grad for p in model.parameters()] == before  # restored at the end


@pytest.mark.parametrize("spec", ["bvgls:probe=3", "lisa:K=2:gamma=1", "bcd-cyclic:K=2"])
def test_finetune_lean_bf16_autocast_and_a_skipped_nonfinite_step(spec):
    rec = Recorder(poison_forward=4)
    with pytest.warns(RuntimeWarning, match="nan/inf"):
        bvgls.finetune(
            mlp(),
            tensor_data(),
            spec,
            epochs=1,
            batch_size=8,
            lr=0.05,
            amp="bf16",
            device="cpu",
            progress=False,
            callbacks=[rec],
        )
    frozen = frozen_at_each_step(rec, 1)
    assert rec.final == {"nonfinite": 1, "num_steps": 7}  # 8 optimizer calls, one skipped
    skipped = rec.steps[4]
    assert skipped["num_steps"] == rec.steps[3]["num_steps"]  # not counted
    assert all(torch.equal(b, a) for b, a in zip(skipped["before"], skipped["after"]))  # nothing changed
    assert frozen[5] == frozen[4]  # the same step (same plan, same frozen groups) runs again
    assert any(frozen)  # something was frozen for real
    assert_frozen_groups_unchanged(rec, frozen)


def comparable(history):
    return [{k: v for k, v in record.items() if not k.endswith("_s")} for record in history.epochs]


@pytest.mark.parametrize("spec", ["bvgls:probe=3", "bvgls:static=5:probe=2", "lisa:K=3:gamma=1", "bcd-cyclic:K=3"])
def test_finetune_lean_resume_equals_the_uninterrupted_run(spec, tmp_path):
    options = dict(epochs=3, batch_size=8, lr=0.05, progress=False)  # 8 steps per epoch: probes cross epochs
    whole_model = mlp()
    whole = bvgls.finetune(whole_model, tensor_data(), spec, out_dir=tmp_path / "whole", **options)
    part_model = mlp()
    first = bvgls.finetune(part_model, tensor_data(), spec, out_dir=tmp_path / "part", stop_after=1, **options)
    assert len(first.epochs) == 1
    assert all(p.requires_grad for p in part_model.parameters())  # restored after the interrupted call
    resumed_model = mlp(seed=5)  # other initial weights: everything must come from the checkpoint
    resumed = bvgls.finetune(resumed_model, tensor_data(), spec, out_dir=tmp_path / "part", resume=True, **options)
    assert comparable(resumed) == comparable(whole)
    for a, b in zip(resumed_model.parameters(), whole_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.isolated
def test_finetune_lean_channels_last():
    from bvgls.runner.models import build_model

    model = build_model("tiny-cnn", 3, None)
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(
        torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 3, (32,), generator=g)
    )
    rec = Recorder()
    bvgls.finetune(
        model,
        (ds, ds),
        "bvgls:probe=2",
        epochs=1,
        batch_size=4,
        lr=0.05,
        channels_last=True,
        progress=False,
        callbacks=[rec],
    )
    assert any(
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in model.parameters()
    )  # NHWC was kept (tiny-cnn has no oneDNN crash hazard)
    frozen = frozen_at_each_step(rec, 1)
    assert [f == () for f in frozen] == [t % 2 == 0 for t in range(8)]
    assert all(len(f) == len(rec.strategy.group_params) - 1 for f in frozen[1::2])
    assert_frozen_groups_unchanged(rec, frozen)
    assert all(p.requires_grad for p in model.parameters())
