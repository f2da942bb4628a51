"""Importers: raw folders -> candidate records (image, mask or None, defect class, label).

Importers only *list* files and pair images with masks; they never open an image. `prepare` then checks every
candidate (readable, sizes, soft/empty masks, duplicates) in parallel. Three layouts are understood:

- classic: ``--defect-images DIR --defect-masks DIR --normal-images DIR``; a mask is matched by stem (any image
  extension, optional ``_mask`` suffix), the class is the first sub-folder under the defect folder (else "defect");
- MVTec AD: one category folder with ``train/good``, ``test/good``, ``test/<defect>/`` and
  ``ground_truth/<defect>/<stem>_mask.png``;
- generic: ``--images GLOB --mask-template TEMPLATE [--class-regex RE --normal-class NAME]``, e.g. the magnetic
  tile data set: ``--images 'MT_*/Imgs/*.jpg' --mask-template '{parent}/{stem}.png' --class-regex 'MT_(\\w+)/'
  --normal-class Free``.
"""

from __future__ import annotations

import csv
import os
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from raydefect.config import IMAGE_EXTENSIONS
from raydefect.data.labels import PixelSource
from raydefect.errors import DataError
from raydefect.paths import glob_files

NORMAL = "normal"
DEFAULT_DEFECT_CLASS = "defect"
LABEL_FROM_MASK = -1  # generic importer without classes: an empty or missing mask means normal
MASK_SUFFIXES = ("_mask",)
TEMPLATE_FIELDS = ("parent", "parent_name", "stem", "name", "suffix", "class")

# Problem actions. "ignored" marks stray files that never were candidates; everything else touched an image.
SKIPPED = "skipped"
IGNORED = "ignored"
KEPT_FLAGGED = "kept, flagged"
BINARISED = "binarised at 128"


@dataclass(frozen=True)
class Candidate:
    """One image an importer found: what it claims to be, before any file is opened."""

    image: str  # absolute path
    mask: str | None  # absolute path of the expected mask (it may not exist); None for normal images
    defect_class: str  # "normal" for normal images
    label: int  # 0 normal, 1 defect, LABEL_FROM_MASK: decided by the mask's content
    pixels: PixelSource | None = None  # per-pixel classes (index mask, COCO, run-length); None: a binary mask


@dataclass(frozen=True)
class Problem:
    """One row of problems.csv."""

    file: str
    reason: str
    action: str
    detail: str = ""


@dataclass
class Listing:
    """What an importer found: candidates plus problems seen while listing (stray files, orphan masks)."""

    importer: str
    arguments: dict
    candidates: list[Candidate] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _abs(path: str | Path) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def _folder(path: str | Path | None, option: str) -> Path | None:
    if path is None:
        return None
    p = Path(_abs(path))
    if not p.is_dir():
        what = "is a file, not a folder" if p.exists() else "does not exist"
        raise DataError(f"{option} {path}: {what}; pass the folder that holds the images")
    return p


def _walk(root: Path) -> tuple[list[Path], list[Problem]]:
    """Image files under `root` (sorted, recursive); other files become 'ignored' problems, hidden ones vanish."""
    images: list[Path] = []
    stray: list[Problem] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if is_image_file(path):
                images.append(path)
            else:
                stray.append(Problem(str(path), "not an image file", IGNORED, f"extension {path.suffix or '(none)'}"))
    return images, stray


def _mask_key(stem: str) -> str:
    for suffix in MASK_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _class_of(path: Path, root: Path) -> str:
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else DEFAULT_DEFECT_CLASS


def _check_class_name(name: str, where: str) -> None:
    if name == NORMAL:
        raise DataError(f"{where}: a defect class may not be called '{NORMAL}' (reserved for normal images); rename it")


