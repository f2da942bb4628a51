"""Drift between a night's scores and the model's validation distribution: fixed-bin histograms and the PSI.

Every quantity is binned on fixed edges (`BINS`), so histograms add up batch by batch in bounded memory and a
night compares with the reference training stored in the model artifact (``model.yaml``'s ``reference``), whatever
the number of rows. The population stability index

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)      (a, e: the night's and the reference's bin fractions)

is 0 for identical distributions. The thresholds follow the credit-scoring convention the index comes from:
below 0.1 stable, 0.1 to 0.25 a shift worth a look (warn), from 0.25 a shift that changes what the model sees
(alarm).

Two samples of one distribution do not give 0: with k occupied bins and n and m images, the index is about
(k - 1)(1/n + 1/m) from sampling alone -- 0.4 on average for 50 against 40 images, enough to cross 0.25 on a
small validation split. So every bin gets `SMOOTHING` extra counts (an empty bin never divides by zero) and the
level is judged on the *excess*: the index minus that sampling noise (`psi_noise`). On large samples the two
agree; drift figures need at least `MIN_IMAGES` on each side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: quantity -> (low, high, bins); values outside are clipped into the end bins
BINS: dict[str, tuple[float, float, int]] = {
    "defect_score": (0.0, 1.0, 20),
    "brightness": (0.0, 1.0, 20),
    "contrast": (0.0, 0.5, 20),
}
QUANTITIES = tuple(BINS)
IMAGE_STATS = ("brightness", "contrast")
PSI_WARN = 0.1
PSI_ALARM = 0.25
SMOOTHING = 0.5
MIN_IMAGES = 20
REFERENCE_VERSION = 1


def histogram(values: Any, quantity: str) -> np.ndarray:
    """Counts of `values` (NaN dropped) in `quantity`'s fixed bins."""
    lo, hi, n = BINS[quantity]
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    idx = np.clip(((v - lo) / (hi - lo) * n).astype(np.int64), 0, n - 1)
    return np.bincount(idx, minlength=n).astype(np.int64)


def psi(expected: Any, actual: Any) -> float | None:
    """The population stability index of `actual` counts against `expected` counts (same bins, `SMOOTHING` added
    to every bin); None when either is empty."""
    e = np.asarray(expected, np.float64)
    a = np.asarray(actual, np.float64)
    if e.sum() <= 0 or a.sum() <= 0:
        return None
    e = (e + SMOOTHING) / (e.sum() + SMOOTHING * e.size)
    a = (a + SMOOTHING) / (a.sum() + SMOOTHING * a.size)
    return float(np.sum((a - e) * np.log(a / e)))


def psi_noise(expected: Any, actual: Any) -> float:
    """What `psi` gives from sampling alone for these sample sizes: (k - 1)(1/n + 1/m), k the occupied bins."""
    e = np.asarray(expected, np.float64)
    a = np.asarray(actual, np.float64)
    if e.sum() <= 0 or a.sum() <= 0:
        return 0.0
    k = int(((e + a) > 0).sum())
    return max(k - 1, 0) * (1.0 / e.sum() + 1.0 / a.sum())


def excess_psi(expected: Any, actual: Any) -> tuple[float | None, float]:
    """(`psi` minus `psi_noise`, at least 0; the noise), or (None, 0) when either side has under `MIN_IMAGES`."""
    e = np.asarray(expected, np.float64)
    a = np.asarray(actual, np.float64)
    if e.sum() < MIN_IMAGES or a.sum() < MIN_IMAGES:
        return None, 0.0
    value = psi(e, a)
    noise = psi_noise(e, a)
    return (None if value is None else max(value - noise, 0.0)), noise


def level(value: float | None, warn: float = PSI_WARN, alarm: float = PSI_ALARM) -> str:
    """'ok', 'warn', 'alarm', or 'n/a' (nothing to compare)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return "alarm" if value >= alarm else "warn" if value >= warn else "ok"


def mean_std(counts: Any, quantity: str) -> tuple[float, float]:
    """Mean and standard deviation of a histogram (bin centres), for distances to it."""
    lo, hi, n = BINS[quantity]
    c = np.asarray(counts, np.float64)
    if c.sum() <= 0:
        return math.nan, math.nan
    centres = lo + (np.arange(n) + 0.5) * (hi - lo) / n
    mean = float((c * centres).sum() / c.sum())
    var = float((c * (centres - mean) ** 2).sum() / c.sum())
    return mean, max(math.sqrt(var), (hi - lo) / n / 2)  # at least half a bin: a constant reference is no zero


@dataclass(frozen=True)
class Reference:
    """The validation distribution a model artifact stores: images, defect rate at the image threshold, and one
    histogram per quantity (``None`` for quantities it does not hold)."""

    images: int
    defect_rate: float | None
    counts: Mapping[str, tuple[int, ...]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": REFERENCE_VERSION,
            "split": "val",
            "images": int(self.images),
            "defect_rate": self.defect_rate,
            "bins": {q: list(BINS[q]) for q in self.counts},
            "counts": {q: [int(c) for c in v] for q, v in self.counts.items()},
        }

    @classmethod
    def from_dict(cls, data: Any) -> Reference | None:
        """The stored reference, or None when `data` holds none or one with other bins (then it cannot compare)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("counts"), Mapping):
            return None
        counts = {}
        for q, v in data["counts"].items():
            if q in BINS and list(data.get("bins", {}).get(q, [])) == list(BINS[q]) and len(v) == BINS[q][2]:
                counts[q] = tuple(int(c) for c in v)
        rate = data.get("defect_rate")
        return cls(int(data.get("images") or 0), None if rate is None else float(rate), counts)


def build_reference(
    defect_scores: Any, image_threshold: float, brightness: Any = None, contrast: Any = None
) -> Reference:
    """The reference of a validation split: its defect scores (and image stats when given)."""
    scores = np.asarray(defect_scores, np.float64).ravel()
    counts = {"defect_score": tuple(histogram(scores, "defect_score"))}
    for q, values in (("brightness", brightness), ("contrast", contrast)):
        if values is not None and len(values):
            counts[q] = tuple(histogram(values, q))
    rate = float((scores >= image_threshold).mean()) if scores.size else None
    return Reference(int(scores.size), rate, counts)
