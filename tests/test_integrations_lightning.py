"""PyTorch Lightning: the BVGLS callback on a tiny LightningModule, a few CPU steps."""

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")

from lightning.pytorch.loggers import Logger  # noqa: E402
from tolerances import assert_selected_on_the_stepped_gradients  # noqa: E402

import bvgls  # noqa: E402
from bvgls.integrations.lightning import BVGLSCallback  # noqa: E402
from bvgls.reference import NaiveBVR  # noqa: E402

STEPS = 6


class TinyModule(L.LightningModule):
    def __init__(self, optimizer="sgd"):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
        self.optimizer_name = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.01)
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n=4 * STEPS, batch_size=4):
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.records = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))


class StepMonitor(L.Callback):
    """Weights before / after each optimizer step, and the naive reference ratios of
    the gradients the optimizer is about to use (on_before_optimizer_step runs after backward)."""

    def __init__(self, bvgls_callback):
        self.cb = bvgls_callback
        self.naive = None
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        strategy = self.cb.strategy
        if self.naive is None and hasattr(strategy, "alpha"):
            self.naive = NaiveBVR(strategy.group_params, alpha=strategy.alpha)
        self.naive_ratios = self.naive.update() if self.naive is not None else None
        self.grads = [[p.grad.clone() for p in ps if p.grad is not None] for ps in strategy.group_params]
        self.before = [[p.detach().clone() for p in ps] for ps in strategy.group_params]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        strategy = self.cb.strategy
        moved = [[not torch.equal(b, p) for b, p in zip(bs, ps)] for bs, ps in zip(self.before, strategy.group_params)]
        self.steps.append(
            {
                "selected": list(strategy.selected),
                "moved": moved,
                "ratios": strategy.ratios.tolist() if hasattr(strategy, "ratios") else None,
                "naive": self.naive_ratios,
                "grads": self.grads,
            }
        )


def fit(module, callback, max_steps=STEPS, max_epochs=-1, log_every_n_steps=2, **kwargs):
    logger = MemoryLogger()
    monitor = StepMonitor(callback)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=max_epochs,
        callbacks=[callback, monitor],
        logger=logger,
        log_every_n_steps=log_every_n_steps,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(module, loader())
    return trainer, logger, monitor


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_only_the_selected_group_moves(optimizer):
    callback = BVGLSCallback("bvgls")
    trainer, logger, monitor = fit(TinyModule(optimizer), callback)
    strategy = callback.strategy
    assert strategy.group_names == ["model.0", "model.2", "model.4"]  # the wrapped Sequential
    assert strategy.num_steps == len(monitor.steps) == STEPS
    assert len({tuple(s["selected"]) for s in monitor.steps}) > 1, "selection never switched: a weak test"
    for step in monitor.steps:
        assert len(step["selected"]) == 1
        for g, moved in enumerate(step["moved"]):
            assert all(moved) if g in step["selected"] else not any(moved)
    # selected on this step's gradients (Lightning runs backward inside optimizer.step(closure))
    assert_selected_on_the_stepped_gradients(monitor.steps)


def test_selection_statistics_reach_the_logger():
    callback = BVGLSCallback("bvgls")
    trainer, logger, monitor = fit(TinyModule(), callback)
    names = callback.strategy.group_names
    step_logs = [(step, m) for step, m in logger.records if any(k.startswith("bvgls/freq/") for k in m)]
    assert [step for step, _ in step_logs] == [2, 4, 6]
    for (_, metrics), window in zip(step_logs, (monitor.steps[0:2], monitor.steps[2:4], monitor.steps[4:6])):
        expected = [sum(g in s["selected"] for s in window) / 2 for g in range(len(names))]
        assert [metrics[f"bvgls/freq/{n}"] for n in names] == pytest.approx(expected)
        for g, name in enumerate(names):
            values = [s["ratios"][g] for s in window if s is not monitor.steps[0]]  # step 1: variance clamped
            assert metrics[f"bvgls/bvr/{name}"] == pytest.approx(sum(values) / len(values), rel=1e-6)


def test_epoch_statistics_and_epoch_hook():
    epochs = []

    class Recording(bvgls.BVGLS):
        def on_epoch_start(self, epoch):
            epochs.append(epoch)

    callback = BVGLSCallback(lambda opt, groups: Recording(opt, groups=groups), log_every_n_steps=0)
    # 24 samples / batch 4 = 6 steps per epoch, 2 epochs
    trainer, logger, monitor = fit(TinyModule(), callback, max_steps=-1, max_epochs=2)
    assert epochs == [0, 1]
    epoch_logs = [m for _, m in logger.records if any(k.startswith("bvgls/epoch/freq/") for k in m)]
    assert len(epoch_logs) == 2
    assert not any(k.startswith("bvgls/freq/") for _, m in logger.records for k in m)
    for metrics, window in zip(epoch_logs, (monitor.steps[:6], monitor.steps[6:])):
        for g, name in enumerate(callback.strategy.group_names):
            assert metrics[f"bvgls/epoch/freq/{name}"] == pytest.approx(sum(g in s["selected"] for s in window) / 6)


def test_fixed_strategy_and_checkpoint_state(tmp_path):
    callback = BVGLSCallback("L3-3")
    module = TinyModule()
    trainer, logger, monitor = fit(module, callback, max_steps=2)
    assert all(s["selected"] == [2] for s in monitor.steps)
    # the callback's state goes into checkpoints and comes back on resume
    path = tmp_path / "ckpt.ckpt"
    trainer.save_checkpoint(path)
    resumed = BVGLSCallback("L3-3")
    trainer2 = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        callbacks=[resumed],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer2.fit(TinyModule(), loader(), ckpt_path=path)
    assert resumed.strategy.num_steps == 3 and resumed.strategy.counts == [0, 0, 3]


def test_bad_optimizer_index():
    callback = BVGLSCallback(optimizer_index=1)
    with pytest.raises(ValueError, match="optimizer_index=1"):
        fit(TinyModule(), callback)


def test_graded_strategy_logs_its_mean_scales():
    callback = BVGLSCallback("llrd:decay=0.5")
    trainer, logger, monitor = fit(TinyModule(), callback, max_steps=2)
    metrics = next(m for _, m in logger.records if any(k.startswith("bvgls/scale/") for k in m))
    names = callback.strategy.group_names
    assert [metrics[f"bvgls/scale/{n}"] for n in names] == pytest.approx([0.25, 0.5, 1.0])
    assert [metrics[f"bvgls/freq/{n}"] for n in names] == [1.0, 1.0, 1.0]


def test_fused_bvgls_runs_and_moves_only_the_lagged_selection():
    callback = BVGLSCallback("bvgls:fused=true")
    trainer, logger, monitor = fit(TinyModule("adamw"), callback)
    assert callback.strategy.num_steps == len(monitor.steps) == STEPS
    assert not any(any(m) for m in monitor.steps[0]["moved"]) and monitor.steps[0]["selected"] == []
    for step in monitor.steps[1:]:
        assert len(step["selected"]) == 1
        for g, moved in enumerate(step["moved"]):
            assert all(moved) if g in step["selected"] else not any(moved)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gradient_clip_val": 1.0}, "set gradient_clip_val=0"),
        ({"accumulate_grad_batches": 2}, "set accumulate_grad_batches=1"),
    ],
)
def test_fused_refuses_clipping_and_accumulation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit(TinyModule("adamw"), BVGLSCallback("bvgls-fused"), **kwargs)
