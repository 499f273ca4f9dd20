"""Few-shot target tasks built from package-registry data: emoji across vendors, Open Clip Art topics.

Each task is written by :func:`build_image_task` as an ImageFolder (``train/``, ``val/``, ``test/``,
one folder per class, 144 px RGB PNGs on white, so 112-128 px crops are possible) with a
``manifest.json`` (counts per class, sources with versions, licences and SHA-256 of the inputs,
and where each image came from). The draw is deterministic given the seed:

- ``emoji-vendor`` / ``emoji-sub``: the emoji of each class are split between train, val and
  test; train and val are Google's Noto drawings, test is Twitter's Twemoji drawings of the
  *held-out* emoji (a new vendor and new emoji: the vendor shift of the issue). Classes are
  Unicode categories (without Flags and Component) / a dozen visual subcategories, from
  ``emoji-datasource-google``'s ``emoji.json``.
- ``clipart-coarse`` / ``clipart-fine``: Open Clip Art PNGs (Debian ``openclipart-png``)
  labelled by topic folder / sub-folder. Byte-identical files are kept once (and dropped when
  they sit in two classes); files over 16 megapixels (by their PNG header) are skipped
  before decoding.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .assets import AssetUnavailable, cache_dir, run_tool, sha256_file, tasks_dir

logger = logging.getLogger(__name__)

TASK_FORMAT = "bvgls-task-v1"
RESOLUTION = 144
MAX_PIXELS = 16_000_000
DEBIAN_OPENCLIPART = "/usr/share/openclipart/png"
EMOJI_NPM_PACKAGES = ("@iconify-json/noto@1.2.9", "@iconify-json/twemoji@1.2.5", "emoji-datasource-google@16.0.0")
EMOJI_VENDORS = {"train": "noto", "val": "noto", "test": "twemoji"}
LICENCES = {
    "noto": "Apache-2.0 (Google Noto Emoji, via @iconify-json/noto)",
    "twemoji": "CC-BY-4.0 (Twitter Twemoji, via @iconify-json/twemoji)",
    "emoji-datasource-google": "MIT (emoji.json metadata)",
    "openclipart-png": "public domain (Open Clip Art Library 0.18, Debian openclipart-png)",
}
BUILD_HINT = "bash scripts/setup_pretrained.sh"


@dataclass(frozen=True)
class TaskSpec:
    """A task: its classes (label -> selectors of source items) and its per-class split sizes.

    Selectors: for emoji, ``"cat:<Unicode category>"`` or ``"sub:<subcategory>"``; for clip art,
    folders under the PNG root (recursive), with ``"-<folder>"`` excluding a sub-tree.
    Per class: ``shots`` training images (fewer if the class is small, keeping ``val`` and at
    least ``min_test``), ``val`` validation images, the rest (at most ``test_cap``) for test.
    """

    name: str
    source: str
    classes: dict[str, tuple[str, ...]]
    shots: int
    val: int
    test_cap: int
    min_test: int
    help: str = ""
    notes: tuple[str, ...] = field(default=())


def _emoji_categories() -> dict[str, tuple[str, ...]]:
    cats = [
        "Smileys & Emotion",
        "People & Body",
        "Animals & Nature",
        "Food & Drink",
        "Travel & Places",
        "Activities",
        "Objects",
        "Symbols",
    ]
    return {c.lower().replace(" & ", "-").replace(" ", "-"): (f"cat:{c}",) for c in cats}


TASK_SPECS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "emoji-vendor",
            "emoji",
            _emoji_categories(),
            shots=30,
            val=10,
            test_cap=60,
            min_test=20,
            help="8 Unicode emoji categories; train/val on Noto drawings, test on Twemoji drawings of other emoji",
        ),
        TaskSpec(
            "emoji-sub",
            "emoji",
            {
                "mammals": ("sub:animal-mammal",),
                "birds": ("sub:animal-bird",),
                "marine": ("sub:animal-marine",),
                "bugs": ("sub:animal-bug",),
                "fruit": ("sub:food-fruit",),
                "vegetables": ("sub:food-vegetable",),
                "prepared-food": ("sub:food-prepared",),
                "drinks": ("sub:drink",),
                "transport-ground": ("sub:transport-ground",),
                "transport-air": ("sub:transport-air",),
                "clothing": ("sub:clothing",),
                "buildings": ("sub:place-building",),
            },
            shots=10,
            val=3,
            test_cap=30,
            min_test=3,
            help="12 emoji subcategories (mammals ... buildings); train/val Noto, test Twemoji of other emoji",
        ),
        TaskSpec(
            "clipart-coarse",
            "clipart",
            {
                "animals": ("animals",),
                "buildings": ("buildings",),
                "food": ("food",),
                "office": ("office",),
                "people": ("people",),
                "plants": ("plants",),
                "tools": ("tools",),
                "transportation": ("transportation", "-transportation/roadsigns", "-transportation/aiga-symbols"),
            },
            shots=30,
            val=10,
            test_cap=60,
            min_test=30,
            help="8 Open Clip Art topics (animals, buildings, food, office, people, plants, tools, transportation)",
        ),
        TaskSpec(
            "clipart-fine",
            "clipart",
            {
                "mammals": ("animals/mammals",),
                "birds": ("animals/birds",),
                "bugs": ("animals/bugs",),
                "fruit": ("food/fruit",),
                "desserts": ("food/desserts",),
                "drinks": ("food/beverages",),
                "vehicles": ("transportation/vehicles",),
                "music": ("recreation/music",),
                "flowers": ("plants/flowers",),
                "homes": ("buildings/homes",),
            },
            shots=20,
            val=6,
            test_cap=40,
            min_test=8,
            help="10 Open Clip Art sub-topics (mammals, birds, bugs, fruit, desserts, drinks, vehicles, music, "
            "flowers, homes)",
        ),
    )
}


def image_task_names() -> list[str]:
    return list(TASK_SPECS)


def _spec(name: str) -> TaskSpec:
    if name not in TASK_SPECS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASK_SPECS)}")
    return TASK_SPECS[name]


# ---------------------------------------------------------------------- items and splits
@dataclass(frozen=True)
class Item:
    """One source image: a stable id, the file or emoji it comes from, and its input checksum."""

    id: str
    origin: str
    sha256: str


def split_counts(n: int, spec: TaskSpec) -> tuple[int, int, int]:
    """(train, val, test) sizes for a class of ``n`` items under ``spec``."""
    train = min(spec.shots, n - spec.val - spec.min_test)
    if train < 2:
        raise ValueError(
            f"a class of {n} items is too small for {spec.name} "
            f"({spec.val} val + {spec.min_test} test + at least 2 shots)"
        )
    return train, spec.val, min(spec.test_cap, n - train - spec.val)


def draw_splits(items: dict[str, list[Item]], spec: TaskSpec, seed: int) -> dict[str, dict[str, list[Item]]]:
    """``{split: {class: items}}``: each class's items (sorted by id) shuffled with ``(seed, class index)``."""
    out: dict[str, dict[str, list[Item]]] = {"train": {}, "val": {}, "test": {}}
    for k, label in enumerate(spec.classes):
        pool = sorted(items[label], key=lambda it: it.id)
        order = np.random.default_rng([seed, k]).permutation(len(pool))
        n_train, n_val, n_test = split_counts(len(pool), spec)
        picked = [pool[i] for i in order]
        out["train"][label] = picked[:n_train]
        out["val"][label] = picked[n_train : n_train + n_val]
        out["test"][label] = picked[n_train + n_val : n_train + n_val + n_test]
    return out


