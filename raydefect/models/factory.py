"""Build a registered backbone: random init, pretrained from the timm / HF hub, or a local weights file."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raydefect.models.registry import BackboneSpec, check_image_size, resolve_backbone, timm_kwargs
from raydefect.models.weights import create_cnn_from_file, create_pretrained, load_weights_file

if TYPE_CHECKING:
    from torch import nn


def create_backbone(
    spec: BackboneSpec | str,
    image_size: int,
    *,
    drop_path_rate: float = 0.0,
    pretrained: bool = False,
    weights: str | None = None,
) -> nn.Module:
    """Build the timm model; optionally load pretrained weights (hub) or a local file (see `weights`)."""
    import timm

    if isinstance(spec, str):
        spec = resolve_backbone(spec)
    check_image_size(spec, image_size)
    kwargs = timm_kwargs(spec, image_size, drop_path_rate)
    if weights and spec.kind == "cnn":
        return create_cnn_from_file(spec, kwargs, weights)
    if weights:
        model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        load_weights_file(model, weights, spec)
        return model
    if pretrained:
        return create_pretrained(spec, kwargs)
    return timm.create_model(spec.timm_name, pretrained=False, **kwargs)
