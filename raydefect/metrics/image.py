"""Image-level metrics: is this image a defect, and which defect?

Inputs are per-image defect scores (higher = more likely a defect, usually 1 - p(normal)), binary labels
(1 = defect) and optionally class probabilities over the class list, whose index 0 is "normal" (contract 1 of
docs/architecture.md: `defect_class` is "normal" for normal images). Everything is exact (sorting, no binning)
and NaN-tolerant: a metric the data cannot define is NaN with a note saying why, never an exception, so a
validation epoch on an unlucky split still finishes.

Conventions (the same as scikit-learn / torchmetrics unless said otherwise):
  * an image is called a defect when score >= threshold;
  * precision with nothing called a defect is 0 (zero_division=0); recall and F1 with no defect image are NaN;
  * AUROC is the trapezoid area under the ROC curve (= the Mann-Whitney probability that a defect image outscores
    a normal one, ties counting 1/2); AP is the step-wise sum over the PR curve, sum_n (R_n - R_{n-1}) P_n;
    both are NaN when only one class is present (`single_class` is set);
  * the predicted class of an image is what scoring writes: "normal" below the image threshold, else the most
    probable defect class (argmax over classes 1..C-1). The confusion matrix (rows = true, columns = predicted)
    and per-class accuracy (recall of each class, NaN for a class without images) follow that rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raydefect.metrics.common import json_safe, safe_div, to_numpy
from raydefect.metrics.thresholds import DEFAULT_FALLBACK_THRESHOLD, ThresholdChoice, choose_image_threshold


@dataclass(frozen=True)
class ImageCurves:
    """ROC and PR curve points for plotting (empty arrays when the curve is undefined: one class only).

    roc_*: from (0, 0) to (1, 1), thresholds decreasing (the first is +inf).
    pr_*: recall increasing from (recall 0, precision 1); thresholds aligned with points 1..n.
    """

    roc_fpr: np.ndarray
    roc_tpr: np.ndarray
    roc_thresholds: np.ndarray
    pr_recall: np.ndarray
    pr_precision: np.ndarray
    pr_thresholds: np.ndarray

    @property
    def defined(self) -> bool:
        return self.roc_fpr.size > 0


@dataclass(frozen=True)
class OperatingPoint:
    """Counts and rates at one threshold."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    precision: float
    recall: float
    f1: float

    def to_dict(self) -> dict[str, Any]:
        return json_safe(self.__dict__)


@dataclass(frozen=True)
class ImageMetrics:
    """All image-level results for one split. `to_dict()` gives the JSON-ready form (NaN as null, no curves)."""

    n_images: int
    n_defect: int
    n_normal: int
    at_threshold: OperatingPoint  # at the threshold asked for (or the best one when none was given)
    at_best: OperatingPoint  # at `best.value` (F1-optimal on these data, or the fallback)
    best: ThresholdChoice
    auroc: float
    ap: float
    single_class: bool
    class_names: tuple[str, ...]
    confusion: np.ndarray  # (C, C) int64, rows true class, columns predicted class
    per_class_accuracy: dict[str, float]
    class_accuracy: float  # trace(confusion) / N: the class decision is right (normal counts as a class)
    curves: ImageCurves
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "n_images": self.n_images,
                "n_defect": self.n_defect,
                "n_normal": self.n_normal,
                "threshold": self.at_threshold.threshold,
                "at_threshold": self.at_threshold.to_dict(),
                "best_threshold": self.best.to_dict(),
                "at_best": self.at_best.to_dict(),
                "auroc": self.auroc,
                "ap": self.ap,
                "single_class": self.single_class,
                "class_names": list(self.class_names),
                "confusion": self.confusion,
                "per_class_accuracy": self.per_class_accuracy,
                "class_accuracy": self.class_accuracy,
                "notes": list(self.notes),
            }
        )


def _binary_inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = to_numpy(scores, np.float64).ravel()
    raw = to_numpy(labels).ravel()
    if s.shape != raw.shape:
        raise ValueError(f"scores ({s.size}) and labels ({raw.size}) differ in length")
    if raw.size and not np.isin(raw, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (defect)")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} defect scores are NaN/inf (did the model diverge?)")
    return s, raw.astype(bool)