# ---------------------------------------------------------------------- clip art
def png_size(path: Path) -> tuple[int, int] | None:
    """Width and height from a PNG's header (no decoding); None if it is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return struct.unpack(">II", head[16:24])


def _clipart_files(root: Path, selectors: tuple[str, ...]) -> list[Path]:
    include = [root / s for s in selectors if not s.startswith("-")]
    exclude = [root / s[1:] for s in selectors if s.startswith("-")]
    files = []
    for folder in include:
        for path in sorted(folder.rglob("*.png")):
            if not any(path.is_relative_to(ex) for ex in exclude):
                files.append(path)
    return files


def clipart_items(root: Path, spec: TaskSpec, skipped: list[str]) -> dict[str, list[Item]]:
    """Each class's usable files: PNGs under its folders, at most :data:`MAX_PIXELS`, duplicates
    (same bytes) kept once and dropped entirely when they sit in two classes."""
    owner: dict[str, set[str]] = {}
    found: dict[str, dict[str, Item]] = {label: {} for label in spec.classes}
    for label, selectors in spec.classes.items():
        for path in _clipart_files(root, selectors):
            size = png_size(path)
            rel = str(path.relative_to(root))
            if size is None or size[0] * size[1] > MAX_PIXELS:
                skipped.append(f"{rel}: {'not a PNG' if size is None else f'{size[0]}x{size[1]} px'}")
                continue
            digest = sha256_file(path)
            owner.setdefault(digest, set()).add(label)
            found[label].setdefault(digest, Item(rel, str(path), digest))
    for digest, labels in owner.items():
        if len(labels) > 1:
            skipped.append(f"{found[sorted(labels)[0]][digest].id}: same image in {', '.join(sorted(labels))}")
            for label in labels:
                del found[label][digest]
    return {label: list(items.values()) for label, items in found.items()}


def render_clipart(item: Item, vendor: str, size: int):
    """A clip-art file fitted into a ``size`` square, centred on white."""
    from PIL import Image

    with Image.open(item.origin) as image:
        rgba = image.convert("RGBA")
    rgba.thumbnail((size, size), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(rgba, ((size - rgba.width) // 2, (size - rgba.height) // 2), rgba)
    return canvas


# ---------------------------------------------------------------------- emoji
def emoji_root() -> Path:
    """The npm packages' ``node_modules`` (installed into ``<cache>/npm``)."""
    return cache_dir() / "npm" / "node_modules"


