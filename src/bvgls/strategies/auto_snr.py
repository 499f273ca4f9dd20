"""Auto-SNR from surgical finetuning (Lee et al., "Surgical Fine-Tuning Improves
Adaptation to Distribution Shifts", ICLR 2023), registered as ``auto-snr``.

It re-implements the ``eb-criterion`` branch of the authors' script
(anniesch/surgical-finetuning, ``main.py`` at commit effeec3): the statistic of
``get_lr_weights`` / ``get_grad_norms`` (lines 44-82, the criterion at lines 68-70)
and the weights of ``main`` (lines 233-255). For every parameter tensor with
mini-batch gradient ``g`` (shape ``[n, ...]``)::

    SNR(g) = mean over all elements of  g^2 / (var_0(g) + 1e-8)
    score_i = mean of SNR(g_i) over the mini-batches of a refresh window (authors: 5)
    w_i     = 1 if score_i >= threshold (authors: 0.95) else 0
    lr_i    = w_i * lr

``var_0`` is the unbiased variance (``torch.var`` default) along the tensor's *first*
dimension (output channels / rows), broadcast back over that dimension; for a 1-D
bias it is the variance of all its elements. So the "signal" is a gradient element
and the "noise" is the spread of the gradient across output channels within one
mini-batch, not across examples or batches. The weights are a hard 0/1 threshold of
the raw score, not a normalisation by the maximum (that is Auto-RGN, lines 218-223).

Since ``mean_rows(g^2) = m^2 + (n-1)/n s^2`` for a column with mean ``m`` and unbiased
variance ``s^2``, the score is about ``(n-1)/n + mean_columns(m^2 / s^2)`` while
``s^2 >> 1e-8``: for ``n >= 20`` rows it is at least ~0.95 whatever the gradient, and
the threshold then mostly switches off tensors whose gradients are so small that the
``1e-8`` dominates. That is the authors' criterion; bvgls keeps it as is.

Edge cases, as in the authors' code:

* A tensor whose first dimension has size 1 (``[1, d]`` heads, ViT ``cls_token``) or
  a 0-d scalar has no variance (``torch.var`` gives NaN, and ``NaN < 0.95`` is false):
  weight 1 whenever it has a gradient in the window. Its score reads NaN.
* Normalisation layers: the authors leave every parameter whose name contains "bn"
  out of the optimizer (frozen). ``norm="freeze"`` (default) gives every normalisation
  layer weight 0 and does not measure it; ``norm="snr"`` treats them like any tensor.
  They are found exactly as :class:`~bvgls.peers.AutoRGN` finds them (``norm_params``,
  ``model`` by module type, or the parameter names of a ``LayerGroups``).

Differences from the authors' script (the same as for ``auto-rgn``, whose refresh
machinery this class inherits): the authors score 5 extra mini-batches at the start
of every epoch (no update) and re-create the optimizer; here the first ``batches``
training steps of each epoch are scored, each of them stepping with the weights of
the average so far, and the optimizer state is kept. A tensor with no gradient in a
whole window gets weight 0; a non-finite score (from a non-finite gradient) is left
out of the average. Tensors with weight 0 step with learning rate 0 (the authors'
``lr = 0.0`` param groups: Adam moments still advance); ``skip=True`` leaves them out.

The window sums live in the state inherited from ``AutoRGN`` (``rgn_sum`` /
``rgn_count`` hold SNR sums and counts here; ``saturated`` marks the tensors without
a variance), so checkpoints resume exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..base import GroupsSpec
from . import register_strategy
from .peers import AutoRGN

__all__ = ["AutoSNR"]


class AutoSNR(AutoRGN):
    """Auto-SNR (surgical finetuning's ``eb-criterion``): per-tensor learning-rate
    weight 1 if the tensor's gradient signal-to-noise score reaches ``threshold``,
    else 0. See the module docstring for the exact formula and its sources.

    Args:
        threshold: minimum mean score for weight 1 (authors: 0.95); a number >= 0.
        options: the keyword options of :class:`~bvgls.peers.AutoRGN`, with its defaults:
            ``refresh`` (``"epoch"``, needs ``on_epoch_start``; ``"step"`` or a number of steps),
            ``batches`` (mini-batches averaged per refresh window; authors: 5), ``norm``
            (``"freeze"``, the authors', or ``"snr"``), ``model`` and ``norm_params`` (where to find
            the normalisation layers), ``skip_unselected`` (tensors with weight 0 skip the
            optimizer step entirely).
    """

    NORM_MODES = ("freeze", "snr")
    #: added to the variance, as in the authors' ``get_grad_norms``
    EPS = 1e-8

    def __init__(
        self, optimizer: torch.optim.Optimizer, groups: GroupsSpec = None, *, threshold: float = 0.95, **options
    ):
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)
            or threshold < 0
        ):
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        self.threshold = float(threshold)
        super().__init__(optimizer, groups, **options)

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "threshold": self.threshold}

    @classmethod
    def snr(cls, grad: torch.Tensor) -> torch.Tensor:
        """The score of one gradient tensor (at least float32): mean of g^2 / (var_0 + eps)."""
        g = grad.detach().to(torch.promote_types(grad.dtype, torch.float32))
        return (g * g / (torch.var(g, dim=0, keepdim=True) + cls.EPS)).mean()

    @staticmethod
    def has_variance(param: torch.Tensor) -> bool:
        """False for 0-d tensors and tensors whose first dimension has size 1."""
        return param.dim() > 0 and param.shape[0] > 1

    @torch.no_grad()
    def _measure(self) -> None:
        """Add this step's scores to the window's sums (one device-to-host transfer)."""
        idx = [i for i, p in enumerate(self.params) if self._measured[i] and p.grad is not None]
        if any(self.params[i].grad.is_sparse for i in idx):
            raise ValueError("AutoSNR does not support sparse gradients")
        scored = [i for i in idx if self.has_variance(self.params[i])]
        for i in idx:
            if not self.has_variance(self.params[i]):
                self._saturated[i] = True  # no variance (NaN in the authors' code): weight 1
        if not scored:
            return
        device = self.params[scored[0]].grad.device
        scores = torch.stack([self.snr(self.params[i].grad).to(device, torch.float32) for i in scored])
        scores = scores.to(torch.float64).cpu()
        finite = torch.isfinite(scores)
        index = torch.tensor(scored, dtype=torch.long)[finite]
        self._rgn_sum.index_add_(0, index, scores[finite])
        self._rgn_count.index_add_(0, index, torch.ones(len(index), dtype=torch.float64))

    def _weights(self) -> list[float]:
        on = (self._rgn_count > 0) & (self._mean_scores() >= self.threshold)
        return (on | self._saturated).to(torch.float64).tolist()

    def _mean_scores(self) -> torch.Tensor:
        return self._rgn_sum / self._rgn_count.clamp_min(1.0)

    @property
    def scores(self) -> list[float]:
        """Per tensor (``params`` order): the mean score of the current window so far;
        NaN where nothing was scored (no gradient, no variance, frozen norm layer)."""
        return torch.where(self._rgn_count > 0, self._mean_scores(), math.nan).tolist()

    def __repr__(self) -> str:
        return (
            f"AutoSNR(refresh={self.refresh!r}, batches={self.batches}, threshold={self.threshold}, "
            f"norm={self.norm!r}, norm_params={self.norm_param_count}, groups={self.num_groups}, "
            f"steps={self.num_steps})"
        )


@register_strategy(
    "auto-snr",
    needs_all_gradients=True,
    help="Auto-SNR (surgical finetuning, eb-criterion): per-tensor lr weight 1 if "
    "mean(g^2 / (var over dim 0 + 1e-8)) >= threshold else 0; options refresh=epoch|step|N, "
    "batches=5, threshold=0.95, norm=freeze|snr, skip=False",
)
def _auto_snr(optimizer, groups=None, refresh="epoch", batches=5, threshold=0.95, norm="freeze", skip=False):
    return AutoSNR(
        optimizer, groups, refresh=refresh, batches=batches, threshold=threshold, norm=norm, skip_unselected=skip
    )
