"""Name -> builder registries (as in timm), so the CLI stays a thin layer over the library."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class Entry:
    """One registered builder: its name, the callable and a one-line help."""

    name: str
    build: Callable[..., Any]
    help: str = ""


def doc_summary(doc: str | None) -> str:
    """The first sentence of a docstring's first paragraph, joined onto one line (a help text
    never ends mid-sentence where the docstring wraps)."""
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    end = re.search(r"(?<!e\.g)(?<!i\.e)\.(\s|$)", paragraph)
    return paragraph[:end.start() + 1] if end else paragraph


class Registry(Generic[T]):
    """A named collection of builders, the one registry type behind models, datasets,
    strategies and grouping schemes. ``@REG.register("name", help=..., **fields)`` adds an
    entry (of ``entry_type``, which may carry more fields); ``REG.get(name)`` returns the
    builder or raises a ``KeyError`` whose message lists the known names; ``REG[name]`` the
    entry. ``forms`` are spellings that are not single names (``L<a>-<b>``, ``timm:<name>``),
    listed with the names by :meth:`rows` (what ``bvgls list`` prints)."""

    def __init__(self, kind: str, lazy_modules: tuple[str, ...] = (), *, entry_type: type[Entry] = Entry,
                 title: str = "", forms: dict[str, str] | None = None):
        self.kind = kind
        self.title = title or f"{kind}s"
        self.entry_type = entry_type
        self.forms = dict(forms or {})
        self._entries: dict[str, Entry] = {}
        # modules that register more entries, imported on the first lookup (they need
        # torchvision, which ``import bvgls`` must not)
        self._lazy_modules = lazy_modules

    def _load_lazy(self) -> None:
        modules, self._lazy_modules = self._lazy_modules, ()
        for name in modules:
            importlib.import_module(name)

    def add_lazy_module(self, module: str) -> None:
        """Import ``module`` (which registers entries) on the first lookup."""
        self._lazy_modules = (*self._lazy_modules, module)

    def register(self, name: str, help: str = "", **fields: Any):
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            self._entries[name] = self.entry_type(name, fn, help or doc_summary(fn.__doc__), **fields)
            return fn
        return deco

    def get(self, name: str) -> Callable[..., T]:
        return self[name].build

    def __getitem__(self, name: str) -> Entry:
        self._load_lazy()
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        self._load_lazy()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load_lazy()
        return len(self._entries)

    def entries(self) -> list[Entry]:
        """The entries in registration order."""
        self._load_lazy()
        return list(self._entries.values())

    def names(self) -> list[str]:
        self._load_lazy()
        return sorted(self._entries)

    def help(self, name: str) -> str:
        return self[name].help

    def rows(self) -> list[tuple[str, str]]:
        """(name, help) of every entry, then of every form."""
        return [(n, self[n].help) for n in self.names()] + list(self.forms.items())


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
MODELS: Registry = Registry("model", lazy_modules=("bvgls.bench", "bvgls.pretrained.register"), title="models (--model)", forms={
    "timm:<name>": "any timm model (needs timm)", "<model file>": "bvgls model.pt or a pickled nn.Module"})
#: name -> build(root: str, *, download: bool, input: ModelInput) -> DatasetSplits
DATASETS: Registry = Registry("dataset", lazy_modules=("bvgls.bench", "bvgls.pretrained.register"), title="datasets (--data)", forms={
    "<directory>": "ImageFolder root with train/ and test/ (or val/)"})
