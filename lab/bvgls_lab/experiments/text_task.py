"""A small real text-classification task built offline from Debian's fortune databases.

The Debian packages ``fortunes`` and ``fortunes-min`` install the BSD fortune cookie files
under ``/usr/share/games/fortunes``, one file per topic (``computers``, ``food``, ``law``, ...),
entries separated by a line holding only ``%``. The task: which topic file a fortune comes
from. The labels are the files' own categories, so nothing is labelled by hand.

Cleaning, in this order: backspace overstrikes (``_\\bX``, used for underlining) keep the
overstruck character; whitespace runs become one space; empty entries are dropped; an entry
that occurs twice in one file is kept once; an entry that occurs in two of the chosen files is
dropped from both (its label would be ambiguous).

Split: per class, the cleaned entries are shuffled with ``numpy.random.default_rng(seed)``
(one generator per class, seeded by ``(seed, class index)``), then the first ``test`` go to
test, the next ``val`` to validation and the next ``train`` (at most) to training. The split is
a function of the files' contents and ``seed`` only; :func:`build_fortune_task` records the
SHA-256 of every file it read and the package versions (``provenance``).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORTUNE_DIR = Path("/usr/share/games/fortunes")
DEBIAN_PACKAGES = ("fortunes", "fortunes-min")
#: topic files with at least 199 entries each, chosen to be about different things
DEFAULT_CLASSES = ("art", "computers", "education", "food", "law", "politics")
LICENCE = (
    "BSD (Debian copyright file of the fortunes packages: 'This program falls under the BSD copyright', "
    "Copyright (c) 1991 The Regents of the University of California; the entries are quotations "
    "collected by the fortune-mod authors)"
)
SETUP_HINT = "bash scripts/setup_text.sh"

_OVERSTRIKE = re.compile(r".\x08")
_SPACES = re.compile(r"\s+")


class TaskUnavailable(RuntimeError):
    """The fortune files are not installed (see :data:`SETUP_HINT`)."""


@dataclass
class TextTask:
    """Texts and integer labels per split, the class names, and where the data came from."""

    classes: list[str]
    splits: dict[str, tuple[list[str], list[int]]]
    provenance: dict = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {name: len(texts) for name, (texts, _) in self.splits.items()}


def parse_fortunes(text: str) -> list[str]:
    """The entries of one fortune file, cleaned (module docstring), in file order, duplicates kept."""
    entries, current = [], []
    for line in text.split("\n"):
        if line.rstrip("\r") == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    cleaned = (_SPACES.sub(" ", _OVERSTRIKE.sub("", e)).strip() for e in entries)
    return [e for e in cleaned if e]


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def read_class_files(root: Path, classes: tuple[str, ...]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Per class its unique cleaned entries, and per file its SHA-256."""
    missing = [c for c in classes if not (root / c).is_file()]
    if missing:
        raise TaskUnavailable(f"fortune file(s) {', '.join(missing)} not found under {root}; run {SETUP_HINT}")
    entries, digests = {}, {}
    for name in classes:
        raw = (root / name).read_bytes()
        digests[name] = hashlib.sha256(raw).hexdigest()
        entries[name] = _unique(parse_fortunes(raw.decode("utf-8", errors="replace")))
    return entries, digests


def drop_shared(entries: dict[str, list[str]]) -> tuple[dict[str, list[str]], int]:
    """Remove every entry that occurs in more than one class; returns the rest and how many were shared."""
    seen: dict[str, int] = {}
    for items in entries.values():
        for e in items:
            seen[e] = seen.get(e, 0) + 1
    shared = {e for e, n in seen.items() if n > 1}
    return {c: [e for e in items if e not in shared] for c, items in entries.items()}, len(shared)


def split_class(items: list[str], seed: int, index: int, train: int, val: int, test: int) -> dict[str, list[str]]:
    """Shuffle one class's entries (seeded by seed and class index) and cut test, val, train."""
    order = np.random.default_rng([seed, index]).permutation(len(items))
    shuffled = [items[i] for i in order]
    return {
        "test": shuffled[:test],
        "val": shuffled[test : test + val],
        "train": shuffled[test + val : test + val + train],
    }


def package_versions(packages: tuple[str, ...] = DEBIAN_PACKAGES) -> dict[str, str]:
    """Installed Debian package versions (empty where dpkg-query is missing or the package is not installed)."""
    if shutil.which("dpkg-query") is None:
        return {}
    out = {}
    for pkg in packages:
        res = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True)
        if res.returncode == 0 and res.stdout:
            out[pkg] = res.stdout
    return out


def build_fortune_task(
    root: Path | str = FORTUNE_DIR,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
    *,
    train: int = 80,
    val: int = 25,
    test: int = 50,
    seed: int = 0,
) -> TextTask:
    """The fortune-topic task (module docstring). Each class needs at least ``val + test + 1`` entries."""
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"need at least two distinct classes, got {list(classes)}")
    if min(train, val, test) < 1:
        raise ValueError(f"train, val and test must be >= 1 per class, got {train}, {val}, {test}")
    root = Path(root)
    entries, digests = read_class_files(root, tuple(classes))
    entries, shared = drop_shared(entries)
    small = {c: len(v) for c, v in entries.items() if len(v) < val + test + 1}
    if small:
        raise ValueError(f"class(es) with too few entries for val={val} + test={test} + 1 train: {small}")
    splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "val": ([], []), "test": ([], [])}
    for label, name in enumerate(classes):
        for part, texts in split_class(entries[name], seed, label, train, val, test).items():
            splits[part][0].extend(texts)
            splits[part][1].extend([label] * len(texts))
    provenance = {
        "source": str(root),
        "packages": package_versions(),
        "licence": LICENCE,
        "sha256": digests,
        "entries_after_cleaning": {c: len(v) for c, v in entries.items()},
        "dropped_shared_between_classes": shared,
        "seed": seed,
        "per_class": {"train_max": train, "val": val, "test": test},
    }
    return TextTask(list(classes), splits, provenance)
