"""Lean selection, memory: what each lean-memory option allocates, and that it changes nothing else.

``release_state`` frees a frozen group's optimizer state; ``ema=bfloat16`` halves BVG-LS's
statistics buffer; ``full_backward_chunks`` runs a full backward pass in chunks (same gradient).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tiny_models import batch, mlp, one_step, tensor_data
from torch import nn

import bvgls
from bvgls.runner.callbacks import Callback

pytestmark = pytest.mark.usefixtures("one_thread")


def setup(spec, seed=0):
    model = mlp(seed)
    groups = bvgls.layer_groups(model)
    optimizer = torch.optim.SGD(groups.param_groups(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    return model, optimizer, bvgls.make_strategy(spec, optimizer, groups)


# ---------------------------------------------------------------------- release_state
@pytest.mark.parametrize("spec", ["bvgls:probe=3:release_state=true", "bvgls:static=4:probe=2:release_state=yes"])
def test_release_state_keeps_optimizer_state_only_for_the_groups_being_trained(spec):
    model, opt, s = setup(spec)
    seen = set()
    for step in range(12):
        one_step(model, opt, s, step)
        holding = {g for g, b in s.state_bytes()["optimizer"].items() if b}
        trained = {s.group_names[i] for i in s.selected}
        seen |= trained
        # a group frozen for the next step holds nothing; the groups just trained may hold theirs
        assert holding <= trained
        assert not holding & set(s.frozen_groups())
    assert len(seen) > 1  # the selection moved, so state was released at least once


def test_release_state_restarts_momentum_when_a_group_trains_again():
    model, opt, s = setup("bvgls:probe=3:release_state=true")
    restarts = 0
    for step in range(18):
        was_frozen = {i for i, p in enumerate(s.params) if not p.requires_grad}
        fresh = [i for i, p in enumerate(s.params) if p not in opt.state]
        before = [p.detach().clone() for p in s.params]
        one_step(model, opt, s, step)
        for i in was_frozen:
            assert s.params[i] not in opt.state  # frozen: no state, none created
        for i in set(fresh) - was_frozen:
            p = s.params[i]
            if s.param_group_index[i] in s.selected:  # a new buffer: d_p = grad + wd * p, as a new optimizer's
                torch.testing.assert_close(opt.state[p]["momentum_buffer"], p.grad + 1e-3 * before[i])
                restarts += step > 0
    assert restarts > 0
    with pytest.raises(ValueError, match="release_state needs lean mode"):
        setup("bvgls:release_state=true")


def test_a_checkpoint_with_release_state_is_refused_by_a_strategy_without_it():
    # resume equality with release_state: test_lean.py, test_resume_in_lean_mode_makes_the_same_choices
    model, opt, s = setup("bvgls:probe=2:release_state=true")
    for step in range(3):
        one_step(model, opt, s, step)
    _, _, other = setup("bvgls:probe=2")
    with pytest.raises(ValueError, match="release_state"):
        other.load_state_dict(s.state_dict())


# ---------------------------------------------------------------------- the EMA's dtype
def test_bfloat16_ema_halves_the_buffer_and_keeps_the_ratios():
    runs = {}
    for spec in ("bvgls", "bvgls:ema=bfloat16"):
        model, opt, s = setup(spec)
        ratios = []
        for step in range(10):
            one_step(model, opt, s, step)
            ratios.append(s.ratios.clone())
        runs[spec] = (s, ratios)
    full, half = runs["bvgls"][0], runs["bvgls:ema=bfloat16"][0]
    assert all(m.dtype == torch.bfloat16 for m in half._m if m is not None)
    scalars = len(full.params) * 2 * 8  # per tensor: running sum of squares and step count, float64
    assert (sum(half.state_bytes()["strategy"].values()) - scalars) * 2 == sum(
        full.state_bytes()["strategy"].values()
    ) - scalars
    # the same weights until the selections part, so compare the statistics of one shared trajectory
    model, opt, s32 = setup("bvgls")
    _, _, s16 = setup("bvgls:ema=bfloat16", seed=0)
    s16.remove()
    s16 = bvgls.BVGLS(torch.optim.SGD(model.parameters(), lr=0.0), groups=s32.group_params, ema_dtype=torch.bfloat16)
    for step in range(10):
        opt.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        r16 = s16.update_statistics().clone()
        s32.step()
        if step >= 1:  # step 1's variance is exactly 0 for both
            # bfloat16 keeps 8 significant bits: an EMA rounded once per step stays within about 1%
            torch.testing.assert_close(r16, s32.ratios, rtol=0.02, atol=1e-6)


def test_bad_ema_option_names_the_choices():
    with pytest.raises(ValueError, match="ema must be one of param, bfloat16, float16"):
        setup("bvgls:ema=float8")
    with pytest.raises(ValueError, match="ema_dtype must be a floating-point torch.dtype"):
        groups = bvgls.layer_groups(mlp())
        bvgls.BVGLS(torch.optim.SGD(groups.param_groups(), lr=0.1), ema_dtype=torch.int8)


# ---------------------------------------------------------------------- full_backward_chunks
def count_forwards(model):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_chunked_full_backward_gives_the_same_run():
    results = []
    for chunks in (1, 4):
        model = mlp()
        calls = count_forwards(model)
        history = bvgls.finetune(
            model,
            tensor_data(),
            "full",
            epochs=2,
            batch_size=8,
            lr=0.05,
            progress=False,
            full_backward_chunks=chunks,
            schedule="constant",
        )
        results.append((model, history, len(calls)))
    (m1, h1, c1), (m4, h4, c4) = results
    assert c4 - c1 == 3 * 8 * 2  # 8 steps per epoch, each 4 forward passes instead of 1 (evaluation alike)
    for a, b in zip(m1.parameters(), m4.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the same sum in another order


class DeepSteps(Callback):
    """Records, before every step's forward pass, whether its backward will reach the first group."""

    def __init__(self):
        self.deep = []

    def on_train_start(self, state):
        self.deep.append(state.strategy.backward_reaches_first_group())

    def on_step_end(self, state, loss):
        self.deep.append(state.strategy.backward_reaches_first_group())  # the plan of the next step


