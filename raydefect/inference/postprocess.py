"""Model outputs -> decisions: the mask at the image's own resolution (PNG, area, bbox) and the image's verdict."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from raydefect.geometry import content_of
from raydefect.imaging import encode_png

if TYPE_CHECKING:
    from raydefect.models.artifact import ArtifactMeta


@dataclass(frozen=True)
class MaskResult:
    """A predicted mask at the image's own resolution."""

    mask: np.ndarray  # bool HxW
    png: bytes | None  # 1-bit PNG (imaging.encode_png); None when not requested
    area_px: int
    fraction: float
    bbox: tuple[int, int, int, int] | None  # (x0, y0, x1, y1), x1/y1 exclusive; None for an empty mask


def upsample_prob(mask_prob: np.ndarray, width: int, height: int, geometry: str = "square") -> np.ndarray:
    """float SxS probabilities -> float32 HxW, bilinear (PIL, half-pixel centres; antialiased when shrinking); under
    ``aspect`` from the image's part of the square only."""
    prob = content_of(np.asarray(mask_prob, dtype=np.float32), width, height, geometry)
    if prob.ndim != 2:
        raise ValueError(f"mask_prob must be 2-D (S x S), got shape {prob.shape}")
    if prob.shape == (height, width):
        return prob
    resized = Image.fromarray(prob).resize((int(width), int(height)), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def format_bbox(bbox: Sequence[int] | None) -> str:
    """``x0 y0 x1 y1`` (x1, y1 exclusive); empty when there is no mask. The one text form of a bbox in every CSV
    (predict's scores.csv, `scores extract`'s index.csv)."""
    return "" if bbox is None else " ".join(str(int(v)) for v in bbox)


def class_ids(
    mask_prob: np.ndarray,
    pixel_class_probs: np.ndarray,
    width: int,
    height: int,
    threshold: float,
    geometry: str = "square",
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """A ``model.mask_classes`` model's per-pixel classes at the image's own resolution: uint8 HxW, 0 where the
    binary mask (``mask_prob``, SxS) is below ``threshold``, elsewhere the defect class (1..C-1) with the largest
    probability in ``pixel_class_probs`` (C x S x S), each class map upsampled as the mask is (`upsample_prob`).
    ``mask``: the binary mask `postprocess` already made at (height, width), used as it is (the ids then cover
    exactly its pixels); an empty one gives zeros without upsampling anything."""
    if mask is None:
        mask = upsample_prob(mask_prob, width, height, geometry) >= threshold
    if not mask.any():
        return np.zeros((int(height), int(width)), np.uint8)
    classes = np.stack([upsample_prob(c, width, height, geometry) for c in np.asarray(pixel_class_probs)[1:]])
    best = 1 + np.argmax(classes, axis=0)
    return np.where(mask, best, 0).astype(np.uint8)


def class_areas(ids: np.ndarray, class_names: list[str] | tuple[str, ...]) -> dict[str, int]:
    """Pixels per defect class of a class-id map (classes without pixels left out)."""
    counts = np.bincount(np.asarray(ids, np.int64).ravel(), minlength=len(class_names))
    return {name: int(counts[i]) for i, name in enumerate(class_names) if i and counts[i]}


def bbox_of(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _below(threshold: float) -> float:
    """A bound safely under ``threshold``: float32 rounding in the resize may lift a value by a few ulps."""
    return float(threshold) - 1e-5 * max(1.0, abs(float(threshold)))


@functools.lru_cache(maxsize=64)
def _empty_png(width: int, height: int) -> bytes:
    return encode_png(np.zeros((height, width), bool))


def _upsampled_mask(prob: np.ndarray, width: int, height: int, threshold: float) -> np.ndarray:
    """``upsample_prob(prob, width, height) >= threshold``, upsampling only the part of the image that can reach it.

    An output pixel of a bilinear enlargement mixes the 2x2 model pixels around its centre, so it can reach the
    threshold only near a model pixel that does: the box around those (plus a pixel of margin on each side) is
    upsampled with PIL's ``box`` (the same sampling positions as the full image), the rest of the mask is False.
    On a 3-megapixel image with a small defect this takes the upsampling from ~13 ms to well under one. When the
    image is smaller than the model's grid on either side (antialiased shrinking, wider support) the whole image
    is upsampled."""
    if prob.ndim != 2 or width < prob.shape[1] or height < prob.shape[0]:
        return upsample_prob(prob, width, height) >= threshold
    rows_in, cols_in = prob.shape
    hot = prob >= _below(threshold)
    rows, cols = np.flatnonzero(hot.any(axis=1)), np.flatnonzero(hot.any(axis=0))
    sx, sy = width / cols_in, height / rows_in
    x0, x1 = max(0, int(np.floor((cols[0] - 1) * sx)) - 1), min(width, int(np.ceil((cols[-1] + 2) * sx)) + 1)
    y0, y1 = max(0, int(np.floor((rows[0] - 1) * sy)) - 1), min(height, int(np.ceil((rows[-1] + 2) * sy)) + 1)
    if (x1 - x0) * (y1 - y0) >= 0.5 * width * height:
        return upsample_prob(prob, width, height) >= threshold
    crop = Image.fromarray(prob).resize(
        (x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=(x0 / sx, y0 / sy, x1 / sx, y1 / sy)
    )
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = np.asarray(crop, dtype=np.float32) >= threshold
    return mask


def postprocess(
    mask_prob: np.ndarray,
    width: int,
    height: int,
    pixel_threshold: float,
    *,
    encode: bool = True,
    geometry: str = "square",
) -> MaskResult:
    """Upsample the probability to (height, width), threshold (``>=``), and describe the mask. ``geometry``: the
    model's (`raydefect.geometry`); under ``aspect`` only the image's part of the square is used."""
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be >= 1, got {width}x{height}")
    prob = content_of(np.asarray(mask_prob, dtype=np.float32), int(width), int(height), geometry)
    if prob.ndim == 2 and float(prob.max(initial=0.0)) < _below(pixel_threshold):
        # Bilinear upsampling weighs input pixels with non-negative weights that sum to 1, so no output pixel exceeds
        # the input's maximum: the full-size mask is empty, known without upsampling (most images of a nightly run).
        return MaskResult(
            mask=np.zeros((int(height), int(width)), bool),
            png=_empty_png(int(width), int(height)) if encode else None,
            area_px=0,
            fraction=0.0,
            bbox=None,
        )
    mask = _upsampled_mask(prob, int(width), int(height), pixel_threshold)
    area = int(np.count_nonzero(mask))
    return MaskResult(
        mask=mask,
        png=encode_png(mask) if encode else None,
        area_px=area,
        fraction=area / float(mask.size),
        bbox=bbox_of(mask),
    )


def decide(defect_score: Any, class_probs: Any, meta: ArtifactMeta) -> tuple[bool, str]:
    """Image-level decision with the stored threshold -> (is_defect, defect_class); ``"normal"`` when not defect."""
    is_defect = float(defect_score) >= meta.image_threshold
    if not is_defect:
        return False, meta.class_names[0]
    probs = np.asarray(class_probs, dtype=np.float64)
    if probs.shape != (meta.num_classes,):
        raise ValueError(f"class_probs must have {meta.num_classes} entries, got shape {probs.shape}")
    return True, meta.class_names[1 + int(np.argmax(probs[1:]))]