def import_classic(
    defect_images: str | Path | None = None,
    defect_masks: str | Path | None = None,
    normal_images: str | Path | None = None,
) -> Listing:
    """The classic layout: defect images (class from the first sub-folder), their masks, normal images."""
    if defect_images is None and normal_images is None:
        raise DataError("give --defect-images DIR --defect-masks DIR and/or --normal-images DIR")
    if defect_images is not None and defect_masks is None:
        raise DataError("--defect-images needs --defect-masks DIR (masks are matched to images by file stem)")
    d_img = _folder(defect_images, "--defect-images")
    d_mask = _folder(defect_masks, "--defect-masks")
    n_img = _folder(normal_images, "--normal-images")
    listing = Listing(
        "classic",
        {
            "defect_images": str(d_img) if d_img else None,
            "defect_masks": str(d_mask) if d_mask else None,
            "normal_images": str(n_img) if n_img else None,
        },
    )
    if d_img is not None and d_mask is not None:
        images, stray = _walk(d_img)
        masks, stray_masks = _walk(d_mask)
        listing.problems += stray + stray_masks
        by_folder: dict[tuple[str, str], list[Path]] = {}
        by_stem: dict[str, list[Path]] = {}
        for m in masks:
            key = _mask_key(m.stem)
            by_folder.setdefault((m.parent.relative_to(d_mask).as_posix(), key), []).append(m)
            by_stem.setdefault(key, []).append(m)
        used: set[Path] = set()
        for img in images:
            cls = _class_of(img, d_img)
            _check_class_name(cls, f"--defect-images {d_img}")
            found = by_folder.get((img.parent.relative_to(d_img).as_posix(), img.stem)) or by_stem.get(img.stem, [])
            if len(found) > 1:
                names = ", ".join(str(m) for m in found)
                listing.problems.append(Problem(str(img), "ambiguous mask", SKIPPED, f"several masks match: {names}"))
                used.update(found)
                continue
            mask = found[0] if found else None
            if mask is not None:
                used.add(mask)
            listing.candidates.append(Candidate(str(img), str(mask) if mask else None, cls, 1))
        listing.problems += [
            Problem(str(m), "mask without image", IGNORED, "no defect image has this stem")
            for m in masks
            if m not in used
        ]
    if n_img is not None:
        images, stray = _walk(n_img)
        listing.problems += stray
        listing.candidates += [Candidate(str(p), None, NORMAL, 0) for p in images]
    return listing


def import_mvtec(root: str | Path) -> Listing:
    """One MVTec AD category (e.g. ``mvtec/bottle``). MVTec's own train/test split is ignored: train has no defects."""
    base = Path(_abs(root))
    _folder(base, "--mvtec")
    if not (base / "test").is_dir():
        categories = sorted(p.name for p in base.iterdir() if (p / "test").is_dir() and (p / "train").is_dir())
        if categories:
            raise DataError(
                f"--mvtec {root}: this is the MVTec AD root with categories {', '.join(categories)}; "
                f"pass one category folder, e.g. --mvtec {Path(root) / categories[0]} (one model per product)"
            )
        raise DataError(
            f"--mvtec {root}: not an MVTec AD category folder (expected train/good, test/ and ground_truth/)"
        )
    listing = Listing("mvtec", {"mvtec": str(base)})
    gt = base / "ground_truth"
    used: set[str] = set()
    for good in (base / "train" / "good", base / "test" / "good"):
        if good.is_dir():
            images, stray = _walk(good)
            listing.problems += stray
            listing.candidates += [Candidate(str(p), None, NORMAL, 0) for p in images]
    for defect_dir in sorted(p for p in (base / "test").iterdir() if p.is_dir() and p.name != "good"):
        _check_class_name(defect_dir.name, f"--mvtec {defect_dir}")
        images, stray = _walk(defect_dir)
        listing.problems += stray
        for img in images:
            mask = gt / defect_dir.name / f"{img.stem}_mask.png"
            used.add(str(mask))
            listing.candidates.append(Candidate(str(img), str(mask), defect_dir.name, 1))
    if gt.is_dir():
        masks, stray = _walk(gt)
        listing.problems += stray
        listing.problems += [
            Problem(str(m), "mask without image", IGNORED, "no test image has this stem")
            for m in masks
            if str(m) not in used
        ]
    return listing


def _check_template(template: str, has_class: bool) -> None:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DataError(f"--mask-template {template!r}: {e}; use fields like {{parent}}/{{stem}}.png") from None
    allowed = TEMPLATE_FIELDS if has_class else tuple(f for f in TEMPLATE_FIELDS if f != "class")
    bad = [n for n in names if n not in allowed]
    if bad:
        raise DataError(
            f"--mask-template {template!r}: unknown field(s) {', '.join('{' + b + '}' for b in bad)}; "
            f"valid fields: {', '.join('{' + a + '}' for a in allowed)}"
        )


def _compile_class_regex(pattern: str) -> re.Pattern:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise DataError(f"--class-regex {pattern!r}: invalid regular expression ({e})") from None
    if rx.groups < 1:
        raise DataError(f"--class-regex {pattern!r}: needs a group that captures the class, e.g. 'MT_(\\w+)/'")
    return rx


