"""bvgls_lab.experiments: a tiny end-to-end benchmark run, the statistics, and the CLI commands."""

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_cli_errors import assert_one_line_error
from test_lab_protocols import lab_cli

from bvgls.runner.lrsearch import LR_LADDER, next_lr
from bvgls_lab import offline_tasks
from bvgls_lab.experiments import protocols, run
from bvgls_lab.experiments.report import paired_ci, print_table
from bvgls_lab.offline_tasks import FewShotTask

torch.set_num_threads(1)


def _tiny_task(seed: int = 0, data_root=None, download=False) -> FewShotTask:
    """3 classes of sklearn digits: pool 7 per class (2 shots + 5 val), test 6 per class."""
    full = offline_tasks.digits(seed=seed)
    images, labels, ids = {}, {}, {}
    for split, per_class in (("train", 7), ("test", 6)):
        keep = [i for c in range(3) for i in (full.labels[split] == c).nonzero().flatten()[:per_class].tolist()]
        images[split], labels[split] = full.images[split][keep], full.labels[split][keep]
        ids[split] = [full.source_ids[split][i] for i in keep]
    return FewShotTask("tiny", "feature", "3 digit classes", ["0", "1", "2"], images, labels, ids, seed, 2, hflip=False)


@pytest.fixture
def tiny_task(monkeypatch):
    monkeypatch.setitem(offline_tasks.TASKS, "tiny", _tiny_task)


def test_tiny_benchmark_end_to_end(tiny_task, tmp_path):
    protocol = protocols.Protocol(
        tasks=("tiny",),
        strategies=("full", "bvgls", "linear"),
        seeds=(0, 1),
        search_seeds=(0,),
        lrs=(0.01, 0.03),
        epochs=2,
        eval_every=1,
        batch_size=4,
        weights="none",
        fixed_lrs=(("tiny", "linear", 0.05),),
    )
    summary = run.run_benchmark(tmp_path, protocol, workers=1)

    # every searched cell chose an lr inside its grid or at the end of the ladder; the fixed one did not search
    cells = {c["strategy"]: c for c in summary["cells"]}
    assert cells["linear"]["fixed"] and cells["linear"]["lr"] == 0.05 and cells["linear"]["grid"] == [0.05]
    from bvgls.runner.grid import collect_results

    searched = {r["strategy"] for r in collect_results(str(tmp_path / "search"))}
    assert searched == {"full", "bvgls"}
    for cell in (cells["full"], cells["bvgls"]):
        grid = cell["grid"]
        assert cell["lr"] in grid and len(grid) >= 2
        assert not cell["edge"] or cell["lr"] in (LR_LADDER[0], LR_LADDER[-1])
    # the table reports the final runs: one per seed, at the chosen lr, 2 epochs each
    final = collect_results(str(tmp_path / "final"))
    assert sorted((r["strategy"], r["seed"]) for r in final) == [
        ("bvgls", 0),
        ("bvgls", 1),
        ("full", 0),
        ("full", 1),
        ("linear", 0),
        ("linear", 1),
    ]
    chosen = {c["strategy"]: c["lr"] for c in summary["cells"]}
    assert all(r["lr"] == chosen[r["strategy"]] and r["epochs"] == 2 for r in final)
    for r in final:
        assert summary["table"]["tiny"][r["strategy"]]["by_seed"][r["seed"]] == pytest.approx(r["test_error"])
    diff = summary["differences"]["bvgls"]["tiny"]["full"]
    errs = {s: summary["table"]["tiny"][s]["by_seed"] for s in ("bvgls", "full")}
    assert diff["mean"] == pytest.approx(sum(errs["bvgls"][k] - errs["full"][k] for k in (0, 1)) / 2)
    assert diff["n"] == 2

    report = (tmp_path / "report.md").read_text()
    assert "## Table A" in report and "| tiny | feature |" in report and "0.05 (fixed)" in report
    assert "Paired differences: bvgls" in report and "against training length" in report
    assert json.loads((tmp_path / "protocol.json").read_text())["tasks"] == ["tiny"]
    # the search tried several lrs: its runs' test and validation error against lr, as a table and a figure
    assert "Test error (%) mean ± std over seeds at every lr tried" in report
    assert "`figures/lr_sensitivity.png`" in report
    assert summary["figures"]["lr sensitivity"] == "figures/lr_sensitivity.png"
    for key in ("B tiny", "C tiny", "B all tasks", "C all tasks", "lr sensitivity"):
        path = tmp_path / summary["figures"][key]
        with Image.open(path) as im:
            assert im.size[0] > 200 and im.size[1] > 150
    assert "Table A" in print_table(tmp_path)

    # rerun: nothing left to train, same numbers; another protocol in the same directory is refused
    again = run.run_benchmark(tmp_path, protocol, workers=1)
    assert again["table"] == summary["table"]
    with pytest.raises(ValueError, match="another protocol"):
        run.run_benchmark(tmp_path, protocols.Protocol(tasks=("tiny",), epochs=3), workers=1)


