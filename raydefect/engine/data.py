"""Manifest rows -> augmented, normalised tensor batches, the same way in plain PyTorch and in Ray Train workers.

Rows are plain dicts (`ROW_COLUMNS`), cheap to ship through Ray Data. Each sample is decoded with
`raydefect.imaging` and, for training, augmented with the mask alongside (random scale-crop, flips, 90-degree
rotations: bilinear for the image, nearest for the mask; then brightness/contrast on the image only), placed per
``data.geometry`` (`raydefect.geometry`): squashed or letterboxed to ``data.image_size``, or under ``tiles`` one tile
drawn per image and epoch. Validation and test images go through `raydefect.inference.Preprocessor` exactly as
inference does (under ``tiles`` whole images, tiled and stitched by `engine.loop.evaluate`), so validation
thresholds hold at inference.

Augmentation is deterministic: each draw uses its own RNG seeded by (seed, epoch, rank, position in the epoch), so a
resumed run or a different number of loader threads sees the very same pixels. Decoding runs on a small thread pool
(`iterate_batches`) that prefetches the next batches while the model computes: Pillow and numpy release the GIL,
and unlike DataLoader worker processes, threads neither fork inside Ray workers nor compete with torch's own
threads for the few cores of a CPU node. A GPU worker has cores to spare and a model that eats faster than threads
sharing one interpreter lock can decode (262 vs 520 images/s for dinov3-s on an H200), so there the same loading runs
in ``data.loader_processes`` DataLoader worker processes instead (`loader_processes`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from raydefect import console
from raydefect.config import DataConfig
from raydefect.data.labels import decode_class_mask
from raydefect.engine.augment import Augmenter
from raydefect.errors import DataError, ImageError
from raydefect.geometry import Box, cut_tiles, fit_mask, letterbox_box, sample_tile, scale_image, scale_mask
from raydefect.imaging import decode_image, decode_mask
from raydefect.inference import Preprocessor

if TYPE_CHECKING:
    import torch

    from raydefect.data.manifest import Dataset

#: The columns of a training row (what crosses Ray Data). ``key`` is a stable integer per image (from its SHA-1);
#: ``mask_valid`` is False for a defect image whose mask is missing or empty (its pixels are unknown);
#: ``class_mask`` is the image's class-id mask in a dataset with per-pixel classes, else None.
ROW_COLUMNS = ("image", "mask", "label", "class_id", "key", "mask_valid", "class_mask")


def _key(sha1: Any, path: str) -> int:
    text = str(sha1) if isinstance(sha1, str) and sha1 else path
    if len(text) >= 15 and all(c in "0123456789abcdef" for c in text[:15].lower()):
        return int(text[:15], 16)
    return int(hashlib.sha1(text.encode()).hexdigest()[:15], 16)


def manifest_rows(dataset: Dataset, split: str, *, required: bool = True) -> list[dict[str, Any]]:
    """The rows of one split as training rows; ``required`` makes an empty split a `DataError` naming the fix."""
    df = dataset.split(split) if required else dataset.frame(split)
    names = dataset.class_names
    index = {name: i for i, name in enumerate(names)}
    with_classes = dataset.has_class_masks
    rows = []
    for rec in df.to_dict("records"):
        cls = str(rec["defect_class"])
        label = int(rec["label"])
        if cls not in index:  # load_dataset checked this; keep the error clear anyway
            raise DataError(f"{dataset.root}: class {cls!r} is not in dataset.yaml; re-run `raydefect prepare`")
        class_id = index[cls]
        if (class_id == 0) != (label == 0):
            raise DataError(
                f"{rec['image']}: label {label} disagrees with class {cls!r} in {dataset.root}; "
                "re-run `raydefect prepare`"
            )
        mask = rec.get("mask")
        mask = None if mask is None or (isinstance(mask, float) and math.isnan(mask)) else str(mask)
        fraction = rec.get("mask_fraction")
        has_pixels = fraction is None or not (isinstance(fraction, float) and fraction == 0.0)
        rows.append(
            {
                "image": str(rec["image"]),
                "mask": mask,
                "label": label,
                "class_id": class_id,
                "key": _key(rec.get("sha1"), str(rec["image"])),
                "mask_valid": label == 0 or (mask is not None and has_pixels),
                "class_mask": _text(rec.get("class_mask")) if with_classes else None,
            }
        )
    return rows


def _text(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def subset_rows(rows: Sequence[dict[str, Any]], fraction: float, seed: int) -> list[dict[str, Any]]:
    """A stratified, deterministic fraction of the rows (multi-fidelity tuning): per class, ``ceil(fraction * n)``
    rows in the order of a hash of (seed, key), so a larger fraction keeps the smaller one's rows."""
    if fraction >= 1.0:
        return list(rows)
    by_class: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_class.setdefault(int(row["class_id"]), []).append(row)
    out: list[dict[str, Any]] = []
    for _cls, members in sorted(by_class.items()):
        members = sorted(members, key=lambda r: hashlib.sha1(f"{seed}:{r['key']}".encode()).digest())
        out += members[: max(1, math.ceil(fraction * len(members)))]
    return sorted(out, key=lambda r: r["key"])


