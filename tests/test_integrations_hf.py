"""Hugging Face transformers: layer grouping and the Trainer callback, on tiny random models."""

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tolerances import assert_selected_on_the_stepped_gradients  # noqa: E402

import bvgls  # noqa: E402
from bvgls.integrations.hf import STATE_FILE, BVGLSCallback, attach  # noqa: E402
from bvgls.reference import NaiveBVR  # noqa: E402

T = transformers
VOCAB, SEQ, N = 50, 8, 16


def tiny_bert():
    torch.manual_seed(0)
    return T.BertForSequenceClassification(
        T.BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=SEQ,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def tiny_gpt2():
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(
        T.GPT2Config(
            vocab_size=VOCAB,
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=SEQ,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def tiny_llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(
        T.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            max_position_embeddings=SEQ,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )


def tiny_vit():
    torch.manual_seed(0)
    return T.ViTForImageClassification(
        T.ViTConfig(
            image_size=16,
            patch_size=8,
            num_channels=3,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def text_classification_data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (N, SEQ), generator=g)
    labels = torch.randint(0, 3, (N,), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels[i]}
        for i in range(N)
    ]


def language_modelling_data():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (N, SEQ), generator=g)
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(N)]


def image_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 3, 16, 16, generator=g)
    labels = torch.randint(0, 3, (N,), generator=g)
    return [{"pixel_values": x[i], "labels": labels[i]} for i in range(N)]


# ---------------------------------------------------------------------- grouping
@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2, tiny_llama, tiny_vit])
def test_transformers_models_get_embed_blocks_head(build):
    groups = bvgls.layer_groups(build())
    assert groups.scheme == "transformers"
    assert groups.names == ["embed", "block0", "block1", "head"]


def test_group_contents_follow_the_architecture():
    bert = bvgls.layer_groups(tiny_bert())
    assert all(n.startswith("bert.embeddings.") for n, _ in bert["embed"])
    assert all(n.startswith("bert.encoder.layer.1.") for n, _ in bert["block1"])
    assert {n.split(".")[1] for n, _ in bert["head"] if n.startswith("bert.")} == {"pooler"}
    assert any(n.startswith("classifier.") for n, _ in bert["head"])
    llama = bvgls.layer_groups(tiny_llama())
    assert [n for n, _ in llama["head"]] == ["model.norm.weight", "lm_head.weight"]
    vit = bvgls.layer_groups(tiny_vit())
    assert {n for n, _ in vit["embed"]} >= {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"}
    assert {n.split(".")[0] for n, _ in vit["head"]} == {"vit", "classifier"}


def test_encoder_decoder_models_get_one_group_per_block_of_each_stack():
    torch.manual_seed(0)
    t5 = T.T5ForConditionalGeneration(
        T.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0)
    )
    assert bvgls.layer_groups(t5).names == [
        "embed",
        "encoder.block0",
        "encoder.block1",
        "encoder.final",
        "decoder.block0",
        "decoder.block1",
        "head",
    ]


def test_import_bvgls_does_not_import_frameworks():
    code = (
        "import sys, bvgls, bvgls.integrations, bvgls.distributed; "
        "bad = [m for m in ('transformers', 'lightning', 'pytorch_lightning') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------- Trainer
class StepMonitor(T.TrainerCallback):
    """Snapshots the weights around every optimizer step and recomputes the ratios
    from the gradients the optimizer is about to use, with the naive reference."""

    def __init__(self, bvgls_callback):
        self.cb = bvgls_callback
        self.naive = None
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        strategy = self.cb.strategy
        if self.naive is None:
            self.naive = NaiveBVR(strategy.group_params, alpha=strategy.alpha)
        self.naive_ratios = self.naive.update()
        self.grads = [[p.grad.clone() for p in ps if p.grad is not None] for ps in strategy.group_params]
        self.before = [[p.detach().clone() for p in ps] for ps in strategy.group_params]

    def on_optimizer_step(self, args, state, control, **kwargs):
        strategy = self.cb.strategy
        moved = [[not torch.equal(b, p) for b, p in zip(bs, ps)] for bs, ps in zip(self.before, strategy.group_params)]
        self.steps.append(
            {
                "selected": list(strategy.selected),
                "moved": moved,
                "ratios": strategy.ratios.tolist(),
                "naive": self.naive_ratios,
                "grads": self.grads,
            }
        )


def run_trainer(tmp_path, model, data, optim="sgd", strategy="bvgls", max_steps=6, **args):
    targs = T.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        optim=optim,
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **{"save_strategy": "no", **args},
    )
    trainer = T.Trainer(model=model, args=targs, train_dataset=data)
    callback = attach(trainer, strategy)
    monitor = StepMonitor(callback)
    trainer.add_callback(monitor)
    trainer.train()
    return trainer, callback, monitor


