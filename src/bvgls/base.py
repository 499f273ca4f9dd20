"""The engine every strategy shares: scale each layer group's learning rate per step.

A strategy wraps a ``torch.optim.Optimizer``. Right before each optimizer step (an
optimizer step pre-hook, so it also runs when a framework or ``GradScaler`` calls
``optimizer.step()`` itself) it asks the subclass for one learning-rate multiplier
per *selection group* (0 = not updated in this step), runs the step with those
rates, and undoes the temporary rates afterwards (a post-hook), so that LR
schedulers attached to the optimizer never see them.

What the optimizer keeps in its param groups survives (schedule-free's ``k`` and
``weight_sum``, Prodigy's ``d``): when every tensor of a param group has the same
multiplier, only that group's ``lr`` is changed in place for the step. When the
selection groups cut through a param group (e.g. an optimizer that splits decay /
no-decay parameters), the group is split for the step into sub-groups that share
its hyper-parameters, one per distinct multiplier; afterwards every key the
optimizer wrote into them except ``lr`` and ``params`` is written back to the
group from **the sub-group with the largest multiplier** (the first such one on a
tie; sub-groups left out of the step, see ``skip_unselected``, never win).

Guarantees of every strategy:

* a step with a non-finite (nan/inf) gradient element is skipped as a whole, as
  ``GradScaler`` does: no weight, optimizer state or strategy statistic changes,
  the step is not counted, ``nonfinite_steps`` counts it and a warning is raised
  once;
* ``step()`` when no parameter has a gradient (before any ``backward()``) raises
  ``RuntimeError`` and changes nothing;
* one strategy per optimizer: attaching a second raises ``ValueError`` until the
  first is detached with ``.remove()``;
* ``load_state_dict`` validates everything first and leaves the strategy untouched
  when it fails; ``state_dict()`` is a consistent snapshot made of copies.

Lean mode (``self.lean``): a strategy that knows, when a step ends, which groups the
next step updates sets ``requires_grad=False`` on the others for that step (autograd
then computes no gradient for them and stops the backward pass below the lowest
group that needs one; without a gradient they leave the optimizer step and get no
optimizer state). Only flags this strategy turned off are turned back on: at the
next step that needs them, at :meth:`unfreeze` / :meth:`remove`, and when a
``with strategy:`` block ends (also on an exception). With ``release_frozen_state``
a group's optimizer state (momentum, moments) is freed when it is frozen, so only the
groups being trained hold any; it starts afresh when the group trains again.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

GroupsSpec = Any  # LayerGroups | Mapping[str, params] | Sequence[(name, params)] | Sequence[params]


def as_named_lists(groups: GroupsSpec) -> list[tuple[str, list[nn.Parameter]]]:
    """Normalise every accepted ``groups=`` form to ``[(name, [params...]), ...]``."""
    if hasattr(groups, "named_param_lists"):  # bvgls.LayerGroups
        return groups.named_param_lists()
    if isinstance(groups, Mapping):
        items = list(groups.items())
    elif isinstance(groups, Sequence) and not isinstance(groups, (str, bytes)):
        items = []
        for i, entry in enumerate(groups):
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
                items.append(entry)
            elif isinstance(entry, Mapping) and "params" in entry:
                items.append((entry.get("name", f"group{i}"), entry["params"]))
            else:
                items.append((f"group{i}", entry))
    else:
        raise TypeError(
            "groups must be a bvgls.LayerGroups, a mapping name -> parameters, "
            f"or a sequence of (name, parameters); got {type(groups).__name__}"
        )
    out = []
    for name, params in items:
        if isinstance(params, torch.Tensor):
            params = [params]
        params = [p[1] if isinstance(p, tuple) else p for p in params]
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"group {name!r} contains a {type(p).__name__}, not a parameter tensor")
        out.append((str(name), params))
    return out


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameters and gradients); any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def is_sharded(t: torch.Tensor) -> bool:
    """Is ``t`` a DTensor sharded over some mesh dimension (FSDP2)?"""
    return any(pl.is_shard() for pl in getattr(t, "placements", ()))


def options_mismatch(kind: str, saved: Mapping[str, Any], mine: Mapping[str, Any]) -> str | None:
    """The error message for a checkpoint saved with other constructor options, or None."""
    saved, mine = dict(saved), dict(mine)
    if saved == mine:
        return None
    diff = ", ".join(
        f"{k}: saved {saved.get(k)!r}, now {mine.get(k)!r}"
        for k in sorted(set(saved) | set(mine))
        if saved.get(k) != mine.get(k)
    )
    return (
        f"state_dict of this {kind} was saved with other options ({diff}); "
        "build the strategy with the options of the checkpoint"
    )


@dataclass
class StepReport:
    """What a strategy reports after a step (:meth:`GroupStrategy.step_report`): cumulative
    counted steps, selection counts and lr multipliers per group and, for ratio-based
    strategies (BVG-LS), the per-group ratios of the last statistics update with the mask of
    groups whose ratio carries signal (defined, and variance above the clamp ``eps``: at a
    tensor's first step the variance is 0 and the ratio is ``bias / eps``). ``probed`` says
    whether the last ``optimizer.step()`` computed those ratios (False between probe steps,
    where they are the last probe's, and on a skipped non-finite step)."""

    num_steps: int
    counts: list[int]
    scale_sums: list[float]
    ratios: torch.Tensor | None = None
    informative: torch.Tensor | None = None
    probed: bool = False


# optimizer -> weak reference to the strategy attached to it
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _AttachAfterInit(type):
    """Attach a strategy to its optimizer only once its whole ``__init__`` succeeded, so a
    constructor that raises leaves no hook (and no frozen parameter) behind."""

    def __call__(cls, *args, **kwargs):
        strategy = super().__call__(*args, **kwargs)
        strategy._attach()
        return strategy


class _StepChange:
    """What a pre-step hook changed in the optimizer, undone by the post-step hook."""

    def __init__(self, groups: list[dict]):
        self.groups = groups  # the optimizer's own param_groups list
        self.lrs: list[tuple[dict, Any]] = []  # (group, its lr) for groups scaled in place
        self.splits: list[tuple[dict, list[tuple[float, dict]]]] = []  # (group, [(scale, sub-group)])

    def undo(self, optimizer: torch.optim.Optimizer) -> None:
        for group, subs in self.splits:
            if subs:  # write back what the optimizer changed, from the largest multiplier
                winner = max(subs, key=lambda item: item[0])[1]  # max keeps the first on ties
                group.update({k: v for k, v in winner.items() if k not in ("params", "lr")})
        for group, lr in self.lrs:
            group["lr"] = lr
        optimizer.param_groups = self.groups


class GroupStrategy(metaclass=_AttachAfterInit):
    """Base class: per-step learning-rate multipliers for named groups of parameters.

    Subclasses implement :meth:`_plan`, returning one multiplier per group. The
    primary API is ``strategy.step()`` after ``loss.backward()``; calling
    ``optimizer.step()`` directly (or ``scaler.step(optimizer)``) works too, because
    the work happens in optimizer step hooks. See the module docstring for the
    guarantees (non-finite steps, one strategy per optimizer, state dicts, lean mode).

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        groups: selection groups; default: the optimizer's param groups (named by
            their ``"name"`` key if present).
        skip_unselected: if True, groups with multiplier 0 are left out of the
            optimizer step entirely (no momentum / Adam-moment / weight-decay update
            for them). This is *not* the reference semantics of the paper, where
            unselected groups run with learning rate 0.
    """

    #: strategies that need every group's gradient (e.g. BVG-LS) leave groups unfrozen
    needs_all_gradients = False

    def __init__(self, optimizer: torch.optim.Optimizer, groups: GroupsSpec = None, *, skip_unselected: bool = False):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError("LBFGS re-evaluates its closure inside step(); layer selection is not defined for it")
        self._refuse_second_strategy(optimizer)
        self.optimizer = optimizer
        self.skip_unselected = bool(skip_unselected)
        self._bind_groups(groups)
        self.num_steps = 0
        self.nonfinite_steps = 0
        self.counts = [0] * len(self.group_names)
        self.scale_sums = [0.0] * len(self.group_names)
        self.selected: list[int] = []
        self.scales: list[float] = [1.0] * len(self.group_names)
        self.lean = False  # subclasses with a known next plan may turn this on
        self.release_frozen_state = False  # lean mode: free a group's optimizer state when it is frozen
        self._frozen: set[int] = set()  # indices (self.params) this strategy set requires_grad=False on
        self._change: _StepChange | None = None
        self._skipped = False
        self._warned_nonfinite = False
        self._nonfinite_effect = "weights, optimizer state and statistics untouched"  # what a skipped step keeps
        self._handles: list = []

    @staticmethod
    def _refuse_second_strategy(optimizer) -> None:
        ref = _ATTACHED.get(optimizer)
        other = ref() if ref is not None else None
        if other is not None and other._handles:
            raise ValueError(
                f"this optimizer already has a {type(other).__name__} attached; call .remove() on "
                "that strategy first (strategies cannot be stacked on one optimizer)"
            )

    def _attach(self) -> None:
        """Register the step hooks (after ``__init__``) and freeze for the first step in lean mode."""
        self._refuse_second_strategy(self.optimizer)
        self._refuse_distributed_lean()
        self._handles = [
            self.optimizer.register_step_pre_hook(self._pre_step),
            self.optimizer.register_step_post_hook(self._post_step),
        ]
        _ATTACHED[self.optimizer] = weakref.ref(self)
        self._apply_freeze()

    def _refuse_distributed_lean(self) -> None:
        if self.lean and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                f"{type(self).__name__}: lean mode (freezing unselected groups between steps) is not "
                "supported under torch.distributed (DDP / FSDP2): their gradient reducers expect the "
                "same trainable parameters every step. Use it without freezing instead (e.g. "
                "bvgls:probe=1, the paper's method, or freeze=False for lisa / bcd-cyclic / "
                "gradual-unfreeze)"
            )

    # ------------------------------------------------------------------ groups
    def _bind_groups(self, groups: GroupsSpec) -> None:
        opt_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        opt_ids = {id(p) for p in opt_params}
        if groups is None:
            named = [(g.get("name", f"group{i}"), list(g["params"])) for i, g in enumerate(self.optimizer.param_groups)]
        else:
            named = as_named_lists(groups)
        names, lists, owner = [], [], {}
        for name, params in named:
            kept = []
            for p in params:
                if id(p) in owner:
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} is in both group {owner[id(p)]!r} "
                        f"and group {name!r}; every parameter must be in exactly one group"
                    )
                owner[id(p)] = name
                if id(p) not in opt_ids:
                    if p.requires_grad:
                        raise ValueError(
                            f"group {name!r} holds a trainable parameter of shape {tuple(p.shape)} "
                            "that is not in the optimizer"
                        )
                    continue  # frozen parameters outside the optimizer are simply not selectable
                kept.append(p)
            names.append(name)
            lists.append(kept)
        missing = [p for p in opt_params if id(p) not in owner]
        if missing:
            shapes = ", ".join(str(tuple(p.shape)) for p in missing[:5])
            raise ValueError(
                f"{len(missing)} optimizer parameter(s) are missing from every group "
                f"(shapes {shapes}{', ...' if len(missing) > 5 else ''})"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique, got {names}")
        self.group_names: list[str] = names
        self.group_params: list[list[nn.Parameter]] = lists
        self.params: list[nn.Parameter] = [p for ps in lists for p in ps]
        self.param_group_index: list[int] = [gi for gi, ps in enumerate(lists) for _ in ps]
        index_of = {id(p): i for i, p in enumerate(self.params)}
        # for every optimizer param group: the flat tensor indices of its params
        self._opt_layout = [[index_of[id(p)] for p in g["params"]] for g in self.optimizer.param_groups]
        self._opt_group_of = {i: gi for gi, layout in enumerate(self._opt_layout) for i in layout}
        self._opt_param_count = len(opt_params)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @property
    def param_groups(self):
        """The wrapped optimizer's param groups (for code that expects an optimizer)."""
        return self.optimizer.param_groups

    def group_has_grad(self) -> list[bool]:
        """Per group: does any of its parameters have a gradient in this step?"""
        return [any(p.grad is not None for p in ps) for ps in self.group_params]

    # ------------------------------------------------------------------ stepping
    def _plan(self) -> Sequence[float]:
        """Learning-rate multiplier of every group for the step about to run."""
        raise NotImplementedError

    def _plan_step(self) -> Sequence[float] | None:
        """The multipliers of this step, or None when a gradient is not finite (the step
        is then skipped). Subclasses that read the gradients anyway fold the check in."""
        if not self._gradients_finite():
            return None
        return self._plan()

    def _present_gradients(self) -> list[torch.Tensor]:
        """This rank's gradient of every parameter that has one; raises if none has."""
        grads = [local_tensor(p.grad) for p in self.params if p.grad is not None]
        if not grads:
            raise RuntimeError(
                f"{type(self).__name__}: step() was called but no parameter has a gradient "
                "(call loss.backward() before step()); nothing was updated or counted"
            )
        return grads

    @torch.no_grad()
    def _gradients_finite(self) -> bool:
        grads = [g.coalesce()._values() if g.is_sparse else g for g in self._present_gradients()]
        device = grads[0].device
        norms = torch.stack([n.to(device) for n in torch._foreach_norm(grads)])
        return bool(norms.isfinite().all())  # the host sync of a step

    def _tensor_scales(self, group_scales: Sequence[float]) -> list[float]:
        """Learning-rate multiplier of every tensor (``self.params`` order); by default
        its group's. Strategies with per-tensor rates (e.g. Auto-RGN) override this."""
        return [group_scales[g] for g in self.param_group_index]

    def _pre_step(self, optimizer, args, kwargs):
        self._undo_step_change()  # a previous step that raised never ran the post-hook
        if sum(len(g["params"]) for g in optimizer.param_groups) != self._opt_param_count:
            raise RuntimeError(
                "the optimizer's parameters changed after the strategy was attached "
                "(add_param_group?); create the strategy again"
            )
        replaced = None
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if closure is not None:
            # the optimizer would evaluate the closure after this hook: evaluate it now so
            # the statistics see its gradients, and hand the optimizer the cached result
            with torch.enable_grad():
                loss = closure()
            rest = {k: v for k, v in kwargs.items() if k != "closure"}
            replaced = (args[:1], {**rest, "closure": lambda: loss})
        planned = self._plan_step()
        if planned is None:
            self._skip_nonfinite_step()
            return replaced
        scales = [float(s) for s in planned]
        if len(scales) != self.num_groups:
            raise RuntimeError(
                f"{type(self).__name__}._plan returned {len(scales)} scales for {self.num_groups} groups"
            )
        self.num_steps += 1
        self.scales = scales
        self.selected = [i for i, s in enumerate(scales) if s > 0]
        for i in self.selected:
            self.counts[i] += 1
        self.scale_sums = [total + s for total, s in zip(self.scale_sums, scales)]
        self._set_step_rates(self._tensor_scales(scales))
        return replaced

    def _step_now(self, indices: Sequence[int], scale: float) -> None:
        """Run the optimizer's update over tensors ``indices`` alone, at ``scale`` x their group's lr,
        outside a strategy step: fused BVG-LS gives a tensor its learning-rate-0 step during
        backward, so that its gradient can be freed there. Each param group is stepped as a copy
        holding just these tensors; what the optimizer writes into a copy is written back to the
        group (as for a group stepped in place), except ``lr`` and ``params``. No step hook runs
        (the optimizer's undecorated ``step``): to schedulers and hooks this is no optimizer step."""
        change = _StepChange(self.optimizer.param_groups)
        mine: dict[int, list[nn.Parameter]] = {}
        for i in indices:
            mine.setdefault(self._opt_group_of[i], []).append(self.params[i])
        for gi, params in mine.items():
            group = change.groups[gi]
            change.splits.append((group, [(scale, dict(group, params=params, lr=group["lr"] * scale))]))
        self.optimizer.param_groups = [sub for _, subs in change.splits for _, sub in subs]
        try:
            step = type(self.optimizer).step
            getattr(step, "__wrapped__", step)(self.optimizer)  # no step hooks: not an optimizer step
        finally:
            change.undo(self.optimizer)

    def _skip_nonfinite_step(self) -> None:
        """Let the optimizer step over copies of its groups without parameters: nothing it
        writes survives (an empty list would break optimizers that read ``param_groups[0]``)."""
        self._skipped = True
        self.nonfinite_steps += 1
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}: a gradient holds nan/inf after {self.num_steps} steps; the step "
                f"was skipped ({self._nonfinite_effect}) and is counted in "
                ".nonfinite_steps (warned once)",
                RuntimeWarning,
                stacklevel=4,
            )
        self._change = _StepChange(self.optimizer.param_groups)
        self.optimizer.param_groups = [dict(g, params=[]) for g in self.optimizer.param_groups]

    def _set_step_rates(self, per_tensor: Sequence[float]) -> None:
        """Scale each param group's lr for this step (in place, or split where multipliers differ)."""
        skip = self.skip_unselected or self.lean  # lean: an unselected group is not updated at all
        left_out = [(s == 0.0 and skip) or i in self._frozen for i, s in enumerate(per_tensor)]
        if all(s == 1.0 for s in per_tensor) and not any(left_out):
            return  # every tensor steps with its own lr: nothing to change
        change = _StepChange(self.optimizer.param_groups)
        stepping = []
        for group, layout in zip(change.groups, self._opt_layout):
            buckets: dict[tuple[float, bool], list[int]] = {}
            for i in layout:
                buckets.setdefault((per_tensor[i], left_out[i]), []).append(i)
            if len(buckets) <= 1:  # one multiplier: change lr in place, the optimizer writes into the group
                scale, out = next(iter(buckets), (1.0, False))
                if out:
                    continue
                if scale != 1.0:
                    change.lrs.append((group, group["lr"]))
                    group["lr"] = group["lr"] * scale
                stepping.append(group)
                continue
            subs = []
            for (scale, out), indices in buckets.items():
                if out:
                    continue
                sub = dict(group, params=[self.params[i] for i in indices], lr=group["lr"] * scale)
                subs.append((scale, sub))
                stepping.append(sub)
            change.splits.append((group, subs))
        self._change = change
        # an empty list breaks optimizers that read param_groups[0]: step over parameter-less copies
        self.optimizer.param_groups = stepping or [dict(g, params=[]) for g in change.groups]

    def _post_step(self, optimizer, args, kwargs):
        self._undo_step_change()
        if self._skipped:
            self._skipped = False
            return  # the same step runs again: same plan, same frozen groups
        self._step_finished()
        self._apply_freeze()

    def _undo_step_change(self) -> None:
        if self._change is not None:
            change, self._change = self._change, None
            change.undo(self.optimizer)

    def _step_finished(self) -> None:
        """Subclass hook, after every counted step: e.g. plan the next step (lean mode)."""

    # ------------------------------------------------------------------ lean mode
    def _upcoming_active(self) -> Sequence[int] | None:
        """Groups the next step will update, if known now; None = all (nothing to freeze)."""
        return None

    def _apply_freeze(self) -> None:
        """Lean mode: ``requires_grad=False`` on the groups the next step does not update,
        back to True on the ones this strategy froze and the next step needs."""
        if not self.lean:
            return
        active = self._upcoming_active()
        keep = set(range(self.num_groups)) if active is None else set(active)
        wanted = {i for i, g in enumerate(self.param_group_index) if g not in keep}
        if wanted - self._frozen:
            self._refuse_distributed_lean()  # also when the process group started after the strategy
        for i in self._frozen - wanted:
            self.params[i].requires_grad_(True)
        newly = set()
        for i in wanted - self._frozen:
            p = self.params[i]
            if p.requires_grad:  # never touch what the user froze
                p.requires_grad_(False)
                p.grad = None
                newly.add(i)
                if self.release_frozen_state:
                    self.optimizer.state.pop(p, None)
        self._frozen = (self._frozen & wanted) | newly

    def frozen_groups(self) -> list[str]:
        """Names of the groups this strategy froze for the next step (lean mode)."""
        return [self.group_names[g] for g in sorted({self.param_group_index[i] for i in self._frozen})]

    def backward_reaches_first_group(self) -> bool:
        """Whether the next backward pass runs through the whole network: the first group with
        parameters trains, so autograd keeps every layer's activations (the memory peak of a step)."""
        first = next((ps for ps in self.group_params if ps), [])
        return any(p.requires_grad for p in first)

    def unfreeze(self) -> None:
        """Give back ``requires_grad=True`` to every parameter this strategy froze."""
        for i in self._frozen:
            self.params[i].requires_grad_(True)
        self._frozen = set()

    def step(self, closure=None):
        """Run one optimizer step with this strategy's per-group learning rates.

        A closure (here or passed to ``optimizer.step``) is evaluated once, before the
        selection, so the statistics see its gradients; the optimizer gets its result.
        """
        return self.optimizer.step() if closure is None else self.optimizer.step(closure)

    def on_epoch_start(self, epoch: int) -> None:
        """Called by training loops at the start of each epoch (0-based); a no-op here.

        Strategies that act per epoch (e.g. gradual unfreezing) override it."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def remove(self) -> None:
        """Detach from the optimizer: later ``optimizer.step()`` calls are plain steps, and
        every parameter this strategy froze trains again."""
        self._undo_step_change()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.unfreeze()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ------------------------------------------------------------------ reporting
    def selection_frequency(self) -> list[float]:
        """Fraction of steps in which each group was updated."""
        n = max(self.num_steps, 1)
        return [c / n for c in self.counts]

    def mean_scales(self) -> list[float]:
        """Mean learning-rate multiplier of each group over all steps: the selection
        frequency for 0/1 strategies, the average weight for graded ones (llrd, auto-rgn)."""
        n = max(self.num_steps, 1)
        return [s / n for s in self.scale_sums]

    def expected_updates(self, total_steps: int) -> float | None:
        """For strategies that update only some groups per step (BVG-LS, LISA, BCD, ...): the
        expected number of optimizer updates of a group they rotate through over
        ``total_steps`` steps (total steps x groups updated per step / groups selected from).
        None here: every group a strategy trains is updated every step."""
        return None

    def step_report(self) -> StepReport:
        """Cumulative counts of this strategy (no ratios; ratio-based strategies add them)."""
        return StepReport(self.num_steps, list(self.counts), list(self.scale_sums))

    def describe_selection(self) -> str:
        return ",".join(self.group_names[i] for i in self.selected)

    def _statistics_bytes(self) -> list[int]:
        """Bytes of per-tensor statistics this strategy keeps (``self.params`` order)."""
        return [0] * len(self.params)

    def state_bytes(self) -> dict[str, dict[str, int]]:
        """Allocated state per group, in bytes: ``{"optimizer": {group: bytes}, "strategy":
        {group: bytes}}`` (optimizer: the tensors in ``optimizer.state``; strategy: its own
        per-tensor statistics, e.g. BVG-LS's gradient EMA)."""
        opt = dict.fromkeys(self.group_names, 0)
        mine = dict.fromkeys(self.group_names, 0)
        stats = self._statistics_bytes()
        for i, (p, g) in enumerate(zip(self.params, self.param_group_index)):
            name = self.group_names[g]
            for value in self.optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor):
                    t = local_tensor(value)
                    opt[name] += t.numel() * t.element_size()
            mine[name] += stats[i]
        return {"optimizer": opt, "strategy": mine}

    # ------------------------------------------------------------------ state
    def _options(self) -> dict[str, Any]:
        """The constructor options a checkpoint must agree with."""
        return {"skip_unselected": self.skip_unselected}

    def state_dict(self) -> dict[str, Any]:
        """The strategy's own state (save the optimizer's ``state_dict`` beside it): a
        snapshot of copies, which later steps do not change."""
        return {
            "type": type(self).__name__,
            "options": self._options(),
            "group_names": list(self.group_names),
            "group_sizes": [len(ps) for ps in self.group_params],
            "num_steps": self.num_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "counts": list(self.counts),
            "scale_sums": list(self.scale_sums),
            "selected": list(self.selected),
            "scales": list(self.scales),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`. Everything is checked before anything is
        assigned; on any error the strategy is left as it was."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state).__name__}")
        self._check_state(state)
        backup = self.state_dict()
        try:
            self._set_state(state)
        except Exception:
            self._set_state(backup)
            raise
        self._apply_freeze()

    def _check_state(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless ``state`` fits this strategy (subclasses extend it)."""
        if state.get("type") != type(self).__name__:
            raise ValueError(f"state_dict is from a {state.get('type')}, not a {type(self).__name__}")
        missing = [
            k
            for k in (
                "options",
                "group_names",
                "group_sizes",
                "num_steps",
                "counts",
                "scale_sums",
                "selected",
                "scales",
            )
            if k not in state
        ]
        if missing:
            raise ValueError(f"state_dict lacks {', '.join(missing)} (not a state of this bvgls version)")
        message = options_mismatch(type(self).__name__, state["options"], self._options())
        if message:
            raise ValueError(message)
        if list(state["group_names"]) != self.group_names or list(state["group_sizes"]) != [
            len(ps) for ps in self.group_params
        ]:
            raise ValueError(
                f"state_dict groups {state['group_names']} do not match this strategy's groups {self.group_names}"
            )
        n = self.num_groups
        for key in ("counts", "scale_sums", "scales"):
            if len(state[key]) != n:
                raise ValueError(f"state_dict has {len(state[key])} {key} for {n} groups")
        if any(not 0 <= int(i) < n for i in state["selected"]):
            raise ValueError(f"state_dict selects groups {list(state['selected'])} outside 0..{n - 1}")

    def _set_state(self, state: Mapping[str, Any]) -> None:
        """Assign a checked state (subclasses extend it)."""
        self.num_steps = int(state["num_steps"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.counts = [int(c) for c in state["counts"]]
        self.scale_sums = [float(s) for s in state["scale_sums"]]
        self.selected = [int(i) for i in state["selected"]]
        self.scales = [float(s) for s in state["scales"]]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(groups={self.num_groups}, steps={self.num_steps})"
