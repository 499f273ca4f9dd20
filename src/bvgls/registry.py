"""Name -> builder registries (as in timm), so the CLI stays a thin layer over the library."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of builders. ``@REG.register("name")`` adds one; ``REG.get(name)``
    returns it or raises a ``KeyError`` whose message lists the known names."""

    def __init__(self, kind: str, lazy_modules: tuple[str, ...] = ()):
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}
        self._help: dict[str, str] = {}
        # modules that register more entries, imported on the first lookup (they need
        # torchvision, which ``import bvgls`` must not)
        self._lazy_modules = lazy_modules

    def _load_lazy(self) -> None:
        modules, self._lazy_modules = self._lazy_modules, ()
        for name in modules:
            importlib.import_module(name)

    def register(self, name: str, help: str = ""):
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            self._builders[name] = fn
            self._help[name] = help or (fn.__doc__ or "").strip().split("\n")[0]
            return fn
        return deco

    def get(self, name: str) -> Callable[..., T]:
        self._load_lazy()
        try:
            return self._builders[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def __contains__(self, name: str) -> bool:
        self._load_lazy()
        return name in self._builders

    def names(self) -> list[str]:
        self._load_lazy()
        return sorted(self._builders)

    def help(self, name: str) -> str:
        return self._help[name]


@dataclass
class DatasetSplits:
    """What a dataset builder returns: train and test sets of ``(image_tensor, label)``."""

    train: Any
    test: Any
    num_classes: int
    classes: list[str] = field(default_factory=list)
    name: str = ""


@dataclass
class ModelInput:
    """What a model expects as input; model builders attach it as ``model.bvgls_input``
    so dataset builders can make matching transforms. Default: ImageNet 224x224 RGB."""

    size: int = 224
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


#: name -> build(num_classes: int, weights: str | None = None) -> nn.Module (with .bvgls_input)
MODELS: Registry = Registry("model", lazy_modules=("bvgls.offline", "bvgls.pretrained.register"))
#: name -> build(root: str, *, download: bool, input: ModelInput) -> DatasetSplits
DATASETS: Registry = Registry("dataset", lazy_modules=("bvgls.offline", "bvgls.pretrained.register"))
