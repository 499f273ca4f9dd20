"""bvgls_lab.experiments.text_task (fortune-file parsing, the split, provenance) and bvgls_lab.experiments.text_check
(one run, the lr protocol, fresh-process runs, input errors) on synthetic fortune files and a tiny
random BERT saved in tmp_path: no installed asset is needed."""

import hashlib
import json
import math
import os
from dataclasses import asdict

import pytest
import torch

from bvgls_lab.experiments import text_check, text_task

transformers = pytest.importorskip("transformers")

WORDS = {
    "alpha": ["apple", "pear", "plum", "fig"],
    "beta": ["code", "disk", "byte", "bug"],
    "gamma": ["judge", "court", "law", "jury"],
}


def _write_fortunes(root, n=14):
    """One fortune-format file per class: n entries of the class's words, one duplicate, one
    entry shared by two classes, an empty entry and an overstruck word."""
    root.mkdir(parents=True, exist_ok=True)
    for c, words in WORDS.items():
        entries = [f"{words[i % 4]} {words[(i + 1) % 4]}  {words[(i * 3) % 4]}\n\t-- {c} {i}" for i in range(n)]
        entries += [entries[0], "shared entry", "", "_\bx_\by " + words[0]]
        (root / c).write_text("\n%\n".join(entries) + "\n%\n")
    return root


def test_parse_cleans_entries():
    text = "first  line\n\tsecond\n%\n\n%\n_\bu_\bn_\bd_\be_\br lined\n%\nlast\n"
    assert text_task.parse_fortunes(text) == ["first line second", "under lined", "last"]


