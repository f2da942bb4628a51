"""The core inference API that score (Ray Data), predict, evaluate and export build on. No Ray here.

One image's path through it::

    loaded = load_artifact("runs/x/model")                     # raydefect.models.artifact
    pre = Preprocessor(loaded.meta)                             # cheap: numpy + PIL, fine in CPU-only tasks
    x, (w, h) = pre.from_bytes(data, path="a.png")              # float32 [3, S, S], the image's own size
    out = Predictor(loaded).predict(np.stack([x, ...]))         # defect_score, class_probs, mask_prob [N, S, S]
    m = postprocess(out["mask_prob"][0], w, h, loaded.meta.pixel_threshold)   # mask at (h, w), PNG, area, bbox
    is_defect, defect_class = decide(out["defect_score"][0], out["class_probs"][0], loaded.meta)

Conventions (shared with training, so train and inference see the same pixels):

- the whole image is resized to S x S (no crop) with PIL's bilinear filter, which antialiases when shrinking
  (`resize_rgb`), then normalised with the backbone's mean/std and laid out channels-first;
- ``defect_score = 1 - p(normal)``; an image is a defect when ``defect_score >= thresholds.image`` and its class is
  then the most probable defect class, else ``"normal"``;
- the S x S mask probability is upsampled bilinearly to the image's own (H, W) and a pixel is defect when
  ``prob >= thresholds.pixel``; ``bbox = (x0, y0, x1, y1)`` with x1, y1 exclusive (PIL's crop convention).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from raydefect.geometry import content_of, fit_image, predict_tiled
from raydefect.imaging import DEFAULT_MAX_PIXELS, Source, decode_image_sized, encode_png

if TYPE_CHECKING:
    import torch

    from raydefect.models.artifact import ArtifactMeta, LoadedModel

PRECISIONS = ("auto", "bf16", "fp32")


def resize_rgb(image: np.ndarray, size: int, geometry: str = "square") -> np.ndarray:
    """uint8 HxWx3 (or HxW) -> uint8 size x size x 3, bilinear; ``aspect`` keeps the aspect ratio and pads
    (`raydefect.geometry.fit_image`). Whole image, no crop."""
    return fit_image(image, size, geometry)[0]


class Preprocessor:
    """uint8 HxWx3 -> float32 3xSxS, normalised. Built from an artifact's metadata or explicit values (training)."""

    def __init__(
        self,
        meta: ArtifactMeta | None = None,
        *,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        geometry: str = "square",
    ) -> None:
        if meta is not None:
            image_size, mean, std, geometry = meta.image_size, meta.mean, meta.std, meta.geometry.mode
        if image_size is None or mean is None or std is None:
            raise ValueError("Preprocessor needs an ArtifactMeta or image_size, mean and std")
        self.image_size = int(image_size)
        self.geometry = geometry
        std_arr = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self._scale = (1.0 / (255.0 * std_arr)).astype(np.float32)
        self._shift = (np.asarray(mean, dtype=np.float32).reshape(3, 1, 1) / std_arr).astype(np.float32)

    @classmethod
    def for_backbone(cls, backbone: str, image_size: int) -> Preprocessor:
        """The preprocessing a backbone expects (its mean/std) at the run's image size: for training code."""
        from raydefect.models.registry import resolve_backbone

        spec = resolve_backbone(backbone)
        return cls(image_size=image_size, mean=spec.mean, std=spec.std)

    def normalize(self, resized: np.ndarray) -> np.ndarray:
        """uint8 SxSx3 -> float32 3xSxS: ``(x / 255 - mean) / std``."""
        chw = resized.transpose(2, 0, 1).astype(np.float32)
        return chw * self._scale - self._shift

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.normalize(resize_rgb(image, self.image_size, self.geometry))

    def normalize_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 [T, t, t, 3] -> float32 [T, 3, t, t], normalised like `normalize`."""
        chw = tiles.transpose(0, 3, 1, 2).astype(np.float32)
        return chw * self._scale[None] - self._shift[None]

    def from_bytes(
        self,
        data: Source,
        path: str | Path | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        reduced_jpeg: bool = True,
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """Encoded image (bytes, path or file) -> (float32 3xSxS, (width, height) after EXIF orientation).

        ``reduced_jpeg``: a JPEG of at least twice S is decoded at reduced scale (`imaging.decode_image_sized`), as
        `raydefect score` does by default (``score.reduced_jpeg``).
        Raises `CorruptImageError` / `ImageTooLargeError` (both `ImageError`, with ``path`` and ``reason``), which
        bulk jobs record per item.
        """
        reduce_to = self.image_size if reduced_jpeg else None
        image, size = decode_image_sized(data, "RGB", path, max_pixels, reduce_to)
        return self(image), size


def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (the AVX512-BF16 or AMX-BF16 instructions of recent Xeon and EPYC
    CPUs), read from /proc/cpuinfo (other systems: False). Only there is bf16 worth it on a CPU: elsewhere PyTorch
    emulates it, slower than fp32. Measured on a 2-core AMD EPYC with AVX512-BF16 (ViT-S/16, 224 px, two threads):
    bf16 autocast 52-59 images/s against fp32's 19-21."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """Bulk scoring's precision (score.precision), 'bf16' or 'fp32'. ``auto``: bf16 autocast on GPUs and on CPUs that
    compute bf16 in hardware (`cpu_has_native_bf16`), fp32 elsewhere. ``device`` is a torch.device or its type;
    nothing heavy is imported. (`Predictor`'s own ``auto``, for predict and evaluate, keeps fp32 on every CPU: there
    its numbers must match the ones training validated, in fp32 on a CPU.)"""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    kind = str(getattr(device, "type", device))
    return "bf16" if kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16()) else "fp32"


ENGINES = ("auto", "torch", "onnx")


def resolve_engine(engine: str, device: str | torch.device, precision: str = "auto") -> str:
    """'torch' or 'onnx' (ONNX Runtime, CPU only, fp32). ``auto``: ONNX Runtime where the model runs in fp32 on a CPU
    (`resolve_precision`) and it is installed (the ``onnx`` extra), PyTorch otherwise (GPUs and CPUs with native
    bf16: bf16 autocast). An explicit 'onnx' with precision 'auto' runs in fp32. ``device`` is a torch.device or its
    type ("cpu", "cuda"); nothing heavy is imported here (the score driver calls it).

    Measured on the 2-core development CPU (ViT-S/16, 224 px, batch 16): ONNX Runtime 10.7-11.3 images/s against
    PyTorch eager 9.2-10.9 in the same runs, and no gain inside the score pipeline; hence PyTorch is the default."""
    from importlib.util import find_spec

    from raydefect.errors import ConfigError
    from raydefect.export import _ONNX_INSTALL

    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    kind = str(getattr(device, "type", device))
    if engine == "onnx" and not (kind == "cpu" and precision in ("auto", "fp32")):
        raise ConfigError(
            f"engine 'onnx' runs on CPU in fp32 only (here: {kind}, precision {precision}); use engine 'torch'"
        )
    available = all(find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
    if engine == "onnx" and not available:
        raise ConfigError(f"engine 'onnx' needs ONNX Runtime: {_ONNX_INSTALL}; or use engine 'torch'")
    if engine == "auto":
        return "onnx" if kind == "cpu" and resolve_precision(precision, kind) == "fp32" and available else "torch"
    return engine


def resolve_scoring(engine: str, device: str | torch.device, precision: str = "auto") -> tuple[str, str]:
    """What bulk scoring runs: (`resolve_engine`, the precision): ONNX Runtime in fp32, PyTorch in
    `resolve_precision`'s. Used by each model actor (`scoring.scorer.ModelStep`) and, for the run summary, by the
    score driver."""
    chosen = resolve_engine(engine, device, precision)
    return chosen, "fp32" if chosen == "onnx" else resolve_precision(precision, device)


def make_predictor(
    model: LoadedModel | str | Path,
    device: str = "auto",
    precision: str = "auto",
    engine: str = "torch",
    threads: int | None = None,
) -> Any:
    """`Predictor` or, by `resolve_engine`, `export.OnnxPredictor` (same ``predict``). With ``engine="auto"`` an
    ONNX export or parity failure falls back to PyTorch with a warning; with ``engine="onnx"`` it raises."""
    from raydefect import console
    from raydefect.models.artifact import LoadedModel, load_artifact

    loaded = model if isinstance(model, LoadedModel) else load_artifact(model, device="cpu")
    chosen = resolve_engine(engine, resolve_device(device), precision)
    if chosen == "onnx":
        from raydefect.export import OnnxPredictor

        try:
            return OnnxPredictor(loaded, threads=threads)
        except Exception as e:
            if engine == "onnx":
                raise
            console.warn(f"ONNX Runtime engine unavailable for model {loaded.meta.model_id} ({e}); using PyTorch")
    return Predictor(loaded, device=device, precision=precision)


def check_batch(meta: ArtifactMeta, batch: np.ndarray | torch.Tensor) -> dict[str, np.ndarray] | None:
    """A predictor's input check: ``[N, 3, S, S]`` or `ValueError`; for N = 0 the (empty) outputs, else None."""
    s = meta.image_size
    shape = tuple(batch.shape)
    if len(shape) != 4 or shape[1:] != (3, s, s):
        raise ValueError(f"expected a float32 batch [N, 3, {s}, {s}] (see Preprocessor), got {shape}")
    if shape[0]:
        return None
    c = meta.num_classes
    return {
        "defect_score": np.zeros(0, np.float32),
        "class_probs": np.zeros((0, c), np.float32),
        "mask_prob": np.zeros((0, s, s), np.float32),
    }


