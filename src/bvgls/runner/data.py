"""Datasets for the runner, with transforms that match the model's input.

Importing this module registers into :data:`bvgls.registry.DATASETS` the paper's seven target
sets (through torchvision): ``flowers102``, ``pets``, ``dtd``, ``aircraft``, ``food101``,
``sun397``, ``cifar100``; plus ``fashion-mnist`` (read from the Debian package's files in
``/usr/share/datasets/fashion-mnist`` when present, else torchvision's copy under ``root``)
and ``digits`` (scikit-learn's bundled 8x8 digits, always offline).

:func:`load_dataset` takes a registered name or the path of an ImageFolder root with
``train/`` and ``test/`` (or ``val/``) subfolders of class folders. Nothing is downloaded
unless ``download=True``; missing data raises :class:`DatasetError` whose one-line message
says what to pass.

Transforms (``augment="paper"``, the default for the paper's sets and ImageFolders): train
``RandomResizedCrop(size) + RandomHorizontalFlip``, test ``Resize(256/224 * size, bicubic) +
CenterCrop(size)``, then the model's mean/std; images are converted to the model's number of
channels. ``"light"`` crops gently (scale 0.6-1) and is the default for the small grey sets,
``"none"`` only resizes.
"""

from __future__ import annotations

import copy
import gzip
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..registry import DATASETS, DatasetSplits, ModelInput

AUGMENTATIONS = ("paper", "light", "none")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class DatasetError(ValueError):
    """Data that is missing or malformed; the message says what to pass."""


