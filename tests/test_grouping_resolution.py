"""The ``resolution`` grouping scheme (any CNN: stem, one group per feature-map resolution, head),
traced from the model itself, on weights=None torchvision models."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from bvgls import layer_groups

torchvision = pytest.importorskip("torchvision")

STRIDES = ["stem", "stride4", "stride8", "stride16", "stride32", "head"]


def _names(lg, group):
    return [n for n, _ in lg[group]]


@pytest.mark.parametrize("arch", ["resnet50", "wide_resnet50_2"])
def test_resnets_get_exactly_the_papers_six_groups(arch):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    lg = layer_groups(model, "resolution")
    assert lg.scheme == "resolution"
    # the paper's [conv1 + bn1, layer1, layer2, layer3, layer4, fc], written out by module prefix
    paper = [("conv1.", "bn1."), ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",), ("fc.",)]
    params = [n for n, _ in model.named_parameters()]
    assert [_names(lg, g) for g in lg.names] == [[n for n in params if n.startswith(p)] for p in paper]
    assert lg.names == STRIDES
    # and the same partition as the hand-written ResNet scheme
    assert [_names(lg, g) for g in lg.names] == [
        _names(layer_groups(model, "resnet"), g) for g in layer_groups(model, "resnet").names
    ]


def test_mobilenet_v2_gets_six_groups_one_per_resolution():
    model = torchvision.models.mobilenet_v2(weights=None)
    lg = layer_groups(model, "resolution")
    assert lg.names == STRIDES
    blocks = {g: sorted({int(n.split(".")[1]) for n in _names(lg, g) if n.startswith("features.")}) for g in lg.names}
    # features[1] (expansion 1, stride 1) keeps the stem's resolution; the final 1x1 conv (18) the last one
    assert blocks == {
        "stem": [0, 1],
        "stride4": [2, 3],
        "stride8": [4, 5, 6],
        "stride16": list(range(7, 14)),
        "stride32": list(range(14, 19)),
        "head": [],
    }
    assert _names(lg, "head") == ["classifier.1.weight", "classifier.1.bias"]


def test_a_block_that_downsamples_inside_goes_with_the_stage_it_starts():
    """A bottleneck's 1x1 conv runs at the old resolution, before its strided 3x3 conv: the whole
    block belongs to the resolution it produces."""
    lg = layer_groups(torchvision.models.resnet18(weights=None), "resolution")
    assert "layer2.0.conv1.weight" in _names(lg, "stride8")
    assert "layer2.0.downsample.0.weight" in _names(lg, "stride8")


@pytest.mark.parametrize(
    "arch, first",
    [
        ("efficientnet_b0", "features.0."),
        ("convnext_tiny", "features.0."),
        ("regnet_y_400mf", "stem."),
        ("densenet121", "features.conv0."),
    ],
)
def test_other_cnn_families_get_the_same_kind_of_layout(arch, first):
    model = torchvision.models.get_model(arch, weights=None)
    lg = layer_groups(model, "resolution")
    assert lg.names[0] == "stem" and lg.names[-1] == "head" and 5 <= len(lg) <= 6
    strides = [int(g[len("stride") :]) for g in lg.names[1:-1]]
    assert strides == sorted(strides) and strides[-1] == 32
    assert _names(lg, "stem")[0].startswith(first)
    assert sum(len(v) for v in lg.groups.values()) == len(list(model.parameters()))
    last_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert f"{last_linear}.weight" in _names(lg, "head")


def test_the_trace_leaves_the_model_as_it_was():
    model = torchvision.models.resnet18(weights=None).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer_groups(model, "resolution")
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # batch-norm statistics not updated


def test_a_model_without_feature_maps_is_refused():
    with pytest.raises(ValueError, match="needs a CNN"):
        layer_groups(nn.Sequential(nn.Flatten(), nn.Linear(3 * 224 * 224, 4), nn.ReLU(), nn.Linear(4, 2)), "resolution")


def test_cli_groups_prints_six_resolution_groups_for_mobilenet_v2(tmp_path):
    env = {
        "PYTHONPATH": ":".join(sys.path),
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "TORCH_HOME": str(tmp_path / "torch"),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bvgls",
            "groups",
            "--model",
            "mobilenet_v2",
            "--weights",
            "none",
            "--groups",
            "resolution",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "resolution scheme" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [r[1] for r in rows] == STRIDES
    listed = subprocess.run(
        [sys.executable, "-m", "bvgls", "list"], capture_output=True, text=True, env=env, timeout=300
    )
    assert listed.returncode == 0 and "resolution" in listed.stdout


def test_a_run_selects_among_the_resolution_groups_when_asked(image_root, tmp_path):
    """``groups="resolution"`` (``--groups``) reaches the strategy: a compare grid's bvgls run records the
    resolution groups, and a partial spec is checked against their number, before any training."""
    from bvgls.runner.grid import compare
    from bvgls.runner.models import build_model
    from bvgls.runner.rundir import History

    expected = layer_groups(build_model("tiny-resnet", 3, None), "resolution").names
    assert expected != layer_groups(build_model("tiny-resnet", 3, None)).names  # not what auto would give
    res = compare(
        "bvgls",
        str(image_root),
        seeds=[0],
        lrs=[0.05],
        model="tiny-resnet",
        weights=None,
        out_dir=tmp_path / "g",
        epochs=1,
        batch_size=8,
        progress=False,
        groups="resolution",
    )
    run_dir = tmp_path / "g" / res.rows[0]["run_dir"]
    hist = History.load(run_dir)
    assert hist.group_names == expected and hist.config["groups"] == "resolution"
    with pytest.raises(ValueError, match=f"{len(expected)} groups"):
        compare(
            f"L1-{len(expected) + 1}",
            str(image_root),
            seeds=[0],
            lrs=[0.05],
            model="tiny-resnet",
            weights=None,
            out_dir=tmp_path / "h",
            epochs=1,
            batch_size=8,
            progress=False,
            groups="resolution",
        )
