"""Lean selection through the Hugging Face Trainer and Lightning callbacks: the
freeze of a step is in place before its forward pass, frozen weights do not change, and
``requires_grad`` is restored when training ends."""

import pytest
import torch
from torch import nn

SPECS = ["bvgls:probe=2", "lisa:K=2:gamma=1", "bcd-cyclic:K=2"]


class ForwardLog:
    """Per forward pass of ``model``: the groups whose parameters all have requires_grad off
    (read inside the forward, via a pre-hook) and every group's weights at that moment."""

    def __init__(self, model, callback):
        self.callback, self.entries = callback, []
        self.handle = model.register_forward_pre_hook(self.record)

    def record(self, module, args):
        s = self.callback.strategy
        frozen = tuple(i for i, ps in enumerate(s.group_params) if not any(p.requires_grad for p in ps))
        weights = [torch.cat([p.detach().flatten().clone() for p in ps]) for ps in s.group_params]
        self.entries.append((frozen, weights, s.frozen_groups()))

    def check(self, num_groups, spec):
        """Frozen groups are frozen for real in the forward and unchanged by the step that follows."""
        assert len(self.entries) >= 4
        if spec == "bvgls:probe=2":  # probe steps 0, 2, 4, ...: nothing frozen; in between: all but the selection
            assert [len(f) for f, _, _ in self.entries] == [
                0 if t % 2 == 0 else num_groups - 1 for t in range(len(self.entries))
            ]
        assert any(frozen for frozen, _, _ in self.entries)  # something was frozen for real
        for (frozen, before, names), (_, after, _) in zip(self.entries, self.entries[1:]):
            assert len(names) == len(frozen) < num_groups
            for g in frozen:
                assert torch.equal(before[g], after[g]), g
        self.handle.remove()


# ---------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("spec", SPECS)
def test_hf_trainer_freezes_before_the_next_forward(spec, tmp_path):
    T = pytest.importorskip("transformers")
    from bvgls.integrations.hf import attach

    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(
        T.GPT2Config(
            vocab_size=50,
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=8,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 50, (16, 8), generator=g)
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(16)]
    args = T.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=7,
        per_device_train_batch_size=2,
        learning_rate=0.05,
        optim="sgd",
        max_grad_norm=0.0,
        logging_steps=100,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = T.Trainer(model=model, args=args, train_dataset=data)
    callback = attach(trainer, spec)
    log = ForwardLog(model, callback)
    trainer.train()
    assert len(log.entries) == 7
    log.check(4, spec)  # embed, block0, block1, head
    assert all(p.requires_grad for p in model.parameters())  # restored at the end


# ---------------------------------------------------------------------- Lightning
@pytest.mark.parametrize("spec", SPECS)
def test_lightning_freezes_before_the_next_training_step(spec):
    L = pytest.importorskip("lightning")
    from bvgls.integrations.lightning import BVGLSCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = nn.Sequential(
                nn.Linear(6, 16),
                nn.Tanh(),
                nn.Linear(16, 16),
                nn.Tanh(),
                nn.Linear(16, 16),
                nn.Tanh(),
                nn.Linear(16, 3),
            )
            self.seen = []  # inside training_step: which groups are frozen

        def training_step(self, batch, batch_idx):
            s = callback.strategy
            self.seen.append(tuple(i for i, ps in enumerate(s.group_params) if not any(p.requires_grad for p in ps)))
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    callback = BVGLSCallback(spec)
    module = Module()
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(28, 6, generator=g), torch.randint(0, 3, (28,), generator=g))
    log = ForwardLog(module.model, callback)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=7,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert len(log.entries) == 7
    assert module.seen == [frozen for frozen, _, _ in log.entries]  # same inside training_step and the forward
    log.check(4, spec)
    assert all(p.requires_grad for p in module.parameters())
