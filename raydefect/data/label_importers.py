"""Importers of per-pixel class labels: class-index masks, COCO JSON, run-length CSVs (docs/labels.md).

Like `raydefect.data.importers` they only list: every candidate carries a `PixelSource` that `prepare`'s scanner
rasterises with the image's size. Problems of one image (an unknown category id, an image listed twice, a malformed
run) are recorded and that image skipped; a file that cannot be read at all (broken JSON, no header) is a
`DataError` naming the file and the fix.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

from raydefect.data.importers import (
    IGNORED,
    LABEL_FROM_MASK,
    NORMAL,
    SKIPPED,
    Candidate,
    Listing,
    Problem,
    is_image_file,
    listing_from_options,
)
from raydefect.data.labels import (
    COCO,
    INDEX,
    MASK_FORMATS,
    RLE,
    PixelSource,
    Shape,
    default_name,
    parse_class_names,
)
from raydefect.errors import DataError

LISTED_TWICE = "image listed twice"
UNKNOWN_CATEGORY = "unknown category id"
BAD_RLE = "bad run-length"
#: accepted CSV headers (case-insensitive): the image, the class, the runs; or Severstal's first ``ImageId_ClassId``
IMAGE_COLUMNS = ("imageid", "image", "image_id", "file_name", "filename", "file")
CLASS_COLUMNS = ("classid", "class", "class_id", "category", "category_id", "label")
PIXEL_COLUMNS = ("encodedpixels", "encoded_pixels", "rle", "pixels", "run_length")


def with_index_masks(listing: Listing, value_names: tuple[tuple[int, str], ...]) -> Listing:
    """The same listing with each mask read as class ids (``--mask-format index``): the image's class comes from
    its mask (the largest area); an image whose mask is missing or empty keeps the class the layout gave it."""
    candidates = []
    for c in listing.candidates:
        if c.mask is None:
            candidates.append(c)
        else:
            source = PixelSource(INDEX, c.mask, value_names)
            candidates.append(Candidate(c.image, c.mask, c.defect_class, c.label, source))
    arguments = {**listing.arguments, "mask_format": "index", "class_names": dict(value_names)}
    return Listing(listing.importer, arguments, candidates, listing.problems)


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"--coco {path}: no such file; pass the COCO JSON your labelling tool exported") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--coco {path}: cannot read it ({e}); check the file") from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"--coco {path}: broken JSON at line {e.lineno} column {e.colno} ({e.msg}); export it again from the "
            "labelling tool (COCO 1.0 format)"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"--coco {path}: not a COCO file (no 'images' list); export COCO 1.0 from the labelling tool")
    return data


def _categories(data: dict, path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for cat in data.get("categories") or []:
        try:
            cid, name = int(cat["id"]), str(cat["name"]).strip()
        except (KeyError, TypeError, ValueError):
            raise DataError(f"--coco {path}: category {cat!r} needs an integer 'id' and a 'name'") from None
        if cid in out:
            raise DataError(f"--coco {path}: category id {cid} is listed twice; give each category its own id")
        if not name or name == NORMAL:
            raise DataError(f"--coco {path}: category {cid} needs a name other than '{NORMAL}' (reserved); rename it")
        out[cid] = name
    if len(set(out.values())) != len(out):
        raise DataError(f"--coco {path}: two categories share a name; rename one (class names must be unique)")
    return out


def _box_polygon(bbox: list) -> list[list[float]]:
    """COCO ``bbox`` [x, y, width, height] -> the rectangle as one polygon."""
    x, y, w, h = (float(v) for v in bbox)
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def import_coco(coco: str | Path, image_dir: str | Path | None = None) -> Listing:
    """A COCO JSON (CVAT, Label Studio): images from ``image_dir`` (default: the JSON's folder) by ``file_name``;
    categories are the classes; an image without annotations is normal."""
    path = Path(os.path.abspath(os.path.expanduser(str(coco))))
    data = _load_json(path)
    root = Path(os.path.abspath(os.path.expanduser(str(image_dir)))) if image_dir else path.parent
    if not root.is_dir():
        raise DataError(f"--image-dir {root}: not a folder; pass the folder that holds the COCO file's images")
    categories = _categories(data, path)
    listing = Listing("coco", {"coco": str(path), "image_dir": str(root)})
    images: dict[int, dict] = {}
    by_file: dict[str, list] = {}
    for entry in data["images"]:
        try:
            iid, name = int(entry["id"]), str(entry["file_name"])
            size = (int(entry["width"]), int(entry["height"])) if "width" in entry and "height" in entry else None
        except (KeyError, TypeError, ValueError):
            problem = Problem(str(path), "bad image entry", SKIPPED, f"{entry!r:.120}: needs 'id' and 'file_name'")
            listing.problems.append(problem)
            continue
        by_file.setdefault(name, []).append(iid)
        images.setdefault(iid, {"file": name, "size": size, "shapes": [], "bad": None, "ids": []})["ids"].append(iid)
    twice = {name for name, ids in by_file.items() if len(ids) > 1}
    twice |= {entry["file"] for entry in images.values() if len(entry["ids"]) > 1}
    for name in sorted(twice):
        detail = f"{path} lists it {len(by_file[name])} times (image ids {by_file[name]}); keep one entry"
        listing.problems.append(Problem(str(root / name), LISTED_TWICE, SKIPPED, detail))
    for ann in data.get("annotations") or []:
        aid = ann.get("id", "?") if isinstance(ann, dict) else "?"
        try:
            iid, cid = int(ann["image_id"]), int(ann["category_id"])
            seg = ann.get("segmentation") or _box_polygon(ann["bbox"])  # a box drawn as a box: its rectangle
        except (KeyError, TypeError, ValueError):
            detail = f"annotation {aid} needs 'image_id', 'category_id' and 'segmentation' or 'bbox'; fix or drop it"
            listing.problems.append(Problem(str(path), "bad annotation", SKIPPED, detail))
            continue
        entry = images.get(iid)
        if entry is None:
            detail = f"annotation {aid}: image id {iid} is not in 'images'; add the image or drop the annotation"
            listing.problems.append(Problem(str(path), "annotation without image", SKIPPED, detail))
            continue
        if cid not in categories:
            known = ", ".join(f"{k}={v}" for k, v in sorted(categories.items())) or "none"
            entry["bad"] = (
                f"annotation {aid} in {path}: category_id {cid} is not in 'categories' ({known}); add the category "
                "or fix the annotation"
            )
            continue
        entry["shapes"].append(Shape(categories[cid], seg, f"annotation {aid}"))
    for entry in images.values():
        image = str(root / entry["file"])
        if entry["file"] in twice:
            continue
        if entry["bad"]:
            listing.problems.append(Problem(image, UNKNOWN_CATEGORY, SKIPPED, entry["bad"]))
        elif entry["shapes"]:
            source = PixelSource(COCO, str(path), shapes=tuple(entry["shapes"]), size=entry["size"])
            listing.candidates.append(Candidate(image, None, NORMAL, LABEL_FROM_MASK, source))
        else:
            listing.candidates.append(Candidate(image, None, NORMAL, 0))
    return listing


def _columns(header: list[str], path: Path) -> tuple[int, int | None, int]:
    """Positions of (image, class, pixels); class None: Severstal's ``ImageId_ClassId`` holds both."""
    lower = [h.strip().lower() for h in header]

    def find(names: tuple[str, ...]) -> int | None:
        return next((i for i, h in enumerate(lower) if h in names), None)

    pixels = find(PIXEL_COLUMNS)
    if "imageid_classid" in lower and pixels is not None:
        return lower.index("imageid_classid"), None, pixels
    image, cls = find(IMAGE_COLUMNS), find(CLASS_COLUMNS)
    if image is None or cls is None or pixels is None:
        raise DataError(
            f"--rle-csv {path}: header {header!r} lacks an image, a class or a pixels column; expected e.g. "
            "ImageId,ClassId,EncodedPixels (see docs/labels.md)"
        )
    return image, cls, pixels


def parse_runs(text: str) -> tuple[tuple[int, int], ...]:
    """``"start length start length ..."`` -> pairs; raises ValueError with the reason."""
    tokens = text.split()
    if len(tokens) % 2:
        raise ValueError(f"{len(tokens)} numbers: runs come in start-length pairs")
    values = [int(t) for t in tokens]
    pairs = tuple(zip(values[::2], values[1::2], strict=True))
    for start, length in pairs:
        if start < 1 or length < 1:
            raise ValueError(f"run {start} {length}: starts are 1-based and lengths at least 1")
    return pairs


def _class_name(value: str, names: dict[int, str]) -> str:
    value = value.strip()
    if value.isdigit():
        return names.get(int(value)) or default_name(int(value))
    return value


def import_rle_csv(
    rle_csv: str | Path, image_dir: str | Path | None = None, value_names: tuple[tuple[int, str], ...] = ()
) -> Listing:
    """A run-length CSV (Kaggle Severstal): one row per (image, class); an image of ``image_dir`` (default: the
    CSV's folder) without a row, or with empty pixels only, is normal."""
    path = Path(os.path.abspath(os.path.expanduser(str(rle_csv))))
    root = Path(os.path.abspath(os.path.expanduser(str(image_dir)))) if image_dir else path.parent
    if not root.is_dir():
        raise DataError(f"--image-dir {root}: not a folder; pass the folder that holds the CSV's images")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DataError(f"--rle-csv {path}: no such file; pass the run-length CSV") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"--rle-csv {path}: cannot read it ({e}); check the file") from None
    if not rows:
        raise DataError(f"--rle-csv {path}: empty; expected a header like ImageId,ClassId,EncodedPixels")
    names = dict(value_names)
    listing = Listing("rle_csv", {"rle_csv": str(path), "image_dir": str(root), "class_names": names})
    shapes, bad = _rle_rows(rows, path, names, listing)
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p) and not p.name.startswith("."))
    by_name = {p.relative_to(root).as_posix(): p for p in files}
    for name, image_shapes in shapes.items():
        image = str(root / name)
        if name in bad:
            listing.problems.append(Problem(image, bad[name][0], SKIPPED, bad[name][1]))
        elif image_shapes:
            source = PixelSource(RLE, str(path), shapes=tuple(image_shapes))
            listing.candidates.append(Candidate(image, None, NORMAL, LABEL_FROM_MASK, source))
        else:
            listing.candidates.append(Candidate(image, None, NORMAL, 0))
    listing.candidates += [Candidate(str(p), None, NORMAL, 0) for name, p in by_name.items() if name not in shapes]
    if not listing.candidates and not listing.problems:
        listing.problems.append(Problem(str(root), "no images", IGNORED, f"{path} names none and the folder is empty"))
    return listing