class Predictor:
    """Batched forward pass of a loaded model: ``predict(float32 [N, 3, S, S]) -> dict of numpy arrays``.

    ``precision="auto"`` runs bf16 autocast on CUDA and fp32 on CPU, as training validates (bulk scoring resolves
    its own ``auto`` first: `resolve_precision`). Inputs are pinned and copied non-blocking on
    CUDA; everything runs under ``torch.inference_mode``.
    """

    def __init__(self, model: LoadedModel | str | Path, device: str = "auto", precision: str = "auto") -> None:
        import torch

        from raydefect.models.artifact import LoadedModel, load_artifact

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = resolve_device(device)
        bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.precision = "bf16" if bf16 else "fp32"
        self.amp_dtype = torch.bfloat16 if self.precision == "bf16" else None
        loaded = model if isinstance(model, LoadedModel) else load_artifact(model, device="cpu")
        self.meta = loaded.meta
        self.model = loaded.model.to(self.device).eval()
        self.engine = "torch"

    @property
    def image_size(self) -> int:
        return self.meta.image_size

    def predict(self, batch: np.ndarray | torch.Tensor, *, half_masks: bool = False) -> dict[str, np.ndarray]:
        """``defect_score`` [N] = 1 - p(normal), ``class_probs`` [N, C], ``mask_prob`` [N, S, S]; all float32, or
        ``mask_prob`` float16 with ``half_masks`` (cast on the device: half the bytes to copy and ship on; float16
        keeps a probability to 0.05 %, finer than the bf16 model computed it)."""
        import torch

        empty = check_batch(self.meta, batch)
        if empty is not None:
            return empty
        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch, np.float32))
        x = x.float()
        if self.device.type == "cuda":
            x = (x.pin_memory() if not x.is_cuda else x).to(self.device, non_blocking=True)
        else:
            x = x.to(self.device)
        with torch.inference_mode():
            if self.amp_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.amp_dtype):
                    out = self.model(x)
            else:
                out = self.model(x)
            class_probs = torch.softmax(out.class_logits.float(), dim=1)
            mask_prob = torch.sigmoid(out.mask_logits.float())[:, 0]
            if half_masks:
                mask_prob = mask_prob.half()
            result = {
                "defect_score": (1.0 - class_probs[:, 0]).cpu().numpy(),
                "class_probs": class_probs.cpu().numpy(),
                "mask_prob": mask_prob.cpu().numpy(),
            }
        return result