# ---------------------------------------------------------------------- transforms
def make_transform(input: ModelInput, train: bool, augment: str = "paper", hflip: bool = True) -> Callable:
    """The torchvision transform (PIL image -> normalised tensor) for ``input`` (see module docstring)."""
    from torchvision import transforms as T

    if augment not in AUGMENTATIONS:
        raise DatasetError(f"unknown augmentation {augment!r}; known: {', '.join(AUGMENTATIONS)}")
    size = int(input.size)
    mode = {1: "L", 3: "RGB"}.get(int(input.channels))
    if mode is None:
        raise DatasetError(f"models with {input.channels} input channels are not supported (1 or 3)")
    mean, std = tuple(input.mean), tuple(input.std)
    if len(mean) != input.channels or len(std) != input.channels:
        raise DatasetError(f"the model's mean/std have {len(mean)} entries for {input.channels} channels")
    bicubic = T.InterpolationMode.BICUBIC
    steps: list[Any] = [ConvertMode(mode)]
    if train and augment != "none":
        scale = (0.08, 1.0) if augment == "paper" else (0.6, 1.0)
        steps.append(T.RandomResizedCrop(size, scale=scale))
        if hflip:
            steps.append(T.RandomHorizontalFlip())
    elif augment == "paper":
        steps += [T.Resize(int(round(size * 256 / 224)), interpolation=bicubic), T.CenterCrop(size)]
    else:
        steps += [T.Resize(size, interpolation=bicubic), T.CenterCrop(size)]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class ConvertMode:
    """PIL image -> the given mode ("L" or "RGB"); a class, not a lambda, so DataLoader workers can pickle it."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image):
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


class TransformedDataset(Dataset):
    """``base[i] = (image, label)`` with ``transform`` applied to the image.

    Keeping the untransformed ``base`` lets a validation split carved from the training set
    use the test transform (no augmentation)."""

    def __init__(self, base, transform: Callable | None):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        image, label = self.base[index]
        return (self.transform(image) if self.transform is not None else image), label

    @property
    def targets(self) -> list[int]:
        return targets_of(self.base)


class ArrayImages(Dataset):
    """uint8 images ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` and int labels, served as PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = np.ascontiguousarray(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.targets = self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        from PIL import Image

        return Image.fromarray(self.images[index]), int(self.labels[index])


def targets_of(dataset) -> list[int] | None:
    """The labels of ``dataset`` without loading images, where it exposes them."""
    for attr in ("targets", "_labels", "labels"):
        value = getattr(dataset, attr, None)
        if value is not None and not callable(value):
            return [int(v) for v in value]
    if isinstance(dataset, Subset):
        inner = targets_of(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        parts = [targets_of(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else [t for p in parts for t in p]
    return None


def _splits(
    name: str, train_base, test_base, classes: list[str], input: ModelInput, augment: str, hflip: bool = True
) -> DatasetSplits:
    return DatasetSplits(
        train=TransformedDataset(train_base, make_transform(input, True, augment, hflip)),
        test=TransformedDataset(test_base, make_transform(input, False, augment, hflip)),
        num_classes=len(classes),
        classes=list(classes),
        name=name,
    )


# ---------------------------------------------------------------------- entry points
def load_dataset(
    name_or_path: str,
    root: str | os.PathLike | None = None,
    download: bool = False,
    input: ModelInput | None = None,
    *,
    augment: str | None = None,
) -> DatasetSplits:
    """Train and test sets for a registered dataset name or an ImageFolder root.

    Args:
        name_or_path: a name from ``DATASETS.names()``, or a directory with ``train/`` and
            ``test/`` (or ``val/``) subfolders of class folders.
        root: where registered datasets live / are downloaded to (default ``./data``).
        download: fetch a missing registered dataset (needs internet).
        input: the model's input (size, channels, mean/std); default ImageNet 224 RGB.
        augment: override the dataset's default augmentation (``paper``, ``light``, ``none``).
    """
    input = input or ModelInput()
    options = {} if augment is None else {"augment": augment}
    if name_or_path in DATASETS:
        root = os.path.expanduser(str(root if root is not None else "data"))
        splits = DATASETS.get(name_or_path)(root, download=download, input=input, **options)
    elif os.path.sep in str(name_or_path) or os.path.isdir(name_or_path):
        splits = image_folder(name_or_path, input=input, **options)
    else:
        raise DatasetError(
            f"unknown dataset {name_or_path!r}; known: {', '.join(DATASETS.names())}, "
            "or the path of an ImageFolder root with train/ and test/ subfolders"
        )
    if not splits.name:
        splits.name = dataset_label(name_or_path)
    return splits


def dataset_label(name_or_path: str) -> str:
    """A short label for tables and directory names: the name, or the folder's basename."""
    text = str(name_or_path)
    return os.path.basename(os.path.normpath(text)) if (os.path.sep in text or os.path.isdir(text)) else text


def dataset_names() -> list[str]:
    return DATASETS.names() + ["<ImageFolder root with train/ and test/>"]


def eval_view(train, test):
    """``train``'s examples with ``test``'s (augmentation-free) transform, for validation."""
    if isinstance(train, TransformedDataset) and isinstance(test, TransformedDataset):
        return TransformedDataset(train.base, test.transform)
    if hasattr(train, "transform") and hasattr(test, "transform"):
        view = copy.copy(train)
        view.transform = test.transform
        if hasattr(view, "transforms") and hasattr(test, "transforms"):
            view.transforms = test.transforms
        return view
    warnings.warn(
        "cannot swap the training transform for the test transform on this dataset; "
        "the validation split keeps the training augmentation",
        stacklevel=2,
    )
    return train


def validation_split(splits: DatasetSplits, fraction: float, seed: int = 0) -> tuple[Any, Any]:
    """Carve a validation set out of ``splits.train`` (never the test set).

    Stratified by class where labels are known, deterministic given ``seed``. Returns
    ``(train_subset, val_subset)``; the validation subset uses the test transform.
    """
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"val_fraction must be in (0, 1), got {fraction}")
    n = len(splits.train)
    gen = np.random.default_rng(seed)
    labels = targets_of(splits.train)
    held: list[int] = []
    if labels is not None and len(labels) == n:
        by_class: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_class.setdefault(int(y), []).append(i)
        for y in sorted(by_class):
            idx = np.array(by_class[y])
            gen.shuffle(idx)
            take = int(round(fraction * len(idx)))
            if len(idx) > 1:
                take = min(max(take, 1), len(idx) - 1)
            else:
                take = 0
            held.extend(idx[:take].tolist())
    else:
        perm = gen.permutation(n)
        held = perm[: max(1, int(round(fraction * n)))].tolist()
    if not held or len(held) >= n:
        raise DatasetError(f"val_fraction={fraction} of {n} training examples leaves no train or no val set")
    held_set = set(held)
    keep = [i for i in range(n) if i not in held_set]
    return Subset(splits.train, keep), Subset(eval_view(splits.train, splits.test), sorted(held))


# ---------------------------------------------------------------------- ImageFolder
def image_folder(path: str | os.PathLike, input: ModelInput | None = None, augment: str = "paper") -> DatasetSplits:
    """An ImageFolder root with ``train/`` and ``test/`` (or ``val/``) subfolders of class folders."""
    from torchvision.datasets import ImageFolder

    input = input or ModelInput()
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"data directory {str(root)!r} does not exist; pass --data with a registered name "
            f"({', '.join(DATASETS.names())}) or a folder with train/ and test/ subfolders"
        )
    train_dir = root / "train"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DatasetError(f"{str(root)!r} needs train/ and test/ (or val/) subfolders, each with one folder per class")
    try:
        train, test = ImageFolder(str(train_dir)), ImageFolder(str(test_dir))
    except (FileNotFoundError, RuntimeError) as e:
        raise DatasetError(f"{str(root)!r}: {str(e).splitlines()[0]}") from None
    if train.classes != test.classes:
        raise DatasetError(
            f"{str(root)!r}: the class folders of train/ and {test_dir.name}/ differ "
            f"({len(train.classes)} vs {len(test.classes)} classes)"
        )
    if len(train.classes) < 2:
        raise DatasetError(
            f"{root} has {len(train.classes)} class folder ({', '.join(train.classes)}); "
            "classification needs at least 2"
        )
    check_images([path for path, _ in train.samples + test.samples])
    return _splits(root.name, train, test, train.classes, input, augment)


def check_images(paths: list[str], show: int = 5) -> None:
    """Check every image file once before training (header and chunk checksums; a JPEG is also
    decoded at 1/8 scale, as verify() does not read its data), so corrupt files are named now,
    all in one message, not by a DataLoader an epoch in."""
    bad = [f"{path} ({problem})" for path in paths if (problem := image_problem(path))]
    if bad:
        more = f"; and {len(bad) - show} more" if len(bad) > show else ""
        noun = "is not a readable image" if len(bad) == 1 else f"are not readable images ({len(bad)} files)"
        raise DatasetError(
            f"{'; '.join(bad[:show])}{more} {noun}; remove or replace {'it' if len(bad) == 1 else 'them'}"
        )


def image_problem(path: str) -> str | None:
    """Why PIL cannot read the image ``path`` (None: it can)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            jpeg = im.format == "JPEG"
            im.verify()
        if jpeg:
            with Image.open(path) as im:  # verify() leaves the image unusable: reopen to decode
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"
    return None


# ---------------------------------------------------------------------- the paper's seven
def _missing(name: str, root: str, error: Exception) -> DatasetError:
    reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    return DatasetError(
        f"dataset {name!r} not found under --data-root {root!r} ({reason}); pass --download "
        "to fetch it (needs internet) or --data-root DIR where it is"
    )


def _torchvision(name: str, root: str, download: bool, make: Callable[[str], Any]):
    """``make(split)`` with torchvision's errors turned into one-line DatasetErrors."""

    def get(split):
        try:
            return make(split)
        except (RuntimeError, FileNotFoundError) as e:
            raise _missing(name, root, e) from None
        except OSError as e:  # URLError etc. while downloading
            raise DatasetError(
                f"downloading {name!r} into {root!r} failed ({type(e).__name__}: "
                f"{str(e)[:120]}); check the connection or put the files there"
            ) from None

    return get


@DATASETS.register("flowers102", help="Oxford Flowers-102 (train+val / test, 102 classes), torchvision")
def _flowers102(root: str, *, download: bool = False, input: ModelInput, augment: str = "paper") -> DatasetSplits:
    from torch.utils.data import ConcatDataset
    from torchvision.datasets import Flowers102

    get = _torchvision("flowers102", root, download, lambda s: Flowers102(root, split=s, download=download))
    train = ConcatDataset([get("train"), get("val")])
    classes = [str(i) for i in range(102)]
    return _splits("flowers102", train, get("test"), classes, input, augment)


@DATASETS.register("pets", help="Oxford-IIIT Pets (trainval / test, 37 classes), torchvision")
def _pets(root: str, *, download: bool = False, input: ModelInput, augment: str = "paper") -> DatasetSplits:
    from torchvision.datasets import OxfordIIITPet

    get = _torchvision(
        "pets", root, download, lambda s: OxfordIIITPet(root, split=s, target_types="category", download=download)
    )
    train, test = get("trainval"), get("test")
    return _splits("pets", train, test, train.classes, input, augment)


@DATASETS.register("dtd", help="Describable Textures (partition 1, train+val / test, 47 classes), torchvision")
def _dtd(root: str, *, download: bool = False, input: ModelInput, augment: str = "paper") -> DatasetSplits:
    from torch.utils.data import ConcatDataset
    from torchvision.datasets import DTD

    get = _torchvision("dtd", root, download, lambda s: DTD(root, split=s, partition=1, download=download))
    first = get("train")
    return _splits("dtd", ConcatDataset([first, get("val")]), get("test"), first.classes, input, augment)


@DATASETS.register("aircraft", help="FGVC-Aircraft (variants, trainval / test, 100 classes), torchvision")
def _aircraft(root: str, *, download: bool = False, input: ModelInput, augment: str = "paper") -> DatasetSplits:
    from torchvision.datasets import FGVCAircraft

    get = _torchvision(
        "aircraft", root, download, lambda s: FGVCAircraft(root, split=s, annotation_level="variant", download=download)
    )
    train = get("trainval")
    return _splits("aircraft", train, get("test"), train.classes, input, augment)


@DATASETS.register("food101", help="Food-101 (train / test, 101 classes), torchvision")
def _food101(root: str, *, download: bool = False, input: ModelInput, augment: str = "paper") -> DatasetSplits:
    from torchvision.datasets import Food101

    get = _torchvision("food101", root, download, lambda s: Food101(root, split=s, download=download))
    train = get("train")
    return _splits("food101", train, get("test"), train.classes, input, augment)


SUN397_PARTITIONS_URL = "https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip"


def _fetch_sun397_partitions(data_dir: Path) -> None:
    """The official train/test partitions (not part of torchvision's download); on failure the
    fixed fallback split is used, with a warning."""
    from torchvision.datasets.utils import download_and_extract_archive

    target = data_dir / "Partitions"
    try:
        download_and_extract_archive(SUN397_PARTITIONS_URL, download_root=str(data_dir), extract_root=str(target))
    except Exception as e:  # noqa: BLE001 - any failure means: use the fallback split
        warnings.warn(
            f"could not fetch the SUN397 partitions ({type(e).__name__}); using the fixed 50/50 "
            "per-class split instead of the official partition 1",
            stacklevel=2,
        )
        return
    nested = next(target.rglob("Training_01.txt"), None)
    if nested is not None and nested.parent != target:  # the archive may hold a Partitions/ folder itself
        for f in nested.parent.iterdir():
            os.replace(f, target / f.name)


def _sun397_partition(data_dir: Path, files: list[Path], labels: list[int]) -> tuple[list[int], list[int]]:
    """The official partition 1 when ``Partitions/Training_01.txt`` is there, else a fixed one:
    per class, 50 train and 50 test images drawn with seed 0 (the official partitions' sizes)."""
    for part_dir in (data_dir / "Partitions", data_dir.parent / "Partitions"):
        train_txt, test_txt = part_dir / "Training_01.txt", part_dir / "Testing_01.txt"
        if train_txt.is_file() and test_txt.is_file():
            index = {"/" + str(f.relative_to(data_dir)).replace(os.sep, "/"): i for i, f in enumerate(files)}
            pick = []
            for listing in (train_txt, test_txt):
                lines = listing.read_text().split()
                pick.append([index[line] for line in lines if line in index])
            return pick[0], pick[1]
    gen = np.random.default_rng(0)
    by_class: dict[int, list[int]] = {}
    for i in sorted(range(len(files)), key=lambda i: str(files[i])):
        by_class.setdefault(labels[i], []).append(i)
    train, test = [], []
    for y in sorted(by_class):
        idx = np.array(by_class[y])
        gen.shuffle(idx)
        half = min(50, len(idx) // 2)
        train += idx[:half].tolist()
        test += idx[half : 2 * half].tolist()
    return train, test


@DATASETS.register(
    "sun397",
    help="SUN397 (official partition 1 if its files are there, else a fixed 50/50 "
    "per class split, 397 classes), torchvision",
)
def _sun397(root: str, *, download: bool = False, input: ModelInput, augment: str = "paper") -> DatasetSplits:
    from torchvision.datasets import SUN397

    full = _torchvision("sun397", root, download, lambda s: SUN397(root, download=download))(None)
    if download and not (full._data_dir / "Partitions" / "Training_01.txt").is_file():
        _fetch_sun397_partitions(full._data_dir)
    train_idx, test_idx = _sun397_partition(full._data_dir, full._image_files, full._labels)
    return _splits("sun397", Subset(full, train_idx), Subset(full, test_idx), full.classes, input, augment)


@DATASETS.register("cifar100", help="CIFAR-100 (50k / 10k, 100 classes), torchvision")
def _cifar100(root: str, *, download: bool = False, input: ModelInput, augment: str = "paper") -> DatasetSplits:
    from torchvision.datasets import CIFAR100

    get = _torchvision("cifar100", root, download, lambda s: CIFAR100(root, train=s, download=download))
    train = get(True)
    return _splits("cifar100", train, get(False), train.classes, input, augment)


# ---------------------------------------------------------------------- offline sets
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not, as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DatasetError(f"{str(path)!r} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _fashion_files(directory: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in FASHION_MNIST_FILES.items():
        path = next((directory / (stem + ext) for ext in (".gz", "") if (directory / (stem + ext)).is_file()), None)
        if path is None:
            return None
        found[key] = path
    return found


def find_fashion_mnist(root: str | os.PathLike | None) -> dict[str, Path] | None:
    """The four Fashion-MNIST IDX files (``train_x``, ``train_y``, ``test_x``, ``test_y``) in ``root``,
    ``root/fashion-mnist``, ``root/FashionMNIST/raw`` or the Debian package's directory; None if absent."""
    candidates = [Path(root), Path(root) / "fashion-mnist", Path(root) / "FashionMNIST" / "raw"] if root else []
    return next((f for f in (_fashion_files(c) for c in candidates + [Path(DEBIAN_FASHION_MNIST)]) if f), None)


def read_fashion_mnist(
    split: str, root: str | os.PathLike | None = None, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train" or "test") as ``(uint8 images N x 28 x 28, int64 labels)``:
    the IDX files (:func:`find_fashion_mnist`), else torchvision's ``FashionMNIST`` (downloading
    into ``root`` only if ``download``)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    files = find_fashion_mnist(root)
    if files is not None:
        return (
            torch.from_numpy(read_idx(files[f"{split}_x"]).copy()),
            torch.from_numpy(read_idx(files[f"{split}_y"]).astype(np.int64)),
        )
    try:
        from torchvision.datasets import FashionMNIST

        ds = FashionMNIST(root or "data", train=split == "train", download=download)
    except RuntimeError as e:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root or '(no root)'} nor {DEBIAN_FASHION_MNIST}: install the Debian "
            "package dataset-fashion-mnist, or pass --download with --data-root DIR"
        ) from e
    return ds.data.clone(), ds.targets.clone().long()


@DATASETS.register(
    "fashion-mnist",
    help="Fashion-MNIST (60k / 10k, 10 classes, 28x28 grey): the Debian "
    "package's files if present, else torchvision's under --data-root",
)
def _fashion_mnist(root: str, *, download: bool = False, input: ModelInput, augment: str = "light") -> DatasetSplits:
    files = find_fashion_mnist(root)
    if files is None:
        from torchvision.datasets import FashionMNIST

        get = _torchvision("fashion-mnist", root, download, lambda s: FashionMNIST(root, train=s, download=download))
        train, test = get(True), get(False)
        train_base = ArrayImages(train.data.numpy(), train.targets.numpy())
        test_base = ArrayImages(test.data.numpy(), test.targets.numpy())
    else:
        train_base = ArrayImages(read_idx(files["train_x"]), read_idx(files["train_y"]))
        test_base = ArrayImages(read_idx(files["test_x"]), read_idx(files["test_y"]))
    return _splits("fashion-mnist", train_base, test_base, FASHION_MNIST_CLASSES, input, augment)


@DATASETS.register("digits", help="scikit-learn's 8x8 handwritten digits (1437 / 360, stratified, seed 0), offline")
def _digits(root: str, *, download: bool = False, input: ModelInput, augment: str = "light") -> DatasetSplits:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DatasetError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    images = np.clip(bunch.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    tr, te = train_test_split(np.arange(len(images)), test_size=0.2, random_state=0, stratify=bunch.target)
    return _splits(
        "digits",
        ArrayImages(images[tr], bunch.target[tr]),
        ArrayImages(images[te], bunch.target[te]),
        [str(i) for i in range(10)],
        input,
        augment,
        hflip=False,
    )
