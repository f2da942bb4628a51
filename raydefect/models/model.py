"""The multi-task defect model: a timm backbone, a light segmentation decoder and a mask-guided classifier.

Data flow for a ViT backbone and an input [N, 3, S, S] (normalised with the backbone's mean/std):

1. The backbone (`raydefect.models.registry`) runs once; timm's ``forward_intermediates`` returns the
   final-normed tokens of ``model.feature_blocks`` evenly spaced blocks (the last included) as [N, D, S/p, S/p]
   maps, plus the prefix tokens (CLS, registers).
2. `SegDecoder` projects every level with a 1x1 conv and sums them (= concat + 1x1), refines with two conv blocks
   and predicts *coarse* logits on the patch grid. A shallow stride-4 stem on the image restores detail lost to the
   16-px patches (small scratches); the refined S/4 logits are coarse + a learned correction, upsampled to S.
3. `MaskGuidedClassifier` pools the last block's patch tokens with softmax weights from the coarse logits (the
   segmentation branch decides *where* the classifier looks), concatenates the CLS token and predicts
   ``1 + len(defect classes)`` logits, class 0 = "normal".

A CNN backbone (timm ``features_only``) gives maps at strides 4, 8, 16 and 32 instead: `FPNDecoder` merges them
top-down (each merge refined by a conv block), predicts logits at stride 4 and refines them with a stride-2 stem on
the image, so 2-3 px wide defects survive. The classifier pools the stride-32 map with weights from those logits
max-pooled to its grid, beside the map's global average (a CNN's stand-in for the CLS token).

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
from raydefect.errors import ModelError
from raydefect.geometry import Geometry
from raydefect.models.factory import create_backbone
from raydefect.models.registry import BackboneSpec, check_image_size, resolve_backbone
from raydefect.models.sizes import feature_indices

NORMAL = "normal"
MASK_PRIOR_LOGIT = -4.0  # defects cover a few percent of pixels: start near p=0.02 (RetinaNet-style prior)


class ModelOutput(NamedTuple):
    """What `DefectModel.forward` returns (a tuple, so DDP, torch.compile and ONNX export handle it)."""

    class_logits: Tensor  # [N, C], class 0 = normal
    mask_logits: Tensor  # [N, 1, H, W] at the input size
    coarse_logits: Tensor  # [N, 1, S/p, S/p] on the patch grid (CNN: the stride-32 grid); steers the classifier
    pixel_class_logits: Tensor | None = None  # model.mask_classes: [N, C, H, W], channel 0 = background


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


class _DetailRefiner(nn.Module):
    """The shared last step of both decoders: decoder features + a shallow stem on the image -> a correction of the
    upsampled coarse logits (``stem``, ``refine``, ``out`` are set by the subclass), at the input size."""

    stem: nn.Module
    refine: nn.Module
    out: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.class_out: nn.Module | None = None  # model.mask_classes: per-class logits from the refined features

    def add_class_head(self, num_classes: int) -> None:
        """One logit per class (0 = background) per pixel, beside the binary mask logit (``model.mask_classes``)."""
        out = self.out
        if not isinstance(out, nn.Conv2d):  # pragma: no cover - both decoders end in a 1x1 conv
            raise ModelError("the decoder's output layer is not a convolution")
        self.class_out = nn.Conv2d(out.in_channels, num_classes, 1)

    def refined(self, x: Tensor, coarse: Tensor, image: Tensor) -> tuple[Tensor, Tensor | None]:
        """(mask logits, per-class logits or None without a class head), at the input size."""
        detail = self.stem(image)
        size = detail.shape[-2:]
        up = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        features = self.refine(torch.cat([up, detail], dim=1))
        fine = self.out(features)
        fine = fine + F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        mask = F.interpolate(fine, size=image.shape[-2:], mode="bilinear", align_corners=False)
        if self.class_out is None:
            return mask, None
        classes = F.interpolate(self.class_out(features), size=image.shape[-2:], mode="bilinear", align_corners=False)
        return mask, classes


class SegDecoder(_DetailRefiner):
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

    def forward(self, features: Sequence[Tensor], image: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        x = self.proj[0](features[0])
        for proj, feat in zip(self.proj[1:], features[1:], strict=True):
            x = x + proj(feat)
        x = self.fuse(x)
        coarse = self.coarse(x)
        mask, classes = self.refined(x, coarse, image)
        return mask, coarse, classes


class FPNDecoder(_DetailRefiner):
    """Top-down FPN over a CNN's stride 4-32 maps, logits at stride 4 refined at stride 2 with image detail."""

    def __init__(self, channels: Sequence[int], dim: int) -> None:
        super().__init__()
        detail = max(16, dim // 4)
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in channels)
        self.smooth = nn.ModuleList(ConvBlock(dim, dim) for _ in channels[:-1])
        self.coarse = nn.Conv2d(dim, 1, 1)
        self.stem = ConvBlock(3, detail, stride=2)
        self.refine = nn.Sequential(ConvBlock(dim + detail, detail), ConvBlock(detail, detail))
        self.out = nn.Conv2d(detail, 1, 1)
        nn.init.constant_(self.coarse.bias, MASK_PRIOR_LOGIT)
        nn.init.zeros_(self.out.weight)  # start as the upsampled stride-4 map; learn the correction
        nn.init.zeros_(self.out.bias)

    def forward(self, features: Sequence[Tensor], image: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        x = self.lateral[-1](features[-1])
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral[i](features[i])
            x = lateral + F.interpolate(x, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            x = self.smooth[i](x)
        coarse = self.coarse(x)  # stride 4
        mask, classes = self.refined(x, coarse, image)
        return mask, coarse, classes


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
        # The classifier reads the segmentation branch's belief but does not train it (Bozic et al. 2021, "gradient
        # flow adjustment"): the classification loss pushing the mask's max / mean up on every defect image teaches
        # the decoder to light up whole images instead of the defect.
        coarse = coarse.detach()
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
    ``geometry`` (`raydefect.geometry`) is how images become its inputs; it travels into the artifact.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        image_size: int,
        class_names: Sequence[str],
        *,
        load_weights: bool = True,
        geometry: Geometry | None = None,
    ) -> None:
        super().__init__()
        self.model_cfg = model_cfg
        self.image_size = int(image_size)
        self.geometry = geometry or Geometry("square", self.image_size)
        if self.geometry.image_size != self.image_size:
            raise ModelError(f"geometry {self.geometry} does not match the model's input size {self.image_size}")
        self.class_names = check_class_names(class_names)
        self.spec: BackboneSpec = resolve_backbone(model_cfg.backbone)
        check_image_size(self.spec, self.image_size)
        self.is_cnn = self.spec.kind == "cnn"
        cnn_levels = list(range(self.spec.depth))
        self.feature_indices = cnn_levels if self.is_cnn else feature_indices(self.spec.depth, model_cfg.feature_blocks)
        self.backbone = create_backbone(
            self.spec,
            self.image_size,
            drop_path_rate=model_cfg.drop_path_rate,
            pretrained=model_cfg.pretrained and load_weights,
            weights=model_cfg.weights if load_weights else None,
        )
        if self.is_cnn:
            dim = self.spec.feature_channels[-1]
            self.num_prefix_tokens = 0
            self._levels = cnn_parameter_levels(self.backbone)
            self.decoder: nn.Module = FPNDecoder(self.spec.feature_channels, model_cfg.decoder_dim)
        else:
            dim = self.backbone.embed_dim
            self.num_prefix_tokens = int(self.backbone.num_prefix_tokens)
            self.decoder = SegDecoder(dim, len(self.feature_indices), model_cfg.decoder_dim)
        self.classifier = MaskGuidedClassifier(dim, model_cfg.head_hidden, len(self.class_names), model_cfg.dropout)
        if model_cfg.mask_classes:  # built last: the other heads' random init stays as without it
            self.decoder.add_class_head(len(self.class_names))

    # ----------------------------------------------------------------------------------------------- forward
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, x: Tensor) -> ModelOutput:
        if self.is_cnn:
            return self._forward_cnn(x)
        final, levels = self.backbone.forward_intermediates(
            x, indices=self.feature_indices, return_prefix_tokens=True, norm=True, output_fmt="NCHW"
        )
        maps = [m for m, _prefix in levels]
        mask_logits, coarse, pixel_classes = self.decoder(maps, x)
        cls_token = final[:, 0]
        patch_tokens = final[:, self.num_prefix_tokens :]
        class_logits = self.classifier(cls_token, patch_tokens, coarse)
        return ModelOutput(class_logits, mask_logits, coarse, pixel_classes)

    def _forward_cnn(self, x: Tensor) -> ModelOutput:
        maps = self.backbone(x)
        mask_logits, fine_coarse, pixel_classes = self.decoder(maps, x)
        top = maps[-1]
        coarse = F.adaptive_max_pool2d(fine_coarse, top.shape[-2:])  # "is there a defect in this cell" on the grid
        tokens = top.flatten(2).transpose(1, 2)
        class_logits = self.classifier(top.mean(dim=(2, 3)), tokens, coarse)
        return ModelOutput(class_logits, mask_logits, coarse, pixel_classes)

    # ------------------------------------------------------------------------------------- freezing stages
    def backbone_blocks(self) -> nn.ModuleList:
        """A ViT's transformer blocks (CNNs have stages, see `num_blocks`)."""
        if self.is_cnn:
            raise ModelError(f"{self.spec.name} is a CNN: it has stages, not transformer blocks")
        return self.backbone.blocks

    @property
    def num_blocks(self) -> int:
        """Transformer blocks (ViT) or feature stages (CNN): the units of the freezing stages and layer decay."""
        return self.spec.depth if self.is_cnn else len(self.backbone.blocks)

    def _layer(self, name: str) -> int:
        """Backbone parameter name -> depth position: -1 embeddings/tokens/stem, i for block (or stage) i, depth for
        the top norm."""
        if self.is_cnn:
            return self._levels[name]
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
        """Recompute backbone activations in backward (timm): less memory for large backbones, but slower."""
        setter = getattr(self.backbone, "set_grad_checkpointing", None)
        if setter is None:
            raise ModelError(
                f"{self.spec.name} has no gradient checkpointing in timm; set train.grad_checkpointing=false"
            )
        setter(enable)

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


def cnn_parameter_levels(backbone: nn.Module) -> dict[str, int]:
    """A timm ``features_only`` CNN's parameter names -> the feature level they feed: -1 for the stem, i for the
    modules up to and including level i's (in parameter order, which follows the forward order in timm's CNNs)."""
    names = [n for n, _ in backbone.named_parameters()]
    modules = backbone.feature_info.module_name()
    last: list[int] = []
    first = len(names)
    for module in modules:
        prefixes = (module + ".", module.replace(".", "_") + ".")
        hits = [i for i, n in enumerate(names) if n.startswith(prefixes)]
        if not hits:
            raise ModelError(f"cannot map {type(backbone).__name__}'s feature module '{module}' to its parameters")
        first = min(first, hits[0])
        last.append(hits[-1])
    levels = {}
    for i, n in enumerate(names):
        levels[n] = -1 if i < first else next((lv for lv, end in enumerate(last) if i <= end), len(last) - 1)
    return levels
