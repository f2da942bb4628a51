"""Per-pixel class labels: where they come from (a class-index mask, COCO shapes, run-length rows) and how they
become one class-index array per image.

An importer that knows per-pixel classes attaches a `PixelSource` to each candidate. `prepare`'s scanner calls
`rasterise` with the image's size and gets a `ClassRaster`: a uint8 array whose value ``i`` (1-based) is
``names[i - 1]`` and 0 is background. Anything wrong with the labels raises `LabelProblem` (reason, detail, file):
the scanner records it in problems.csv and skips the image. Conventions (docs/labels.md):

- index masks: pixel value = class id, 0 = background; palette PNGs are read by palette index;
- COCO: polygons (pycocotools rasterises them as COCO does) and RLE, compressed or not, column-major; crowd regions
  are pixels of their category; where shapes overlap the later annotation wins;
- run-length CSV (Kaggle Severstal): ``start length`` pairs, 1-based pixel numbers counted top to bottom, then left
  to right (column-major).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from raydefect.errors import CorruptImageError, DataError
from raydefect.imaging import DEFAULT_MAX_PIXELS, read_bytes

MASK_FORMATS = ("binary", "index")
INDEX, COCO, RLE = "index", "coco", "rle"
MAX_CLASSES = 254  # class ids of a stored uint8 index mask; 0 is background, 255 is left unused
#: the reasons a label problem is recorded under (problems.csv's "reason")
VALUE_WITHOUT_CLASS = "mask value without a class"
RLE_PAST_IMAGE = "run-length past the image"
BAD_SHAPE = "bad annotation"
SIZE_MISMATCH = "mask size mismatch"
COLOUR_MASK = "colour index mask"


class LabelProblem(Exception):
    """One image's labels cannot be used: recorded (reason, detail, file) and the image skipped."""

    def __init__(self, reason: str, detail: str, file: str) -> None:
        super().__init__(f"{file}: {reason} ({detail})")
        self.reason, self.detail, self.file = reason, detail, file


@dataclass(frozen=True)
class Shape:
    """One labelled region: a COCO segmentation (polygons or RLE dict) or a run-length string, with its class."""

    class_name: str
    data: Any  # COCO: the "segmentation" value; RLE: tuple of (start, length) pairs
    where: str  # for problems: "annotation 12" or "row 5"


@dataclass(frozen=True)
class PixelSource:
    """Where one image's per-pixel classes come from. Picklable (scanned in forked workers)."""

    kind: str  # INDEX, COCO or RLE
    file: str  # the index mask, the COCO JSON or the CSV
    value_names: tuple[tuple[int, str], ...] = ()  # INDEX: pixel value -> class name; empty: "class_<v>"
    shapes: tuple[Shape, ...] = ()  # COCO, RLE
    size: tuple[int, int] | None = None  # COCO: (width, height) the shapes were drawn on


@dataclass
class ClassRaster:
    """Class ids per pixel (0 background, i -> names[i - 1]) and pixels per class."""

    array: np.ndarray  # uint8 HxW
    names: list[str]
    areas: dict[str, int] = field(default_factory=dict)

    @property
    def image_class(self) -> str | None:
        """The class with the largest area (ties: the first name in sorted order); None without defect pixels."""
        if not self.areas:
            return None
        return min(self.areas, key=lambda n: (-self.areas[n], n))


