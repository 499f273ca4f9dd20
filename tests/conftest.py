"""Shared fixtures: tiny generated image data and a CLI runner (used by test_train/test_data/test_cli)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest_plugins = ["isolation"]  # @pytest.mark.isolated: crash-prone tests run in a child process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every test runs in its own temporary directory (below): child processes must still find the sources
_paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
os.environ["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in _paths if p)


@pytest.fixture(autouse=True)
def in_a_temporary_directory(tmp_path_factory, monkeypatch):
    """Run each test in a fresh temporary directory, so that a command's default output
    (``runs/...``) lands there and never in the checkout."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    """The suite writes only under temporary paths: no new entries in the checkout's ``runs/``."""
    runs = os.path.join(ROOT, "runs")
    before = set(os.listdir(runs)) if os.path.isdir(runs) else set()
    yield
    after = set(os.listdir(runs)) if os.path.isdir(runs) else set()
    assert after <= before, f"the tests wrote into {runs}: {sorted(after - before)}"


CLASSES = ("red", "green", "blue")


def write_image_folder(root, train_per_class=10, test_per_class=4, size=20, seed=0, test_dir="test"):
    """An ImageFolder root: train/ and test/ with one folder per class of noisy PNGs whose mean
    colour gives the class (so a tiny model can learn something in a few steps)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), (test_dir, test_per_class)):
        for ci, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 90, size=(size, size, 3))
                img[..., ci] += 150
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def image_root(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imgs") / "colors")


@pytest.fixture(scope="session")
def image_root_b(tmp_path_factory):
    """A second task (val/ instead of test/, other images)."""
    return write_image_folder(tmp_path_factory.mktemp("imgs_b") / "colors-b", seed=1, test_dir="val")


@pytest.fixture
def one_thread():
    """Tests share two cores with others: one torch thread is faster than oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli():
    """``cli(*args)`` runs the bvgls app in-process; returns click's Result."""
    from typer.testing import CliRunner

    from bvgls.cli import get_app

    runner = CliRunner()
    app = get_app()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    return invoke
