"""Input geometry: how an image of any size becomes model inputs, and how the model's masks go back to its pixels.

Three geometries (``data.geometry``), the same in training and in every inference path, stored in model.yaml:

- ``square``: the whole image resized to ``image_size`` x ``image_size`` (aspect ratio not kept).
- ``aspect``: the whole image resized so that its longer side is ``image_size``, aspect ratio kept, centred on an
  ``image_size`` square and padded with black (uint8 0, before normalisation). Masks come back from the content
  rectangle only. Nothing is distorted; long parts spend compute on the padding.
- ``tiles``: the image scaled by ``scale`` (1.0 = native pixels) and cut into ``tile_size`` squares that overlap by
  ``tile_overlap`` pixels; the last tile of a row or column is flush with the image's edge, and an image smaller
  than a tile is padded. Mask logits are stitched back with `blend_window` weights (a linear ramp over the overlap,
  so seams fade), and the image's score is the maximum of its tiles' defect scores (a defect anywhere makes the
  image defective); its class is the class of that tile.

Training on tiles draws one tile per image and epoch: with probability ``tile_defect_share`` (when the image has
defect pixels) centred on a random defect pixel, otherwise anywhere. A tile's class is its image's class when it
holds at least one defect pixel and ``normal`` otherwise.

Pure numpy + Pillow: used by training, predict, evaluate, score and export alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

GEOMETRIES = ("square", "aspect", "tiles")


@dataclass(frozen=True)
class Geometry:
    """The geometry a model was trained with (model.yaml ``geometry``); ``image_size`` is the model's input side
    (under ``tiles`` the tile size)."""

    mode: str = "square"
    image_size: int = 224
    scale: float = 1.0
    tile_overlap: int = 0

    @classmethod
    def from_data_config(cls, data: Any) -> Geometry:
        if data.geometry == "tiles":
            return cls("tiles", int(data.tile_size), float(data.scale), int(data.tile_overlap))
        return cls(data.geometry, int(data.image_size))

    @property
    def tiled(self) -> bool:
        return self.mode == "tiles"

    def describe(self) -> str:
        """What the model sees, for people: "at 224 px", "at 224 px (aspect kept)", "on 256 px tiles (scale 1,
        overlap 32)"."""
        if self.tiled:
            return f"on {self.image_size} px tiles (scale {self.scale:g}, overlap {self.tile_overlap})"
        return f"at {self.image_size} px" + (" (aspect kept)" if self.mode == "aspect" else "")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode}
        if self.tiled:
            out.update(scale=self.scale, tile_size=self.image_size, tile_overlap=self.tile_overlap)
        return out

    @classmethod
    def from_dict(cls, data: Any, image_size: int) -> Geometry:
        """model.yaml's ``geometry`` (absent in square models) and its ``image_size``."""
        if not data:
            return cls("square", image_size)
        mode = str(data.get("mode", "square"))
        if mode not in GEOMETRIES:
            raise ValueError(f"geometry.mode must be one of {', '.join(GEOMETRIES)}, got {mode!r}")
        if mode == "tiles":
            return cls(mode, int(data["tile_size"]), float(data["scale"]), int(data["tile_overlap"]))
        return cls(mode, image_size)


@dataclass(frozen=True)
class Box:
    """A rectangle in pixels: left, top, width, height."""

    x: int
    y: int
    w: int
    h: int