def parse_class_names(text: str | None) -> tuple[tuple[int, str], ...]:
    """``--class-names``: ``a,b,c`` (pixel value 1 = a) or a YAML file mapping values to names (``1: scratch``) or
    listing them in order. Empty: names are ``class_<value>``."""
    if not text:
        return ()
    path = Path(text).expanduser()
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise DataError(f"--class-names {text}: no such file; give a YAML map like '1: scratch' or a list a,b,c")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise DataError(f"--class-names {text}: cannot read it ({e}); write a YAML map like '1: scratch'") from None
        if isinstance(loaded, list):
            pairs = list(enumerate(loaded, 1))
        elif isinstance(loaded, dict):
            pairs = list(loaded.items())
        else:
            raise DataError(f"--class-names {text}: expected a YAML map like '1: scratch' or a list of names")
    else:
        pairs = list(enumerate((n.strip() for n in text.split(",") if n.strip()), 1))
    out: dict[int, str] = {}
    for value, name in pairs:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CLASSES:
            raise DataError(
                f"--class-names {text}: class id {value!r} must be an integer 1..{MAX_CLASSES} (0 is background)"
            )
        if not isinstance(name, str) or not name.strip() or name.strip() == "normal":
            raise DataError(f"--class-names {text}: class {value} needs a name other than 'normal' (reserved)")
        out[value] = name.strip()
    if len(set(out.values())) != len(out):
        raise DataError(f"--class-names {text}: a class name appears twice; give each class id its own name")
    return tuple(sorted(out.items()))


def default_name(value: int) -> str:
    return f"class_{value}"


