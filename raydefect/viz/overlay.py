"""Overlay pictures for people: the image beside the same image with the predicted mask drawn on it.

One function, `render_overlay`, used by `raydefect predict`, the galleries of `raydefect evaluate` and score
extraction. Layout (a uint8 RGB array, ``scale * H`` high and ``2 * scale * W`` wide)::

    +-------------------+-------------------+
    | original          | translucent fill  |
    | (+ true outline)  | + contour         |
    | [truth: class]    | [class  0.87]     |
    +-------------------+-------------------+

The contour is the morphological inner edge of the mask (``mask & ~erode(mask)``, scipy.ndimage), so it follows the
pixels exactly and never leaves the mask. Text sits in a dark box, readable on any background, in the panel's corner
that covers the least of the mask (top left when that is free), so a label never hides what it describes. Colours
come from a fixed palette by class index (`class_colour`), so one class has one colour in every picture. Small images
are enlarged by an integer factor (nearest neighbour: pixels stay crisp, the mask stays exact) until the shorter side
is at least `MIN_DISPLAY_SIDE`; huge ones are shrunk so that the longer side is at most `MAX_DISPLAY_SIDE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from raydefect.imaging import DEFECT_COLOURS  # one palette: overlays, reports and stored class masks

#: Shorter side (px) small panels are enlarged towards (integer factor, rounded): text needs room, 64 px is tiny.
MIN_DISPLAY_SIDE = 256
#: Longer side (px) a panel is shrunk to, at most: a 6000 px photo does not need a 12000 px overlay.
MAX_DISPLAY_SIDE = 1600
NORMAL_COLOUR = (46, 204, 113)  # green: "nothing found"
TRUTH_COLOUR = (255, 255, 255)


def class_colour(index: int) -> tuple[int, int, int]:
    """The colour of class ``index`` (0 = normal) in every overlay and report."""
    if index <= 0:
        return NORMAL_COLOUR
    return DEFECT_COLOURS[(index - 1) % len(DEFECT_COLOURS)]


def hex_colour(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def mask_edge(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The inner boundary of a boolean mask, ``width`` pixels thick (pixels of the mask next to a non-mask pixel).

    The image border counts as outside, so a mask touching the border is closed there too.
    """
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return np.zeros_like(m)
    eroded = ndimage.binary_erosion(m, structure=np.ones((3, 3), bool), iterations=max(1, width), border_value=0)
    return m & ~eroded


