"""Backbone registry: short names -> timm models (timm-style: a frozen spec per name + one factory).

Users write ``model.backbone: dinov3-b`` (or the torch-hub name ``dinov3_vitb16``, or timm's own name); this
module resolves it to a `BackboneSpec` and builds the timm model. The registry itself is plain data and imports
neither torch nor timm, so configs can validate a name instantly; `create_backbone` imports timm when called.

Tiny random backbones (``tiny``, ``test-tiny``, ``test-tiny-v2``) are real timm models with small kwargs, so tests
and the demo run the same code path (prefix tokens, RoPE or absolute position embeddings, forward_intermediates)
as DINOv3 / DINOv2. They never have pretrained weights.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raydefect.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone. Shapes are recorded here so listing needs no model; a test checks them against timm."""

    name: str  # short name users type: "dinov3-b"
    timm_name: str  # timm model function: "vit_base_patch16_dinov3"
    family: str  # "dinov3", "dinov2" or "test"
    patch_size: int
    embed_dim: int
    depth: int
    default_image_size: int  # the resolution the weights were made for (timm's pretrained cfg)
    hub_name: str | None = None  # torch-hub entry point: "dinov3_vitb16"
    pretrained_tag: str | None = None  # timm / HF hub tag; None = random init only
    timm_kwargs: tuple[tuple[str, Any], ...] = ()  # architecture overrides (tiny models)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    description: str = ""
    aliases: tuple[str, ...] = field(default=(), compare=False)

    @property
    def has_pretrained(self) -> bool:
        return self.pretrained_tag is not None

    @property
    def hf_hub_id(self) -> str | None:
        """The Hugging Face repo timm downloads from, e.g. ``timm/vit_base_patch16_dinov3.lvd1689m``."""
        return f"timm/{self.timm_name}.{self.pretrained_tag}" if self.pretrained_tag else None

    def all_names(self) -> tuple[str, ...]:
        names = [self.name, *self.aliases]
        if self.hub_name:
            names.append(self.hub_name)
        if self.has_pretrained:
            names.append(self.timm_name)
        return tuple(dict.fromkeys(names))


_DINOV3 = "DINOv3 (Meta, 2025), RoPE + 4 registers, LVD-1689M"
_DINOV2 = "DINOv2 (Meta, 2023), LVD-142M"
_SIZES_V3 = {"s": "small", "s+": "small_plus", "b": "base", "l": "large", "h+": "huge_plus", "7b": "7b"}
_DIMS_V3 = {"s": (384, 12), "s+": (384, 12), "b": (768, 12), "l": (1024, 24), "h+": (1280, 32), "7b": (4096, 40)}
_HUB_V3 = {"s": "vits16", "s+": "vits16plus", "b": "vitb16", "l": "vitl16", "h+": "vith16plus", "7b": "vit7b16"}
_SIZES_V2 = {"s": "small", "b": "base", "l": "large", "g": "giant"}
_DIMS_V2 = {"s": (384, 12), "b": (768, 12), "l": (1024, 24), "g": (1536, 40)}


def _build_registry() -> dict[str, BackboneSpec]:
    specs: list[BackboneSpec] = []
    for size, timm_size in _SIZES_V3.items():
        dim, depth = _DIMS_V3[size]
        specs.append(
            BackboneSpec(
                name=f"dinov3-{size}",
                timm_name=f"vit_{timm_size}_patch16_dinov3",
                family="dinov3",
                patch_size=16,
                embed_dim=dim,
                depth=depth,
                default_image_size=256,
                hub_name=f"dinov3_{_HUB_V3[size]}",
                pretrained_tag="lvd1689m",
                description=_DINOV3,
            )
        )
    for reg in (False, True):
        for size, timm_size in _SIZES_V2.items():
            dim, depth = _DIMS_V2[size]
            specs.append(
                BackboneSpec(
                    name=f"dinov2-{size}" + ("-reg" if reg else ""),
                    timm_name=f"vit_{timm_size}_patch14_" + ("reg4_" if reg else "") + "dinov2",
                    family="dinov2",
                    patch_size=14,
                    embed_dim=dim,
                    depth=depth,
                    default_image_size=518,
                    hub_name=f"dinov2_vit{size}14" + ("_reg" if reg else ""),
                    pretrained_tag="lvd142m",
                    description=_DINOV2 + (", 4 registers" if reg else ""),
                )
            )
    tiny = dict(patch_size=8, family="test", pretrained_tag=None)
    specs += [
        BackboneSpec(
            name="tiny",
            timm_name="vit_small_patch16_dinov3",
            embed_dim=96,
            depth=4,
            default_image_size=64,
            timm_kwargs=(("patch_size", 8), ("embed_dim", 96), ("depth", 4), ("num_heads", 3)),
            description="random-init DINOv3-style ViT for demos (never pretrained)",
            **tiny,
        ),
        BackboneSpec(
            name="test-tiny",
            timm_name="vit_small_patch16_dinov3",
            embed_dim=32,
            depth=4,
            default_image_size=32,
            timm_kwargs=(("patch_size", 8), ("embed_dim", 32), ("depth", 4), ("num_heads", 2)),
            description="random-init DINOv3-style ViT for tests (never pretrained)",
            **tiny,
        ),
        BackboneSpec(
            name="test-tiny-v2",
            timm_name="vit_small_patch14_reg4_dinov2",
            embed_dim=32,
            depth=4,
            default_image_size=32,
            timm_kwargs=(("patch_size", 8), ("embed_dim", 32), ("depth", 4), ("num_heads", 2)),
            description="random-init DINOv2-style ViT (absolute position embeddings) for tests",
            **tiny,
        ),
    ]
    return {s.name: s for s in specs}


