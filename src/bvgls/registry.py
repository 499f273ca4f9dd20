"""Name -> builder registries (as in timm), so the CLI stays a thin layer over the library."""

from __future__ import annotations

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
    return paragraph[: end.start() + 1] if end else paragraph


class Registry(Generic[T]):
    """A named collection of builders, the one registry type behind models, datasets,
    strategies and grouping schemes. ``@REG.register("name", help=..., **fields)`` adds an
    entry (of ``entry_type``, which may carry more fields); ``REG.get(name)`` returns the
    builder or raises a ``KeyError`` whose message lists the known names; ``REG[name]`` the
    entry. ``forms`` are spellings that are not single names (``L<a>-<b>``, ``timm:<name>``),
    listed with the names by :meth:`rows` (what ``bvgls list`` prints)."""

    def __init__(
        self, kind: str, *, entry_type: type[Entry] = Entry, title: str = "", forms: dict[str, str] | None = None
    ):
        self.kind = kind
        self.title = title or f"{kind}s"
        self.entry_type = entry_type
        self.forms = dict(forms or {})
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, help: str = "", **fields: Any):
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            self._entries[name] = self.entry_type(name, fn, help or doc_summary(fn.__doc__), **fields)
            return fn

        return deco

    def get(self, name: str) -> Callable[..., T]:
        return self[name].build

    def __getitem__(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Entry]:
        """The entries in registration order."""
        return list(self._entries.values())

    def names(self) -> list[str]:
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


# The library's own entries are registered by :mod:`bvgls.runner.models` and :mod:`bvgls.runner.data`
# (imported with :mod:`bvgls.runner`); other packages add theirs through the ``bvgls.plugins``
# entry point group, which the command line loads (:func:`bvgls.cli.load_plugins`). A lookup
# here imports nothing.

#: name -> build(num_classes: int, weights: str | None = None) -> nn.Module (with .bvgls_input)
MODELS: Registry = Registry(
    "model",
    title="models (--model)",
    forms={"timm:<name>": "any timm model (needs timm)", "<model file>": "bvgls model.pt or a pickled nn.Module"},
)
#: name -> build(root: str, *, download: bool, input: ModelInput) -> DatasetSplits
DATASETS: Registry = Registry(
    "dataset", title="datasets (--data)", forms={"<directory>": "ImageFolder root with train/ and test/ (or val/)"}
)
