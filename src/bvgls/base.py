"""The engine every strategy shares: scale each layer group's learning rate per step.

A strategy wraps a ``torch.optim.Optimizer``. Right before each optimizer step (an
optimizer step pre-hook, so it also runs when a framework or ``GradScaler`` calls
``optimizer.step()`` itself) it asks the subclass for one learning-rate multiplier
per *selection group* (0 = not updated in this step), runs the step with those
rates, and restores the optimizer's own param groups afterwards (a post-hook), so
that LR schedulers attached to the optimizer never see the temporary rates.

Selection groups may differ from the optimizer's param groups (e.g. an optimizer
that splits decay / no-decay parameters): for the step, each param group is split
into sub-groups that share its hyper-parameters, one per distinct multiplier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

GroupsSpec = Any  # LayerGroups | Mapping[str, params] | Sequence[(name, params)] | Sequence[params]


def _as_named_lists(groups: GroupsSpec) -> list[tuple[str, list[nn.Parameter]]]:
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


class GroupStrategy:
    """Base class: per-step learning-rate multipliers for named groups of parameters.

    Subclasses implement :meth:`_plan`, returning one multiplier per group. The
    primary API is ``strategy.step()`` after ``loss.backward()``; calling
    ``optimizer.step()`` directly (or ``scaler.step(optimizer)``) works too, because
    the work happens in optimizer step hooks.

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

    def __init__(self, optimizer: torch.optim.Optimizer, groups: GroupsSpec = None, *,
                 skip_unselected: bool = False):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError("LBFGS re-evaluates its closure inside step(); layer selection is not defined for it")
        self.optimizer = optimizer
        self.skip_unselected = bool(skip_unselected)
        self._bind_groups(groups)
        self.num_steps = 0
        self.counts = [0] * len(self.group_names)
        self.scale_sums = [0.0] * len(self.group_names)
        self.selected: list[int] = []
        self.scales: list[float] = [1.0] * len(self.group_names)
        self._saved_param_groups = None
        self._pre_handle = optimizer.register_step_pre_hook(self._pre_step)
        self._post_handle = optimizer.register_step_post_hook(self._post_step)

    # ------------------------------------------------------------------ groups
    def _bind_groups(self, groups: GroupsSpec) -> None:
        opt_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        opt_ids = {id(p) for p in opt_params}
        if groups is None:
            named = [(g.get("name", f"group{i}"), list(g["params"]))
                     for i, g in enumerate(self.optimizer.param_groups)]
        else:
            named = _as_named_lists(groups)
        names, lists, owner = [], [], {}
        for name, params in named:
            kept = []
            for p in params:
                if id(p) in owner:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} is in both group {owner[id(p)]!r} "
                                     f"and group {name!r}; every parameter must be in exactly one group")
                owner[id(p)] = name
                if id(p) not in opt_ids:
                    if p.requires_grad:
                        raise ValueError(f"group {name!r} holds a trainable parameter of shape {tuple(p.shape)} "
                                         "that is not in the optimizer")
                    continue  # frozen parameters outside the optimizer are simply not selectable
                kept.append(p)
            names.append(name)
            lists.append(kept)
        missing = [p for p in opt_params if id(p) not in owner]
        if missing:
            shapes = ", ".join(str(tuple(p.shape)) for p in missing[:5])
            raise ValueError(f"{len(missing)} optimizer parameter(s) are missing from every group "
                             f"(shapes {shapes}{', ...' if len(missing) > 5 else ''})")
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique, got {names}")
        self.group_names: list[str] = names
        self.group_params: list[list[nn.Parameter]] = lists
        self.params: list[nn.Parameter] = [p for ps in lists for p in ps]
        self.param_group_index: list[int] = [gi for gi, ps in enumerate(lists) for _ in ps]
        index_of = {id(p): i for i, p in enumerate(self.params)}
        # for every optimizer param group: the flat tensor indices of its params
        self._opt_layout = [[index_of[id(p)] for p in g["params"]] for g in self.optimizer.param_groups]
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

    def _tensor_scales(self, group_scales: Sequence[float]) -> list[float]:
        """Learning-rate multiplier of every tensor (``self.params`` order); by default
        its group's. Strategies with per-tensor rates (e.g. Auto-RGN) override this."""
        return [group_scales[g] for g in self.param_group_index]

    def _pre_step(self, optimizer, args, kwargs):
        self._restore_param_groups()  # a previous step that raised never ran the post-hook
        if sum(len(g["params"]) for g in optimizer.param_groups) != self._opt_param_count:
            raise RuntimeError("the optimizer's parameters changed after the strategy was attached "
                               "(add_param_group?); create the strategy again")
        replaced = None
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if closure is not None:
            # the optimizer would evaluate the closure after this hook: evaluate it now so
            # the statistics see its gradients, and hand the optimizer the cached result
            with torch.enable_grad():
                loss = closure()
            rest = {k: v for k, v in kwargs.items() if k != "closure"}
            replaced = (args[:1], {**rest, "closure": lambda: loss})
        scales = [float(s) for s in self._plan()]
        if len(scales) != self.num_groups:
            raise RuntimeError(f"{type(self).__name__}._plan returned {len(scales)} scales for {self.num_groups} groups")
        self.num_steps += 1
        self.scales = scales
        self.selected = [i for i, s in enumerate(scales) if s > 0]
        for i in self.selected:
            self.counts[i] += 1
        self.scale_sums = [total + s for total, s in zip(self.scale_sums, scales)]
        per_tensor = self._tensor_scales(scales)
        if all(s == 1.0 for s in per_tensor):
            return replaced  # every tensor steps with its own lr: nothing to change
        temporary = []
        for group, layout in zip(optimizer.param_groups, self._opt_layout):
            buckets: dict[float, list] = {}
            for i in layout:
                buckets.setdefault(per_tensor[i], []).append(self.params[i])
            for scale, params in buckets.items():
                if scale == 0.0 and self.skip_unselected:
                    continue
                sub = dict(group)
                sub["params"] = params
                if scale != 1.0:
                    sub["lr"] = group["lr"] * scale
                temporary.append(sub)
        self._saved_param_groups = optimizer.param_groups
        optimizer.param_groups = temporary
        return replaced

    def _post_step(self, optimizer, args, kwargs):
        self._restore_param_groups()

    def _restore_param_groups(self):
        if self._saved_param_groups is not None:
            self.optimizer.param_groups = self._saved_param_groups
            self._saved_param_groups = None

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
        """Detach from the optimizer: later ``optimizer.step()`` calls are plain steps."""
        self._restore_param_groups()
        self._pre_handle.remove()
        self._post_handle.remove()

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

    def describe_selection(self) -> str:
        return ",".join(self.group_names[i] for i in self.selected)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The strategy's own state (save the optimizer's ``state_dict`` beside it)."""
        return {
            "type": type(self).__name__,
            "group_names": list(self.group_names),
            "group_sizes": [len(ps) for ps in self.group_params],
            "num_steps": self.num_steps,
            "counts": list(self.counts),
            "scale_sums": list(self.scale_sums),
            "selected": list(self.selected),
            "scales": list(self.scales),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("type") != type(self).__name__:
            raise ValueError(f"state_dict is from a {state.get('type')}, not a {type(self).__name__}")
        if list(state["group_names"]) != self.group_names or \
                list(state["group_sizes"]) != [len(ps) for ps in self.group_params]:
            raise ValueError(f"state_dict groups {state['group_names']} do not match this strategy's "
                             f"groups {self.group_names}")
        self.num_steps = int(state["num_steps"])
        self.counts = [int(c) for c in state["counts"]]
        self.scale_sums = [float(s) for s in state.get("scale_sums", self.counts)]
        self.selected = [int(i) for i in state["selected"]]
        self.scales = [float(s) for s in state["scales"]]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(groups={self.num_groups}, steps={self.num_steps})"