def display_scale(height: int, width: int) -> float:
    """How much a panel is resized for display: an integer >= 1 for small images, < 1 for huge ones."""
    short, long = min(height, width), max(height, width)
    if short < MIN_DISPLAY_SIDE:
        factor = max(1, round(MIN_DISPLAY_SIDE / max(short, 1)))
        while factor > 1 and long * factor > MAX_DISPLAY_SIDE:  # a thin strip must not become enormous
            factor -= 1
        return float(factor)
    if long > MAX_DISPLAY_SIDE:
        return MAX_DISPLAY_SIDE / long
    return 1.0


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font (needs FreeType, which Pillow wheels include); bitmap font otherwise."""
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError, ValueError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def _to_rgb(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {arr.shape}")
    return arr


def _resize(arr: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """(width, height); masks always nearest, images nearest when enlarging (crisp) and antialiased when shrinking."""
    if (arr.shape[1], arr.shape[0]) == size:
        return arr
    if arr.dtype == bool:
        img = Image.fromarray(arr.astype(np.uint8) * 255)
        return np.asarray(img.resize(size, Image.Resampling.NEAREST)) >= 128
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BOX
    return np.asarray(Image.fromarray(arr).resize(size, resample))


def _fit(
    draw: ImageDraw.ImageDraw, lines: Sequence[str], font_px: int, room: int
) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, list[str]]:
    """The largest font (down to 8 px) at which every line fits in ``room`` px; then cut lines with an ellipsis."""
    for px in range(font_px, 7, -1):
        font = _font(px)
        if max(draw.textlength(t, font=font) for t in lines) <= room:
            return font, list(lines)
    font = _font(8)
    fitted = []
    for original in lines:
        text = original
        if draw.textlength(text, font=font) > room:
            while len(text) > 1 and draw.textlength(text + "…", font=font) > room:
                text = text[:-1]
            text += "…"
        fitted.append(text)
    return font, fitted


def _text_box(
    draw: ImageDraw.ImageDraw,
    corners: Sequence[tuple[int, int, int, int]],
    lines: Sequence[str],
    font_px: int,
    swatch: tuple[int, int, int] | None,
    max_width: int,
    avoid: np.ndarray | None = None,
) -> tuple[int, int, int, int]:
    """Dark rounded box with white text; a coloured square before the first line says which colour is which.

    ``corners``: (x, y, x_sign, y_sign) anchors, tried in order: the box's corner sits at (x, y) and grows right/down
    (sign +1) or left/up (-1). ``avoid``: a bool array in canvas coordinates (the mask): the box goes to the first
    anchor covering the fewest of its pixels, so the label never hides the mask when a free corner exists.
    Returns the box (x0, y0, x1, y1)."""
    pad = max(2, round(font_px * 0.3))
    line_h = round(font_px * 1.25)
    sw = line_h - 2 * max(1, pad // 2) if swatch is not None else 0
    gap = pad if swatch is not None else 0
    font, lines = _fit(draw, lines, font_px, max(8, max_width - 2 * pad - sw - gap))
    line_h = round(getattr(font, "size", font_px) * 1.25)
    widths = [int(draw.textlength(t, font=font)) for t in lines]
    box_w = max(widths) + sw + gap + 2 * pad
    box_h = line_h * len(lines) + 2 * pad

    def place(corner: tuple[int, int, int, int]) -> tuple[int, int]:
        cx, cy, sx, sy = corner
        return (cx if sx > 0 else cx - box_w), (cy if sy > 0 else cy - box_h)

    def covered(xy: tuple[int, int]) -> int:
        if avoid is None:
            return 0
        x0, y0 = max(0, xy[0]), max(0, xy[1])
        return int(avoid[y0 : xy[1] + box_h + 1, x0 : xy[0] + box_w + 1].sum())

    x, y = min((place(c) for c in corners), key=covered)  # min keeps the first of equals: top left by default
    draw.rounded_rectangle((x, y, x + box_w, y + box_h), radius=pad, fill=(0, 0, 0, 170))
    if swatch is not None:
        sy = y + pad + (line_h - sw) // 2
        draw.rectangle((x + pad, sy, x + pad + sw, sy + sw), fill=(*swatch, 255), outline=(255, 255, 255, 255))
    for i, text in enumerate(lines):
        tx = x + pad + (sw + gap if i == 0 else 0)
        draw.text((tx, y + pad + i * line_h), text, font=font, fill=(255, 255, 255, 255))
    return x, y, x + box_w, y + box_h


def _corners(x0: int, width: int, height: int, margin: int) -> list[tuple[int, int, int, int]]:
    """A panel's four label anchors (see `_text_box`): top left, top right, bottom left, bottom right."""
    x1, y1 = x0 + width - margin, height - margin
    return [(x0 + margin, margin, 1, 1), (x1, margin, -1, 1), (x0 + margin, y1, 1, -1), (x1, y1, -1, -1)]


