"""`raydefect prepare`: candidates from an importer -> a checked, split, versioned dataset folder (contract 1).

Every candidate is scanned in parallel (read once: SHA-1 of the bytes, header size, full decode unless
``verify_pixels=False``, mask decode, binarised at 128). Bad items are recorded in ``problems.csv`` with their
reason and skipped (or, with ``strict``, the run fails and writes no manifest); odd-but-usable items (soft masks,
empty masks in a defect class) are kept and flagged. Duplicates by content are kept once. Splits come from
`raydefect.data.splits` and old assignments are read back from an existing manifest in the output folder.

Outputs in ``out``: ``manifest.parquet``, ``dataset.yaml``, ``problems.csv`` and, with ``copy``, ``images/`` and
``masks/`` (binarised), so the folder is self-contained and its manifest paths are relative. Source files are only
ever read.

Big scans run on forked worker processes (small images are CPU-bound Python work), small scans and copies on
threads (`raydefect.data.pool`).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from raydefect import __version__, console
from raydefect.data.importers import (
    IGNORED,
    NORMAL,
    SKIPPED,
    Listing,
    Problem,
    import_reviewed,
    listing_from_dataset,
    merge_listings,
)
from raydefect.data.label_importers import listing_with_labels
from raydefect.data.labels import rasterise, remap
from raydefect.data.manifest import DATASET_SCHEMA_VERSION, DATASET_YAML, MANIFEST, PROBLEMS_CSV
from raydefect.data.pool import cpu_workers, parallel_map
from raydefect.data.scan import Scanned, Scanner
from raydefect.data.splits import SPLITS, assign_splits, parse_split
from raydefect.errors import DataError, OutputError
from raydefect.imaging import (
    DEFAULT_MAX_PIXELS,
    MASK_THRESHOLD,
    decode_mask,
    encode_class_png,
    encode_png,
)
from raydefect.paths import printable_path, write_atomic


def prepare_listing(
    out: str | Path,
    reviewed: Sequence[str | Path] = (),
    *,
    coco: str | None = None,
    rle_csv: str | None = None,
    image_dir: str | None = None,
    mask_format: str = "binary",
    class_names: str | None = None,
    **layout_options: Any,
) -> Listing:
    """What `raydefect prepare` scans: the layout's listing (`label_importers.listing_with_labels`), plus the checked
    review sets ``reviewed`` (``--reviewed``); with review sets and no layout option, the images of the dataset
    already in `out` stand in for a layout's."""
    labels = {"coco": coco, "rle_csv": rle_csv, "image_dir": image_dir}
    if not reviewed:
        return listing_with_labels(**labels, mask_format=mask_format, class_names=class_names, **layout_options)
    given = any(layout_options.values()) or any(v is not None for v in labels.values())
    base = (
        listing_with_labels(**labels, mask_format=mask_format, class_names=class_names, **layout_options)
        if given
        else listing_from_dataset(out)
    )
    return merge_listings(base, import_reviewed(reviewed))


def default_workers() -> int:
    """One worker per core: small images are CPU-bound Python, big ones decode-bound."""
    return cpu_workers()


PROCESS_MIN_ITEMS = 1000  # below this, a thread pool (no start-up cost) scans
COPY_IMAGES, COPY_MASKS = "images", "masks"  # where --copy puts files, under the dataset folder
CLASS_MASKS = "class_masks"  # per-pixel classes: the index masks prepare writes (binary ones go to masks/)


