"""``bvgls recommend`` through the real command in a subprocess."""

import json
import os
import re
import subprocess
import sys

import pytest

from bvgls.recommend import frequency_of, recommend_range, wilson_interval


def bvgls(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop("BVGLS_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "bvgls", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_recommend_prints_frequency_bvr_and_the_recommended_range(image_root):
    out = bvgls(
        "recommend",
        "--model",
        "tiny-resnet",
        "--weights",
        "none",
        "--data",
        image_root,
        "--steps",
        6,
        "--batch-size",
        8,
        "--lr",
        0.05,
        "--no-progress",
    )
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"^\s*(\d+)\s+(\S+)\s+([\d.]+)%\s+\d+%-\d+%\s+(\S+)\s*$", out.stdout, re.M)
    assert [r[1] for r in rows] == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    frequency = [float(r[2]) / 100 for r in rows]
    assert abs(sum(frequency) - 1.0) < 0.01  # k=1: one group per step
    assert all(r[3] == "-" or float(r[3]) >= 0 for r in rows)
    spec = re.search(r"^recommended: (L\d+-\d+) ", out.stdout, re.M).group(1)
    assert spec == recommend_range(frequency)


def test_recommend_bad_input_is_one_line(image_root):
    cases = [
        (["--groups", "nope"], "unknown grouping scheme 'nope'"),
        (["--k", 9], "k=9 is larger than the number of non-empty groups (6)"),
        (["--data", "/nonexistent/dir"], "does not exist"),
    ]
    for extra, message in cases:
        args = ["recommend", "--model", "tiny-resnet", "--weights", "none", "--data", image_root, "--steps", 2, *extra]
        out = bvgls(*args)
        assert out.returncode == 2, (extra, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (extra, out.stderr)


def test_finetune_warns_in_one_line_when_groups_get_few_updates(image_root, tmp_path):
    # 30 training images, batch 8: 4 steps in 1 epoch; bvgls (k=1) over tiny-cnn's 4 groups: 1.0 update per group
    out = bvgls(
        "finetune",
        "--model",
        "tiny-cnn",
        "--weights",
        "none",
        "--data",
        image_root,
        "--strategy",
        "bvgls",
        "--epochs",
        1,
        "--batch-size",
        8,
        "--lr",
        0.05,
        "--no-progress",
        "--out",
        tmp_path / "run",
    )
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if "optimizer updates in this run" in line]
    assert len(lines) == 1 and lines[0].startswith(
        "warning: bvgls: a layer group it rotates through gets about 1.0 optimizer updates in this run"
    ), out.stderr
    assert "warnings.warn" not in out.stderr and "UserWarning" not in out.stderr


def recommend_json(image_root, tmp_path, *extra):
    out_json = tmp_path / "recommend.json"
    out = bvgls(
        "recommend",
        "--model",
        "tiny-resnet",
        "--weights",
        "none",
        "--data",
        image_root,
        "--steps",
        8,
        "--lr",
        0.05,
        "--json",
        out_json,
        *extra,
    )
    assert out.returncode == 0, out.stderr
    return out, json.loads(out_json.read_text())


def test_recommend_defaults_fit_the_cpu_and_honour_image_size(image_root, tmp_path):
    _, report = recommend_json(image_root, tmp_path, "--no-progress")
    # CPU defaults: batch 16, crop min(128, the model's own 32 px)
    assert (report["settings"]["batch_size"], report["settings"]["image_size"]) == (16, 32)
    assert report["settings"]["example_shape"] == [3, 32, 32]
    _, report = recommend_json(image_root, tmp_path, "--no-progress", "--image-size", 24, "--batch-size", 4)
    assert report["settings"]["example_shape"] == [3, 24, 24] and report["settings"]["batch_size"] == 4


def test_recommend_shows_progress_on_stderr_and_reports_its_stability(image_root, tmp_path):
    out, report = recommend_json(image_root, tmp_path)
    assert re.search(r"recommend: +100%.*8/8", out.stderr), out.stderr  # the bar, on stderr
    assert "probe:" not in out.stdout
    selections = report["selections"]
    assert len(selections) == 8 and all(len(s) == 1 for s in selections)
    halves = [recommend_range(frequency_of(part, 6)) for part in (selections[:4], selections[4:])]
    assert report["half_specs"] == halves
    line = re.search(r"^stability: first half of the steps -> (\S+), second half -> (\S+) \((.*?)\)", out.stdout, re.M)
    assert [line.group(1), line.group(2)] == halves
    assert line.group(3).startswith("stable" if halves[0] == halves[1] == report["spec"] else "NOT stable")
    for f, (low, high) in zip(report["frequency"], report["interval"]):
        assert low <= f <= high and (low, high) == pytest.approx(wilson_interval(f, 8))
    quiet, _ = recommend_json(image_root, tmp_path, "--no-progress")
    assert "probe:" not in quiet.stderr


def test_wilson_interval_matches_the_formula():
    # 3 of 10 at z = 1.96: the textbook interval [0.1078, 0.6032]
    low, high = wilson_interval(0.3, 10)
    assert low == pytest.approx(0.1078, abs=1e-4) and high == pytest.approx(0.6032, abs=1e-4)
    assert wilson_interval(0.0, 20)[0] == 0.0 and wilson_interval(1.0, 20)[1] == 1.0
