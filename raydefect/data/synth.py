"""Synthetic defect images with exact masks, for the demo, the tests and the benchmarks.

Why synthetic: tests and the demo need labelled defect data with *exact* masks, at any count and size, offline
and in seconds. Every image has its own RNG seeded by ``(seed, stream, index)``: the same seed gives
byte-identical files, and asking for more images leaves the first ones unchanged (which is what split-stability
tests need). Defects are painted with hard edges towards a far-away intensity, so the mask is exactly the set of
pixels that changed and a tiny model can learn them at 32-64 px.

Layouts written (what `raydefect prepare` reads):

- raw: ``defect_images/<class>/<class>_00000.png``, ``defect_masks/<class>/<class>_00000.png`` (0/255),
  ``normal_images/normal_00000.png``;
- archive: unlabelled images in nested folders (``line_<k>/day_<dd>/img_000000.png|jpg``), mixed PNG/JPEG, with a
  few deliberately corrupt files (truncated, zero bytes, text named ``.png``), and a truth CSV beside it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from raydefect.data.drawing import COLORS, DEFECT_CLASSES, NORMAL, TEXTURES, Sample, Size, image_wh, render
from raydefect.data.pool import cpu_workers, parallel_map
from raydefect.errors import DataError
from raydefect.imaging import encode_png

# RNG streams: one per kind, so adding a class or more normals never changes another kind's images.
_STREAMS = {NORMAL: 0, "scratch": 1, "spot": 2, "crack": 3, "missing_piece": 4, "archive": 1000}
CORRUPT_KINDS = ("truncated", "zero_bytes", "text_named_png")
RAW_FOLDERS = ("defect_images", "defect_masks", "normal_images")


def sample(kind: str, index: int, seed: int = 0, **kwargs) -> Sample:
    """Image number `index` of `kind` for `seed`: the same call always gives the same pixels."""
    if kind != NORMAL and kind not in DEFECT_CLASSES:
        raise DataError(f"unknown synthetic defect class {kind!r}; choose from {', '.join(DEFECT_CLASSES)}")
    return render(kind, np.random.default_rng([seed, _STREAMS[kind], index]), **kwargs)


# --- writing ------------------------------------------------------------------------------------------------------


def _check_options(classes: Sequence[str], color: str, textures: Sequence[str]) -> None:
    unknown = [c for c in classes if c not in DEFECT_CLASSES]
    if unknown:
        raise DataError(f"unknown synthetic defect class(es) {unknown}; choose from {', '.join(DEFECT_CLASSES)}")
    if color not in COLORS:
        raise DataError(f"unknown color {color!r}; choose from {', '.join(COLORS)}")
    bad = [t for t in textures if t not in TEXTURES]
    if bad or not textures:
        raise DataError(f"unknown texture(s) {bad or '(none)'}; choose from {', '.join(TEXTURES)}")


def _prepare_targets(out: Path, names: Sequence[str], overwrite: bool) -> None:
    """Refuse to mix a new set with an old one (stale files would leak into `prepare`) unless told to replace."""
    for name in names:
        target = out / name
        if not target.exists():
            continue
        if not overwrite:
            if target.is_file() or any(target.iterdir()):
                raise DataError(f"{target} already exists; pass --overwrite to replace it, or choose a new folder")
            continue
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()


PARALLEL_MIN_IMAGES = 1000  # below this, starting worker processes costs more than it saves


def _run(fn: Callable, tasks: list, workers: int | None) -> list:
    """Render and write in forked worker processes for big jobs (rendering is CPU-bound Python)."""
    return parallel_map(fn, tasks, workers or cpu_workers(), processes_from=PARALLEL_MIN_IMAGES)


@dataclass(frozen=True)
class _RawJob:
    out: Path
    seed: int
    size: tuple[int, int]
    color: str
    textures: tuple[str, ...]
    mask_suffix: str
    defect_size: int | None = None

    def __call__(self, task: tuple[str, int]) -> int:
        kind, i = task
        s = sample(
            kind, i, self.seed, size=self.size, color=self.color, textures=self.textures, defect_size=self.defect_size
        )
        stem = f"{kind}_{i:05d}"
        if kind == NORMAL:
            (self.out / "normal_images" / f"{stem}.png").write_bytes(encode_png(s.image))
            return 0
        (self.out / "defect_images" / kind / f"{stem}.png").write_bytes(encode_png(s.image))
        mask = s.mask.astype(np.uint8) * 255
        (self.out / "defect_masks" / kind / f"{stem}{self.mask_suffix}.png").write_bytes(encode_png(mask))
        return int(s.mask.sum())


def generate_raw(
    out: str | Path,
    n_defect: int = 50,
    n_normal: int = 200,
    size: Size = 64,
    seed: int = 0,
    classes: Sequence[str] = DEFECT_CLASSES,
    color: str = "mixed",
    textures: Sequence[str] = TEXTURES,
    mask_suffix: str = "",
    overwrite: bool = False,
    workers: int | None = None,
    defect_size: int | None = None,
) -> dict:
    """Write the classic raw layout: `n_defect` images per class in `classes` plus `n_normal` normal images.
    ``defect_size``: small defects in large images (see `render`).

    Masks are 8-bit PNGs (0 or 255) named like their image (plus `mask_suffix`). Returns a summary dict.
    `workers`: processes for big jobs (default: all cores; 1 = in this process). See `raydefect.data.pool`.
    """
    if n_defect < 0 or n_normal < 0:
        raise DataError("image counts must be >= 0")
    classes = tuple(classes)
    _check_options(classes, color, textures)
    w, h = image_wh(size)
    out = Path(out)
    _prepare_targets(out, [*RAW_FOLDERS, "synth.yaml"], overwrite)
    start = time.perf_counter()
    tasks = [(cls, i) for cls in classes for i in range(n_defect)] + [(NORMAL, i) for i in range(n_normal)]
    for cls in classes:
        (out / "defect_images" / cls).mkdir(parents=True, exist_ok=True)
        (out / "defect_masks" / cls).mkdir(parents=True, exist_ok=True)
    (out / "normal_images").mkdir(parents=True, exist_ok=True)
    _run(_RawJob(out, seed, (w, h), color, tuple(textures), mask_suffix, defect_size), tasks, workers)
    params = {
        "generator": "raydefect synth",
        "seed": seed,
        "size": [w, h],
        "color": color,
        "textures": list(textures),
        "classes": list(classes),
        "per_class": n_defect,
        "normal": n_normal,
        "mask_suffix": mask_suffix,
        "defect_size": defect_size,
    }
    (out / "synth.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return {
        "out": str(out),
        "images": len(tasks),
        "defect": {cls: n_defect for cls in classes},
        "normal": n_normal,
        "seconds": time.perf_counter() - start,
        "defect_images": str(out / "defect_images"),
        "defect_masks": str(out / "defect_masks"),
        "normal_images": str(out / "normal_images"),
    }


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@dataclass(frozen=True)
class _ArchiveJob:
    out: Path
    seed: int
    size: tuple[int, int]
    defect_rate: float
    classes: tuple[str, ...]
    color: str
    textures: tuple[str, ...]
    corrupt_at: dict[int, str]
    defect_size: int | None = None
    brightness: float = 0.0

    def __call__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, _STREAMS["archive"], i])
        defect = bool(self.classes) and rng.random() < self.defect_rate
        kind = str(self.classes[int(rng.integers(len(self.classes)))]) if defect else NORMAL
        s = render(kind, rng, size=self.size, color=self.color, textures=self.textures, defect_size=self.defect_size)
        if self.brightness:  # a shifted night: brighter (or darker) light on the same parts
            shifted = np.clip(s.image.astype(np.int16) + round(255 * self.brightness), 0, 255).astype(np.uint8)
            s = dataclasses.replace(s, image=shifted)
        ext = ".jpg" if rng.random() < 0.5 else ".png"
        reason = self.corrupt_at.get(i)
        if reason in ("truncated", "text_named_png"):
            ext = ".png"
        rel = Path(f"line_{i % 3}") / f"day_{(i // 3) % 7:02d}" / f"img_{i:06d}{ext}"
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _jpeg(s.image) if ext == ".jpg" else encode_png(s.image)
        if reason == "truncated":
            data = data[: len(data) // 2]
        elif reason == "zero_bytes":
            data = b""
        elif reason == "text_named_png":
            data = b"this is not an image, it is a text file with a .png name\n"
        path.write_bytes(data)
        return {
            "path": rel.as_posix(),
            "kind": "corrupt" if reason else kind,
            "defect_class": kind,
            "mask_pixels": int(s.mask.sum()),
            "corrupt_reason": reason or "",
        }


def generate_archive(
    out: str | Path,
    n: int = 200,
    size: Size = 64,
    seed: int = 0,
    defect_rate: float = 0.3,
    n_corrupt: int = 3,
    classes: Sequence[str] = DEFECT_CLASSES,
    color: str = "mixed",
    textures: Sequence[str] = TEXTURES,
    truth_csv: str | Path | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    defect_size: int | None = None,
    brightness: float = 0.0,
) -> dict:
    """Write `n` unlabelled files in nested folders (about half PNG, half JPEG); `n_corrupt` of them are broken.

    ``brightness`` (-1 to 1) adds that fraction of full scale to every pixel: a night shot under other light, for
    drift (`raydefect scores report`); ``textures`` other than the training set's make a texture shift.

    The truth (path relative to `out`, kind, mask pixels, corrupt reason) goes to `truth_csv`, by default
    ``<out>_truth.csv`` beside the archive, so scoring the archive folder never sees it.
    """
    if n < 0 or not 0 <= n_corrupt <= n:
        raise DataError(f"archive: need 0 <= n_corrupt ({n_corrupt}) <= n ({n})")
    if not 0.0 <= defect_rate <= 1.0:
        raise DataError(f"archive: defect_rate must be in [0, 1], got {defect_rate}")
    classes = tuple(classes)
    _check_options(classes, color, textures)
    w, h = image_wh(size)
    out = Path(out)
    truth = Path(truth_csv) if truth_csv is not None else out.with_name(out.name + "_truth.csv")
    _prepare_targets(out.parent, [out.name, truth.name] if truth.parent == out.parent else [out.name], overwrite)
    start = time.perf_counter()
    pick = np.random.default_rng([seed, _STREAMS["archive"], 1 << 30])
    corrupt_at = {int(i): CORRUPT_KINDS[k % 3] for k, i in enumerate(sorted(pick.choice(n, n_corrupt, False)))}
    out.mkdir(parents=True, exist_ok=True)
    if not -1.0 <= brightness <= 1.0:
        raise DataError(f"archive: brightness must be in [-1, 1], got {brightness}")
    job = _ArchiveJob(
        out, seed, (w, h), defect_rate, classes, color, tuple(textures), corrupt_at, defect_size, brightness
    )
    rows = _run(job, list(range(n)), workers)
    truth.parent.mkdir(parents=True, exist_ok=True)
    with truth.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "kind", "defect_class", "mask_pixels", "corrupt_reason"])
        writer.writeheader()
        writer.writerows(rows)
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    return {
        "out": str(out),
        "files": n,
        "corrupt": n_corrupt,
        "kinds": dict(sorted(kinds.items())),
        "truth_csv": str(truth),
        "seconds": time.perf_counter() - start,
    }


def synthetic_dataset(out: str | Path, images: int, size: int, seed: int = 0) -> Path:
    """A prepared dataset of ``images`` synthetic images (10 % per defect class, the rest normal) at ``size`` px:
    raw files in ``out/raw``, the dataset (split 0.8/0.1/0.1) in ``out/ds``, which is returned. For benchmarks."""
    from raydefect.data.importers import import_classic
    from raydefect.data.prepare import prepare_dataset

    per_class = images // 10
    normal = images - per_class * len(DEFECT_CLASSES)
    raw = generate_raw(Path(out) / "raw", per_class, normal, size, seed=seed)
    listing = import_classic(raw["defect_images"], raw["defect_masks"], raw["normal_images"])
    prepare_dataset(listing, Path(out) / "ds", split=(0.8, 0.1, 0.1), workers=1)
    return Path(out) / "ds"
