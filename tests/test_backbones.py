"""Backbone registry: names, aliases, errors that name the fix, shapes and sizes checked against timm (meta)."""

from __future__ import annotations

import pytest
import torch

from raydefect.config import load_config
from raydefect.errors import ConfigError, ModelError, WeightsError
from raydefect.models.factory import create_backbone
from raydefect.models.registry import (
    REGISTRY,
    check_image_size,
    list_backbones,
    resolve_backbone,
    timm_kwargs,
)
from raydefect.models.weights import fast_meta_init

DINOV3 = {
    "dinov3-s": ("vit_small_patch16_dinov3", "dinov3_vits16"),
    "dinov3-s+": ("vit_small_plus_patch16_dinov3", "dinov3_vits16plus"),
    "dinov3-b": ("vit_base_patch16_dinov3", "dinov3_vitb16"),
    "dinov3-l": ("vit_large_patch16_dinov3", "dinov3_vitl16"),
    "dinov3-h+": ("vit_huge_plus_patch16_dinov3", "dinov3_vith16plus"),
    "dinov3-7b": ("vit_7b_patch16_dinov3", "dinov3_vit7b16"),
}
DINOV2 = {
    "dinov2-s": ("vit_small_patch14_dinov2", "dinov2_vits14"),
    "dinov2-b": ("vit_base_patch14_dinov2", "dinov2_vitb14"),
    "dinov2-l": ("vit_large_patch14_dinov2", "dinov2_vitl14"),
    "dinov2-g": ("vit_giant_patch14_dinov2", "dinov2_vitg14"),
    "dinov2-s-reg": ("vit_small_patch14_reg4_dinov2", "dinov2_vits14_reg"),
    "dinov2-b-reg": ("vit_base_patch14_reg4_dinov2", "dinov2_vitb14_reg"),
    "dinov2-l-reg": ("vit_large_patch14_reg4_dinov2", "dinov2_vitl14_reg"),
    "dinov2-g-reg": ("vit_giant_patch14_reg4_dinov2", "dinov2_vitg14_reg"),
}


@pytest.mark.parametrize("name", sorted({**DINOV3, **DINOV2}))
def test_short_hub_and_timm_names_resolve_to_the_same_spec(name):
    timm_name, hub = {**DINOV3, **DINOV2}[name]
    spec = resolve_backbone(name)
    assert spec.name == name and spec.timm_name == timm_name and spec.hub_name == hub
    assert resolve_backbone(hub) is spec
    assert resolve_backbone(timm_name) is spec
    assert resolve_backbone(name.upper()) is spec
    assert spec.has_pretrained and spec.hf_hub_id.startswith(f"timm/{timm_name}.")
    assert spec.patch_size == (16 if name.startswith("dinov3") else 14)


def test_registry_holds_all_families_and_tiny_models():
    names = [s.name for s in list_backbones()]
    tiny = {"tiny", "test-tiny", "test-tiny-v2", "test-tiny-cnn"}
    assert set(DINOV3) | set(DINOV2) | set(CNNS) | tiny == set(names) and len(names) == len(set(names))
    for tiny in ("tiny", "test-tiny", "test-tiny-v2"):
        assert not REGISTRY[tiny].has_pretrained and REGISTRY[tiny].patch_size == 8


@pytest.mark.parametrize(
    ("wrong", "dinov3", "dinov2"),
    [
        ("dinov3_vitb14", "dinov3_vitb16 (= dinov3-b)", "dinov2_vitb14 (= dinov2-b)"),
        ("dinov3_vits14", "dinov3_vits16 (= dinov3-s)", "dinov2_vits14 (= dinov2-s)"),
        ("dinov2_vitl16", "dinov3_vitl16 (= dinov3-l)", "dinov2_vitl14 (= dinov2-l)"),
        ("dinov3_vitb14_reg", "dinov3_vitb16 (= dinov3-b)", "dinov2_vitb14_reg (= dinov2-b-reg)"),
    ],
)
def test_patch_size_mixups_name_both_real_models(wrong, dinov3, dinov2):
    with pytest.raises(ModelError) as info:
        resolve_backbone(wrong)
    message = str(info.value)
    assert f"'{wrong}' does not exist" in message
    assert f"Use {dinov3} for DINOv3" in message and f"{dinov2} for DINOv2" in message


