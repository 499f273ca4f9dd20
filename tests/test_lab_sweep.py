"""The benchmark's ``sweep`` design (every lr on every seed, those runs reported) and its report: the
paper's shared-lr comparison, the tuned comparison, robustness, error by evaluation, lr_sensitivity.png."""

import json
import math
import shutil
import statistics

import pytest
import torch
from PIL import Image
from test_lab_experiments import _tiny_task

from bvgls.runner.lrsens import LrPoint, Spread
from bvgls_lab import offline_tasks
from bvgls_lab.experiments import protocols as bench_protocol
from bvgls_lab.experiments import run, sweep_report
from bvgls_lab.experiments.run import HeadDropoutModel

torch.set_num_threads(1)

LRS = (0.01, 0.03, 0.1)


@pytest.fixture
def tiny_task(monkeypatch):
    monkeypatch.setitem(offline_tasks.TASKS, "tiny", _tiny_task)


def _protocol(**changes):
    base = dict(
        tasks=("tiny",),
        strategies=("full", "bvgls", "L5-6", "linear"),
        design="sweep",
        lrs=LRS,
        seeds=(0, 1),
        search_seeds=(),
        extend_grid=False,
        epochs=2,
        eval_every=1,
        batch_size=4,
        weights="none",
    )
    return bench_protocol.Protocol(**{**base, **changes})


def test_sweep_runs_every_lr_on_every_seed_and_reports_them(tiny_task, tmp_path):
    protocol = _protocol()
    summary = run.run_benchmark(tmp_path, protocol, workers=1)
    rows = sweep_report.sweep_rows(tmp_path)
    assert sorted((r["strategy"], r["lr"], r["seed"]) for r in rows) == sorted(
        (s, lr, k) for s in protocol.strategies for lr in LRS for k in (0, 1)
    )
    assert summary["seeds"] == [0, 1] and summary["runs"] == 24
    test, val = sweep_report.errors(rows), sweep_report.errors(rows, "val_error")
    # each strategy's lr: the lowest mean validation error over the seeds (ties: lower val loss, then smaller lr)
    for s in protocol.strategies:
        best = min(statistics.fmean(val[("tiny", s, lr)].values()) for lr in LRS)
        chosen = summary["chosen_lr"][f"tiny {s}"]
        assert statistics.fmean(val[("tiny", s, chosen)].values()) == best
    # the shared-lr comparison at each lr is bvgls minus full paired by seed
    for lr in LRS:
        cell = summary["shared_lr"]["tiny"][format(lr, "g")]
        diffs = [test[("tiny", "bvgls", lr)][k] - test[("tiny", "full", lr)][k] for k in (0, 1)]
        assert cell["bvgls_minus_full"][0] == pytest.approx(statistics.fmean(diffs))
        assert cell["best_partial"] in ("L5-6", "linear") and cell["bvgls_minus_full"][3] == 2
    tuned = summary["tuned"]["tiny"]["full"]
    lr_b, lr_f = summary["chosen_lr"]["tiny bvgls"], summary["chosen_lr"]["tiny full"]
    assert tuned["diff"][0] == pytest.approx(
        statistics.fmean(test[("tiny", "bvgls", lr_b)][k] - test[("tiny", "full", lr_f)][k] for k in (0, 1))
    )
    report = (tmp_path / "report.md").read_text()
    for section in (
        "## Learning-rate sensitivity",
        "## The paper's comparison",
        "## Each strategy at its own lr",
        "## Robustness to the lr",
        "## Test error at every evaluation",
    ):
        assert section in report
    assert summary["figures"]["lr sensitivity"] == "figures/lr_sensitivity.png"
    assert "`figures/lr_sensitivity.png`" in report
    with Image.open(tmp_path / "figures" / "lr_sensitivity.png") as im:
        assert im.size[0] > 400 and im.size[1] > 300
    assert json.loads((tmp_path / "summary.json").read_text())["runs"] == 24
    assert len((tmp_path / "runs.csv").read_text().splitlines()) == 25


def test_a_sweep_cut_short_reports_whole_seeds_only(tiny_task, tmp_path):
    protocol = _protocol(strategies=("full", "linear"), lrs=(0.01, 0.03), eval_every=2)
    run.run_benchmark(tmp_path, protocol, workers=1)
    shutil.rmtree(tmp_path / "sweep" / "runs" / "tiny" / "linear" / "lr0.03" / "seed1")
    summary = sweep_report.write_sweep_report(tmp_path, protocol)
    assert summary["seeds"] == [0] and summary["runs"] == 4
    assert "## Test error at every evaluation" not in (tmp_path / "report.md").read_text()  # evaluated once


def test_robustness_width_and_errors_at_higher_lrs():
    def point(lr, mean, diverged=0):
        return LrPoint(lr, None if mean is None else Spread(mean, 1.0, 3), None, 3, diverged)

    points = [point(0.001, 30.0), point(0.003, 21.0), point(0.01, 20.0), point(0.03, 25.0), point(0.1, None, 3)]
    r = sweep_report.robustness(points, chosen=0.003)
    assert r["best_lr"] == 0.01 and r["best_test_error"] == 20.0
    assert r["near_best_lrs"] == [0.003, 0.01] and r["width_decades"] == pytest.approx(math.log10(0.01 / 0.003))
    assert r["at_3x"] == 20.0 and r["at_10x"] == 25.0  # 0.003 -> 0.01 is one grid step (3.33x)
    assert sweep_report.robustness(points, chosen=0.01)["at_10x"] == math.inf  # diverged


