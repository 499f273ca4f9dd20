"""The training loop: records, strategies through the GroupStrategy interface, exact resume, options."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from isolation import AVX2_KERNELS
from torch.utils.data import TensorDataset

from bvgls.runner.data import load_dataset
from bvgls.runner.loop import Callback, History, evaluate, finetune, seed_everything
from bvgls.runner.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING_KEYS = ("train_s", "eval_s", "wall_s", "peak_mem_mb")


@pytest.fixture(scope="module")
def colors(image_root):
    return load_dataset(str(image_root), input=build_model("tiny-resnet", 3).bvgls_input)


def fresh_model(seed=0, name="tiny-resnet", classes=3):
    seed_everything(seed)
    return build_model(name, classes, weights=None)


def untimed(history):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history.epochs]


def test_bvgls_records_every_epoch(colors, tmp_path):
    h = finetune(
        fresh_model(), colors, "bvgls", epochs=2, lr=0.05, batch_size=8, progress=False, out_dir=tmp_path / "run"
    )
    assert h.finished and len(h.epochs) == 2 and h.group_names == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    for r in h.epochs:
        assert r["steps"] == 4 * r["epoch"]  # 30 examples / batch 8 = 4 steps per epoch
        assert 0 <= r["test_error"] <= 100 and r["test_loss"] > 0 and r["train_loss"] > 0
        assert math.isclose(sum(r["selection_frequency"]), 1.0)  # k=1: exactly one group per step
        assert all(f in (0.0, 0.25, 0.5, 0.75, 1.0) for f in r["selection_frequency"])
        assert len(r["mean_bvr"]) == 6 and any(v is not None and v > 0 for v in r["mean_bvr"])
        assert r["val_error"] is None and r["wall_s"] >= r["train_s"]
    assert h.epochs[1]["lr"] < h.epochs[0]["lr"] < 0.05  # cosine, per step
    # files: config, metrics (one line per epoch), result; the checkpoint is removed when done
    run = tmp_path / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    assert json.loads((run / "result.json").read_text())["final"]["test_error"] == h.final["test_error"]
    assert json.loads((run / "config.json").read_text())["strategy"] == "bvgls"
    assert not (run / "checkpoint.pt").exists() and not [f for f in os.listdir(run) if ".tmp" in f]
    loaded = History.load(run)
    assert untimed(loaded) == untimed(h) and loaded.finished


def test_partial_strategy_freezes_and_restores(colors):
    net = fresh_model()
    stem_before = net.conv1.weight.detach().clone()
    fc_before = net.fc.weight.detach().clone()
    h = finetune(net, colors, "L3-6", epochs=1, lr=0.05, batch_size=8, progress=False)
    assert h.final["selection_frequency"] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert h.final["mean_bvr"] is None
    assert torch.equal(net.conv1.weight, stem_before) and not torch.equal(net.fc.weight, fc_before)
    assert all(p.requires_grad for p in net.parameters())  # flags restored after the run


def test_per_tensor_strategy_reports_layer_groups(colors):
    h = finetune(fresh_model(), colors, "bvgts", epochs=1, lr=0.05, batch_size=8, progress=False)
    rec = h.final
    assert len(rec["selection_frequency"]) == len(h.group_names) > 6
    assert len(rec["layer_selection_frequency"]) == 6 == len(h.layer_group_names)
    assert 0 < sum(rec["selection_frequency"]) / len(rec["selection_frequency"]) < 1


def test_any_registered_strategy_runs(colors):
    from bvgls.strategies import STRATEGIES

    for name in sorted(STRATEGIES):
        h = finetune(fresh_model(), colors, name, epochs=1, lr=0.05, batch_size=16, progress=False, steps_per_epoch=1)
        assert h.final["steps"] == 1 and h.final["test_error"] is not None, name


def test_resume_reproduces_uninterrupted_run(colors, tmp_path):
    kwargs = dict(epochs=3, lr=0.05, batch_size=8, progress=False, val_fraction=0.2, seed=3)
    full = finetune(fresh_model(3), colors, "bvgls", out_dir=tmp_path / "a", keep_checkpoint=True, **kwargs)
    first = finetune(fresh_model(3), colors, "bvgls", out_dir=tmp_path / "b", stop_after=1, **kwargs)
    assert len(first.epochs) == 1 and not first.finished
    assert (tmp_path / "b" / "checkpoint.pt").exists() and not (tmp_path / "b" / "result.json").exists()
    # a fresh process would rebuild the model from scratch: different init, overwritten by the checkpoint
    resumed = finetune(
        fresh_model(99), colors, "bvgls", out_dir=tmp_path / "b", resume=True, keep_checkpoint=True, **kwargs
    )
    assert resumed.finished and resumed.config["resumed_from_epoch"] == 1
    assert untimed(resumed) == untimed(full)  # same selections, losses, errors, bit for bit
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # resuming a finished run returns its history without training
    again = finetune(fresh_model(), colors, "bvgls", out_dir=tmp_path / "a", resume=True, **kwargs)
    assert untimed(again) == untimed(full)


def final_weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_trajectory_does_not_depend_on_the_evaluation_schedule(colors):
    """Evaluation draws DataLoader base seeds from the global RNG, which the training set's
    RandomResizedCrop (in the main process here) also draws from: a run's weights must not
    depend on how often it was evaluated."""
    kwargs = dict(epochs=3, lr=0.05, batch_size=8, progress=False, val_fraction=0.2, seed=1)
    weights = []
    for every in (1, 3):
        net = fresh_model(1)
        h = finetune(net, colors, "bvgls", eval_every=every, **kwargs)
        assert [r["test_error"] is not None for r in h.epochs] == ([True] * 3 if every == 1 else [False, False, True])
        weights.append(final_weights(net))
    assert_same_weights(*weights)


class DrawsFromGlobalRng(Callback):
    """A user callback that consumes the global RNG between epochs."""

    def on_epoch_end(self, state, record):
        torch.rand(7)


def test_trajectory_does_not_depend_on_other_draws_from_the_global_rng(colors):
    kwargs = dict(epochs=2, lr=0.05, batch_size=8, progress=False, seed=2)
    weights = []
    for callbacks in ((), (DrawsFromGlobalRng(),)):
        net = fresh_model(2)
        torch.rand(3)  # something else ran in this process since the model was built
        finetune(net, colors, "full", callbacks=callbacks, **kwargs)
        weights.append(final_weights(net))
    assert_same_weights(*weights)


def test_resume_refuses_other_settings(colors, tmp_path):
    finetune(
        fresh_model(), colors, "bvgls", epochs=2, lr=0.05, batch_size=8, progress=False, out_dir=tmp_path, stop_after=1
    )
    with pytest.raises(ValueError, match="lr: 0.05 -> 0.1"):
        finetune(
            fresh_model(),
            colors,
            "bvgls",
            epochs=2,
            lr=0.1,
            batch_size=8,
            progress=False,
            out_dir=tmp_path,
            resume=True,
        )


def test_grad_accum_schedule_and_callbacks(colors):
    seen, steps = [], []

    class Count(Callback):
        def on_step_end(self, state, loss):
            steps.append(state.global_step)

    h = finetune(
        fresh_model(),
        colors,
        "full",
        epochs=2,
        lr=0.05,
        batch_size=4,
        grad_accum=3,
        schedule="constant",
        progress=False,
        callbacks=[seen.append, Count()],
    )
    # 30 examples / 4 = 8 batches -> ceil(8 / 3) = 3 optimizer steps per epoch
    assert [r["steps"] for r in h.epochs] == [3, 6] and steps == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in h.epochs] == [0.05, 0.05]
    assert [r["epoch"] for r in seen] == [1, 2]


def test_warmup_and_adamw(colors):
    h = finetune(
        fresh_model(),
        colors,
        "bvgls",
        epochs=2,
        lr=0.01,
        batch_size=8,
        optimizer="adamw",
        warmup_epochs=1,
        schedule="constant",
        progress=False,
    )
    assert math.isclose(h.epochs[0]["lr"], 0.01) and math.isclose(h.epochs[1]["lr"], 0.01)


def test_evaluate_matches_manual_computation():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    loader = torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=3)
    loss, err = evaluate(net, loader, torch.device("cpu"))
    with torch.no_grad():  # the loader's batches: the same GEMM shapes, so the same logits bit for bit
        out = torch.cat([net(xb) for xb in x.split(3)])
    assert math.isclose(loss, torch.nn.functional.cross_entropy(out, y).item(), rel_tol=1e-6)
    assert math.isclose(err, 100.0 * (out.argmax(1) != y).float().mean().item())


@pytest.mark.isolated
def test_bf16_autocast_and_channels_last_on_cpu(colors):
    h = finetune(
        fresh_model(), colors, "bvgls", epochs=1, lr=0.05, batch_size=8, amp="bf16", channels_last=True, progress=False
    )
    assert math.isfinite(h.final["train_loss"])
    with pytest.raises(ValueError, match="fp16"):
        finetune(fresh_model(), colors, "bvgls", epochs=1, lr=0.05, amp="fp16", device="cpu", progress=False)


@pytest.mark.isolated(env=AVX2_KERNELS)
def test_channels_last_guard_for_onednn_crash():
    # 1x1 stride-2 convolutions with 4-15 input channels crash oneDNN's NHWC weight gradient on CPU
    # (its AVX2 kernels: AMD EPYC, or any x86 CPU under ONEDNN_MAX_CPU_ISA=AVX2, as here)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.Conv2d(8, 16, 1, stride=2),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 2),
    )
    data = TensorDataset(torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 0, 1, 0]))
    with pytest.warns(UserWarning, match="channels_last disabled"):
        finetune(net, (data, data), "full", epochs=1, lr=0.01, batch_size=5, channels_last=True, progress=False)


def test_tensorboard_and_progress(colors, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    finetune(
        fresh_model(),
        colors,
        "bvgls",
        epochs=1,
        lr=0.05,
        batch_size=8,
        out_dir=tmp_path,
        tensorboard=True,
        progress=True,
    )
    assert any(f.startswith("events.") for f in os.listdir(tmp_path / "tensorboard"))
    assert "epoch 1/1" in capsys.readouterr().err


def test_bad_arguments(colors):
    with pytest.raises(ValueError, match="L9-6"):
        finetune(fresh_model(), colors, "L9-6", epochs=1, lr=0.1, progress=False)
    with pytest.raises(ValueError, match="unknown strategy"):
        finetune(fresh_model(), colors, "nope", epochs=1, lr=0.1, progress=False)
    with pytest.raises(ValueError, match="resume"):
        finetune(fresh_model(), colors, "full", epochs=1, lr=0.1, resume=True)


def test_compare_refit_and_guards(colors, tmp_path):
    from bvgls.runner.grid import compare, read_results

    grid = dict(seeds=[0], lrs=[0.01, 0.1], model="tiny-resnet", weights=None, out_dir=tmp_path, batch_size=8)
    grid.update(val_fraction=0.3, progress=False, extend_lrs=False)
    res = compare("full,bvgls", {"colors": colors}, epochs=1, refit=True, **grid)
    rows = read_results(res.csv_path)
    assert sorted(r["phase"] for r in rows) == ["refit", "refit"] + ["search"] * 4
    for strategy in ("full", "bvgls"):
        refit = [r for r in rows if r["strategy"] == strategy and r["phase"] == "refit"]
        assert len(refit) == 1 and refit[0]["chosen"] and refit[0]["val_error"] is None  # trained on all of train
        assert refit[0]["lr"] == res.chosen_lr[("colors", strategy)]
        assert res.test_errors("colors", strategy) == [refit[0]["test_error"]]
    # the same out dir with other settings is refused, not mixed in
    with pytest.raises(ValueError, match="epochs: 1 -> 2"):
        compare("full", {"colors": colors}, epochs=2, **grid)


def test_compare_keep_going_records_failures(colors, tmp_path):
    from bvgls.base import GroupStrategy
    from bvgls.runner.grid import compare
    from bvgls.strategies import STRATEGIES, register_strategy

    class Broken(GroupStrategy):  # builds fine (passes the up-front check), fails in the first step
        def _plan(self):
            raise RuntimeError("boom")

    register_strategy("test-broken")(lambda optimizer, groups: Broken(optimizer, groups))
    try:
        res = compare(
            "full,test-broken",
            {"colors": colors},
            model="tiny-resnet",
            weights=None,
            out_dir=tmp_path,
            epochs=1,
            batch_size=16,
            keep_going=True,
            progress=False,
            steps_per_epoch=1,
        )
    finally:
        del STRATEGIES["test-broken"]
    assert len(res.failed) == 1 and "boom" in res.failed[0]
    assert [r["strategy"] for r in res.rows] == ["full"]


def test_fused_bvgls_resumes_exactly_and_records_peak_memory(colors, tmp_path):
    kwargs = dict(epochs=3, lr=0.05, batch_size=8, progress=False, seed=3)
    spec = "bvgls-fused:probe=3"
    full = finetune(fresh_model(3), colors, spec, out_dir=tmp_path / "a", **kwargs)
    finetune(fresh_model(3), colors, spec, out_dir=tmp_path / "b", stop_after=1, **kwargs)
    resumed = finetune(fresh_model(99), colors, spec, out_dir=tmp_path / "b", resume=True, **kwargs)
    assert untimed(resumed) == untimed(full)
    assert sum(full.epochs[0]["selection_frequency"]) == 0.75  # the first of 4 steps only gathers statistics
    assert all(r["peak_mem_mb"] > 0 for r in full.epochs)


@pytest.mark.parametrize(
    "options, message", [({"grad_accum": 2}, "grad_accum=1"), ({"full_backward_chunks": 2}, "full_backward_chunks=1")]
)
def test_fused_refuses_several_backward_passes_per_step(colors, options, message):
    with pytest.raises(ValueError, match=message):
        finetune(fresh_model(), colors, "bvgls:fused=true", epochs=1, lr=0.05, batch_size=8, progress=False, **options)
