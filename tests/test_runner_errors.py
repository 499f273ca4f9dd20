"""User mistakes and unsafe files, the library side (runner API, strategies).

Bad arguments raise ValueError/TypeError with a message naming the problem, before anything is
trained or written; no file is unpickled unless the caller trusts it; a diverged run is flagged.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from conftest import write_image_folder
from torch.utils.data import TensorDataset

import bvgls
from bvgls.registry import DatasetSplits
from bvgls.runner import data as data_mod
from bvgls.runner import grid, loop, models

pytestmark = pytest.mark.usefixtures("one_thread")


class MakesMarker:
    """Unpickling it creates a directory: proof that the file's code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def tiny_data(n=16, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=gen)
    y = torch.arange(n) % classes
    return TensorDataset(x, y), TensorDataset(x[:6], y[:6])


def tiny_model(classes=3):
    loop.seed_everything(0)
    return models.build_model("tiny-cnn", classes, weights=None)


def run(out_dir=None, **kw):
    options = dict(epochs=1, lr=0.05, batch_size=8, progress=False, out_dir=out_dir)
    options.update(kw)
    return bvgls.finetune(tiny_model(), tiny_data(), options.pop("strategy", "full"), **options)


# ---------------------------------------------------------------------- non-finite settings
@pytest.mark.parametrize(
    "option,value",
    [
        ("lr", math.inf),
        ("lr", math.nan),
        ("lr", -0.1),
        ("momentum", math.nan),
        ("weight_decay", math.inf),
        ("label_smoothing", math.nan),
        ("warmup_epochs", math.nan),
    ],
)
def test_finetune_rejects_non_finite_settings_up_front(option, value, tmp_path):
    # non-finite hyper-parameters are refused before anything is trained or written
    with pytest.raises(ValueError, match=option):
        run(tmp_path / "run", **{option: value})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("lrs", [[math.inf], [0.01, math.nan]])
def test_compare_rejects_non_finite_lrs(lrs, tmp_path):
    # compare --lrs inf
    with pytest.raises(ValueError, match="lr"):
        grid.compare(
            ["full"],
            {"tiny": DatasetSplits(*tiny_data(), 3)},
            [0],
            lrs,
            model=tiny_model,
            out_dir=tmp_path / "out",
            epochs=1,
            batch_size=8,
            val_fraction=0.3,
            progress=False,
        )
    assert not (tmp_path / "out").exists()


def test_diverged_run_is_flagged(tmp_path):
    # lr 1e30 trains to NaN silently
    history = run(tmp_path / "run", lr=1e30)
    assert history.diverged is True
    assert history.final.get("diverged") is True


# ---------------------------------------------------------------------- reruns and resumes
def test_run_dirs_of_close_lrs_differ_and_common_lrs_keep_their_names(tmp_path):
    # lrs that differ beyond 6 significant digits shared one run directory
    a = grid.run_dir_for(str(tmp_path), "d", "full", 0.0123456, 0)
    b = grid.run_dir_for(str(tmp_path), "d", "full", 0.01234561, 0)
    assert a != b
    # existing grids keep working: the usual lrs keep their directory names
    for lr, text in ((0.01, "lr0.01"), (1e-05, "lr1e-05"), (0.3, "lr0.3")):
        assert os.path.basename(os.path.dirname(grid.run_dir_for(str(tmp_path), "d", "full", lr, 0))) == text


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    out = tmp_path_factory.mktemp("stopped") / "run"
    history = run(out, epochs=2, stop_after=1, strategy="bvgls")
    assert not history.finished and (out / "checkpoint.pt").is_file()
    return out


def test_resume_with_other_workers_is_refused(stopped, tmp_path):
    # the augmentation stream depends on the worker count (recorded resolved: 0 on CPU),
    # so the library (and compare, which resumes through it) refuses another one
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="num_workers: 0 -> 1"):
        run(out, epochs=2, strategy="bvgls", resume=True, num_workers=1)
    assert (out / "metrics.jsonl").read_text() == before
    history = run(out, epochs=2, strategy="bvgls", resume=True, num_workers=0)  # the same count: resumes
    assert history.finished


