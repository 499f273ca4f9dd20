"""``bvgls probe`` through the real command in a subprocess (issue 11)."""

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