def openclipart_root() -> Path:
    """``$BVGLS_OPENCLIPART`` (a copy of the PNG tree elsewhere), else the Debian package's."""
    return Path(os.environ.get("BVGLS_OPENCLIPART") or DEBIAN_OPENCLIPART)


@dataclass
class EmojiSources:
    """The two vendors' icon sets (iconify JSON) and the Unicode metadata (emoji.json)."""

    root: Path
    icons: dict[str, dict] = field(default_factory=dict)
    chars: dict[str, dict] = field(default_factory=dict)
    meta: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, root: Path) -> EmojiSources:
        src = cls(root)
        for vendor in ("noto", "twemoji"):
            src.icons[vendor] = json.loads((root / "@iconify-json" / vendor / "icons.json").read_text())
            src.chars[vendor] = json.loads((root / "@iconify-json" / vendor / "chars.json").read_text())
        src.meta = json.loads((root / "emoji-datasource-google" / "emoji.json").read_text())
        return src

    def icon_name(self, vendor: str, entry: dict) -> str | None:
        """The vendor's icon for an emoji.json entry (fully-qualified, unqualified, or without FE0F)."""
        chars = self.chars[vendor]
        unified = entry["unified"].lower()
        for key in (unified, (entry.get("non_qualified") or "").lower(), unified.replace("-fe0f", "")):
            if key and key in chars:
                return chars[key]
        return None

    def svg(self, vendor: str, name: str) -> str:
        """The icon as a standalone SVG document (aliases resolved to their parent icon)."""
        data = self.icons[vendor]
        seen = 0
        while name not in data["icons"] and name in data.get("aliases", {}) and seen < 8:
            name, seen = data["aliases"][name]["parent"], seen + 1
        icon = data["icons"][name]
        left, top = icon.get("left", data.get("left", 0)), icon.get("top", data.get("top", 0))
        width, height = icon.get("width", data.get("width", 16)), icon.get("height", data.get("height", 16))
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{left} {top} {width} {height}">{icon["body"]}</svg>'
        )

    def input_checksums(self) -> dict[str, str]:
        files = [
            "@iconify-json/noto/icons.json",
            "@iconify-json/twemoji/icons.json",
            "emoji-datasource-google/emoji.json",
        ]
        return {f: sha256_file(self.root / f) for f in files}


def emoji_items(sources: EmojiSources, spec: TaskSpec, skipped: list[str]) -> dict[str, list[Item]]:
    """Each class's emoji that both vendors draw; ``origin`` is ``"<noto icon>|<twemoji icon>"``."""
    found: dict[str, list[Item]] = {label: [] for label in spec.classes}
    for entry in sources.meta:
        keys = {f"cat:{entry['category']}", f"sub:{entry['subcategory']}"}
        label = next((lab for lab, sel in spec.classes.items() if keys & set(sel)), None)
        if label is None:
            continue
        names = [sources.icon_name(v, entry) for v in ("noto", "twemoji")]
        if None in names:
            skipped.append(f"{entry['unified']} ({entry.get('short_name')}): not drawn by both vendors")
            continue
        found[label].append(Item(entry["unified"], "|".join(names), ""))
    return found


