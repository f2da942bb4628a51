"""The batch scorer: plain functions and classes over Arrow tables and numpy batches. Ray Data runs them as its
stages (`raydefect.pipelines.score`); `BatchScorer` chains them in one process (tests, small jobs).

Stages and the batch each one hands on::

    listing    path, size, mtime_ns, error                     (size/mtime -1 and error "" when unknown / none)
    decode     + sha1, width, height, brightness, contrast, pixels uint8 [N, S, S, 3]   CPU: read, hash, decode, resize
    model      + defect_score, class_probs [N, C], mask_prob [N, S, S]   (pixels dropped)   actor: GPU or CPU
                 (+ pixel_class_probs [N, C, S, S] for a ``model.mask_classes`` model)
    finish     -> a `SCORE_SCHEMA` table                          CPU: masks at each image's own size, PNG, bbox

With per-pixel classes the finish stage writes each mask as class ids in an indexed PNG (`imaging.encode_class_png`:
the overlays' colours, the class names in a text chunk) and the pixels per class in ``class_area_px``.

Under the ``tiles`` geometry the decode stage hands on each whole image at ``data.scale`` (``pixels`` is then a
column of uint8 [h, w, 3] arrays of their own sizes), the model stage cuts, batches and stitches their tiles
(`geometry.predict_tiled`, at most ``batch_size`` tiles in flight) and ``mask_prob`` holds each image's stitched map.

The pixels cross stages as uint8 at the model's size (a quarter of float32) and are normalised next to the model:
on the GPU when there is one, else with the very `Preprocessor.normalize` that `inference` uses. Every per-image
failure (unreadable, corrupt, truncated, too large, undecodable in any way) becomes the row's ``error`` and the row
goes on without pixels: one bad image never fails a batch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from raydefect.errors import ImageError, ImageTooLargeError
from raydefect.geometry import predict_tiled, scale_image
from raydefect.imaging import DEFAULT_MAX_PIXELS, decode_image_sized, encode_class_png, image_stats
from raydefect.inference import (
    PIXEL_CLASS_OUTPUT,
    Preprocessor,
    class_areas,
    class_ids,
    decide,
    has_pixel_classes,
    postprocess,
    resize_rgb,
)
from raydefect.scoring.keys import contains, first_occurrence, key_digests, read_error
from raydefect.scoring.schema import SCORE_SCHEMA
from raydefect.scoring.storage import Storage

if TYPE_CHECKING:
    from raydefect.models.artifact import ArtifactMeta, LoadedModel

LISTING_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("error", pa.string()),
    ]
)


def listing_table(rows: Sequence[tuple], errors: Sequence[str] | None = None) -> pa.Table:
    """(location, size, mtime_ns[, error]) rows -> a listing batch."""
    if errors is None:
        errors = [r[3] if len(r) > 3 else "" for r in rows]
    return pa.table(
        {
            "path": pa.array([r[0] for r in rows], pa.string()),
            "size": pa.array([int(r[1]) for r in rows], pa.int64()),
            "mtime_ns": pa.array([int(r[2]) for r in rows], pa.int64()),
            "error": pa.array(list(errors), pa.string()),
        },
        schema=LISTING_SCHEMA,
    )


def stat_locations(locations: Sequence[str], storage: Storage) -> pa.Table:
    """Manifest entries -> a listing batch (missing files keep their row, with the reason as error)."""
    stats = storage.stat(locations)
    return listing_table(
        [(loc, s, m) for loc, (s, m, _) in zip(locations, stats, strict=True)], [e for _, _, e in stats]
    )


def drop_known(table: pa.Table, known: np.ndarray | None, model_id: str) -> pa.Table:
    """Stat-key incremental filter: drop rows this model already scored (`known`: sorted digests) and repeats of a
    row within the batch."""
    if table.num_rows == 0:
        return table
    paths = table.column("path").to_pylist()
    digests = key_digests(
        model_id, paths, table.column("size").to_pylist(), table.column("mtime_ns").to_pylist(), [], "stat"
    )
    keep = first_occurrence(digests)
    if known is not None:
        keep &= ~contains(known, digests)
    return table if keep.all() else table.filter(pa.array(keep))


class Decoder:
    """listing batch -> decoded batch: read bytes, sha1, decode (EXIF, modes, bombs), resize to the model's size.

    With ``key_mode="hash"`` and `known` digests, files whose content this model already scored are dropped here
    (the bytes must be read to know).
    """

    def __init__(
        self,
        image_size: int,
        storage: Storage | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        key_mode: str = "stat",
        model_id: str = "",
        known: np.ndarray | None = None,
        reduced_jpeg: bool = True,
        geometry: str = "square",
        scale: float = 1.0,
    ) -> None:
        self.image_size = int(image_size)
        self.geometry = geometry
        self.scale = float(scale)
        self.reduce = bool(reduced_jpeg)
        self.storage = storage or Storage()
        self.max_pixels = int(max_pixels)
        self.key_mode = key_mode
        self.model_id = model_id
        self.known = known

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        n, s = table.num_rows, self.image_size
        paths = table.column("path").to_pylist()
        errors = [e or "" for e in table.column("error").to_pylist()]
        pixels = np.zeros((n, s, s, 3), np.uint8) if self.geometry != "tiles" else _ragged(n, 3)
        width = np.zeros(n, np.int32)
        height = np.zeros(n, np.int32)
        stats = np.full((n, 2), np.nan, np.float32)  # brightness, contrast of each decoded image
        sha1 = [""] * n
        data: list[bytes | None] = [None] * n
        for i, loc in enumerate(paths):
            if errors[i]:
                continue
            try:
                data[i] = self.storage.read_bytes(loc)
            except Exception as e:  # recorded, never fatal; a network error is scored again by the next run
                errors[i] = read_error(e)
                continue
            sha1[i] = hashlib.sha1(data[i]).hexdigest()
        keep = np.ones(n, bool)
        if self.key_mode == "hash":  # content key: known only now that the bytes are read
            digests = key_digests(self.model_id, paths, [], [], sha1, "hash")
            keep = first_occurrence(digests)
            if self.known is not None:
                keep &= ~contains(self.known, digests)
        for i in np.flatnonzero(keep):
            if data[i] is not None:
                errors[i] = self._decode(data[i], paths[i], i, pixels, width, height, stats)
                data[i] = None
        out = {
            "path": np.asarray(paths, dtype=object),
            "size": np.asarray(table.column("size").to_numpy(zero_copy_only=False), np.int64),
            "mtime_ns": np.asarray(table.column("mtime_ns").to_numpy(zero_copy_only=False), np.int64),
            "sha1": np.asarray(sha1, dtype=object),
            "width": width,
            "height": height,
            "error": np.asarray(errors, dtype=object),
            "brightness": stats[:, 0],
            "contrast": stats[:, 1],
            "pixels": pixels,
        }
        if not keep.all():
            out = {k: v[keep] for k, v in out.items()}
        return out

    def _decode(
        self,
        data: bytes,
        loc: str,
        i: int,
        pixels: np.ndarray,
        width: np.ndarray,
        height: np.ndarray,
        stats: np.ndarray,
    ) -> str:
        try:
            if self.geometry == "tiles":  # whole, at data.scale: the model stage cuts the tiles
                image, (w, h) = decode_image_sized(data, "RGB", loc, self.max_pixels, None)
                stats[i] = image_stats(image)
                pixels[i] = scale_image(image, self.scale)
                height[i], width[i] = h, w
                return ""
            reduce_to = self.image_size if self.reduce else None
            image, (w, h) = decode_image_sized(data, "RGB", loc, self.max_pixels, reduce_to)
            stats[i] = image_stats(image)
            pixels[i] = resize_rgb(image, self.image_size, self.geometry)
        except ImageTooLargeError as e:  # the guard's setting is score's own, not prepare's --max-pixels
            return f"{e.reason}; score.max_image_pixels={self.max_pixels} (raise it to score such images)"
        except ImageError as e:
            return e.reason
        except Exception as e:  # Pillow raises odd types on malformed files; one image must never fail the job
            return f"cannot decode: {type(e).__name__}: {e}"
        height[i], width[i] = h, w
        return ""


class ModelStep:
    """decoded batch -> + defect_score, class_probs, mask_prob (pixels dropped). Wraps `inference.make_predictor`:
    PyTorch, or ONNX Runtime on CPU (``engine``, see `inference.resolve_engine`). ``precision="auto"`` is bulk
    scoring's (`inference.resolve_precision`): bf16 on GPUs and on CPUs with native bf16, else fp32.

    ``threads`` sets the intra-op threads on CPU (Ray gives each worker OMP_NUM_THREADS = its reserved CPUs, which
    would leave a CPU model actor on one core).
    """

    def __init__(
        self,
        model: LoadedModel | str,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        engine: str = "torch",
    ) -> None:
        import torch

        from raydefect.inference import make_predictor, resolve_device, resolve_scoring

        if threads:
            torch.set_num_threads(int(threads))
        _, precision = resolve_scoring(engine, resolve_device(device), precision)
        self.predictor = make_predictor(model, device=device, precision=precision, engine=engine, threads=threads)
        self.engine = self.predictor.engine
        self.meta = self.predictor.meta
        self.pre = Preprocessor(self.meta)
        self._scale = self._shift = None
        if self.predictor.device.type == "cuda":
            self._scale = torch.from_numpy(self.pre._scale).to(self.predictor.device)
            self._shift = torch.from_numpy(self.pre._shift).to(self.predictor.device)

    def _normalize(self, pixels: np.ndarray) -> Any:
        import torch

        if self._scale is None:  # CPU: exactly what `inference.Preprocessor` does, image by image
            return np.stack([self.pre.normalize(p) for p in pixels])
        x = torch.from_numpy(np.ascontiguousarray(pixels)).pin_memory()
        x = x.to(self.predictor.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return x * self._scale - self._shift

    def _predict(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        if self._scale is None:
            return self.predictor.predict(self._normalize(pixels))
        # GPU: masks come back as float16, half the bytes through the copy, the object store and the finish tasks
        return self.predictor.predict(self._normalize(pixels), half_masks=True)

    def _call_tiled(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch["pixels"]
        n, c = len(pixels), self.meta.num_classes
        ok = [i for i in range(n) if not batch["error"][i]]
        score, probs, mask = np.zeros(n, np.float32), np.zeros((n, c), np.float32), _ragged(n, 2)
        if ok:
            tiled = predict_tiled(
                [np.asarray(pixels[i], np.uint8) for i in ok],
                dataclasses.replace(self.meta.geometry, scale=1.0),  # the decode stage scaled them already
                self.pre.normalize_tiles,
                self.predictor.predict,
                batch_size=max(n, 1),
            )
            for i, t in zip(ok, tiled, strict=True):
                score[i], probs[i], mask[i] = t.defect_score, t.class_probs, t.mask_prob
        result = {k: v for k, v in batch.items() if k != "pixels"}
        result.update(defect_score=score, class_probs=probs, mask_prob=mask)
        return result

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.meta.geometry.tiled:
            return self._call_tiled(batch)
        pixels = batch["pixels"]
        n, s, c = len(pixels), self.meta.image_size, self.meta.num_classes
        ok = np.asarray([not e for e in batch["error"]], bool)
        if n and ok.all():  # the usual batch: the predictor's arrays as they are, no copy
            out = self._predict(pixels)
        else:  # failed images get zeros
            out = {"defect_score": np.zeros(n, np.float32), "class_probs": np.zeros((n, c), np.float32)}
            out["mask_prob"] = np.zeros((n, s, s), np.float32)
            if has_pixel_classes(self.meta):
                out[PIXEL_CLASS_OUTPUT] = np.zeros((n, c, s, s), np.float32)
            if ok.any():
                part = self._predict(pixels[ok])
                for key, value in part.items():
                    out[key] = out[key].astype(value.dtype, copy=False)
                    out[key][ok] = value
        result = {k: v for k, v in batch.items() if k != "pixels"}
        result.update(out)
        return result


def _ragged(n: int, ndim: int) -> np.ndarray:
    """An object array of ``n`` empty ``ndim``-D arrays: a column of arrays of each image's own size."""
    out = np.empty(n, dtype=object)
    for i in range(n):
        out[i] = np.zeros((0,) * ndim, np.uint8 if ndim == 3 else np.float32)
    return out


