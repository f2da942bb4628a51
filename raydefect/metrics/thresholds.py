"""Decision thresholds chosen on validation data; training stores both (image and pixel) in the model artifact.

Both choosers (`choose_image_threshold` here, `pixel.choose_pixel_threshold` beside the accumulator it reads)
maximise an objective over candidate thresholds and break ties the same deterministic way: among all thresholds
reaching the maximum, take the lowest run of them (the recall-friendly side: a missed defect usually costs more
than a false alarm) and return the centre of that run, so the decision sits as far as possible from the validation
scores on either side (the pixel chooser snaps that centre to a bin edge). When the data cannot define a threshold
(one class absent), they return a documented fallback and say so in `ThresholdChoice.fallback` and `reason`
instead of raising.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from raydefect.metrics.common import to_numpy

#: Used when validation data cannot pick a threshold (only one class present): the natural cut of a probability.
DEFAULT_FALLBACK_THRESHOLD = 0.5

PixelCriterion = Literal["dice", "dice_defect", "f1"]
PIXEL_CRITERIA: tuple[str, ...] = ("dice", "dice_defect", "f1")


@dataclass(frozen=True)
class ThresholdChoice:
    """A chosen threshold: predict "defect" when score >= value.

    objective: the criterion's value there (F1, mean Dice...), NaN for a fallback.
    fallback: True when the data could not define a threshold and `value` is the fallback; `reason` says why.
    """

    value: float
    objective: float
    criterion: str
    fallback: bool = False
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": float(self.value),
            "objective": None if math.isnan(self.objective) else float(self.objective),
            "criterion": self.criterion,
            "fallback": bool(self.fallback),
            "reason": self.reason,
        }


def first_max_run(values: np.ndarray, atol: float = 1e-12) -> tuple[int, int]:
    """(start, end) inclusive of the lowest-index run of entries within `atol` of the maximum (NaN ignored)."""
    vals = np.where(np.isnan(values), -np.inf, values)
    best = vals.max()
    on_top = vals >= best - atol
    start = int(np.argmax(on_top))
    below = np.flatnonzero(~on_top[start:])
    end = start + int(below[0]) - 1 if below.size else len(vals) - 1
    return start, end


def choose_image_threshold(scores: Any, labels: Any, fallback: float = DEFAULT_FALLBACK_THRESHOLD) -> ThresholdChoice:
    """The defect-score threshold with the best F1 on these (validation) images.

    Candidates are every cut between distinct scores. With distinct scores u_0 < ... < u_{k-1}, the cut just
    above u_{j-1} classifies like any value in (u_{j-1}, u_j]; the winning run of cuts spans (u_{a-1}, u_b] and the
    threshold is its centre (u_{a-1} + u_b) / 2 (for a = 0, where every image is called a defect, the centre of
    [u_0, u_b]). Exact (no binning); O(N log N).

    Falls back to `fallback` (flagged) when there are no images, no defect images, or no normal images: F1 over one
    class does not pick a meaningful cut.
    """
    s = to_numpy(scores, np.float64).ravel()
    y = to_numpy(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in length")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        which = "no images" if y.size == 0 else "no defect images" if n_pos == 0 else "no normal images"
        return ThresholdChoice(
            fallback,
            math.nan,
            "f1",
            fallback=True,
            reason=f"{which} in the validation data: F1 cannot choose an image threshold, using {fallback}",
        )
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} defect scores are NaN/inf (did the model diverge?)")
    order = np.argsort(s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    uniq, first = np.unique(s_sorted, return_index=True)
    # positives/negatives with score >= u_j, for every distinct u_j (ascending), plus the "nothing positive" cut.
    pos_below = np.concatenate([[0], np.cumsum(y_sorted)])[first]
    neg_below = first - pos_below
    tp = np.append(n_pos - pos_below, 0)
    fp = np.append(n_neg - neg_below, 0)
    f1 = 2 * tp / (tp + fp + n_pos)  # = 2TP / (2TP + FP + FN), since TP + FN = n_pos
    a, b = first_max_run(f1)
    b = min(b, uniq.size - 1)  # the "nothing positive" cut has F1 0 < F1 of "all positive", never the sole winner
    if a == 0 and b == 0:
        value = float(uniq[0])  # only "everything is a defect" wins: cut at the lowest score
    else:
        lower = uniq[a - 1] if a > 0 else uniq[0]
        value = float((lower + uniq[b]) / 2)
    return ThresholdChoice(value, float(f1[a]), "f1")


#: Target image recalls the report and `raydefect thresholds` tabulate.
TARGET_RECALLS: tuple[float, ...] = (0.9, 0.95, 0.99, 0.999)


def thresholds_at_recall(scores: Any, labels: Any, recalls: Any = TARGET_RECALLS) -> list[dict[str, Any]]:
    """For each target recall: the highest defect-score threshold whose recall on these images reaches it, with the
    precision, recall and false-alarm rate there (``score >= threshold`` is a defect).

    The threshold is the k-th highest defect image's score, k = ceil(target * defect images): with few defect images
    several targets give the same threshold (30 defect images cannot tell 0.99 from 0.999). Without defect images
    every threshold is NaN."""
    s = to_numpy(scores, np.float64).ravel()
    y = to_numpy(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in length")
    defect = np.sort(s[y])[::-1]
    normal = s[~y]
    out = []
    for target in recalls:
        if not 0 < float(target) <= 1:
            raise ValueError(f"target recall must be in (0, 1], got {target}")
        if defect.size == 0:
            out.append({"target_recall": float(target), "threshold": math.nan, "recall": math.nan,
                        "precision": math.nan, "false_alarm_rate": math.nan, "defects_missed": 0})  # fmt: skip
            continue
        k = min(defect.size, max(1, math.ceil(float(target) * defect.size - 1e-9)))
        threshold = float(defect[k - 1])
        caught = int((defect >= threshold).sum())
        alarms = int((normal >= threshold).sum())
        out.append(
            {
                "target_recall": float(target),
                "threshold": threshold,
                "recall": caught / defect.size,
                "precision": caught / (caught + alarms),
                "false_alarm_rate": alarms / normal.size if normal.size else math.nan,
                "defects_missed": int(defect.size - caught),
            }
        )
    return out
