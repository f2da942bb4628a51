"""Parameter counts of every registered model without building one: what ``raydefect models`` lists, instantly.

Backbone sizes are registry data (checked against timm by a test); head sizes follow the decoder and classifier
in `raydefect.models.model` layer by layer (a test builds the real heads and compares). No torch import here.
"""

from __future__ import annotations

from typing import Any

from raydefect.errors import ConfigError
from raydefect.models.registry import BackboneSpec, list_backbones


def feature_indices(depth: int, count: int) -> list[int]:
    """``count`` evenly spaced block indices ending at the last block: depth 12, count 4 -> [2, 5, 8, 11]."""
    if count > depth:
        raise ConfigError(f"model.feature_blocks: {count} is more than the backbone's {depth} blocks; use <= {depth}")
    return sorted({round(depth * (i + 1) / count) - 1 for i in range(count)})


def _conv_block(cin: int, cout: int) -> int:
    return cin * cout * 9 + 2 * cout  # 3x3 conv without bias + GroupNorm


def _conv1x1(cin: int, cout: int) -> int:
    return cin * cout + cout


def decoder_params(spec: BackboneSpec, decoder_dim: int, feature_blocks: int) -> int:
    """`SegDecoder` (ViT) or `FPNDecoder` (CNN) parameters."""
    d = decoder_dim
    detail = max(16, d // 4)
    tail = _conv1x1(d, 1) + _conv_block(d + detail, detail) + _conv_block(detail, detail) + _conv1x1(detail, 1)
    if spec.kind == "cnn":
        channels = spec.feature_channels
        lateral = sum(_conv1x1(c, d) for c in channels)
        return lateral + (len(channels) - 1) * _conv_block(d, d) + _conv_block(3, detail) + tail
    levels = len(feature_indices(spec.depth, feature_blocks))
    stem = _conv_block(3, detail) + _conv_block(detail, detail)
    return levels * _conv1x1(spec.embed_dim, d) + 2 * _conv_block(d, d) + stem + tail


def classifier_params(spec: BackboneSpec, head_hidden: int, num_classes: int) -> int:
    """`MaskGuidedClassifier` parameters: pooling temperature, LayerNorm, fc1, the mask statistics, fc2."""
    e2, h = 2 * spec.embed_dim, head_hidden
    return 1 + 2 * e2 + (e2 * h + h) + (2 * h + h) + (h * num_classes + num_classes)


def format_count(n: int) -> str:
    """12_345_678 -> '12.3M' (the way model sizes are quoted)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}" if n < 100 * scale else f"{n / scale:.0f}{unit}"
    return str(n)


def parameter_table(model_cfg: Any = None, num_classes: int = 2) -> list[dict[str, Any]]:
    """One row per registered backbone with exact parameter counts (backbone at its default image size).

    Head sizes follow ``model_cfg`` (decoder_dim, head_hidden, feature_blocks -- capped at the backbone's depth)
    and ``num_classes`` (normal + defect classes).
    """
    decoder_dim = getattr(model_cfg, "decoder_dim", 128)
    head_hidden = getattr(model_cfg, "head_hidden", 256)
    blocks = getattr(model_cfg, "feature_blocks", 4)
    rows = []
    for spec in list_backbones():
        cls_head = classifier_params(spec, head_hidden, num_classes)
        seg_head = decoder_params(spec, decoder_dim, min(blocks, spec.depth))
        rows.append(
            {
                "backbone": spec.name,
                "hub name": spec.hub_name or "",
                "timm model": spec.timm_name,
                "patch": spec.patch_size,
                "dim": spec.embed_dim,
                "blocks": spec.depth,
                "image": spec.default_image_size,
                "backbone params": spec.params,
                "cls head": cls_head,
                "seg head": seg_head,
                "total": spec.params + cls_head + seg_head,
                "pretrained": "yes" if spec.has_pretrained else "no (random)",
                "kind": spec.kind,
            }
        )
    return rows
