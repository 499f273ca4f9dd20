"""Lean selection wired through the package (issue 11): ``step_report()`` and the tracker,
``bvgls.probe`` after ``import bvgls``, the finetune runner (accumulation, AMP skip, resume,
channels_last) and the Hugging Face / Lightning callbacks."""

import math

import pytest
import torch
from torch import nn

import bvgls
from bvgls.runner.tracker import SelectionTracker


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 3))


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
        ratios = None if report.ratios is None else (report.ratios.clone(), report.informative.clone(),
                                                    strategy.variance.clone())
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
    for report, ratios, informative, variance in reports:
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
    for got, w in zip(stats["bvr"], want):
        assert (got is None) == (w is None)
        if w is not None:
            assert got == pytest.approx(w, rel=1e-9)
    # counting every step would weight the probes 3:2:2:1 (steps 0-2, 3-5, 6-8, 9) instead of 1:1:1:1
    tracker.close()


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
    for got, w in zip(stats["bvr"], want):
        assert (got is None) == (w is None)
        if w is not None:
            assert got == pytest.approx(w, rel=1e-9)
    tracker.close()


def test_probe_module_is_loaded_by_import_bvgls():
    import subprocess
    import sys
    code = "import bvgls, sys; print(bvgls.probe.recommend.__name__, 'bvgls.runner' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["recommend", "False"]


# ---------------------------------------------------------------------- few updates per group (issue 12, part 6)
def tensor_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    return ds, ds


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
    with pytest.warns(UserWarning, match=r"bvgls: a layer group it rotates through gets about 4\.0 optimizer "
                                         r"updates in this run \(expected updates per group = 16 optimizer steps"):
        bvgls.finetune(mlp(), tensor_data(), "bvgls", epochs=2, batch_size=8, lr=0.05, progress=False,
                       callbacks=[lambda record: seen_at_first_epoch.append(record["epoch"])])
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
