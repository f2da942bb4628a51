"""Pixel-level (segmentation) metrics, streamed: memory stays O(num_bins) however many pixels pass through.

`PixelMetricAccumulator.update(prob_masks, true_masks)` takes one batch of predicted defect probabilities and true
masks; each image may have its own resolution (prediction and truth of one image must match). It keeps

  * exact per-image IoU and Dice at a fixed `threshold` (two floats per image, for histograms and galleries);
  * histograms of the probabilities over `num_bins` equal bins of [0, 1] for defect pixels, normal pixels and the
    defect regions, plus per-image IoU/Dice summed at every bin edge. From these, `compute()` derives pixel AUROC,
    pixel AP, AUPRO, mean IoU/Dice at any edge and the best pixel threshold, all exact at the bin edges
    (thresholds k / num_bins): the only approximation is that thresholds between edges are not considered.

Definitions:
  * IoU = |P & T| / |P | T|, Dice = 2 |P & T| / (|P| + |T|) per image, P = (prob >= threshold). When prediction
    AND truth are empty, both are 1.0 (nothing to find, nothing claimed); when exactly one is empty, 0.0. Means
    are reported over defect images (non-empty truth: how well defects are outlined) and over all images (normal
    images count: a false mask on a good part scores 0) separately.
  * Pixel AUROC / AP pool every pixel of every image (as MVTec AD and anomalib report them).
  * AUPRO follows the MVTec AD reference evaluation (Bergmann et al., IJCV 2021, "The MVTec Anomaly Detection
    Dataset", `compute_pro` + `trapezoid` in its evaluation code) and anomalib's `AUPRO` metric
    (src/anomalib/metrics/aupro.py): the truth masks are split into connected components (8-connectivity, as
    MVTec's `structure = np.ones((3, 3))`; anomalib labels with OpenCV's default 8-connectivity); at each
    threshold the PRO is the mean over ALL regions of all images of the fraction of the region's pixels predicted
    positive (each region weighs the same, however large), and the FPR is the fraction of all normal pixels
    (truth 0, in every image, normal images included) predicted positive. The curve runs from (0, 0) to (1, 1);
    its area up to FPR = `fpr_limit` (0.3) by the trapezoid rule, with PRO interpolated linearly at the limit,
    divided by `fpr_limit`, is the AUPRO in [0, 1]. anomalib resamples each region's ROC onto a common grid
    before averaging; MVTec sums exact per-region overlaps per threshold, which is what the binned histogram
    does here (sum over regions of each region's histogram / its size).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from raydefect.metrics.common import json_safe, safe_div, to_numpy, trapezoid_to
from raydefect.metrics.thresholds import (
    DEFAULT_FALLBACK_THRESHOLD,
    PIXEL_CRITERIA,
    PixelCriterion,
    ThresholdChoice,
    first_max_run,
)

_RANGE_TOLERANCE = 1e-6  # probabilities a hair outside [0, 1] from float rounding are clipped, not rejected
_EDGE_EPS = 1e-9  # k / num_bins computed in float lands in bin k, not k - 1


def mask_iou_dice(pred: Any, truth: Any) -> tuple[float, float]:
    """(IoU, Dice) of two boolean masks of one image; both 1.0 when both masks are empty, 0.0 when one is."""
    p = to_numpy(pred).astype(bool)
    t = to_numpy(truth).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"predicted mask {p.shape} and true mask {t.shape} differ in shape")
    inter = int((p & t).sum())
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0, 1.0
    return inter / (total - inter), 2 * inter / total


@dataclass(frozen=True)
class SegmentationPoint:
    """Mask quality at one threshold: per-image means (defect images / all images) and pooled-pixel rates."""

    threshold: float
    iou: float  # mean over defect images (NaN without any)
    dice: float
    iou_all: float  # mean over all images
    dice_all: float
    precision: float  # pooled over all pixels
    recall: float
    f1: float

    def to_dict(self) -> dict[str, Any]:
        return json_safe(self.__dict__)


@dataclass(frozen=True)
class PixelCurves:
    """Binned curve points for plotting, ordered by decreasing threshold (increasing FPR / recall)."""

    thresholds: np.ndarray  # the bin edge of each point (after the leading +inf point)
    roc_fpr: np.ndarray
    roc_tpr: np.ndarray
    pr_recall: np.ndarray
    pr_precision: np.ndarray
    pro_fpr: np.ndarray
    pro: np.ndarray


@dataclass(frozen=True)
class PixelMetrics:
    """All pixel-level results for one split. `to_dict()` gives the JSON-ready form (no curves, no per-image)."""

    n_images: int
    n_defect_images: int
    n_regions: int
    n_defect_pixels: int
    n_normal_pixels: int
    at_threshold: SegmentationPoint  # exact, at the accumulator's fixed threshold
    at_best: SegmentationPoint  # at `best.value` (a bin edge; exact there)
    best: ThresholdChoice
    pixel_auroc: float
    pixel_ap: float
    aupro: float
    fpr_limit: float
    num_bins: int
    per_image_iou: np.ndarray  # at `at_threshold.threshold`, in update order (empty if keep_per_image=False)
    per_image_dice: np.ndarray
    per_image_has_defect: np.ndarray
    curves: PixelCurves
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "n_images": self.n_images,
                "n_defect_images": self.n_defect_images,
                "n_regions": self.n_regions,
                "n_defect_pixels": self.n_defect_pixels,
                "n_normal_pixels": self.n_normal_pixels,
                "threshold": self.at_threshold.threshold,
                "at_threshold": self.at_threshold.to_dict(),
                "best_threshold": self.best.to_dict(),
                "at_best": self.at_best.to_dict(),
                "pixel_auroc": self.pixel_auroc,
                "pixel_ap": self.pixel_ap,
                "aupro": self.aupro,
                "fpr_limit": self.fpr_limit,
                "num_bins": self.num_bins,
                "notes": list(self.notes),
            }
        )


def _as_2d_list(masks: Any, what: str) -> list[Any]:
    """A batch as a list of per-image arrays: (B, H, W), (B, 1, H, W), or a sequence of (H, W) / (1, H, W)."""
    if isinstance(masks, (list, tuple)):
        return list(masks)
    arr = to_numpy(masks)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(
            f"{what} must be a batch (B, H, W) or (B, 1, H, W), or a list of (H, W) arrays; got {arr.shape}"
        )
    return list(arr)


def _truth(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean truth mask: None = empty (a normal image); floats are cut at 0.5, integers (0/1, 0/255) at > 0."""
    if mask is None:
        return np.zeros(shape, dtype=bool)
    t = to_numpy(mask)
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dtype == bool:
        return t
    return t >= 0.5 if np.issubdtype(t.dtype, np.floating) else t > 0


