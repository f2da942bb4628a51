"""Validation of one replica: the model over batches into image, pixel (and pixel-class) accumulators, as inference
scores images (under ``tiles`` whole images, tiled and stitched by `geometry.predict_tiled`); with the device
helpers training shares (`autocast`, `to_device`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from raydefect.geometry import predict_tiled
from raydefect.inference import Preprocessor
from raydefect.metrics import ImageMetricAccumulator, PixelMetricAccumulator
from raydefect.metrics.pixel_classes import PixelClassAccumulator, class_map
from raydefect.models.artifact import unwrap
from raydefect.models.losses import DefectLoss


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class Evaluation:
    """Accumulated validation (or test) results of one rank, mergeable across ranks."""

    image: ImageMetricAccumulator
    pixel: PixelMetricAccumulator
    loss_sum: float = 0.0
    images: int = 0
    classes: PixelClassAccumulator | None = None  # model.mask_classes: the pixel-class confusion matrix

    def merge(self, other: Evaluation) -> None:
        self.image.merge(other.image)
        self.pixel.merge(other.pixel)
        if other.classes is not None:
            if self.classes is None:
                self.classes = PixelClassAccumulator(other.classes.class_names)
            self.classes.merge(other.classes)
        self.loss_sum += other.loss_sum
        self.images += other.images

    @property
    def loss(self) -> float:
        return self.loss_sum / self.images if self.images else math.nan


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    class_names: Sequence[str],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    loss_fn: DefectLoss | None = None,
    pixel_threshold: float = 0.5,
    keep_per_image: bool = False,
) -> Evaluation:
    """Run the model over ``batches`` (eval mode) into image and pixel accumulators (+ the loss when given).

    Scores are what inference computes: ``defect_score = 1 - p(normal)``, mask probabilities = sigmoid. Images whose
    mask is unknown (``mask_valid`` False) count for image metrics only.
    """
    net = unwrap(model)
    was_training = net.training
    net.eval()
    result = Evaluation(
        ImageMetricAccumulator(class_names),
        PixelMetricAccumulator(threshold=pixel_threshold, keep_per_image=keep_per_image),
    )
    try:
        for batch in batches:
            if "whole" in batch:
                _evaluate_tiled(net, batch, result, device=device, amp_dtype=amp_dtype)
                continue
            batch = to_device(batch, device)
            with autocast(device, amp_dtype):
                out = net(batch["image"])
            if loss_fn is not None:
                loss = loss_fn(
                    out.class_logits, out.mask_logits, batch["class_id"], batch["mask"], batch["mask_valid"],
                    out.pixel_class_logits, batch.get("pixel_classes"),
                )  # fmt: skip
                result.loss_sum += float(loss.total) * int(batch["image"].shape[0])
            probs = torch.softmax(out.class_logits.float(), dim=1).cpu().numpy()
            labels = batch["label"].cpu().numpy()
            result.image.update(1.0 - probs[:, 0], labels, class_probs=probs, class_ids=batch["class_id"].cpu().numpy())
            valid = batch["mask_valid"].cpu().numpy()
            if valid.any():
                mask_prob = torch.sigmoid(out.mask_logits.float())[:, 0].cpu().numpy()
                truth = batch["mask"][:, 0].cpu().numpy() >= 0.5
                result.pixel.update(mask_prob[valid], truth[valid])
                if out.pixel_class_logits is not None and "pixel_classes" in batch:
                    if result.classes is None:
                        result.classes = PixelClassAccumulator(class_names)
                    pred = class_map(mask_prob, out.pixel_class_logits.float().cpu().numpy(), pixel_threshold)
                    result.classes.update(pred[valid], batch["pixel_classes"].cpu().numpy()[valid])
            result.images += int(batch["image"].shape[0])
    finally:
        net.train(was_training)
    return result


def _evaluate_tiled(
    net: nn.Module, batch: dict[str, Any], result: Evaluation, *, device: torch.device, amp_dtype: torch.dtype | None
) -> None:
    """Whole images under ``tiles``: tiled, predicted and stitched exactly as inference does
    (`geometry.predict_tiled`), so thresholds are chosen on whole images. No loss: ``val_loss`` is NaN."""
    geometry = net.geometry

    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        with autocast(device, amp_dtype):
            out = net(torch.from_numpy(x).to(device))
        probs = torch.softmax(out.class_logits.float(), dim=1)
        return {
            "defect_score": (1.0 - probs[:, 0]).cpu().numpy(),
            "class_probs": probs.cpu().numpy(),
            "mask_prob": torch.sigmoid(out.mask_logits.float())[:, 0].cpu().numpy(),
        }

    spec = net.spec
    pre = Preprocessor(image_size=geometry.image_size, mean=spec.mean, std=spec.std, geometry="tiles")
    tiled = predict_tiled(batch["whole"], geometry, pre.normalize_tiles, predict, batch_size=len(batch["whole"]) * 2)
    probs = np.stack([t.class_probs for t in tiled])
    labels = batch["label"].numpy()
    result.image.update(
        np.asarray([t.defect_score for t in tiled]), labels, class_probs=probs, class_ids=batch["class_id"].numpy()
    )
    valid = batch["mask_valid"].numpy()
    if valid.any():
        result.pixel.update(
            [t.mask_prob for t, ok in zip(tiled, valid, strict=True) if ok],
            [m for m, ok in zip(batch["masks"], valid, strict=True) if ok],
        )
    result.images += len(tiled)
    result.loss_sum = math.nan