def _rle_rows(
    rows: list[list[str]], path: Path, names: dict[int, str], listing: Listing
) -> tuple[dict[str, list[Shape]], dict[str, tuple[str, str]]]:
    """The CSV's rows -> (image -> its shapes, image -> (reason, detail) of a problem that skips it)."""
    col_image, col_class, col_pixels = _columns(rows[0], path)
    shapes: dict[str, list[Shape]] = {}
    bad: dict[str, tuple[str, str]] = {}
    seen: Counter[tuple[str, str]] = Counter()
    for n, row in enumerate(rows[1:], 2):
        if not any(v.strip() for v in row):
            continue
        try:
            image = row[col_image].strip()
            if col_class is None:
                image, _, cls_text = image.rpartition("_")
            else:
                cls_text = row[col_class]
            pixels = row[col_pixels] if col_pixels < len(row) else ""
        except IndexError:
            listing.problems.append(Problem(str(path), "bad row", SKIPPED, f"row {n}: {len(row)} fields; fix the row"))
            continue
        cls = _class_name(cls_text, names)
        seen[(image, cls)] += 1
        shapes.setdefault(image, [])
        if seen[(image, cls)] == 2:
            bad[image] = (LISTED_TWICE, f"row {n} of {path}: class {cls!r} of this image is listed again; keep one row")
        if not pixels.strip():
            continue
        try:
            runs = parse_runs(pixels)
        except ValueError as e:
            bad.setdefault(image, (BAD_RLE, f"row {n} of {path}: {e}; fix the row"))
            continue
        shapes[image].append(Shape(cls, runs, f"row {n}"))
    return shapes, bad


