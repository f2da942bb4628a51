"""Image -> model input: the whole image resized (or letterboxed, or cut into tiles) per the model's geometry and
normalised, as training sees it (numpy + PIL only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raydefect.geometry import fit_image
from raydefect.imaging import DEFAULT_MAX_PIXELS, Source, decode_image_sized

if TYPE_CHECKING:
    from raydefect.models.artifact import ArtifactMeta


def resize_rgb(image: np.ndarray, size: int, geometry: str = "square") -> np.ndarray:
    """uint8 HxWx3 (or HxW) -> uint8 size x size x 3, bilinear; ``aspect`` keeps the aspect ratio and pads
    (`raydefect.geometry.fit_image`). Whole image, no crop."""
    return fit_image(image, size, geometry)[0]


class Preprocessor:
    """uint8 HxWx3 -> float32 3xSxS, normalised. Built from an artifact's metadata or explicit values (training)."""

    def __init__(
        self,
        meta: ArtifactMeta | None = None,
        *,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        geometry: str = "square",
    ) -> None:
        if meta is not None:
            image_size, mean, std, geometry = meta.image_size, meta.mean, meta.std, meta.geometry.mode
        if image_size is None or mean is None or std is None:
            raise ValueError("Preprocessor needs an ArtifactMeta or image_size, mean and std")
        self.image_size = int(image_size)
        self.geometry = geometry
        std_arr = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self._scale = (1.0 / (255.0 * std_arr)).astype(np.float32)
        self._shift = (np.asarray(mean, dtype=np.float32).reshape(3, 1, 1) / std_arr).astype(np.float32)

    @classmethod
    def for_backbone(cls, backbone: str, image_size: int) -> Preprocessor:
        """The preprocessing a backbone expects (its mean/std) at the run's image size: for training code."""
        from raydefect.models.registry import resolve_backbone

        spec = resolve_backbone(backbone)
        return cls(image_size=image_size, mean=spec.mean, std=spec.std)

    def normalize(self, resized: np.ndarray) -> np.ndarray:
        """uint8 SxSx3 -> float32 3xSxS: ``(x / 255 - mean) / std``."""
        chw = resized.transpose(2, 0, 1).astype(np.float32)
        return chw * self._scale - self._shift

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.normalize(resize_rgb(image, self.image_size, self.geometry))

    def normalize_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 [T, t, t, 3] -> float32 [T, 3, t, t], normalised like `normalize`."""
        chw = tiles.transpose(0, 3, 1, 2).astype(np.float32)
        return chw * self._scale[None] - self._shift[None]

    def from_bytes(
        self,
        data: Source,
        path: str | Path | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        reduced_jpeg: bool = True,
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """Encoded image (bytes, path or file) -> (float32 3xSxS, (width, height) after EXIF orientation).

        ``reduced_jpeg``: a JPEG of at least twice S is decoded at reduced scale (`imaging.decode_image_sized`), as
        `raydefect score` does by default (``score.reduced_jpeg``).
        Raises `CorruptImageError` / `ImageTooLargeError` (both `ImageError`, with ``path`` and ``reason``), which
        bulk jobs record per item.
        """
        reduce_to = self.image_size if reduced_jpeg else None
        image, size = decode_image_sized(data, "RGB", path, max_pixels, reduce_to)
        return self(image), size
