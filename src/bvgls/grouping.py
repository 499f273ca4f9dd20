"""Layer groups: split a model's parameters into the ordered groups a strategy selects from.

``layer_groups(model)`` picks a registered scheme by looking at the model (the paper's
6 groups for ResNets, embedding / blocks / head for ViTs, top-level children for any
other ``nn.Module``); ``scheme=`` names one, or gives ``[(group_name, regex), ...]``
patterns matched against parameter names (first match wins), like timm's
``group_matcher``. Register more schemes with :func:`register_grouping`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from .registry import Entry, Registry

NamedParams = list[tuple[str, nn.Parameter]]


@dataclass
class LayerGroups:
    """Ordered, named groups of ``(parameter_name, parameter)``; every parameter in one group."""

    groups: dict[str, NamedParams]
    scheme: str = "custom"
    #: parameter name -> class of the module that owns it (filled by :func:`layer_groups`), so
    #: strategies can find e.g. the normalisation layers without the model
    module_types: dict[str, type] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[str]:
        return iter(self.groups)

    def __getitem__(self, name: str) -> NamedParams:
        return self.groups[name]

    @property
    def names(self) -> list[str]:
        return list(self.groups)

    def named_param_lists(self) -> list[tuple[str, list[nn.Parameter]]]:
        return [(name, [p for _, p in items]) for name, items in self.groups.items()]

    def tensor_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """One group per parameter tensor, named by the parameter (for BVG-TS)."""
        return [(pname, [p]) for items in self.groups.values() for pname, p in items]

    def param_groups(self, **options) -> list[dict]:
        """Optimizer param groups, one per non-empty group of trainable parameters.

        Each dict carries ``"name"`` so strategies can report group names;
        ``options`` (e.g. ``weight_decay=0``) are copied into every group.
        """
        out = []
        for name, items in self.groups.items():
            params = [p for _, p in items if p.requires_grad]
            if params:
                out.append({"params": params, "name": name, **options})
        return out

    def index(self, name: str) -> int:
        return self.names.index(name)

    def describe(self) -> str:
        """A table of the groups: index, name, tensors, parameters, first/last tensor names."""
        rows = [("#", "group", "tensors", "params", "trainable", "from .. to")]
        total = trainable = 0
        for i, (name, items) in enumerate(self.groups.items()):
            n = sum(p.numel() for _, p in items)
            nt = sum(p.numel() for _, p in items if p.requires_grad)
            total, trainable = total + n, trainable + nt
            span = f"{items[0][0]} .. {items[-1][0]}" if len(items) > 1 else (items[0][0] if items else "-")
            rows.append((str(i + 1), name, str(len(items)), f"{n:,}", f"{nt:,}", span))
        rows.append(("", "total", str(sum(len(v) for v in self.groups.values())), f"{total:,}", f"{trainable:,}", ""))
        widths = [max(len(r[c]) for r in rows) for c in range(5)]
        lines = [f"layer groups ({self.scheme} scheme):"]
        for r in rows:
            lines.append(
                "  ".join(r[c].rjust(widths[c]) if c in (0, 2, 3, 4) else r[c].ljust(widths[c]) for c in range(5))
                + "  "
                + r[5]
            )
        return "\n".join(lines)

    __str__ = describe


# ---------------------------------------------------------------------- registry
@dataclass
class GroupingScheme(Entry):
    """A grouping scheme: ``build(model) -> {group_name: [(param_name, param), ...]}``."""

    detect: Callable[[nn.Module], bool] | None = None  # None: only when asked for by name


GROUPING_SCHEMES: Registry = Registry("grouping scheme", entry_type=GroupingScheme, title="grouping schemes (--groups)")


def register_grouping(name: str, detect: Callable[[nn.Module], bool] | None = None):
    """Decorator: register ``build(model) -> {group_name: [(param_name, param), ...]}``.

    Schemes with a ``detect`` function take part in ``scheme="auto"``; the newest
    registration is tried first, so a user's scheme wins over the built-in ones.
    """
    return GROUPING_SCHEMES.register(name, detect=detect)


def grouping_names() -> list[str]:
    return sorted(GROUPING_SCHEMES) + ["auto", "patterns (a list of (name, regex))"]


def layer_groups(model: nn.Module, scheme: str | Sequence | Mapping = "auto") -> LayerGroups:
    """Split ``model``'s parameters into ordered layer groups.

    Args:
        model: any ``nn.Module``.
        scheme: ``"auto"`` (detect), a registered name (see :func:`grouping_names`),
            or patterns: ``[(group_name, regex), ...]`` / ``{group_name: regex}``
            matched with ``re.search`` against parameter names, first match wins.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(scheme, str):
        if scheme == "auto":
            chosen = next(s for s in reversed(GROUPING_SCHEMES.entries()) if s.detect is not None and s.detect(model))
        elif scheme in GROUPING_SCHEMES:
            chosen = GROUPING_SCHEMES[scheme]
        else:
            raise ValueError(f"unknown grouping scheme {scheme!r}; known: {', '.join(grouping_names())}")
        groups, name = chosen.build(model), chosen.name
    else:
        groups, name = _group_by_patterns(model, scheme), "patterns"
    groups = {k: v for k, v in groups.items() if v}
    _check_partition(model, groups)
    return LayerGroups(groups, scheme=name, module_types=_module_types(model))


