"""Per-pixel class metrics (``model.mask_classes``): a confusion matrix of pixel classes, streamed.

`PixelClassAccumulator.update(pred, truth)` takes class-id maps (0 = background, i = class i) of one batch and adds
them to a C x C confusion matrix (rows: truth, columns: prediction). `compute()` gives, per defect class,
IoU = TP / (TP + FP + FN) and Dice = 2 TP / (2 TP + FP + FN) over all pixels of all images, and their means over
the defect classes that occur in the truth or the prediction (a class nobody drew or predicted has no score).

The predicted class map is the one inference reports: background where the binary defect mask is below its
threshold, elsewhere the defect class with the largest logit (`class_map`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from raydefect.metrics.common import json_safe, nanmean, safe_div, to_numpy
from raydefect.metrics.summary import class_key


def class_map(mask_prob: Any, class_logits: Any, threshold: float) -> np.ndarray:
    """[N, H, W] defect probabilities and [N, C, H, W] class logits -> uint8 [N, H, W] class ids: 0 below the
    threshold, else the defect class (1..C-1) with the largest logit."""
    prob = to_numpy(mask_prob)
    logits = to_numpy(class_logits)
    best = 1 + np.argmax(logits[:, 1:], axis=1)
    return np.where(prob >= threshold, best, 0).astype(np.uint8)


class PixelClassAccumulator:
    """Confusion matrix of pixel classes over `class_names` (index 0 = background / normal)."""

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        n = len(self.class_names)
        self.confusion = np.zeros((n, n), dtype=np.int64)

    def update(self, pred: Any, truth: Any) -> None:
        """Class-id maps of one batch (any shape, equal for both)."""
        p = to_numpy(pred).astype(np.int64).ravel()
        t = to_numpy(truth).astype(np.int64).ravel()
        if p.shape != t.shape:
            raise ValueError(f"predicted class map {p.shape} and true class map {t.shape} differ in shape")
        n = len(self.class_names)
        if p.size and (max(int(p.max()), int(t.max())) >= n or min(int(p.min()), int(t.min())) < 0):
            raise ValueError(f"class ids must be in 0..{n - 1}")
        self.confusion += np.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def merge(self, other: PixelClassAccumulator) -> None:
        if other.class_names != self.class_names:
            raise ValueError("cannot merge pixel class metrics over different classes")
        self.confusion += other.confusion

    @property
    def pixels(self) -> int:
        return int(self.confusion.sum())

    def compute(self) -> dict[str, Any]:
        """{"iou": {class: x}, "dice": {...}, "mean_iou", "mean_dice", "confusion": {"classes", "matrix"}}."""
        iou: dict[str, float] = {}
        dice: dict[str, float] = {}
        for i, name in enumerate(self.class_names[1:], 1):
            tp = int(self.confusion[i, i])
            fp = int(self.confusion[:, i].sum()) - tp
            fn = int(self.confusion[i, :].sum()) - tp
            iou[name] = safe_div(tp, tp + fp + fn)
            dice[name] = safe_div(2 * tp, 2 * tp + fp + fn)
        return json_safe(
            {
                "iou": iou,
                "dice": dice,
                "mean_iou": nanmean(list(iou.values())),
                "mean_dice": nanmean(list(dice.values())),
                "pixels": self.pixels,
                "confusion": {"classes": self.class_names, "matrix": self.confusion.tolist()},
            }
        )


def pixel_class_summary(acc: PixelClassAccumulator | None, prefix: str = "val_") -> dict[str, float]:
    """Flat keys for metrics.csv: ``<prefix>class_mean_iou``, ``<prefix>class_mean_dice`` and per class
    ``<prefix>class_iou_<key>`` (`class_key`); nothing without per-pixel classes."""
    if acc is None:
        return {}
    result = acc.compute()
    out = {f"{prefix}class_mean_iou": result["mean_iou"], f"{prefix}class_mean_dice": result["mean_dice"]}
    taken: set[str] = set()
    for name, value in result["iou"].items():
        out[f"{prefix}class_iou_{class_key(name, taken)}"] = value
    return {k: (math.nan if v is None else float(v)) for k, v in out.items()}
