"""layer_groups: the paper's groupings, the generic fallback, patterns, and partition checks."""

import pytest
import torch
from torch import nn

import bvgls

torchvision = pytest.importorskip("torchvision")


def assert_partition(model, groups):
    ids = [id(p) for name in groups for _, p in groups[name]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("arch", ["resnet18", "wide_resnet50_2"])
def test_torchvision_resnets_get_the_papers_six_groups(arch):
    model = getattr(torchvision.models, arch)(weights=None)
    groups = bvgls.layer_groups(model)
    assert groups.scheme == "resnet"
    assert groups.names == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert [n for n, _ in groups["stem"]] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert [n for n, _ in groups["fc"]] == ["fc.weight", "fc.bias"]
    assert_partition(model, groups)


def test_timm_vit_gets_embed_blocks_head():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    groups = bvgls.layer_groups(model)
    assert groups.scheme == "vit" and len(groups) == 14
    assert groups.names[0] == "embed" and groups.names[-1] == "head"
    assert {n for n, _ in groups["embed"]} == {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    }
    assert {n for n, _ in groups["head"]} == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert all(n.startswith("blocks.3.") for n, _ in groups["block3"])
    assert_partition(model, groups)


def test_torchvision_vit_gets_embed_blocks_head():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4
    )
    groups = bvgls.layer_groups(model)
    assert groups.scheme == "torchvision-vit"
    assert groups.names == ["embed", "block0", "block1", "block2", "head"]
    assert {n for n, _ in groups["embed"]} == {
        "class_token",
        "conv_proj.weight",
        "conv_proj.bias",
        "encoder.pos_embedding",
    }
    assert {n for n, _ in groups["head"]} == {
        "encoder.ln.weight",
        "encoder.ln.bias",
        "heads.head.weight",
        "heads.head.bias",
    }
    assert_partition(model, groups)


def test_generic_module_groups_by_top_level_children_through_wrappers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))

        def forward(self, x):
            return self.body(x)

    model = Net()
    model.scale = nn.Parameter(torch.ones(1))  # a parameter held by the root itself
    groups = bvgls.layer_groups(model)
    assert groups.scheme == "generic"
    assert groups.names == ["root.params", "body.0", "body.2", "body.3"]  # body dominates: split into its layers
    inner = Net()
    groups = bvgls.layer_groups(inner)  # single-child wrapper: descend into body
    assert groups.names == ["body.0", "body.2", "body.3"]
    assert_partition(inner, groups)


def test_patterns_first_match_wins_and_unmatched_is_an_error():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    groups = bvgls.layer_groups(model, [("head", r"^2\."), ("body", r"\.weight$"), ("biases", r"bias")])
    assert groups.names == ["head", "body", "biases"]
    assert [n for n, _ in groups["head"]] == ["2.weight", "2.bias"]
    assert [n for n, _ in groups["body"]] == ["0.weight", "1.weight"]
    with pytest.raises(ValueError, match="match no pattern: 0.bias"):
        bvgls.layer_groups(model, {"w": r"weight"})
    with pytest.raises(ValueError, match="regex"):
        bvgls.layer_groups(model, [("w", "(")])


def test_describe_lists_names_and_counts():
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    for p in model.conv1.parameters():
        p.requires_grad_(False)
    text = str(bvgls.layer_groups(model))
    assert "resnet scheme" in text and "layer4" in text
    assert "5,130" in text  # fc: 512*10 + 10
    assert f"{sum(p.numel() for p in model.parameters()):,}" in text


def test_param_groups_skip_frozen_and_carry_names_and_options():
    model = torchvision.models.resnet18(weights=None)
    for p in model.layer1.parameters():
        p.requires_grad_(False)
    pg = bvgls.layer_groups(model).param_groups(weight_decay=0.0)
    assert [g["name"] for g in pg] == ["stem", "layer2", "layer3", "layer4", "fc"]
    assert all(g["weight_decay"] == 0.0 for g in pg)


def test_register_custom_scheme_wins_auto_detection():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model.special = True

    @bvgls.register_grouping("test-special", detect=lambda m: getattr(m, "special", False))
    def _special(m):
        return {"all": list(m.named_parameters())}

    try:
        assert bvgls.layer_groups(model).names == ["all"]
    finally:
        del bvgls.grouping.GROUPING_SCHEMES["test-special"]


def test_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        bvgls.layer_groups([1, 2])
    with pytest.raises(ValueError, match="unknown grouping scheme 'nope'"):
        bvgls.layer_groups(nn.Linear(2, 2), "nope")
