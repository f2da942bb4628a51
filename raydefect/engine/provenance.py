"""What a training run records about its validation in the model artifact: the reference distribution the nightly
scores report compares against (`validation_reference`), and how each threshold was chosen (`thresholds_chosen`)."""

from __future__ import annotations

from typing import Any

from raydefect.config import Config
from raydefect.errors import RaydefectError
from raydefect.geometry import Geometry

#: most images whose brightness and contrast go into the artifact's reference (decoding them costs seconds per 1,000)
REFERENCE_IMAGES = 2000


def validation_reference(
    scores: Any, image_threshold: float, rows: list[dict[str, Any]], cfg: Config, geometry: Geometry
) -> Any:
    """The distribution stored in the artifact (`metrics.drift.Reference`): the validation split's defect scores
    just computed, and the brightness and contrast of the images the model learnt from and was validated on (`rows`:
    train and val, at most `REFERENCE_IMAGES` of them, evenly spaced), each decoded as `raydefect score` decodes it
    so the nightly statistics compare like with like. An image that no longer decodes is left out."""
    import numpy as np

    from raydefect.imaging import decode_image_sized, image_stats, read_bytes
    from raydefect.metrics.drift import build_reference

    reduce_to = geometry.image_size if cfg.score.reduced_jpeg and geometry.mode != "tiles" else None
    step = max(1, -(-len(rows) // REFERENCE_IMAGES))
    stats = []
    for row in rows[::step]:
        try:
            image, _ = decode_image_sized(
                read_bytes(row["image"]), "RGB", row["image"], cfg.score.max_image_pixels, reduce_to
            )
        except (OSError, RaydefectError):
            continue
        stats.append(image_stats(image))
    values = np.asarray(stats, np.float64).reshape(-1, 2)
    return build_reference(scores, image_threshold, values[:, 0], values[:, 1])


def thresholds_chosen(val_image: Any, val_pixel: Any) -> dict[str, str]:
    """How training chose each threshold, in a sentence (model.yaml's ``extra.thresholds_chosen``; the report)."""
    image = val_image.best
    pixel = val_pixel.best
    n, n_defect = val_image.n_images, val_image.n_defect
    return {
        "image": image.reason
        if image.fallback
        else f"the defect-score cut with the best F1 ({image.objective:.3f}) on {n} validation images "
        f"({n_defect} defect)",
        "pixel": pixel.reason
        if pixel.fallback
        else f"the pixel-probability cut with the best {pixel.criterion} ({pixel.objective:.3f}) on the validation "
        "images' pixels",
    }