def letterbox_box(width: int, height: int, size: int) -> Box:
    """Where an image of ``width`` x ``height`` lands on a ``size`` square under ``aspect`` (centred, >= 1 px)."""
    scale = size / max(width, height)
    w = min(size, max(1, round(width * scale)))
    h = min(size, max(1, round(height * scale)))
    return Box((size - w) // 2, (size - h) // 2, w, h)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 HxW or HxWx3 -> uint8 HxWx3."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    return image


def fit_image(image: np.ndarray, size: int, geometry: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 HxWx3 -> (uint8 size x size x 3, bool size x size "content" mask: False on padding)."""
    image = to_rgb(image)
    h, w = image.shape[:2]
    content = np.ones((size, size), dtype=bool)
    if geometry != "aspect":
        if (h, w) == (size, size):
            return image, content
        return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)), content
    box = letterbox_box(w, h, size)
    out = np.zeros((size, size, 3), dtype=np.uint8)
    resized = (
        image if (h, w) == (box.h, box.w) else Image.fromarray(image).resize((box.w, box.h), Image.Resampling.BILINEAR)
    )
    out[box.y : box.y + box.h, box.x : box.x + box.w] = np.asarray(resized)
    content[:] = False
    content[box.y : box.y + box.h, box.x : box.x + box.w] = True
    return out, content


def fit_mask(mask: np.ndarray, size: int, geometry: str) -> np.ndarray:
    """bool HxW -> bool size x size, nearest (labels are never interpolated); padding is background."""
    h, w = mask.shape
    if geometry != "aspect":
        if (h, w) == (size, size):
            return mask
        img = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
        return np.asarray(img) >= 128
    box = letterbox_box(w, h, size)
    out = np.zeros((size, size), dtype=bool)
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((box.w, box.h), Image.Resampling.NEAREST)
    out[box.y : box.y + box.h, box.x : box.x + box.w] = np.asarray(img) >= 128
    return out


def content_of(prob: np.ndarray, width: int, height: int, geometry: str) -> np.ndarray:
    """The part of a model-size mask map that shows the image (all of it, except under ``aspect``)."""
    if geometry != "aspect":
        return prob
    box = letterbox_box(width, height, prob.shape[-1])
    return prob[..., box.y : box.y + box.h, box.x : box.x + box.w]


# ------------------------------------------------------------------------------------------------------- tiles
def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one side: stride ``tile - overlap``, the last tile flush with the end (one at 0 if the
    side is shorter than a tile)."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def tile_boxes(width: int, height: int, tile: int, overlap: int) -> list[Box]:
    """Row-major tiles covering a ``width`` x ``height`` image (parts past a short side are padding)."""
    return [
        Box(x, y, tile, tile) for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)
    ]


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The image's size at ``data.scale`` (at least 1 px a side)."""
    return max(1, round(width * scale)), max(1, round(height * scale))


def scale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """uint8 HxWx3 resized by ``scale`` (`scaled_size`), bilinear; the image itself at 1.0."""
    h, w = image.shape[:2]
    sw, sh = scaled_size(w, h, scale)
    if (sw, sh) == (w, h):
        return image
    return np.asarray(Image.fromarray(image).resize((sw, sh), Image.Resampling.BILINEAR))


def scale_mask(mask: np.ndarray, scale: float) -> np.ndarray:
    """bool HxW resized by ``scale``, nearest (labels are never interpolated)."""
    h, w = mask.shape
    sw, sh = scaled_size(w, h, scale)
    if (sw, sh) == (w, h):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((sw, sh), Image.Resampling.NEAREST)) >= 128


def cut_tiles(image: np.ndarray, boxes: list[Box]) -> np.ndarray:
    """uint8 HxWx3 -> uint8 [T, tile, tile, 3]; pixels past the image are zeros."""
    h, w = image.shape[:2]
    tiles = np.zeros((len(boxes), boxes[0].h, boxes[0].w, 3), dtype=np.uint8)
    for i, b in enumerate(boxes):
        part = image[b.y : min(b.y + b.h, h), b.x : min(b.x + b.w, w)]
        tiles[i, : part.shape[0], : part.shape[1]] = part
    return tiles


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """float32 tile x tile weights: 1 inside, a linear ramp over the ``overlap`` border (never 0), so that stitched
    tiles fade into each other instead of meeting at a seam."""
    ramp = np.ones(tile, dtype=np.float32)
    if overlap > 0:
        edge = (np.arange(min(overlap, tile // 2), dtype=np.float32) + 1.0) / (overlap + 1.0)
        ramp[: len(edge)] = edge
        ramp[tile - len(edge) :] = edge[::-1]
    return np.outer(ramp, ramp)


class Stitcher:
    """Accumulates per-tile maps [C, tile, tile] into one [C, H, W] map, weighted by `blend_window`."""

    def __init__(self, width: int, height: int, tile: int, overlap: int, channels: int = 1) -> None:
        self.width, self.height = width, height
        self.window = blend_window(tile, overlap)
        self.total = np.zeros((channels, height, width), dtype=np.float32)
        self.weight = np.zeros((height, width), dtype=np.float32)

    def add(self, box: Box, values: np.ndarray) -> None:
        h = min(box.h, self.height - box.y)
        w = min(box.w, self.width - box.x)
        win = self.window[:h, :w]
        self.total[:, box.y : box.y + h, box.x : box.x + w] += values[:, :h, :w] * win
        self.weight[box.y : box.y + h, box.x : box.x + w] += win

    def result(self) -> np.ndarray:
        """The weighted mean at every pixel (every pixel is covered by at least one tile)."""
        return self.total / np.maximum(self.weight, 1e-12)


def aggregate_tiles(defect_scores: np.ndarray, class_probs: np.ndarray) -> tuple[float, np.ndarray]:
    """Tiles' (defect score [T], class probs [T, C]) -> the image's: the maximum score and that tile's classes."""
    best = int(np.argmax(defect_scores))
    return float(defect_scores[best]), class_probs[best]


def iter_chunks(n: int, size: int) -> Iterator[range]:
    """``range(n)`` in chunks of at most ``size``: bounded tiles in flight for huge images."""
    for start in range(0, n, max(1, size)):
        yield range(start, min(n, start + size))


# ---------------------------------------------------------------------------------------------- tile sampling
def sample_tile(mask: np.ndarray, tile: int, rng: np.random.Generator, defect_share: float) -> tuple[Box, bool]:
    """One training tile of an image whose (scaled) mask is ``mask``: with probability ``defect_share`` -- if the
    mask has defect pixels -- centred (jittered by a quarter tile) on a random one, else anywhere. Returns the box
    (clamped to the image; images smaller than the tile get a box at 0 and are padded) and whether the tile holds
    a defect pixel."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(ys) and rng.random() < defect_share:
        i = int(rng.integers(len(ys)))
        jitter = rng.integers(-(tile // 4), tile // 4 + 1, size=2)
        x0, y0 = int(xs[i]) - tile // 2 + int(jitter[0]), int(ys[i]) - tile // 2 + int(jitter[1])
    else:
        x0 = int(rng.integers(0, max(1, w - tile + 1)))
        y0 = int(rng.integers(0, max(1, h - tile + 1)))
    x0 = min(max(0, x0), max(0, w - tile))
    y0 = min(max(0, y0), max(0, h - tile))
    box = Box(x0, y0, tile, tile)
    return box, bool(mask[y0 : y0 + tile, x0 : x0 + tile].any())


# ------------------------------------------------------------------------------------------- tiled inference
@dataclass
class TiledImage:
    """One image's tiled prediction: its score and classes (`aggregate_tiles`) and the stitched mask probability at
    the scaled size (``postprocess`` brings it to the image's own size)."""

    defect_score: float
    class_probs: np.ndarray
    mask_prob: np.ndarray  # float32 [H * scale, W * scale]


class _Pending:
    def __init__(self, image: np.ndarray, geometry: Geometry) -> None:
        image = scale_image(image, geometry.scale)
        sh, sw = image.shape[:2]
        self.image = image
        self.boxes = tile_boxes(sw, sh, geometry.image_size, geometry.tile_overlap)
        self.stitcher = Stitcher(sw, sh, geometry.image_size, geometry.tile_overlap)
        self.scores = np.zeros(len(self.boxes), np.float64)
        self.class_probs: list[np.ndarray] = [np.zeros(0)] * len(self.boxes)

    def result(self) -> TiledImage:
        score, probs = aggregate_tiles(self.scores, np.stack(self.class_probs))
        return TiledImage(score, probs, self.stitcher.result()[0])


def predict_tiled(
    images: list[np.ndarray],
    geometry: Geometry,
    preprocess: Any,
    predict: Any,
    batch_size: int = 16,
) -> list[TiledImage]:
    """uint8 HxWx3 images -> one `TiledImage` each. Tiles are batched across images, at most ``batch_size`` in
    flight: ``preprocess`` turns uint8 [T, t, t, 3] tiles into the model's float32 [T, 3, t, t], ``predict`` returns
    ``defect_score`` [T], ``class_probs`` [T, C] and ``mask_prob`` [T, t, t] (a `Predictor`'s ``predict``)."""
    pending = [_Pending(to_rgb(image), geometry) for image in images]
    queue = [(p, i) for p in pending for i in range(len(p.boxes))]
    for chunk in iter_chunks(len(queue), batch_size):
        items = [queue[i] for i in chunk]
        tiles = np.concatenate([cut_tiles(p.image, [p.boxes[i]]) for p, i in items])
        out = predict(preprocess(tiles))
        for k, (p, i) in enumerate(items):
            p.scores[i] = float(out["defect_score"][k])
            p.class_probs[i] = np.asarray(out["class_probs"][k], np.float32)
            p.stitcher.add(p.boxes[i], np.asarray(out["mask_prob"][k], np.float32)[None])
    return [p.result() for p in pending]
