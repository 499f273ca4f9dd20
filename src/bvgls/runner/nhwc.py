"""The channels-last (NHWC) policy that every training path follows (the runner, probes,
the benchmark's source-model pretraining): NHWC only where it is asked for and safe.

Not safe: on CPU, oneDNN's weight gradient of a 1x1 strided convolution with 4-15 input
channels in NHWC can crash the whole process (double free / segfault, torch 2.14; reached by
oneDNN's AVX2 kernels, e.g. on AMD EPYC, and on any x86 CPU with ``ONEDNN_MAX_CPU_ISA=AVX2``;
uxlfoundation/oneDNN#6035). A native crash cannot be caught, so the model is checked before
its first backward.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["apply_channels_last", "channels_last_refusal", "nhwc_crash_hazard"]


def nhwc_crash_hazard(model: nn.Module) -> str | None:
    """The name of the first 1x1 strided convolution with 4-15 input channels; None if none."""
    for name, mod in model.named_modules():
        if (
            isinstance(mod, nn.Conv2d)
            and mod.kernel_size == (1, 1)
            and max(mod.stride) > 1
            and 3 < mod.in_channels < 16
        ):
            return name
    return None


def channels_last_refusal(model: nn.Module, device: torch.device) -> str | None:
    """Why ``model`` must not train in NHWC on ``device`` (None: it may)."""
    hazard = nhwc_crash_hazard(model) if torch.device(device).type == "cpu" else None
    if hazard is None:
        return None
    return (
        f"on CPU, oneDNN's weight gradient of 1x1 strided convolutions with fewer than 16 input channels "
        f"({hazard}) can crash the process (uxlfoundation/oneDNN#6035)"
    )


def apply_channels_last(model: nn.Module, device: torch.device, requested: bool) -> tuple[bool, str | None]:
    """Put ``model`` in NHWC if ``requested`` and safe on ``device``. Returns whether it is
    on, and the reason when a request was refused (the caller reports it its own way)."""
    refusal = channels_last_refusal(model, device) if requested else None
    if requested and refusal is None:
        model.to(memory_format=torch.channels_last)
        return True, None
    return False, refusal
