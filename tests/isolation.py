"""A pytest plugin: ``@pytest.mark.isolated`` runs a test in a child pytest process.

A test that can crash natively (oneDNN kernels, gloo, threads in C++) would otherwise take the
whole run down with no summary; in a child, a crash is this test's failure, reported by name
with the child's exit status and the end of its output. ``isolated(env={...})`` adds
environment variables for the child (e.g. ``ONEDNN_MAX_CPU_ISA=AVX2``: the kernels an AMD
EPYC runs, on any x86 CPU).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

CHILD = "BVGLS_ISOLATED_CHILD"
#: oneDNN's AVX2 kernels, which AMD EPYC CPUs run; on any x86 CPU this reaches the same code
AVX2_KERNELS = {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "isolated(env=None, timeout=600): run the test in a child pytest process "
        "and fail it, by name, if the child exits non-zero or is killed",
    )


def exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    marker = pyfuncitem.get_closest_marker("isolated")
    if marker is None or os.environ.get(CHILD):
        return None
    env = {**os.environ, CHILD: "1", **{k: str(v) for k, v in (marker.kwargs.get("env") or {}).items()}}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--no-header",
        "-rN",
        "--rootdir",
        str(pyfuncitem.config.rootpath),
        pyfuncitem.nodeid,
    ]
    try:
        proc = subprocess.run(
            cmd,
            cwd=pyfuncitem.config.rootpath,
            env=env,
            capture_output=True,
            text=True,
            timeout=marker.kwargs.get("timeout", 600),
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{pyfuncitem.nodeid}: the child process ran past its timeout", pytrace=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        pytest.fail(f"{pyfuncitem.nodeid} in a child process: {exit_text(proc.returncode)}\n{tail}", pytrace=False)
    return True