def _module_types(model: nn.Module) -> dict[str, type]:
    """Parameter name -> class of the module that owns it."""
    return {
        f"{path}.{pname}" if path else pname: type(module)
        for path, module in model.named_modules()
        for pname, _ in module.named_parameters(recurse=False)
    }


def _check_partition(model: nn.Module, groups: Mapping[str, NamedParams]) -> None:
    seen: dict[int, str] = {}
    for gname, items in groups.items():
        for pname, p in items:
            if id(p) in seen:
                raise ValueError(f"parameter {pname!r} is in groups {seen[id(p)]!r} and {gname!r}")
            seen[id(p)] = gname
    missing = [n for n, p in model.named_parameters() if id(p) not in seen]
    if missing:
        raise ValueError(
            f"{len(missing)} parameter(s) are in no group: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )


def _group_by_patterns(model: nn.Module, patterns: Sequence | Mapping) -> dict[str, NamedParams]:
    items = list(patterns.items()) if isinstance(patterns, Mapping) else list(patterns)
    try:
        compiled = [(str(g), re.compile(rx)) for g, rx in items]
    except (TypeError, ValueError, re.error) as e:
        raise ValueError(f"patterns must be (group_name, regex) pairs: {e}") from None
    groups: dict[str, NamedParams] = {g: [] for g, _ in compiled}
    unmatched = []
    for pname, p in model.named_parameters():
        for g, rx in compiled:
            if rx.search(pname):
                groups[g].append((pname, p))
                break
        else:
            unmatched.append(pname)
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} parameter(s) match no pattern: {', '.join(unmatched[:8])}"
            f"{' ...' if len(unmatched) > 8 else ''}"
        )
    return groups


def _by_rules(model: nn.Module, order: list[str], rule: Callable[[str], str]) -> dict[str, NamedParams]:
    """Assign each parameter to ``rule(name)``; groups appear in ``order``, then new ones."""
    groups: dict[str, NamedParams] = {g: [] for g in order}
    for pname, p in model.named_parameters():
        groups.setdefault(rule(pname), []).append((pname, p))
    return groups


# ---------------------------------------------------------------------- built-in schemes
@register_grouping("generic", detect=lambda m: True)
def _generic(model: nn.Module) -> dict[str, NamedParams]:
    """Top-level children in registration order, descending through single-child
    wrappers; parameters held directly by a module come first, as "<name>.params".
    Where that gives fewer than 3 groups and one child is a ``Sequential``/``ModuleList``
    holding most of the parameters (e.g. ``features`` + ``classifier``), that child is
    split into its own children, so selection has stages to choose from."""
    prefix, module = _unwrap_single_children(model)
    groups = _children_groups(module, prefix)
    if len(groups) < 3:
        total = sum(p.numel() for p in model.parameters())
        for name, child in module.named_children():
            held = sum(p.numel() for p in child.parameters())
            if isinstance(child, (nn.Sequential, nn.ModuleList)) and 2 * held > total:
                inner = _children_groups(child, f"{prefix}{name}.")
                if len(inner) >= 2:
                    groups = _splice(groups, prefix + name, inner)
                break
    return groups


def _splice(groups: dict[str, NamedParams], key: str, inner: dict[str, NamedParams]) -> dict[str, NamedParams]:
    """``groups`` with the group ``key`` replaced, in place, by the groups ``inner``."""
    out: dict[str, NamedParams] = {}
    for name, items in groups.items():
        out.update(inner if name == key else {name: items})
    return out