def _check_generic_options(
    patterns: list[str], mask_template: str | None, class_regex: str | None, normal_class: str | None
) -> None:
    if not patterns:
        raise DataError("--images needs a glob, e.g. --images 'data/**/*.png' (quote it so the shell leaves it alone)")
    if mask_template is None and class_regex is None:
        raise DataError("--images needs --mask-template (and/or --class-regex) to tell defects from normal images")
    if normal_class is not None and class_regex is None:
        raise DataError("--normal-class needs --class-regex (the class is taken from the path)")
    if mask_template is not None:
        _check_template(mask_template, class_regex is not None)


def _glob_images(patterns: list[str]) -> list[str]:
    """The files the globs match, each once, in the globs' order; folders and hidden files left out."""
    files: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        matched = glob_files(pattern)
        if not matched:
            raise DataError(
                f"--images {pattern!r} matched no files; check the pattern (quote it so the shell does not)"
            )
        for f in matched:
            a = _abs(f)
            # not only regular files: a dangling link, a link loop or a FIFO is scanned so it gets a recorded reason
            if a not in seen and not os.path.isdir(f) and not Path(f).name.startswith("."):
                seen.add(a)
                files.append(f)
    return files


def _class_in_path(f: str, rx: re.Pattern, class_regex: str) -> str | Problem:
    """The class `rx` captures in the image's path, or the problem that skips the image."""
    m = rx.search(Path(f).as_posix())
    if m is None:
        return Problem(_abs(f), "no class", SKIPPED, f"--class-regex {class_regex!r} no match")
    groups = m.groupdict()
    cls = groups.get("class") or m.group(1) or ""
    if not cls:
        return Problem(_abs(f), "no class", SKIPPED, "the class group matched nothing")
    return cls


def _mask_from_template(template: str, path: Path, cls: str) -> str:
    fields = {
        "parent": str(path.parent),
        "parent_name": path.parent.name,
        "stem": path.stem,
        "name": path.name,
        "suffix": path.suffix,
        "class": cls,
    }
    return _abs(template.format(**fields))


def import_generic(
    images: str | Sequence[str],
    mask_template: str | None = None,
    class_regex: str | None = None,
    normal_class: str | None = None,
) -> Listing:
    """Images from glob(s); masks from a template; classes from a regex over the path (as the glob returned it).

    Template fields: {parent} (the image's folder), {parent_name}, {stem}, {name}, {suffix} (with the dot) and
    {class}. A relative result is relative to the current folder, like the glob. Without --class-regex the label
    comes from the mask: a missing or empty mask means normal.
    """
    patterns = [images] if isinstance(images, str) else list(images)
    _check_generic_options(patterns, mask_template, class_regex, normal_class)
    rx = _compile_class_regex(class_regex) if class_regex is not None else None
    listing = Listing(
        "generic",
        {
            "images": patterns,
            "mask_template": mask_template,
            "class_regex": class_regex,
            "normal_class": normal_class,
            "cwd": os.getcwd(),  # relative globs and templates resolve against it
        },
    )
    classes_seen: set[str] = set()
    for f in _glob_images(patterns):
        path = Path(f)
        if not is_image_file(path):
            listing.problems.append(
                Problem(_abs(f), "not an image file", IGNORED, f"extension {path.suffix or '(none)'}")
            )
            continue
        cls = DEFAULT_DEFECT_CLASS
        if rx is not None:
            assert class_regex is not None
            found = _class_in_path(f, rx, class_regex)
            if isinstance(found, Problem):
                listing.problems.append(found)
                continue
            cls = found
            classes_seen.add(cls)
        mask = _mask_from_template(mask_template, path, cls) if mask_template is not None else None
        if rx is None:
            listing.candidates.append(Candidate(_abs(f), mask, DEFAULT_DEFECT_CLASS, LABEL_FROM_MASK))
        elif cls == normal_class or (normal_class is None and cls == NORMAL):
            listing.candidates.append(Candidate(_abs(f), None, NORMAL, 0))
        else:
            _check_class_name(cls, f"--class-regex {class_regex!r} on {f}")
            listing.candidates.append(Candidate(_abs(f), mask, cls, 1))
    if normal_class is not None and normal_class not in classes_seen:
        found_classes = ", ".join(sorted(classes_seen)) or "(none)"
        raise DataError(
            f"--normal-class {normal_class!r} matched no image; classes found by --class-regex: {found_classes}"
        )
    return listing


