"""End-to-end runs of the ``bvgls`` command line on tiny generated data."""

from __future__ import annotations

import csv
import json
import os
import re
import statistics
import subprocess
import sys

import pytest

from bvgls.runner.plots import DPI, LOSS_FIGSIZE, selection_figsize

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ("--model", "tiny-resnet", "--weights", "none", "--batch-size", "8", "--lr", "0.05", "--no-progress")


def png_size(path):
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # a truncated file fails here
        return img.size


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        # times and peak memory are measurements of the process, not results of the run
        return [
            {k: v for k, v in json.loads(line).items() if not k.endswith("_s") and k != "peak_mem_mb"} for line in f
        ]


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "bvgls.cli", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "120"},
        timeout=120,
    )
    assert out.returncode == 0
    for command in ("finetune", "compare", "plot", "groups", "list"):
        assert command in out.stdout


def test_finetune_writes_run_dir(cli, image_root, tmp_path):
    run = tmp_path / "run"
    res = cli("finetune", "--data", image_root, "--strategy", "bvgls", "--epochs", "2", "--out", run, *TINY)
    assert res.exit_code == 0, res.output
    assert "done: test error" in res.stdout
    assert {"config.json", "metrics.jsonl", "result.json", "model.pt", "history.json"} <= set(os.listdir(run))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"] == "tiny-resnet" and cfg["dataset"] == "colors" and cfg["cli"]["epochs"] == 2
    recs = metrics(run)
    assert [r["epoch"] for r in recs] == [1, 2] and len(recs[0]["selection_frequency"]) == 6
    # the finetuned model is loadable as a model spec
    from bvgls.runner.models import build_model

    assert build_model(str(run / "model.pt"), 3).fc.out_features == 3
    # the same --out again is refused, pointing at the way out
    again = cli("finetune", "--data", image_root, "--epochs", "2", "--out", run, *TINY)
    assert again.exit_code == 2 and "already holds a finished run" in again.stderr


def test_resume_after_interruption_gives_identical_metrics(cli, image_root, tmp_path):
    common = ("--data", image_root, "--strategy", "bvgls", "--epochs", "3", "--val-fraction", "0.2", *TINY)
    assert cli("finetune", *common, "--out", tmp_path / "whole").exit_code == 0
    stopped = cli("finetune", *common, "--out", tmp_path / "part", "--stop-after", "1")
    assert stopped.exit_code == 0 and "--resume" in stopped.stdout
    assert len(metrics(tmp_path / "part")) == 1 and (tmp_path / "part" / "checkpoint.pt").exists()
    blocked = cli("finetune", *common, "--out", tmp_path / "part")
    assert blocked.exit_code == 2 and "--resume" in blocked.stderr
    resumed = cli("finetune", "--resume", tmp_path / "part", "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    assert metrics(tmp_path / "part") == metrics(tmp_path / "whole")


def test_plot_writes_pngs_of_expected_size(cli, image_root, tmp_path):
    for strategy in ("bvgls", "full"):
        assert (
            cli(
                "finetune",
                "--data",
                image_root,
                "--strategy",
                strategy,
                "--epochs",
                "2",
                "--out",
                tmp_path / strategy,
                *TINY,
            ).exit_code
            == 0
        )
    res = cli("plot", tmp_path / "bvgls", tmp_path / "full")
    assert res.exit_code == 0, res.output
    loss_px = (int(LOSS_FIGSIZE[0] * DPI), int(LOSS_FIGSIZE[1] * DPI))
    sel = selection_figsize(6)
    expected = {
        tmp_path / "bvgls" / "loss.png": loss_px,
        tmp_path / "bvgls" / "selection.png": (int(sel[0] * DPI), int(sel[1] * DPI)),
        tmp_path / "bvgls" / "bvr.png": loss_px,
        tmp_path / "full" / "loss.png": loss_px,
        tmp_path / "bvgls" / "loss_compare.png": loss_px,
    }
    for path, size in expected.items():
        assert str(path) in res.stdout
        assert path.stat().st_size > 5000 and png_size(path) == size, path
    assert not (tmp_path / "full" / "bvr.png").exists()  # full finetuning computes no BVR


def test_compare_table_and_restart(cli, image_root, image_root_b, tmp_path):
    out = tmp_path / "cmp"
    args = (
        "compare",
        "--data",
        f"{image_root},{image_root_b}",
        "--strategies",
        "full,L5-6,bvgls",
        "--seeds",
        "0,1",
        "--epochs",
        "1",
        "--out",
        out,
        *TINY,
    )
    res = cli(*args)
    assert res.exit_code == 0, res.output
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * 2
    assert {"dataset", "strategy", "seed", "lr", "test_error", "test_loss", "epochs", "wall_s"} <= set(rows[0])
    table = (out / "table.md").read_text()
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[0] == "| Dataset | full | L5-6 | bvgls |"
    body = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines[1:]}
    assert set(body) == {"colors", "colors-b", "Average"}
    for dataset in ("colors", "colors-b"):
        for strategy, cell in zip(("full", "L5-6", "bvgls"), body[dataset]):
            mean, std = map(float, re.fullmatch(r"\**([\d.]+) ± ([\d.]+)\**", cell).groups())
            errs = [float(r["test_error"]) for r in rows if r["dataset"] == dataset and r["strategy"] == strategy]
            assert math_close(mean, statistics.fmean(errs)) and math_close(std, statistics.stdev(errs))
        assert sum(c.startswith("**") for c in body[dataset]) >= 1  # best of the row marked
    averages = [float(c.strip("*")) for c in body["Average"]]
    assert all(0 <= a <= 100 for a in averages)
    # a restart skips every finished run
    mtimes = {p: os.path.getmtime(p) for p in out.rglob("result.json")}
    again = cli(*args)
    assert again.exit_code == 0 and "seed=" not in again.stdout
    assert {p: os.path.getmtime(p) for p in out.rglob("result.json")} == mtimes
    # figures for the whole grid
    plotted = cli("plot", out)
    assert plotted.exit_code == 0 and (out / "plots" / "loss_colors.png").exists()
    assert (out / "plots" / "selection_colors_bvgls.png").exists()