def _unwrap_single_children(model: nn.Module) -> tuple[str, nn.Module]:
    prefix, module = "", model
    while True:
        children = [(n, c) for n, c in module.named_children() if any(True for _ in c.parameters())]
        if len(children) == 1 and not any(True for _ in module.parameters(recurse=False)):
            name, module = children[0]
            prefix += name + "."
            continue
        return prefix, module


def _children_groups(module: nn.Module, prefix: str) -> dict[str, NamedParams]:
    """``{prefix + child: its parameters}``, the module's own parameters first."""
    groups: dict[str, NamedParams] = {}
    own = [(prefix + n, p) for n, p in module.named_parameters(recurse=False)]
    if own:
        groups[(prefix or "root.") + "params"] = own
    for name, child in module.named_children():
        items = [(f"{prefix}{name}.{n}", p) for n, p in child.named_parameters()]
        if items:
            groups[prefix + name] = items
    return groups


@register_grouping("tensor")
def _per_tensor(model: nn.Module) -> dict[str, NamedParams]:
    """One group per parameter tensor (what BVG-TS selects from)."""
    return {n: [(n, p)] for n, p in model.named_parameters()}


# ---------------------------------------------------------------------- torchvision families
# Stage groups as the paper groups ResNets: stem, one group per stage (a change of resolution
# or width; a downsampling layer goes with the stage it starts), the final 1x1 conv where the
# family has one, and the head (with the final norm where there is one). Detected by class
# name (torchvision's, or a subclass) plus the attributes the rule uses.
def _has_class(model: nn.Module, *names: str) -> bool:
    return any(cls.__name__ in names for cls in type(model).__mro__)


def _child_index_rule(container: str, label: Callable[[int], str], other: Callable[[str], str]):
    """rule(name): ``label(i)`` for parameters under ``container.<i>.``, else ``other(name)``."""
    head = container + "."

    def rule(name: str) -> str:
        if name.startswith(head):
            return label(int(name[len(head) :].split(".", 1)[0]))
        return other(name)

    return rule


def _head_rule(name: str) -> str:
    return "head"


def _out_channels(block: nn.Module) -> int | None:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else None


def _is_mobilenet(model: nn.Module) -> bool:
    return (
        _has_class(model, "MobileNetV2", "MobileNetV3")
        and isinstance(getattr(model, "features", None), nn.Sequential)
        and hasattr(model, "classifier")
    )


@register_grouping("mobilenet", detect=_is_mobilenet)
def _mobilenet(model: nn.Module) -> dict[str, NamedParams]:
    """torchvision MobileNetV2/V3: stem, one stage per run of blocks of one output width, final conv, head."""
    n = len(model.features)
    labels, stage, width = {0: "stem", n - 1: "final"}, 0, None
    for i in range(1, n - 1):
        out = _out_channels(model.features[i])
        if out != width:
            stage, width = stage + 1, out
        labels[i] = f"stage{stage}"
    order = ["stem"] + [f"stage{k}" for k in range(1, stage + 1)] + ["final", "head"]
    return _by_rules(model, order, _child_index_rule("features", labels.__getitem__, _head_rule))


def _is_efficientnet(model: nn.Module) -> bool:
    return _has_class(model, "EfficientNet") and isinstance(getattr(model, "features", None), nn.Sequential)


@register_grouping("efficientnet", detect=_is_efficientnet)
def _efficientnet(model: nn.Module) -> dict[str, NamedParams]:
    """torchvision EfficientNet B0-B7 / V2: stem, each stage (``features[1..-2]``), final conv, head."""
    n = len(model.features)

    def label(i: int) -> str:
        return "stem" if i == 0 else "final" if i == n - 1 else f"stage{i}"

    return _by_rules(
        model,
        ["stem"] + [f"stage{i}" for i in range(1, n - 1)] + ["final", "head"],
        _child_index_rule("features", label, _head_rule),
    )


def _is_downsampled_stages(model: nn.Module) -> bool:
    return _has_class(model, "ConvNeXt", "SwinTransformer") and isinstance(
        getattr(model, "features", None), nn.Sequential
    )