def listing_from_options(
    defect_images: str | None = None,
    defect_masks: str | None = None,
    normal_images: str | None = None,
    mvtec: str | None = None,
    images: Iterable[str] = (),
    mask_template: str | None = None,
    class_regex: str | None = None,
    normal_class: str | None = None,
) -> Listing:
    """Pick the one importer the CLI options ask for (mixing layouts in one run is an error)."""
    images = list(images)
    classic = any(x is not None for x in (defect_images, defect_masks, normal_images))
    generic = bool(images) or any(x is not None for x in (mask_template, class_regex, normal_class))
    chosen = [name for name, on in (("classic", classic), ("mvtec", mvtec is not None), ("generic", generic)) if on]
    if not chosen:
        raise DataError(
            "no input given; use one of: --defect-images/--defect-masks/--normal-images (classic layout), "
            "--mvtec DIR (MVTec AD), or --images GLOB --mask-template TEMPLATE (generic)"
        )
    if len(chosen) > 1:
        raise DataError(f"options of several layouts given ({' and '.join(chosen)}); prepare one layout per run")
    if classic:
        return import_classic(defect_images, defect_masks, normal_images)
    if mvtec is not None:
        return import_mvtec(mvtec)
    if not images:
        raise DataError("--mask-template/--class-regex/--normal-class need --images GLOB")
    return import_generic(images, mask_template, class_regex, normal_class)


# --- growing a dataset: its own images again, plus review sets ------------------------------------------------------

REVIEW_LABELS = "labels.csv"
NOT_REVIEWED = ("", "skip", "?")


def import_reviewed(folders: Sequence[str | Path]) -> Listing:
    """Review sets (`raydefect review --out DIR`) after a person checked them. Their ``labels.csv`` names each image
    (``file``), its mask (``mask``, the pre-label the reviewer corrected) and the class the reviewer settled on
    (``class``): ``normal`` (the mask is ignored), a defect class, or empty / ``skip`` to leave the image out."""
    listing = Listing("reviewed", {"reviewed": [_abs(f) for f in folders]})
    for folder in folders:
        root = _folder(folder, "--reviewed") or Path(_abs(folder))
        labels = root / REVIEW_LABELS
        if not labels.is_file():
            raise DataError(f"--reviewed {root}: no {REVIEW_LABELS}; pass a folder that `raydefect review --out` wrote")
        with labels.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not {"file", "mask", "class"} <= set(reader.fieldnames or []):
                raise DataError(f"{labels}: needs the columns file, mask and class (as `raydefect review` writes them)")
            for row in reader:
                cls = (row["class"] or "").strip()
                image = _abs(root / row["file"])
                if cls.lower() in NOT_REVIEWED:
                    listing.problems.append(Problem(image, "not reviewed", IGNORED, f"class {cls!r} in {labels}"))
                elif cls == NORMAL:
                    listing.candidates.append(Candidate(image, None, NORMAL, 0))
                else:
                    _check_class_name(cls, str(labels))
                    listing.candidates.append(Candidate(image, _abs(root / row["mask"]), cls, 1))
    return listing


def listing_from_dataset(out: str | Path) -> Listing:
    """The images of the dataset in `out` as candidates again (the files prepare read, with their classes), so a
    re-run can grow it without its raw folders: old images keep their split (by content), new ones join."""
    from raydefect.data.manifest import MANIFEST

    path = Path(_abs(out)) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{path} is missing: --reviewed without a layout option grows an existing dataset; pass its --out, or "
            "give the raw folders (e.g. --defect-images ...) as well"
        )
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path, columns=["original_image", "original_mask", "defect_class", "label"]).to_pylist()
    except Exception as e:  # any Arrow error: a damaged or foreign manifest
        raise DataError(f"{path}: cannot read the manifest ({e}); re-run prepare with the raw folders") from None
    listing = Listing("dataset", {"dataset": str(path.parent)})
    for r in rows:
        label = int(r["label"])
        mask = r["original_mask"] if label else None
        listing.candidates.append(Candidate(r["original_image"], mask, r["defect_class"], label))
    return listing


def merge_listings(first: Listing, *more: Listing) -> Listing:
    """One listing of several (the first one's images first: a duplicate keeps its first label)."""
    merged = Listing("+".join(x.importer for x in (first, *more)), dict(first.arguments))
    for x in (first, *more):
        merged.arguments.update(x.arguments if x is not first else {})
        merged.candidates += x.candidates
        merged.problems += x.problems
    return merged