def test_patch_mixup_without_a_twin_lists_the_family():
    with pytest.raises(ModelError, match=r"one of dinov3_vits16, .* for DINOv3 or dinov2_vitg14 \(= dinov2-g\)"):
        resolve_backbone("dinov3_vitg14")


def test_unknown_name_suggests_closest_and_the_list_command():
    with pytest.raises(ModelError, match=r"unknown backbone 'dinov3-bb'; did you mean 'dinov3-b'\? run `raydefect"):
        resolve_backbone("dinov3-bb")
    with pytest.raises(ModelError, match="run `raydefect models`"):
        resolve_backbone("vgg16")


def test_config_rejects_unknown_backbone_and_bad_image_size():
    with pytest.raises(ConfigError, match=r"model\.backbone: .*dinov3_vitb16 \(= dinov3-b\)"):
        load_config(None, sets=["model.backbone=dinov3_vitb14"])
    with pytest.raises(
        ConfigError, match=r"data\.image_size: 250 is not a multiple of dinov3-s's patch size 16; use 240 or 256"
    ):
        load_config(None, sets=["data.image_size=250"])
    with pytest.raises(ConfigError, match=r"tune\.image_size: 100 .* dinov2-b's patch size 14; use 98 or 112"):
        load_config(None, sets=["model.backbone=dinov2-b", "tune.image_size=100"])
    assert load_config(None, sets=["model.backbone=dinov2_vitb14", "data.image_size=518"]).data.image_size == 518


def test_check_image_size():
    check_image_size(REGISTRY["dinov3-b"], 224)
    check_image_size(REGISTRY["dinov2-b"], 224)
    with pytest.raises(ConfigError, match=r"data\.image_size: 36 .* patch size 8; use 32 or 40"):
        check_image_size(REGISTRY["test-tiny"], 36)


def test_specs_match_timm_models_on_meta():
    """Registry shapes are data; the real timm models (built on meta: no memory, no download) must agree."""
    import timm

    for spec in list_backbones():
        with torch.device("meta"), fast_meta_init():
            m = timm.create_model(spec.timm_name, pretrained=False, **timm_kwargs(spec, spec.default_image_size))
        assert sum(p.numel() for p in m.parameters()) == spec.params, spec.name
        if spec.has_pretrained:
            cfg = timm.get_pretrained_cfg(f"{spec.timm_name}.{spec.pretrained_tag}")
            assert cfg is not None and tuple(cfg.mean) == spec.mean and tuple(cfg.std) == spec.std, spec.name
            assert cfg.input_size[-1] == spec.default_image_size, spec.name
        if spec.kind == "cnn":
            assert m.feature_info.channels() == list(spec.feature_channels), spec.name
            assert m.feature_info.reduction() == [4, 8, 16, 32], spec.name
            assert spec.embed_dim == spec.feature_channels[-1] and spec.depth == 4 and spec.patch_size == 32
            continue
        assert m.patch_embed.patch_size == (spec.patch_size, spec.patch_size), spec.name
        assert m.embed_dim == spec.embed_dim and len(m.blocks) == spec.depth, spec.name
        assert tuple(m.pretrained_cfg["mean"]) == spec.mean, spec.name
        if spec.has_pretrained:
            assert m.pretrained_cfg["input_size"][-1] == spec.default_image_size, spec.name


@pytest.fixture(scope="module")
def table():
    from raydefect.models.sizes import parameter_table

    return {r["backbone"]: r for r in parameter_table()}


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("dinov3-s", 21e6, 22e6),
        ("dinov3-b", 85e6, 87e6),
        ("dinov3-l", 300e6, 305e6),
        ("dinov3-7b", 6.6e9, 6.8e9),
        ("dinov2-g", 1.1e9, 1.2e9),
    ],
)
def test_meta_parameter_counts_match_published_sizes(table, name, low, high):
    """DINOv3 paper: S 21M, B 86M, L 300M, 7B 6.7B; DINOv2 g 1.1B."""
    rows = table
    assert low <= rows[name]["backbone params"] <= high
    assert rows[name]["total"] == rows[name]["backbone params"] + rows[name]["cls head"] + rows[name]["seg head"]


def test_tiny_backbones_are_timm_models_with_prefix_tokens():
    eva = create_backbone("test-tiny", 32)
    vit = create_backbone("test-tiny-v2", 32)
    assert type(eva).__name__ == "Eva" and type(vit).__name__ == "VisionTransformer"
    for m in (eva, vit):
        assert m.num_prefix_tokens == 5 and m.embed_dim == 32 and len(m.blocks) == 4
        final, levels = m.forward_intermediates(torch.randn(1, 3, 32, 32), indices=[3], norm=True)
        assert levels[0].shape == (1, 32, 4, 4) and final.shape == (1, 5 + 16, 32)


