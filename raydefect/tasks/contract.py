"""The export's contract (the ``.json`` beside an ONNX / TorchScript file): how an image becomes the input, what
each output means, how the geometry cuts and stitches, and how outputs become decisions -- everything a runtime
without raydefect needs to reproduce raydefect's result."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raydefect.inference.graph import INPUT_NAME, PIXEL_CLASS_OUTPUT, has_pixel_classes

if TYPE_CHECKING:
    from raydefect.models.artifact import ArtifactMeta


def geometry_contract(meta: ArtifactMeta) -> dict[str, Any]:
    """How whole images become inputs and how outputs become the image's results, per `raydefect.geometry`."""
    g, s = meta.geometry, meta.image_size
    if g.mode == "square":
        return {"mode": "square", "resize": f"the whole image to {s}x{s} (aspect ratio not kept)"}
    if g.mode == "aspect":
        return {
            "mode": "aspect",
            "resize": f"the whole image so that its longer side is {s} (aspect ratio kept, each side rounded, >= 1), "
            f"pasted centred on a black (0) {s}x{s} canvas at ((S - w) // 2, (S - h) // 2)",
            "mask": "crop mask_prob to that rectangle, then resize it to the image's own size",
        }
    return {
        "mode": "tiles",
        "scale": g.scale,
        "tile_size": s,
        "tile_overlap": g.tile_overlap,
        "tiling": f"resize the image by scale (each side rounded, >= 1); tile starts along a side of length L: 0, "
        f"stride {s - g.tile_overlap} = tile_size - tile_overlap, while < L - tile_size, then L - tile_size (one "
        f"tile at 0 when L <= tile_size); pixels past the image are black (0); tiles row-major",
        "stitching": "mask_prob of each tile weighted by w(y, x) = r(y) * r(x), r(i) = min(1, (i + 1) / (overlap + "
        "1), (tile_size - i) / (overlap + 1)) for i < overlap or >= tile_size - overlap, else 1; the image's map "
        "= sum(w * p) / sum(w) over the tiles covering each pixel, then resized to the image's own size",
        "aggregation": "the image's defect_score is the maximum over its tiles; its class_probs are that tile's",
    }


def preprocessing_contract(meta: ArtifactMeta) -> dict[str, Any]:
    """How to turn an image into the input, and outputs into decisions: everything a non-raydefect runtime needs."""
    s = meta.image_size
    return {
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", 3, s, s],
            "layout": "NCHW",
            "color": "RGB (grayscale replicated to 3 channels; alpha dropped; EXIF orientation applied)",
            "resize": "per geometry (below), bilinear with antialiasing (PIL Image.resize(BILINEAR))",
            "scale": "x / 255",
            "mean": list(meta.mean),
            "std": list(meta.std),
            "normalize": "(x / 255 - mean) / std per channel",
        },
        "outputs": [
            {"name": "defect_score", "shape": ["batch"], "meaning": "1 - p(normal)"},
            {
                "name": "class_probs",
                "shape": ["batch", meta.num_classes],
                "meaning": "softmax over class_names; index 0 is normal",
            },
            {
                "name": "mask_prob",
                "shape": ["batch", s, s],
                "meaning": "per-pixel defect probability at the input size; resize bilinearly to the image's own size",
            },
            *pixel_class_outputs(meta),
        ],
        **pixel_class_contract(meta),
        "geometry": geometry_contract(meta),
        "class_names": list(meta.class_names),
        "thresholds": {"image": meta.image_threshold, "pixel": meta.pixel_threshold},
        "decision": (
            "defect when defect_score >= thresholds.image; its class is then the most probable of class_names[1:], "
            "else 'normal'. A pixel is defect when mask_prob (resized to the image) >= thresholds.pixel."
        ),
    }


def pixel_class_outputs(meta: ArtifactMeta) -> list[dict[str, Any]]:
    """The contract's fourth output, for a ``model.mask_classes`` model (none otherwise)."""
    if not has_pixel_classes(meta):
        return []
    s = meta.image_size
    return [
        {
            "name": PIXEL_CLASS_OUTPUT,
            "shape": ["batch", meta.num_classes, s, s],
            "meaning": "per-pixel class probabilities at the input size, softmax over class_names per pixel; "
            "channel 0 is background",
        }
    ]


def pixel_class_contract(meta: ArtifactMeta) -> dict[str, Any]:
    """How a ``model.mask_classes`` model's outputs become each pixel's class (`postprocess.class_ids`)."""
    if not has_pixel_classes(meta):
        return {}
    return {
        "pixel_classes": {
            "output": PIXEL_CLASS_OUTPUT,
            "class_ids": "resize mask_prob and each channel of pixel_class_probs to the image's own size (bilinear, "
            "as for the mask; per geometry); a pixel's class id is 0 (background) where mask_prob < "
            "thresholds.pixel, elsewhere 1 + argmax over channels 1..C-1 (the first on a tie): class_names[id]",
            "class_area_px": "pixels per class id > 0, by class name",
        }
    }
