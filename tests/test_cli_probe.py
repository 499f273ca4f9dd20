"""``bvgls probe`` through the real command in a subprocess."""

import os
import re
import subprocess
import sys

from bvgls.probe import recommend_range


def bvgls(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop("BVGLS_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "bvgls", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_probe_prints_frequency_bvr_and_the_recommended_range(image_root):
    out = bvgls("probe", "--model", "tiny-resnet", "--weights", "none", "--data", image_root, "--steps", 6,
                "--batch-size", 8, "--lr", 0.05)
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"^\s*(\d+)\s+(\S+)\s+([\d.]+)%\s+(\S+)\s*$", out.stdout, re.M)
    assert [r[1] for r in rows] == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    frequency = [float(r[2]) / 100 for r in rows]
    assert abs(sum(frequency) - 1.0) < 0.01  # k=1: one group per step
    assert all(r[3] == "-" or float(r[3]) >= 0 for r in rows)
    spec = re.search(r"^recommended: (L\d+-\d+) ", out.stdout, re.M).group(1)
    assert spec == recommend_range(frequency)


def test_probe_bad_input_is_one_line(image_root):
    cases = [(["--groups", "nope"], "unknown grouping scheme 'nope'"),
             (["--k", 9], "k=9 is larger than the number of non-empty groups (6)"),
             (["--data", "/nonexistent/dir"], "does not exist")]
    for extra, message in cases:
        args = ["probe", "--model", "tiny-resnet", "--weights", "none", "--data", image_root, "--steps", 2, *extra]
        out = bvgls(*args)
        assert out.returncode == 2, (extra, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (extra, out.stderr)


def test_finetune_warns_in_one_line_when_groups_get_few_updates(image_root, tmp_path):
    # 30 training images, batch 8: 4 steps in 1 epoch; bvgls (k=1) over tiny-cnn's 4 groups: 1.0 update per group
    out = bvgls("finetune", "--model", "tiny-cnn", "--weights", "none", "--data", image_root, "--strategy", "bvgls",
                "--epochs", 1, "--batch-size", 8, "--lr", 0.05, "--no-progress", "--out", tmp_path / "run")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if "optimizer updates in this run" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: bvgls: a layer group it rotates through gets about "
                                                   "1.0 optimizer updates in this run"), out.stderr
    assert "warnings.warn" not in out.stderr and "UserWarning" not in out.stderr