def test_head_dropout_model_changes_only_the_heads_dropout():
    torchvision = pytest.importorskip("torchvision")
    build = HeadDropoutModel("mobilenet_v2", "none", 0.0)
    assert build.__name__ == "mobilenet_v2+head_dropout=0"
    model = build(5)
    assert model.classifier[0].p == 0.0 and model.classifier[1].out_features == 5
    assert isinstance(model, torchvision.models.MobileNetV2)
    with pytest.raises(ValueError, match="no Dropout in its head"):
        HeadDropoutModel("tiny-resnet", "none", 0.0)(3)


def test_the_studys_protocols_are_registered_and_consistent():
    sweep = bench_protocol.REPRO_SWEEP
    assert sweep.design == "sweep" and sweep.lrs == (0.001, 0.003, 0.01) and sweep.seeds == (0, 1, 2)
    assert bench_protocol.REPRO_SWEEP_EDGES.lrs == (0.0003, 0.03)
    assert {"full", "bvgls", "L6-10", "linear"} <= set(sweep.strategies) and sweep.epochs == 12
    assert sweep.eval_every == sweep.epochs  # evaluated once: the runs do not depend on it anyway
    for name in ("repro-sweep", "repro-h3", "repro-h2"):
        assert all(p.design == "sweep" for _, p in bench_protocol.suite(name))
    assert bench_protocol.REPRO_H2.epochs == 48 and bench_protocol.REPRO_H2.eval_every == 6
    assert {p.groups for _, p in bench_protocol.suite("repro-h3")} == {"resolution"}
    assert [p.head_dropout for _, p in bench_protocol.suite("repro-h3")] == [None, 0.0]
    with pytest.raises(ValueError, match="unknown design"):
        bench_protocol.Protocol(design="grid")


def test_combined_report_joins_a_core_and_its_outer_lrs(tiny_task, tmp_path):
    core = _protocol(strategies=("full", "linear"), lrs=(0.01, 0.03), eval_every=2)
    edges = _protocol(strategies=("full", "linear"), lrs=(0.1,), seeds=(0,), eval_every=2)
    run.run_benchmark(tmp_path / "core", core, workers=1)
    run.run_benchmark(tmp_path / "edges", edges, workers=1)
    summary = sweep_report.write_combined(tmp_path / "all", [(tmp_path / "core", core), (tmp_path / "edges", edges)])
    assert summary["runs"] == 2 * 2 * 2 + 2
    core_summary = json.loads((tmp_path / "core" / "summary.json").read_text())
    assert summary["chosen_lr"] == core_summary["chosen_lr"]  # chosen on the core's seeds only
    report = (tmp_path / "all" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| tiny | full |") and "n=" in line)
    assert row.count("n=2") == 2 and row.count("n=1") == 1  # the outer lr has one seed, and says so
    assert (tmp_path / "all" / "lr_sensitivity.png").is_file()
    assert "## Robustness to the lr" in report
    with pytest.raises(SystemExit, match="usage"):
        sweep_report.main(["only-one"])


def test_report_of_a_suite_stopped_before_its_second_part(tiny_task, tmp_path, monkeypatch):
    first = _protocol(strategies=("full", "linear"), lrs=(0.01, 0.03), eval_every=2)
    second = _protocol(strategies=("full", "linear"), lrs=(0.1,), seeds=(0,), eval_every=2)
    monkeypatch.setitem(bench_protocol.SUITES, "tiny-two", (("core", first), ("edges", second)))
    run.run_benchmark(tmp_path / "core", first, workers=1)
    summaries = run.report_suite(tmp_path, "tiny-two")
    assert summaries[1] is None and summaries[0]["seeds"] == [0, 1]
    with pytest.raises(ValueError, match="holds no benchmark"):
        run.report_suite(tmp_path / "nothing-here", "tiny-two")


def test_arm_difference_pairs_two_sweeps_at_their_own_lrs(tiny_task, tmp_path):
    a = _protocol(strategies=("full",), lrs=(0.01, 0.03), eval_every=2)
    b = _protocol(strategies=("linear",), lrs=(0.03, 0.1), eval_every=2)
    run.run_benchmark(tmp_path / "a", a, workers=1)
    run.run_benchmark(tmp_path / "b", b, workers=1)
    d = sweep_report.arm_difference((tmp_path / "a", a, "full"), (tmp_path / "b", b, "linear"), "tiny")
    sa = json.loads((tmp_path / "a" / "summary.json").read_text())
    sb = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert d["lr_a"] == sa["chosen_lr"]["tiny full"] and d["lr_b"] == sb["chosen_lr"]["tiny linear"]
    test_a = sweep_report.errors(sweep_report.sweep_rows(tmp_path / "a"))[("tiny", "full", d["lr_a"])]
    test_b = sweep_report.errors(sweep_report.sweep_rows(tmp_path / "b"))[("tiny", "linear", d["lr_b"])]
    assert d["n"] == 2 and d["mean"] == pytest.approx(statistics.fmean(test_a[k] - test_b[k] for k in (0, 1)))
    assert "## The paper's comparison" not in (tmp_path / "a" / "report.md").read_text()  # no bvgls, no full pair