def infer_images(predictor: Any, images: Sequence[np.ndarray], batch_size: int = 16) -> dict[str, Any]:
    """Whole uint8 HxWx3 images through any predictor (`Predictor`, `OnnxPredictor`) in its model's geometry:
    ``defect_score`` [N], ``class_probs`` [N, C] and ``mask_prob``, a list of 2-D maps for `postprocess` (the model's
    square, or under ``tiles`` the stitched map at the scaled image size). Tiles are batched across the images."""
    meta = predictor.meta
    pre = Preprocessor(meta)
    if not images:
        return {"defect_score": np.zeros(0), "class_probs": np.zeros((0, meta.num_classes)), "mask_prob": []}
    if meta.geometry.tiled:
        tiled = predict_tiled(list(images), meta.geometry, pre.normalize_tiles, predictor.predict, batch_size)
        return {
            "defect_score": np.asarray([t.defect_score for t in tiled], np.float32),
            "class_probs": np.stack([t.class_probs for t in tiled]),
            "mask_prob": [t.mask_prob for t in tiled],
        }
    out = predictor.predict(np.stack([pre(image) for image in images]))
    return {**out, "mask_prob": list(out["mask_prob"])}


@dataclass(frozen=True)
class MaskResult:
    """A predicted mask at the image's own resolution."""

    mask: np.ndarray  # bool HxW
    png: bytes | None  # 1-bit PNG (imaging.encode_png); None when not requested
    area_px: int
    fraction: float
    bbox: tuple[int, int, int, int] | None  # (x0, y0, x1, y1), x1/y1 exclusive; None for an empty mask