def _safe(name: str) -> str:
    """A file-name component that cannot climb out of its folder."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned[:80] or "x"


def _inside(root: Path, rel: str) -> Path:
    dest = (root / rel).resolve()
    if not dest.is_relative_to(root.resolve()):
        raise DataError(f"refusing to write {rel!r} outside the dataset folder {root}")  # pragma: no cover
    return dest


@dataclass(frozen=True)
class _Copier:
    """Copy one kept item into the dataset folder (image bytes as they are, mask binarised)."""

    root: Path
    max_pixels: int

    def __call__(self, item: tuple[Scanned, str, str | None]) -> None:
        s, image_rel, mask_rel = item
        dest = _inside(self.root, image_rel)
        if not (dest.is_file() and dest.stat().st_size == s.size_bytes):
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(s.candidate.image, dest)
        if mask_rel is not None and s.mask is not None:
            mdest = _inside(self.root, mask_rel)
            mdest.parent.mkdir(parents=True, exist_ok=True)
            mask = decode_mask(s.mask, max_pixels=self.max_pixels).array
            mdest.write_bytes(encode_png(mask.astype(np.uint8) * 255))


@dataclass(frozen=True)
class _LabelWriter:
    """Write one image's per-pixel classes into the dataset folder: the class mask (dataset class ids, a palette
    PNG) and the binary defect mask (any class, 0/255) that every binary reader uses."""

    root: Path
    max_pixels: int
    class_id: dict[str, int]

    def __call__(self, item: tuple[Scanned, str, str]) -> None:
        s, class_rel, mask_rel = item
        if s.candidate.pixels is None:  # only per-pixel items are listed here
            return
        raster = rasterise(s.candidate.pixels, s.width, s.height, self.max_pixels)
        ids = remap(raster, self.class_id)
        binary = (ids > 0).astype(np.uint8) * 255
        for rel, data in ((class_rel, encode_class_png(ids)), (mask_rel, encode_png(binary))):
            dest = _inside(self.root, rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)


@dataclass
class PrepareReport:
    """What `prepare_dataset` did, for the CLI summary and for callers."""

    out: Path
    manifest: Path | None
    dataset_yaml: Path | None
    problems_csv: Path
    images: int
    classes: list[str]
    counts: dict[str, dict[str, int]]  # class -> split -> n
    problems: list[Problem]
    problems_by_reason: dict[tuple[str, str], int]  # (reason, action) -> n
    kept_previous: int
    seconds: float
    workers: int

    def count_rows(self) -> list[dict[str, Any]]:
        """Rows for a class x split table, with a total row."""
        rows = [
            {"class": c, **{s: self.counts[c][s] for s in SPLITS}, "total": sum(self.counts[c].values())}
            for c in self.classes
        ]
        totals = {s: sum(self.counts[c][s] for c in self.classes) for s in SPLITS}
        rows.append({"class": "total", **totals, "total": sum(totals.values())})
        return rows

    def problem_rows(self) -> list[dict[str, Any]]:
        return [{"problem": r, "action": a, "files": n} for (r, a), n in sorted(self.problems_by_reason.items())]


def _remove_stale(out: Path, referenced: set[str]) -> None:
    """Drop copies an earlier ``--copy`` run made that this manifest no longer references (only in our folders)."""
    for folder in (COPY_IMAGES, COPY_MASKS, CLASS_MASKS):
        root = out / folder
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*"), reverse=True):
            if path.is_file() and path.relative_to(out).as_posix() not in referenced:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        if not any(root.iterdir()):
            root.rmdir()


def _check_out(out: Path) -> None:
    """An output folder is new, empty, or an earlier dataset; anything else is refused (we never clobber)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / DATASET_YAML).exists() and not (out / MANIFEST).exists():
        raise DataError(f"--out {out} is not empty and holds no dataset; choose a new or empty folder")


def _previous_splits(out: Path) -> dict[str, str]:
    path = out / MANIFEST
    if not path.exists():
        return {}
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["sha1", "split"])
    except Exception as e:  # any Arrow error: a damaged manifest
        raise DataError(f"{path}: cannot read the previous manifest ({e}); delete it or choose a new --out") from None
    return dict(zip(table.column("sha1").to_pylist(), table.column("split").to_pylist(), strict=True))


