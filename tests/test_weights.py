"""Weights: local files (timm safetensors, Meta's DINOv3/DINOv2 .pth remapped by timm's filters), the hub path
offline, and errors that name the file, the fix and the backbone a file fits."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from raydefect.config import ModelConfig
from raydefect.errors import WeightsError
from raydefect.models.factory import create_backbone
from raydefect.models.registry import REGISTRY
from raydefect.models.weights import identify_backbone, read_state_dict


def _to_meta_dinov3(sd: dict[str, torch.Tensor], num_heads: int, qkv_bias: float = 0.0) -> dict[str, torch.Tensor]:
    """timm Eva (DINOv3) state dict -> the key layout of Meta's official dinov3_*.pth checkpoints."""
    out = {}
    for k, v in sd.items():
        k = k.replace("reg_token", "storage_tokens")
        k = re.sub(r"\.gamma_1$", ".ls1.gamma", k)
        k = re.sub(r"\.gamma_2$", ".ls2.gamma", k)
        out[k] = v.clone()
        if k.endswith("attn.qkv.weight"):
            prefix = k[: -len("weight")]
            dim = v.shape[1]
            out[prefix + "bias"] = torch.full((3 * dim,), qkv_bias)
            out[prefix + "bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    dim = sd["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, dim)
    out["rope_embed.periods"] = torch.arange(dim // num_heads // 4, dtype=torch.float32)
    return out


def _to_meta_dinov2_reg(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT (DINOv2 + registers) -> Meta's dinov2_*_reg4 layout (pos_embed has a CLS row; cls_token excludes it)."""
    out = {k: v.clone() for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    cls_pos = torch.randn(1, 1, sd["pos_embed"].shape[-1])
    out["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    out["cls_token"] = sd["cls_token"] - cls_pos
    out["register_tokens"] = sd["reg_token"].clone()
    out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_meta_dinov3_pth_is_remapped_and_loads(tmp_path):
    torch.manual_seed(1)
    source = create_backbone("test-tiny", 32).eval()
    path = tmp_path / "dinov3_vitt8_pretrain.pth"
    torch.save(_to_meta_dinov3(source.state_dict(), num_heads=2), path)
    loaded = create_backbone("test-tiny", 32, weights=str(path)).eval()
    assert _same(loaded.state_dict(), source.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), source(x), atol=1e-5)


def test_meta_dinov3_nonzero_qkv_bias_is_reported(tmp_path, capsys):
    source = create_backbone("test-tiny", 32)
    path = tmp_path / "with_bias.pth"
    torch.save(_to_meta_dinov3(source.state_dict(), num_heads=2, qkv_bias=0.1), path)
    create_backbone("test-tiny", 32, weights=str(path))
    assert "non-zero qkv bias" in capsys.readouterr().err


def test_meta_dinov2_reg_pth_is_remapped_and_position_embeddings_resampled(tmp_path):
    torch.manual_seed(2)
    source = create_backbone("test-tiny-v2", 64).eval()  # "pretrained" on an 8x8 grid
    path = tmp_path / "dinov2_vitt8_reg4_pretrain.pth"
    torch.save(_to_meta_dinov2_reg(source.state_dict()), path)
    same_size = create_backbone("test-tiny-v2", 64, weights=str(path)).eval()
    assert _same(same_size.state_dict(), source.state_dict())
    smaller = create_backbone("test-tiny-v2", 32, weights=str(path))  # the run uses 32 px: a 4x4 grid
    assert smaller.pos_embed.shape == (1, 16, 32)
    assert torch.allclose(smaller.cls_token, source.cls_token, atol=1e-6)
    assert torch.equal(smaller.blocks[3].mlp.fc2.weight, source.blocks[3].mlp.fc2.weight)


def test_training_checkpoint_wrapping_is_unwrapped(tmp_path):
    source = create_backbone("test-tiny", 32)
    meta = _to_meta_dinov3(source.state_dict(), num_heads=2)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in meta.items()}, "iteration": torch.tensor(5)}, path)
    loaded = create_backbone("test-tiny", 32, weights=str(path))
    assert _same(loaded.state_dict(), source.state_dict())


def test_timm_safetensors_loads_through_the_model_config(tmp_path):
    from raydefect.models.model import DefectModel

    source = create_backbone("test-tiny", 32)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = DefectModel(ModelConfig(backbone="test-tiny", weights=str(path)), 32, ["normal", "x"])
    assert _same(model.backbone.state_dict(), source.state_dict())


def test_missing_file_names_it(tmp_path):
    with pytest.raises(WeightsError, match=r"model\.weights: file not found: .*nope\.pth"):
        create_backbone("test-tiny", 32, weights=str(tmp_path / "nope.pth"))


def test_unknown_extension_and_folder(tmp_path):
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"unknown extension '\.ckpt'; expected \.safetensors"):
        read_state_dict(tmp_path / "w.ckpt")
    with pytest.raises(WeightsError, match="is a folder"):
        read_state_dict(tmp_path)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "obj": _Payload()}, path)
    with pytest.raises(WeightsError, match=r"pickled Python objects.*refused"):
        read_state_dict(path)
    assert not _Payload.unpickled


class _Payload:
    unpickled = False

    def __setstate__(self, state):  # would run if the file were unpickled with weights_only=False
        type(self).unpickled = True


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    source = create_backbone("test-tiny", 32)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsError, match=r"not a readable safetensors file.*re-download"):
        read_state_dict(path)


def test_shape_mismatch_names_the_file_and_the_backbone_it_fits(tmp_path):
    source = create_backbone("test-tiny", 32)
    path = tmp_path / "small.pth"
    torch.save(_to_meta_dinov3(source.state_dict(), num_heads=2), path)
    with pytest.raises(WeightsError) as info:
        create_backbone("tiny", 32, weights=str(path))
    message = str(info.value)
    assert "small.pth does not fit backbone 'tiny'" in message
    assert "shape mismatches" in message
    assert "it fits test-tiny: set --set model.backbone=test-tiny" in message


def test_identify_backbone_tells_dinov3_from_dinov2():
    assert identify_backbone(create_backbone("test-tiny", 32).state_dict()) == ["test-tiny"]
    assert identify_backbone(create_backbone("test-tiny-v2", 32).state_dict()) == ["test-tiny-v2"]
    assert identify_backbone({"x": torch.zeros(1)}) == []


def test_offline_pretrained_error_says_how_to_get_weights(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and an empty cache: the real timm/HF path fails fast with a WeightsError naming the fix."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    spec = REGISTRY["dinov3-s"]
    with pytest.raises(WeightsError) as info:
        create_backbone(spec, 32, pretrained=True)
    message = str(info.value)
    assert "timm/vit_small_patch16_dinov3.lvd1689m" in message
    assert "HF_HUB_OFFLINE" in message
    assert "huggingface-cli download timm/vit_small_patch16_dinov3.lvd1689m" in message
    assert "--set model.weights=PATH" in message and "--set model.pretrained=false" in message


def test_unreachable_hub_fails_the_preflight_fast_with_the_whole_message(tmp_path, monkeypatch):
    """Online, weights not cached, the hub unreachable: the driver's pre-flight says so within seconds (the hub
    client retried for minutes inside each Ray worker), with the whole fix in the message."""
    import time

    import huggingface_hub.constants as hf_constants

    from raydefect.config import load_config
    from raydefect.models.weights import check_weights_available

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        check_weights_available(load_config().model)  # the default config: pretrained DINOv3
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "cannot be reached" in message and "http://127.0.0.1:9" in message
    assert message.endswith("train from scratch with --set model.pretrained=false")