@pytest.mark.parametrize(
    "build,data,optim",
    [
        (tiny_bert, text_classification_data, "sgd"),
        (tiny_gpt2, language_modelling_data, "adamw_torch"),
        (tiny_vit, image_data, "sgd"),
    ],
    ids=["bert-sgd", "gpt2-adamw", "vit-sgd"],
)
def test_trainer_updates_only_the_selected_group(tmp_path, build, data, optim):
    trainer, callback, monitor = run_trainer(tmp_path, build(), data(), optim=optim)
    strategy = callback.strategy
    assert isinstance(strategy, bvgls.BVGLS)
    assert strategy.group_names == ["embed", "block0", "block1", "head"]
    assert len(monitor.steps) == strategy.num_steps == 6
    for step in monitor.steps:
        assert len(step["selected"]) == 1
        for g, moved in enumerate(step["moved"]):
            if g in step["selected"]:
                assert any(moved), f"selected group {strategy.group_names[g]} did not move"
            else:
                assert not any(moved), f"unselected group {strategy.group_names[g]} moved"
    assert_selected_on_the_stepped_gradients(monitor.steps)


class FusedMonitor(T.TrainerCallback):
    """At each optimizer step: the groups holding a gradient, the groups the step moves, and the
    selection the strategy had chosen for it at the end of the previous step."""

    def __init__(self, bvgls_callback):
        self.cb, self.steps, self.chosen = bvgls_callback, [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        groups = self.cb.strategy.group_params
        self.chosen = list(self.cb.strategy.probe_selection)
        self.with_grad = [g for g, ps in enumerate(groups) if any(p.grad is not None for p in ps)]
        self.before = [[p.detach().clone() for p in ps] for ps in groups]

    def on_optimizer_step(self, args, state, control, **kwargs):
        groups = self.cb.strategy.group_params
        moved = [
            g
            for g, (bs, ps) in enumerate(zip(self.before, groups))
            if any(not torch.equal(b, p) for b, p in zip(bs, ps))
        ]
        self.steps.append(
            {
                "chosen": self.chosen,
                "with_grad": self.with_grad,
                "moved": moved,
                "selected": list(self.cb.strategy.selected),
            }
        )


def test_trainer_runs_fused_bvgls_with_the_lagged_selection(tmp_path):
    targs = T.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        optim="adamw_torch",
        max_grad_norm=0.0,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    trainer = T.Trainer(model=tiny_gpt2(), args=targs, train_dataset=language_modelling_data())
    callback = attach(trainer, "bvgls:fused=true")
    monitor = FusedMonitor(callback)
    trainer.add_callback(monitor)
    trainer.train()
    assert len(monitor.steps) == 6 and monitor.steps[0]["chosen"] == [] and monitor.steps[0]["moved"] == []
    for step in monitor.steps:  # only the group chosen at the previous step keeps a gradient and moves
        assert step["with_grad"] == step["moved"] == step["selected"] == step["chosen"]
    assert all(len(step["chosen"]) == 1 for step in monitor.steps[1:])


@pytest.mark.parametrize(
    "args, message",
    [
        ({}, "max_grad_norm=1.0 clips .* set max_grad_norm=0"),
        ({"max_grad_norm": 0.0, "gradient_accumulation_steps": 2}, "set gradient_accumulation_steps=1"),
    ],
)
def test_trainer_refuses_fused_settings_it_cannot_follow(tmp_path, args, message):
    targs = T.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        **args,
    )
    trainer = T.Trainer(model=tiny_gpt2(), args=targs, train_dataset=language_modelling_data())
    callback = attach(trainer, "bvgls-fused")
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert not callback.strategy._handles  # refused before any step: hooks removed


