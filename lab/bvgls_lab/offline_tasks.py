"""Offline few-shot target tasks for ``fmnist-resnet`` (docs/experiments/offline.md has the frozen protocol).

Every task is built only from data the source model was never trained on, and covers
one of the three kinds of distribution shift after which different depths of
finetuning are known to win (Lee et al., "Surgical fine-tuning", ICLR 2023):

* input-level: corruptions of Fashion-MNIST *test-split* images (same ten classes);
* feature-level: new image domains -- scikit-learn's handwritten digits, and capital
  letters rendered from the Debian fonts, split by font family so that test fonts are
  never seen in training;
* label-level: new groupings of Fashion-MNIST classes (test-split images).

A task is a :class:`FewShotTask`: a ``train`` pool and a large held-out ``test`` split,
disjoint, as ``uint8`` 28x28 grayscale images (white on black, like Fashion-MNIST). The
pool holds ``shots + val`` images per class in the ratio 2:5; a run carves it, stratified
and seeded by the run's seed, into the few-shot training set (``shots`` per class, 10-40)
and the validation set that chooses the learning rate: ``val_fraction = 5/7``, the
runner's ``--val-fraction`` (:func:`bvgls.runner.data.validation_split`). So each seed is a new
draw of the few shots, and all strategies with the same seed see the same draw.
Construction is deterministic given the task's ``seed``. Tasks are registered in
``bvgls.registry.DATASETS`` as ``offline:<name>`` and are written as an ImageFolder
(``train/`` and ``test/`` of class folders of PNGs) by :func:`export_image_folder`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bvgls.registry import DATASETS, DatasetSplits, ModelInput

from .source_model import FMNIST_CLASSES, read_fashion_mnist

IMAGE_SIZE = 28
FONT_DIRS = (
    "/usr/share/fonts/truetype/dejavu",
    "/usr/share/fonts/truetype/liberation",
    "/usr/share/fonts/truetype/freefont",
)
SPLITS = ("train", "test")
#: the validation share of every task's train pool (shots : val = 2 : 5 per class)
VAL_FRACTION = 5 / 7


@dataclass
class FewShotTask:
    """A target task: a train pool (few shots + validation per class) and a disjoint test split."""

    name: str
    shift: str  # "input", "feature" or "label"
    description: str
    classes: list[str]
    images: dict[str, torch.Tensor]  # split -> uint8 [N, 28, 28]
    labels: dict[str, torch.Tensor]  # split -> int64 [N]
    source_ids: dict[str, list[str]] = field(default_factory=dict)  # split -> provenance id per image
    seed: int = 0
    shots: int = 20  # training images per class once the validation set is carved out
    info: dict = field(default_factory=dict)  # task-specific facts, e.g. the font split
    hflip: bool = True  # whether a horizontal flip keeps the label (clothes) or not (digits, letters)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sizes(self) -> dict[str, int]:
        return {s: int(len(self.labels[s])) for s in SPLITS}

    def per_class(self, split: str) -> list[int]:
        return torch.bincount(self.labels[split], minlength=self.num_classes).tolist()

    @property
    def val_fraction(self) -> float:
        return VAL_FRACTION

    def fingerprint(self) -> str:
        """SHA-256 over all images and labels (to check determinism and exports)."""
        h = hashlib.sha256()
        for s in SPLITS:
            h.update(self.images[s].numpy().tobytes())
            h.update(self.labels[s].numpy().tobytes())
        return h.hexdigest()

    def splits(self, input: ModelInput | None = None, augment: str = "none") -> DatasetSplits:
        """Datasets for :func:`bvgls.runner.loop.finetune` (train = the whole pool: pass
        ``val_fraction=task.val_fraction``), with ``bvgls.runner.data``'s transforms for ``input``
        (default: 28x28 grey, Fashion-MNIST mean/std) and ``augment`` on the train split."""
        from bvgls.runner.data import ArrayImages, TransformedDataset, make_transform

        from .source_model import FMNIST_INPUT

        input = input or FMNIST_INPUT
        base = {s: ArrayImages(self.images[s].numpy(), self.labels[s].numpy()) for s in SPLITS}
        return DatasetSplits(
            train=TransformedDataset(base["train"], make_transform(input, True, augment, self.hflip)),
            test=TransformedDataset(base["test"], make_transform(input, False, augment, self.hflip)),
            num_classes=self.num_classes,
            classes=list(self.classes),
            name=self.name,
        )


# ---------------------------------------------------------------------- helpers
def _per_class_split(
    labels: torch.Tensor, shots: int, val: int, test: int, generator: torch.Generator, classes: int
) -> dict[str, torch.Tensor]:
    """Per class: ``shots + val`` indices for the train pool and ``test`` for the test split
    (``-1``: all the rest), disjoint, drawn with ``generator``; sorted within each split."""
    chosen = {s: [] for s in SPLITS}
    for c in range(classes):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        pool = shots + val
        n_test = len(idx) - pool if test < 0 else test
        if pool + n_test > len(idx):
            raise ValueError(f"class {c} has {len(idx)} examples, fewer than the {pool + n_test} asked for")
        chosen["train"].append(idx[:pool])
        chosen["test"].append(idx[pool : pool + n_test])
    return {s: torch.cat(v).sort().values for s, v in chosen.items()}


def image_hashes(images: torch.Tensor) -> list[str]:
    return [hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in images]


_TRAIN_HASHES: set[str] | None = None


def _fmnist_train_hashes(data_root: str | None = None, download: bool = False) -> set[str]:
    """Hashes of every Fashion-MNIST train-split image: the source model's pretraining data."""
    global _TRAIN_HASHES
    if _TRAIN_HASHES is None:
        _TRAIN_HASHES = set(image_hashes(read_fashion_mnist("train", data_root, download)[0]))
    return _TRAIN_HASHES