def _write_problems(path: Path, problems: list[Problem]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file", "reason", "action", "detail"])
            w.writerows([printable_path(p.file), p.reason, p.action, printable_path(p.detail)] for p in problems)

    write_atomic(path, write)


def _manifest_table(rows: list[dict[str, Any]]):
    import pyarrow as pa

    schema = pa.schema(
        [
            ("image", pa.string()),
            ("mask", pa.string()),
            ("label", pa.int8()),
            ("defect_class", pa.string()),
            ("class_id", pa.int16()),
            ("split", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("mask_fraction", pa.float64()),
            ("mask_soft_pixels", pa.int64()),
            ("sha1", pa.string()),
            ("bytes", pa.int64()),
            ("flags", pa.list_(pa.string())),
            ("source", pa.string()),
            ("original_image", pa.string()),
            ("original_mask", pa.string()),
            ("class_mask", pa.string()),
            ("class_area_px", pa.map_(pa.string(), pa.int64())),
        ],
        metadata={"raydefect.dataset_schema_version": str(DATASET_SCHEMA_VERSION)},
    )
    return pa.Table.from_pylist(rows, schema=schema)


def prepare_dataset(
    listing: Listing,
    out: str | Path,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    copy: bool = False,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    verify_pixels: bool = True,
    workers: int | None = None,
) -> PrepareReport:
    """Scan, check, de-duplicate, split and write the dataset folder. See the module docstring."""

    start = time.perf_counter()
    split = parse_split(split)
    out = Path(os.path.abspath(out))
    _check_out(out)
    previous = _previous_splits(out)
    workers = workers or default_workers()
    problems = [p for p in listing.problems if not Path(p.file).is_relative_to(out)]  # our own files
    candidates = []
    for c in listing.candidates:  # e.g. --copy output under --normal-images: never import our own copies
        if Path(c.image).is_relative_to(out):
            problems.append(Problem(c.image, "inside the output folder", IGNORED, f"--out {out}"))
        else:
            candidates.append(c)
    n = len(candidates)
    console.info(f"scanning {console.count(n, 'image')} ({listing.importer} layout) with {workers} workers")
    scanner = Scanner(max_pixels, verify_pixels)
    scanned: list[Scanned] = parallel_map(scanner, candidates, workers, PROCESS_MIN_ITEMS, 2, progress="scan")

    kept: list[Scanned] = []
    first_by_sha: dict[str, Scanned] = {}
    for s in scanned:
        problems += s.problems
        if not s.ok:
            continue
        first = first_by_sha.get(s.sha1)
        if first is not None:
            also = "" if first.defect_class == s.defect_class else f" (labelled {first.defect_class!r} there)"
            detail = f"same content as {first.candidate.image}{also}"
            problems.append(Problem(s.candidate.image, "duplicate", SKIPPED, detail))
            continue
        first_by_sha[s.sha1] = s
        kept.append(s)

    try:
        return _write_dataset(
            listing, out, scanned_problems=problems, kept=kept, n=n, split=split, seed=seed, copy=copy,
            strict=strict, max_pixels=max_pixels, verify_pixels=verify_pixels, workers=workers, previous=previous,
            start=start,
        )  # fmt: skip
    except OSError as e:  # disk full, folder not writable: one clear line; dataset.yaml (the last file) not written
        where = f" ({printable_path(e.filename)})" if isinstance(e.filename, str) else ""
        raise OutputError(
            f"cannot write the dataset to --out {out}: {e.strerror or e}{where}; free space or fix permissions and "
            "re-run (the dataset is complete only when dataset.yaml is written last)"
        ) from None


def _record_problems(
    problems_csv: Path, problems: list[Problem], strict: bool, any_kept: bool, n: int
) -> Counter[tuple[str, str]]:
    """problems.csv, and the refusals it justifies: any counted problem under --strict, no usable image at all.
    Returns the problems counted by (reason, action)."""
    _write_problems(problems_csv, problems)
    by_reason = Counter((p.reason, p.action) for p in problems)
    counted = [p for p in problems if p.action != IGNORED]
    if strict and counted:
        summary = ", ".join(f"{k} {r}" for (r, a), k in sorted(by_reason.items()) if a != IGNORED)
        raise DataError(
            f"prepare --strict: {len(counted)} problem(s) ({summary}); see {problems_csv}; "
            "fix them, or run without --strict to skip bad items and keep flagged ones"
        )
    if not any_kept:
        raise DataError(f"no usable images among {n} candidates; see {problems_csv} for the reasons")
    return by_reason


def _manifest_rows(
    listing: Listing, kept: list[Scanned], splits: list[str], class_id: dict[str, int], copy: bool, out: Path
) -> tuple[list[dict[str, Any]], list[tuple[Scanned, str, str | None]], list[tuple[Scanned, str, str]]]:
    """(manifest rows, what ``--copy`` copies where, which class masks prepare writes where) for the kept images,
    in manifest order. Written files are named relative to `out` with ``--copy``, else absolute."""
    rows, copies, labels = [], [], []
    for s, split in zip(kept, splits, strict=True):
        image, mask, class_mask = s.candidate.image, s.mask, None
        stem = f"{_safe(Path(image).stem)}-{s.sha1[:10]}"
        cls = _safe(s.defect_class)
        pixels = s.candidate.pixels is not None and s.label == 1
        if pixels:
            class_mask, mask = f"{CLASS_MASKS}/{cls}/{stem}.png", f"{COPY_MASKS}/{cls}/{stem}.png"
            labels.append((s, class_mask, mask))
            if not copy:
                class_mask, mask = str(out / class_mask), str(out / mask)
        if copy:
            image = f"{COPY_IMAGES}/{cls}/{stem}{Path(image).suffix.lower()}"
            if not pixels:
                mask = f"{COPY_MASKS}/{cls}/{stem}.png" if s.mask is not None else None
            copies.append((s, image, None if pixels else mask))
        rows.append(
            {
                "image": image,
                "mask": mask,
                "label": s.label,
                "defect_class": s.defect_class,
                "class_id": class_id[s.defect_class],
                "split": split,
                "width": s.width,
                "height": s.height,
                "mask_fraction": s.mask_fraction,
                "mask_soft_pixels": s.soft_pixels,
                "sha1": s.sha1,
                "bytes": s.size_bytes,
                "flags": s.flags,
                "source": listing.importer,
                "original_image": s.candidate.image,
                "original_mask": s.mask,
                "class_mask": class_mask,
                "class_area_px": s.class_areas or None,
            }
        )
    return rows, copies, labels


def _dataset_info(
    listing: Listing,
    rows: list[dict[str, Any]],
    classes: list[str],
    counts: dict[str, dict[str, int]],
    by_reason: Counter[tuple[str, str]],
    split: Sequence[float],
    seed: int,
    kept_previous: int,
    copy: bool,
    max_pixels: int,
    verify_pixels: bool,
) -> dict[str, Any]:
    """dataset.yaml's content (contract 1): what the dataset holds and how it was made."""
    return {
        "schema_version": DATASET_SCHEMA_VERSION,
        "kind": "raydefect-dataset",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "raydefect_version": __version__,
        "importer": {"name": listing.importer, "arguments": listing.arguments},
        "paths": "relative" if copy else "absolute",
        "split": {"fractions": [float(f) for f in split], "seed": seed, "kept_previous": kept_previous},
        "classes": classes,
        "images": len(rows),
        "counts": {c: {**counts[c], "total": sum(counts[c].values())} for c in classes},
        "split_counts": {sp: sum(counts[c][sp] for c in classes) for sp in SPLITS},
        "problems": {f"{r} ({a})": k for (r, a), k in sorted(by_reason.items())},
        "mask_threshold": MASK_THRESHOLD,
        "mask_classes": any(r["class_mask"] is not None for r in rows),
        "multi_class_images": sum(1 for r in rows if "multi_class" in r["flags"]),
        "max_image_pixels": max_pixels,
        "verify_pixels": verify_pixels,
    }


def _write_dataset(
    listing: Listing,
    out: Path,
    *,
    scanned_problems: list[Problem],
    kept: list[Scanned],
    n: int,
    split: Sequence[float],
    seed: int,
    copy: bool,
    strict: bool,
    max_pixels: int,
    verify_pixels: bool,
    workers: int,
    previous: dict[str, str],
    start: float,
) -> PrepareReport:
    import pyarrow.parquet as pq

    problems = scanned_problems
    out.mkdir(parents=True, exist_ok=True)
    problems_csv = out / PROBLEMS_CSV
    by_reason = _record_problems(problems_csv, problems, strict, bool(kept), n)
    pixel_classes = {name for s in kept for name in s.class_areas}
    defect_classes = sorted({s.defect_class for s in kept if s.defect_class != NORMAL} | pixel_classes)
    classes = [NORMAL, *defect_classes]
    class_id = {c: i for i, c in enumerate(classes)}
    splits = assign_splits([(s.sha1, s.defect_class) for s in kept], split, seed, previous)
    kept_previous = sum(1 for s in kept if s.sha1 in previous)
    order = sorted(range(len(kept)), key=lambda i: (class_id[kept[i].defect_class], kept[i].candidate.image))

    rows, copies, labels = _manifest_rows(
        listing, [kept[i] for i in order], [splits[i] for i in order], class_id, copy, out
    )
    if copies:
        console.info(f"copying {console.count(len(copies), 'image')} into {out}")
        parallel_map(_Copier(out, max_pixels), copies, workers, PROCESS_MIN_ITEMS, threads_from=2, progress="copy")
    if labels:
        console.info(f"writing {console.count(len(labels), 'class mask')} into {out}")
        writer = _LabelWriter(out, max_pixels, class_id)
        parallel_map(writer, labels, workers, PROCESS_MIN_ITEMS, threads_from=2, progress="class masks")
    written = [p for _, image, mask in copies for p in (image, mask)] + [p for _, c, m in labels for p in (c, m)]
    _remove_stale(out, {p for p in written if p is not None})

    counts = {c: dict.fromkeys(SPLITS, 0) for c in classes}
    for r in rows:
        counts[r["defect_class"]][r["split"]] += 1
    table = _manifest_table(rows)
    manifest = out / MANIFEST
    write_atomic(manifest, lambda tmp: pq.write_table(table, tmp))
    info = _dataset_info(
        listing, rows, classes, counts, by_reason, split, seed, kept_previous, copy, max_pixels, verify_pixels
    )
    dataset_yaml = out / DATASET_YAML
    write_atomic(dataset_yaml, lambda tmp: tmp.write_text(yaml.safe_dump(info, sort_keys=False), encoding="utf-8"))
    return PrepareReport(
        out=out,
        manifest=manifest,
        dataset_yaml=dataset_yaml,
        problems_csv=problems_csv,
        images=len(rows),
        classes=classes,
        counts=counts,
        problems=problems,
        problems_by_reason=dict(by_reason),
        kept_previous=kept_previous,
        seconds=time.perf_counter() - start,
        workers=workers,
    )