def test_paired_ci_matches_the_t_interval():
    mean, lo, hi = paired_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)
    assert mean == 3.0 and lo == pytest.approx(3.0 - half, rel=1e-5) and hi == pytest.approx(3.0 + half, rel=1e-5)
    assert math.isnan(paired_ci([1.0])[1])


def test_lr_ladder_steps():
    assert next_lr(0.01, -1) == 0.003 and next_lr(0.1, +1) == 0.3
    assert next_lr(1.0, +1) is None and next_lr(0.001, -1) is None


def test_frozen_protocol_matches_the_documentation():
    p = protocols.BENCH
    assert p.tasks == protocols.SUITE and len(p.tasks) >= 5 and len(p.seeds) >= 5
    assert set(p.strategies) >= {"full", "L2-6", "L3-6", "L4-6", "L5-6", "linear", "bvgls", "bvgts"}
    assert p.val_fraction == offline_tasks.VAL_FRACTION and not p.fixed_lrs
    assert all(t in offline_tasks.TASKS for t in p.tasks + protocols.DEMO.tasks)


def test_demo_uses_the_learning_rates_the_bench_chose():
    """The demo's fixed lrs are the bench's validation choices recorded in docs/results/offline."""
    path = Path(__file__).resolve().parents[1] / "docs" / "results" / "offline" / "summary.json"
    chosen = {(c["task"], c["strategy"]): c["lr"] for c in json.loads(path.read_text())["cells"]}
    demo = protocols.DEMO
    assert {(t, s) for t, s, _ in demo.fixed_lrs} == {(t, s) for t in demo.tasks for s in demo.strategies}
    for task, strategy, lr in demo.fixed_lrs:
        assert chosen[(task, strategy)] == lr
    same = {
        k: v for k, v in asdict(demo).items() if k not in ("tasks", "strategies", "seeds", "search_seeds", "fixed_lrs")
    }
    assert same == {k: v for k, v in asdict(protocols.BENCH).items() if k in same}


def test_cli_export_task(tmp_path):
    from typer.testing import CliRunner

    from bvgls_lab.cli import get_app

    result = CliRunner().invoke(get_app(), ["export-task", "digits", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "20 shots per class" in result.output
    manifest = json.loads((tmp_path / "d" / "task.json").read_text())
    assert manifest["sizes"] == {"train": 700, "test": 1097}
    result = CliRunner().invoke(get_app(), ["export-task", "nope", str(tmp_path / "e")])
    assert result.exit_code == 2 and "unknown offline task" in result.output


def test_export_task_into_non_empty_directory(tmp_path):
    out = tmp_path / "task"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    res = lab_cli("export-task", "digits", out)
    assert_one_line_error(res, out)
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine\n"


def test_demo_spread_matches_the_recorded_runs():
    """The spread the demo prints next to its single seed is the recorded benchmark's."""
    import json
    from pathlib import Path

    from bvgls_lab.experiments.protocols import DEMOS
    from bvgls_lab.experiments.spread import SPREAD_FILE, compute_spread, spread_text

    docs = Path(__file__).resolve().parents[1] / "docs"
    stored = json.loads(Path(SPREAD_FILE).read_text())
    for suite, protocol in DEMOS.items():
        cells = [(t, s) for t in protocol.tasks for s in protocol.strategies]
        assert stored[suite] == compute_spread(suite, cells, str(docs))
        assert [(r["task"], r["strategy"]) for r in stored[suite]] == cells
        assert all(r["seeds"] >= 3 for r in stored[suite])
        text = spread_text(suite)
        assert all(f"{r['mean']:6.2f} ± {r['sd']:.2f}" in text for r in stored[suite])


def test_recommend_regret_against_the_recorded_ranges(tmp_path):
    import json

    from bvgls_lab.experiments.recommend_regret import (
        TASKS,
        last_half_rule,
        recorded_ranges,
        task_rows,
        uniform_share_rule,
    )

    fine = next(t for t in TASKS if t.label == "mobilenet_v2-clipart-fine")
    recorded = recorded_ranges(fine)
    assert sorted(recorded) == [1, 6, 8, 10]  # full, L6-10, L8-10, linear
    assert [last_half_rule({"groups": ["g"] * n}) for n in (6, 9, 10)] == [4, 5, 6]
    assert uniform_share_rule({"groups": ["g"] * 4, "frequency": [0.0, 0.2, 0.3, 0.5]}) == 3
    selections = [[7]] * 6 + [[9]] * 2 + [[5]] * 2  # 0-based groups: L8 60%, L10 20%, L6 20%
    frequency = [sum(i in s for s in selections) / 10 for i in range(10)]
    report = {"groups": ["g"] * 10, "frequency": frequency, "selections": selections}
    (tmp_path / f"{fine.label}_seed0.json").write_text(json.dumps(report))
    row = task_rows(fine, str(tmp_path))
    best = min(recorded.values())
    assert row["rules"]["coverage 80%"]["picks"] == [8]  # L8-10 holds 80% of the selections
    assert row["rules"]["coverage 80%"]["regret"] == recorded[8] - best
    assert row["rules"]["uniform share"]["picks"] == [6]  # L6 is the lowest group with at least 10%
    assert row["rules"]["full"]["regret"] == recorded[1] - best
