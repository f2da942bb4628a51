"""The multi-task loss: weighted cross-entropy on classes + BCE and soft Dice on masks.

Normal images have empty masks. Dice is computed over the whole batch (sums over every valid pixel of every
image) with additive smoothing, so it stays finite and meaningful on all-empty batches (it then pushes the
predicted mask towards zero). Images whose mask is unknown (a defect image labelled without a mask) are left out of
the pixel terms via ``mask_valid``; a batch without any valid mask contributes a zero pixel loss that still keeps
the decoder in the autograd graph (DDP requires every parameter to receive a gradient).

With per-pixel classes (``model.mask_classes``) the total also holds a pixel cross-entropy over the class channels
(weighted like BCE) and a Dice per defect class, averaged (weighted like Dice), on the same valid images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydefect.config import OptimConfig


class LossOutput(NamedTuple):
    total: Tensor  # what backward() is called on
    cls: Tensor  # unweighted parts, for logging
    bce: Tensor
    dice: Tensor

    def as_floats(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "loss_cls": float(self.cls.detach()),
            "loss_bce": float(self.bce.detach()),
            "loss_dice": float(self.dice.detach()),
        }


def balanced_class_weights(counts: Sequence[int]) -> Tensor:
    """Inverse-frequency weights ``N / (K * n_c)`` over the K classes present; absent classes get 1."""
    c = torch.as_tensor(list(counts), dtype=torch.float32)
    present = c > 0
    if not bool(present.any()):
        return torch.ones_like(c)
    weights = torch.ones_like(c)
    weights[present] = c[present].sum() / (int(present.sum()) * c[present])
    return weights


def soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """``1 - (2 |P∩T| + s) / (|P| + |T| + s)`` over the whole batch; finite when every mask is empty."""
    p = torch.sigmoid(logits.float()).flatten()
    t = target.float().flatten()
    inter = (p * t).sum()
    return 1.0 - (2.0 * inter + smooth) / (p.sum() + t.sum() + smooth)


def pixel_class_losses(logits: Tensor, target: Tensor, smooth: float = 1.0) -> tuple[Tensor, Tensor]:
    """(cross-entropy, mean soft Dice loss over the defect classes 1..C-1) of [N, C, H, W] logits against [N, H, W]
    class ids; Dice sums over the whole batch per class, so absent classes stay finite."""
    logits = logits.float()
    target = target.long()
    ce = F.cross_entropy(logits, target)
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    dice = 1.0 - (2.0 * inter + smooth) / (probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3)) + smooth)
    return ce, dice.mean()


class DefectLoss(nn.Module):
    """``cls_weight * CE + bce_weight * BCE + dice_weight * Dice``; returns the total and the parts."""

    def __init__(
        self,
        cls_weight: float = 1.0,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        class_weights: Tensor | Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        dice_smooth: float = 1.0,
    ) -> None:
        super().__init__()
        self.cls_weight = cls_weight
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.label_smoothing = label_smoothing
        self.dice_smooth = dice_smooth
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    @classmethod
    def from_config(cls, optim: OptimConfig, class_counts: Sequence[int] | None = None) -> DefectLoss:
        """``optim.class_weights='balanced'`` needs the training split's per-class counts (class 0 = normal)."""
        weights = None
        if optim.class_weights == "balanced":
            if class_counts is None:
                raise ValueError("optim.class_weights='balanced' needs class_counts")
            weights = balanced_class_weights(class_counts)
        return cls(
            cls_weight=optim.cls_weight,
            bce_weight=optim.bce_weight,
            dice_weight=optim.dice_weight,
            class_weights=weights,
            label_smoothing=optim.label_smoothing,
        )

    def forward(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        labels: Tensor,
        masks: Tensor,
        mask_valid: Tensor | None = None,
        pixel_class_logits: Tensor | None = None,
        pixel_classes: Tensor | None = None,
    ) -> LossOutput:
        """class_logits [N, C]; mask_logits [N, 1, H, W]; labels [N] class indices; masks [N, (1,) H, W] in {0,1};
        with per-pixel classes also pixel_class_logits [N, C, H, W] and pixel_classes [N, H, W] class ids."""
        if masks.ndim == 3:
            masks = masks.unsqueeze(1)
        if masks.shape != mask_logits.shape:
            raise ValueError(f"masks {tuple(masks.shape)} must match mask_logits {tuple(mask_logits.shape)}")
        cls = F.cross_entropy(
            class_logits.float(), labels.long(), weight=self.class_weights, label_smoothing=self.label_smoothing
        )
        logits = mask_logits.float()
        target = masks.to(logits.dtype)
        if mask_valid is not None:
            valid = mask_valid.to(torch.bool).to(logits.device)
            logits, target = logits[valid], target[valid]
        if logits.numel() == 0:
            zero = mask_logits.sum() * 0.0  # keeps the decoder in the graph
            bce = dice = zero
        else:
            bce = F.binary_cross_entropy_with_logits(logits, target)
            dice = soft_dice_loss(logits, target, self.dice_smooth)
        total = self.cls_weight * cls + self.bce_weight * bce + self.dice_weight * dice
        if pixel_class_logits is not None and pixel_classes is not None:
            total = total + self._pixel_class_terms(pixel_class_logits, pixel_classes, mask_valid)
        return LossOutput(total, cls, bce, dice)

    def _pixel_class_terms(self, logits: Tensor, target: Tensor, mask_valid: Tensor | None) -> Tensor:
        if mask_valid is not None:
            valid = mask_valid.to(torch.bool).to(logits.device)
            if not bool(valid.any()):
                return logits.sum() * 0.0  # keeps the class head in the graph
            logits, target = logits[valid], target[valid]
        ce, dice = pixel_class_losses(logits, target, self.dice_smooth)
        return self.bce_weight * ce + self.dice_weight * dice