def listing_with_labels(
    coco: str | None = None,
    rle_csv: str | None = None,
    image_dir: str | None = None,
    mask_format: str = "binary",
    class_names: str | None = None,
    **layout_options,
) -> Listing:
    """`raydefect.data.importers.listing_from_options` plus the label formats: ``--coco``, ``--rle-csv``, and
    ``--mask-format index`` over the classic or generic layout."""
    value_names = parse_class_names(class_names)
    layouts = [name for name, given in (("--coco", coco), ("--rle-csv", rle_csv)) if given is not None]
    others = any(v for v in layout_options.values())
    if layouts and (others or len(layouts) > 1):
        raise DataError(f"{layouts[0]} is a layout of its own; give it without other layout options")
    if image_dir is not None and not layouts:
        raise DataError("--image-dir goes with --coco or --rle-csv (the folder their file names are relative to)")
    if mask_format not in MASK_FORMATS:
        raise DataError(f"--mask-format {mask_format!r}: choose one of {', '.join(MASK_FORMATS)}")
    if coco is not None:
        if value_names:
            raise DataError("--class-names does not apply to --coco: the COCO file's categories name the classes")
        return import_coco(coco, image_dir)
    if rle_csv is not None:
        return import_rle_csv(rle_csv, image_dir, value_names)
    listing = listing_from_options(**layout_options)
    if mask_format == INDEX:
        if listing.importer == "mvtec":
            raise DataError("--mask-format index: MVTec AD masks are binary; drop the option")
        return with_index_masks(listing, value_names)
    if value_names:
        raise DataError("--class-names needs --mask-format index, --rle-csv or --coco")
    return listing