@register_grouping("convnext-swin", detect=_is_downsampled_stages)
def _downsampled_stages(model: nn.Module) -> dict[str, NamedParams]:
    """torchvision ConvNeXt / Swin: stem (patch embedding), 4 stages (each with the downsampling
    or patch merging before it), head (final norm + classifier)."""
    n = len(model.features)

    def label(i: int) -> str:
        return "stem" if i == 0 else f"stage{i // 2 + 1}"

    return _by_rules(
        model,
        ["stem"] + [f"stage{k}" for k in range(1, n // 2 + 1)] + ["head"],
        _child_index_rule("features", label, _head_rule),
    )


def _is_densenet(model: nn.Module) -> bool:
    return _has_class(model, "DenseNet") and hasattr(getattr(model, "features", None), "denseblock1")


@register_grouping("densenet", detect=_is_densenet)
def _densenet(model: nn.Module) -> dict[str, NamedParams]:
    """torchvision DenseNet: stem (conv0 + norm0), 4 stages (dense block, with the transition
    before it), head (norm5 + classifier)."""
    rx = re.compile(r"features\.(denseblock|transition)(\d+)\.")

    def rule(name: str) -> str:
        m = rx.match(name)
        if m:
            return f"stage{int(m.group(2)) + (m.group(1) == 'transition')}"
        return "stem" if re.match(r"features\.(conv|norm)0\.", name) else "head"

    blocks = sum(1 for n, _ in model.features.named_children() if n.startswith("denseblock"))
    return _by_rules(model, ["stem"] + [f"stage{k}" for k in range(1, blocks + 1)] + ["head"], rule)


def _is_regnet(model: nn.Module) -> bool:
    return _has_class(model, "RegNet") and all(hasattr(model, a) for a in ("stem", "trunk_output", "fc"))


@register_grouping("regnet", detect=_is_regnet)
def _regnet(model: nn.Module) -> dict[str, NamedParams]:
    """torchvision RegNet: stem, each trunk block (stage), head (fc)."""
    names = [n for n, _ in model.trunk_output.named_children()]

    def rule(name: str) -> str:
        top, _, rest = name.partition(".")
        if top == "trunk_output":
            return f"stage{names.index(rest.split('.', 1)[0]) + 1}"
        return "stem" if top == "stem" else "head"

    return _by_rules(model, ["stem"] + [f"stage{k}" for k in range(1, len(names) + 1)] + ["head"], rule)


def _is_maxvit(model: nn.Module) -> bool:
    return (
        _has_class(model, "MaxVit")
        and isinstance(getattr(model, "blocks", None), nn.ModuleList)
        and hasattr(model, "stem")
    )


@register_grouping("maxvit", detect=_is_maxvit)
def _maxvit(model: nn.Module) -> dict[str, NamedParams]:
    """torchvision MaxViT: stem, each stage (``blocks[i]``), head (classifier with its norm)."""
    n = len(model.blocks)
    rule = _child_index_rule(
        "blocks", lambda i: f"stage{i + 1}", lambda name: "stem" if name.startswith("stem.") else "head"
    )
    return _by_rules(model, ["stem"] + [f"stage{k}" for k in range(1, n + 1)] + ["head"], rule)


# ---------------------------------------------------------------------- timm models
# timm declares each architecture's stages itself (``group_matcher``); ``coarse=True`` gives
# stem, one group per stage, head, which is what layer selection needs.
def _is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and callable(getattr(model, "group_matcher", None))


def _timm_group_label(names: list[str]) -> str:
    """A group's label: its parameters' distinct module paths up to the first index (``blocks.3``)."""
    keys: list[str] = []
    for name in names:
        parts = name.split(".")
        cut = next((k + 1 for k, part in enumerate(parts[:-1]) if part.isdigit()), 1)
        key = ".".join(parts[:cut])
        if key not in keys:
            keys.append(key)
    return "+".join(keys)


@register_grouping("timm", detect=_is_timm_model)
def _timm(model: nn.Module) -> dict[str, NamedParams]:
    """timm models: the architecture's own ``group_matcher(coarse=True)`` stages, in order."""
    from timm.models import group_parameters

    by_id = group_parameters(model, model.group_matcher(coarse=True))
    params = dict(model.named_parameters())
    groups: dict[str, NamedParams] = {}
    for k, gid in enumerate(sorted(by_id)):
        names = list(by_id[gid])
        label = "stem" if k == 0 else _timm_group_label(names)
        groups[label if label not in groups else f"{label}#{k}"] = [(n, params[n]) for n in names]
    return groups


def _is_resnet(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("conv1", "layer1", "layer2", "layer3", "layer4", "fc"))


@register_grouping("resnet", detect=_is_resnet)
def _resnet(model: nn.Module) -> dict[str, NamedParams]:
    """The paper's 6 groups: stem (conv1 + bn1), layer1..layer4, fc (torchvision or timm)."""

    def rule(name: str) -> str:
        top = name.split(".", 1)[0]
        return top if top in ("layer1", "layer2", "layer3", "layer4", "fc") else "stem"

    return _by_rules(model, ["stem", "layer1", "layer2", "layer3", "layer4", "fc"], rule)


def _vit_rule(block_prefix: str, head_prefixes: tuple[str, ...]):
    rx = re.compile(re.escape(block_prefix) + r"([^.]+)\.")

    def rule(name: str) -> str:
        m = rx.match(name)
        if m:
            digits = re.findall(r"\d+", m.group(1))
            return f"block{digits[-1]}" if digits else m.group(1)
        if name.startswith(head_prefixes):
            return "head"
        return "embed"

    return rule


def _is_timm_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList))


