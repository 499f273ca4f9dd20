"""The test suite's isolation of crash-prone tests (tests/isolation.py) and the channels-last
policy every training path follows (bvgls.runner.nhwc)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from torch import nn

from bvgls.runner.nhwc import apply_channels_last, nhwc_crash_hazard

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_a_native_crash_fails_only_that_test_by_name(tmp_path):
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["isolation"]\n')
    (tmp_path / "test_crashy.py").write_text(
        textwrap.dedent("""
        import os
        import pytest

        @pytest.mark.isolated
        def test_aborts():
            os.abort()

        @pytest.mark.isolated
        def test_fine_in_a_child():
            assert os.environ["BVGLS_ISOLATED_CHILD"] == "1"

        def test_after_the_crash():
            assert True
    """)
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # tests failed; not 134 (the runner itself aborted)
    assert "FAILED test_crashy.py::test_aborts" in proc.stdout and "killed by SIGABRT" in proc.stdout
    assert "1 failed, 2 passed" in proc.stdout


def hazardous():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 1, stride=2))


def test_channels_last_policy():
    assert nhwc_crash_hazard(hazardous()) == "1"
    model = hazardous()
    on, reason = apply_channels_last(model, torch.device("cpu"), True)
    assert not on and "(1)" in reason and model[0].weight.is_contiguous()
    safe = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 1, stride=2))
    assert apply_channels_last(safe, torch.device("cpu"), True) == (True, None)
    assert safe[0].weight.is_contiguous(memory_format=torch.channels_last) and not safe[0].weight.is_contiguous()
    assert apply_channels_last(hazardous(), torch.device("cpu"), False) == (False, None)  # not asked: no reason
    assert apply_channels_last(hazardous(), torch.device("meta"), True)[0]  # the hazard is oneDNN's (CPU) only
