"""The offline benchmark's source model and target tasks (bvgls.source_model, bvgls.offline_tasks)."""

import gzip
import hashlib
import logging
import shutil
import struct

import numpy as np
import pytest
import torch
from isolation import AVX2_KERNELS

import bvgls
from bvgls.registry import DATASETS, MODELS
from bvgls_lab import source_model
from bvgls_lab.offline_tasks import SPLITS, TASKS, VAL_FRACTION, build_task, export_image_folder

torch.set_num_threads(1)

#: (train pool, test, classes, shots) per task, as documented in docs/experiments/offline.md
EXPECTED = {
    "fmnist-invert": (700, 1000, 10, 20),
    "fmnist-noise": (700, 1000, 10, 20),
    "fmnist-blur": (700, 1000, 10, 20),
    "digits": (700, 1097, 10, 20),
    "font-letters": (910, 1040, 26, 10),
    "fmnist-pairs": (700, 1000, 5, 40),
}


@pytest.fixture(scope="module")
def tasks():
    return {name: build_task(name) for name in TASKS}


@pytest.fixture(scope="module")
def fmnist_train_hashes():
    images, _ = source_model.read_fashion_mnist("train")
    return {hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in images}


def _hashes(images):
    return [hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in images]


# ---------------------------------------------------------------------- tasks
def test_suite_covers_three_kinds_of_shift(tasks):
    assert len(tasks) >= 5
    assert {t.shift for t in tasks.values()} == {"input", "feature", "label"}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_task_sizes_and_format(tasks, name):
    task = tasks[name]
    pool, test, classes, shots = EXPECTED[name]
    assert task.sizes() == {"train": pool, "test": test}
    assert task.num_classes == classes and task.shots == shots
    assert 10 <= shots <= 50
    per_class_pool = task.per_class("train")
    assert per_class_pool == [pool // classes] * classes  # balanced
    assert all(n > 0 for n in task.per_class("test"))
    for s in SPLITS:
        assert task.images[s].dtype == torch.uint8 and task.images[s].shape[1:] == (28, 28)
        assert task.labels[s].dtype == torch.int64 and len(task.labels[s]) == len(task.images[s])
        assert len(task.source_ids[s]) == len(task.labels[s])
    # the pool is shots : val = 2 : 5, so the runner's carve leaves `shots` per class
    assert round(per_class_pool[0] * (1 - VAL_FRACTION)) == shots


@pytest.mark.parametrize("name", list(EXPECTED))
def test_pool_and_test_are_disjoint(tasks, name):
    task = tasks[name]
    ids = {s: set(task.source_ids[s]) for s in SPLITS}
    assert len(ids["train"]) == len(task.source_ids["train"])  # no source image twice
    assert not ids["train"] & ids["test"]
    if name == "font-letters":  # split by font family: test fonts never seen in training
        fonts = {s: {i.split("/")[1] for i in ids[s]} for s in SPLITS}
        assert not fonts["train"] & fonts["test"]
        families = task.info["font_families"]
        assert not set(families["train"]) & set(families["test"])
    if name in ("digits", "fmnist-pairs", "fmnist-invert"):  # deterministic images: compare pixels too
        assert not set(_hashes(task.images["train"])) & set(_hashes(task.images["test"]))


@pytest.mark.parametrize("name", [n for n in EXPECTED if n.startswith("fmnist")])
def test_fashion_mnist_tasks_never_use_pretraining_images(tasks, fmnist_train_hashes, name):
    task = tasks[name]
    test_images, _ = source_model.read_fashion_mnist("test")
    for s in SPLITS:
        assert all(i.startswith("fashion-mnist/test/") for i in task.source_ids[s])
        originals = test_images[[int(i.rsplit("/", 1)[1]) for i in task.source_ids[s]]]
        assert not set(_hashes(originals)) & fmnist_train_hashes
        assert not set(_hashes(task.images[s])) & fmnist_train_hashes


def test_label_grouping_matches_the_original_labels(tasks):
    task = tasks["fmnist-pairs"]
    _, labels = source_model.read_fashion_mnist("test")
    idx = [int(i.rsplit("/", 1)[1]) for i in task.source_ids["test"]]
    assert torch.equal(task.labels["test"], labels[idx] // 2)


def test_inversion_is_exact(tasks):
    task = tasks["fmnist-invert"]
    images, _ = source_model.read_fashion_mnist("test")
    idx = [int(i.rsplit("/", 1)[1]) for i in task.source_ids["train"][:50]]
    assert torch.equal(task.images["train"][:50], 255 - images[idx])


@pytest.mark.parametrize("name", ["digits", "font-letters", "fmnist-noise"])
def test_construction_is_deterministic_by_seed(tasks, name):
    again = build_task(name, seed=0)
    assert again.fingerprint() == tasks[name].fingerprint()
    assert build_task(name, seed=1).fingerprint() != tasks[name].fingerprint()


def test_runner_carve_gives_disjoint_few_shot_and_validation_sets(tasks):
    from bvgls.runner.data import targets_of, validation_split

    task = tasks["fmnist-pairs"]
    splits = task.splits()
    picks = {}
    for seed in (0, 1):
        train, val = validation_split(splits, task.val_fraction, seed)
        assert not set(train.indices) & set(val.indices)
        labels = targets_of(train)
        assert np.bincount(labels).tolist() == [task.shots] * task.num_classes
        assert len(val) == len(splits.train) - task.shots * task.num_classes
        picks[seed] = sorted(train.indices)
    assert picks[0] != picks[1]  # every seed is its own draw of the few shots
    assert sorted(validation_split(splits, task.val_fraction, 0)[0].indices) == picks[0]


def test_registered_datasets_match_the_tasks(tasks):
    splits = DATASETS.get("offline:digits")(None, download=False, input=source_model.FMNIST_INPUT)
    assert (len(splits.train), len(splits.test), splits.num_classes) == (700, 1097, 10)
    x, y = splits.test[0]
    assert x.shape == (1, 28, 28) and y == int(tasks["digits"].labels["test"][0])
    rgb = DATASETS.get("offline:fmnist-pairs")(None, download=False, input=bvgls.registry.ModelInput(size=32))
    assert rgb.train[0][0].shape == (3, 32, 32)


def test_export_image_folder_round_trip(tasks, tmp_path):
    from torchvision.datasets import ImageFolder

    task = tasks["digits"]
    out = export_image_folder(task, tmp_path / "digits")
    for s in SPLITS:
        folder = ImageFolder(str(out / s))
        assert len(folder) == task.sizes()[s]
        assert [c.split("_", 1)[1] for c in folder.classes] == task.classes
        assert sorted(folder.targets) == sorted(task.labels[s].tolist())
    image, label = ImageFolder(str(out / "test"))[0]
    first = [i for i, y in enumerate(task.labels["test"].tolist()) if y == label][0]
    assert np.array_equal(np.asarray(image.convert("L")), task.images["test"][first].numpy())
    assert export_image_folder(task, out) == out  # identical export: kept
    with pytest.raises(FileExistsError, match="not an export"):
        export_image_folder(tasks["fmnist-pairs"], out)


def test_unknown_task_names_the_known_ones():
    with pytest.raises(KeyError, match="fmnist-invert"):
        build_task("no-such-task")


# ---------------------------------------------------------------------- source model
def test_model_has_the_papers_six_groups():
    model = MODELS.get("fmnist-resnet")(7, weights=None)
    groups = bvgls.layer_groups(model)
    assert groups.scheme == "resnet"
    assert groups.names == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 7)
    assert model.bvgls_input.size == 28 and model.bvgls_input.channels == 1
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 2_000_000


def test_shipped_checkpoint_is_a_trained_source_model():
    ckpt = source_model.load_source_checkpoint(
        source_model.ASSET_DIR / source_model.CHECKPOINT_NAME, source_model.CHECKPOINT_SHA256
    )
    assert (source_model.ASSET_DIR / source_model.CHECKPOINT_NAME).stat().st_size < 20 * 2**20
    net = source_model.FMNISTResNet(10)
    net.load_state_dict(ckpt["state_dict"])
    images, labels = source_model.read_fashion_mnist("test")
    x = ((images[:1000].float() / 255 - source_model.FMNIST_MEAN[0]) / source_model.FMNIST_STD[0]).unsqueeze(1)
    assert source_model.evaluate_accuracy(net, x, labels[:1000]) > 88.0
    built = source_model.build_fmnist_resnet(3, "DEFAULT")  # pretrained body, fresh 3-way head
    assert built.fc.out_features == 3
    assert torch.equal(built.layer4[0].conv2.weight, net.layer4[0].conv2.weight)


def test_tampered_checkpoint_is_refused(tmp_path, monkeypatch):
    good = source_model.ASSET_DIR / source_model.CHECKPOINT_NAME
    bad_dir = tmp_path / "assets"
    bad_dir.mkdir()
    bad = bad_dir / source_model.CHECKPOINT_NAME
    shutil.copy(good, bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(source_model.ChecksumError, match="SHA-256 .* expected"):
        source_model.load_source_checkpoint(bad, source_model.CHECKPOINT_SHA256)
    monkeypatch.setattr(source_model, "ASSET_DIR", bad_dir)
    with pytest.raises(source_model.ChecksumError, match="bvgls-lab pretrain"):
        source_model.build_fmnist_resnet(10, "DEFAULT")
    with pytest.raises(FileNotFoundError, match="bvgls-lab pretrain"):
        source_model.load_source_checkpoint(tmp_path / "missing.pt")


def _write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.mark.isolated(env=AVX2_KERNELS)  # its widths reach the oneDNN NHWC hazard: pretrain must avoid it
def test_pretrain_writes_a_loadable_checkpoint(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bvgls_lab")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 32)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    out = tmp_path / "ckpt.pt"
    meta = source_model.pretrain(out, epochs=1, batch_size=32, widths=(4, 8, 8, 8), data_root=str(tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.name == source_model.logger.name]
    assert meta["sha256"] == source_model.file_sha256(out)
    assert 0.0 <= meta["source_test_accuracy"] <= 100.0 and len(lines) == 2
    assert meta["channels_last"] is False  # the runner's policy: (4, 8, 8, 8) has 1x1 stride-2 convs from 4 and 8
    model = source_model.build_fmnist_resnet(4, str(out), checkpoint_sha256=meta["sha256"])
    assert model.fc.out_features == 4 and model.widths == (4, 8, 8, 8)
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 4)
