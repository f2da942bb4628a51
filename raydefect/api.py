"""The Python API: a model artifact loaded once, predictions on paths, folders, PIL images or numpy arrays, and the
scores and datasets the commands write, read back. No Ray.

    import raydefect

    model = raydefect.load_model("runs/demo/model")
    for p in model.predict("photos/"):                 # a file, a folder, a glob, a list, PIL images, arrays
        print(p.path, p.defect_score, p.is_defect, p.defect_class, p.mask.shape, p.bbox)

    scores = raydefect.read_scores("scores/")          # what `raydefect score --out scores/` committed (pandas)
    ids, names = raydefect.decode_mask(scores.mask_png[0])  # a row's mask: class ids (0 = normal), class names
    dataset = raydefect.load_dataset("data/screws")    # what `raydefect prepare --out data/screws` wrote

`Model.predict` runs the loop of `raydefect predict` (`raydefect.tasks.predict.scored_batches`): the same decoding,
the model's geometry (square, aspect or tiles), the same thresholds and mask finishing, so its numbers are the
numbers in predict's scores.csv. Batching and the device are chosen as the command chooses them. An unreadable
file among many becomes a `Prediction` whose `error` says why; the others are scored. Errors the caller can fix
(a missing model, no images, an array of the wrong shape) raise the one-line `raydefect.errors` types.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from raydefect.config import IMAGE_EXTENSIONS
from raydefect.data.manifest import Dataset
from raydefect.data.manifest import load_dataset as open_dataset
from raydefect.errors import DataError
from raydefect.imaging import DEFAULT_MAX_PIXELS, decode_class_png, rgb_array
from raydefect.inference import Predictor, Preprocessor, class_areas
from raydefect.tasks.predict import (
    Decoded,
    Scored,
    cpu_threads,
    decode_for_model,
    default_workers,
    list_images,
    scored_batches,
    with_thresholds,
)

if TYPE_CHECKING:
    import pandas as pd

    from raydefect.models.artifact import ArtifactMeta

__all__ = ["Model", "Prediction", "decode_mask", "load_dataset", "load_model", "read_scores"]


@dataclass(frozen=True)
class Prediction:
    """One image's result: the fields of a scores.csv row, with the mask itself.

    ``path`` is None for an image passed in memory (PIL or numpy). When the image could not be read, ``error`` says
    why and the result fields are None (``class_scores`` empty, ``mask_area_px`` 0). A ``model.mask_classes`` model
    also gives each pixel's class: ``classes`` (uint8 class ids, 0 = normal, ``i`` = ``model.class_names[i]``) and
    ``class_area_px`` (pixels per class); both are None for other models.
    """

    path: str | None
    width: int
    height: int
    defect_score: float | None
    is_defect: bool | None
    defect_class: str | None
    class_scores: dict[str, float] = field(default_factory=dict)
    mask: np.ndarray | None = field(default=None, repr=False)  # bool (height, width): True where a defect is
    bbox: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1), x1 and y1 exclusive; None for an empty mask
    mask_area_px: int = 0
    mask_fraction: float = 0.0
    error: str | None = None
    classes: np.ndarray | None = field(default=None, repr=False)  # uint8 (height, width) class ids; mask_classes only
    class_area_px: dict[str, int] | None = None  # pixels per defect class; mask_classes only

    @property
    def ok(self) -> bool:
        """True when the image was scored (no `error`)."""
        return self.error is None


@dataclass(frozen=True)
class InMemory:
    """An image handed over in memory: uint8 (H, W, 3) RGB and how messages name it."""

    label: str
    image: np.ndarray


def as_rgb(value: Any, label: str) -> np.ndarray:
    """A PIL image or a numpy array (H x W grey, H x W x 1/3/4, uint8) as uint8 (H, W, 3) RGB, converted as a file's
    pixels are (`raydefect.imaging.rgb_array`: alpha composited onto black, 16-bit scaled by its full range)."""
    if not isinstance(value, np.ndarray):
        return rgb_array(value)
    if value.dtype != np.uint8:
        raise DataError(
            f"{label}: an array of dtype {value.dtype}; pass uint8 pixels 0-255 (e.g. (x * 255).astype(np.uint8))"
        )
    if value.ndim == 3 and value.shape[2] == 1:
        value = value[:, :, 0]
    if not (value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (3, 4))) or min(value.shape[:2]) < 1:
        raise DataError(f"{label}: an array of shape {value.shape}; pass (H, W), (H, W, 3) or (N, H, W, 3) uint8")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[value.ndim if value.ndim == 2 else value.shape[2]]
    return rgb_array(Image.fromarray(np.ascontiguousarray(value), mode=mode))


def is_pil(value: Any) -> bool:
    return isinstance(value, Image.Image)


def expand_inputs(source: Any, extensions: Sequence[str]) -> list[str | InMemory]:
    """What `Model.predict` was given, as a flat list in order: file paths (folders and globs listed as `raydefect
    predict` lists them) and in-memory images."""
    if isinstance(source, (str, os.PathLike)):
        return list(list_images(os.fspath(source), extensions, name="predict(x)"))
    if is_pil(source):
        return [InMemory("image", as_rgb(source, "image"))]
    if isinstance(source, np.ndarray):
        if source.ndim == 4:
            return [InMemory(f"array[{i}]", as_rgb(a, f"array[{i}]")) for i, a in enumerate(source)]
        return [InMemory("array", as_rgb(source, "array"))]
    if isinstance(source, Sequence):
        items: list[str | InMemory] = []
        for i, value in enumerate(source):
            if isinstance(value, (str, os.PathLike)):
                items += list_images(os.fspath(value), extensions, name=f"predict(x[{i}])")
            elif is_pil(value) or isinstance(value, np.ndarray):
                items.append(InMemory(f"x[{i}]", as_rgb(value, f"x[{i}]")))
            else:
                raise DataError(f"x[{i}]: a {type(value).__name__}; pass paths, PIL images or numpy arrays")
        if not items:
            raise DataError("predict(x): an empty list; pass at least one image")
        return items
    raise DataError(
        f"predict(x): a {type(source).__name__}; pass a path, a folder, a glob, a PIL image, a numpy array or a list"
    )


def to_prediction(item: Decoded, scored: Scored | None, meta: ArtifactMeta, path: str | None) -> Prediction:
    width, height = item.size
    if scored is None:
        return Prediction(path, width, height, None, None, None, error=item.error)
    return Prediction(
        path=path,
        width=width,
        height=height,
        defect_score=scored.score,
        is_defect=bool(scored.is_defect),
        defect_class=scored.defect_class,
        class_scores={name: float(p) for name, p in zip(meta.class_names, scored.probs, strict=True)},
        mask=scored.mask.mask,
        bbox=None if scored.mask.bbox is None else tuple(int(v) for v in scored.mask.bbox),  # type: ignore[arg-type]
        mask_area_px=int(scored.mask.area_px),
        mask_fraction=float(scored.mask.fraction),
        classes=scored.classes,
        class_area_px=None if scored.classes is None else class_areas(scored.classes, list(meta.class_names)),
    )


class Model:
    """A loaded model artifact, ready to predict. Make one with `load_model`."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    @property
    def meta(self) -> ArtifactMeta:
        """model.yaml: backbone, image size, geometry, class names, thresholds, validation metrics."""
        return self.predictor.meta

    @property
    def model_id(self) -> str:
        return self.meta.model_id

    @property
    def class_names(self) -> list[str]:
        """Index = class id; "normal" is 0."""
        return list(self.meta.class_names)

    @property
    def thresholds(self) -> dict[str, float]:
        """The image threshold (on the defect score) and the pixel threshold (on the mask probability)."""
        return {"image": self.meta.image_threshold, "pixel": self.meta.pixel_threshold}

    @property
    def device(self) -> str:
        return str(self.predictor.device)

    def __repr__(self) -> str:
        return f"Model({self.model_id}, {self.meta.backbone}, classes={self.class_names}, device={self.device})"

    def predict(
        self,
        x: Any,
        *,
        batch_size: int = 16,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        workers: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> list[Prediction]:
        """Predict on `x` and return one `Prediction` per image, in order (a folder or glob in path order).

        x: an image file, a folder (searched recursively), a glob (``**`` recurses), a PIL image, a numpy array
        (H x W, H x W x 3 or a batch N x H x W x 3, uint8 RGB), or a list of any of these. threshold /
        pixel_threshold replace the model's stored image / pixel thresholds for this call, as ``raydefect predict
        --threshold / --pixel-threshold`` do. workers: decoding threads (default: half the cores, 1 to 4).
        """
        if batch_size < 1:
            raise DataError(f"batch_size {batch_size}: must be >= 1")
        items = expand_inputs(x, extensions)
        meta = with_thresholds(self.meta, threshold, pixel_threshold)
        pre = Preprocessor(meta)
        tiled = meta.geometry.tiled

        def decode(item: str | InMemory) -> Decoded:
            if isinstance(item, str):
                return decode_for_model(item, pre, max_pixels)
            return Decoded(item.label, image=item.image, x=None if tiled else pre(item.image))

        workers = workers or default_workers()
        results: list[Prediction] = []
        with cpu_threads(self.predictor.device.type == "cpu", workers), ThreadPoolExecutor(workers) as pool:
            for batch in scored_batches(self.predictor, meta, pool, items, decode, batch_size):
                for item, scored in batch:
                    source = items[len(results)]
                    path = source if isinstance(source, str) else None
                    results.append(to_prediction(item, scored, meta, path))
        return results


def load_model(path: str | Path, *, device: str = "auto", precision: str = "auto") -> Model:
    """Load a model artifact: the ``model/`` folder a training writes (``runs/<name>/model``), its model.yaml, or
    the run folder that holds it. device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:N]"``; precision:
    ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"fp32"`` or ``"bf16"``. A missing or damaged artifact raises
    `raydefect.errors.ArtifactError`."""
    from raydefect.models.artifact import resolve_artifact_dir

    return Model(Predictor(resolve_artifact_dir(path), device=device, precision=precision))


def read_scores(
    out: str | Path, *, model_id: str | None = None, latest: bool = True, columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """The scores `raydefect score --out OUT` committed, as a pandas DataFrame (one row per image: path,
    defect_score, is_defect, defect_class, class_scores, mask_png, bbox, error, class_area_px, ...; docs: the scores
    contract). Map columns (class_scores, class_area_px) hold lists of (key, value) pairs: ``dict(row.class_area_px)``;
    `decode_mask` turns a ``mask_png`` into class ids.

    OUT is a local folder or an s3:// / gs:// address. latest: only the newest row per (model_id, path) (False
    keeps every run's row). model_id: one model's rows when several models scored into OUT."""
    from raydefect.scoring.results import read_scores as read_table

    return read_table(os.fspath(out), model_id=model_id, latest=latest, columns=columns).to_pandas()


def decode_mask(mask_png: bytes) -> tuple[np.ndarray, list[str] | None]:
    """A scores row's ``mask_png`` -> (uint8 class ids at the image's size, class names). A ``model.mask_classes``
    model's indexed PNG gives each pixel's class id (0 = normal, ``i`` = ``names[i]``); a binary model's mask gives
    0 / 1 and names None."""
    return decode_class_png(bytes(mask_png))


def load_dataset(path: str | Path) -> Dataset:
    """Open a dataset `raydefect prepare --out PATH` wrote (its folder, manifest.parquet or dataset.yaml):
    ``.class_names``, ``.counts()``, ``.frame(split)`` (pandas, absolute paths). A missing or damaged dataset
    raises `raydefect.errors.DataError`."""
    return open_dataset(path)