def upsample_prob(mask_prob: np.ndarray, width: int, height: int, geometry: str = "square") -> np.ndarray:
    """float SxS probabilities -> float32 HxW, bilinear (PIL, half-pixel centres; antialiased when shrinking); under
    ``aspect`` from the image's part of the square only."""
    prob = content_of(np.asarray(mask_prob, dtype=np.float32), width, height, geometry)
    if prob.ndim != 2:
        raise ValueError(f"mask_prob must be 2-D (S x S), got shape {prob.shape}")
    if prob.shape == (height, width):
        return prob
    resized = Image.fromarray(prob).resize((int(width), int(height)), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def bbox_of(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _below(threshold: float) -> float:
    """A bound safely under ``threshold``: float32 rounding in the resize may lift a value by a few ulps."""
    return float(threshold) - 1e-5 * max(1.0, abs(float(threshold)))


@functools.lru_cache(maxsize=64)
def _empty_png(width: int, height: int) -> bytes:
    return encode_png(np.zeros((height, width), bool))


def _upsampled_mask(prob: np.ndarray, width: int, height: int, threshold: float) -> np.ndarray:
    """``upsample_prob(prob, width, height) >= threshold``, upsampling only the part of the image that can reach it.

    An output pixel of a bilinear enlargement mixes the 2x2 model pixels around its centre, so it can reach the
    threshold only near a model pixel that does: the box around those (plus a pixel of margin on each side) is
    upsampled with PIL's ``box`` (the same sampling positions as the full image), the rest of the mask is False.
    On a 3-megapixel image with a small defect this takes the upsampling from ~13 ms to well under one. When the
    image is smaller than the model's grid on either side (antialiased shrinking, wider support) the whole image
    is upsampled."""
    if prob.ndim != 2 or width < prob.shape[1] or height < prob.shape[0]:
        return upsample_prob(prob, width, height) >= threshold
    rows_in, cols_in = prob.shape
    hot = prob >= _below(threshold)
    rows, cols = np.flatnonzero(hot.any(axis=1)), np.flatnonzero(hot.any(axis=0))
    sx, sy = width / cols_in, height / rows_in
    x0, x1 = max(0, int(np.floor((cols[0] - 1) * sx)) - 1), min(width, int(np.ceil((cols[-1] + 2) * sx)) + 1)
    y0, y1 = max(0, int(np.floor((rows[0] - 1) * sy)) - 1), min(height, int(np.ceil((rows[-1] + 2) * sy)) + 1)
    if (x1 - x0) * (y1 - y0) >= 0.5 * width * height:
        return upsample_prob(prob, width, height) >= threshold
    crop = Image.fromarray(prob).resize(
        (x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=(x0 / sx, y0 / sy, x1 / sx, y1 / sy)
    )
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = np.asarray(crop, dtype=np.float32) >= threshold
    return mask


def postprocess(
    mask_prob: np.ndarray,
    width: int,
    height: int,
    pixel_threshold: float,
    *,
    encode: bool = True,
    geometry: str = "square",
) -> MaskResult:
    """Upsample the probability to (height, width), threshold (``>=``), and describe the mask. ``geometry``: the
    model's (`raydefect.geometry`); under ``aspect`` only the image's part of the square is used."""
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be >= 1, got {width}x{height}")
    prob = content_of(np.asarray(mask_prob, dtype=np.float32), int(width), int(height), geometry)
    if prob.ndim == 2 and float(prob.max(initial=0.0)) < _below(pixel_threshold):
        # Bilinear upsampling weighs input pixels with non-negative weights that sum to 1, so no output pixel exceeds
        # the input's maximum: the full-size mask is empty, known without upsampling (most images of a nightly run).
        return MaskResult(
            mask=np.zeros((int(height), int(width)), bool),
            png=_empty_png(int(width), int(height)) if encode else None,
            area_px=0,
            fraction=0.0,
            bbox=None,
        )
    mask = _upsampled_mask(prob, int(width), int(height), pixel_threshold)
    area = int(np.count_nonzero(mask))
    return MaskResult(
        mask=mask,
        png=encode_png(mask) if encode else None,
        area_px=area,
        fraction=area / float(mask.size),
        bbox=bbox_of(mask),
    )


def decide(defect_score: Any, class_probs: Any, meta: ArtifactMeta) -> tuple[bool, str]:
    """Image-level decision with the stored threshold -> (is_defect, defect_class); ``"normal"`` when not defect."""
    is_defect = float(defect_score) >= meta.image_threshold
    if not is_defect:
        return False, meta.class_names[0]
    probs = np.asarray(class_probs, dtype=np.float64)
    if probs.shape != (meta.num_classes,):
        raise ValueError(f"class_probs must have {meta.num_classes} entries, got shape {probs.shape}")
    return True, meta.class_names[1 + int(np.argmax(probs[1:]))]