def make_emoji_renderer(sources: EmojiSources) -> Callable:
    def render(item: Item, vendor: str, size: int):
        import io

        import cairosvg
        from PIL import Image

        name = item.origin.split("|")[0 if vendor == "noto" else 1]
        png = cairosvg.svg2png(bytestring=sources.svg(vendor, name).encode(), output_width=size, output_height=size)
        rgba = Image.open(io.BytesIO(png)).convert("RGBA")
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(rgba, (0, 0), rgba)
        return canvas

    return render


# ---------------------------------------------------------------------- building
def ensure_sources(source: str) -> Path:
    """Install the npm packages / the Debian package a task source needs (idempotent); its root."""
    if source == "emoji":
        root = emoji_root()
        if not (root / "emoji-datasource-google" / "emoji.json").is_file():
            run_tool(
                [
                    "npm",
                    "install",
                    "--prefix",
                    str(root.parent),
                    "--no-audit",
                    "--no-fund",
                    "--no-save",
                    *EMOJI_NPM_PACKAGES,
                ],
                "emoji tasks",
            )
            logger.info(f"emoji sources: installed {', '.join(EMOJI_NPM_PACKAGES)} into {root.parent}")
        try:
            import cairosvg  # noqa: F401  - the renderer
        except (ImportError, OSError) as e:
            raise AssetUnavailable(
                f"emoji tasks: cairosvg cannot be imported ({type(e).__name__}); "
                "pip install cairosvg (it needs the system cairo library)"
            ) from None
        return root
    root = openclipart_root()
    if not root.is_dir():
        run_tool(["apt-get", "install", "-y", "--no-install-recommends", "openclipart-png"], "clip-art tasks")
        logger.info("clip-art sources: installed the Debian package openclipart-png")
    return root


def build_image_task(
    name: str, out_dir: str | os.PathLike | None = None, seed: int = 0, *, source_root: str | os.PathLike | None = None
) -> Path:
    """Build task ``name`` as an ImageFolder with a manifest in ``out_dir`` (default
    ``<tasks dir>/<name>``); idempotent: an existing build of the same spec and seed is kept.

    ``source_root``: the clip-art PNG root or the npm ``node_modules`` folder (default: the
    installed ones, installed first with apt-get / npm if missing).
    """
    spec = _spec(name)
    out = Path(out_dir) if out_dir is not None else tasks_dir() / name
    key = {"spec": _spec_record(spec), "seed": seed, "resolution": RESOLUTION}
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("key") == key:
        logger.info(f"{name}: present at {out}")
        return out
    _check_replaceable(out)
    root = Path(source_root) if source_root is not None else ensure_sources(spec.source)
    skipped: list[str] = []
    if spec.source == "emoji":
        sources = EmojiSources.load(root)
        items, render = emoji_items(sources, spec, skipped), make_emoji_renderer(sources)
        inputs, vendors = sources.input_checksums(), EMOJI_VENDORS
    else:
        items, render = clipart_items(root, spec, skipped), render_clipart
        inputs, vendors = {}, {"train": "openclipart", "val": "openclipart", "test": "openclipart"}
    splits = draw_splits(items, spec, seed)
    staging = out.with_name(f".{out.name}.partial")  # an interrupted build leaves only this behind
    manifest = _write_images(splits, staging, render, vendors)
    manifest.update(
        key=key,
        task=name,
        format=TASK_FORMAT,
        seed=seed,
        resolution=RESOLUTION,
        classes=list(spec.classes),
        sources=_sources_record(spec, root),
        inputs=inputs,
        skipped=skipped,
        available={label: len(v) for label, v in items.items()},
    )
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    counts = manifest["counts"]
    logger.info(
        f"{name}: built {out} ({len(spec.classes)} classes; "
        + ", ".join(f"{s} {sum(c[s] for c in counts.values())}" for s in ("train", "val", "test"))
        + ")"
    )
    return out


