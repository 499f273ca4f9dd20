"""Layer-selection strategies from the literature, on the same layer groups as BVG-LS.

So that ``bvgls compare`` can answer "should I use BVG-LS for my data?", the peers of
the paper run in the same engine (:class:`~bvgls.base.GroupStrategy`): same groups,
same optimizer, same budget. Registered spec strings (options after colons):

=====================  ==============================================================
``auto-rgn``           Auto-RGN, surgical finetuning (Lee et al., ICLR 2023)
``lisa``               LISA, layerwise importance sampling (Pan et al., NeurIPS 2024)
``bcd-cyclic``         block coordinate descent as in BAdam (Luo et al., NeurIPS 2024)
``gradual-unfreeze``   gradual unfreezing, ULMFiT (Howard & Ruder, ACL 2018)
``llrd``               layer-wise learning-rate decay, BEiT / timm (Bao et al., ICLR 2022)
=====================  ==============================================================

Every strategy keeps its whole state (step counters, active set, random generator,
RGN averages) in ``state_dict()``, so a resumed run makes the same choices as an
uninterrupted one.

``lisa``, ``bcd-cyclic`` and ``gradual-unfreeze`` freeze for real by default
(``freeze=True``, the lean mode of :mod:`bvgls.base`; their sources freeze layers): the
groups the next step does not update get ``requires_grad=False`` as soon as the
current step ends, so backward computes no gradient for them and stops below the
lowest active group. ``freeze`` defaults to the value of ``skip``; ``freeze=False``
keeps every gradient (the groups then only skip the optimizer step), and
``skip=False`` (learning-rate-0 steps, which need the gradients) implies it. Strategies that act per epoch need the
training loop to call
``strategy.on_epoch_start(epoch)`` (0-based); calling it again with the same epoch
number (e.g. after resuming mid-epoch) does nothing. See ``docs/strategies.md``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..base import GroupsSpec, GroupStrategy
from . import register_strategy

__all__ = [
    "AutoRGN",
    "BlockCoordinateDescent",
    "GradualUnfreezing",
    "LISA",
    "LayerwiseLRDecay",
    "normalization_parameters",
]


# ---------------------------------------------------------------------- option checks
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _freeze_option(freeze: Any, skip: bool) -> bool:
    """``freeze`` defaults to ``skip``; freezing without skipping is contradictory."""
    if freeze is None:
        return skip
    freeze = _flag("freeze", freeze)
    if freeze and not skip:
        raise ValueError(
            "freeze=True needs skip=True: a frozen group has no gradient, so it cannot take the "
            "learning-rate-0 step that skip=False asks for"
        )
    return freeze


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"seed must be a non-negative integer, got {value!r}")
    return value


class _PeerStrategy(GroupStrategy):
    """Shared plumbing: the epoch counter, option checks on resume, 0/1 scales, and the state of
    the random draws (``_rng``, when a strategy has one) and of :attr:`_state_fields`."""

    #: the attributes a strategy's state dict holds besides the shared ones, each with the function
    #: that turns a saved value back into the attribute's (lists are saved as copies)
    _state_fields: dict[str, Callable[[Any], Any]] = {}

    def __init__(self, optimizer, groups, *, skip_unselected: bool):
        super().__init__(optimizer, groups, skip_unselected=skip_unselected)
        self.epoch: int | None = None  # last epoch passed to on_epoch_start
        # groups that hold trainable parameters: the ones worth activating
        self.nonempty_groups = [i for i, ps in enumerate(self.group_params) if ps]
        if not self.nonempty_groups:
            raise ValueError(f"{type(self).__name__}: every group is empty (groups: {self.group_names})")

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "freeze": self.lean}

    def _binary(self, active: Iterable[int]) -> list[float]:
        scales = [0.0] * self.num_groups
        for i in active:
            scales[i] = 1.0
        return scales

    def on_epoch_start(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        if epoch == self.epoch:
            return  # a resumed run announcing the epoch it is already in
        self.epoch = epoch
        self._epoch_started(epoch)

    def _epoch_started(self, epoch: int) -> None:
        """Subclass hook: a new epoch begins."""

    def _ensure_plan(self) -> None:
        """Make the active set that of step ``num_steps`` (idempotent: draws happen once per
        window, in order, whether called when the previous step ends or when this one runs)."""

    def _active(self) -> list[int]:
        """The groups step ``num_steps`` updates (after :meth:`_ensure_plan`)."""
        raise NotImplementedError

    def _upcoming_active(self):
        self._ensure_plan()
        return self._active()

    def _plan(self) -> list[float]:
        """Scale 1 for the groups step ``num_steps`` updates, 0 for the others."""
        return self._binary(self._upcoming_active())

    def _step_finished(self) -> None:
        if self.lean:
            self._ensure_plan()  # plan the next step now, so its frozen groups are known before its forward

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["epoch"] = self.epoch
        if hasattr(self, "_rng"):
            state["rng"] = self._rng_state(self._rng)
        for name in self._state_fields:
            value = getattr(self, name)
            state[name] = list(value) if isinstance(value, list) else value
        return state

    def _check_state(self, state: Mapping[str, Any]) -> None:
        super()._check_state(state)
        if "epoch" not in state:
            raise ValueError("state_dict lacks epoch (not a state of this bvgls version)")

    def _set_state(self, state: Mapping[str, Any]) -> None:
        super()._set_state(state)
        self.epoch = None if state["epoch"] is None else int(state["epoch"])
        if hasattr(self, "_rng"):
            self._rng.set_state(state["rng"].clone())
        for name, restore in self._state_fields.items():
            setattr(self, name, restore(state[name]))

    def _rng_state(self, rng: torch.Generator) -> torch.Tensor:
        return rng.get_state().clone()


# ---------------------------------------------------------------------- Auto-RGN
_NORM_TYPES: tuple[type, ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
    )
    if t is not None
)
# module-path components that name a normalisation layer in torchvision / timm / transformers
_NORM_COMPONENT = re.compile(r"(?:bn|ln|gn)(?:_?\d+|_?f)?|.*_bn\d*|.*norm.*", re.IGNORECASE)


def is_normalization_type(cls: type) -> bool:
    """Is ``cls`` a normalisation layer class (see :func:`normalization_parameters`)?"""
    return issubclass(cls, _NORM_TYPES) or "norm" in cls.__name__.lower()


def normalization_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the normalisation layers of ``model`` (BatchNorm, LayerNorm,
    GroupNorm, InstanceNorm, RMSNorm, and any module whose class name contains "Norm",
    such as timm's ``LayerNorm2d`` or a transformers ``*RMSNorm``)."""
    out, seen = [], set()
    for module in model.modules():
        if is_normalization_type(type(module)):
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def _norm_names(named: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Name heuristic for when only parameter names are known (a ``LayerGroups`` without
    ``module_types``): the
    parameters of modules named like ``bn1``, ``norm1``, ``ln_2``, ``LayerNorm``, ``ln_f``
    or torchvision's ``downsample.1`` whose parameters are all vectors (a normalisation
    layer has only 1-D weights and biases; a conv called ``downsample.1`` does not)."""
    modules: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, p in named:
        modules.setdefault(name.rpartition(".")[0], []).append((name, p))
    out = set()
    for path, items in modules.items():
        parts = path.split(".")
        named_like_norm = parts[-2:] == ["downsample", "1"] or any(_NORM_COMPONENT.fullmatch(c) for c in parts)
        if named_like_norm and all(p.dim() == 1 for _, p in items):
            out.update(name for name, _ in items)
    return out


class AutoRGN(_PeerStrategy):
    """Auto-RGN from surgical finetuning (Lee et al., "Surgical Fine-Tuning Improves
    Adaptation to Distribution Shifts", ICLR 2023).

    Every parameter tensor ``i`` trains with its own learning-rate weight::

        RGN_i = ||g_i|| / ||theta_i||          (relative gradient norm)
        w_i   = RGN_i / max_j RGN_j            (so the most-moving tensor gets the full lr)
        lr_i  = w_i * lr

    ``RGN_i`` is the mean over the mini-batches of a *refresh window*. The authors
    recompute it at the start of every epoch from the first 5 mini-batches (extra
    forward/backward passes at the epoch's starting weights, then re-create the
    optimizer); here it is averaged over the training steps themselves, so no extra
    passes are needed:

    * ``refresh="epoch"`` (default): a window opens at every ``on_epoch_start``; during
      its first ``batches`` steps each step's RGN is added to the average and the
      weights of that step come from the average so far; after that the weights stay
      fixed until the next epoch. Without ``on_epoch_start`` calls the whole run is
      one epoch (the weights of the first ``batches`` steps are kept).
    * ``refresh=N`` (an int): a window opens every ``N`` steps, averaging over its
      first ``min(batches, N)`` steps.
    * ``refresh="step"``: every step uses its own RGN (no averaging).

    Normalisation layers (``norm``): the authors leave every parameter whose name
    contains "bn" out of the optimizer, so BatchNorm weights and biases keep their
    pretrained values. ``norm="freeze"`` (default) does the same for all normalisation
    layers (weight 0, left out of the max); ``norm="rgn"`` treats them like any other
    tensor. They are found from ``norm_params`` if given, else from ``model`` (by
    module type), else from a :class:`~bvgls.LayerGroups` built by ``layer_groups``
    (by the module types it records, ``module_types``; the runner's path), else from the
    parameter names of groups (a name heuristic, see :func:`_norm_names`);
    ``norm_param_count`` says how many.

    Zero-norm tensors (``||theta_i|| = 0``, e.g. a zero-initialised bias or a
    zero-init residual gamma) have an unbounded RGN: they get ``w_i = 1`` while their
    gradient is non-zero and are left out of the max, so they cannot squash every
    other weight to 0. A tensor without a gradient during a whole window gets 0.

    ``scales`` (and so the selection heatmap) reports, per group, the mean weight of
    its tensors; ``tensor_weights`` holds the per-tensor weights of the last step.
    Unlike the authors' script, the optimizer (and its momentum / Adam state) is not
    re-created each epoch.

    Args:
        refresh: ``"epoch"``, ``"step"`` or a number of steps (see above).
        batches: mini-batches averaged per refresh window (authors: 5).
        norm: ``"freeze"`` or ``"rgn"``.
        model: the model, to find normalisation layers by module type.
        norm_params: the normalisation parameters, given explicitly.
        skip_unselected: tensors with weight 0 skip the optimizer step entirely
            (default: they step with learning rate 0).
    """

    needs_all_gradients = True
    REFRESH_MODES = ("epoch", "step")
    NORM_MODES = ("freeze", "rgn")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        groups: GroupsSpec = None,
        *,
        refresh: str | int = "epoch",
        batches: int = 5,
        norm: str = "freeze",
        model: nn.Module | None = None,
        norm_params: Iterable[torch.Tensor] | None = None,
        skip_unselected: bool = False,
    ):
        if not (isinstance(refresh, str) and refresh in self.REFRESH_MODES):
            if isinstance(refresh, str):
                raise ValueError(f"refresh must be 'epoch', 'step' or a number of steps, got {refresh!r}")
            _positive_int("refresh (steps between RGN refreshes)", refresh)
        self.refresh = refresh
        self.batches = _positive_int("batches", batches)
        self.norm = _choice("norm", norm, self.NORM_MODES)
        super().__init__(optimizer, groups, skip_unselected=_flag("skip", skip_unselected))
        norm_ids = self._find_norm_params(groups, model, norm_params)
        self.is_norm = [id(p) in norm_ids for p in self.params]
        self.norm_param_count = sum(self.is_norm)
        # tensors whose RGN is measured (frozen normalisation layers are not)
        self._measured = [not (n and self.norm == "freeze") for n in self.is_norm]
        n = len(self.params)
        self._rgn_sum = torch.zeros(n, dtype=torch.float64)
        self._rgn_count = torch.zeros(n, dtype=torch.float64)
        self._saturated = torch.zeros(n, dtype=torch.bool)  # zero-norm tensor with a gradient
        self._window_steps = 0
        self.tensor_weights: list[float] = [0.0] * n

    @staticmethod
    def _find_norm_params(groups, model, norm_params) -> set[int]:
        if norm_params is not None:
            return {id(p) for p in norm_params}
        if model is not None:
            return {id(p) for p in normalization_parameters(model)}
        named = getattr(groups, "groups", None)  # bvgls.LayerGroups: {group: [(name, param)]}
        if isinstance(named, Mapping):
            items = [item for group in named.values() for item in group]
            types = getattr(groups, "module_types", None) or {}
            if all(name in types for name, _ in items):  # built by layer_groups: the module classes are known
                return {id(p) for name, p in items if is_normalization_type(types[name])}
            norm_names = _norm_names(items)
            return {id(p) for name, p in items if name in norm_names}
        return set()

    @property
    def window_size(self) -> int:
        """Steps averaged per refresh window."""
        if self.refresh == "step":
            return 1
        return self.batches if self.refresh == "epoch" else min(self.batches, self.refresh)

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "refresh": self.refresh, "batches": self.batches, "norm": self.norm}

    def _open_window(self) -> None:
        self._rgn_sum.zero_()
        self._rgn_count.zero_()
        self._saturated.zero_()
        self._window_steps = 0

    def _epoch_started(self, epoch: int) -> None:
        if self.refresh == "epoch":
            self._open_window()

    @torch.no_grad()
    def _measure(self) -> None:
        """Add this step's relative gradient norms to the window's average."""
        idx = [i for i, p in enumerate(self.params) if self._measured[i] and p.grad is not None]
        if not idx:
            return
        grads = [self.params[i].grad for i in idx]
        if any(g.is_sparse for g in grads):
            raise ValueError("AutoRGN does not support sparse gradients")
        weights = [self.params[i].detach() for i in idx]
        device = weights[0].device
        norms = torch.stack([x.to(device, torch.float32) for x in torch._foreach_norm(grads + weights)])
        norms = norms.to(torch.float64).cpu()  # the one device-to-host transfer of a measuring step
        g_norm, p_norm = norms[: len(idx)], norms[len(idx) :]
        index = torch.tensor(idx, dtype=torch.long)
        rgn = torch.where(p_norm > 0, g_norm / p_norm.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        self._rgn_sum.index_add_(0, index, rgn)
        self._rgn_count.index_add_(0, index, torch.ones_like(rgn))
        self._saturated[index] |= (p_norm == 0) & (g_norm > 0)

    def _weights(self) -> list[float]:
        counted = self._rgn_count > 0
        mean = torch.where(counted, self._rgn_sum / self._rgn_count.clamp_min(1.0), 0.0)
        finite = counted & ~self._saturated
        top = mean[finite].max().item() if bool(finite.any()) else 0.0
        w = mean / top if top > 0 else torch.zeros_like(mean)
        w = torch.where(self._saturated, 1.0, w)
        return w.tolist()

    def _plan(self):
        if self.refresh == "step" or (isinstance(self.refresh, int) and self.num_steps % self.refresh == 0):
            self._open_window()
        if self._window_steps < self.window_size:
            self._measure()
            self._window_steps += 1
            self.tensor_weights = self._weights()
        scales = []
        for params, start in zip(self.group_params, self._group_starts()):
            ws = self.tensor_weights[start : start + len(params)]
            scales.append(sum(ws) / len(ws) if ws else 0.0)
        return scales

    def _group_starts(self) -> list[int]:
        starts, s = [], 0
        for ps in self.group_params:
            starts.append(s)
            s += len(ps)
        return starts

    def _tensor_scales(self, group_scales):
        return self.tensor_weights

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            rgn_sum=self._rgn_sum.clone(),
            rgn_count=self._rgn_count.clone(),
            saturated=self._saturated.clone(),
            window_steps=self._window_steps,
            tensor_weights=list(self.tensor_weights),
            is_norm=list(self.is_norm),
        )
        return state

    def _check_state(self, state: Mapping[str, Any]) -> None:
        super()._check_state(state)
        if list(state.get("is_norm", ())) != self.is_norm:
            raise ValueError(
                "state_dict marks other parameters as normalisation layers than this AutoRGN; "
                "build it with the same model / norm_params as the checkpoint"
            )

    def _set_state(self, state: Mapping[str, Any]) -> None:
        super()._set_state(state)
        self._rgn_sum = state["rgn_sum"].to(torch.float64).cpu().clone()
        self._rgn_count = state["rgn_count"].to(torch.float64).cpu().clone()
        self._saturated = state["saturated"].to(torch.bool).cpu().clone()
        self._window_steps = int(state["window_steps"])
        self.tensor_weights = [float(w) for w in state["tensor_weights"]]

    def __repr__(self) -> str:
        return (
            f"AutoRGN(refresh={self.refresh!r}, batches={self.batches}, norm={self.norm!r}, "
            f"norm_params={self.norm_param_count}, groups={self.num_groups}, steps={self.num_steps})"
        )


# ---------------------------------------------------------------------- LISA
class LISA(_PeerStrategy):
    """LISA, Layerwise Importance Sampling (Pan et al., "LISA: Layerwise Importance
    Sampling for Memory-Efficient Large Language Model Fine-Tuning", NeurIPS 2024).

    Every ``K`` steps (steps ``0, K, 2K, ...``) ``gamma`` of the middle groups are drawn
    uniformly at random without replacement; the first group (embedding / stem) and
    the last group (head) are always active::

        active(t) = {0, L-1} + sample(middle, gamma)   redrawn when t mod K == 0

    The middle groups are the non-empty groups ``1 .. L-2``. The draw uses the
    strategy's own ``torch.Generator`` seeded with ``seed`` (saved in ``state_dict``),
    so runs are reproducible and do not disturb the global random state.

    In LISA the inactive layers are frozen (no gradient, no optimizer update), so by
    default (``skip_unselected=True``, ``freeze=True``) they get ``requires_grad=False``
    for the steps they are inactive and skip the optimizer step entirely: no
    momentum / Adam-moment / weight-decay update. ``freeze=False`` keeps their
    gradients (they still skip the step); ``skip_unselected=False`` steps them with
    learning rate 0 instead (the BVG-LS convention; implies ``freeze=False``).

    Args:
        K: steps between two draws (paper: sampling period, default 20).
        gamma: number of middle groups active at a time (paper default 2).
        seed: seed of the draws.
        freeze: freeze the inactive groups for real (default: ``skip_unselected``).
    """

    _state_fields = {"active": lambda v: [int(i) for i in v], "window": int}

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        groups: GroupsSpec = None,
        *,
        K: int = 20,
        gamma: int = 2,
        seed: int = 0,
        skip_unselected: bool = True,
        freeze: bool | None = None,
    ):
        self.K = _positive_int("K", K)
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 0:
            raise ValueError(f"gamma must be a non-negative integer, got {gamma!r}")
        self.gamma = gamma
        self.seed = _seed(seed)
        super().__init__(optimizer, groups, skip_unselected=_flag("skip", skip_unselected))
        if self.num_groups < 2:
            raise ValueError(f"LISA needs at least 2 groups (first and last), got {self.num_groups}")
        self.middle_groups = [i for i in self.nonempty_groups if 0 < i < self.num_groups - 1]
        if gamma > len(self.middle_groups):
            raise ValueError(
                f"gamma={gamma} is larger than the number of middle groups "
                f"({len(self.middle_groups)}: {[self.group_names[i] for i in self.middle_groups]})"
            )
        self._rng = torch.Generator().manual_seed(self.seed)
        self.active: list[int] = []
        self.window = -1  # the K-step window whose draw ``active`` holds
        self.lean = _freeze_option(freeze, self.skip_unselected)

    def _options(self):
        return {**super()._options(), "K": self.K, "gamma": self.gamma, "seed": self.seed}

    def expected_updates(self, total_steps: int) -> float | None:
        """A middle group's share: ``total_steps x gamma / middle groups`` (first and last: every step)."""
        return total_steps * self.gamma / len(self.middle_groups) if self.gamma else None

    def _ensure_plan(self):
        window = self.num_steps // self.K
        if window != self.window:
            draw = torch.randperm(len(self.middle_groups), generator=self._rng)[: self.gamma].tolist()
            self.active = sorted({0, self.num_groups - 1, *(self.middle_groups[j] for j in draw)})
            self.window = window

    def _active(self):
        return self.active

    def __repr__(self):
        return (
            f"LISA(K={self.K}, gamma={self.gamma}, seed={self.seed}, groups={self.num_groups}, steps={self.num_steps})"
        )


# ---------------------------------------------------------------------- block coordinate descent
class BlockCoordinateDescent(_PeerStrategy):
    """Block coordinate descent as in BAdam (Luo et al., "BAdam: A Memory Efficient
    Full Parameter Optimization Method for Large Language Models", NeurIPS 2024).

    One group (block) is active at a time; every ``K`` steps the next one takes over::

        active(t) = order[(t // K) mod n]

    over the ``n`` non-empty groups, with ``order`` ``"ascending"`` (input to head),
    ``"descending"`` (head to input; BAdam's default) or ``"random"`` (a fresh random
    permutation of all groups for every cycle, as BAdam's random mode; drawn with the
    strategy's own generator seeded with ``seed``).

    BAdam runs its base optimizer on the active block only and starts that block's
    optimizer state afresh at each switch. Defaults match: inactive groups skip the
    optimizer step (``skip_unselected=True``) and ``reset_state=True`` clears the
    optimizer state (momentum buffer, Adam moments and step) of the newly active group
    when it takes over. The inactive groups are frozen for real (``freeze=True``,
    default: ``requires_grad=False`` while inactive, so backward stops below the active
    block and they get no gradient); ``freeze=False`` keeps their gradients.

    Args:
        K: steps per block (BAdam's ``switch_block_every``, default 50).
        order: ``"ascending"``, ``"descending"`` or ``"random"``.
        seed: seed of the random order.
        reset_state: clear the optimizer state of a group when it becomes active.
        freeze: freeze the inactive groups for real (default: ``skip_unselected``).
    """

    _state_fields = {
        "cycle": lambda v: [int(i) for i in v],
        "position": int,
        "active": lambda v: None if v is None else int(v),
        "block": int,
    }

    ORDERS = ("ascending", "descending", "random")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        groups: GroupsSpec = None,
        *,
        K: int = 50,
        order: str = "descending",
        seed: int = 0,
        reset_state: bool = True,
        skip_unselected: bool = True,
        freeze: bool | None = None,
    ):
        self.K = _positive_int("K", K)
        self.order = _choice("order", order, self.ORDERS)
        self.seed = _seed(seed)
        self.reset_state = _flag("reset_state", reset_state)
        super().__init__(optimizer, groups, skip_unselected=_flag("skip", skip_unselected))
        self._rng = torch.Generator().manual_seed(self.seed)
        self.cycle: list[int] = []  # the order of the current cycle
        self.position = -1  # index of the active group in ``cycle``
        self.active: int | None = None
        self.block = -1  # the K-step block whose group ``active`` holds
        self.lean = _freeze_option(freeze, self.skip_unselected)
        # the state is cleared when a group becomes active again anyway: free it as soon as it is frozen
        self.release_frozen_state = self.lean and self.reset_state

    def _options(self):
        return {
            **super()._options(),
            "K": self.K,
            "order": self.order,
            "seed": self.seed,
            "reset_state": self.reset_state,
        }

    def expected_updates(self, total_steps: int) -> float | None:
        """``total_steps / groups``: one group at a time."""
        return total_steps / len(self.nonempty_groups)

    def _new_cycle(self) -> list[int]:
        groups = self.nonempty_groups
        if self.order == "ascending":
            return list(groups)
        if self.order == "descending":
            return list(reversed(groups))
        return [groups[j] for j in torch.randperm(len(groups), generator=self._rng).tolist()]

    def _ensure_plan(self):
        block = self.num_steps // self.K
        if block == self.block:
            return
        self.block = block
        self.position += 1
        if self.position >= len(self.cycle):
            self.cycle, self.position = self._new_cycle(), 0
        self.active = self.cycle[self.position]
        if self.reset_state:
            for p in self.group_params[self.active]:
                self.optimizer.state.pop(p, None)

    def _active(self):
        return [self.active]

    def __repr__(self):
        return (
            f"BlockCoordinateDescent(K={self.K}, order={self.order!r}, groups={self.num_groups}, "
            f"steps={self.num_steps})"
        )


# ---------------------------------------------------------------------- gradual unfreezing
class GradualUnfreezing(_PeerStrategy):
    """Gradual unfreezing from ULMFiT (Howard & Ruder, "Universal Language Model
    Fine-tuning for Text Classification", ACL 2018, section 3.3).

    Training starts with only the last group (the head) unfrozen; one more group is
    unfrozen from the top at every epoch, until all are trained::

        active in epoch e = the top min(n, e + 1) non-empty groups      (every=None)
        active at step t  = the top min(n, t // every + 1) groups       (every=N)

    The per-epoch schedule needs the training loop to call ``on_epoch_start(epoch)``
    (0-based); if it never does, a warning is raised at the first step and the run
    stays in epoch 0. Frozen groups get ``requires_grad=False`` (``freeze=True``, default)
    and skip the optimizer step (``skip_unselected=True``, as a frozen layer has no
    gradient in ULMFiT); ULMFiT's other two ingredients,
    discriminative learning rates and slanted triangular schedules, are separate
    (see ``llrd`` and the runner's LR schedule).

    Args:
        every: unfreeze one group every ``every`` steps instead of every epoch.
        freeze: freeze the groups not yet unfrozen for real (default: ``skip_unselected``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        groups: GroupsSpec = None,
        *,
        every: int | None = None,
        skip_unselected: bool = True,
        freeze: bool | None = None,
    ):
        self.every = None if every is None else _positive_int("every", every)
        super().__init__(optimizer, groups, skip_unselected=_flag("skip", skip_unselected))
        self.unfrozen = 1  # number of unfrozen groups, counted from the top
        self._warned = False
        self.lean = _freeze_option(freeze, self.skip_unselected)

    def _options(self):
        return {**super()._options(), "every": self.every}

    def _epoch_started(self, epoch: int) -> None:
        if self.every is None:
            self.unfrozen = min(len(self.nonempty_groups), epoch + 1)
            self._apply_freeze()  # before the epoch's first forward pass

    def _ensure_plan(self):
        if self.every is not None:
            self.unfrozen = min(len(self.nonempty_groups), self.num_steps // self.every + 1)

    def _active(self):
        return self.nonempty_groups[-self.unfrozen :]

    def _plan(self):
        self._ensure_plan()
        if self.every is None and self.epoch is None and not self._warned:
            warnings.warn(
                "gradual-unfreeze unfreezes one group per epoch through on_epoch_start(epoch), "
                "which the training loop has not called; only the last group is trained "
                "(call on_epoch_start at each epoch, or pass every=N steps)",
                stacklevel=4,
            )
            self._warned = True
        return self._binary(self._active())

    def state_dict(self):
        state = super().state_dict()
        state["unfrozen"] = self.unfrozen
        return state

    def _set_state(self, state):
        super()._set_state(state)
        self.unfrozen = int(state["unfrozen"])

    def __repr__(self):
        every = "epoch" if self.every is None else f"{self.every} steps"
        return f"GradualUnfreezing(every={every}, unfrozen={self.unfrozen}/{len(self.nonempty_groups)})"


# ---------------------------------------------------------------------- layer-wise lr decay
class LayerwiseLRDecay(_PeerStrategy):
    """Layer-wise learning-rate decay (Clark et al., ELECTRA, ICLR 2020; Bao et al.,
    BEiT, ICLR 2022; timm's ``param_groups_layer_decay``).

    All groups train in every step; the head keeps the base rate and each group
    below it gets ``decay`` times the rate of the group above::

        lr_l = lr * decay ** (L - 1 - l)        l = 0 (input) .. L-1 (head)

    with ``L`` the number of groups (for a timm ViT: embedding, the blocks, head,
    exactly BEiT's layer ids). The multipliers ride on top of any LR schedule.

    Args:
        decay: in (0, 1]; 1 is full finetuning. Common: 0.65 (BEiT), 0.75 (MAE).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, groups: GroupsSpec = None, *, decay: float = 0.75):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < float(decay) <= 1.0:
            raise ValueError(f"decay must be a number in (0, 1], got {decay!r}")
        self.decay = float(decay)
        super().__init__(optimizer, groups, skip_unselected=False)
        n = self.num_groups
        self.multipliers = [self.decay ** (n - 1 - i) for i in range(n)]

    def _options(self):
        return {**super()._options(), "decay": self.decay}

    def _plan(self):
        return self.multipliers

    def __repr__(self):
        return f"LayerwiseLRDecay(decay={self.decay}, groups={self.num_groups})"


# ---------------------------------------------------------------------- registry
@register_strategy(
    "auto-rgn",
    needs_all_gradients=True,
    help="Auto-RGN (surgical finetuning): per-tensor lr weight = RGN / max RGN, "
    "RGN = ||grad|| / ||param||; options refresh=epoch|step|N, batches=5, norm=freeze|rgn",
)
def _auto_rgn(optimizer, groups=None, refresh="epoch", batches=5, norm="freeze", skip=False):
    return AutoRGN(optimizer, groups, refresh=refresh, batches=batches, norm=norm, skip_unselected=skip)


@register_strategy(
    "lisa",
    help="LISA: first + last group and gamma random middle groups, redrawn every K steps; "
    "options K=20, gamma=2, seed=0, skip=True, freeze=True",
)
def _lisa(optimizer, groups=None, K=20, gamma=2, seed=0, skip=True, freeze=None):
    return LISA(optimizer, groups, K=K, gamma=gamma, seed=seed, skip_unselected=skip, freeze=freeze)


@register_strategy(
    "bcd-cyclic",
    help="block coordinate descent (BAdam): one group at a time, next every K steps; "
    "options K=50, order=descending|ascending|random, seed=0, reset_state=True, "
    "freeze=True",
)
def _bcd_cyclic(optimizer, groups=None, K=50, order="descending", seed=0, reset_state=True, skip=True, freeze=None):
    return BlockCoordinateDescent(
        optimizer, groups, K=K, order=order, seed=seed, reset_state=reset_state, skip_unselected=skip, freeze=freeze
    )


@register_strategy(
    "gradual-unfreeze",
    help="gradual unfreezing (ULMFiT): the last group, then one more from the top "
    "each epoch (or every=N steps); option freeze=True",
)
def _gradual_unfreeze(optimizer, groups=None, every=None, skip=True, freeze=None):
    return GradualUnfreezing(optimizer, groups, every=every, skip_unselected=skip, freeze=freeze)


@register_strategy(
    "llrd", help="layer-wise lr decay (BEiT/timm): lr of group l = lr * decay^(L-1-l); option decay=0.75"
)
def _llrd(optimizer, groups=None, decay=0.75):
    return LayerwiseLRDecay(optimizer, groups, decay=decay)
