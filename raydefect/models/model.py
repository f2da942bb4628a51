"""The multi-task defect model: a timm ViT backbone, a light segmentation decoder and a mask-guided classifier.

Data flow for an input [N, 3, S, S] (normalised with the backbone's mean/std):

1. The backbone (`raydefect.models.backbones`) runs once; timm's ``forward_intermediates`` returns the
   final-normed tokens of ``model.feature_blocks`` evenly spaced blocks (the last included) as [N, D, S/p, S/p]
   maps, plus the prefix tokens (CLS, registers).
2. `SegDecoder` projects every level with a 1x1 conv and sums them (= concat + 1x1), refines with two conv blocks
   and predicts *coarse* logits on the patch grid. A shallow stride-4 stem on the image restores detail lost to the
   16-px patches (small scratches); the refined S/4 logits are coarse + a learned correction, upsampled to S.
3. `MaskGuidedClassifier` pools the last block's patch tokens with softmax weights from the coarse logits (the
   segmentation branch decides *where* the classifier looks), concatenates the CLS token and predicts
   ``1 + len(defect classes)`` logits, class 0 = "normal".

Everything trains end to end; GroupNorm keeps the heads independent of batch size (DDP, batch-1 inference).
The training code uses `freeze_backbone` / `unfreeze_last` / `unfreeze_all` and `param_groups` (layer-wise LR
decay, no weight decay on norms, biases, tokens and position embeddings).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydefect.config import ModelConfig
from raydefect.errors import ConfigError, ModelError
from raydefect.models.backbones import BackboneSpec, check_image_size, create_backbone, resolve_backbone

NORMAL = "normal"
MASK_PRIOR_LOGIT = -4.0  # defects cover a few percent of pixels: start near p=0.02 (RetinaNet-style prior)


class ModelOutput(NamedTuple):
    """What `DefectModel.forward` returns (a tuple, so DDP, torch.compile and ONNX export handle it)."""

    class_logits: Tensor  # [N, C], class 0 = normal
    mask_logits: Tensor  # [N, 1, H, W] at the input size
    coarse_logits: Tensor  # [N, 1, S/p, S/p] on the patch grid; steers the classifier


def feature_indices(depth: int, count: int) -> list[int]:
    """``count`` evenly spaced block indices ending at the last block: depth 12, count 4 -> [2, 5, 8, 11]."""
    if count > depth:
        raise ConfigError(f"model.feature_blocks: {count} is more than the backbone's {depth} blocks; use <= {depth}")
    return sorted({round(depth * (i + 1) / count) - 1 for i in range(count)})


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ConvBlock(nn.Sequential):
    """3x3 conv -> GroupNorm -> GELU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(_groups(cout), cout),
            nn.GELU(),
        )