def test_trainer_logs_selection_frequency_and_bvr(tmp_path):
    trainer, callback, monitor = run_trainer(tmp_path, tiny_bert(), text_classification_data())
    names = callback.strategy.group_names
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in train_logs] == [2, 4, 6]
    for log, window in zip(train_logs, (monitor.steps[0:2], monitor.steps[2:4], monitor.steps[4:6])):
        freqs = [log[f"bvgls/freq/{name}"] for name in names]
        expected = [sum(g in s["selected"] for s in window) / len(window) for g in range(len(names))]
        assert freqs == pytest.approx(expected)
        for g, name in enumerate(names):
            values = [s["ratios"][g] for s in window if s is not monitor.steps[0]]  # step 1: variance clamped
            assert log[f"bvgls/bvr/{name}"] == pytest.approx(sum(values) / len(values), rel=1e-6)
    # at the end of training the strategy is detached from the optimizer; its counts stay
    assert sum(callback.strategy.counts) == 6
    optimizer = callback.strategy.optimizer
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_fixed_strategy_and_callback_in_constructor(tmp_path):
    model = tiny_bert()
    callback = BVGLSCallback("L3-4")
    targs = T.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        optim="sgd",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        max_grad_norm=0.0,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = T.Trainer(model=model, args=targs, train_dataset=text_classification_data(), callbacks=[callback])
    trainer.train()
    assert callback.strategy.group_names[2:] == ["block1", "head"]
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert moved and all(n.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier.")) for n in moved)
    log = next(log for log in trainer.state.log_history if "loss" in log)
    assert log["bvgls/freq/head"] == 1.0 and log["bvgls/freq/embed"] == 0.0
    assert not any(key.startswith("bvgls/bvr/") for key in log)  # fixed strategies have no ratios


def test_checkpoint_resume_restores_the_statistics(tmp_path):
    data = text_classification_data()
    run_trainer(tmp_path, tiny_bert(), data, max_steps=2, save_strategy="steps", save_steps=2)
    saved = torch.load(tmp_path / "checkpoint-2" / STATE_FILE, weights_only=True)
    assert saved["num_steps"] == 2

    targs = T.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        optim="sgd",
        learning_rate=0.05,
        max_grad_norm=0.0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = T.Trainer(model=tiny_bert(), args=targs, train_dataset=data)
    callback = attach(trainer)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert callback.strategy.num_steps == 3
    assert sum(callback.strategy.counts) == 3


def test_bad_strategy_spec_is_reported(tmp_path):
    targs = T.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no"
    )
    trainer = T.Trainer(model=tiny_bert(), args=targs, train_dataset=text_classification_data())
    attach(trainer, "no-such-strategy")
    with pytest.raises(ValueError, match="already has a BVGLSCallback"):
        attach(trainer)
    with pytest.raises(ValueError, match="unknown strategy 'no-such-strategy'"):
        trainer.train()


# ---------------------------------------------------------------------- shared helpers
def test_groups_are_found_inside_a_wrapper_and_can_be_overridden():
    from bvgls.integrations import build_strategy, model_groups

    class Wrapper(torch.nn.Module):  # e.g. a LightningModule holding a transformers model
        def __init__(self):
            super().__init__()
            self.net = tiny_bert()

    wrapper = Wrapper()
    assert model_groups(wrapper).names == ["embed", "block0", "block1", "head"]
    assert len(model_groups(wrapper, "tensor").names) == len(list(wrapper.parameters()))
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    two = build_strategy(
        "bvgls",
        opt,
        wrapper,
        groups=lambda m: {"body": list(m.net.bert.parameters()), "classifier": list(m.net.classifier.parameters())},
    )
    assert two.group_names == ["body", "classifier"]
    two.remove()
    with pytest.raises(TypeError, match="not a bvgls.GroupStrategy"):
        build_strategy(lambda opt, groups: object(), opt, wrapper)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        build_strategy("bvgls", object(), wrapper)
