"""What an evaluation measured (`Evaluation`): `summarize` turns the merged metric accumulators and the per-image
rows into the metrics dict of ``metrics.json``, with the per-class table; `select_galleries` picks the worst
mistakes to show; `write_per_image_csv` writes the rows."""

from __future__ import annotations

import csv
import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raydefect import __version__
from raydefect.console import count
from raydefect.metrics import ImageMetricAccumulator, PixelMetricAccumulator, validation_summary
from raydefect.metrics.common import json_safe, nanmean, safe_div
from raydefect.viz.report import GALLERIES

if TYPE_CHECKING:
    from raydefect.metrics import ImageMetrics, PixelMetrics
    from raydefect.models.artifact import ArtifactMeta


def per_class_table(image: ImageMetrics, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per class from the confusion matrix (rows true, columns predicted) and the per-image rows."""
    m = np.asarray(image.confusion, np.int64)
    table = []
    scored = [r for r in rows if r.get("error") is None]
    for i, name in enumerate(image.class_names):
        support, predicted, correct = int(m[i].sum()), int(m[:, i].sum()), int(m[i, i])
        precision = safe_div(correct, predicted)
        recall = safe_div(correct, support)
        mine = [r for r in scored if r["defect_class"] == name]
        table.append(
            {
                "class": name,
                "images": support,
                "predicted": predicted,
                "correct": correct,
                "precision": precision,
                "recall": recall,
                "f1": safe_div(2 * precision * recall, precision + recall) if support and predicted else math.nan,
                "mean_defect_score": nanmean([r["defect_score"] for r in mine]),
                "mean_iou": nanmean([r["iou"] for r in mine]),
                "mean_dice": nanmean([r["dice"] for r in mine]),
            }
        )
    return table


@dataclass
class Evaluation:
    """Everything an evaluation found; `metrics` is what metrics.json holds."""

    metrics: dict[str, Any]
    image: ImageMetrics
    pixel: PixelMetrics
    rows: list[dict[str, Any]]
    galleries: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def summarize(
    meta: ArtifactMeta,
    rows: Sequence[dict[str, Any]],
    image_acc: ImageMetricAccumulator,
    pixel_acc: PixelMetricAccumulator,
    *,
    model_path: str = "",
    data_path: str = "",
    split: str = "",
    engine: str = "local",
    seconds: float = 0.0,
    dataset_classes: Sequence[str] = (),
) -> Evaluation:
    """Compute every metric at the stored thresholds; `Evaluation.metrics` is JSON-ready (NaN -> null)."""
    image = image_acc.compute(meta.image_threshold)
    pixel = pixel_acc.compute("dice")
    headline = validation_summary(
        image, pixel, prefix="", image_threshold=meta.image_threshold, use_fixed_pixel_threshold=True
    )
    errors = [{"image": r["image"], "error": r["error"]} for r in rows if r.get("error")]
    scored = [r for r in rows if not r.get("error")]
    unknown = [c for c in dataset_classes if c not in meta.class_names]
    no_mask = sum(1 for r in scored if r["label"] == 1 and r["mask"] is None)
    notes = list(image.notes) + list(pixel.notes)
    if unknown:
        notes.append(
            f"dataset classes unknown to the model: {', '.join(unknown)}; the model cannot predict them, so their "
            "images count as wrong-class predictions"
        )
    if no_mask:
        notes.append(f"{no_mask} defect images have no mask: left out of the pixel metrics")
    if errors:
        notes.append(f"{count(len(errors), 'image')} could not be read and are left out of every metric (see 'errors')")
    metrics = {
        "raydefect_version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "engine": engine,
        "seconds": round(seconds, 3),
        "model": {
            "path": model_path,
            "model_id": meta.model_id,
            "backbone": meta.backbone,
            "image_size": meta.image_size,
            "class_names": list(meta.class_names),
            "thresholds": {"image": meta.image_threshold, "pixel": meta.pixel_threshold},
        },
        "data": {
            "path": data_path,
            "split": split,
            "images": len(rows),
            "evaluated": len(scored),
            "errors": len(errors),
            "defect_images_without_mask": no_mask,
            "class_names": list(dataset_classes),
        },
        "headline": headline,
        "image": image.to_dict(),
        "pixel": pixel.to_dict(),
        "per_class": per_class_table(image, rows),
        "thresholds": threshold_story(meta, scored, model_path),
        "notes": notes,
        "errors": errors,
    }
    evaluation = Evaluation(json_safe(metrics), image, pixel, list(rows))
    evaluation.galleries = select_galleries(rows)
    return evaluation


def select_galleries(rows: Sequence[dict[str, Any]], size: int = 8) -> dict[str, list[dict[str, Any]]]:
    """The worst mistakes per gallery (see `GALLERIES`), at most `size` each; ties broken by manifest order."""
    scored = [r for r in rows if not r.get("error")]
    fn = sorted((r for r in scored if r["label"] == 1 and not r["is_defect"]), key=lambda r: r["defect_score"])
    fp = sorted((r for r in scored if r["label"] == 0 and r["is_defect"]), key=lambda r: -r["defect_score"])
    wrong = sorted(
        (r for r in scored if r["label"] == 1 and r["is_defect"] and r["predicted_class"] != r["defect_class"]),
        key=lambda r: -max(r["class_probs"][1:]),
    )
    masks = sorted(
        (
            r
            for r in scored
            if r["label"] == 1
            and r["is_defect"]
            and r["predicted_class"] == r["defect_class"]
            and r["iou"] < 1.0  # a perfect mask is nobody's worst; NaN (no mask) fails this too
        ),
        key=lambda r: (r["iou"], -r["defect_score"]),
    )
    chosen = {"false_negatives": fn, "false_positives": fp, "wrong_class": wrong, "worst_iou": masks}
    return {key: chosen[key][:size] for key, _, _ in GALLERIES}


def _fmt(value: Any, digits: int = 6) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def write_per_image_csv(path: Path, rows: Sequence[dict[str, Any]], class_names: Sequence[str]) -> None:
    from raydefect.tasks.predict import class_columns

    columns = [
        "image",
        "mask",
        "label",
        "defect_class",
        "defect_score",
        "is_defect",
        "predicted_class",
        "iou",
        "dice",
        "true_area_px",
        "pred_area_px",
        "error",
    ]
    prob_columns = class_columns(class_names)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow([*columns, *prob_columns])
        for r in rows:
            probs = r.get("class_probs") or [None] * len(prob_columns)
            values = [r.get(c) for c in columns]
            values[columns.index("is_defect")] = "" if r.get("error") else int(r["is_defect"])
            writer.writerow([_fmt(v) for v in values] + [_fmt(p) for p in probs])


def card_note(called: str, mask: np.ndarray, truth: np.ndarray, iou: float) -> str | None:
    """The line under a gallery card's label. The IoU only where a mask was drawn or one was there to find: an image
    called defective with nothing above the pixel threshold says exactly that (the IoU of two empty masks is 1 by
    convention, and "IoU 1.000" beside an empty picture read as a perfect mask)."""
    scored = "" if math.isnan(iou) or not truth.any() else f"IoU {iou:.3f}"
    if not mask.any() and called != "normal":
        return f"called {called}, mask empty: no pixel above the pixel threshold" + (f" ({scored})" if scored else "")
    return scored or None if (mask.any() or truth.any()) else None


#: How training chose each threshold, for a model that predates ``extra.thresholds_chosen`` in its model.yaml.
DEFAULT_CHOICE = {
    "image": "the defect-score cut with the best F1 on the validation split (chosen by the training run)",
    "pixel": "the pixel-probability cut with the best mean Dice on the validation split (chosen by the training run)",
}


def threshold_story(meta: ArtifactMeta, scored: Sequence[dict[str, Any]], model_path: str = "") -> dict[str, Any]:
    """How each stored threshold was chosen, and the image thresholds for the target recalls (`TARGET_RECALLS`) on
    the evaluated images and, when the model stores them, on its validation images (what `raydefect thresholds
    --image-recall` uses)."""
    from raydefect.metrics.thresholds import thresholds_at_recall
    from raydefect.models.retarget import read_validation_scores

    chosen = {**DEFAULT_CHOICE, **dict(meta.extra.get("thresholds_chosen") or {})}
    scores = [r["defect_score"] for r in scored]
    labels = [r["label"] == 1 for r in scored]
    validation = read_validation_scores(model_path) if model_path else None
    return {
        "image": meta.image_threshold,
        "pixel": meta.pixel_threshold,
        "how": {"image": chosen["image"], "pixel": chosen["pixel"]},
        "derived_from": meta.extra.get("derived_from"),
        "at_recall": thresholds_at_recall(scores, labels),
        "validation_at_recall": None if validation is None else thresholds_at_recall(*validation),
    }
