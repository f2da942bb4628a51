"""Robust image and mask decoding, shared by every command.

One place decides how odd inputs become arrays, so prepare, train, score and predict agree:

- EXIF orientation is applied (sizes are reported *after* rotation);
- grayscale, palette, RGBA/LA, 16-bit and CMYK inputs are converted predictably: 16-bit is scaled to 8-bit by
  its full range (>> 8), alpha is dropped (composited onto black), CMYK and palette go through Pillow's converters;
- multi-frame files (animated GIF, multi-page TIFF) use their first frame;
- images declaring more pixels than a limit raise `ImageTooLargeError` *before* decoding (decompression bombs);
- anything undecodable or truncated raises `CorruptImageError` naming the file.

Masks are binarised at 128 (defect = value >= 128) and the number of soft (non-0/255) pixels is reported.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from raydefect.errors import CorruptImageError, ImageTooLargeError

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb threshold
MASK_THRESHOLD = 128
#: Defect classes in class-index order (1, 2, ...): saturated, distinct on grey metal, wrapping after 8. Overlays,
#: reports and the palette of class masks (`class_palette`: datasets, scores) all use them.
DEFECT_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 59, 48),  # red
    (255, 204, 0),  # yellow
    (0, 199, 255),  # cyan
    (191, 90, 242),  # purple
    (255, 149, 0),  # orange
    (255, 55, 175),  # pink
    (10, 132, 255),  # blue
    (172, 142, 104),  # brown
)

# Truncated files must fail loudly, never decode to half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# We check the pixel count ourselves (with a clear error); Pillow's global guard stays as a second line.
_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}

Source = str | Path | bytes | BinaryIO


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, without decoding pixels."""

    width: int  # after EXIF orientation
    height: int
    format: str | None
    mode: str
    frames: int


def _name(source: Source, path: str | Path | None) -> str | None:
    if path is not None:
        return str(path)
    if isinstance(source, (str, Path)):
        return str(source)
    return getattr(source, "name", None)


def _open(source: Source, name: str | None) -> Image.Image:
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise CorruptImageError(name, "empty file (0 bytes)", "re-copy or remove it")
            return Image.open(io.BytesIO(bytes(source)))
        if isinstance(source, (str, Path)):
            st = os.stat(source)  # follows links: a dangling link is "not found", a loop ELOOP
            if stat.S_ISDIR(st.st_mode):
                raise CorruptImageError(name, "is a directory, not an image")
            if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
                raise CorruptImageError(name, "not a regular file (FIFO, socket or device)", "remove it")
            if st.st_size == 0:
                raise CorruptImageError(name, "empty file (0 bytes)", "re-copy or remove it")
        return Image.open(source)
    except CorruptImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(name, f"too many pixels ({e})", "raise the pixel limit if genuine") from None
    except UnidentifiedImageError:
        raise CorruptImageError(name, "not a recognised image format", "check the file; it may be misnamed") from None
    except FileNotFoundError:
        raise CorruptImageError(name, "file not found") from None
    except PermissionError:
        raise CorruptImageError(name, "permission denied", "make it readable") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptImageError(name, "symbolic link loop", "fix or remove the link") from None
        raise CorruptImageError(name, f"cannot open: {e}") from None
    except (ValueError, SyntaxError) as e:
        raise CorruptImageError(name, f"cannot open: {e}") from None


def read_bytes(path: str | Path) -> bytes:
    """A local file's bytes, with the same typed errors as `decode_image` (a FIFO is refused, never read forever)."""
    name = str(path)
    try:
        # a plain open() of a FIFO blocks until a writer comes: open non-blocking, then check the type
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise CorruptImageError(name, "not a regular file (FIFO, socket or device)", "remove it")
            return f.read()
    except CorruptImageError:
        raise
    except FileNotFoundError:
        raise CorruptImageError(name, "file not found") from None
    except PermissionError:
        raise CorruptImageError(name, "permission denied", "make it readable") from None
    except IsADirectoryError:
        raise CorruptImageError(name, "is a directory, not an image") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptImageError(name, "symbolic link loop", "fix or remove the link") from None
        raise CorruptImageError(name, f"cannot read: {e.strerror or e}") from None


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # malformed EXIF must not make a readable image unusable
        return 1


