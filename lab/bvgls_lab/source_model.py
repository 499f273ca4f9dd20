"""The offline source model ``fmnist-resnet``: a small ResNet pretrained on Fashion-MNIST.

The paper finetunes ImageNet-pretrained WideResNet-50-2. Neither ImageNet weights nor
the paper's target sets can be had offline, so the project pretrains its own source
model: a ResNet with exactly the paper's six layer groups (``conv1``/``bn1`` stem,
``layer1``..``layer4``, ``fc``; one torchvision ``BasicBlock`` per stage), trained on the
Fashion-MNIST *train* split only. The checkpoint ships in ``bvgls_lab/assets`` with its
SHA-256 (checked on every load); :func:`pretrain` is the seeded recipe that made it::

    bvgls-lab pretrain --out fmnist_resnet.pt --epochs 8 --seed 0 --threads 1   # ~13 min, one CPU thread

Fashion-MNIST is read from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/*.gz``) when present, else from a torchvision
download, but only when asked for (``download=True``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from bvgls.registry import MODELS, ModelInput
from bvgls.runner.data import FASHION_MNIST_CLASSES, read_fashion_mnist
from bvgls.runner.nhwc import apply_channels_last

from .pretrained.assets import ChecksumError  # noqa: F401  (raised here for a damaged checkpoint)
from .pretrained.assets import sha256_file as file_sha256

logger = logging.getLogger(__name__)

#: Fashion-MNIST's train-split pixel mean / std (of values in [0, 1]).
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
FMNIST_INPUT = ModelInput(size=28, channels=1, mean=FMNIST_MEAN, std=FMNIST_STD)
FMNIST_CLASSES = FASHION_MNIST_CLASSES

ASSET_DIR = Path(__file__).resolve().parent / "assets"
CHECKPOINT_NAME = "fmnist_resnet.pt"
#: SHA-256 of the shipped ``assets/fmnist_resnet.pt`` (made by ``bvgls-lab pretrain``, see docs/experiments/offline.md).
CHECKPOINT_SHA256 = "70b3a30be710cbfff2971522474acbfa8a02cdcb48cd44df83397fc6a4d309ca"

DEFAULT_WIDTHS = (32, 64, 128, 256)


# ---------------------------------------------------------------------- model
def _stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    from torchvision.models.resnet import BasicBlock

    downsample = None
    if stride != 1 or in_ch != out_ch:
        downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
    return nn.Sequential(
        BasicBlock(in_ch, out_ch, stride, downsample), *[BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
    )


class FMNISTResNet(nn.Module):
    """ResNet for 28x28 grayscale images with the paper's six groups.

    A stride-2 3x3 stem (28 -> 14 pixels; the cheap stand-in for ImageNet ResNets'
    7x7/2 conv + max-pool), four stages of ``blocks`` torchvision BasicBlocks
    (14, 7, 4, 2 pixels), global average pooling and a linear head. With the default
    widths (32, 64, 128, 256) it has 1.2 M parameters, enough to overfit a few hundred
    images, and trains at ~900 images/s on one CPU core (channels_last).
    """

    def __init__(
        self, num_classes: int = 10, widths: tuple[int, ...] = DEFAULT_WIDTHS, blocks: int = 1, in_channels: int = 1
    ):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"widths must have 4 entries (one per stage), got {widths}")
        self.widths, self.blocks = tuple(int(w) for w in widths), int(blocks)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(widths[0], widths[0], blocks, 1)
        self.layer2 = _stage(widths[0], widths[1], blocks, 2)
        self.layer3 = _stage(widths[1], widths[2], blocks, 2)
        self.layer4 = _stage(widths[2], widths[3], blocks, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.bvgls_input = FMNIST_INPUT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def load_source_checkpoint(path: str | os.PathLike, sha256: str | None = None) -> dict:
    """Read a checkpoint written by :func:`pretrain`, verifying its SHA-256 when given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"fmnist-resnet checkpoint {path} does not exist; make one with `bvgls-lab pretrain --out {path}`"
        )
    if sha256 is not None:
        actual = file_sha256(path)
        if actual != sha256:
            raise ChecksumError(
                f"checkpoint {path} has SHA-256 {actual}, expected {sha256}: the file is "
                "damaged or was replaced. Reinstall the lab, or re-create it with "
                "`bvgls-lab pretrain` (see docs/experiments/offline.md) and pass its path as weights."
            )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not an fmnist-resnet checkpoint (no 'state_dict' entry)")
    return ckpt


@MODELS.register(
    "fmnist-resnet",
    help="6-group ResNet (1.2 M params) for 28x28 grey input, pretrained on "
    "Fashion-MNIST train (shipped checkpoint, SHA-256 verified)",
)
def build_fmnist_resnet(
    num_classes: int, weights: str | None = None, *, checkpoint_sha256: str | None = None
) -> FMNISTResNet:
    """``fmnist-resnet``: 6-group ResNet for 28x28 grayscale input, pretrained on Fashion-MNIST train.

    Args:
        num_classes: classes of the new head (a fresh ``nn.Linear`` replaces the source head).
        weights: ``None`` / ``"none"``: random init; ``"DEFAULT"`` / ``"fmnist"``: the shipped
            checkpoint (SHA-256 verified); any other string: the path of a checkpoint
            written by ``bvgls-lab pretrain`` (verified only if ``checkpoint_sha256`` is given).
    """
    if weights is None or str(weights).lower() == "none":
        return FMNISTResNet(num_classes)
    if str(weights).upper() == "DEFAULT" or str(weights).lower() == "fmnist":
        ckpt = load_source_checkpoint(ASSET_DIR / CHECKPOINT_NAME, CHECKPOINT_SHA256)
    else:
        ckpt = load_source_checkpoint(weights, checkpoint_sha256)
    config = ckpt.get("config", {})
    model = FMNISTResNet(
        int(config.get("num_classes", 10)), tuple(config.get("widths", DEFAULT_WIDTHS)), int(config.get("blocks", 1))
    )
    model.load_state_dict(ckpt["state_dict"])
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