def test_build_split_provenance(tmp_path):
    root = _write_fortunes(tmp_path / "f")
    task = text_task.build_fortune_task(root, tuple(WORDS), train=6, val=2, test=3, seed=0)
    assert task.sizes() == {"train": 18, "val": 6, "test": 9}
    for label in range(3):
        assert [task.splits[p][1].count(label) for p in ("train", "val", "test")] == [6, 2, 3]
    parts = [set(task.splits[p][0]) for p in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert "shared entry" not in set().union(*parts)
    prov = task.provenance
    assert prov["dropped_shared_between_classes"] == 1
    assert prov["entries_after_cleaning"]["alpha"] == 14 + 1  # n entries and the overstruck one; dup, empty gone
    assert prov["sha256"]["beta"] == hashlib.sha256((root / "beta").read_bytes()).hexdigest()
    again = text_task.build_fortune_task(root, tuple(WORDS), train=6, val=2, test=3, seed=0)
    other = text_task.build_fortune_task(root, tuple(WORDS), train=6, val=2, test=3, seed=1)
    assert again.splits == task.splits and other.splits["test"] != task.splits["test"]


def test_build_refuses_missing_and_small(tmp_path):
    root = _write_fortunes(tmp_path / "f")
    with pytest.raises(text_task.TaskUnavailable, match="delta"):
        text_task.build_fortune_task(root, ("alpha", "delta"))
    with pytest.raises(ValueError, match="too few entries"):
        text_task.build_fortune_task(root, ("alpha", "beta"), val=10, test=10)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-block BERT and a word-level tokenizer over the synthetic words, saved like a hub folder."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "-", "x", "y", "entry", "shared"]
    vocab += [w for words in WORDS.values() for w in words] + list(WORDS) + [str(i) for i in range(20)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def _settings(tmp_path, tiny_bert, **changes):
    root = _write_fortunes(tmp_path / "f")
    base = text_check.RunSettings(
        "full",
        1e-3,
        1,
        str(tiny_bert),
        str(root),
        tuple(WORDS),
        train=6,
        val=2,
        test=3,
        epochs=2,
        batch_size=4,
        max_length=16,
    )
    return text_check._with(base, **changes)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_run_one_counts_steps_and_selections(tmp_path, tiny_bert, one_thread):
    full = text_check.run_one(_settings(tmp_path, tiny_bert))
    assert full["steps"] == 2 * math.ceil(18 / 4)
    assert full["groups"] == ["embed", "block0", "block1", "head"]
    assert set(full["selection_frequency"].values()) == {1.0}
    assert 0.0 <= full["test_acc"] <= 1.0 and full["peak_rss_mb"] >= full["rss_ready_mb"] > 0
    bvgls = text_check.run_one(_settings(tmp_path, tiny_bert, strategy="bvgls"))
    assert sum(bvgls["selection_frequency"].values()) == pytest.approx(1.0)  # k=1: one group per step
    again = text_check.run_one(_settings(tmp_path, tiny_bert, strategy="bvgls"))
    assert (again["val_loss"], again["train_loss"]) == (bvgls["val_loss"], bvgls["train_loss"])


def _record(lr, seed, val_acc, val_loss):
    return {
        "settings": {"lr": lr, "seed": seed},
        "val_acc": val_acc,
        "val_loss": val_loss,
        "test_acc": 0.5,
        "test_loss": 1.0,
        "peak_rss_mb": 1.0,
        "rss_ready_mb": 1.0,
        "steps": 1,
        "epoch_s": [1.0],
        "selection_frequency": {},
        "bvgls_file": "",
    }


def test_choose_lr_by_validation_then_loss_then_smaller():
    assert text_check.choose_lr([_record(1e-4, 1, 0.5, 1.0), _record(3e-4, 1, 0.6, 2.0)]) == 3e-4
    assert text_check.choose_lr([_record(1e-4, 1, 0.6, 1.5), _record(3e-4, 1, 0.6, 1.0)]) == 3e-4
    assert text_check.choose_lr([_record(3e-4, 1, 0.6, 1.0), _record(1e-4, 1, 0.6, 1.0)]) == 1e-4


def test_arm_runs_grid_then_other_seeds_at_chosen_lr(tmp_path, monkeypatch):
    val = {1e-4: 0.4, 3e-4: 0.7}
    launched = []

    def fake_launch(s, out):
        launched.append((s.lr, s.seed))
        return _record(s.lr, s.seed, val[s.lr], 1.0)

    monkeypatch.setattr(text_check, "launch", fake_launch)
    base = text_check.RunSettings("bvgls", 1.0, 0, "m", "f")
    arm = text_check.strategy_arm(base, (1e-4, 3e-4), (1, 2, 3), tmp_path)
    assert launched == [(1e-4, 1), (3e-4, 1), (3e-4, 2), (3e-4, 3)]
    assert arm["lr"] == 3e-4 and [(r["lr"], r["seed"]) for r in arm["runs"]] == [(3e-4, 1), (3e-4, 2), (3e-4, 3)]
    assert "| `bvgls` | 0.0003 |" in text_check.summarise([arm])


def test_launch_fresh_process_and_reuse(tmp_path, tiny_bert, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(__import__("sys").path))
    s = _settings(tmp_path, tiny_bert, epochs=1)
    record = text_check.launch(s, tmp_path / "out")
    path = tmp_path / "out" / "runs" / f"{s.slug()}.json"
    assert record["settings"] == json.loads(json.dumps(asdict(s))) and record["peak_rss_mb"] > 0
    stamp = path.stat().st_mtime_ns
    assert text_check.launch(s, tmp_path / "out") == record and path.stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--strategies", "nosuch"], "unknown strategy"),
        (["--lrs", "fast"], "comma-separated numbers"),
        (["--model", "/nonexistent"], "no model folder"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, tiny_bert, capsys, argv, message):
    root = _write_fortunes(tmp_path / "f")
    args = [
        "--out",
        str(tmp_path / "o"),
        "--fortunes",
        str(root),
        "--classes",
        "alpha,beta",
        "--train",
        "4",
        "--val",
        "2",
        "--test",
        "2",
        "--model",
        str(tiny_bert),
    ] + argv
    with pytest.raises(SystemExit) as exc:
        text_check.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "o").exists()


def test_missing_fortunes_names_the_setup(tmp_path, tiny_bert, capsys):
    with pytest.raises(SystemExit):
        text_check.main(["--out", str(tmp_path / "o"), "--fortunes", str(tmp_path / "none"), "--model", str(tiny_bert)])
    assert "scripts/setup_text.sh" in capsys.readouterr().err


def test_report_joins_folders_and_refuses_missing(tmp_path, capsys):
    for name, spec, acc in (("a", "full", (0.5, 0.7)), ("b", "bvgls-fused", (0.6, 0.6))):
        runs = [_record(1e-4, seed, 0.5, 1.0) | {"test_acc": a, "peak_rss_mb": 300.0} for seed, a in zip((1, 2), acc)]
        arm = {
            "strategy": spec,
            "lr": 1e-4,
            "grid": [text_check._brief(runs[0])],
            "runs": [text_check._brief(r) for r in runs],
        }
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps([arm]))
    text_check.main(["--report", str(tmp_path / "a"), str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert "| `full` | 0.0001 | 60.0 ± 14.1 | 50.0, 70.0 | 300 [300, 300] | 299 |" in out
    assert "| `bvgls-fused` | 0.0001 | 60.0 ± 0.0 |" in out
    with pytest.raises(SystemExit):
        text_check.main(["--report", str(tmp_path / "none")])
    assert capsys.readouterr().err.startswith("error: no results.json")