def _check_pixels(img: Image.Image, name: str | None, max_pixels: int) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise CorruptImageError(name, f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise ImageTooLargeError(
            name,
            f"declares {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} (possible decompression bomb)",
            "raise data.max_image_pixels / score.max_image_pixels if the image is genuine",
        )


@contextlib.contextmanager
def _opened(source: Source, path: str | Path | None, max_pixels: int) -> Iterator[Image.Image]:
    """The image opened lazily (its header read) and its pixel count checked, Pillow's bomb warning silenced (the
    check says it once, as an error); closed when the block ends."""
    name = _name(source, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = _open(source, name)
        try:
            _check_pixels(img, name, max_pixels)
            yield img
        finally:
            img.close()


def read_info(source: Source, path: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Size (after EXIF orientation), format and mode from the header only: fast, no pixel decoding."""
    with _opened(source, path, max_pixels) as img:
        w, h = img.size
        if _orientation(img) in _SWAPS_AXES:
            w, h = h, w
        return ImageInfo(w, h, img.format, img.mode, int(getattr(img, "n_frames", 1) or 1))


def _to_uint8(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer/float modes -> 8-bit 'L' by scaling their full range."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16)
        return Image.fromarray((arr >> 8).astype(np.uint8), mode="L")
    if img.mode == "I":
        arr = np.asarray(img, dtype=np.int64)
        # PNG 16-bit greyscale decodes to mode "I" with values in [0, 65535]
        scale = 8 if arr.max(initial=0) > 255 else 0
        return Image.fromarray(np.clip(arr >> scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max(initial=0.0))
        arr = arr / hi * 255.0 if hi > 1.0 else arr * 255.0
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    return img


def _convert(img: Image.Image, mode: str) -> Image.Image:
    img = _to_uint8(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite onto black: transparent regions become 0, predictably.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "1":
        img = img.convert("L")
    if img.mode == mode:
        return img
    return img.convert(mode)  # CMYK, YCbCr, LAB, HSV, L <-> RGB


def rgb_array(img: Image.Image) -> np.ndarray:
    """An image already in memory as uint8 HxWx3 RGB, converted as `decode_image` converts a file's pixels (16-bit
    scaled by its full range, palette expanded, alpha composited onto black, CMYK and the rest through Pillow)."""
    return np.asarray(_convert(img, "RGB"))


def decode_image(
    source: Source,
    mode: str = "RGB",
    path: str | Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode to a uint8 array: HxWx3 for ``mode="RGB"``, HxW for ``mode="L"``.

    Raises `CorruptImageError` (typed, names the file) or `ImageTooLargeError`.
    """
    return decode_image_sized(source, mode, path, max_pixels)[0]


def decode_image_sized(
    source: Source,
    mode: str = "RGB",
    path: str | Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduce_to: int | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """`decode_image`, plus the image's full (width, height) after EXIF orientation.

    ``reduce_to=S``: the caller only needs the image at S x S (a model's input), so a JPEG is decoded at the smallest
    of 1/2, 1/4 or 1/8 scale whose sides are still >= S (libjpeg's DCT scaling, Pillow's ``Image.draft``); the array
    is then smaller than (width, height). A 2048x1536 JPEG for a 224 px model decodes and resizes 2.5-5x faster at
    1/4 scale (libjpeg still entropy-decodes every coefficient, so noisy files gain least). Other formats decode in
    full.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    name = _name(source, path)
    with _opened(source, path, max_pixels) as img:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        full_size = img.size
        if reduce_to and img.format == "JPEG" and min(img.size) >= 2 * int(reduce_to):
            img.draft(None, (int(reduce_to), int(reduce_to)))
        stored, decoded = full_size, img.size  # full_size: before draft; both before EXIF orientation
        try:
            img.load()
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(name, f"too many pixels ({e})") from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            reason = "truncated file" if "truncated" in str(e).lower() else f"cannot decode: {e}"
            raise CorruptImageError(name, reason, "re-copy the file or remove it") from None
        try:
            oriented = ImageOps.exif_transpose(img)
        except Exception:  # broken EXIF: keep the pixels as stored
            oriented = img
        out = _convert(oriented if oriented is not None else img, mode)
        arr = np.asarray(out, dtype=np.uint8)
        # rotated by EXIF (or not, if its EXIF was broken): the full size turns as the pixels did
        full = stored[::-1] if (arr.shape[1], arr.shape[0]) != decoded else stored
    if mode == "RGB" and arr.ndim == 2:  # pragma: no cover - _convert guarantees 3 channels
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr), (int(full[0]), int(full[1]))


@dataclass(frozen=True)
class Mask:
    """A binarised mask and what binarising it changed."""

    array: np.ndarray  # bool HxW
    soft_pixels: int  # pixels strictly between 0 and 255 before thresholding

    @property
    def area(self) -> int:
        return int(self.array.sum())

    @property
    def fraction(self) -> float:
        return float(self.array.mean()) if self.array.size else 0.0


def decode_mask(source: Source, path: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Mask:
    """Decode a mask image (any mode) and binarise it at 128. Colour masks use their luminance."""
    gray = decode_image(source, mode="L", path=path, max_pixels=max_pixels)
    soft = int(np.count_nonzero((gray > 0) & (gray < 255)))
    return Mask(gray >= MASK_THRESHOLD, soft)


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """Encode a uint8/bool array as PNG (bool -> 1-bit PNG, smallest and lossless)."""
    if array.dtype == bool:
        img = Image.fromarray(array).convert("1")
    else:
        img = Image.fromarray(np.ascontiguousarray(array))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png_mask(data: bytes) -> np.ndarray:
    """Inverse of `encode_png` for masks: bytes -> bool HxW. A class mask (`encode_class_png`, palette mode) is
    defect wherever its class id is not 0."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode == "P":
            return np.asarray(img) != 0
        return np.asarray(img.convert("L")) >= MASK_THRESHOLD


#: The PNG text chunk of a class mask that names its classes: a JSON list, index = pixel value (0 = background).
CLASS_NAMES_KEY = "raydefect:classes"


def class_palette(entries: int = 256) -> list[int]:
    """A PNG palette of ``entries`` colours: 0 black (background), then the overlays' class colours
    (`DEFECT_COLOURS`, class 1 first) repeated."""
    colours = [(0, 0, 0)] + [DEFECT_COLOURS[i % len(DEFECT_COLOURS)] for i in range(max(1, entries) - 1)]
    return [v for rgb in colours for v in rgb]


def encode_class_png(ids: np.ndarray, class_names: Sequence[str] | None = None, compress_level: int = 1) -> bytes:
    """Class ids (uint8 HxW, 0 = background) as an indexed (palette) PNG: viewers show each class in its overlay
    colour, readers get the ids back as the pixel values (`decode_class_png`, or ``np.asarray(Image.open(f))``).
    With ``class_names`` (index = class id) the names go into the PNG's ``CLASS_NAMES_KEY`` text chunk and the
    palette holds one colour per class (PNG then stores 1, 2 or 4 bits per pixel for few classes)."""
    array = np.ascontiguousarray(ids, dtype=np.uint8)
    h, w = array.shape
    img = Image.frombytes("P", (w, h), array.tobytes())
    img.putpalette(class_palette(len(class_names) if class_names else 256))
    info = None
    if class_names:
        info = PngInfo()
        info.add_text(CLASS_NAMES_KEY, json.dumps(list(class_names)))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level, pnginfo=info)
    return buf.getvalue()


def decode_class_png(data: bytes) -> tuple[np.ndarray, list[str] | None]:
    """Inverse of `encode_class_png`: (uint8 class ids HxW, the class names of its text chunk or None). A 0/255 or
    1-bit mask (a binary model's) comes back as ids 0/1."""
    with Image.open(io.BytesIO(data)) as img:
        text = getattr(img, "text", {}).get(CLASS_NAMES_KEY)
        ids = np.asarray(img, np.uint8) if img.mode == "P" else (np.asarray(img.convert("L")) >= MASK_THRESHOLD)
    return ids.astype(np.uint8), (json.loads(text) if text else None)


STATS_SIDE = 256


def image_stats(rgb: np.ndarray) -> tuple[float, float]:
    """(brightness, contrast) of a uint8 image: the mean and the standard deviation of its luma (ITU-R BT.601
    weights), both in [0, 1], on every k-th pixel so that at most about `STATS_SIDE` remain per side (cheap on camera
    images). The scorer records them per image as decoded, training per validation image decoded the same way, so a
    change of camera, light or product shows as drift (`metrics.drift`)."""
    rgb = np.asarray(rgb)
    if rgb.ndim >= 2:
        k = max(1, max(rgb.shape[:2]) // STATS_SIDE)
        rgb = rgb[::k, ::k]
    a = rgb.astype(np.float32)
    if a.size == 0:
        return 0.0, 0.0
    luma = a @ np.asarray([0.299, 0.587, 0.114], np.float32) if a.ndim == 3 and a.shape[-1] == 3 else a
    luma = luma / 255.0
    return float(luma.mean()), float(luma.std())