def _clf_curve(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds (decreasing) with the true/false positive counts at score >= threshold."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y)[last_of_run]
    fps = last_of_run + 1 - tps
    return s[last_of_run], tps.astype(np.int64), fps.astype(np.int64)


def image_curves(scores: Any, labels: Any) -> ImageCurves:
    """ROC and PR curves (exact, every distinct score a threshold)."""
    s, y = _binary_inputs(scores, labels)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        empty = np.zeros(0)
        return ImageCurves(empty, empty, empty, empty, empty, empty)
    thr, tps, fps = _clf_curve(s, y)
    recall = tps / n_pos
    precision = tps / (tps + fps)
    return ImageCurves(
        roc_fpr=np.r_[0.0, fps / n_neg],
        roc_tpr=np.r_[0.0, recall],
        roc_thresholds=np.r_[np.inf, thr],
        pr_recall=np.r_[0.0, recall],
        pr_precision=np.r_[1.0, precision],
        pr_thresholds=thr,
    )


def auroc_ap(curves: ImageCurves) -> tuple[float, float]:
    """(AUROC, AP) from curves; (NaN, NaN) when the curves are undefined."""
    if not curves.defined:
        return math.nan, math.nan
    auroc = float(np.trapezoid(curves.roc_tpr, curves.roc_fpr))
    ap = float(np.sum(np.diff(curves.pr_recall) * curves.pr_precision[1:]))
    return auroc, ap


def operating_point(scores: Any, labels: Any, threshold: float) -> OperatingPoint:
    """Confusion counts and accuracy / precision / recall / F1 at `threshold` (score >= threshold is a defect)."""
    s, y = _binary_inputs(scores, labels)
    pred = s >= threshold
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    tn = int(y.size - tp - fp - fn)
    n_pos = tp + fn
    return OperatingPoint(
        threshold=float(threshold),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        accuracy=safe_div(tp + tn, y.size),
        precision=safe_div(tp, tp + fp, empty=0.0 if n_pos else math.nan),
        recall=safe_div(tp, n_pos),
        f1=safe_div(2 * tp, 2 * tp + fp + fn) if n_pos else math.nan,
    )


def _class_inputs(
    y: np.ndarray, class_probs: Any, class_ids: Any, class_names: Any
) -> tuple[np.ndarray | None, np.ndarray, tuple[str, ...]]:
    """Validated (probs or None, true class ids, names)."""
    if (class_probs is None) != (class_ids is None):
        raise ValueError("give class_probs and class_ids together (or neither, for normal/defect only)")
    if class_probs is None:
        names = tuple(class_names) if class_names is not None else ("normal", "defect")
        if len(names) != 2:
            raise ValueError(f"without class_probs there are 2 classes (normal, defect), got names {names}")
        return None, y.astype(np.int64), names
    probs = to_numpy(class_probs, np.float64)
    ids = to_numpy(class_ids).ravel().astype(np.int64)
    if probs.ndim != 2 or probs.shape[0] != y.size or ids.size != y.size:
        raise ValueError(f"class_probs must be (N, C) and class_ids (N,) with N = {y.size}; got {probs.shape}")
    n_classes = probs.shape[1]
    if n_classes < 2:
        raise ValueError("class_probs needs at least 2 columns: normal + one defect class")
    names = tuple(class_names) if class_names is not None else ("normal", *(f"class{i}" for i in range(1, n_classes)))
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names for {n_classes} class_probs columns")
    if ids.size and (ids.min() < 0 or ids.max() >= n_classes):
        raise ValueError(f"class_ids must lie in [0, {n_classes - 1}] (0 = normal)")
    disagree = int(((ids != 0) != y).sum())
    if disagree:
        raise ValueError(f"{disagree} images have label and class id disagreeing (class 0 must be the normal class)")
    return probs, ids, names


def image_metrics(
    scores: Any,
    labels: Any,
    threshold: float | None = None,
    *,
    class_probs: Any = None,
    class_ids: Any = None,
    class_names: Any = None,
    fallback_threshold: float = DEFAULT_FALLBACK_THRESHOLD,
) -> ImageMetrics:
    """Every image-level metric for one split.

    threshold: the decision threshold to report at (e.g. the one stored in the model); None uses the F1-best
    threshold of these data (`choose_image_threshold`, with its fallback when one class is absent). The best
    threshold and the metrics there are always reported too (`best`, `at_best`).
    """
    s, y = _binary_inputs(scores, labels)
    probs, true_cls, names = _class_inputs(y, class_probs, class_ids, class_names)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    notes: list[str] = []
    single_class = n_pos == 0 or n_neg == 0
    if y.size == 0:
        notes.append("no images: every metric is NaN")
    elif single_class:
        which = "normal" if n_pos == 0 else "defect"
        notes.append(f"only {which} images in the data: AUROC and AP are undefined (NaN)")

    best = choose_image_threshold(s, y, fallback=fallback_threshold)
    if best.fallback and y.size:
        notes.append(best.reason)
    used = best.value if threshold is None else float(threshold)
    curves = image_curves(s, y)
    auroc, ap = auroc_ap(curves)

    n_classes = len(names)
    called = s >= used
    if probs is None:
        pred_cls = called.astype(np.int64)
    else:
        pred_cls = np.where(called, 1 + np.argmax(probs[:, 1:], axis=1), 0)
    confusion = np.bincount(true_cls * n_classes + pred_cls, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )
    support = confusion.sum(axis=1)
    per_class = {name: safe_div(confusion[i, i], support[i]) for i, name in enumerate(names)}
    absent = [name for i, name in enumerate(names) if support[i] == 0]
    if absent and y.size:
        notes.append(f"no images of class {', '.join(absent)}: its accuracy is NaN")
    return ImageMetrics(
        n_images=int(y.size),
        n_defect=n_pos,
        n_normal=n_neg,
        at_threshold=operating_point(s, y, used),
        at_best=operating_point(s, y, best.value),
        best=best,
        auroc=auroc,
        ap=ap,
        single_class=bool(single_class and y.size),
        class_names=names,
        confusion=confusion,
        per_class_accuracy=per_class,
        class_accuracy=safe_div(np.trace(confusion), y.size),
        curves=curves,
        notes=tuple(notes),
    )


class ImageMetricAccumulator:
    """Collects per-image results batch by batch (validation loop, Ray Data batches) and computes at the end.

    Image-level metrics need every score (AUROC is a ranking), but that is one float per image (plus C class
    probabilities): a million images cost ~8 MB + 4 MB per class. `merge` combines accumulators from data-parallel
    workers (order does not matter).
    """

    def __init__(self, class_names: Any = None) -> None:
        self.class_names = tuple(class_names) if class_names is not None else None
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []
        self._ids: list[np.ndarray] = []
        self._with_classes: bool | None = None

    def __len__(self) -> int:
        return int(sum(a.size for a in self._scores))

    def reset(self) -> None:
        self.__init__(self.class_names)  # type: ignore[misc]

    def update(self, scores: Any, labels: Any, class_probs: Any = None, class_ids: Any = None) -> None:
        """Add one batch. Class information must be given for every batch or for none."""
        s, y = _binary_inputs(scores, labels)
        with_classes = class_probs is not None or class_ids is not None
        if self._with_classes is not None and with_classes != self._with_classes:
            raise ValueError("give class_probs/class_ids for every batch or for none")
        self._with_classes = with_classes
        if with_classes:
            probs, ids, _ = _class_inputs(y, class_probs, class_ids, None)
            if self.class_names is not None and probs is not None and probs.shape[1] != len(self.class_names):
                raise ValueError(f"class_probs has {probs.shape[1]} columns for {len(self.class_names)} class names")
            self._probs.append(np.asarray(probs, np.float32))
            self._ids.append(ids)
        self._scores.append(s)
        self._labels.append(y)

    def merge(self, other: ImageMetricAccumulator) -> None:
        """Add everything `other` collected (e.g. from another data-parallel worker)."""
        if None not in (other._with_classes, self._with_classes) and other._with_classes != self._with_classes:
            raise ValueError("cannot merge an accumulator with class information into one without")
        if self._with_classes is None:
            self._with_classes = other._with_classes
        self._scores += other._scores
        self._labels += other._labels
        self._probs += other._probs
        self._ids += other._ids

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything collected, concatenated: scores, labels, and class_probs/class_ids when given."""
        out = {
            "scores": np.concatenate(self._scores) if self._scores else np.zeros(0),
            "labels": np.concatenate(self._labels) if self._labels else np.zeros(0, bool),
        }
        if self._with_classes:
            out["class_probs"] = np.concatenate(self._probs)
            out["class_ids"] = np.concatenate(self._ids)
        return out

    def compute(
        self, threshold: float | None = None, fallback_threshold: float = DEFAULT_FALLBACK_THRESHOLD
    ) -> ImageMetrics:
        """`image_metrics` over everything collected (threshold None: the F1-best one of these data)."""
        a = self.arrays()
        return image_metrics(
            a["scores"],
            a["labels"],
            threshold,
            class_probs=a.get("class_probs"),
            class_ids=a.get("class_ids"),
            class_names=self.class_names,
            fallback_threshold=fallback_threshold,
        )