def render_overlay(
    image: np.ndarray,
    mask: np.ndarray | None,
    score: float | None,
    label_text: str,
    *,
    colour: Sequence[int] | None = None,
    true_mask: np.ndarray | None = None,
    true_text: str | None = None,
    note: str | None = None,
    alpha: float = 0.45,
    scale: float | None = None,
    classes: np.ndarray | None = None,
) -> np.ndarray:
    """The original image and, to its right, the image with ``mask`` as a translucent fill plus its contour.

    image: uint8 HxW or HxWx3. mask: bool HxW at the image's resolution (None = nothing predicted).
    score: the defect score written after ``label_text`` ("scratch  defect score 0.870"); None writes the label alone.
    colour: RGB of the fill, contour and swatch (default: `class_colour(1)`).
    true_mask / true_text: the ground truth, drawn as a white outline on the left panel with its own label
    (evaluation galleries). note: a second line under the label (e.g. "IoU 0.42").
    scale: display scale (`display_scale` by default); the result is ``round(scale * H)`` high and twice
    ``round(scale * W)`` wide. classes: uint8 class ids HxW (``model.mask_classes``): each class filled and
    outlined in its `class_colour` instead of one colour.
    Returns a new uint8 array of shape (H', 2 W', 3).
    """
    rgb = _to_rgb(image)
    h, w = rgb.shape[:2]
    for name, m in (("mask", mask), ("true_mask", true_mask), ("classes", classes)):
        if m is not None and np.asarray(m).shape != (h, w):
            raise ValueError(f"{name} has shape {np.asarray(m).shape}, the image is {h}x{w}; resize it first")
    s = display_scale(h, w) if scale is None else float(scale)
    if s <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    size = (max(1, round(w * s)), max(1, round(h * s)))
    enlarge = s >= 1
    base = _resize(rgb, size, nearest=enlarge)
    pred = _resize(np.asarray(mask, bool), size, nearest=True) if mask is not None else None
    truth = _resize(np.asarray(true_mask, bool), size, nearest=True) if true_mask is not None else None
    col = np.asarray(colour if colour is not None else class_colour(1), dtype=np.float32)
    thick = max(1, round(min(size) / 256))  # 1 px up to 256 px panels, 2 px at 512, ...

    left = base.copy()
    right = base.astype(np.float32)
    if classes is not None:
        ids = _resize(np.asarray(classes, np.uint8), size, nearest=True)
        for i in (int(v) for v in np.unique(ids) if v):
            region = ids == i
            right[region] = (1 - alpha) * right[region] + alpha * np.asarray(class_colour(i), np.float32)
            right[mask_edge(region, thick)] = class_colour(i)
    elif pred is not None and pred.any():
        right[pred] = (1 - alpha) * right[pred] + alpha * col
        right[mask_edge(pred, thick)] = col
    right = np.clip(right + 0.5, 0, 255).astype(np.uint8)
    if truth is not None and truth.any():
        edge = mask_edge(truth, thick)
        halo = ndimage.binary_dilation(edge, iterations=1) & ~edge  # dark rim: white shows on light parts too
        left[halo] = (0, 0, 0)
        left[edge] = TRUTH_COLOUR

    canvas = Image.fromarray(np.concatenate([left, right], axis=1)).convert("RGBA")
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    panel_w, panel_h = size
    font_px = int(np.clip(min(panel_w, panel_h) / 14, 10, 40))
    margin = max(2, font_px // 4)
    text = label_text if score is None else f"{label_text}  defect score {score:.3f}"
    lines = [text] + ([note] if note else [])
    blank = np.zeros((panel_h, panel_w), bool)
    avoid = np.concatenate([blank if truth is None else truth, blank if pred is None else pred], axis=1)
    swatch = tuple(int(c) for c in col)
    _text_box(draw, _corners(panel_w, panel_w, panel_h, margin), lines, font_px, swatch, panel_w - 2 * margin, avoid)
    if true_text:
        room = panel_w - 2 * margin
        _text_box(draw, _corners(0, panel_w, panel_h, margin), [true_text], font_px, TRUTH_COLOUR, room, avoid)
    draw.line([(panel_w, 0), (panel_w, panel_h)], fill=(255, 255, 255, 200), width=1)  # panel separator
    out = Image.alpha_composite(canvas, layer).convert("RGB")
    return np.asarray(out)


def save_png(array: np.ndarray, path: str, compress_level: int = 3) -> None:
    """Write an overlay as PNG (level 3: ~2x faster than Pillow's default 6 for a few % more bytes)."""
    Image.fromarray(array).save(path, format="PNG", compress_level=compress_level)