class SegDecoder(nn.Module):
    """Fuses several ViT levels on the patch grid, adds image detail at S/4, returns (mask, coarse) logits."""

    def __init__(self, embed_dim: int, num_levels: int, dim: int) -> None:
        super().__init__()
        detail = max(16, dim // 4)
        self.proj = nn.ModuleList(nn.Conv2d(embed_dim, dim, 1) for _ in range(num_levels))
        self.fuse = nn.Sequential(ConvBlock(dim, dim), ConvBlock(dim, dim))
        self.coarse = nn.Conv2d(dim, 1, 1)
        self.stem = nn.Sequential(ConvBlock(3, detail, stride=2), ConvBlock(detail, detail, stride=2))
        self.refine = nn.Sequential(ConvBlock(dim + detail, detail), ConvBlock(detail, detail))
        self.out = nn.Conv2d(detail, 1, 1)
        nn.init.constant_(self.coarse.bias, MASK_PRIOR_LOGIT)
        nn.init.zeros_(self.out.weight)  # start as the upsampled coarse map; learn the correction
        nn.init.zeros_(self.out.bias)

    def forward(self, features: Sequence[Tensor], image: Tensor) -> tuple[Tensor, Tensor]:
        x = self.proj[0](features[0])
        for proj, feat in zip(self.proj[1:], features[1:], strict=True):
            x = x + proj(feat)
        x = self.fuse(x)
        coarse = self.coarse(x)
        detail = self.stem(image)
        size = detail.shape[-2:]
        up = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        fine = self.out(self.refine(torch.cat([up, detail], dim=1)))
        fine = fine + F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        mask = F.interpolate(fine, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return mask, coarse


class MaskGuidedClassifier(nn.Module):
    """CLS token + patch tokens pooled with attention weights from the segmentation branch's coarse logits."""

    def __init__(self, embed_dim: int, hidden: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.pool_scale = nn.Parameter(torch.zeros(()))  # log temperature of the pooling softmax
        self.norm = nn.LayerNorm(2 * embed_dim)
        self.fc1 = nn.Linear(2 * embed_dim, hidden)
        self.stats = nn.Linear(2, hidden)  # max and mean coarse logit: "how defective does the mask look"
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def pool(self, tokens: Tensor, coarse: Tensor) -> Tensor:
        """[N, L, D] tokens, [N, 1, h, w] logits (h*w = L) -> [N, D], weighted towards likely-defect patches."""
        weights = torch.softmax(coarse.flatten(1).float() * self.pool_scale.exp(), dim=1).to(tokens.dtype)
        return torch.einsum("nl,nld->nd", weights, tokens)

    def forward(self, cls_token: Tensor, tokens: Tensor, coarse: Tensor) -> Tensor:
        pooled = self.pool(tokens, coarse)
        flat = coarse.flatten(1)
        stats = torch.stack([flat.amax(dim=1), flat.mean(dim=1)], dim=1).to(cls_token.dtype)
        h = self.fc1(self.norm(torch.cat([cls_token, pooled], dim=1))) + self.stats(stats)
        return self.fc2(self.drop(self.act(h)))


def check_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(str(c) for c in class_names)
    if len(names) < 2 or names[0] != NORMAL:
        raise ModelError(
            f"class_names must start with '{NORMAL}' followed by at least one defect class, got {list(names)}"
        )
    if len(set(names)) != len(names) or not all(names):
        raise ModelError(f"class_names must be unique and non-empty, got {list(names)}")
    return names


class DefectModel(nn.Module):
    """Backbone + segmentation decoder + mask-guided classifier. Built from (ModelConfig, image_size, class_names).

    ``load_weights=False`` never touches pretrained weights (artifact loading, parameter counting on meta).
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        image_size: int,
        class_names: Sequence[str],
        *,
        load_weights: bool = True,
    ) -> None:
        super().__init__()
        self.model_cfg = model_cfg
        self.image_size = int(image_size)
        self.class_names = check_class_names(class_names)
        self.spec: BackboneSpec = resolve_backbone(model_cfg.backbone)
        check_image_size(self.spec, self.image_size)
        self.feature_indices = feature_indices(self.spec.depth, model_cfg.feature_blocks)
        self.backbone = create_backbone(
            self.spec,
            self.image_size,
            drop_path_rate=model_cfg.drop_path_rate,
            pretrained=model_cfg.pretrained and load_weights,
            weights=model_cfg.weights if load_weights else None,
        )
        dim = self.backbone.embed_dim
        self.num_prefix_tokens = int(self.backbone.num_prefix_tokens)
        self.decoder = SegDecoder(dim, len(self.feature_indices), model_cfg.decoder_dim)
        self.classifier = MaskGuidedClassifier(dim, model_cfg.head_hidden, len(self.class_names), model_cfg.dropout)

    # ----------------------------------------------------------------------------------------------- forward
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, x: Tensor) -> ModelOutput:
        final, levels = self.backbone.forward_intermediates(
            x, indices=self.feature_indices, return_prefix_tokens=True, norm=True, output_fmt="NCHW"
        )
        maps = [m for m, _prefix in levels]
        mask_logits, coarse = self.decoder(maps, x)
        cls_token = final[:, 0]
        patch_tokens = final[:, self.num_prefix_tokens :]
        class_logits = self.classifier(cls_token, patch_tokens, coarse)
        return ModelOutput(class_logits, mask_logits, coarse)

    # ------------------------------------------------------------------------------------- freezing stages
    def backbone_blocks(self) -> nn.ModuleList:
        return self.backbone.blocks

    @property
    def num_blocks(self) -> int:
        return len(self.backbone.blocks)

    def _layer(self, name: str) -> int:
        """Backbone parameter name -> depth position: -1 embeddings/tokens, i for block i, depth for the top norm."""
        if name.startswith("blocks."):
            return int(name.split(".")[1])
        if name.startswith(("norm.", "fc_norm.", "head.")):
            return self.num_blocks
        return -1

    def _backbone_trainable(self, name: str, last: int) -> bool:
        layer = self._layer(name)
        if layer == -1:
            return last >= self.num_blocks
        if layer == self.num_blocks:
            return last >= 1
        return layer >= self.num_blocks - last

    def freeze_backbone(self) -> None:
        """Stage 1: heads only."""
        self.unfreeze_last(0)

    def unfreeze_last(self, n: int) -> None:
        """Stage 2: the last ``n`` blocks (and the final norm) train; ``n >= num_blocks`` unfreezes everything."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(self._backbone_trainable(name, n))
        for p in self.head_parameters():
            p.requires_grad_(True)

    def unfreeze_all(self) -> None:
        """Stage 3: full fine-tune."""
        for p in self.parameters():
            p.requires_grad_(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone activations in backward (timm): less memory for large backbones, ~30% slower."""
        self.backbone.set_grad_checkpointing(enable)

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.decoder.parameters(), *self.classifier.parameters()]

    # ------------------------------------------------------------------------------------------ optimiser
    def param_groups(
        self,
        lr: float,
        head_lr: float,
        weight_decay: float,
        layer_decay: float,
        trainable_blocks: int | None = None,
    ) -> list[dict[str, Any]]:
        """AdamW parameter groups with layer-wise LR decay.

        The last block and the final norm get ``lr``; block i from the top gets ``lr * layer_decay**i``; patch
        embedding, tokens and position embeddings get ``lr * layer_decay**depth``. Heads get ``head_lr``. Norms,
        biases, layer scales, tokens and position embeddings get no weight decay. ``trainable_blocks=None``
        includes the parameters that currently require grad; an int selects heads + the last ``n`` blocks
        (``>= depth``: everything) regardless of ``requires_grad``. Each group carries ``name`` and ``lr_scale``.
        """
        depth = self.num_blocks
        no_decay_names = set(getattr(self.backbone, "no_weight_decay", lambda: set())())
        groups: dict[tuple[str, int, bool], dict[str, Any]] = {}

        def add(param: nn.Parameter, kind: str, layer: int, decay: bool, base_lr: float, scale: float) -> None:
            key = (kind, layer, decay)
            if key not in groups:
                label = "heads" if kind == "heads" else ("embed" if layer < 0 else f"block{min(layer, depth - 1)}")
                groups[key] = {
                    "params": [],
                    "lr": base_lr * scale,
                    "lr_scale": scale,
                    "weight_decay": weight_decay if decay else 0.0,
                    "name": f"{label}.{'decay' if decay else 'no_decay'}",
                }
            groups[key]["params"].append(param)

        for name, p in self.named_parameters():
            if not name.startswith("backbone."):
                if trainable_blocks is not None or p.requires_grad:
                    add(p, "heads", depth + 1, p.ndim > 1, head_lr, 1.0)
                continue
            bname = name[len("backbone.") :]
            if trainable_blocks is None:
                if not p.requires_grad:
                    continue
            elif not self._backbone_trainable(bname, trainable_blocks):
                continue
            layer = min(self._layer(bname), depth - 1)  # the top norm shares the last block's rate
            steps = depth if layer < 0 else depth - 1 - layer
            decay = p.ndim > 1 and bname not in no_decay_names
            add(p, "backbone", layer, decay, lr, layer_decay**steps)
        return sorted(groups.values(), key=lambda g: (not g["name"].startswith("heads"), -g["lr"], g["name"]))

    def count_parameters(self) -> dict[str, int]:
        """Parameter counts per part (works on the meta device)."""
        backbone = sum(p.numel() for p in self.backbone.parameters())
        classifier = sum(p.numel() for p in self.classifier.parameters())
        decoder = sum(p.numel() for p in self.decoder.parameters())
        return {
            "backbone": backbone,
            "classifier": classifier,
            "decoder": decoder,
            "total": backbone + classifier + decoder,
        }


def format_count(n: int) -> str:
    """12_345_678 -> '12.3M' (the way model sizes are quoted)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}" if n < 100 * scale else f"{n / scale:.0f}{unit}"
    return str(n)


def parameter_table(model_cfg: ModelConfig | None = None, num_classes: int = 2) -> list[dict[str, Any]]:
    """One row per registered backbone with exact parameter counts, built on the meta device (no download, no RAM).

    Head sizes follow ``model_cfg`` (decoder_dim, head_hidden, feature_blocks -- capped at the backbone's depth)
    and ``num_classes`` (normal + defect classes).
    """
    import dataclasses

    from raydefect.models.backbones import fast_meta_init, list_backbones

    base = model_cfg or ModelConfig()
    names = [NORMAL, *(f"defect{i}" for i in range(1, num_classes))]
    rows = []
    for spec in list_backbones():
        cfg = dataclasses.replace(
            base,
            backbone=spec.name,
            pretrained=False,
            weights=None,
            feature_blocks=min(base.feature_blocks, spec.depth),
        )
        with torch.device("meta"), fast_meta_init():
            model = DefectModel(cfg, spec.default_image_size, names, load_weights=False)
        counts = model.count_parameters()
        rows.append(
            {
                "backbone": spec.name,
                "hub name": spec.hub_name or "",
                "timm model": spec.timm_name,
                "patch": spec.patch_size,
                "dim": spec.embed_dim,
                "blocks": spec.depth,
                "image": spec.default_image_size,
                "backbone params": counts["backbone"],
                "cls head": counts["classifier"],
                "seg head": counts["decoder"],
                "total": counts["total"],
                "pretrained": "yes" if spec.has_pretrained else "no (random)",
            }
        )
    return rows