def _check_replaceable(out: Path) -> None:
    """Refuse to overwrite a folder that is neither empty nor an earlier build of a task."""
    manifest = out / "manifest.json"
    if out.is_dir() and any(out.iterdir()):
        try:
            ours = json.loads(manifest.read_text()).get("format") == TASK_FORMAT
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise ValueError(f"{out} exists and is not a bvgls task folder; pass a new or empty output folder")
    elif out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")


def _write_images(
    splits: dict[str, dict[str, list[Item]]], out: Path, render: Callable, vendors: dict[str, str]
) -> dict:
    """Render every split into a fresh ``out``; the manifest's image records."""
    if out.exists():
        shutil.rmtree(out)
    records, counts = [], {}
    for split, by_class in splits.items():
        for label, items in by_class.items():
            folder = out / split / label
            folder.mkdir(parents=True, exist_ok=True)
            counts.setdefault(label, {})[split] = len(items)
            for item in items:
                file = folder / (_slug(item.id) + ".png")
                render(item, vendors[split], RESOLUTION).save(file, format="PNG", optimize=False)
                records.append(
                    {
                        "split": split,
                        "class": label,
                        "file": str(file.relative_to(out)),
                        "source": item.id,
                        "vendor": vendors[split],
                        **({"source_sha256": item.sha256} if item.sha256 else {}),
                    }
                )
    return {"counts": counts, "images": records}


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text.replace(os.sep, "__"))


def _spec_record(spec: TaskSpec) -> dict:
    record = asdict(spec)
    record["classes"] = {k: list(v) for k, v in spec.classes.items()}
    record["notes"] = list(spec.notes)
    return record


def _sources_record(spec: TaskSpec, root: Path) -> list[dict]:
    if spec.source == "clipart":
        return [
            {
                "name": "openclipart-png",
                "root": str(root),
                "licence": LICENCES["openclipart-png"],
                "version": _debian_version("openclipart-png"),
            }
        ]
    out = []
    for package in ("@iconify-json/noto", "@iconify-json/twemoji", "emoji-datasource-google"):
        meta = root / package / "package.json"
        version = json.loads(meta.read_text()).get("version") if meta.is_file() else None
        out.append({"name": package, "version": version, "licence": LICENCES[package.split("/")[-1]]})
    return out


def _debian_version(package: str) -> str | None:
    try:
        return run_tool(["dpkg-query", "-W", "-f=${Version}", package], "version").strip() or None
    except AssetUnavailable:
        return None


def build_all(names: Iterable[str] | None = None, seed: int = 0) -> dict:
    """Build every task whose sources can be obtained; ``{name: path or the reason it was skipped}``."""
    done: dict[str, str] = {}
    for name in names or TASK_SPECS:
        try:
            done[name] = str(build_image_task(name, seed=seed))
        except AssetUnavailable as e:
            done[name] = f"skipped: {e}"
            logger.info(f"{name}: skipped: {e}")
    return done


# ---------------------------------------------------------------------- loading (the registry builders)
def task_path(name: str, root: str | os.PathLike | None = None) -> Path:
    """A built task's folder: ``<root>/<name>`` if built there, else ``<tasks dir>/<name>``."""
    _spec(name)
    candidates = ([Path(root).expanduser() / name] if root is not None else []) + [tasks_dir() / name]
    for path in candidates:
        if (path / "manifest.json").is_file():
            return path
    from bvgls.runner.data import DatasetError

    raise DatasetError(
        f"task {name!r} is not built (no manifest.json in {candidates[-1]}); build it with: {BUILD_HINT}"
    )


def load_task(name: str, root: str | os.PathLike | None = None, input=None, augment: str = "light"):
    """The task's train and test sets (a :class:`~bvgls.registry.DatasetSplits`)."""
    from bvgls.runner.data import image_folder

    splits = image_folder(task_path(name, root), input=input, augment=augment)
    splits.name = name
    return splits


def load_val(name: str, root: str | os.PathLike | None = None, input=None, augment: str = "light"):
    """The task's fixed validation split, with the test transform (no augmentation)."""
    from torchvision.datasets import ImageFolder

    from bvgls.registry import ModelInput
    from bvgls.runner.data import TransformedDataset, make_transform

    base = ImageFolder(str(task_path(name, root) / "val"))
    return TransformedDataset(base, make_transform(input or ModelInput(), False, augment))
