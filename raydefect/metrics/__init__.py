"""Metrics for training validation and `raydefect evaluate`: image level, pixel level, thresholds, one summary.

Core code (numpy + scipy; accepts torch tensors without importing torch). Streaming accumulators collect batch by
batch and `merge` across data-parallel workers; `validation_summary` flattens them into the per-epoch dict.
"""

from raydefect.metrics.image import (
    ImageCurves,
    ImageMetricAccumulator,
    ImageMetrics,
    OperatingPoint,
    image_curves,
    image_metrics,
    operating_point,
)
from raydefect.metrics.pixel import (
    PixelCurves,
    PixelMetricAccumulator,
    PixelMetrics,
    SegmentationPoint,
    choose_pixel_threshold,
    mask_iou_dice,
    pixel_metrics,
)
from raydefect.metrics.summary import SCORE_NAME, class_key, composite_score, validation_summary
from raydefect.metrics.thresholds import (
    DEFAULT_FALLBACK_THRESHOLD,
    PIXEL_CRITERIA,
    ThresholdChoice,
    choose_image_threshold,
)

__all__ = [
    "DEFAULT_FALLBACK_THRESHOLD",
    "PIXEL_CRITERIA",
    "SCORE_NAME",
    "ImageCurves",
    "ImageMetricAccumulator",
    "ImageMetrics",
    "OperatingPoint",
    "PixelCurves",
    "PixelMetricAccumulator",
    "PixelMetrics",
    "SegmentationPoint",
    "ThresholdChoice",
    "choose_image_threshold",
    "choose_pixel_threshold",
    "class_key",
    "composite_score",
    "image_curves",
    "image_metrics",
    "mask_iou_dice",
    "operating_point",
    "pixel_metrics",
    "validation_summary",
]
