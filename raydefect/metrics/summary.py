"""The flat per-epoch validation summary that training logs to metrics.csv and uses for early stopping."""

from __future__ import annotations

import math
import re

from raydefect.metrics.image import ImageMetricAccumulator, ImageMetrics
from raydefect.metrics.pixel import PixelMetricAccumulator, PixelMetrics
from raydefect.metrics.thresholds import PixelCriterion

#: The metric that early stopping and checkpoint ranking maximise by default.
SCORE_NAME = "score"


def class_key(name: str, taken: set[str] | None = None) -> str:
    """A stable column-safe key for a class name: lower case, runs of other characters as '_' ("MT Blowhole" ->
    "mt_blowhole"); a suffix keeps keys unique when two names collapse to the same key."""
    key = re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_") or "class"
    if taken is not None:
        base, i = key, 2
        while key in taken:
            key, i = f"{base}_{i}", i + 1
        taken.add(key)
    return key


def composite_score(ap: float, dice: float) -> float:
    """val_score in [0, 1]: the mean of image AP and defect-image Dice, each counted only when defined.

    AP (not AUROC) because defects are rare and AP reflects precision on them; Dice over defect images because it
    measures how well defects are outlined. A NaN part (e.g. no defect images in the split, or no pixel head) is
    left out; when both are NaN the score is 0.0, so that "max" comparisons keep working.
    """
    parts = [v for v in (ap, dice) if v is not None and math.isfinite(v)]
    return sum(parts) / len(parts) if parts else 0.0


def validation_summary(
    image: ImageMetricAccumulator | ImageMetrics,
    pixel: PixelMetricAccumulator | PixelMetrics | None = None,
    *,
    prefix: str = "val_",
    image_threshold: float | None = None,
    use_fixed_pixel_threshold: bool = False,
    pixel_criterion: PixelCriterion = "dice",
) -> dict[str, float]:
    """A flat dict of floats with stable names, for metrics.csv, Ray Train reports and early stopping.

    Keys (with prefix "val_"): accuracy, precision, recall, f1 (image decision at the image threshold), auroc, ap,
    class_accuracy (the normal/defect-class decision), acc_<class> per class (`class_key`), and with a pixel
    accumulator iou, dice (means over defect images), iou_all, dice_all (over all images), pixel_auroc, pixel_ap,
    aupro; then score (`composite_score`), image_threshold, pixel_threshold (NaN without pixels) and
    image_threshold_fallback / pixel_threshold_fallback (1.0 when the data could not choose a threshold).

    Thresholds: by default both are chosen on these data (F1 for images, `pixel_criterion` over bin edges for
    masks), which is what training stores in the artifact, and the metrics are reported there; that is
    optimistic for this split, so report a test split with the stored thresholds: `image_threshold=stored` and a
    pixel accumulator built with `threshold=stored` plus `use_fixed_pixel_threshold=True`.
    """
    im = image.compute(image_threshold) if isinstance(image, ImageMetricAccumulator) else image
    at = im.at_threshold
    out: dict[str, float] = {
        "accuracy": at.accuracy,
        "precision": at.precision,
        "recall": at.recall,
        "f1": at.f1,
        "auroc": im.auroc,
        "ap": im.ap,
        "class_accuracy": im.class_accuracy,
    }
    taken: set[str] = set()
    for name, acc in im.per_class_accuracy.items():
        out[f"acc_{class_key(name, taken)}"] = acc

    dice_for_score = math.nan
    pixel_threshold = math.nan
    pixel_fallback = 0.0
    if pixel is not None:
        px = pixel.compute(pixel_criterion) if isinstance(pixel, PixelMetricAccumulator) else pixel
        seg = px.at_threshold if use_fixed_pixel_threshold else px.at_best
        out.update(
            iou=seg.iou,
            dice=seg.dice,
            iou_all=seg.iou_all,
            dice_all=seg.dice_all,
            pixel_auroc=px.pixel_auroc,
            pixel_ap=px.pixel_ap,
            aupro=px.aupro,
        )
        dice_for_score = seg.dice
        pixel_threshold = seg.threshold
        pixel_fallback = 0.0 if use_fixed_pixel_threshold else float(px.best.fallback)
    out[SCORE_NAME] = composite_score(im.ap, dice_for_score)
    out["image_threshold"] = at.threshold
    out["pixel_threshold"] = pixel_threshold
    out["image_threshold_fallback"] = float(image_threshold is None and im.best.fallback)
    out["pixel_threshold_fallback"] = pixel_fallback
    return {f"{prefix}{k}": float(v) for k, v in out.items()}
