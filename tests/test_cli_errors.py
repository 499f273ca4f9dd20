"""User mistakes and unsafe files, through the real ``bvgls`` command in a subprocess.

Every user mistake must end with exit code != 0 and ONE line ``error: ...`` that names the
problem (the file, the option, the directory), never a traceback, and nothing already written
may be lost. Tiny model (tiny-cnn), 1-2 epochs, a few generated images.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import write_image_folder

MODEL = ("--model", "tiny-cnn", "--weights", "none", "--batch-size", "8")
TINY = (*MODEL, "--lr", "0.05", "--no-progress")
READ_ONLY = "/sys/bvgls-reliability-test/out"  # mkdir there fails, even for root
MARKER_NAME = "unpickled-marker"


# ---------------------------------------------------------------------- helpers
def bvgls(*args, timeout=300, env=None):
    """Run the real command line; PYTHONPATH is inherited, BVGLS_DEBUG is not."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **(env or {})}
    env.pop("BVGLS_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "bvgls", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )


def assert_one_line_error(res, *needles):
    """Exit code != 0, no traceback, exactly one ``error:`` line, naming every needle."""
    output = res.stdout + res.stderr
    assert res.returncode != 0, output
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    for needle in needles:
        assert str(needle) in errors[0], errors[0]
    return errors[0]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")} for line in f]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class MakesMarker:
    """A harmless payload: unpickling it creates a directory (proof that the file's code ran)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def compare(colors, out, *extra, strategies="full", lrs="0.05"):
    """``bvgls compare`` on the colours task: one seed, one epoch, the tiny model, no bars
    (``lrs=None``: no --lrs)."""
    lr_args = () if lrs is None else ("--lrs", lrs)
    return bvgls(
        "compare",
        "--data",
        colors,
        "--out",
        out,
        "--strategies",
        strategies,
        "--seeds",
        "0",
        *lr_args,
        "--epochs",
        "1",
        *extra,
        *MODEL,
        "--no-progress",
    )


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------- shared runs
@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    """3 classes, 4 train / 2 test images each (train: 12 images = 2 steps of 8)."""
    return write_image_folder(tmp_path_factory.mktemp("rel") / "colors", train_per_class=4, test_per_class=2, size=16)


@pytest.fixture(scope="module")
def whole_run(colors, tmp_path_factory):
    """2 epochs, uninterrupted, checkpoint kept."""
    run = tmp_path_factory.mktemp("whole") / "run"
    res = bvgls("finetune", "--data", colors, "--epochs", "2", "--out", run, "--keep-checkpoint", *TINY)
    assert res.returncode == 0, res.stdout + res.stderr
    return run


@pytest.fixture(scope="module")
def stopped_run(colors, tmp_path_factory):
    """The same run stopped after epoch 1 (checkpoint.pt, metrics of 1 epoch); tests copy it."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    res = bvgls("finetune", "--data", colors, "--epochs", "2", "--out", run, "--stop-after", "1", *TINY)
    assert res.returncode == 0 and (run / "checkpoint.pt").is_file(), res.stdout + res.stderr
    return run


@pytest.fixture(scope="module")
def compare_dir(colors, tmp_path_factory):
    """A finished one-cell compare grid (full, lr 0.05, --augment none); tests copy it."""
    out = tmp_path_factory.mktemp("cmp") / "out"
    res = compare(colors, out, "--augment", "none")
    assert res.returncode == 0, res.stdout + res.stderr
    return out


# ---------------------------------------------------------------------- bad data
def test_corrupt_images_are_refused_before_training(colors, tmp_path):
    # a corrupt image in train/ or test/ -> one line naming the file, before any epoch
    # (test/ surfaced only after a whole epoch). One invocation: the line names every bad file.
    data = tmp_path / "data"
    shutil.copytree(colors, data)
    garbage = data / "train" / "green" / "bad.png"
    garbage.write_bytes(b"this is not an image\n" * 10)
    truncated = data / "test" / "green" / "cut.png"  # a real PNG cut in half
    good = (data / "test" / "green" / "0.png").read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    res = bvgls("finetune", "--data", data, "--epochs", "1", "--out", tmp_path / "run", *TINY)
    assert_one_line_error(res, garbage, truncated)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_one_class_dataset_is_refused(tmp_path):
    # a 1-class dataset was accepted and reported 0% error
    data = write_image_folder(tmp_path / "one", train_per_class=3, test_per_class=2, size=16)
    for split in ("train", "test"):
        shutil.rmtree(data / split / "green")
        shutil.rmtree(data / split / "blue")
    res = bvgls("finetune", "--data", data, "--epochs", "1", "--out", tmp_path / "run", *TINY)
    assert_one_line_error(res, "class")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------- --out
@pytest.fixture
def two_runs(whole_run, tmp_path):
    return [copy_run(whole_run, tmp_path / "a"), copy_run(whole_run, tmp_path / "b")]


@pytest.mark.parametrize(
    "command,target", [("finetune", "file"), ("finetune", "read-only"), ("compare", "read-only"), ("plot", "file")]
)  # one helper serves every command and case
def test_out_that_cannot_be_written(command, target, colors, tmp_path, request):
    # --out pointing at an existing file or a read-only place
    if target == "file":
        out = tmp_path / "taken.txt"
        out.write_text("keep me\n")
    else:
        out = READ_ONLY
    if command == "finetune":
        res = bvgls("finetune", "--data", colors, "--epochs", "1", "--out", out, *TINY)
    elif command == "compare":
        res = bvgls(
            "compare", "--data", colors, "--out", out, "--strategies", "full", "--seeds", "0", "--epochs", "1", *TINY
        )
    else:  # several run directories: the comparison figure goes to --out
        runs = request.getfixturevalue("two_runs")
        res = bvgls("plot", *runs, "--out", out)
    assert_one_line_error(res, out)
    if target == "file":
        assert out.read_text() == "keep me\n"


# ---------------------------------------------------------------------- --device
@pytest.mark.parametrize("device", ["cuda", "mps", "foo"])
def test_unavailable_device(device, colors, tmp_path):
    # --device cuda|mps|foo where unavailable
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("cuda is available here")
    mps = getattr(torch.backends, "mps", None)
    if device == "mps" and mps is not None and mps.is_available():
        pytest.skip("mps is available here")
    res = bvgls("finetune", "--data", colors, "--epochs", "1", "--out", tmp_path / "run", "--device", device, *TINY)
    assert_one_line_error(res, "--device", device)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------- unreadable files
@pytest.mark.parametrize("content", ["random", "text"])
@pytest.mark.parametrize("option", ["--model", "--weights"])
def test_unreadable_model_or_weights_file(option, content, colors, tmp_path):
    # random bytes or text as --weights/--model ("error: 101" is not a message)
    path = tmp_path / "thing.pt"
    if content == "random":
        path.write_bytes(random.Random(0).randbytes(4096))
    else:
        path.write_text("these are not weights\n" * 20)
    model = ("--model", path) if option == "--model" else ("--model", "tiny-cnn", "--weights", path)
    res = bvgls(
        "finetune",
        "--data",
        colors,
        "--epochs",
        "1",
        "--out",
        tmp_path / "run",
        *model,
        "--batch-size",
        "8",
        "--no-progress",
    )
    assert_one_line_error(res, path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoint_on_resume(damage, stopped_run, tmp_path):
    # a truncated, garbage or empty checkpoint (an empty one printed only "Aborted.")
    run = copy_run(stopped_run, tmp_path / "run")
    ckpt = run / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": random.Random(1).randbytes(len(data)), "empty": b""}[damage]
    )
    before = (run / "metrics.jsonl").read_text()
    res = bvgls("finetune", "--resume", run, "--no-progress")
    assert_one_line_error(res, ckpt)
    assert (run / "metrics.jsonl").read_text() == before  # nothing lost


def test_plot_names_truncated_metrics_file(whole_run, tmp_path):
    # a truncated metrics.jsonl in plot (name the file)
    run = copy_run(whole_run, tmp_path / "run")
    path = run / "metrics.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 40])
    res = bvgls("plot", run)
    assert_one_line_error(res, path)


# ---------------------------------------------------------------------- compare grid
def test_stray_single_lr_run_is_named(compare_dir, colors, tmp_path):
    # a stray single-lr run locks a compare directory (name the directory),
    # and the refusal comes before training a run that could never be reported
    out = copy_run(compare_dir, tmp_path / "out")
    res = compare(colors, out, "--augment", "none", lrs="0.1")
    assert_one_line_error(res, os.path.join("runs", "colors", "full", "lr0.05"))
    assert not (out / "runs" / "colors" / "full" / "lr0.1").exists()


def test_strategy_list_whitespace_is_stripped(colors, tmp_path):
    # --strategies "full, bvgls" recorded " bvgls" with a leading space
    out = tmp_path / "out"
    res = compare(colors, out, strategies="full, bvgls")
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(r["strategy"] for r in read_csv(out / "results.csv")) == ["bvgls", "full"]
    config = json.loads((out / "runs" / "colors" / "bvgls" / "lr0.05" / "seed0" / "config.json").read_text())
    assert config["strategy"] == "bvgls"


# ---------------------------------------------------------------------- non-finite settings
@pytest.mark.parametrize(
    "command,option,value",
    [
        ("finetune", "--lr", "inf"),
        ("finetune", "--lr", "nan"),
        ("finetune", "--momentum", "nan"),
        ("compare", "--lrs", "inf"),
        ("compare", "--momentum", "nan"),
    ],
)
def test_non_finite_setting_is_rejected_up_front(command, option, value, colors, tmp_path):
    # reject --lr inf, --momentum nan and the like before anything runs
    out = tmp_path / "out"
    args = (*MODEL, "--no-progress")
    if command == "finetune":
        res = bvgls("finetune", "--data", colors, "--epochs", "1", "--out", out, *args, option, value)
    else:
        res = compare(colors, out, option, value, lrs=None)
    assert_one_line_error(res, option)
    assert not out.exists()


def test_diverged_finetune_is_reported(colors, tmp_path):
    # --lr 1e30 trains to NaN; finetune crashed at the end formatting None
    run = tmp_path / "run"
    res = bvgls(
        "finetune",
        "--data",
        colors,
        "--epochs",
        "1",
        "--out",
        run,
        "--strategy",
        "full",
        *MODEL,
        "--no-progress",
        "--lr",
        "1e30",
    )
    output = res.stdout + res.stderr
    assert "Traceback" not in output, output[-3000:]
    assert "diverged" in output.lower(), output
    assert json.loads((run / "result.json").read_text())["diverged"] is True


def test_diverged_compare_run_is_marked(colors, tmp_path):
    # in compare a NaN model got a plausible test error in table.md
    out = tmp_path / "out"
    res = compare(colors, out, lrs="1e30")
    output = res.stdout + res.stderr
    assert "Traceback" not in output, output[-3000:]
    rows = read_csv(out / "results.csv")
    assert [r.get("diverged") for r in rows] == ["True"]
    assert "diverged" in (out / "table.md").read_text()


# ---------------------------------------------------------------------- reruns and resumes
def test_compare_rerun_with_other_augment(compare_dir, colors, tmp_path):
    # --augment is not checked on a rerun: seeds with different augmentation were averaged
    out = copy_run(compare_dir, tmp_path / "out")
    res = compare(colors, out, "--augment", "light")
    if res.returncode != 0:  # refused ...
        assert_one_line_error(res, "augment")
    else:  # ... or kept apart: the light run is trained, not the none run reused
        finished = [d for d, _, files in os.walk(out / "runs") if "result.json" in files]
        assert len(finished) == 2, finished


def test_compare_lrs_beyond_six_digits_do_not_share_a_run(colors, tmp_path):
    # lrs that differ beyond 6 significant digits shared one run directory
    out = tmp_path / "out"
    res = compare(colors, out, "--no-extend-lrs", "--val-fraction", "0.34", lrs="0.0123456,0.01234561")
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(float(r["lr"]) for r in read_csv(out / "results.csv")) == [0.0123456, 0.01234561]
    assert len(os.listdir(out / "runs" / "colors" / "full")) == 2


def test_resume_refuses_changed_settings(stopped_run, tmp_path):
    # --resume silently ignored a changed --epochs / --lr (one line names every change);
    # an option repeated with its recorded value (--batch-size 8) is fine
    run = copy_run(stopped_run, tmp_path / "run")
    before = (run / "metrics.jsonl").read_text()
    res = bvgls("finetune", "--resume", run, "--epochs", "3", "--lr", "0.1", "--batch-size", "8", "--no-progress")
    line = assert_one_line_error(res, "--epochs 3", "--lr 0.1")
    assert "--batch-size" not in line
    assert (run / "metrics.jsonl").read_text() == before


def test_resume_with_other_workers_is_exact_or_refused(stopped_run, whole_run, tmp_path):
    # changing --workers on resume broke exact reproduction (augmentation streams differ)
    run = copy_run(stopped_run, tmp_path / "run")
    res = bvgls("finetune", "--resume", run, "--workers", "1", "--no-progress")
    if res.returncode != 0:
        assert_one_line_error(res, "--workers")
    else:
        assert metrics(run) == metrics(whole_run)


# ---------------------------------------------------------------------- unsafe loading
def test_resume_never_unpickles_an_untrusted_checkpoint(stopped_run, tmp_path):
    # _load_checkpoint retried torch.load(weights_only=False): --resume ran the file's code
    run = copy_run(stopped_run, tmp_path / "run")
    marker = tmp_path / MARKER_NAME
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    ckpt["extra"] = MakesMarker(marker)
    torch.save(ckpt, run / "checkpoint.pt")
    res = bvgls("finetune", "--resume", run, "--no-progress")
    assert not marker.exists(), "the checkpoint's code was executed"
    assert_one_line_error(res, "--trust-pickle", run / "checkpoint.pt")
    # the explicit flag is the way to load it
    trusted = bvgls("finetune", "--resume", run, "--trust-pickle", "--no-progress")
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert marker.exists() and (run / "result.json").is_file()


def test_pickled_model_file_needs_trust_flag(colors, tmp_path):
    # model files given as a pickled nn.Module were unpickled by design
    from torch import nn

    marker = tmp_path / MARKER_NAME
    net = nn.Sequential()
    net.add_module("stem", nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    net.add_module("head", nn.Sequential(nn.Linear(4, 3)))
    net.payload = MakesMarker(marker)
    path = tmp_path / "pickled.pt"
    torch.save(net, path)
    res = bvgls(
        "finetune",
        "--data",
        colors,
        "--epochs",
        "1",
        "--out",
        tmp_path / "run",
        "--model",
        path,
        "--batch-size",
        "8",
        "--no-progress",
    )
    assert not marker.exists(), "the model file's code was executed"
    assert_one_line_error(res, "--trust-pickle", path)
    trusted = bvgls("groups", "--model", path, "--trust-pickle")
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert marker.exists()


def test_written_files_load_with_weights_only(whole_run):
    # every file bvgls writes must load with weights_only=True
    for name in ("checkpoint.pt", "model.pt"):
        obj = torch.load(whole_run / name, map_location="cpu", weights_only=True)
        assert isinstance(obj, dict) and obj.get("format", "").startswith("bvgls-")


# ---------------------------------------------------------------------- fresh-machine round
def test_unknown_strategy_option_and_bad_values_are_refused_before_loading_data(tmp_path):
    # --data names nothing: had the dataset been loaded first, the error would be about it
    cases = [
        ("bvgls:kk=2", "strategy 'bvgls:kk=2': unknown option kk; the options of bvgls are: k, alpha"),
        ("bvgls:probe=0", "probe (steps between two probe steps) must be a positive integer, got 0"),
        ("bvgls:static=0", "static (probing steps before fixing) must be a positive integer, got 0"),
    ]
    for spec, message in cases:
        out = tmp_path / "new" / "run"
        res = bvgls(
            "finetune",
            "--model",
            "tiny-cnn",
            "--weights",
            "none",
            "--data",
            tmp_path / "no-such-data",
            "--strategy",
            spec,
            "--out",
            out,
        )
        assert_one_line_error(res, message)
        assert "does not fit" not in res.stderr
        assert not (tmp_path / "new").exists()  # a failed command leaves no empty output directory


def test_no_progress_keeps_the_epoch_summaries(image_root, tmp_path):
    res = bvgls(
        "finetune",
        "--model",
        "tiny-cnn",
        "--weights",
        "none",
        "--data",
        image_root,
        "--strategy",
        "full",
        "--epochs",
        2,
        "--batch-size",
        16,
        "--lr",
        0.05,
        "--no-progress",
        "--out",
        tmp_path / "run",
    )
    assert res.returncode == 0, res.stderr
    assert [line.split(":")[0] for line in res.stdout.splitlines() if line.startswith("epoch ")] == [
        "epoch 1/2",
        "epoch 2/2",
    ]
    assert "it/s" not in res.stderr and "step/s" not in res.stderr and "%|" not in res.stderr


def test_offline_timm_weights_fail_fast_in_one_line(image_root, tmp_path):
    pytest.importorskip("timm")
    env_endpoint = {"HF_ENDPOINT": "http://10.255.255.1", "HF_HUB_OFFLINE": "0"}  # nothing answers there
    res = bvgls(
        "finetune",
        "--model",
        "timm:resnet10t",
        "--weights",
        "DEFAULT",
        "--data",
        image_root,
        "--out",
        tmp_path / "run",
        env=env_endpoint,
        timeout=150,
    )
    assert_one_line_error(res, "could not download the pretrained weights of timm:resnet10t", "--weights none")


def test_list_does_not_cut_descriptions(tmp_path):
    res = bvgls("list", env={"COLUMNS": "1000"})
    assert res.returncode == 0, res.stderr
    # both docstrings wrap their first sentence over several lines
    assert (
        "fused=True: fold each gradient during backward and free it (selection lags a step; lag=0: no lag, "
        "the best groups' gradients are held instead)." in res.stdout
    )
    assert 'parameters held directly by a module come first, as "<name>.params".' in res.stdout