# ---------------------------------------------------------------------- pretraining
def speed_up_cpu() -> None:
    """Flush denormals to zero: small CNNs on CPU train several times faster (measured 4-5x
    together with channels_last), and the weights are unaffected at float32 precision."""
    torch.set_flush_denormal(True)


def evaluate_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy (%) of ``model`` on normalised float images."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].contiguous(memory_format=torch.channels_last)  # forward only: no hazard
            correct += (model(x).argmax(1) == labels[i : i + batch_size]).sum().item()
    return 100.0 * correct / len(images)


def _normalise(images_u8: torch.Tensor) -> torch.Tensor:
    return ((images_u8.float() / 255.0 - FMNIST_MEAN[0]) / FMNIST_STD[0]).unsqueeze(1)


def _augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels and horizontal flip, per image (seeded)."""
    n, _, h, w = x.shape
    background = -FMNIST_MEAN[0] / FMNIST_STD[0]  # a black pixel, normalised
    padded = nn.functional.pad(x, (pad, pad, pad, pad), value=background)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def pretrain(
    out: str | os.PathLike,
    *,
    epochs: int = 8,
    batch_size: int = 128,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    seed: int = 0,
    widths: tuple[int, ...] = DEFAULT_WIDTHS,
    blocks: int = 1,
    data_root: str | None = None,
    download: bool = False,
    threads: int | None = None,
) -> dict:
    """Pretrain ``fmnist-resnet`` on the Fashion-MNIST train split and save it to ``out``.

    Recipe: SGD (momentum 0.9, Nesterov, weight decay 5e-4 except BN/bias), batch 128,
    one-cycle schedule peaking at ``lr`` (cosine anneal), random +-2 px translation and
    horizontal flip, ``epochs`` epochs, seeded. The test split is used only to report the
    final source accuracy. Returns the metadata saved with the weights (accuracy, time,
    SHA-256 of the written file).
    """
    speed_up_cpu()
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    (train_x, train_y), (test_x, test_y) = (_split(name, data_root, download) for name in ("train", "test"))

    model = FMNISTResNet(10, widths, blocks)
    # the runner's channels-last policy: NHWC only where oneDNN's backward cannot crash
    channels_last, _ = apply_channels_last(model, torch.device("cpu"), True)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    steps_per_epoch = len(train_x) // batch_size
    optimizer, scheduler = _source_optimizer(model, lr, weight_decay, epochs * steps_per_epoch)
    start = time.time()
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        batches = [order[step * batch_size : (step + 1) * batch_size] for step in range(steps_per_epoch)]
        loss = _train_epoch(model, optimizer, scheduler, train_x, train_y, batches, generator, memory_format)
        acc = evaluate_accuracy(model, test_x, test_y)
        logger.info(
            f"epoch {epoch + 1}/{epochs}  train loss {loss:.4f}  "
            f"source test accuracy {acc:.2f}%  ({time.time() - start:.0f} s)"
        )
    runtime = time.time() - start
    recipe = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed}
    meta = {
        "recipe": {**recipe, "schedule": "OneCycleLR(pct_start=0.15)", "augment": "translate2+hflip"},
        "source_test_accuracy": acc,
        "runtime_s": round(runtime, 1),
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "channels_last": channels_last,
    }
    out = Path(out)
    _save_source_checkpoint(out, model.to(memory_format=torch.contiguous_format), widths, blocks, meta)
    meta["sha256"] = file_sha256(out)
    logger.info(f"saved {out}  sha256 {meta['sha256']}  source test accuracy {acc:.2f}%  runtime {runtime:.0f} s")
    return meta


def _split(name: str, data_root: str | None, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A Fashion-MNIST split: normalised float images (N, 1, 28, 28) and their labels."""
    images, labels = read_fashion_mnist(name, data_root, download)
    return _normalise(images), labels


def _source_optimizer(model: nn.Module, lr: float, weight_decay: float, total_steps: int):
    """Nesterov SGD with weight decay on the weights only (not on BN parameters and biases), and
    its one-cycle schedule peaking at ``lr`` over ``total_steps`` steps."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
        nesterov=True,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.15)
    return optimizer, scheduler


def _train_epoch(model, optimizer, scheduler, images, labels, batches, generator, memory_format) -> float:
    """One epoch over the index tensors ``batches`` (each image augmented, seeded by ``generator``);
    the mean training loss."""
    model.train()
    total = 0.0
    for idx in batches:
        x = _augment(images[idx], generator).contiguous(memory_format=memory_format)
        loss = nn.functional.cross_entropy(model(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item()
    return total / len(batches)


def _save_source_checkpoint(out: Path, model: nn.Module, widths, blocks: int, meta: dict) -> None:
    """The weights, the architecture and ``meta`` in ``out``, written atomically."""
    ckpt = {
        "state_dict": {k: v.contiguous() for k, v in model.state_dict().items()},
        "config": {"num_classes": 10, "widths": list(widths), "blocks": blocks},
        "meta": meta,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, out)