def _fmnist_test_pool(
    data_root: str | None = None, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fashion-MNIST test-split images, minus any that also occur in the train split."""
    images, labels = read_fashion_mnist("test", data_root, download)
    seen = _fmnist_train_hashes(data_root, download)
    keep = torch.tensor([h not in seen for h in image_hashes(images)], dtype=torch.bool)
    return images[keep], labels[keep], torch.nonzero(keep).flatten()


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = x[:, None]
    conv2d, pad = torch.nn.functional.conv2d, torch.nn.functional.pad
    x = conv2d(pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = conv2d(pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return x[:, 0]


# ---------------------------------------------------------------------- Fashion-MNIST-based tasks
def _fmnist_task(
    name: str,
    shift: str,
    description: str,
    seed: int,
    shots: int,
    test: int,
    corrupt: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    grouping: list[list[int]] | None = None,
    group_names: list[str] | None = None,
    data_root: str | None = None,
    download: bool = False,
) -> FewShotTask:
    images, labels, original_index = _fmnist_test_pool(data_root, download)
    if grouping is not None:
        mapping = torch.full((10,), -1, dtype=torch.long)
        for new, olds in enumerate(grouping):
            mapping[olds] = new
        labels = mapping[labels]
        classes = group_names
    else:
        classes = list(FMNIST_CLASSES)
    generator = torch.Generator().manual_seed(seed)
    index = _per_class_split(labels, shots, _val_count(shots), test, generator, len(classes))
    task_images, task_labels, ids = {}, {}, {}
    for s in SPLITS:
        x = images[index[s]]
        if corrupt is not None:
            x = _to_u8(corrupt(x.float() / 255.0, generator))
        task_images[s], task_labels[s] = x.contiguous(), labels[index[s]].clone()
        ids[s] = [f"fashion-mnist/test/{int(original_index[i])}" for i in index[s]]
    return FewShotTask(name, shift, description, classes, task_images, task_labels, ids, seed, shots)


def _val_count(shots: int) -> int:
    """Validation images per class for ``shots`` training images (2 : 5)."""
    return shots * 5 // 2


def _invert(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return 1.0 - x


def _noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x + 0.4 * torch.randn(x.shape, generator=generator)


def _blur_contrast(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return 0.5 + 0.25 * (_gaussian_blur(x, 1.2) - 0.5)


def fmnist_invert(seed: int = 0, data_root: str | None = None, download: bool = False) -> FewShotTask:
    """Input-level shift: Fashion-MNIST test images with inverted intensities (black on white)."""
    return _fmnist_task(
        "fmnist-invert",
        "input",
        "Fashion-MNIST test-split images, intensities inverted (x -> 1 - x); 10 classes",
        seed,
        20,
        100,
        corrupt=_invert,
        data_root=data_root,
        download=download,
    )


def fmnist_noise(seed: int = 0, data_root: str | None = None, download: bool = False) -> FewShotTask:
    """Input-level shift: Fashion-MNIST test images with strong Gaussian pixel noise."""
    return _fmnist_task(
        "fmnist-noise",
        "input",
        "Fashion-MNIST test-split images plus i.i.d. Gaussian pixel "
        "noise (sigma 0.4 of the [0, 1] range, fixed per image), clipped; 10 classes",
        seed,
        20,
        100,
        corrupt=_noise,
        data_root=data_root,
        download=download,
    )


def fmnist_blur_contrast(seed: int = 0, data_root: str | None = None, download: bool = False) -> FewShotTask:
    """Input-level shift: Fashion-MNIST test images blurred and at a quarter of their contrast."""
    return _fmnist_task(
        "fmnist-blur",
        "input",
        "Fashion-MNIST test-split images, Gaussian blur (sigma 1.2 px) "
        "and contrast scaled to 25% around mid-grey; 10 classes",
        seed,
        20,
        100,
        corrupt=_blur_contrast,
        data_root=data_root,
        download=download,
    )


#: Pairs that split every confusable group (T-shirt/Shirt/Pullover/Coat, Sandal/Sneaker/Ankle boot).
FMNIST_PAIRS = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def fmnist_pairs(seed: int = 0, data_root: str | None = None, download: bool = False) -> FewShotTask:
    """Label-level shift: five classes, each the union of two unrelated Fashion-MNIST classes."""
    names = ["+".join(re.sub(r"\W", "", FMNIST_CLASSES[i]) for i in pair) for pair in FMNIST_PAIRS]
    return _fmnist_task(
        "fmnist-pairs",
        "label",
        "Fashion-MNIST test-split images relabelled into 5 classes, "
        "each the union of two unrelated classes (T-shirt+Trouser, Pullover+Dress, Coat+Sandal, "
        "Shirt+Sneaker, Bag+Ankle boot)",
        seed,
        40,
        200,
        grouping=FMNIST_PAIRS,
        group_names=names,
        data_root=data_root,
        download=download,
    )


# ---------------------------------------------------------------------- feature-level tasks
def digits(seed: int = 0, data_root: str | None = None, download: bool = False) -> FewShotTask:
    """Feature-level shift: scikit-learn's 8x8 handwritten digits, upsampled to 20x20 in a 28x28 frame."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16.0
    x = torch.nn.functional.interpolate(x[:, None], size=(20, 20), mode="bilinear", align_corners=False)[:, 0]
    x = torch.nn.functional.pad(x, (4, 4, 4, 4))  # centred in 28x28, as MNIST
    labels = torch.tensor(data.target, dtype=torch.long)
    images = _to_u8(x)
    generator = torch.Generator().manual_seed(seed)
    index = _per_class_split(labels, 20, _val_count(20), -1, generator, 10)
    return FewShotTask(
        "digits",
        "feature",
        "scikit-learn handwritten digits (UCI, 8x8, 1797 images) bilinearly "
        "upsampled to 20x20 and centred in 28x28; 10 classes",
        [str(d) for d in range(10)],
        {s: images[index[s]].contiguous() for s in SPLITS},
        {s: labels[index[s]].clone() for s in SPLITS},
        {s: [f"sklearn-digits/{int(i)}" for i in index[s]] for s in SPLITS},
        seed,
        20,
        hflip=False,
    )


def font_families(font_dirs=FONT_DIRS) -> dict[str, list[str]]:
    """Installed TrueType fonts grouped by family (file name up to the style suffix)."""
    families: dict[str, list[str]] = {}
    for d in font_dirs:
        for path in sorted(Path(d).glob("*.ttf")) if Path(d).is_dir() else []:
            family = re.sub(r"Bold|Oblique|Italic|Regular", "", path.stem.split("-")[0])
            families.setdefault(family, []).append(str(path))
    return families


def _render_glyph(char: str, font_path: str, rng: np.random.Generator) -> np.ndarray:
    """One white-on-black 28x28 rendering of ``char``: glyph fitted into a 16-20 px box,
    rotated by up to 12 degrees, shifted by up to 2 px (all drawn from ``rng``)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, 48)
    canvas = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(canvas).text((24, 12), char, fill=255, font=font)
    box = canvas.getbbox()
    glyph = canvas.crop(box)
    target = rng.uniform(16, 20)
    scale = target / max(glyph.size)
    glyph = glyph.resize(
        (max(1, round(glyph.size[0] * scale)), max(1, round(glyph.size[1] * scale))), Image.Resampling.LANCZOS
    )
    glyph = glyph.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR, expand=True)
    out = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    dx, dy = rng.integers(-2, 3, size=2)
    out.paste(glyph, ((IMAGE_SIZE - glyph.size[0]) // 2 + int(dx), (IMAGE_SIZE - glyph.size[1]) // 2 + int(dy)))
    return np.asarray(out, dtype=np.uint8)


def font_letters(
    seed: int = 0, data_root: str | None = None, download: bool = False, font_dirs=FONT_DIRS
) -> FewShotTask:
    """Feature-level shift: the 26 capital letters rendered from installed fonts, split by font family."""
    families = font_families(font_dirs)
    if len(families) < 6:
        raise FileNotFoundError(
            f"font-letters needs at least 6 font families under {', '.join(font_dirs)}, "
            f"found {len(families)}: install fonts-dejavu-core, fonts-liberation, "
            "fonts-freefont-ttf"
        )
    rng = np.random.default_rng(seed)
    names = sorted(families)
    order = [names[i] for i in rng.permutation(len(names))]
    n_test = round(0.4 * len(order))
    family_split = {"train": sorted(order[n_test:]), "test": sorted(order[:n_test])}
    shots = 10
    per_class = {"train": shots + _val_count(shots), "test": 40}
    letters = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    images, labels, ids = {}, {}, {}
    for s in SPLITS:
        fonts = [f for fam in family_split[s] for f in families[fam]]
        xs, ys, id_s = [], [], []
        for label, char in enumerate(letters):
            picks = rng.choice(len(fonts), size=per_class[s], replace=per_class[s] > len(fonts))
            for j, k in enumerate(picks):
                xs.append(_render_glyph(char, fonts[k], rng))
                ys.append(label)
                id_s.append(f"font/{Path(fonts[k]).name}/{char}/{j}")
        images[s] = torch.from_numpy(np.stack(xs))
        labels[s] = torch.tensor(ys, dtype=torch.long)
        ids[s] = id_s
    desc = (
        "capital letters A-Z rendered from the Debian TrueType fonts (random size 16-20 px, rotation "
        "+-12 deg, shift +-2 px); font families split between the train pool and the test split: "
        + "; ".join(f"{s}: {', '.join(sorted(family_split[s]))}" for s in SPLITS)
    )
    return FewShotTask(
        "font-letters",
        "feature",
        desc,
        letters,
        images,
        labels,
        ids,
        seed,
        shots,
        info={"font_families": family_split},
        hflip=False,
    )


# ---------------------------------------------------------------------- registry
#: name -> task builder(seed=0, data_root=None, download=False) (digits and letters need no files to fetch).
TASKS: dict[str, Callable[..., FewShotTask]] = {
    "fmnist-invert": fmnist_invert,
    "fmnist-noise": fmnist_noise,
    "fmnist-blur": fmnist_blur_contrast,
    "digits": digits,
    "font-letters": font_letters,
    "fmnist-pairs": fmnist_pairs,
}


def task_names() -> list[str]:
    return list(TASKS)


def build_task(name: str, seed: int = 0, data_root: str | None = None, download: bool = False) -> FewShotTask:
    """Build a task by name (``offline:`` prefix allowed); ``download`` lets torchvision fetch
    Fashion-MNIST into ``data_root`` when neither it nor the Debian package has the files."""
    if name.startswith("offline:"):
        name = name.split(":", 1)[1]
    if name not in TASKS:
        raise KeyError(f"unknown offline task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name](seed=seed, data_root=data_root, download=download)


def _register(name: str) -> None:
    def build(
        root: str | None = None, *, download: bool = False, input: ModelInput | None = None, augment: str = "light"
    ) -> DatasetSplits:
        data_root = root if root and Path(root).is_dir() else None
        return build_task(name, data_root=data_root or (root if download else None), download=download).splits(
            input, augment
        )

    build.__doc__ = (TASKS[name].__doc__ or "").strip().split("\n")[0]
    DATASETS.register(f"offline:{name}")(build)


for _name in TASKS:
    _register(_name)


def _folder_name(label: int, name: str) -> str:
    return f"{label:02d}_{re.sub(r'[^A-Za-z0-9+]+', '_', name).strip('_')}"


def export_image_folder(
    task: FewShotTask | str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    data_root: str | None = None,
    download: bool = False,
) -> Path:
    """Write ``task`` as ``out_dir/{train,test}/<NN_class>/<i>.png`` plus ``task.json``.

    ``train/`` is the pool of few shots + validation images: runs carve the validation set
    out of it with ``--val-fraction`` (``task.json`` records the value). Class folders are numbered so that
    ``torchvision.datasets.ImageFolder``'s sorted order
    gives the task's label order. Returns ``out_dir``.
    """
    from PIL import Image

    if isinstance(task, str):
        task = build_task(task, seed=seed, data_root=data_root, download=download)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        manifest = out / "task.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") == task.fingerprint():
            return out  # already exported, identical
        raise FileExistsError(
            errno.EEXIST,
            f"not empty and not an export of task {task.name!r} (seed {task.seed}); choose an empty directory",
            str(out),
        )
    folders = [_folder_name(i, c) for i, c in enumerate(task.classes)]
    for s in SPLITS:
        for f in folders:
            (out / s / f).mkdir(parents=True, exist_ok=True)
        for i, (x, y) in enumerate(zip(task.images[s], task.labels[s].tolist())):
            Image.fromarray(x.numpy()).save(out / s / folders[y] / f"{i:05d}.png")
    manifest = {
        "task": task.name,
        "shift": task.shift,
        "seed": task.seed,
        "description": task.description,
        "classes": task.classes,
        "class_folders": folders,
        "sizes": task.sizes(),
        "shots_per_class": task.shots,
        "val_fraction": task.val_fraction,
        "hflip_preserves_label": task.hflip,
        "info": task.info,
        "fingerprint": task.fingerprint(),
    }
    (out / "task.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out