# ---------------------------------------------------------------------- unsafe loading


def test_resume_never_unpickles_an_untrusted_checkpoint(stopped, tmp_path):
    # _load_checkpoint retried torch.load(weights_only=False) after any failure
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    marker = tmp_path / "marker"
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    ckpt["extra"] = MakesMarker(marker)
    torch.save(ckpt, out / "checkpoint.pt")
    with pytest.raises(ValueError, match="trust_pickle"):
        run(out, epochs=2, strategy="bvgls", resume=True)
    assert not marker.exists(), "the checkpoint's code was executed"


def test_pickled_model_file_is_refused_without_trust(tmp_path):
    # build_model unpickled a whole nn.Module by design
    marker = tmp_path / "marker"
    net = tiny_model()
    net.payload = MakesMarker(marker)
    path = tmp_path / "pickled.pt"
    torch.save(net, path)
    with pytest.raises(ValueError, match="trust_pickle"):
        models.build_model(str(path), 3)
    assert not marker.exists(), "the model file's code was executed"
    trusted = models.build_model(str(path), 3, trust_pickle=True)
    assert marker.exists() and isinstance(trusted, torch.nn.Module)


@pytest.mark.parametrize("spec", sorted(bvgls.STRATEGIES))
def test_every_strategy_state_loads_with_weights_only(spec, tmp_path):
    # checkpoints must load with weights_only=True, whatever the strategy
    net = tiny_model()
    groups = bvgls.layer_groups(net)
    opt = torch.optim.SGD(groups.param_groups(), lr=0.01, momentum=0.9)
    strategy = bvgls.make_strategy(spec, opt, groups)
    x, y = tiny_data()[0].tensors
    for _ in range(2):
        torch.nn.functional.cross_entropy(net(x), y).backward()
        strategy.step()
        opt.zero_grad()
    torch.save({"strategy": strategy.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert loaded["strategy"]["num_steps"] == 2


# ---------------------------------------------------------------------- bad input
def test_step_before_any_backward_is_not_counted():
    # step() before any backward() counted an empty step (core: base.py)
    net = tiny_model()
    groups = bvgls.layer_groups(net)
    opt = torch.optim.SGD(groups.param_groups(), lr=0.01)
    strategy = bvgls.make_strategy("bvgls", opt, groups)
    try:
        strategy.step()
    except (RuntimeError, ValueError):
        pass  # refusing is fine too
    assert strategy.num_steps == 0 and sum(strategy.counts) == 0


def test_one_class_image_folder_is_refused(tmp_path):
    # a 1-class dataset was accepted and reported 0% error
    root = write_image_folder(tmp_path / "one", train_per_class=2, test_per_class=1, size=8)
    for split in ("train", "test"):
        shutil.rmtree(root / split / "green")
        shutil.rmtree(root / split / "blue")
    with pytest.raises(ValueError, match="class"):
        data_mod.load_dataset(str(root))


def test_one_class_data_is_refused_by_finetune(tmp_path):
    # the loop itself refuses a task with a single label
    x = torch.randn(8, 3, 16, 16)
    one = TensorDataset(x, torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="class"):
        bvgls.finetune(
            tiny_model(),
            DatasetSplits(one, one, 1),
            "full",
            epochs=1,
            lr=0.05,
            batch_size=8,
            progress=False,
            out_dir=tmp_path / "run",
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("split", ["train", "test"])
def test_corrupt_image_is_named_when_loading(split, tmp_path):
    # a corrupt image surfaced as a 155-line UnidentifiedImageError (test/: after an epoch)
    root = write_image_folder(tmp_path / "colors", train_per_class=2, test_per_class=1, size=8)
    (root / split / "red" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        data_mod.load_dataset(str(root))
