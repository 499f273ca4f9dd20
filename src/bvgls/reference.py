"""A naive, per-parameter implementation of the method's formula (docs/method.md), kept as the baseline.

It is written the way the formula reads (and the way the authors' code is organised):
two per-element EMA buffers per tensor, a Python loop over parameters and a
host sync (``.item()``) per tensor. Tests compare :class:`bvgls.BVGLS` against it and
``benchmarks/selector.py`` measures both side by side. Do not use it for training.
"""

from __future__ import annotations

import torch


class NaiveBVR:
    """Per-group bias-variance ratios, straight from the formula."""

    def __init__(self, groups: list[list[torch.Tensor]], alpha: float = 0.9, eps: float = 1e-10):
        self.groups = groups
        self.alpha = alpha
        self.eps = eps
        self.state: dict[int, dict] = {}

    @torch.no_grad()
    def update(self) -> list[float]:
        a = self.alpha
        ratios = []
        for params in self.groups:
            bias = variance = 0.0
            present = False
            for p in params:
                if p.grad is None:
                    continue
                present = True
                st = self.state.setdefault(id(p), {"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
                st["t"] += 1
                st["m"].mul_(a).add_(p.grad, alpha=1 - a)
                st["v"].mul_(a).addcmul_(p.grad, p.grad, value=1 - a)
                m_hat = st["m"] / (1 - a ** st["t"])
                v_hat = st["v"] / (1 - a ** st["t"])
                bias += (m_hat**2).sum().item()
                variance += (v_hat - m_hat**2).sum().item()
            ratios.append(bias / max(variance, self.eps) if present else float("nan"))
        return ratios

    def select(self, k: int = 1) -> list[int]:
        ratios = self.update()
        order = sorted((i for i, r in enumerate(ratios) if r == r), key=lambda i: -ratios[i])
        return sorted(order[:k])
