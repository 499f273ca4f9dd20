"""The lr-sensitivity numbers, table and figure (bvgls.runner.lrsens, plots.plot_lr_sensitivity) and
``bvgls compare`` drawing them whenever more than one lr was tried, on tiny runs."""

from __future__ import annotations

import csv
import math
import statistics

import pytest

from bvgls.runner.lrsens import lr_sensitivity, lr_sensitivity_lines, several_lrs

pytestmark = pytest.mark.usefixtures("one_thread")


def _row(strategy, lr, seed, test, val, phase="search", diverged=False):
    return {
        "dataset": "d",
        "strategy": strategy,
        "lr": lr,
        "seed": seed,
        "test_error": test,
        "val_error": val,
        "phase": phase,
        "diverged": diverged,
    }


def test_points_are_mean_and_std_over_seeds_per_lr():
    rows = [
        _row("full", 0.01, 0, 10.0, 12.0),
        _row("full", 0.01, 1, 14.0, 16.0),
        _row("full", 0.1, 0, 30.0, 31.0),
        _row("full", 0.1, 1, None, None, diverged=True),
        _row("full", 0.1, 2, 40.0, 41.0, phase="refit"),
    ]
    sens = lr_sensitivity(rows)
    low, high = sens[("d", "full")]
    assert (low.lr, low.runs, low.diverged) == (0.01, 2, 0)
    assert low.test.mean == 12.0 and low.test.std == pytest.approx(statistics.stdev([10.0, 14.0]))
    assert low.val.mean == 14.0
    # the diverged run is counted, not averaged in; the refit (another training set) is left out
    assert (high.runs, high.diverged, high.test.n) == (2, 1, 1) and high.test.mean == 30.0 and math.isnan(high.test.std)
    assert several_lrs(sens) and not several_lrs(lr_sensitivity(rows[:2]))
    lines = lr_sensitivity_lines(sens, {("d", "full"): 0.01}, "plots/lr_sensitivity.png")
    assert "`plots/lr_sensitivity.png`" in lines[2]
    # the seeds differ between cells here (one diverged), so each cell says how many it averages
    assert lines[-1] == "| d | full | **12.00 ± 2.83 (14.00) n=2** | 30.00 (31.00) n=1, 1 diverged |"


def test_compare_draws_the_figure_when_several_lrs_were_tried(cli, image_root, tmp_path):
    from PIL import Image

    out = tmp_path / "grid"
    res = cli(
        "compare",
        "--data",
        image_root,
        "--strategies",
        "full,bvgls",
        "--seeds",
        "0,1",
        "--epochs",
        "1",
        "--lrs",
        "0.01,0.1",
        "--val-fraction",
        "0.3",
        "--out",
        out,
        "--no-extend-lrs",
        "--model",
        "tiny-resnet",
        "--weights",
        "none",
        "--batch-size",
        "8",
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    figure = out / "plots" / "lr_sensitivity.png"
    assert f"lr sensitivity (test and validation error against lr): {figure}" in res.stdout
    with Image.open(figure) as im:
        assert im.size[0] > 400 and im.size[1] > 300
    table = (out / "table.md").read_text()
    assert "## Learning-rate sensitivity" in table and "`plots/lr_sensitivity.png`" in table
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # the table's numbers are the runs' own: full at lr 0.1, mean ± std of its two seeds' test errors
    errs = [float(r["test_error"]) for r in rows if r["strategy"] == "full" and float(r["lr"]) == 0.1]
    line = next(x for x in table.splitlines() if "| full |" in x and "±" in x)  # the sensitivity table's row
    assert f"{statistics.fmean(errs):.2f} ± {statistics.stdev(errs):.2f}" in line


def test_compare_at_one_shared_lr_runs_no_search_and_draws_no_figure(cli, image_root, tmp_path):
    out = tmp_path / "shared"
    res = cli(
        "compare",
        "--data",
        image_root,
        "--strategies",
        "full,bvgls,linear",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--lrs",
        "0.01",
        "--no-extend-lrs",
        "--out",
        out,
        "--model",
        "tiny-resnet",
        "--weights",
        "none",
        "--batch-size",
        "8",
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["strategy"] for r in rows) == ["bvgls", "full", "linear"]
    assert all(r["phase"] == "final" and float(r["lr"]) == 0.01 and r["val_error"] == "" for r in rows)
    assert not (out / "plots" / "lr_sensitivity.png").exists() and "lr sensitivity" not in res.stdout
    assert "Learning rate: 0.01 (no search)" in (out / "table.md").read_text()


def test_paper_table_a_script_runs_both_modes_with_valid_options(tmp_path):
    """scripts/paper_table_a.sh: the shared mode is one lr with no search, the tuned mode a validation
    search; every printed compare command parses (each is re-run with --help appended: an unknown
    option fails before the help is shown)."""
    import os
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "paper_table_a.sh"
    env = {**os.environ, "PRINT_ONLY": "1", "OUT": str(tmp_path / "t")}
    out = subprocess.run(["bash", str(script), "both"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line) for line in out.stdout.splitlines() if line.startswith("bvgls compare")]
    assert len(commands) == 2
    shared, tuned = commands
    assert shared[shared.index("--lrs") + 1] == "0.01" and "--no-extend-lrs" in shared
    assert "--val-fraction" not in shared
    assert tuned[tuned.index("--lrs") + 1] == "0.001,0.003,0.01,0.03"
    assert tuned[tuned.index("--val-fraction") + 1] == "0.1"
    for cmd in commands:
        assert cmd[cmd.index("--model") + 1] == "wide_resnet50_2" and cmd[cmd.index("--schedule") + 1] == "constant"
        parsed = subprocess.run(
            [sys.executable, "-m", "bvgls", *cmd[1:], "--help"], capture_output=True, text=True, timeout=120
        )
        assert parsed.returncode == 0, parsed.stderr
    bad = subprocess.run(["bash", str(script), "bogus"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: mode must be")