def read_index_mask(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The raw class ids of an index mask: a palette PNG by palette index, a grayscale one by value."""
    data = read_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise LabelProblem("mask too large", f"{img.width}x{img.height} is over {max_pixels:,} pixels", path)
            if img.mode not in ("P", "L", "1", "I", "I;16", "I;16B", "I;16L"):
                raise LabelProblem(
                    COLOUR_MASK,
                    f"mode {img.mode}: an index mask holds one class id per pixel (grayscale or palette PNG); "
                    "save it as a grayscale or palette image, or use --mask-format binary",
                    path,
                )
            return np.asarray(img).astype(np.int64)
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(path, f"cannot decode the mask ({e})", "check the file; re-export it") from None


def _index_raster(source: PixelSource, width: int, height: int, max_pixels: int) -> tuple[np.ndarray, list[str]]:
    raw = read_index_mask(source.file, max_pixels)
    if raw.shape != (height, width):
        detail = f"mask {raw.shape[1]}x{raw.shape[0]}, image {width}x{height}"
        raise LabelProblem(SIZE_MISMATCH, detail, source.file)
    values = [int(v) for v in np.unique(raw) if v != 0]
    known = dict(source.value_names)
    if known:
        missing = [v for v in values if v not in known]
        if missing:
            detail = (
                f"value(s) {', '.join(map(str, missing[:8]))} but --class-names names {len(known)} class(es) "
                f"({', '.join(f'{k}={n}' for k, n in known.items())}); add their names or fix the mask"
            )
            raise LabelProblem(VALUE_WITHOUT_CLASS, detail, source.file)
    elif values and values[-1] > MAX_CLASSES:
        detail = f"value {values[-1]} is over {MAX_CLASSES} classes; is this a binary mask? use --mask-format binary"
        raise LabelProblem(VALUE_WITHOUT_CLASS, detail, source.file)
    names = [known.get(v) or default_name(v) for v in values]
    array = np.zeros(raw.shape, np.uint8)
    for i, v in enumerate(values, 1):
        array[raw == v] = i
    return array, names


def coco_counts(counts: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (the LEB128-like code of pycocotools' rleFrString)."""
    out: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
            if more and p >= len(counts):
                raise ValueError("the string ends inside a number")
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def _runs_to_mask(counts: list[int], width: int, height: int, where: str, file: str) -> np.ndarray:
    """COCO runs (alternating background/foreground, from background, column-major) -> bool HxW."""
    if any(c < 0 for c in counts):
        raise LabelProblem(BAD_SHAPE, f"{where}: a negative run length; export the annotations again", file)
    total = sum(counts)
    if total != width * height:
        detail = f"{where}: runs cover {total:,} pixels but the image has {width}x{height} = {width * height:,}"
        raise LabelProblem(RLE_PAST_IMAGE if total > width * height else BAD_SHAPE, detail, file)
    values = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return values.reshape(width, height).T


def _coco_shape(shape: Shape, width: int, height: int, file: str) -> np.ndarray:
    seg = shape.data
    try:
        if isinstance(seg, dict):
            size, counts = seg.get("size"), seg.get("counts")
            if not (isinstance(size, list) and len(size) == 2) or counts is None:
                raise ValueError("an RLE needs 'size' [height, width] and 'counts'")
            if [int(size[0]), int(size[1])] != [height, width]:
                detail = f"{shape.where}: RLE size {size[1]}x{size[0]} (width x height), image {width}x{height}"
                raise LabelProblem(SIZE_MISMATCH, detail, file)
            runs = coco_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
            return _runs_to_mask(runs, width, height, shape.where, file)
        if isinstance(seg, list) and seg and all(isinstance(p, list) for p in seg):
            polygons = [[float(v) for v in p] for p in seg]
            if any(len(p) < 6 or len(p) % 2 for p in polygons):
                raise ValueError("a polygon needs at least 3 points as x,y pairs")
            from pycocotools import mask as coco_mask

            rles = coco_mask.frPyObjects(polygons, height, width)
            with warnings.catch_warnings():  # pycocotools' numpy-2 copy-keyword notice
                warnings.simplefilter("ignore", DeprecationWarning)
                return coco_mask.decode(coco_mask.merge(rles)).astype(bool)
        raise ValueError("segmentation must be a list of polygons or an RLE dict")
    except LabelProblem:
        raise
    except (ValueError, TypeError, AttributeError) as e:
        raise LabelProblem(BAD_SHAPE, f"{shape.where}: {e}; fix or drop this annotation", file) from None


def severstal_mask(runs: tuple[tuple[int, int], ...], width: int, height: int, where: str, file: str) -> np.ndarray:
    """Run-length pairs (1-based start, length; pixels numbered top to bottom, then left to right) -> bool HxW."""
    n = width * height
    flat = np.zeros(n, bool)
    for start, length in runs:
        end = start - 1 + length
        if end > n:
            detail = (
                f"{where}: a run ends at pixel {end:,} but the image has {width}x{height} = {n:,} pixels (pixels "
                "are 1-based, counted top to bottom, then left to right); check the image or the encoding"
            )
            raise LabelProblem(RLE_PAST_IMAGE, detail, file)
        flat[start - 1 : end] = True
    return flat.reshape(width, height).T


def rasterise(source: PixelSource, width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> ClassRaster:
    """One image's class ids per pixel. Raises `LabelProblem` (recorded) or `ImageError` (an unreadable mask)."""
    if source.kind == INDEX:
        array, names = _index_raster(source, width, height, max_pixels)
    else:
        if source.size is not None and source.size != (width, height):
            detail = f"{source.file} says {source.size[0]}x{source.size[1]}, the image is {width}x{height}"
            raise LabelProblem(SIZE_MISMATCH, detail, source.file)
        names = sorted({s.class_name for s in source.shapes})
        ids = {n: i for i, n in enumerate(names, 1)}
        array = np.zeros((height, width), np.uint8)
        for shape in source.shapes:
            if source.kind == COCO:
                region = _coco_shape(shape, width, height, source.file)
            else:
                region = severstal_mask(shape.data, width, height, shape.where, source.file)
            array[region] = ids[shape.class_name]  # later shapes win where they overlap
    counts = np.bincount(array.ravel(), minlength=len(names) + 1)
    areas = {n: int(counts[i]) for i, n in enumerate(names, 1) if counts[i]}
    return ClassRaster(array, names, areas)


def remap(raster: ClassRaster, class_id: dict[str, int]) -> np.ndarray:
    """The raster with dataset class ids (``class_id[name]``) instead of its own."""
    lut = np.zeros(256, np.uint8)
    for i, name in enumerate(raster.names, 1):
        lut[i] = class_id[name]
    return lut[raster.array]


def decode_class_mask(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A stored class mask (or any index mask) -> uint8 class ids HxW."""
    return read_index_mask(path, max_pixels).astype(np.uint8)