@register_grouping("vit", detect=_is_timm_vit)
def _timm_vit(model: nn.Module) -> dict[str, NamedParams]:
    """timm ViTs as in the paper: [cls_token + pos_embed + patch_embed, each block, norm + head]."""
    n = len(model.blocks)
    rule = _vit_rule("blocks.", ("norm.", "fc_norm.", "head.", "attn_pool.", "head_drop."))
    return _by_rules(model, ["embed"] + [f"block{i}" for i in range(n)] + ["head"], rule)


def _is_torchvision_vit(model: nn.Module) -> bool:
    enc = getattr(model, "encoder", None)
    return hasattr(model, "conv_proj") and hasattr(enc, "layers") and hasattr(model, "heads")


@register_grouping("torchvision-vit", detect=_is_torchvision_vit)
def _torchvision_vit(model: nn.Module) -> dict[str, NamedParams]:
    """torchvision ``vit_*``: [class_token + conv_proj + pos_embedding, each encoder layer, encoder.ln + heads]."""
    n = len(model.encoder.layers)
    rule = _vit_rule("encoder.layers.", ("encoder.ln.", "heads."))
    return _by_rules(model, ["embed"] + [f"block{i}" for i in range(n)] + ["head"], rule)


# ---------------------------------------------------------------------- transformers models
# Duck-typed on ``config`` + ``base_model_prefix`` (what every transformers ``PreTrainedModel``
# has), so ``import bvgls`` never imports transformers. The blocks are found as the
# outermost ``nn.ModuleList``s of same-class modules (``bert.encoder.layer``, ``transformer.h``,
# ``model.layers``, ``vit.layers``, ``encoder.block`` + ``decoder.block``, ...).
def _transformer_block_lists(model: nn.Module) -> list[str]:
    found: list[tuple[str, str]] = []
    for path, module in model.named_modules():
        if not path or not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(outer + ".") for outer, _ in found):
            continue  # a list inside a block (e.g. T5's per-block sub-layers)
        kinds = {type(child).__name__ for child in module}
        if len(kinds) == 1 and any(True for _ in module.parameters()):
            found.append((path, kinds.pop()))
    # transformers names its block classes in _no_split_modules: prefer those lists when present
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    preferred = [path for path, kind in found if kind in block_classes]
    return preferred or [path for path, _ in found]


def _is_transformers_model(model: nn.Module) -> bool:
    return (
        hasattr(model, "config")
        and isinstance(getattr(model, "base_model_prefix", None), str)
        and bool(_transformer_block_lists(model))
    )


