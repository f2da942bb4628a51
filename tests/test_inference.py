"""The core inference API: preprocessing, batched prediction, masks at the image's own size, decisions."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from raydefect.errors import CorruptImageError
from raydefect.imaging import decode_png_mask
from raydefect.inference import Predictor, Preprocessor, bbox_of, decide, postprocess, resize_rgb, upsample_prob
from raydefect.models.artifact import load_artifact, read_artifact_meta

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def meta(tiny_artifact):
    return read_artifact_meta(tiny_artifact)


@pytest.fixture(scope="module")
def predictor(tiny_artifact):
    return Predictor(load_artifact(tiny_artifact), device="cpu")


def test_preprocess_normalises_per_channel(meta):
    image = np.zeros((50, 70, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 0, 128, 255
    x = Preprocessor(meta)(image)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    expected = (np.array([0, 128, 255], np.float32) / 255 - MEAN) / STD
    assert np.allclose(x.reshape(3, -1), expected[:, None], atol=1e-5)


def test_preprocess_resizes_the_whole_image_without_cropping(meta):
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :40] = 255  # left half white: after a squash-resize it is still exactly the left half
    x = Preprocessor(meta)(image)
    white = (1 - MEAN) / STD
    assert np.allclose(x[:, :, :15], white[:, None, None], atol=1e-4)
    assert np.allclose(x[:, :, 17:], (-MEAN / STD)[:, None, None], atol=1e-4)


def test_grayscale_and_explicit_parameters():
    pre = Preprocessor(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = pre(np.full((8, 8), 255, np.uint8))
    assert x.shape == (3, 16, 16) and np.allclose(x, 1.0)
    from_spec = Preprocessor.for_backbone("dinov3_vits16", 32)
    assert from_spec.image_size == 32 and np.allclose(from_spec._scale.ravel(), 1 / (255 * STD))
    assert resize_rgb(np.zeros((16, 16, 3), np.uint8), 16).shape == (16, 16, 3)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        resize_rgb(np.zeros((4, 4, 3), np.float32), 8)


def test_from_bytes_reports_the_original_size(meta):
    x, size = Preprocessor(meta).from_bytes(_png(np.zeros((30, 45, 3), np.uint8)), path="a.png")
    assert size == (45, 30) and x.shape == (3, 32, 32)
    with pytest.raises(CorruptImageError, match="bad.png"):
        Preprocessor(meta).from_bytes(b"not an image", path="bad.png")


def test_predictor_outputs(predictor, meta):
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
    out = predictor.predict(batch)
    assert out["defect_score"].shape == (3,) and out["class_probs"].shape == (3, 3)
    assert out["mask_prob"].shape == (3, 32, 32) and out["mask_prob"].dtype == np.float32
    for v in out.values():
        assert ((v >= 0) & (v <= 1)).all()
    assert np.allclose(out["class_probs"].sum(axis=1), 1, atol=1e-5)
    assert np.allclose(out["defect_score"], 1 - out["class_probs"][:, 0], atol=1e-6)
    single = predictor.predict(batch[1:2])  # batch composition does not change a row's result
    assert np.allclose(single["mask_prob"][0], out["mask_prob"][1], atol=1e-5)
    assert predictor.precision == "fp32" and predictor.device.type == "cpu"
    half = predictor.predict(batch, half_masks=True)  # what the GPU model actors ship to the finish tasks
    assert half["mask_prob"].dtype == np.float16 and half["class_probs"].dtype == np.float32
    assert np.abs(half["mask_prob"].astype(np.float32) - out["mask_prob"]).max() <= 5e-4


def test_predictor_checks_its_input(predictor):
    with pytest.raises(ValueError, match=r"expected a float32 batch \[N, 3, 32, 32\]"):
        predictor.predict(np.zeros((1, 3, 64, 64), np.float32))
    empty = predictor.predict(np.zeros((0, 3, 32, 32), np.float32))
    assert empty["class_probs"].shape == (0, 3)
    with pytest.raises(ValueError, match="precision"):
        Predictor("never-loaded", precision="fp16")


def test_predictor_from_a_path(tiny_artifact, predictor):
    by_path = Predictor(tiny_artifact, device="cpu")
    x = np.zeros((1, 3, 32, 32), np.float32)
    assert np.allclose(by_path.predict(x)["defect_score"], predictor.predict(x)["defect_score"])
    assert by_path.meta.model_id == predictor.meta.model_id


def test_postprocess_mask_at_the_image_resolution():
    prob = np.zeros((4, 4), np.float32)
    prob[1:3, 1:3] = 1.0  # a square in the middle of the 4x4 model grid
    result = postprocess(prob, width=12, height=8, pixel_threshold=0.4)
    assert result.mask.shape == (8, 12) and result.mask.dtype == bool
    expected = np.zeros((8, 12), bool)
    expected[2:6, 3:9] = True  # the same square, scaled x3 horizontally and x2 vertically
    assert np.array_equal(result.mask, expected)
    assert result.area_px == 24 and result.fraction == pytest.approx(24 / 96)
    assert result.bbox == (3, 2, 9, 6)
    assert np.array_equal(decode_png_mask(result.png), expected)


def test_postprocess_empty_full_and_same_size():
    empty = postprocess(np.zeros((4, 4), np.float32), 7, 5, 0.5)
    assert empty.area_px == 0 and empty.bbox is None and empty.mask.shape == (5, 7)
    full = postprocess(np.full((4, 4), 0.7, np.float32), 9, 3, 0.5, encode=False)
    assert full.area_px == 27 and full.bbox == (0, 0, 9, 3) and full.png is None
    prob = np.zeros((4, 4), np.float32)
    prob[3, 0] = 0.9
    same = postprocess(prob, 4, 4, 0.5)
    assert same.bbox == (0, 3, 1, 4) and same.area_px == 1
    assert upsample_prob(prob, 4, 4) is not None and bbox_of(np.zeros((2, 2), bool)) is None


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.01])
def test_postprocess_skips_the_upsampling_exactly_when_nothing_can_reach_the_threshold(threshold):
    rng = np.random.default_rng(3)
    for trial in range(30):
        prob = rng.random((16, 16)).astype(np.float32)
        prob *= np.float32(threshold * (1 - 10.0 ** -rng.integers(1, 7)) / prob.max())  # max just under it
        if trial % 3 == 0:  # a blob at and over it: the full path, a mask that is not empty
            r, c = rng.integers(1, 14, 2)
            prob[r - 1 : r + 2, c - 1 : c + 2] = np.float32(threshold)
            prob[r, c] = np.float32(min(1.0, threshold * 1.05))
        fast = postprocess(prob, 301, 173, threshold)
        slow = upsample_prob(prob, 301, 173) >= threshold
        assert np.array_equal(fast.mask, slow) and fast.area_px == int(slow.sum())
        assert np.array_equal(decode_png_mask(fast.png), slow) and fast.bbox == bbox_of(slow)
        assert slow.any() == (trial % 3 == 0)


def test_decide_uses_the_stored_threshold(meta):
    assert decide(0.49, [0.51, 0.3, 0.19], meta) == (False, "normal")
    assert decide(0.5, [0.5, 0.2, 0.3], meta) == (True, "spot")  # argmax over defect classes only
    assert decide(0.9, [0.1, 0.6, 0.3], meta) == (True, "scratch")
    strict = dataclasses.replace(meta, thresholds={"image": 0.95, "pixel": 0.5})
    assert decide(0.9, [0.1, 0.6, 0.3], strict) == (False, "normal")


def test_bf16_autocast_on_cpu_is_close_to_fp32(tiny_artifact, predictor):
    bf16 = Predictor(tiny_artifact, device="cpu", precision="bf16")
    x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    a, b = predictor.predict(x), bf16.predict(x)
    assert bf16.precision == "bf16" and b["mask_prob"].dtype == np.float32
    assert np.abs(a["class_probs"] - b["class_probs"]).max() < 0.05


@pytest.mark.gpu
def test_cuda_auto_precision_is_bf16_and_matches_cpu(tiny_artifact, predictor):
    gpu = Predictor(tiny_artifact, device="cuda")
    assert gpu.precision == "bf16" and gpu.device.type == "cuda"
    x = np.random.default_rng(2).normal(size=(4, 3, 32, 32)).astype(np.float32)
    a, b = predictor.predict(x), gpu.predict(x)
    assert np.abs(a["class_probs"] - b["class_probs"]).max() < 0.05
    assert np.abs(a["mask_prob"] - b["mask_prob"]).max() < 0.05


def test_postprocess_upsamples_only_around_the_pixels_that_can_reach_the_threshold():
    """The cropped upsampling (a box around the model pixels at the threshold) gives the very mask of the full one:
    small hot spots anywhere, near the edges, two far apart, and odd enlargement factors."""
    rng = np.random.default_rng(11)
    cropped = 0
    for trial in range(200):
        side = int(rng.integers(4, 40))
        width, height = int(rng.integers(side, 420)), int(rng.integers(side, 320))
        prob = (rng.random((side, side)) * 0.4).astype(np.float32)
        prob[rng.integers(0, side), rng.integers(0, side)] = 0.9
        if trial % 2:
            prob[rng.integers(0, side), rng.integers(0, side)] = 0.7
        threshold = float(rng.choice([0.35, 0.41, 0.5, 0.65]))
        expected = upsample_prob(prob, width, height) >= threshold
        got = postprocess(prob, width, height, threshold)
        assert np.array_equal(got.mask, expected), (trial, side, width, height, threshold)
        assert got.area_px == int(expected.sum()) and got.bbox == bbox_of(expected)
        cropped += got.area_px < 0.1 * width * height
    assert cropped > 50  # most cases took the cropped path