def _revcumsum(h: np.ndarray) -> np.ndarray:
    """out[k] = sum(h[k:]): the count at or above bin edge k."""
    return np.cumsum(h[::-1])[::-1]


class PixelMetricAccumulator:
    """Streaming pixel metrics with bounded memory (see the module docstring for every definition).

    threshold: the fixed threshold for exact per-image IoU/Dice (the stored pixel threshold when evaluating a
        model, 0.5 during training); `compute()` also reports the best bin-edge threshold.
    num_bins: probability bins over [0, 1]; thresholds considered are k / num_bins, k = 0..num_bins.
    fpr_limit: AUPRO integration limit (0.3 as in MVTec AD / anomalib).
    keep_per_image: keep the per-image IoU/Dice lists (2 floats per image); off for huge unlabelled-size runs.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        num_bins: int = 1000,
        fpr_limit: float = 0.3,
        connectivity: int = 8,
        keep_per_image: bool = True,
    ) -> None:
        if not 10 <= num_bins <= 100_000:
            raise ValueError(f"num_bins must be in [10, 100000], got {num_bins}")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        if connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.num_bins = int(num_bins)
        self.fpr_limit = float(fpr_limit)
        self.connectivity = connectivity
        self.keep_per_image = keep_per_image
        self._structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
        n = self.num_bins + 1  # bin num_bins holds probability exactly 1.0, so "p >= 1.0" is exact too
        self.hist_pos = np.zeros(n, np.int64)
        self.hist_neg = np.zeros(n, np.int64)
        self.region_hist = np.zeros(n, np.float64)  # sum over regions of (region's histogram / region size)
        self.n_regions = 0
        self.n_images = 0
        self.n_defect_images = 0
        self._binned = {key: np.zeros(n, np.float64) for key in ("iou_all", "dice_all", "iou_defect", "dice_defect")}
        self._exact = dict.fromkeys(("iou_all", "dice_all", "iou_defect", "dice_defect"), 0.0)
        self._exact_px = {"tp": 0, "fp": 0, "fn": 0}
        self._iou: list[float] = []
        self._dice: list[float] = []
        self._has_defect: list[bool] = []

    @property
    def thresholds(self) -> np.ndarray:
        """The bin edges k / num_bins, k = 0..num_bins: the thresholds the binned metrics are exact at."""
        return np.arange(self.num_bins + 1, dtype=np.float64) / self.num_bins

    @property
    def n_defect_pixels(self) -> int:
        return int(self.hist_pos.sum())

    @property
    def n_normal_pixels(self) -> int:
        return int(self.hist_neg.sum())

    def _pairs(self, prob_masks: Any, true_masks: Any) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        probs = _as_2d_list(prob_masks, "prob_masks")
        truths: Sequence[Any] = [None] * len(probs) if true_masks is None else _as_2d_list(true_masks, "true_masks")
        if len(truths) != len(probs):
            raise ValueError(f"{len(probs)} predicted masks but {len(truths)} true masks in the batch")
        for i, (p_raw, t_raw) in enumerate(zip(probs, truths, strict=True)):
            p = to_numpy(p_raw, np.float64)
            if p.ndim == 3 and p.shape[0] == 1:
                p = p[0]
            if p.ndim != 2:
                raise ValueError(f"image {i} of the batch: a mask must be 2-D (H, W), got {p.shape}")
            t = _truth(t_raw, p.shape)
            if t.shape != p.shape:
                raise ValueError(
                    f"image {i} of the batch: predicted mask {p.shape} and true mask {t.shape} differ; resize the "
                    "prediction to the mask's resolution first"
                )
            if p.size:
                lo, hi = float(p.min()), float(p.max())
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    raise ValueError(f"image {i} of the batch: mask probabilities contain NaN/inf")
                if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
                    raise ValueError(
                        f"image {i} of the batch: mask probabilities span [{lo:.4g}, {hi:.4g}], not [0, 1]; apply "
                        "sigmoid to the mask logits first"
                    )
            yield i, p, t

    def update(self, prob_masks: Any, true_masks: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Add one batch; returns this batch's per-image (IoU, Dice) at `threshold`.

        prob_masks: (B, H, W) / (B, 1, H, W) array or tensor of defect probabilities, or a list of (H, W) arrays of
            different sizes. true_masks: the same layout, booleans / 0-1 / 0-255; None (or a None entry) means an
            empty mask (a normal image).
        """
        ious: list[float] = []
        dices: list[float] = []
        nb = self.num_bins
        for _, p, t in self._pairs(prob_masks, true_masks):
            idx = np.floor(p * nb + _EDGE_EPS).astype(np.int64)
            np.clip(idx, 0, nb, out=idx)
            pos_idx = idx[t]
            h_pos = np.bincount(pos_idx, minlength=nb + 1)
            h_neg = np.bincount(idx[~t], minlength=nb + 1)
            self.hist_pos += h_pos
            self.hist_neg += h_neg
            n_true = int(pos_idx.size)
            has_defect = n_true > 0
            if has_defect:
                labels, n_regions = ndimage.label(t, structure=self._structure)
                sizes = np.bincount(labels.ravel())
                self.region_hist += np.bincount(pos_idx, weights=1.0 / sizes[labels[t]], minlength=nb + 1)
                self.n_regions += int(n_regions)
                self.n_defect_images += 1
            self.n_images += 1

            # IoU / Dice of this image at every bin edge (tp + fn = n_true).
            tp_k = _revcumsum(h_pos).astype(np.float64)
            fp_k = _revcumsum(h_neg).astype(np.float64)
            den_dice = tp_k + fp_k + n_true
            den_iou = fp_k + n_true
            dice_k = np.divide(2 * tp_k, den_dice, out=np.ones_like(tp_k), where=den_dice > 0)
            iou_k = np.divide(tp_k, den_iou, out=np.ones_like(tp_k), where=den_iou > 0)
            self._binned["dice_all"] += dice_k
            self._binned["iou_all"] += iou_k
            if has_defect:
                self._binned["dice_defect"] += dice_k
                self._binned["iou_defect"] += iou_k

            # Exact at the fixed threshold.
            pred = p >= self.threshold
            iou, dice = mask_iou_dice(pred, t)
            tp = int((pred & t).sum())
            self._exact_px["tp"] += tp
            self._exact_px["fp"] += int(pred.sum()) - tp
            self._exact_px["fn"] += n_true - tp
            self._exact["iou_all"] += iou
            self._exact["dice_all"] += dice
            if has_defect:
                self._exact["iou_defect"] += iou
                self._exact["dice_defect"] += dice
            if self.keep_per_image:
                self._iou.append(iou)
                self._dice.append(dice)
                self._has_defect.append(has_defect)
            ious.append(iou)
            dices.append(dice)
        return np.asarray(ious, np.float64), np.asarray(dices, np.float64)

    def merge(self, other: PixelMetricAccumulator) -> None:
        """Add everything `other` collected (another data-parallel worker); settings must match."""
        mine = (self.threshold, self.num_bins, self.fpr_limit, self.connectivity, self.keep_per_image)
        theirs = (other.threshold, other.num_bins, other.fpr_limit, other.connectivity, other.keep_per_image)
        if mine != theirs:
            raise ValueError(f"cannot merge pixel accumulators with different settings: {mine} vs {theirs}")
        self.hist_pos += other.hist_pos
        self.hist_neg += other.hist_neg
        self.region_hist += other.region_hist
        self.n_regions += other.n_regions
        self.n_images += other.n_images
        self.n_defect_images += other.n_defect_images
        for key in self._binned:
            self._binned[key] += other._binned[key]
            self._exact[key] += other._exact[key]
        for key in self._exact_px:
            self._exact_px[key] += other._exact_px[key]
        self._iou += other._iou
        self._dice += other._dice
        self._has_defect += other._has_defect

    def binned_mean(self, kind: str, over: str) -> np.ndarray:
        """Mean per-image `kind` ("iou" | "dice") over `over` ("all" | "defect") images, at every bin edge."""
        count = self.n_images if over == "all" else self.n_defect_images
        sums = self._binned[f"{kind}_{over}"]
        return sums / count if count else np.full_like(sums, math.nan)

    def binned_pixel_f1(self) -> np.ndarray:
        """Pooled-pixel F1 at every bin edge (NaN without defect pixels)."""
        n_pos = self.n_defect_pixels
        if n_pos == 0:
            return np.full(self.num_bins + 1, math.nan)
        tp = _revcumsum(self.hist_pos)
        fp = _revcumsum(self.hist_neg)
        return 2 * tp / (tp + fp + n_pos)

    def _binned_point(self, k: int) -> SegmentationPoint:
        tp = int(_revcumsum(self.hist_pos)[k])
        fp = int(_revcumsum(self.hist_neg)[k])
        return self._point(float(self.thresholds[k]), {key: self._binned[key][k] for key in self._binned}, tp, fp)

    def _point(self, threshold: float, sums: dict[str, float], tp: int, fp: int) -> SegmentationPoint:
        n_pos = self.n_defect_pixels
        fn = n_pos - tp
        return SegmentationPoint(
            threshold=threshold,
            iou=safe_div(sums["iou_defect"], self.n_defect_images),
            dice=safe_div(sums["dice_defect"], self.n_defect_images),
            iou_all=safe_div(sums["iou_all"], self.n_images),
            dice_all=safe_div(sums["dice_all"], self.n_images),
            precision=safe_div(tp, tp + fp, empty=0.0 if n_pos else math.nan),
            recall=safe_div(tp, n_pos),
            f1=safe_div(2 * tp, 2 * tp + fp + fn) if n_pos else math.nan,
        )

    def curves(self) -> PixelCurves:
        """ROC, PR and PRO curve points over the bin edges (NaN-filled parts where a class is missing)."""
        cum_pos = _revcumsum(self.hist_pos)[::-1].astype(np.float64)  # decreasing threshold
        cum_neg = _revcumsum(self.hist_neg)[::-1].astype(np.float64)
        cum_reg = _revcumsum(self.region_hist)[::-1]
        n_pos, n_neg = cum_pos[-1], cum_neg[-1]
        tpr = cum_pos / n_pos if n_pos else np.full_like(cum_pos, math.nan)
        fpr = cum_neg / n_neg if n_neg else np.full_like(cum_neg, math.nan)
        called = cum_pos + cum_neg
        precision = np.divide(cum_pos, called, out=np.ones_like(cum_pos), where=called > 0)
        pro = cum_reg / self.n_regions if self.n_regions else np.full_like(cum_reg, math.nan)
        return PixelCurves(
            thresholds=self.thresholds[::-1].copy(),
            roc_fpr=np.r_[0.0, fpr],
            roc_tpr=np.r_[0.0, tpr],
            pr_recall=np.r_[0.0, tpr],
            pr_precision=np.r_[1.0, precision],
            pro_fpr=np.r_[0.0, fpr],
            pro=np.r_[0.0, np.minimum(pro, 1.0)],  # float sums of 1/size may overshoot 1 by an ulp
        )

    def compute(
        self, criterion: PixelCriterion = "dice", fallback_threshold: float = DEFAULT_FALLBACK_THRESHOLD
    ) -> PixelMetrics:
        """Every pixel metric over everything collected; the best threshold by `criterion` (choose_pixel_threshold)."""
        notes: list[str] = []
        n_pos, n_neg = self.n_defect_pixels, self.n_normal_pixels
        curves = self.curves()
        if n_pos and n_neg:
            pixel_auroc = float(np.trapezoid(curves.roc_tpr, curves.roc_fpr))
            pixel_ap = float(np.sum(np.diff(curves.pr_recall) * curves.pr_precision[1:]))
            aupro = trapezoid_to(curves.pro_fpr, curves.pro, self.fpr_limit) / self.fpr_limit
        else:
            pixel_auroc = pixel_ap = aupro = math.nan
            if self.n_images:
                which = "defect" if n_pos == 0 else "normal"
                notes.append(f"no {which} pixels in the masks: pixel AUROC, AP and AUPRO are undefined (NaN)")
        if self.n_images == 0:
            notes.append("no images: every pixel metric is NaN")
        elif self.n_defect_images == 0:
            notes.append("no defect images: IoU/Dice over defect images are NaN")
        best = choose_pixel_threshold(self, criterion, fallback=fallback_threshold)
        if best.fallback and self.n_images:
            notes.append(best.reason)
        k_best = int(np.clip(np.floor(best.value * self.num_bins + _EDGE_EPS), 0, self.num_bins))
        at_threshold = self._point(self.threshold, self._exact, self._exact_px["tp"], self._exact_px["fp"])
        return PixelMetrics(
            n_images=self.n_images,
            n_defect_images=self.n_defect_images,
            n_regions=self.n_regions,
            n_defect_pixels=n_pos,
            n_normal_pixels=n_neg,
            at_threshold=at_threshold,
            at_best=self._binned_point(k_best),
            best=best,
            pixel_auroc=pixel_auroc,
            pixel_ap=pixel_ap,
            aupro=aupro,
            fpr_limit=self.fpr_limit,
            num_bins=self.num_bins,
            per_image_iou=np.asarray(self._iou, np.float64),
            per_image_dice=np.asarray(self._dice, np.float64),
            per_image_has_defect=np.asarray(self._has_defect, bool),
            curves=curves,
            notes=tuple(notes),
        )


