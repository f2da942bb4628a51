"""The core inference API (`preprocess` -> `predictor` or `onnx_runtime` -> `postprocess`; `device` picks where
and how a model runs, `graph` is the input/output contract every engine keeps),
which score (Ray Data), predict, evaluate and export build on. No Ray here.

One image's path through it::

    loaded = load_artifact("runs/x/model")                     # raydefect.models.artifact
    pre = Preprocessor(loaded.meta)                             # cheap: numpy + PIL, fine in CPU-only tasks
    x, (w, h) = pre.from_bytes(data, path="a.png")              # float32 [3, S, S], the image's own size
    out = Predictor(loaded).predict(np.stack([x, ...]))         # defect_score, class_probs, mask_prob [N, S, S]
    m = postprocess(out["mask_prob"][0], w, h, loaded.meta.pixel_threshold)   # mask at (h, w), PNG, area, bbox
    is_defect, defect_class = decide(out["defect_score"][0], out["class_probs"][0], loaded.meta)

Conventions (shared with training, so train and inference see the same pixels):

- the model's geometry (`raydefect.geometry`, stored in model.yaml) says how: the whole image resized to S x S
  (``square``) or letterboxed into it (``aspect``) with PIL's bilinear filter, which antialiases when shrinking
  (`resize_rgb`), or cut into S x S tiles whose masks are stitched back (``tiles``, `infer_images`); then
  normalised with the backbone's mean/std and laid out channels-first;
- ``defect_score = 1 - p(normal)``; an image is a defect when ``defect_score >= thresholds.image`` and its class is
  then the most probable defect class, else ``"normal"``;
- the S x S mask probability is upsampled bilinearly to the image's own (H, W) and a pixel is defect when
  ``prob >= thresholds.pixel``; ``bbox = (x0, y0, x1, y1)`` with x1, y1 exclusive (PIL's crop convention).
"""

from raydefect.inference.device import (
    ENGINES,
    PRECISIONS,
    cpu_has_native_bf16,
    resolve_device,
    resolve_engine,
    resolve_precision,
    resolve_scoring,
)
from raydefect.inference.graph import PIXEL_CLASS_OUTPUT, check_batch, has_pixel_classes
from raydefect.inference.postprocess import (
    MaskResult,
    bbox_of,
    class_areas,
    class_ids,
    decide,
    postprocess,
    upsample_prob,
)
from raydefect.inference.predictor import Predictor, infer_images, make_predictor
from raydefect.inference.preprocess import Preprocessor, resize_rgb

__all__ = [
    "ENGINES",
    "PIXEL_CLASS_OUTPUT",
    "PRECISIONS",
    "MaskResult",
    "Predictor",
    "Preprocessor",
    "bbox_of",
    "check_batch",
    "class_areas",
    "class_ids",
    "cpu_has_native_bf16",
    "decide",
    "has_pixel_classes",
    "infer_images",
    "make_predictor",
    "postprocess",
    "resize_rgb",
    "resolve_device",
    "resolve_engine",
    "resolve_precision",
    "resolve_scoring",
    "upsample_prob",
]
