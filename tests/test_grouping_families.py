"""Stage groupings of the common CNN / hybrid families (torchvision and timm), on weights=None models.

Each family must be detected automatically, put every parameter in exactly one group (the
partition check of ``layer_groups``), and give the stage structure of the architecture: stem
first, head last, one group per stage in between, in forward order.
"""

import subprocess
import sys

import pytest
import torch
from torch import nn

from bvgls import layer_groups

torchvision = pytest.importorskip("torchvision")

# family -> (scheme, expected group names); the stage counts are the architectures' own
FAMILIES = {
    "mobilenet_v2": ("mobilenet", ["stem"] + [f"stage{i}" for i in range(1, 8)] + ["final", "head"]),
    "mobilenet_v3_large": ("mobilenet", ["stem"] + [f"stage{i}" for i in range(1, 7)] + ["final", "head"]),
    "mobilenet_v3_small": ("mobilenet", ["stem"] + [f"stage{i}" for i in range(1, 6)] + ["final", "head"]),
    "efficientnet_b0": ("efficientnet", ["stem"] + [f"stage{i}" for i in range(1, 8)] + ["final", "head"]),
    "efficientnet_v2_s": ("efficientnet", ["stem"] + [f"stage{i}" for i in range(1, 7)] + ["final", "head"]),
    "convnext_tiny": ("convnext-swin", ["stem", "stage1", "stage2", "stage3", "stage4", "head"]),
    "swin_t": ("convnext-swin", ["stem", "stage1", "stage2", "stage3", "stage4", "head"]),
    "regnet_y_400mf": ("regnet", ["stem", "stage1", "stage2", "stage3", "stage4", "head"]),
    "densenet121": ("densenet", ["stem", "stage1", "stage2", "stage3", "stage4", "head"]),
    "maxvit_t": ("maxvit", ["stem", "stage1", "stage2", "stage3", "stage4", "head"]),
}


def _names(lg, group):
    return [n for n, _ in lg[group]]


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return {arch: torchvision.models.get_model(arch, weights=None) for arch in FAMILIES}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_torchvision_family_gets_stage_groups(built, arch):
    model = built[arch]
    scheme, expected = FAMILIES[arch]
    lg = layer_groups(model)
    assert lg.scheme == scheme
    assert lg.names == expected
    # a partition: every parameter exactly once (layer_groups checks it; count it here too)
    assert sum(len(v) for v in lg.groups.values()) == len(list(model.parameters()))
    # forward order: the groups follow the module registration order of their parameters
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    firsts = [order[_names(lg, g)[0]] for g in lg.names if g != "head"]
    assert firsts == sorted(firsts)
    # the head holds the classifier's final Linear
    last_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert f"{last_linear}.weight" in _names(lg, "head")


def test_mobilenet_stages_change_width_and_final_conv_is_separate(built):
    model = built["mobilenet_v2"]
    lg = layer_groups(model)
    widths = []
    for g in lg.names[1:-2]:
        convs = [p for n, p in lg[g] if p.dim() == 4]
        widths.append({c.shape[0] for c in convs[-1:]}.pop())
    assert widths == [16, 24, 32, 64, 96, 160, 320]  # MobileNetV2's (t, c, n, s) table
    assert _names(lg, "final")[0].startswith("features.18.")


def test_downsampling_goes_with_the_stage_it_starts(built):
    lg = layer_groups(built["convnext_tiny"])
    assert any(n.startswith("features.2.") for n in _names(lg, "stage2"))  # the downsample layer
    assert all(n.startswith("features.1.") for n in _names(lg, "stage1"))
    dense = layer_groups(built["densenet121"])
    assert any(n.startswith("features.transition1.") for n in _names(dense, "stage2"))
    assert any(n.startswith("features.norm5.") for n in _names(dense, "head"))
    swin = layer_groups(built["swin_t"])
    assert any(n.startswith("norm.") for n in _names(swin, "head"))


def test_timm_models_use_their_own_group_matcher():
    timm = pytest.importorskip("timm")
    from timm.models import group_parameters

    for arch in ("tf_efficientnet_lite0", "convnext_atto", "mobilenetv3_small_050"):
        model = timm.create_model(arch, pretrained=False)
        lg = layer_groups(model)
        assert lg.scheme == "timm"
        expected = group_parameters(model, model.group_matcher(coarse=True))
        assert [[n for n, _ in lg[g]] for g in lg.names] == [list(expected[k]) for k in sorted(expected)]
        assert lg.names[0] == "stem" and len(lg) >= 5
    lite = layer_groups(timm.create_model("tf_efficientnet_lite0", pretrained=False))
    assert lite.names[1:7] == [f"blocks.{i}" for i in range(6)]


def test_timm_resnet_keeps_the_paper_groups():
    timm = pytest.importorskip("timm")
    lg = layer_groups(timm.create_model("resnet18", pretrained=False))
    assert lg.scheme == "resnet" and lg.names == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]


class FeaturesClassifier(nn.Module):
    """An unknown family shaped like torchvision's: a dominant ``features`` Sequential + a classifier."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3),
            nn.Sequential(nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32)),
        )
        self.classifier = nn.Linear(32, 4)


def test_generic_fallback_descends_into_the_dominant_sequential():
    model = FeaturesClassifier()
    lg = layer_groups(model)
    assert lg.scheme == "generic"
    assert lg.names == ["features.0", "features.1", "features.3", "features.4", "classifier"]


def test_generic_fallback_keeps_top_level_groups_when_there_are_enough():
    model = nn.Sequential(
        nn.Linear(4, 64), nn.Linear(64, 64), nn.Sequential(nn.Linear(64, 64), nn.ReLU()), nn.Linear(64, 2)
    )
    assert layer_groups(model).names == ["0", "1", "2", "3"]


def test_generic_fallback_does_not_split_a_minor_container():
    model = nn.Module()
    model.body = nn.Linear(100, 100)  # most parameters, not a container
    model.extra = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert layer_groups(model).names == ["body", "extra"]


def test_cli_groups_shows_a_registered_family(tmp_path):
    env = {
        "PYTHONPATH": ":".join(sys.path),
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "TORCH_HOME": str(tmp_path / "torch"),
    }
    out = subprocess.run(
        [sys.executable, "-m", "bvgls", "groups", "--model", "mobilenet_v3_small", "--weights", "none"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "mobilenet scheme" in out.stdout and "stage5" in out.stdout and "final" in out.stdout
