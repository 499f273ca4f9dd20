"""The named benchmark protocols (``bvgls-lab bench --protocol``), their refusals, the fields added for
the pretrained protocol (image size, pooled train+val with the manifest's validation fraction,
tie-break, lr ladder) and the demo's choice of suite."""

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bvgls.registry import ModelInput
from bvgls.runner.config import DataOptions
from bvgls_lab.experiments import protocols
from bvgls_lab.experiments import run as bench_run

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def lab_cli(*args, env=None):
    """The real ``bvgls-lab`` command in a subprocess."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bvgls_lab", *map(str, args)], capture_output=True, text=True, env=environ, timeout=300
    )


# ---------------------------------------------------------------------- the registry of protocols
def test_every_named_protocol_is_known_and_unknown_names_are_refused():
    assert set(protocols.SUITES) == {
        "offline",
        "offline-v2",
        "offline-fused",
        "offline-fused-v2",
        "pretrained",
        "pretrained-batch",
        "pretrained-pilot",
        "repro-sweep",
        "repro-h3",
        "repro-h2",
    }
    assert protocols.suite("offline") == (("fmnist-resnet", protocols.BENCH),)
    assert [part for part, _ in protocols.suite("pretrained")] == ["mobilenet_v2", "efficientnet_lite0"]
    with pytest.raises(ValueError, match="unknown protocol 'nope'; known: offline, offline-v2, offline-fused, "):
        protocols.suite("nope")
    res = lab_cli("bench", "--protocol", "nope", "--dry-run")
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [
        "error: unknown protocol 'nope'; known: offline, offline-v2, offline-fused, offline-fused-v2, pretrained, "
        "pretrained-batch, pretrained-pilot, repro-sweep, repro-h3, repro-h2"
    ]


def test_offline_v2_reruns_v1s_choices_and_searches_the_lean_variants():
    v1, v2 = protocols.BENCH, protocols.BENCH_V2
    assert v2.strategies == ("full", "bvgls", "bvgls:probe=10", "bvgls:static=50")
    same = {
        "tasks",
        "seeds",
        "search_seeds",
        "lrs",
        "epochs",
        "batch_size",
        "eval_every",
        "val_fraction",
        "model",
        "augment",
        "lr_ladder",
        "tie_break",
        "pool",
        "image_size",
    }
    assert all(getattr(v1, k) == getattr(v2, k) for k in same)
    # the fixed lrs are version 1's validation choices (final runs in docs/results/offline/runs.csv)
    with open(REPO / "docs" / "results" / "offline" / "runs.csv", newline="") as f:
        v1_final = {(r["dataset"], r["strategy"], float(r["lr"])) for r in csv.DictReader(f) if r["phase"] == "final"}
    for task in v2.tasks:
        for strategy in ("full", "bvgls"):
            assert (task, strategy, v2.fixed_lr(task, strategy)) in v1_final
        assert v2.fixed_lr(task, "bvgls:probe=10") is None and v2.fixed_lr(task, "bvgls:static=50") is None


def test_pretrained_protocols_are_as_documented():
    m, e, batch, pilot = (
        protocols.PRETRAINED_M,
        protocols.PRETRAINED_E,
        protocols.PRETRAINED_BATCH,
        protocols.PRETRAINED_PILOT,
    )
    assert (m.image_size, m.pool, m.val_fraction, m.tie_break, m.epochs, m.batch_size) == (
        112,
        "train+val",
        "manifest",
        "val_loss",
        12,
        16,
    )
    assert len(m.strategies) == 12 and e.strategies == ("full", "L5-9", "linear", "bvgls", "bvgls:probe=10")
    assert batch.batch_size == 128 and batch.lr_ladder[-1] == 3.0 and batch.strategies == ("full", "bvgls", "L6-10")
    assert pilot.tasks == ("clipart-fine",) and set(pilot.strategies) <= set(m.strategies)
    # the amendment after the pilot moved the grid down one step and the ladder to 1e-4 (nothing else)
    assert pilot.lrs == (0.003, 0.01, 0.03, 0.1) and m.lrs == (0.001, 0.003, 0.01, 0.03)
    assert m.lr_ladder[:3] == (0.0001, 0.0003, 0.001) and e.lr_ladder == m.lr_ladder
    assert replace(pilot, tasks=m.tasks, seeds=m.seeds, strategies=m.strategies, lrs=m.lrs, lr_ladder=m.lr_ladder) == m
    with pytest.raises(ValueError, match="a 'manifest' validation fraction must be resolved"):
        m.training(eval_every=3)
    assert m.training(eval_every=3, val_fraction=0.25).val_fraction == 0.25
    for bad, match in (
        ({"pool": "all"}, "unknown pool"),
        ({"tie_break": "x"}, "unknown tie_break"),
        ({"val_fraction": "auto"}, "number or 'manifest'"),
    ):
        with pytest.raises(ValueError, match=match):
            protocols.Protocol(**bad)


# ---------------------------------------------------------------------- refusals
def test_a_group_count_other_than_the_one_the_partial_specs_assume_is_refused(monkeypatch):
    bench_run.check_model(protocols.PRETRAINED_M)  # 10 stage groups, as frozen
    monkeypatch.setitem(bench_run.EXPECTED_GROUPS, "mobilenet_v2", 9)
    with pytest.raises(ValueError, match=r"mobilenet_v2 has 10 groups \(stem, .*assume 9"):
        bench_run.check_model(protocols.PRETRAINED_M)


def test_a_missing_task_is_refused_with_the_set_up_hint_before_anything_is_written(tmp_path):
    res = lab_cli(
        "bench",
        "--protocol",
        "pretrained-pilot",
        "--out",
        tmp_path / "out",
        env={"BVGLS_DATA": str(tmp_path / "empty")},
    )
    assert res.returncode != 0
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("error: task 'clipart-fine' is not built") and "scripts/setup_pretrained.sh" in line
    assert not (tmp_path / "out").exists()


def test_a_v1_protocol_json_is_still_accepted_and_a_changed_protocol_refused(tmp_path):
    shutil.copy(REPO / "docs" / "results" / "offline" / "protocol.json", tmp_path / "protocol.json")
    bench_run.check_protocol(tmp_path, protocols.BENCH)  # written before the new fields existed
    with pytest.raises(ValueError, match=r"differs in epochs"):
        bench_run.check_protocol(tmp_path, replace(protocols.BENCH, epochs=21))
    with pytest.raises(ValueError, match=r"differs in image_size"):
        bench_run.check_protocol(tmp_path, replace(protocols.BENCH, image_size=32))


# ---------------------------------------------------------------------- the new data options
def test_image_size_reaches_the_transforms(tmp_path):
    from bvgls.runner.data import make_transform
    from bvgls.runner.grid import compare

    assert DataOptions().model_input(ModelInput()) == ModelInput()
    resized = DataOptions(image_size=40).model_input(ModelInput(mean=(0.5,) * 3))
    assert resized.size == 40 and resized.mean == (0.5,) * 3
    image = Image.new("RGB", (90, 70))
    assert make_transform(resized, False, "none")(image).shape == (3, 40, 40)

    seen = []

    def dataset(input):  # what compare passes to a dataset builder
        from bvgls.registry import DatasetSplits

        seen.append(input.size)
        x = torch.randn(8, 3, input.size, input.size)
        data = torch.utils.data.TensorDataset(x, torch.arange(8) % 2)
        return DatasetSplits(train=data, test=data, num_classes=2, name="t")

    cell = dict(strategies=["full"], datasets={"t": dataset}, seeds=[0], lrs=[0.01], model="tiny-cnn", epochs=1)
    compare(**cell, weights="none", out_dir=tmp_path / "c", batch_size=4, progress=False, image_size=24)
    assert seen == [24]
    config = json.loads(next((tmp_path / "c").rglob("config.json")).read_text())
    assert config["image_size"] == 24
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        compare(**cell, weights="none", out_dir=tmp_path / "d", image_size=0)


def _fake_task(root: Path, per_class: dict[str, int]) -> Path:
    """A built-task folder as ``bvgls_lab.pretrained.image_tasks`` writes it (train/, val/, test/, manifest.json)."""
    rng = np.random.default_rng(0)
    path = root / "clipart-fine"
    counts = {}
    for cls in ("a", "b"):
        counts[cls] = dict(per_class)
        for split, n in per_class.items():
            (path / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, size=(12, 12, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(path / split / cls / f"{i}.png")
    (path / "manifest.json").write_text(json.dumps({"task": "clipart-fine", "counts": counts}))
    return path


def test_the_manifest_fraction_carves_a_validation_set_of_the_task_s_size_from_the_pool(tmp_path, monkeypatch):
    from bvgls.runner.data import targets_of, validation_split

    _fake_task(tmp_path, {"train": 6, "val": 3, "test": 2})
    monkeypatch.setenv("BVGLS_DATA", str(tmp_path))
    info = bench_run.locate_task("clipart-fine", protocols.PRETRAINED_PILOT)
    assert info["val_fraction"] == pytest.approx(3 / 9) and info["counts"]["a"] == {"train": 6, "val": 3, "test": 2}
    cell = bench_run.Cell(
        "clipart-fine",
        "full",
        info["path"],
        str(tmp_path),
        protocols.PRETRAINED_PILOT,
        val_fraction=info["val_fraction"],
    )
    splits = cell.dataset()(ModelInput(size=8))
    assert len(splits.train) == 18 and len(splits.test) == 4 and splits.num_classes == 2
    train, val = validation_split(splits, info["val_fraction"], seed=1)
    assert len(val) == 6 and sorted(targets_of(val)) == [0, 0, 0, 1, 1, 1]
    assert val[0][0].shape == (3, 8, 8)
    other, _ = validation_split(splits, info["val_fraction"], seed=2)
    assert sorted(train.indices) != sorted(other.indices)  # each seed re-draws the shots
    assert cell.grid_options(eval_every=3)["val_fraction"] == pytest.approx(1 / 3)


def test_tie_break_and_ladder_of_the_lr_search():
    from bvgls.runner.grid import choose_lrs
    from bvgls.runner.lrsearch import search_lr

    rows = [
        {"dataset": "d", "strategy": "s", "phase": "search", "lr": lr, "val_error": 10.0, "val_loss": loss}
        for lr, loss in ((0.01, 0.9), (0.03, 0.5), (0.1, 0.7))
    ]
    assert choose_lrs(rows)[("d", "s")] == 0.01
    assert choose_lrs(rows, "val_loss")[("d", "s")] == 0.03
    ran = []
    choice = search_lr([0.3, 1.0], ran.extend, lambda grid: (max(grid), set()), ladder=(0.3, 1.0, 3.0))
    assert ran == [0.3, 1.0, 3.0] and choice.lr == 3.0 and choice.stopped == "ladder end"


# ---------------------------------------------------------------------- the demo
def test_the_demo_runs_the_benchmark_s_cells_at_its_choices_and_knows_when_assets_are_missing(tmp_path, monkeypatch):
    demo = protocols.DEMO_PRETRAINED
    assert demo.model == "mobilenet_v2" and demo.tasks == ("clipart-fine",) and demo.seeds == (0,)
    assert {(t, s) for t, s, _ in demo.fixed_lrs} == {(t, s) for t in demo.tasks for s in demo.strategies}
    summary = REPO / "docs" / "results" / "pretrained" / "mobilenet_v2" / "summary.json"
    chosen = {(c["task"], c["strategy"]): c["lr"] for c in json.loads(summary.read_text())["cells"]}
    assert all(chosen[(t, s)] == lr for t, s, lr in demo.fixed_lrs)
    assert (
        replace(
            protocols.PRETRAINED_M,
            tasks=demo.tasks,
            strategies=demo.strategies,
            seeds=(0,),
            search_seeds=(),
            fixed_lrs=demo.fixed_lrs,
        )
        == demo
    )
    with pytest.raises(ValueError, match="unknown demo suite 'x'; known: pretrained, fmnist"):
        protocols.demo("x")
    monkeypatch.setenv("BVGLS_DATA", str(tmp_path / "empty"))
    assert "is not built" in bench_run.missing_assets(demo)
    assert bench_run.missing_assets(protocols.DEMO) is None
