"""Training augmentation: mask-aligned geometric changes (scale-crop, flips, 90-degree turns) and photometric jitter,
placing a crop exactly as `raydefect.geometry` places whole images."""

from __future__ import annotations

import numpy as np
from PIL import Image

from raydefect.config import DataConfig
from raydefect.geometry import Box, letterbox_box


class Augmenter:
    """Mask-aligned geometric augmentation plus photometric jitter, from `DataConfig`."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.size = cfg.image_size

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """uint8 HxWx3 and bool HxW -> float32 SxSx3 in [0, 255] and bool SxS. A uint8 class-id mask comes back
        as uint8 class ids, placed the same way."""
        cfg, s = self.cfg, self.size
        h, w = mask.shape
        box = (0.0, 0.0, float(w), float(h))
        if cfg.scale_min < 1.0:
            side = rng.uniform(cfg.scale_min, 1.0)
            cw, ch = w * side, h * side
            x0, y0 = rng.uniform(0.0, w - cw), rng.uniform(0.0, h - ch)
            box = (x0, y0, x0 + cw, y0 + ch)
        img, msk = _resample(image, mask, box, s, cfg.geometry)
        if cfg.hflip and rng.random() < 0.5:
            img, msk = img[:, ::-1], msk[:, ::-1]
        if cfg.vflip and rng.random() < 0.5:
            img, msk = img[::-1], msk[::-1]
        if cfg.rot90:
            k = int(rng.integers(4))
            img, msk = np.rot90(img, k), np.rot90(msk, k)
        out = img.astype(np.float32)
        if cfg.contrast > 0 or cfg.brightness > 0:
            c = rng.uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast) if cfg.contrast > 0 else 1.0
            b = rng.uniform(-cfg.brightness, cfg.brightness) * 255.0 if cfg.brightness > 0 else 0.0
            mean = float(out.mean())
            out = np.clip((out - mean) * c + mean + b, 0.0, 255.0)
        return np.ascontiguousarray(out), np.ascontiguousarray(msk)


def _resample(
    image: np.ndarray, mask: np.ndarray, box: tuple[float, float, float, float], size: int, geometry: str
) -> tuple[np.ndarray, np.ndarray]:
    """The ``box`` of an image and its mask onto a ``size`` square: stretched (``square``) or, under ``aspect``,
    resized with its aspect ratio and centred on black, exactly as `geometry.fit_image` places whole images."""
    target = Box(0, 0, size, size)
    if geometry == "aspect":
        target = letterbox_box(max(1, round(box[2] - box[0])), max(1, round(box[3] - box[1])), size)
    img = np.zeros((size, size, 3), dtype=np.uint8)
    part = Image.fromarray(image).resize((target.w, target.h), Image.Resampling.BILINEAR, box=box)
    img[target.y : target.y + target.h, target.x : target.x + target.w] = np.asarray(part)
    if mask.dtype != bool:  # class ids: nearest keeps them
        ids = np.zeros((size, size), dtype=np.uint8)
        part_ids = Image.fromarray(mask.astype(np.uint8)).resize(
            (target.w, target.h), Image.Resampling.NEAREST, box=box
        )
        ids[target.y : target.y + target.h, target.x : target.x + target.w] = np.asarray(part_ids)
        return img, ids
    msk = np.zeros((size, size), dtype=bool)
    part_mask = Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (target.w, target.h), Image.Resampling.NEAREST, box=box
    )
    msk[target.y : target.y + target.h, target.x : target.x + target.w] = np.asarray(part_mask) >= 128
    return img, msk