@pytest.mark.filterwarnings("ignore:.*rotates through:UserWarning")
@pytest.mark.parametrize("spec", ["bvgls:probe=3", "linear", "L2-5"])
def test_only_steps_whose_backward_reaches_the_first_group_are_chunked(spec):
    model = mlp()
    calls = count_forwards(model)
    watch = DeepSteps()
    bvgls.finetune(
        model,
        tensor_data(n=48),
        spec,
        epochs=1,
        batch_size=8,
        lr=0.05,
        progress=False,
        full_backward_chunks=2,
        callbacks=[watch],
    )
    steps = 48 // 8
    deep = watch.deep[:steps]
    evaluations = 48 // 8  # one evaluation pass over the 48 test examples
    assert len(calls) - evaluations == steps + sum(deep)  # a deep step runs 2 chunks, the others 1
    if spec.startswith("bvgls"):
        assert deep[0] and deep[3]  # the probe steps compute every gradient
    else:
        assert not any(deep)  # the stem is frozen for the whole run


def test_chunks_option_is_checked_on_the_command_line():
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "bvgls",
            "finetune",
            "--model",
            "tiny-cnn",
            "--data",
            "digits",
            "--lr",
            "0.1",
            "--full-backward-chunks",
            "0",
            "--out",
            "/tmp/never",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    output = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in output
    # checked by the config's declaration of the option, as from Python: one line naming the flag and its bound
    assert output.startswith("error: --full-backward-chunks must be >= 1") and len(output.splitlines()) == 1


def test_a_checkpoint_from_before_the_option_resumes_at_its_default(tmp_path):
    options = dict(epochs=2, batch_size=8, lr=0.05, progress=False, schedule="constant")
    whole = bvgls.finetune(mlp(), tensor_data(), "full", **options)
    bvgls.finetune(mlp(), tensor_data(), "full", out_dir=tmp_path, stop_after=1, **options)
    ckpt_path = next(p for p in tmp_path.iterdir() if p.suffix == ".pt" and "checkpoint" in p.name)
    ckpt = torch.load(ckpt_path, weights_only=True)
    del ckpt["config"]["full_backward_chunks"]  # as an older bvgls wrote it
    torch.save(ckpt, ckpt_path)
    with pytest.raises(ValueError, match=r"full_backward_chunks: 1 -> 2"):
        bvgls.finetune(mlp(), tensor_data(), "full", out_dir=tmp_path, resume=True, full_backward_chunks=2, **options)
    resumed = bvgls.finetune(mlp(), tensor_data(), "full", out_dir=tmp_path, resume=True, **options)
    assert resumed.epochs[-1]["test_loss"] == whole.epochs[-1]["test_loss"]
