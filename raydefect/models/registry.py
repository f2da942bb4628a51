"""Backbone registry: short names -> timm models (timm-style: a frozen spec per name; `factory` builds them).

Users write ``model.backbone: dinov3-b`` (or the torch-hub name ``dinov3_vitb16``, or timm's own name, or a timm
CNN such as ``resnet18``); this module resolves it to a `BackboneSpec`. The registry is plain data and imports
neither torch nor timm (it is a leaf: configs validate a name and ``raydefect models`` lists sizes instantly).

Two kinds of backbone:

- ``vit``: DINOv3 / DINOv2 ViTs; the decoder fuses several evenly spaced blocks on the patch grid.
- ``cnn``: timm CNN families (ResNet, ResNet-D/T, ConvNeXt, EfficientNet) built with ``features_only``; the
  decoder is an FPN over their stride 4, 8, 16 and 32 maps. They learn from a user's labels alone (random init),
  which ViTs do not on ~1,000 images.

Tiny random backbones (``tiny``, ``test-tiny``, ``test-tiny-v2``) are real timm models with small kwargs, so tests
and the demo run the same code path (prefix tokens, RoPE or absolute position embeddings, forward_intermediates)
as DINOv3 / DINOv2. They never have pretrained weights.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from raydefect.errors import ConfigError, ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone. Shapes are recorded here so listing needs no model; a test checks them against timm."""

    name: str  # short name users type: "dinov3-b"
    timm_name: str  # timm model function: "vit_base_patch16_dinov3"
    family: str  # "dinov3", "dinov2", "resnet", "convnext", "efficientnet" or "test"
    patch_size: int  # ViT: the patch; CNN: the total stride (32): image sides must be multiples of it
    embed_dim: int  # ViT: token width; CNN: channels of the stride-32 map
    depth: int  # ViT: transformer blocks; CNN: stages (the feature levels the decoder reads)
    default_image_size: int  # the resolution the weights were made for (timm's pretrained cfg)
    params: int = 0  # backbone parameters at default_image_size (no classifier); a test checks them against timm
    kind: str = "vit"  # "vit" or "cnn"
    feature_channels: tuple[int, ...] = ()  # CNN: channels at strides 4, 8, 16, 32
    out_indices: tuple[int, ...] = ()  # CNN: timm feature indices of those strides
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
_PARAMS_V3 = {"s": 21586944, "s+": 28683264, "b": 85641216, "l": 303079424, "h+": 840509440, "7b": 6716030976}
_PARAMS_V2 = {"s": 22056192, "b": 86579712, "l": 304367616, "g": 1136479232}
_PARAMS_V2_REG = {"s": 22057344, "b": 86582016, "l": 304370688, "g": 1136483840}

# timm CNNs: name -> (pretrained tag, default image size, backbone params, channels at strides 4-32, out_indices,
# mean, std). Tags are timm's ImageNet weights; sizes and normalisation are those tags' pretrained cfgs.
_R5 = (1, 2, 3, 4)  # ResNet / EfficientNet: feature 0 is the stride-2 stem
_C4 = (0, 1, 2, 3)  # ConvNeXt: four stages, stride 4 first
_CNNS: dict[str, tuple[str, int, int, tuple[int, ...], tuple[int, ...], tuple[float, ...], tuple[float, ...]]] = {
    "resnet10t": ("c3_in1k", 176, 4922488, (64, 128, 256, 512), _R5, IMAGENET_MEAN, IMAGENET_STD),
    "resnet14t": ("c3_in1k", 176, 8032632, (256, 512, 1024, 2048), _R5, IMAGENET_MEAN, IMAGENET_STD),
    "resnet18": ("a1_in1k", 224, 11176512, (64, 128, 256, 512), _R5, IMAGENET_MEAN, IMAGENET_STD),
    "resnet18d": ("ra2_in1k", 224, 11195744, (64, 128, 256, 512), _R5, IMAGENET_MEAN, IMAGENET_STD),
    "resnet26d": ("bt_in1k", 224, 13965408, (256, 512, 1024, 2048), _R5, IMAGENET_MEAN, IMAGENET_STD),
    "resnet34": ("a1_in1k", 224, 21284672, (64, 128, 256, 512), _R5, IMAGENET_MEAN, IMAGENET_STD),
    "resnet34d": ("ra2_in1k", 224, 21303904, (64, 128, 256, 512), _R5, IMAGENET_MEAN, IMAGENET_STD),
    "resnet50": ("a1_in1k", 224, 23508032, (256, 512, 1024, 2048), _R5, IMAGENET_MEAN, IMAGENET_STD),
    "resnet50d": ("a1_in1k", 224, 23527264, (256, 512, 1024, 2048), _R5, IMAGENET_MEAN, IMAGENET_STD),
    "convnext_atto": ("d2_in1k", 224, 3373880, (40, 80, 160, 320), _C4, IMAGENET_MEAN, IMAGENET_STD),
    "convnext_femto": ("d1_in1k", 224, 4832016, (48, 96, 192, 384), _C4, IMAGENET_MEAN, IMAGENET_STD),
    "convnext_pico": ("d1_in1k", 224, 8531648, (64, 128, 256, 512), _C4, IMAGENET_MEAN, IMAGENET_STD),
    "convnext_nano": ("d1h_in1k", 224, 14951280, (80, 160, 320, 640), _C4, IMAGENET_MEAN, IMAGENET_STD),
    "convnext_tiny": ("fb_in1k", 224, 27818592, (96, 192, 384, 768), _C4, IMAGENET_MEAN, IMAGENET_STD),
    "convnext_small": ("fb_in1k", 224, 49453152, (96, 192, 384, 768), _C4, IMAGENET_MEAN, IMAGENET_STD),
    "convnext_base": ("fb_in1k", 224, 87564416, (128, 256, 512, 1024), _C4, IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_b0": ("ra_in1k", 224, 3595388, (24, 40, 112, 320), _R5, IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_b1": ("ft_in1k", 224, 6101024, (24, 40, 112, 320), _R5, IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_b2": ("ra_in1k", 256, 7202562, (24, 48, 120, 352), _R5, IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_b3": ("ra2_in1k", 288, 10103336, (32, 48, 136, 384), _R5, IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_b4": ("ra2_in1k", 320, 16742216, (32, 56, 160, 448), _R5, IMAGENET_MEAN, IMAGENET_STD),
}
_CNN_FAMILIES = {
    "resnet": "ResNet (He et al. 2015; -d / -t: deep stem, avg-pool downsampling), timm ImageNet weights",
    "convnext": "ConvNeXt (Liu et al. 2022), timm ImageNet weights",
    "efficientnet": "EfficientNet (Tan & Le 2019), timm ImageNet weights",
}


def _dinov3_specs() -> list[BackboneSpec]:
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
                params=_PARAMS_V3[size],
                description=_DINOV3,
            )
        )
    return specs


def _dinov2_specs() -> list[BackboneSpec]:
    """Each size without and with registers."""
    specs: list[BackboneSpec] = []
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
                    params=(_PARAMS_V2_REG if reg else _PARAMS_V2)[size],
                    description=_DINOV2 + (", 4 registers" if reg else ""),
                )
            )
    return specs


