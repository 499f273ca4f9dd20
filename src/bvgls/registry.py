"""Name -> builder registries (as in timm), so the CLI stays a thin layer over the library."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of builders. ``@REG.register("name")`` adds one; ``REG.get(name)``
    returns it or raises a ``KeyError`` whose message lists the known names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = ""):
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            self._builders[name] = fn
            self._help[name] = help or (fn.__doc__ or "").strip().split("\n")[0]
            return fn
        return deco

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._builders[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def names(self) -> list[str]:
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
MODELS: Registry = Registry("model")
#: name -> build(root: str, *, download: bool, input: ModelInput) -> DatasetSplits
DATASETS: Registry = Registry("dataset")