REGISTRY: dict[str, BackboneSpec] = _build_registry()
_ALIASES: dict[str, str] = {alias: spec.name for spec in REGISTRY.values() for alias in spec.all_names()}
_HUB_PATTERN = re.compile(r"^dinov(?P<v>[23])_vit(?P<size>7b|s|b|l|g|h)(?P<patch>\d+)(?P<plus>plus)?(?P<reg>_reg\d*)?$")


def list_backbones() -> list[BackboneSpec]:
    """Every registered backbone, in display order (DINOv3, DINOv2, test models)."""
    return list(REGISTRY.values())


def _wrong_patch_message(name: str) -> str | None:
    """``dinov3_vitb14`` mixes DINOv3 with DINOv2's 14-px patches: name both real models instead."""
    m = _HUB_PATTERN.match(name)
    if not m:
        return None
    version, size, patch, plus, reg = m["v"], m["size"], int(m["patch"]), m["plus"] or "", m["reg"] or ""
    if (version == "3" and patch == 16) or (version == "2" and patch == 14):
        return None  # right patch size: the name is unknown for another reason
    v3, v2 = f"dinov3_vit{size}16{plus}", f"dinov2_vit{size}14{'_reg' if reg else ''}"

    def alternative(hub: str, family: str) -> str:
        if hub in _ALIASES:
            return f"{hub} (= {_ALIASES[hub]})"
        names = ", ".join(s.hub_name for s in REGISTRY.values() if s.family == family and s.hub_name)
        return f"one of {names}"

    return (
        f"backbone '{name}' does not exist: DINOv3 uses 16-px patches and 14-px patches are DINOv2. "
        f"Use {alternative(v3, 'dinov3')} for DINOv3 or {alternative(v2, 'dinov2')} for DINOv2 "
        "(see `raydefect models`)"
    )


def resolve_backbone(name: str) -> BackboneSpec:
    """A short name, torch-hub name or timm name -> its spec; unknown names raise `ModelError` with a suggestion."""
    key = str(name).strip()
    if key in _ALIASES:
        return REGISTRY[_ALIASES[key]]
    if key.lower() in _ALIASES:
        return REGISTRY[_ALIASES[key.lower()]]
    wrong = _wrong_patch_message(key.lower())
    if wrong:
        raise ModelError(wrong)
    close = difflib.get_close_matches(key.lower(), list(_ALIASES), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ModelError(
        f"unknown backbone '{name}'; {hint}run `raydefect models` to list them "
        f"({', '.join(s.name for s in REGISTRY.values())})"
    )


def check_image_size(spec: BackboneSpec, image_size: int, key: str = "data.image_size") -> None:
    """The ViT grid must tile the image exactly; say which nearby sizes work."""
    p = spec.patch_size
    if image_size % p:
        lower, upper = (image_size // p) * p, (image_size // p + 1) * p
        options = " or ".join(str(s) for s in (lower, upper) if s >= 16)
        raise ConfigError(f"{key}: {image_size} is not a multiple of {spec.name}'s patch size {p}; use {options}")


def timm_kwargs(spec: BackboneSpec, image_size: int, drop_path_rate: float = 0.0) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model``: no classifier, the run's image size, stochastic depth."""
    kwargs: dict[str, Any] = dict(spec.timm_kwargs)
    kwargs.update(num_classes=0, img_size=image_size, drop_path_rate=drop_path_rate)
    if spec.timm_name.endswith("dinov2"):
        # Absolute position embeddings are built (and resampled on load) for the fixed run size; inputs are always
        # resized to image_size, so the per-forward interpolation of dynamic_img_size is never needed.
        kwargs["dynamic_img_size"] = False
    return kwargs


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
    if weights:
        from raydefect.models.weights import load_weights_file

        model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        load_weights_file(model, weights, spec)
        return model
    if pretrained:
        from raydefect.models.weights import create_pretrained

        return create_pretrained(spec, kwargs)
    return timm.create_model(spec.timm_name, pretrained=False, **kwargs)


@contextlib.contextmanager
def fast_meta_init() -> Iterator[None]:
    """Build models on ``torch.device("meta")`` in milliseconds instead of ~0.5 s each.

    timm's truncated-normal init decomposes into slow reference ops on meta tensors, which hold no values anyway;
    it is skipped for them only, so anything building real models meanwhile is initialised as usual.
    """
    from timm.layers import weight_init

    original = weight_init._trunc_normal_

    def trunc_normal(tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return tensor if tensor.is_meta else original(tensor, *args, **kwargs)

    weight_init._trunc_normal_ = trunc_normal
    try:
        yield
    finally:
        weight_init._trunc_normal_ = original