def class_counts(rows: Sequence[dict[str, Any]], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for row in rows:
        counts[int(row["class_id"])] += 1
    return counts


def epoch_order(
    rows: Sequence[dict[str, Any]], epoch: int, seed: int, rank: int = 0, balanced: bool = False
) -> np.ndarray:
    """Indices of one epoch: a permutation, or with ``balanced`` as many draws with replacement, each class equally
    likely (defects are rare). Seeded by (seed, epoch, rank)."""
    n = len(rows)
    rng = np.random.default_rng([seed, epoch, rank, 11])
    if not balanced or n == 0:
        return rng.permutation(n)
    ids = np.asarray([int(r["class_id"]) for r in rows])
    counts = np.bincount(ids)
    weights = 1.0 / counts[ids]
    return rng.choice(n, size=n, replace=True, p=weights / weights.sum())


def fit_class_ids(ids: np.ndarray, size: int, geometry: str) -> np.ndarray:
    """uint8 class ids HxW -> size x size as `geometry.fit_mask` places masks (nearest; padding is background)."""
    h, w = ids.shape
    box = letterbox_box(w, h, size) if geometry == "aspect" else Box(0, 0, size, size)
    out = np.zeros((size, size), dtype=np.uint8)
    part = Image.fromarray(ids.astype(np.uint8)).resize((box.w, box.h), Image.Resampling.NEAREST)
    out[box.y : box.y + box.h, box.x : box.x + box.w] = np.asarray(part)
    return out


@dataclass
class SampleSource:
    """Decodes (and for training augments) one row into model inputs. Stateless apart from its settings."""

    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    augment: DataConfig | None = None  # None: evaluation preprocessing (= inference)
    max_pixels: int = 178_956_970
    geometry: str = "square"
    scale: float = 1.0  # tiles: resize factor before tiling
    tile_defect_share: float = 0.5  # tiles, training: share of tiles centred on a defect pixel
    pixel_classes: bool = False  # model.mask_classes: also hand out each pixel's class id ("classes")
    _pre: Preprocessor = field(init=False, repr=False)
    _aug: Augmenter | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._pre = Preprocessor(image_size=self.image_size, mean=self.mean, std=self.std, geometry=self.geometry)
        aug = self.augment
        if aug is not None and self.geometry == "tiles":  # a tile is augmented as a square of its own size
            aug = dataclasses.replace(aug, geometry="square", image_size=self.image_size)
        self._aug = Augmenter(aug) if aug is not None and aug.augment else None

    @property
    def tiled(self) -> bool:
        return self.geometry == "tiles"

    @classmethod
    def for_config(cls, cfg: Any, train: bool) -> SampleSource:
        """Training (augmenting) or evaluation source for a `Config`, normalised for its backbone."""
        from raydefect.models.registry import resolve_backbone

        spec = resolve_backbone(cfg.model.backbone)
        data = cfg.data
        return cls(
            data.tile_size if data.geometry == "tiles" else data.image_size,
            spec.mean,
            spec.std,
            augment=data if train else None,
            max_pixels=data.max_image_pixels,
            geometry=data.geometry,
            scale=data.scale,
            tile_defect_share=data.tile_defect_share,
            pixel_classes=cfg.model.mask_classes,
        )

    def load(self, row: dict[str, Any], seed: Sequence[int] = (0,)) -> dict[str, Any]:
        """One sample: image float32 [3, S, S], mask bool [S, S], mask_valid, label, class_id.

        Raises `ImageError` for an unreadable image or mask (the loader records it and goes on).
        """
        image = decode_image(row["image"], mode="RGB", max_pixels=self.max_pixels)
        valid = bool(row["mask_valid"])
        if self.pixel_classes:
            return self._load_classes(row, image, valid, seed)
        if row["mask"] is not None and valid:
            mask = decode_mask(row["mask"], max_pixels=self.max_pixels).array
            if mask.shape != image.shape[:2]:
                raise ImageError(
                    row["mask"],
                    f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {image.shape[1]}x{image.shape[0]}",
                    "re-run `raydefect prepare`",
                )
        else:
            mask = np.zeros(image.shape[:2], dtype=bool)
        if self.tiled:
            return self._load_tiled(row, image, mask, valid, seed)
        if self._aug is not None:
            img, msk = self._aug(image, mask, np.random.default_rng(list(seed)))
            x = self._pre.normalize(img)
        else:
            x = self._pre(image)
            msk = fit_mask(mask, self.image_size, self.geometry)
        return {
            "image": x,
            "mask": msk,
            "mask_valid": valid,
            "label": int(row["label"]),
            "class_id": int(row["class_id"]),
        }

    def _load_classes(self, row: dict[str, Any], image: np.ndarray, valid: bool, seed: Sequence[int]) -> dict[str, Any]:
        """Per-pixel classes: the class-id mask is placed (and augmented) like the image; the binary mask is any
        class. A row without a class mask (a normal image) is all background."""
        path = row.get("class_mask")
        if path is not None and valid:
            ids = decode_class_mask(str(path), max_pixels=self.max_pixels)
            if ids.shape != image.shape[:2]:
                raise ImageError(
                    str(path),
                    f"class mask is {ids.shape[1]}x{ids.shape[0]} but its image is {image.shape[1]}x{image.shape[0]}",
                    "re-run `raydefect prepare`",
                )
        else:
            ids = np.zeros(image.shape[:2], dtype=np.uint8)
        if self._aug is not None:
            img, ids = self._aug(image, ids, np.random.default_rng(list(seed)))
            x = self._pre.normalize(img)
        else:
            x = self._pre(image)
            ids = fit_class_ids(ids, self.image_size, self.geometry)
        return {
            "image": x,
            "mask": ids > 0,
            "classes": np.ascontiguousarray(ids),
            "mask_valid": valid,
            "label": int(row["label"]),
            "class_id": int(row["class_id"]),
        }

    def _load_tiled(
        self, row: dict[str, Any], image: np.ndarray, mask: np.ndarray, valid: bool, seed: Sequence[int]
    ) -> dict[str, Any]:
        """Tiles: training draws one tile (`geometry.sample_tile`), labelled by the defect pixels inside it;
        evaluation keeps the whole scaled image for `geometry.predict_tiled` (``whole`` samples)."""
        image, mask = scale_image(image, self.scale), scale_mask(mask, self.scale)
        label, class_id = int(row["label"]), int(row["class_id"])
        if self.augment is None:
            return {"whole": image, "mask": mask, "mask_valid": valid, "label": label, "class_id": class_id}
        rng = np.random.default_rng(list(seed))
        box, has_defect = sample_tile(mask, self.image_size, rng, self.tile_defect_share if valid else 0.0)
        tile = cut_tiles(image, [box])[0]
        tile_mask = np.zeros((self.image_size, self.image_size), dtype=bool)
        part = mask[box.y : box.y + box.h, box.x : box.x + box.w]
        tile_mask[: part.shape[0], : part.shape[1]] = part
        if self._aug is not None:
            img, tile_mask = self._aug(tile, tile_mask, rng)
            x = self._pre.normalize(img)
        else:
            x = self._pre.normalize_tiles(tile[None])[0]
        if valid and label and not (has_defect and tile_mask.any()):  # a tile that misses the defect is normal
            label, class_id = 0, 0
        return {"image": x, "mask": tile_mask, "mask_valid": valid, "label": label, "class_id": class_id}


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    import torch

    if "whole" in samples[0]:  # tiled evaluation: whole images of different sizes, tiled by `evaluate`
        return {
            "whole": [s["whole"] for s in samples],
            "masks": [s["mask"] for s in samples],
            "mask_valid": torch.tensor([s["mask_valid"] for s in samples], dtype=torch.bool),
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "class_id": torch.tensor([s["class_id"] for s in samples], dtype=torch.long),
        }
    batch = {
        "image": torch.from_numpy(np.stack([s["image"] for s in samples]).astype(np.float32, copy=False)),
        "mask": torch.from_numpy(np.stack([s["mask"] for s in samples])[:, None].astype(np.float32)),
        "mask_valid": torch.tensor([s["mask_valid"] for s in samples], dtype=torch.bool),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "class_id": torch.tensor([s["class_id"] for s in samples], dtype=torch.long),
    }
    if "classes" in samples[0]:
        batch["pixel_classes"] = torch.from_numpy(np.stack([s["classes"] for s in samples]).astype(np.int64))
    return batch


class _BatchTasks:
    """Batch ``b`` of an epoch, loaded in a `DataLoader` worker process: (collated batch or None, [(row index, path,
    reason)] of the images that failed). Failures travel back as data: the parent records them and goes on."""

    def __init__(self, source: SampleSource, rows: Sequence[dict[str, Any]], batches: list[list[int]],
                 offsets: list[int], seed: tuple[int, ...]) -> None:  # fmt: skip
        self.source, self.rows, self.batches, self.offsets, self.seed = source, rows, batches, offsets, seed

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> tuple[dict[str, torch.Tensor] | None, list[tuple[int, str, str]]]:
        samples, failed = [], []
        for k, i in enumerate(self.batches[b]):
            try:
                samples.append(self.source.load(self.rows[i], (*self.seed, self.offsets[b] + k)))
            except ImageError as e:
                failed.append((i, e.path or self.rows[i]["image"], e.reason))
        return (collate(samples) if samples else None), failed


def _process_batches(
    source: SampleSource,
    rows: Sequence[dict[str, Any]],
    batches: list[list[int]],
    offsets: list[int],
    seed: tuple[int, ...],
    stats: LoadStats,
    processes: int,
    prefetch_batches: int,
) -> Iterator[dict[str, torch.Tensor]]:
    from torch.utils.data import DataLoader

    tasks = _BatchTasks(source, rows, batches, offsets, seed)
    loader = DataLoader(
        tasks,
        batch_size=None,  # each item is already a batch
        num_workers=min(processes, len(batches)),
        prefetch_factor=max(1, prefetch_batches),
        collate_fn=_as_is,  # keep (batch, failures) as the worker made it
    )
    for b, (batch, failed) in enumerate(loader):
        for i, path, reason in failed:
            stats.add(ImageError(path, reason), rows[i])
        if batch is None:
            raise _all_failed(len(batches[b]), stats)
        yield batch


def _as_is(item: Any) -> Any:
    return item


def _all_failed(n: int, stats: LoadStats) -> DataError:
    first = stats.skipped[-1] if stats.skipped else ("?", "?")
    return DataError(
        f"every image of a batch failed to load ({n} images, e.g. {first[0]}: {first[1]}); the dataset files moved "
        "or changed since `raydefect prepare`: re-run it"
    )


def loader_processes(cfg: DataConfig, device_type: str, cpus: float) -> int:
    """``data.loader_processes``, or when null: none on CPU (the cores belong to torch), on a GPU the worker's CPUs
    minus one (the training loop's own), at least 2."""
    if cfg.loader_processes is not None:
        return int(cfg.loader_processes)
    return 0 if device_type == "cpu" else max(2, int(cpus) - 1)


@dataclass
class LoadStats:
    """What the loader skipped: (path, reason) per unreadable image, so a long run reports instead of dying."""

    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, err: ImageError, row: dict[str, Any]) -> None:
        path = err.path or row["image"]
        if not any(p == path for p, _ in self.skipped):
            console.warn(f"skipping {path}: {err.reason}")
        self.skipped.append((path, err.reason))


