"""`Predictor`: the batched PyTorch forward pass of a loaded model, and `make_predictor`, which picks the engine."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raydefect.geometry import predict_tiled
from raydefect.inference.device import PRECISIONS, resolve_device, resolve_engine
from raydefect.inference.graph import check_batch
from raydefect.inference.preprocess import Preprocessor

if TYPE_CHECKING:
    import torch

    from raydefect.models.artifact import LoadedModel


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
        from raydefect.inference.onnx_runtime import OnnxPredictor

        try:
            return OnnxPredictor(loaded, threads=threads)
        except Exception as e:
            if engine == "onnx":
                raise
            console.warn(f"ONNX Runtime engine unavailable for model {loaded.meta.model_id} ({e}); using PyTorch")
    return Predictor(loaded, device=device, precision=precision)


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
        """``defect_score`` [N] = 1 - p(normal), ``class_probs`` [N, C], ``mask_prob`` [N, S, S] and, for a
        ``model.mask_classes`` model, ``pixel_class_probs`` [N, C, S, S]; all float32, or the masks float16 with
        ``half_masks`` (cast on the device: half the bytes to copy and ship on; float16
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
            if out.pixel_class_logits is not None:  # model.mask_classes: [N, C, S, S], channel 0 = background
                pixel_class_probs = torch.softmax(out.pixel_class_logits.float(), dim=1)
                if half_masks:
                    pixel_class_probs = pixel_class_probs.half()
                result["pixel_class_probs"] = pixel_class_probs.cpu().numpy()
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
