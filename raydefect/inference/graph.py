"""The predictor contract every engine keeps, and the graph `raydefect export` writes::

    input   image         float32 [N, 3, S, S]   RGB, resized whole to S x S, (x / 255 - mean) / std
    output  defect_score  float32 [N]            1 - p(normal)
            class_probs   float32 [N, C]         softmax over class_names (index 0 = normal)
            mask_prob     float32 [N, S, S]      sigmoid of the mask logits at the model's input size
            pixel_class_probs  float32 [N, C, S, S]   ``model.mask_classes`` only: softmax over the classes per
                                                      pixel (channel 0 = background)

A pixel's class (`postprocess.class_ids`): upsample ``mask_prob`` and each ``pixel_class_probs`` channel to the image
(bilinear), then 0 where the mask probability is below the pixel threshold, elsewhere ``1 + argmax`` over channels
1..C-1 (background never wins inside the mask).

Shared by the PyTorch predictor, the ONNX Runtime engine (`inference.onnx_runtime`) and the exporter
(`tasks.export`), so the three cannot drift apart.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raydefect import console

if TYPE_CHECKING:
    import torch

    from raydefect.models.artifact import ArtifactMeta


def check_batch(meta: ArtifactMeta, batch: np.ndarray | torch.Tensor) -> dict[str, np.ndarray] | None:
    """A predictor's input check: ``[N, 3, S, S]`` or `ValueError`; for N = 0 the (empty) outputs, else None."""
    s = meta.image_size
    shape = tuple(batch.shape)
    if len(shape) != 4 or shape[1:] != (3, s, s):
        raise ValueError(f"expected a float32 batch [N, 3, {s}, {s}] (see Preprocessor), got {shape}")
    if shape[0]:
        return None
    c = meta.num_classes
    empty = {
        "defect_score": np.zeros(0, np.float32),
        "class_probs": np.zeros((0, c), np.float32),
        "mask_prob": np.zeros((0, s, s), np.float32),
    }
    if has_pixel_classes(meta):
        empty[PIXEL_CLASS_OUTPUT] = np.zeros((0, c, s, s), np.float32)
    return empty


INPUT_NAME = "image"


OUTPUT_NAMES = ("defect_score", "class_probs", "mask_prob")
#: The fourth output of a ``model.mask_classes`` model's graph.
PIXEL_CLASS_OUTPUT = "pixel_class_probs"


def has_pixel_classes(meta: ArtifactMeta) -> bool:
    """True for a ``model.mask_classes`` model (per-pixel classes beside the binary mask)."""
    return bool(getattr(getattr(meta, "model", None), "mask_classes", False))


def output_names(meta: ArtifactMeta) -> tuple[str, ...]:
    """The graph's outputs for this model, in order: `OUTPUT_NAMES`, plus `PIXEL_CLASS_OUTPUT` with mask classes."""
    return (*OUTPUT_NAMES, PIXEL_CLASS_OUTPUT) if has_pixel_classes(meta) else OUTPUT_NAMES


#: Largest absolute difference allowed per output (all outputs are probabilities in [0, 1]).
DEFAULT_TOLERANCE = 1e-4


ONNX_INSTALL = "pip install 'raydefect[onnx]' (onnx, onnxscript, onnxruntime)"


#: ONNX protobufs cannot exceed 2 GiB; larger weights go to an external data file beside the model.
_ONNX_INLINE_LIMIT = 1_800_000_000


def export_wrapper(model: torch.nn.Module) -> torch.nn.Module:
    """DefectModel -> a module returning (defect_score, class_probs, mask_prob[, pixel_class_probs]), as
    `Predictor.predict` does (the fourth for a ``model.mask_classes`` model: `output_names`)."""
    import torch

    class ExportWrapper(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.net(image)
            class_probs = torch.softmax(out.class_logits.float(), dim=1)
            mask_prob = torch.sigmoid(out.mask_logits.float())[:, 0]
            if out.pixel_class_logits is None:
                return 1.0 - class_probs[:, 0], class_probs, mask_prob
            pixel_class_probs = torch.softmax(out.pixel_class_logits.float(), dim=1)
            return 1.0 - class_probs[:, 0], class_probs, mask_prob, pixel_class_probs

    return ExportWrapper(model).eval()


def parity_inputs(meta: ArtifactMeta, n: int, seed: int = 0) -> np.ndarray:
    """``n`` preprocessed images that look like inputs: smooth random shading plus noise and a few dark blobs."""
    from raydefect.inference.preprocess import Preprocessor

    rng = np.random.default_rng(seed)
    s = meta.image_size
    yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1)
    images = []
    for _ in range(n):
        base = 60 + 120 * (rng.random() * xx + rng.random() * yy) / 2
        img = base[:, :, None] + rng.normal(0, 12, (s, s, 3))
        for _ in range(rng.integers(1, 4)):  # dark spots: something defect-like for the mask head
            cy, cx = rng.integers(0, s, 2).tolist()
            r = max(1, int(rng.integers(1, max(2, s // 6))))
            img[(yy * (s - 1) - cy) ** 2 + (xx * (s - 1) - cx) ** 2 <= r * r] *= 0.3
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    pre = Preprocessor(meta)
    return np.stack([pre(im) for im in images]).astype(np.float32)


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """torch.onnx / jit.trace print progress and tracer warnings meant for PyTorch developers: keep them for -v."""
    import io
    import logging
    from contextlib import redirect_stdout

    if console.verbosity() >= 1:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(
    wrapper: Any,
    example: torch.Tensor,
    path: Path,
    opset: int | None,
    legacy: bool,
    outputs: tuple[str, ...] = OUTPUT_NAMES,
) -> None:
    """`wrapper` as an ONNX graph at `path`; `outputs`: its output names (`output_names` of the model)."""
    import torch

    n_params = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    common: dict[str, Any] = {
        "input_names": [INPUT_NAME],
        "output_names": list(outputs),
        "opset_version": opset,
    }
    if legacy:
        axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
        torch.onnx.export(wrapper, (example,), str(path), dynamo=False, dynamic_axes=axes, **common)
    else:
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=True,
            dynamic_shapes={"image": {0: batch}},
            external_data=n_params > _ONNX_INLINE_LIMIT,
            **common,
        )


def reference_outputs(model: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """`export_wrapper`'s outputs on `x`, by name (three, or four with per-pixel classes)."""
    import torch

    with torch.inference_mode():
        outs = model(torch.from_numpy(x))
    names = (*OUTPUT_NAMES, PIXEL_CLASS_OUTPUT)[: len(outs)]
    return {name: t.numpy() for name, t in zip(names, outs, strict=True)}


def short_error(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