def _cnn_specs() -> list[BackboneSpec]:
    specs: list[BackboneSpec] = []
    for timm_name, (tag, size, params, channels, indices, mean, std) in _CNNS.items():
        family = "resnet" if timm_name.startswith("resnet") else timm_name.split("_")[0]
        specs.append(
            BackboneSpec(
                name=timm_name.replace("_", "-"),
                timm_name=timm_name,
                family=family,
                patch_size=32,
                embed_dim=channels[-1],
                depth=len(channels),
                default_image_size=size,
                pretrained_tag=tag,
                params=params,
                kind="cnn",
                feature_channels=channels,
                out_indices=indices,
                mean=mean,
                std=std,
                description=_CNN_FAMILIES[family],
            )
        )
    return specs


def _test_specs() -> list[BackboneSpec]:
    """Tiny random-init backbones for demos and tests: no download, a few layers, 32-64 px."""
    tiny = dict(patch_size=8, family="test", pretrained_tag=None)
    return [
        BackboneSpec(
            name="tiny",
            timm_name="vit_small_patch16_dinov3",
            embed_dim=96,
            depth=4,
            default_image_size=64,
            timm_kwargs=(("patch_size", 8), ("embed_dim", 96), ("depth", 4), ("num_heads", 3)),
            params=466176,
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
            params=57088,
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
            params=57984,
            description="random-init DINOv2-style ViT (absolute position embeddings) for tests",
            **tiny,
        ),
        BackboneSpec(
            name="test-tiny-cnn",
            timm_name="resnet10t",
            family="test",
            patch_size=32,
            embed_dim=64,
            depth=4,
            default_image_size=64,
            timm_kwargs=(("channels", (8, 16, 32, 64)), ("stem_width", 8)),
            params=79646,
            kind="cnn",
            feature_channels=(8, 16, 32, 64),
            out_indices=_R5,
            description="random-init ResNet-10t-style CNN for tests (never pretrained)",
        ),
    ]


def _build_registry() -> dict[str, BackboneSpec]:
    specs = [*_dinov3_specs(), *_dinov2_specs(), *_cnn_specs(), *_test_specs()]
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
    """The ViT grid (or a CNN's stride-32 grid) must tile the image exactly; say which nearby sizes work."""
    p = spec.patch_size
    if image_size % p:
        lower, upper = (image_size // p) * p, (image_size // p + 1) * p
        options = " or ".join(str(s) for s in (lower, upper) if s >= 16)
        unit = "total stride" if spec.kind == "cnn" else "patch size"
        raise ConfigError(f"{key}: {image_size} is not a multiple of {spec.name}'s {unit} {p}; use {options}")


def timm_kwargs(spec: BackboneSpec, image_size: int, drop_path_rate: float = 0.0) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model``: no classifier, stochastic depth; ViTs get the run's image size,
    CNNs ``features_only`` maps at strides 4, 8, 16 and 32."""
    kwargs: dict[str, Any] = dict(spec.timm_kwargs)
    kwargs["drop_path_rate"] = drop_path_rate
    if spec.kind == "cnn":
        kwargs.update(features_only=True, out_indices=spec.out_indices)
        return kwargs
    kwargs.update(num_classes=0, img_size=image_size)
    if spec.timm_name.endswith("dinov2"):
        # Absolute position embeddings are built (and resampled on load) for the fixed run size; inputs are always
        # resized to image_size, so the per-forward interpolation of dynamic_img_size is never needed.
        kwargs["dynamic_img_size"] = False
    return kwargs
