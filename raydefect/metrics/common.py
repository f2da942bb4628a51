"""Small helpers shared by the metric modules: array conversion without importing torch, NaN-safe maths."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """`x` as numpy (numpy, list, or a torch tensor on any device, bf16 included) without importing torch."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach()
        if t.is_floating_point():
            t = t.float()  # numpy has no bfloat16
        x = t.cpu().numpy()
    return np.asarray(x, dtype=dtype)


def safe_div(num: float, den: float, empty: float = math.nan) -> float:
    """num/den, or `empty` when den is 0 (the caller documents what an empty denominator means)."""
    return float(num) / float(den) if den else float(empty)


def nanmean(values: list[float] | np.ndarray) -> float:
    """Mean of the finite values; NaN when there are none (no warning, unlike np.nanmean)."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


def json_safe(value: Any) -> Any:
    """Plain JSON types: arrays to lists, numpy scalars to Python, NaN/inf to None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    return value


def trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under y(x) from x[0] to x_max with the trapezoid rule, y interpolated linearly at x_max.

    `x` must be non-decreasing and reach x_max (repeated x values are vertical steps and add no area). This is the
    integration of MVTec AD's reference evaluation (`trapezoid(x, y, x_max)` in its `generic_util.py`).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs))) if xs.size > 1 else 0.0
    if xs.size and xs[-1] < x_max and xs.size < x.size:
        j = xs.size  # the first point beyond x_max (x is sorted, so `inside` is a prefix)
        x0, y0, x1, y1 = x[j - 1], y[j - 1], x[j], y[j]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area
