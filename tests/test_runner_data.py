"""Datasets and models of the runner: transforms, splits, formats, clear errors (no network)."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch

from bvgls.registry import DATASETS, MODELS, ModelInput
from bvgls.runner.data import (
    ArrayImages,
    DatasetError,
    load_dataset,
    make_transform,
    read_idx,
    targets_of,
    validation_split,
)
from bvgls.runner.models import ModelError, build_model, save_model_file

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ModelInput(size=16, channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


# ---------------------------------------------------------------------- datasets
def test_registered_names():
    for name in ("flowers102", "pets", "dtd", "aircraft", "food101", "sun397", "cifar100", "fashion-mnist", "digits"):
        assert name in DATASETS


def test_image_folder_adapts_to_model_input(image_root, image_root_b):
    splits = load_dataset(str(image_root), input=SMALL)
    assert (len(splits.train), len(splits.test), splits.num_classes) == (30, 12, 3)
    assert splits.classes == ["blue", "green", "red"] and splits.name == "colors"
    x, y = splits.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    grey = load_dataset(str(image_root), input=ModelInput(size=28, channels=1, mean=(0.5,), std=(0.5,)))
    assert grey.test[0][0].shape == (1, 28, 28)
    # val/ is accepted in place of test/
    assert len(load_dataset(str(image_root_b), input=SMALL).test) == 12


def test_paper_transforms():
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    inp = ModelInput(size=224)
    train_tf, test_tf = make_transform(inp, True), make_transform(inp, False)
    names = [type(t).__name__ for t in train_tf.transforms]
    assert "RandomResizedCrop" in names and "RandomHorizontalFlip" in names
    resize = next(t for t in test_tf.transforms if type(t).__name__ == "Resize")
    assert resize.size == 256 and resize.interpolation.value == "bicubic"
    assert test_tf(img).shape == (3, 224, 224)
    assert torch.equal(test_tf(img), test_tf(img))  # evaluation is deterministic
    normalize = test_tf.transforms[-1]
    assert tuple(normalize.mean) == inp.mean and tuple(normalize.std) == inp.std


def test_validation_split_is_stratified_deterministic_and_unaugmented(image_root):
    splits = load_dataset(str(image_root), input=SMALL)
    train_a, val_a = validation_split(splits, 0.3, seed=0)
    _, val_b = validation_split(splits, 0.3, seed=0)
    _, val_c = validation_split(splits, 0.3, seed=1)
    assert val_a.indices == val_b.indices and val_a.indices != val_c.indices
    assert set(val_a.indices).isdisjoint(train_a.indices)
    assert len(val_a) + len(train_a) == len(splits.train)
    labels = targets_of(splits.train)
    assert sorted(labels[i] for i in val_a.indices) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # validation images go through the test transform: no random crop, same tensor twice
    assert torch.equal(val_a[0][0], val_a[0][0])
    assert not torch.equal(train_a[0][0], train_a[0][0])  # training keeps its augmentation
    with pytest.raises(DatasetError):
        validation_split(splits, 1.0)


def test_digits_offline():
    splits = load_dataset("digits", input=SMALL)
    assert (len(splits.train), len(splits.test), splits.num_classes) == (1437, 360, 10)
    assert splits.test[0][0].shape == (3, 16, 16)


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="Debian fashion-mnist not installed")
def test_fashion_mnist_from_debian_files(tmp_path):
    splits = load_dataset("fashion-mnist", root=str(tmp_path), input=SMALL)  # nothing under root: Debian copy
    assert (len(splits.train), len(splits.test), splits.num_classes) == (60000, 10000, 10)
    raw = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    assert splits.test[5][1] == int(raw[5])


def test_read_idx_roundtrip(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(int(n).to_bytes(4, "big") for n in data.shape)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + data.tobytes())
    assert np.array_equal(read_idx(path), data)


def test_array_images_serve_pil():
    ds = ArrayImages(np.zeros((2, 8, 8), np.uint8), np.array([1, 0]))
    img, label = ds[0]
    assert img.size == (8, 8) and label == 1 and ds.targets == [1, 0]


@pytest.mark.parametrize(
    "name,needle",
    [
        ("not-a-dataset", "known: .*cifar100"),
        ("/no/such/dir", "does not exist"),
    ],
)
def test_dataset_errors_name_the_fix(name, needle):
    with pytest.raises(DatasetError, match=needle):
        load_dataset(name, input=SMALL)


def test_image_folder_needs_test_split(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="train/ and test/"):
        load_dataset(str(tmp_path), input=SMALL)


@pytest.mark.parametrize("name", ["cifar100", "flowers102", "pets", "dtd", "aircraft", "food101", "sun397"])
def test_missing_paper_dataset_says_download(tmp_path, name):
    with pytest.raises(DatasetError, match="pass --download") as info:
        load_dataset(name, root=str(tmp_path), download=False, input=SMALL)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------- models
def test_registered_models_offline():
    for name in ("resnet18", "resnet50", "wide_resnet50_2", "vit_b_16", "tiny-resnet", "tiny-cnn"):
        assert name in MODELS
    net = build_model("resnet18", 7, weights="none")
    assert net.fc.out_features == 7 and net.bvgls_input.size == 224
    vit = build_model("vit_b_16", 5, weights=None)
    assert vit.heads.head.out_features == 5


def test_tiny_models_have_expected_groups():
    import bvgls

    assert bvgls.layer_groups(build_model("tiny-resnet", 3)).names == [
        "stem",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "fc",
    ]
    assert len(bvgls.layer_groups(build_model("tiny-cnn", 3))) == 4
    with pytest.raises(ModelError, match="no pretrained weights"):
        build_model("tiny-resnet", 3, weights="IMAGENET1K_V1")


def test_timm_model_without_download():
    pytest.importorskip("timm")
    net = build_model("timm:resnet18", 4, weights="none")
    assert net.get_classifier().out_features == 4 and net.bvgls_input.channels == 3


def test_model_file_formats(tmp_path):
    torch.manual_seed(0)
    net = build_model("tiny-resnet", 3).eval()
    x = torch.randn(2, 3, 32, 32)
    # 1. bvgls model.pt: records its architecture
    save_model_file(net, str(tmp_path / "model.pt"))
    again = build_model(str(tmp_path / "model.pt"), 3).eval()
    assert torch.equal(again(x), net(x))
    assert build_model(str(tmp_path / "model.pt"), 5).fc.out_features == 5  # new head
    # 2. a plain state dict as --weights for an architecture; the head is skipped when its size differs
    torch.save({"state_dict": net.state_dict()}, tmp_path / "sd.pth")
    loaded = build_model("tiny-resnet", 3, weights=str(tmp_path / "sd.pth")).eval()
    assert torch.equal(loaded(x), net(x))
    other = build_model("tiny-resnet", 4, weights=str(tmp_path / "sd.pth"))
    assert torch.equal(other.conv1.weight, net.conv1.weight) and other.fc.out_features == 4
    # a state dict alone has no architecture
    with pytest.raises(ModelError, match="--weights"):
        build_model(str(tmp_path / "sd.pth"), 3)
    # 3. a whole pickled module: only when trusted (unpickling runs code from the file)
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(ModelError, match="trust_pickle"):
        build_model(str(tmp_path / "whole.pt"), 3)
    with pytest.warns(UserWarning, match="trust"):
        whole = build_model(str(tmp_path / "whole.pt"), 3, trust_pickle=True).eval()
    assert torch.equal(whole(x), net(x))


def test_unknown_model_lists_known():
    with pytest.raises(ModelError, match="known: .*resnet18"):
        build_model("resnet9000", 3)
    with pytest.raises(ModelError, match="does not exist"):
        build_model("/no/such/model.pt", 3)


def test_sun397_partitions(tmp_path):
    from pathlib import Path

    from bvgls.runner.data import _sun397_partition

    data_dir = tmp_path / "SUN397"
    files = [data_dir / "a" / "abbey" / f"sun_{i}.jpg" for i in range(120)] + [
        data_dir / "b" / "bar" / f"sun_{i}.jpg" for i in range(8)
    ]
    labels = [0] * 120 + [1] * 8
    train, test = _sun397_partition(data_dir, files, labels)  # no partition files: 50/50 per class, capped
    assert (len(train), len(test)) == (54, 54) and not set(train) & set(test)
    assert _sun397_partition(data_dir, files, labels) == (train, test)  # fixed
    (data_dir / "Partitions").mkdir(parents=True)
    (data_dir / "Partitions" / "Training_01.txt").write_text("/a/abbey/sun_3.jpg\n/b/bar/sun_1.jpg\n")
    (data_dir / "Partitions" / "Testing_01.txt").write_text("/a/abbey/sun_7.jpg\n")
    assert _sun397_partition(Path(data_dir), files, labels) == ([3, 121], [7])