CNNS = [
    *(f"resnet{n}" for n in ("10t", "14t", "18", "18d", "26d", "34", "34d", "50", "50d")),
    *(f"convnext-{n}" for n in ("atto", "femto", "pico", "nano", "tiny", "small", "base")),
    *(f"efficientnet-b{n}" for n in range(5)),
]


def test_cnn_families_are_registered_under_short_and_timm_names():
    for name in CNNS:
        spec = resolve_backbone(name)
        assert spec.kind == "cnn" and spec.has_pretrained and spec.family in ("resnet", "convnext", "efficientnet")
        assert resolve_backbone(spec.timm_name) is spec
    assert resolve_backbone("convnext_atto").name == "convnext-atto"
    with pytest.raises(ConfigError, match=r"multiple of resnet18's total stride 32; use 224 or 256"):
        check_image_size(REGISTRY["resnet18"], 240)


def test_tiny_cnn_returns_maps_at_strides_4_to_32():
    m = create_backbone("test-tiny-cnn", 64)
    maps = m(torch.randn(1, 3, 64, 96))
    assert [tuple(x.shape) for x in maps] == [(1, 8, 16, 24), (1, 16, 8, 12), (1, 32, 4, 6), (1, 64, 2, 3)]


def test_head_sizes_without_torch_match_the_real_heads():
    """`raydefect models` counts heads by formula (no torch import); the built modules must agree."""
    import dataclasses

    from raydefect.config import ModelConfig
    from raydefect.models.model import DefectModel
    from raydefect.models.sizes import classifier_params, decoder_params

    for name in ("test-tiny", "test-tiny-cnn", "dinov3-s", "resnet50", "convnext-atto", "efficientnet-b0"):
        spec = resolve_backbone(name)
        for decoder_dim, hidden, blocks, classes in ((128, 256, 4, 2), (48, 32, 2, 5)):
            cfg = dataclasses.replace(
                ModelConfig(), backbone=name, pretrained=False, decoder_dim=decoder_dim, head_hidden=hidden
            )
            cfg = dataclasses.replace(cfg, feature_blocks=blocks)
            with torch.device("meta"), fast_meta_init():
                model = DefectModel(cfg, 64, ["normal", *(f"c{i}" for i in range(1, classes))], load_weights=False)
            counts = model.count_parameters()
            assert counts["decoder"] == decoder_params(spec, decoder_dim, blocks), (name, decoder_dim)
            assert counts["classifier"] == classifier_params(spec, hidden, classes), (name, hidden)


def test_offline_cnn_pretrained_error_is_quick_and_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match=r"resnet18 \(timm/resnet18\.a1_in1k\).*model\.pretrained=false"):
        create_backbone("resnet18", 64, pretrained=True)


def test_cnn_loads_a_local_timm_checkpoint_and_refuses_another_network(tmp_path):
    import timm
    from safetensors.torch import save_file

    full = timm.create_model("resnet10t", pretrained=False, channels=(8, 16, 32, 64), stem_width=8)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    loaded = create_backbone("test-tiny-cnn", 64, weights=str(path))
    assert torch.equal(loaded.state_dict()["layer4.0.conv1.weight"], full.state_dict()["layer4.0.conv1.weight"])
    with pytest.raises(WeightsError, match=r"model\.weights: .*model\.safetensors does not fit backbone 'resnet18'"):
        create_backbone("resnet18", 64, weights=str(path))


def test_tiny_backbones_have_no_pretrained_weights():
    with pytest.raises(WeightsError, match=r"random-init only .* --set model\.pretrained=false"):
        create_backbone("tiny", 64, pretrained=True)


def test_a_vit_checkpoint_is_refused_by_a_cnn_with_the_reason(tmp_path):
    """timm only warns about missing keys while loading into a features_only model; raydefect checks strictly."""
    from safetensors.torch import save_file

    vit = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in create_backbone("test-tiny", 32).state_dict().items()}, str(vit))
    with pytest.raises(WeightsError, match=r"does not fit backbone 'test-tiny-cnn' .*missing tensors"):
        create_backbone("test-tiny-cnn", 64, weights=str(vit))