@register_grouping("transformers", detect=_is_transformers_model)
def _transformers(model: nn.Module) -> dict[str, NamedParams]:
    """Hugging Face transformers models: [embeddings, each block, final norm + head].

    Encoder-decoder and multi-tower models (T5, BART, CLIP) get one group per block of
    every stack, named ``<stack>.block<i>``; parameters between two stacks go to
    ``<next stack>.embed`` if they belong to it, else to ``<previous stack>.final``.
    """
    stacks = _transformer_block_lists(model)
    if not stacks:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of transformer blocks; use scheme='generic' or patterns"
        )
    owners = [path.split(".")[:-1] for path in stacks]
    common = 0
    while all(len(o) > common for o in owners) and len({o[common] for o in owners}) == 1:
        common += 1
    labels = [o[common] if len(o) > common else path for o, path in zip(owners, stacks)]
    if len(set(labels)) < len(labels):
        labels = list(stacks)
    roots = [".".join(o[: common + 1]) + "." for o in owners]
    prefix = [""] if len(stacks) == 1 else [label + "." for label in labels]
    named = list(model.named_parameters())

    def block_of(name: str) -> tuple[int, str] | None:
        for j, path in enumerate(stacks):
            if name.startswith(path + "."):
                return j, f"{prefix[j]}block{name[len(path) + 1 :].split('.', 1)[0]}"
        return None

    located = [block_of(name) for name, _ in named]
    stack_before, stack_after, last = [], [None] * len(named), None
    for loc in located:  # the stack of the nearest block parameter before / after each parameter
        stack_before.append(last)
        last = loc[0] if loc is not None else last
    for k in range(len(named) - 2, -1, -1):
        nxt = located[k + 1]
        stack_after[k] = nxt[0] if nxt is not None else stack_after[k + 1]
    groups: dict[str, NamedParams] = {"embed": []}
    for k, (name, p) in enumerate(named):
        if located[k] is not None:
            groups.setdefault(located[k][1], []).append((name, p))
            continue
        before, after = stack_before[k], stack_after[k]
        if before is None:
            group = "embed"
        elif after is None:
            group = "head"
        elif name.startswith(roots[after]):
            group = f"{labels[after]}.embed"
        else:
            group = f"{labels[before]}.final"
        groups.setdefault(group, []).append((name, p))
    return groups


# ---------------------------------------------------------------------- any CNN: by resolution
# The paper's WRN-50-2 groups are one per feature-map resolution (stem, layer1..layer4) plus the
# head. Found from the model itself: a dummy image goes through it, and every *unit* (a module
# that is not a container of blocks) is labelled with the output stride of what it returns, so a
# block that downsamples inside (a bottleneck's 1x1 conv runs before its strided conv) goes with
# the resolution it produces, i.e. with the stage it starts. Units returning no spatial map
# (after global pooling) are the head.
RESOLUTION_TRACE_PX = 224


def _is_container(module: nn.Module) -> bool:
    """A Sequential/ModuleList/ModuleDict holding blocks (children that have children), i.e. one
    to descend into; one of leaf layers (conv + norm + act) is a unit itself."""
    return isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and any(
        any(True for _ in child.children()) for child in module.children()
    )


def _units(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if _is_container(child):
            yield from _units(child, f"{prefix}{name}.")
        else:
            yield prefix + name, child


def _first_tensor(output):
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return None


def _trace_strides(model: nn.Module, units: list[tuple[str, nn.Module]], px: int) -> dict[str, int | None]:
    """unit name -> output stride of its (first) output, None when it returns no spatial map."""
    import torch

    strides: dict[str, int | None] = {}

    def hook(name):
        def record(module, args, output):
            out = _first_tensor(output)
            if name not in strides:
                spatial = out is not None and out.dim() == 4 and tuple(out.shape[-2:]) != (1, 1)
                strides[name] = round(px / out.shape[-1]) if spatial else None

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in units]
    param = next(model.parameters())
    channels = getattr(getattr(model, "bvgls_input", None), "channels", 3)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, channels, px, px, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return strides


@register_grouping("resolution")
def _resolution(model: nn.Module) -> dict[str, NamedParams]:
    """Any CNN: stem (the first resolution), one group per further output stride (``stride<k>``),
    head (whatever runs after the last feature map, and units that did not run in the trace)."""
    units = list(_units(model))
    strides = _trace_strides(model, units, RESOLUTION_TRACE_PX)
    if not any(s is not None for s in strides.values()):
        raise ValueError(
            f"{type(model).__name__} returns no 4-d feature maps (NCHW) from its layers: the "
            "resolution scheme needs a CNN"
        )
    label: dict[str, str] = {}
    seen: list[int] = []
    for name, _ in units:
        stride = strides.get(name)
        if stride is not None and stride not in seen:
            seen.append(stride)
        label[name] = "head" if stride is None else "stem" if stride == seen[0] else f"stride{stride}"
    own = [(n, p) for n, p in model.named_parameters(recurse=False)]
    groups: dict[str, NamedParams] = {"stem": own}
    for name, module in units:
        groups.setdefault(label[name], []).extend((f"{name}.{n}", p) for n, p in module.named_parameters())
    groups["head"] = groups.pop("head", [])
    return {k: v for k, v in groups.items() if v}
