"""Scanning one `raydefect prepare` candidate: read once (SHA-1 of the bytes, header size, full decode unless
``verify_pixels=False``, the mask decoded and binarised at 128, or rasterised to per-pixel classes), and what was
found (`Scanned`): kept, flagged or skipped with its problems. A picklable callable, so `raydefect.data.pool` runs it
on threads or forked processes."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from raydefect.data.importers import (
    BINARISED,
    KEPT_FLAGGED,
    LABEL_FROM_MASK,
    NORMAL,
    SKIPPED,
    Candidate,
    Problem,
)
from raydefect.data.labels import INDEX, LabelProblem, PixelSource, rasterise
from raydefect.errors import ImageError, ImageTooLargeError
from raydefect.imaging import (
    DEFAULT_MAX_PIXELS,
    MASK_THRESHOLD,
    decode_image,
    decode_mask,
    read_bytes,
    read_info,
)
from raydefect.paths import is_printable, printable_path


@dataclass
class Scanned:
    """What scanning one candidate found. `ok` False: skipped (its problems say why)."""

    candidate: Candidate
    ok: bool = False
    problems: list[Problem] = field(default_factory=list)
    sha1: str = ""
    size_bytes: int = 0
    width: int = 0
    height: int = 0
    label: int = 0
    defect_class: str = ""
    mask: str | None = None
    mask_fraction: float = 0.0
    soft_pixels: int = 0
    flags: list[str] = field(default_factory=list)
    class_areas: dict[str, int] = field(default_factory=dict)  # per-pixel classes: pixels per class


def _image_problem(path: str, err: ImageError, what: str) -> Problem:
    if isinstance(err, ImageTooLargeError):
        return Problem(path, f"{what} too large", SKIPPED, err.reason)
    return Problem(path, f"unreadable {what}", SKIPPED, err.reason)


@dataclass(frozen=True)
class Scanner:
    """Scans one candidate; a picklable callable so any executor can run it."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    verify_pixels: bool = True

    def __call__(self, c: Candidate) -> Scanned:
        s = Scanned(c)
        if not self._read_image(s, c):
            return s
        s.label, s.defect_class = c.label, c.defect_class
        if c.pixels is not None:
            return self._scan_pixels(s, c, c.pixels)
        if c.label == 0 or c.mask is None:
            if c.label == 1:
                s.problems.append(Problem(c.image, "missing mask", SKIPPED, "no mask file matches this image"))
                return s
            if c.label == LABEL_FROM_MASK:
                s.label, s.defect_class = 0, NORMAL
            s.ok = True
            return s
        return self._scan_mask(s, c, c.mask)

    def _read_image(self, s: Scanned, c: Candidate) -> bool:
        """The image's bytes (size, SHA-1) and size, into `s`; False, with the problem recorded, when it is skipped."""
        odd = [p for p in (c.image, c.mask) if p is not None and not is_printable(p)]
        if odd:  # the manifest, problems.csv and every reader need text paths: such a file cannot be listed
            detail = f"{printable_path(odd[0])}: rename it (undecodable bytes shown as \\xNN)"
            s.problems.append(Problem(c.image, "file name not UTF-8", SKIPPED, detail))
            return False
        try:
            data = read_bytes(c.image)
        except ImageError as e:
            s.problems.append(_image_problem(c.image, e, "image"))
            return False
        s.size_bytes = len(data)
        s.sha1 = hashlib.sha1(data).hexdigest()
        try:
            if self.verify_pixels:  # headers survive truncation; only a full decode finds it
                s.height, s.width = decode_image(data, mode="L", path=c.image, max_pixels=self.max_pixels).shape
            else:
                info = read_info(data, path=c.image, max_pixels=self.max_pixels)
                s.width, s.height = info.width, info.height
        except ImageError as e:
            s.problems.append(_image_problem(c.image, e, "image"))
            return False
        return True

    def _scan_mask(self, s: Scanned, c: Candidate, mask_path: str) -> Scanned:
        """A binary mask file: decoded, binarised at `MASK_THRESHOLD`, checked against the image's size."""
        if not os.path.isfile(mask_path):
            if c.label == LABEL_FROM_MASK:  # generic importer without classes: no mask, no defect
                s.label, s.defect_class, s.ok = 0, NORMAL, True
                return s
            s.problems.append(Problem(c.image, "missing mask", SKIPPED, f"expected {mask_path}"))
            return s
        try:
            mask = decode_mask(mask_path, max_pixels=self.max_pixels)
        except ImageError as e:
            s.problems.append(_image_problem(mask_path, e, "mask"))
            return s
        mh, mw = mask.array.shape
        if (mw, mh) != (s.width, s.height):
            detail = f"mask {mw}x{mh}, image {s.width}x{s.height} ({mask_path})"
            s.problems.append(Problem(c.image, "mask size mismatch", SKIPPED, detail))
            return s
        area = mask.area
        if area == 0 and mask.soft_pixels:  # values 1..127 only: class ids read as binary would vanish silently
            detail = (
                f"{mask.soft_pixels} pixels with values 1-127 and none >= {MASK_THRESHOLD} (binary masks mark defects "
                f"with values >= {MASK_THRESHOLD}); if the values are class ids, prepare with --mask-format index"
            )
            s.problems.append(Problem(mask_path, "mask looks like class indices", SKIPPED, detail))
            return s
        if c.label == LABEL_FROM_MASK and area == 0:
            s.label, s.defect_class, s.ok = 0, NORMAL, True
            return s
        s.label = 1
        s.mask = mask_path
        s.mask_fraction = mask.fraction
        s.soft_pixels = mask.soft_pixels
        if mask.soft_pixels:
            s.flags.append("soft_mask")
            detail = f"{mask.soft_pixels} pixels strictly between 0 and 255; defect = value >= {MASK_THRESHOLD}"
            s.problems.append(Problem(mask_path, "soft mask", BINARISED, detail))
        if area == 0:
            s.flags.append("empty_mask")
            s.problems.append(Problem(c.image, "empty mask", KEPT_FLAGGED, f"defect class {c.defect_class!r}"))
        s.ok = True
        return s

    def _scan_pixels(self, s: Scanned, c: Candidate, source: PixelSource) -> Scanned:
        """Per-pixel classes: the image's class is the class with the largest area; several classes: flagged."""
        if source.kind == INDEX and not os.path.isfile(source.file):
            if c.label == LABEL_FROM_MASK:
                s.label, s.defect_class, s.ok = 0, NORMAL, True
            else:
                s.problems.append(Problem(c.image, "missing mask", SKIPPED, f"expected {source.file}"))
            return s
        try:
            raster = rasterise(source, s.width, s.height, self.max_pixels)
        except ImageError as e:
            s.problems.append(_image_problem(source.file, e, "mask"))
            return s
        except LabelProblem as e:
            file, detail = (e.file, e.detail) if source.kind == INDEX else (c.image, f"{e.detail} ({e.file})")
            s.problems.append(Problem(file, e.reason, SKIPPED, detail))
            return s
        s.mask, s.class_areas = c.mask, raster.areas
        image_class = raster.image_class
        if image_class is None:
            if c.label == LABEL_FROM_MASK:
                s.label, s.defect_class, s.ok = 0, NORMAL, True
                return s
            s.label = 1
            s.flags.append("empty_mask")
            s.problems.append(Problem(c.image, "empty mask", KEPT_FLAGGED, f"defect class {c.defect_class!r}"))
            s.ok = True
            return s
        s.label, s.defect_class = 1, image_class
        s.mask_fraction = sum(raster.areas.values()) / float(s.width * s.height)
        if len(raster.areas) > 1:
            s.flags.append("multi_class")
        s.ok = True
        return s
