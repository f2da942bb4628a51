"""`raydefect predict`: a folder (or glob) of images -> overlay PNGs and scores.csv, on one machine, no Ray.

A plain batched loop over the core inference API (`raydefect.inference`): decoding runs in a small thread pool one
batch ahead of the model (Pillow releases the GIL while it decodes and resizes), the model sees whole batches, and
overlays are rendered and written by the same pool while the next batch runs. One unreadable image becomes a row
with its `error`, never a crash. Rows are written in path order, so two runs over the same files give the same CSV.

    out/scores.csv                  one row per image (COLUMNS, then p_<class> per class)
    out/overlays/<relative>.png     original | prediction, for every readable image (unless overlays=False)
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raydefect import console
from raydefect.config import IMAGE_EXTENSIONS
from raydefect.data.pool import cpu_workers
from raydefect.errors import DataError, ImageError, OutputError
from raydefect.imaging import DEFAULT_MAX_PIXELS, decode_image
from raydefect.inference import (
    MaskResult,
    Predictor,
    Preprocessor,
    class_areas,
    class_ids,
    decide,
    infer_images,
    postprocess,
)
from raydefect.inference.postprocess import format_bbox
from raydefect.paths import glob_files, has_glob, printable_path
from raydefect.viz.overlay import class_colour, render_overlay, save_png

if TYPE_CHECKING:
    from raydefect.models.artifact import ArtifactMeta, LoadedModel

SCORES_CSV = "scores.csv"
OVERLAY_DIR = "overlays"
#: scores.csv columns before the per-class probabilities (p_<class>) and after them.
COLUMNS = ("path", "width", "height", "defect_score", "is_defect", "defect_class")
TAIL_COLUMNS = ("mask_area_px", "mask_fraction", "bbox", "overlay", "error")


def list_images(
    spec: str | Path | Sequence[str | Path], extensions: Sequence[str] = IMAGE_EXTENSIONS, *, name: str = "--images"
) -> list[str]:
    """Image files from a folder (recursive), a glob (``**`` recurses) or a file, or a list of those; sorted, unique.

    Files with other extensions are left out of folders and globs (a folder holds notes, masks in other formats...);
    a file named explicitly is always taken, so that a bad one becomes an error row rather than silently nothing.
    `name` is what the error messages call the input (the CLI option, or the API's argument).
    """
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    exts = tuple(e.lower() for e in extensions)
    found: list[str] = []
    for item in specs:
        text = os.path.expanduser(str(item))
        if has_glob(text):
            matches = [m for m in glob_files(text) if not os.path.isdir(m)]  # a bad link gets an error row
            found += [m for m in matches if m.lower().endswith(exts)]
        elif os.path.isdir(text):
            for root, dirs, files in os.walk(text):
                dirs.sort()
                found += [os.path.join(root, f) for f in files if f.lower().endswith(exts)]
        elif os.path.isfile(text):
            found.append(text)
        else:
            raise DataError(f"{name} {item}: no such file or folder; pass a folder, a quoted glob or an image file")
    unique = sorted(dict.fromkeys(os.path.abspath(p) for p in found))  # absolute, as the scores table holds them
    if not unique:
        raise DataError(
            f"{name} {', '.join(str(s) for s in specs)}: no image files found (extensions {', '.join(exts)}); "
            "check the path, or quote a glob like 'photos/**/*.png'"
        )
    return unique


def overlay_names(paths: Sequence[str]) -> list[str]:
    """Overlay file names relative to the overlay folder: each image's path below the inputs' common folder, as .png.

    Keeping the sub-folders keeps ``a/x.png`` and ``b/x.png`` apart; ``x.jpg`` and ``x.png`` in one folder get their
    old extension in the name (``x.jpg.png``) so they do not collide either.
    """
    if not paths:
        return []
    absolute = [os.path.abspath(p) for p in paths]
    common = os.path.commonpath([os.path.dirname(p) for p in absolute])
    rel = [os.path.relpath(p, common) for p in absolute]
    stems = [os.path.splitext(r)[0] for r in rel]
    seen: dict[str, int] = {}
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
    return [(r if seen[s] > 1 else s) + ".png" for r, s in zip(rel, stems, strict=True)]


@dataclass
class Decoded:
    """One input after decoding: the model input, or the reason it could not be read."""

    path: str
    image: np.ndarray | None = None  # uint8 HxWx3, kept for the overlay
    x: np.ndarray | None = None  # float32 3xSxS (None under tiles: `infer_images` cuts them)
    error: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height); (0, 0) when unreadable."""
        return (0, 0) if self.image is None else (int(self.image.shape[1]), int(self.image.shape[0]))


def decode_for_model(path: str, pre: Preprocessor, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode + preprocess one file; a user-level problem (corrupt, too large, unreadable) becomes `error`."""
    try:
        image = decode_image(path, mode="RGB", path=path, max_pixels=max_pixels)
    except ImageError as e:
        return Decoded(path, error=e.reason + (f" ({e.fix})" if e.fix else ""))
    except OSError as e:  # permissions, vanished file, I/O error
        return Decoded(path, error=f"cannot read: {e.strerror or e}")
    return Decoded(path, image=image, x=None if pre.geometry == "tiles" else pre(image))


def batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def prefetched(
    pool: ThreadPoolExecutor, batches: Sequence[Sequence[Any]], decode: Callable[[Any], Decoded]
) -> Iterator[list[Decoded]]:
    """Decoded batches in order, the next one decoding in `pool` while the caller works on the current one."""
    pending: list[Future] | None = None
    for i in range(len(batches)):
        current = pending if pending is not None else [pool.submit(decode, p) for p in batches[i]]
        pending = [pool.submit(decode, p) for p in batches[i + 1]] if i + 1 < len(batches) else None
        yield [f.result() for f in current]


def with_thresholds(meta: ArtifactMeta, image: float | None = None, pixel: float | None = None) -> ArtifactMeta:
    """The metadata with the image and/or pixel threshold replaced (None keeps the stored one)."""
    for name, value in (("--threshold", image), ("--pixel-threshold", pixel)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise DataError(f"{name} {value}: must be a number in [0, 1]")
    thresholds = {
        "image": meta.image_threshold if image is None else float(image),
        "pixel": meta.pixel_threshold if pixel is None else float(pixel),
    }
    return replace(meta, thresholds=thresholds)


def class_columns(class_names: Sequence[str]) -> list[str]:
    """``p_<class>`` column names (class_key: lower case, safe characters, unique)."""
    from raydefect.metrics.summary import class_key

    taken: set[str] = set()
    return [f"p_{class_key(name, taken)}" for name in class_names]


def default_workers() -> int:
    """Decode/overlay threads: half the cores (1 on a 2-core laptop), at most 4."""
    return max(1, min(4, cpu_workers() // 2))


@contextlib.contextmanager
def cpu_threads(on_cpu: bool, workers: int) -> Iterator[None]:
    """On CPU, give PyTorch the cores the decode/overlay threads leave free, and restore its setting afterwards.

    PyTorch's intra-op threads spin while they wait; when they share cores with busy Python threads the forward
    slows down many times (on the 2-core development machine: 10 images/s instead of 68 with overlays).
    """
    if not on_cpu:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, cpu_workers() - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class PredictSummary:
    images: int = 0
    defects: int = 0
    errors: int = 0
    seconds: float = 0.0
    scores_csv: Path | None = None
    overlay_dir: Path | None = None
    per_class: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _open_csv(path: Path):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w", newline="", encoding="utf-8")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}; choose a writable --out") from None


def _error_row(item: Decoded, n_probs: int) -> list[Any]:
    """The scores.csv row of an image that could not be read: its path and the error, the rest blank."""
    blanks = len(COLUMNS) - 1 + n_probs + len(TAIL_COLUMNS) - 1
    return [printable_path(item.path), *[""] * blanks, printable_path(item.error or "")]


@dataclass(frozen=True)
class Scored:
    """One image's model outputs turned into decisions: its score, class probabilities, mask and verdict."""

    score: float
    probs: Any
    mask: MaskResult
    is_defect: bool
    defect_class: str
    classes: np.ndarray | None = None  # model.mask_classes: class ids HxW at the image's resolution

    @classmethod
    def of(cls, item: Decoded, result: dict[str, np.ndarray], k: int, meta: ArtifactMeta) -> Scored:
        score = float(result["defect_score"][k])
        probs = result["class_probs"][k]
        width, height = item.size
        mode = meta.geometry.mode
        mask = postprocess(result["mask_prob"][k], width, height, meta.pixel_threshold, encode=False, geometry=mode)
        is_defect, defect_class = decide(score, probs, meta)
        classes = None
        if "pixel_class_probs" in result:
            probs_k = result["pixel_class_probs"][k]
            classes = class_ids(result["mask_prob"][k], probs_k, width, height, meta.pixel_threshold, mode, mask.mask)
        return cls(score, probs, mask, is_defect, defect_class, classes)

    def row(self, item: Decoded, overlay: str) -> list[Any]:
        """Its scores.csv row (`COLUMNS`, the class probabilities, `TAIL_COLUMNS`)."""
        width, height = item.size
        return [
            printable_path(item.path),
            width,
            height,
            f"{self.score:.6f}",
            int(self.is_defect),
            self.defect_class,
            *[f"{p:.6f}" for p in self.probs],
            self.mask.area_px,
            f"{self.mask.fraction:.6f}",
            format_bbox(self.mask.bbox),
            overlay,
            "",
        ]

    def class_area_cells(self, meta: ArtifactMeta) -> list[str]:
        """`area_columns`' cells: pixels per defect class as JSON (``{"scratch": 120}``)."""
        if not area_columns(meta):
            return []
        return [json.dumps(class_areas(self.classes, list(meta.class_names))) if self.classes is not None else ""]


def area_columns(meta: ArtifactMeta) -> list[str]:
    """scores.csv's last column for a ``model.mask_classes`` model: ``class_area_px``; none otherwise."""
    return ["class_area_px"] if getattr(getattr(meta, "model", None), "mask_classes", False) else []


def _predict_batch(predictor: Any, ok: list[Decoded], batch_size: int) -> dict[str, Any] | None:
    """The decoded images' predictions: their preprocessed inputs in one batch, or under ``tiles`` their tiles."""
    if not ok:
        return None
    if predictor.meta.geometry.tiled:
        return infer_images(predictor, [d.image for d in ok], batch_size)
    return predictor.predict(np.stack([d.x for d in ok]))


def scored_batches(
    predictor: Any,
    meta: ArtifactMeta,
    pool: ThreadPoolExecutor,
    items: Sequence[Any],
    decode: Callable[[Any], Decoded],
    batch_size: int,
) -> Iterator[list[tuple[Decoded, Scored | None]]]:
    """`items` decoded in `pool` one batch ahead, run through the model in its geometry and decided with `meta`'s
    thresholds: per batch, each item with its `Scored` (None when it could not be read: `Decoded.error` says why).

    The one loop behind `predict_images` and the Python API (`raydefect.api`), so both give the same numbers.
    """
    for batch in prefetched(pool, list(batched(items, batch_size)), decode):
        ok = [d for d in batch if d.error is None]
        result = _predict_batch(predictor, ok, batch_size)
        scored: list[tuple[Decoded, Scored | None]] = []
        k = 0  # the item's row in `result`, which holds the readable items only
        for item in batch:
            if item.error is None:
                assert result is not None
                scored.append((item, Scored.of(item, result, k, meta)))
                k += 1
            else:
                scored.append((item, None))
        yield scored


def predict_images(
    model: str | Path | LoadedModel | Predictor,
    images: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    batch_size: int = 16,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    overlays: bool = True,
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> PredictSummary:
    """Score every image and write ``out/scores.csv`` (+ ``out/overlays/``); returns counts and timing.

    model: an artifact folder, a loaded model or a ready `Predictor`. threshold / pixel_threshold override the
    artifact's stored image / pixel thresholds. workers: decode/overlay threads (`default_workers`); on CPU,
    PyTorch gets the remaining cores while this runs (`cpu_threads`).
    """
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: must be >= 1")
    start = time.perf_counter()
    paths, predictor = _open_inputs(model, images, extensions, device, precision)
    meta = with_thresholds(predictor.meta, threshold, pixel_threshold)
    pre = Preprocessor(meta)
    out = Path(out)
    summary = PredictSummary(scores_csv=out / SCORES_CSV, overlay_dir=out / OVERLAY_DIR if overlays else None)
    summary.per_class = dict.fromkeys(meta.class_names, 0)
    workers = workers or default_workers()

    def decode(path: str) -> Decoded:
        return decode_for_model(path, pre, max_pixels)

    console.info(
        f"predicting {console.count(len(paths), 'image')} with model {meta.model_id} "
        f"({meta.backbone}, {pre.image_size} px)"
    )
    handle = _open_csv(out / SCORES_CSV)
    cpu = getattr(getattr(predictor, "device", None), "type", "cpu") == "cpu"
    threads = cpu_threads(cpu, workers)
    with (
        handle,
        threads,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="predict") as pool,
        console.progress("predict", len(paths)) as shown,
    ):
        rows = _ScoresWriter(handle, meta, summary, _OverlayWriter(out, paths, pool) if overlays else None)
        for batch in scored_batches(predictor, meta, pool, paths, decode, batch_size):
            rows.write_batch(batch)
            handle.flush()
            rows.drain_overlays(4 * batch_size)  # bound memory: overlays of older batches must be on disk
            shown.update(len(batch))
        rows.drain_overlays(0)
    summary.seconds = time.perf_counter() - start
    return summary


def _open_inputs(
    model: str | Path | LoadedModel | Predictor,
    images: str | Path | Sequence[str | Path],
    extensions: Sequence[str],
    device: str,
    precision: str,
) -> tuple[list[str], Predictor]:
    """The images to score and the predictor; a wrong model folder fails before the image search."""
    if isinstance(model, (str, Path)):
        from raydefect.models.artifact import resolve_artifact_dir

        model = resolve_artifact_dir(model)  # a wrong --model fails before the image search
    paths = list_images(images, extensions)
    predictor = model if isinstance(model, Predictor) else Predictor(model, device=device, precision=precision)
    return paths, predictor


class _OverlayWriter:
    """Overlay PNGs under ``out/overlays/``, written in the pool while the next batches are scored."""

    def __init__(self, out: Path, paths: Sequence[str], pool: ThreadPoolExecutor) -> None:
        self.out = out
        self.names = dict(zip(paths, overlay_names(paths), strict=True))
        self.pool = pool
        self.pending: list[Future] = []

    def submit(self, item: Decoded, scored: Scored, colour: tuple[int, int, int]) -> str:
        """Queue the item's overlay; return its path relative to the output folder, for scores.csv."""
        self.pending.append(self.pool.submit(self._write, item, scored, colour))
        return printable_path(f"{OVERLAY_DIR}/{self.names[item.path]}")

    def _write(self, item: Decoded, scored: Scored, colour: tuple[int, int, int]) -> None:
        target = self.out / OVERLAY_DIR / self.names[item.path]
        target.parent.mkdir(parents=True, exist_ok=True)
        overlay = render_overlay(
            item.image, scored.mask.mask, scored.score, scored.defect_class, colour=colour, classes=scored.classes
        )
        save_png(overlay, str(target))

    def drain(self, keep: int) -> None:
        """Wait for the oldest overlays until at most ``keep`` are pending."""
        while len(self.pending) > keep:
            _finish(self.pending.pop(0), self.out)


class _ScoresWriter:
    """scores.csv's rows and the summary's counts, one scored batch at a time."""

    def __init__(self, handle: Any, meta: ArtifactMeta, summary: PredictSummary, overlays: _OverlayWriter | None):
        self.writer = csv.writer(handle, lineterminator="\n")
        self.meta = meta
        self.summary = summary
        self.overlays = overlays
        self.prob_columns = class_columns(meta.class_names)
        self.writer.writerow([*COLUMNS, *self.prob_columns, *TAIL_COLUMNS, *area_columns(meta)])

    def write_batch(self, batch: list[tuple[Decoded, Scored | None]]) -> None:
        meta, summary = self.meta, self.summary
        for item, scored in batch:
            summary.images += 1
            if scored is None:
                summary.errors += 1
                self.writer.writerow(_error_row(item, len(self.prob_columns)) + [""] * len(area_columns(meta)))
                continue
            summary.defects += int(scored.is_defect)
            summary.per_class[scored.defect_class] = summary.per_class.get(scored.defect_class, 0) + 1
            overlay = ""
            if self.overlays is not None:
                # the decided class's colour: green (normal) marks a mask below the image threshold
                colour = class_colour(meta.class_names.index(scored.defect_class))
                overlay = self.overlays.submit(item, scored, colour)
            self.writer.writerow(scored.row(item, overlay) + scored.class_area_cells(meta))

    def drain_overlays(self, keep: int) -> None:
        if self.overlays is not None:
            self.overlays.drain(keep)


def _finish(future: Future, out: Path) -> None:
    try:
        future.result()
    except OSError as e:
        raise OutputError(f"cannot write an overlay under {out}: {e.strerror or e}; choose a writable --out") from None