@functools.lru_cache(maxsize=64)
def empty_class_png(width: int, height: int, class_names: tuple[str, ...]) -> bytes:
    """The class mask of an image without defect pixels (most images of a nightly run), encoded once per size."""
    return encode_class_png(np.zeros((height, width), np.uint8), class_names)


def finish(
    batch: dict[str, np.ndarray],
    meta: ArtifactMeta,
    run_id: str,
    node_id: str | None = None,
    scored_at: dt.datetime | None = None,
) -> pa.Table:
    """model batch -> rows of `SCORE_SCHEMA`: thresholds, class, and the mask at each image's own resolution."""
    n = len(batch["path"])
    scored_at = scored_at or dt.datetime.now(dt.timezone.utc)
    cols: dict[str, list[Any]] = {name: [] for name in SCORE_SCHEMA.names}
    class_names = list(meta.class_names)
    pixel_classes = batch.get(PIXEL_CLASS_OUTPUT)
    for i in range(n):
        error = batch["error"][i] or None
        size, mtime = int(batch["size"][i]), int(batch["mtime_ns"][i])
        cols["path"].append(str(batch["path"][i]))
        cols["size"].append(size if size >= 0 else None)
        cols["mtime_ns"].append(mtime if mtime >= 0 else None)
        cols["sha1"].append(batch["sha1"][i] or None)
        cols["error"].append(error)
        if error:
            for name in (
                "width", "height", "defect_score", "is_defect", "defect_class", "class_scores",
                "mask_png", "mask_area_px", "mask_fraction", "bbox", "brightness", "contrast", "class_area_px",
            ):  # fmt: skip
                cols[name].append(None)
            continue
        w, h = int(batch["width"][i]), int(batch["height"][i])
        mode = meta.geometry.mode
        m = postprocess(batch["mask_prob"][i], w, h, meta.pixel_threshold, encode=pixel_classes is None, geometry=mode)
        png, areas = m.png, None
        if pixel_classes is not None:
            ids = class_ids(batch["mask_prob"][i], pixel_classes[i], w, h, meta.pixel_threshold, mode, m.mask)
            png = encode_class_png(ids, class_names) if m.area_px else empty_class_png(w, h, tuple(class_names))
            areas = list(class_areas(ids, class_names).items()) if m.area_px else []
        is_defect, defect_class = decide(batch["defect_score"][i], batch["class_probs"][i], meta)
        cols["width"].append(w)
        cols["height"].append(h)
        cols["defect_score"].append(float(batch["defect_score"][i]))
        cols["is_defect"].append(is_defect)
        cols["defect_class"].append(defect_class)
        cols["class_scores"].append(list(zip(class_names, (float(p) for p in batch["class_probs"][i]), strict=True)))
        cols["mask_png"].append(png)
        cols["class_area_px"].append(areas)
        cols["mask_area_px"].append(m.area_px)
        cols["mask_fraction"].append(m.fraction)
        cols["bbox"].append(list(m.bbox) if m.bbox is not None else None)
        for name in ("brightness", "contrast"):  # absent from batches of an older stage: null
            value = batch[name][i] if name in batch else np.nan
            cols[name].append(float(value) if np.isfinite(value) else None)
    cols["model_id"] = [meta.model_id] * n
    cols["run_id"] = [run_id] * n
    cols["scored_at"] = [scored_at] * n
    nodes = batch.get("node_id")
    cols["node_id"] = [str(v) for v in nodes] if nodes is not None and node_id is None else [node_id] * n
    return pa.table(
        {name: pa.array(cols[name], SCORE_SCHEMA.field(name).type) for name in SCORE_SCHEMA.names}, schema=SCORE_SCHEMA
    )


class BatchScorer:
    """The three stages in one process: ``score(locations) -> SCORE_SCHEMA table``. No Ray, no incremental logic."""

    def __init__(
        self,
        model: LoadedModel | str,
        run_id: str = "local",
        storage: Storage | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        device: str = "auto",
        precision: str = "auto",
        engine: str = "torch",
        reduced_jpeg: bool = True,
    ) -> None:
        self.step = ModelStep(model, device=device, precision=precision, engine=engine)
        self.storage = storage or Storage()
        meta = self.step.meta
        g = meta.geometry
        self.decoder = Decoder(
            meta.image_size, self.storage, max_pixels, reduced_jpeg=reduced_jpeg, geometry=g.mode, scale=g.scale
        )
        self.run_id = run_id

    def score(self, locations: Sequence[str], batch_size: int = 32) -> pa.Table:
        parts = []
        for start in range(0, len(locations), batch_size):
            listing = stat_locations(list(locations[start : start + batch_size]), self.storage)
            parts.append(finish(self.step(self.decoder(listing)), self.step.meta, self.run_id))
        return pa.concat_tables(parts) if parts else SCORE_SCHEMA.empty_table()