def iterate_batches(
    source: SampleSource,
    rows: Sequence[dict[str, Any]],
    order: Sequence[int] | np.ndarray,
    batch_size: int,
    *,
    threads: int = 2,
    prefetch_batches: int = 2,
    seed: Sequence[int] = (0,),
    stats: LoadStats | None = None,
    processes: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``rows[order]`` in order, decoded on ``threads`` threads (0: inline), prefetching ahead; with
    ``processes`` > 0, in that many worker processes instead (a torch `DataLoader`, one batch per task, batches
    handed over in shared memory): threads share one interpreter's lock, which caps them far below what a GPU eats.

    Sample ``j`` of the order draws its augmentation from ``seed + (j,)`` either way, so threads, processes and
    inline loading give the same pixels. Unreadable images are skipped (recorded in ``stats``); a batch whose every
    image fails raises `DataError`, since then the data are gone, not one file.
    """
    stats = stats if stats is not None else LoadStats()
    order = [int(i) for i in order]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    offsets = list(range(0, len(order), batch_size))
    if processes > 0 and batches:
        yield from _process_batches(source, rows, batches, offsets, tuple(seed), stats, processes, prefetch_batches)
        return

    def load(j: int, i: int) -> dict[str, Any] | None:
        try:
            return source.load(rows[i], (*seed, j))
        except ImageError as e:
            stats.add(e, rows[i])
            return None

    def assemble(samples: list[dict[str, Any] | None], idx: list[int]) -> dict[str, torch.Tensor]:
        good = [s for s in samples if s is not None]
        if not good:
            raise _all_failed(len(idx), stats)
        return collate(good)

    if threads <= 0:
        for off, idx in zip(offsets, batches, strict=True):
            yield assemble([load(off + k, i) for k, i in enumerate(idx)], idx)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="raydefect-load") as pool:
        pending: deque[tuple[list[int], list[Future]]] = deque()
        nxt = 0

        def submit() -> None:
            nonlocal nxt
            if nxt < len(batches):
                idx, off = batches[nxt], offsets[nxt]
                pending.append((idx, [pool.submit(load, off + k, i) for k, i in enumerate(idx)]))
                nxt += 1

        for _ in range(max(1, prefetch_batches)):
            submit()
        try:
            while pending:
                idx, futures = pending.popleft()
                submit()
                yield assemble([f.result() for f in futures], idx)
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()
