"""Shared fixtures: tiny generated image data and a CLI runner (used by test_train/test_data/test_cli)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest_plugins = ["isolation"]  # @pytest.mark.isolated: crash-prone tests run in a child process

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