def pixel_metrics(
    prob_masks: Any,
    true_masks: Any,
    threshold: float = 0.5,
    *,
    num_bins: int = 1000,
    fpr_limit: float = 0.3,
    criterion: PixelCriterion = "dice",
) -> PixelMetrics:
    """One-shot pixel metrics (a single-batch `PixelMetricAccumulator`), for small splits and tests."""
    acc = PixelMetricAccumulator(threshold=threshold, num_bins=num_bins, fpr_limit=fpr_limit)
    acc.update(prob_masks, true_masks)
    return acc.compute(criterion)


def choose_pixel_threshold(
    acc: PixelMetricAccumulator, criterion: PixelCriterion = "dice", fallback: float = DEFAULT_FALLBACK_THRESHOLD
) -> ThresholdChoice:
    """The mask-probability threshold, among the accumulator's bin edges, that maximises `criterion`.

    criterion:
      "dice"        mean per-image Dice over all images (a normal image scores 1 with an empty predicted mask and 0
                    with any false pixel), so false alarms on normal images count as much as coverage of defects;
      "dice_defect" mean Dice over defect images only (ignores normal images: tends to lower thresholds);
      "f1"          pixel-level F1 over all pixels pooled (anomalib's adaptive threshold; large defects dominate).
    The winning run of edges is e_a..e_b; the threshold is the edge at its centre (index (a + b) // 2), so it is
    exactly reproducible and the metrics there are exact. Resolution is the bin width (1 / num_bins).
    Falls back to `fallback` (flagged) when no defect pixel was seen.
    """
    if criterion not in PIXEL_CRITERIA:
        raise ValueError(f"unknown pixel threshold criterion {criterion!r}; use one of {', '.join(PIXEL_CRITERIA)}")
    if acc.n_defect_pixels == 0:
        which = "no images" if acc.n_images == 0 else "no defect pixels"
        return ThresholdChoice(
            fallback,
            math.nan,
            criterion,
            fallback=True,
            reason=f"{which} in the validation masks: cannot choose a pixel threshold, using {fallback}",
        )
    if criterion == "dice":
        curve = acc.binned_mean("dice", "all")
    elif criterion == "dice_defect":
        curve = acc.binned_mean("dice", "defect")
    else:
        curve = acc.binned_pixel_f1()
    a, b = first_max_run(curve)
    centre = (a + b) // 2  # stay on a bin edge, so the metrics reported there are exact, not interpolated
    return ThresholdChoice(float(acc.thresholds[centre]), float(curve[centre]), criterion)