def math_close(a, b):
    return abs(a - b) <= 0.006  # the table rounds to 2 decimals


def test_compare_chooses_lr_on_validation_split(cli, image_root, tmp_path):
    out = tmp_path / "lrs"
    res = cli(
        "compare",
        "--data",
        image_root,
        "--strategies",
        "full,bvgls",
        "--seeds",
        "0",
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
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["phase"] == "search" and r["val_error"] != "" for r in rows)
    for strategy in ("full", "bvgls"):
        cell = [r for r in rows if r["strategy"] == strategy]
        best = min(cell, key=lambda r: (float(r["val_error"]), float(r["lr"])))
        assert [r["chosen"] for r in cell if r["lr"] == best["lr"]] == ["True"]
    table = (out / "table.md").read_text()
    assert "validation split" in table and "_edge_" in table  # a 2-point grid: the choice is always at an edge


def test_groups_and_list(cli):
    res = cli("groups", "--model", "tiny-resnet", "--strategy", "L3-6")
    assert res.exit_code == 0, res.output
    for name in ("stem", "layer1", "layer2", "layer3", "layer4", "fc"):
        assert re.search(rf"^\d\s+{name}\b", res.stdout, re.MULTILINE)
    assert "L3-6 trains: layer2, layer3, layer4, fc" in res.stdout
    listed = cli("list")
    assert listed.exit_code == 0 and "tiny-resnet" in listed.stdout and "digits" in listed.stdout
    assert "bvgls" in listed.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--model", "no-such-model", "--data", "digits"), "wide_resnet50_2"),
        (("--model", "tiny-resnet", "--data", "no-such-data"), "cifar100"),
        (("--model", "tiny-resnet", "--data", "/no/such/dir"), "does not exist"),
        (("--model", "tiny-resnet", "--data", "digits", "--strategy", "sgdx"), "known: "),
        (("--model", "tiny-resnet", "--data", "digits", "--strategy", "L9-6"), "6 groups"),
        (("--model", "tiny-resnet", "--data", "cifar100", "--data-root", "/no/such/root"), "--download"),
        (("--data", "digits"), "--model and --data are required"),
    ],
)
def test_bad_input_is_one_line_error(cli, args, needle):
    res = cli("finetune", *args, "--weights", "none", "--epochs", "1", "--no-progress")
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert needle in res.stderr and "Traceback" not in res.output
    if "no-such" in str(args):
        assert "known: " in res.stderr


def test_compare_errors(cli, tmp_path):
    res = cli("compare", "--data", "digits", "--out", tmp_path, "--lrs", "0.1,0.3", "--model", "tiny-resnet")
    assert res.exit_code == 2 and "--val-fraction" in res.stderr
    res = cli(
        "compare",
        "--data",
        "digits",
        "--out",
        tmp_path,
        "--strategies",
        "full,L2-9",
        "--model",
        "tiny-resnet",
        "--weights",
        "none",
    )
    assert res.exit_code == 2 and "L2-9" in res.stderr and "6 groups" in res.stderr
