"""Input geometry: letterboxing (``aspect``) and tiles -- placement, stitching pinned exactly, the tile sampler."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from raydefect.config import DataConfig, load_config
from raydefect.errors import ConfigError
from raydefect.geometry import (
    Box,
    Geometry,
    Stitcher,
    aggregate_tiles,
    blend_window,
    content_of,
    cut_tiles,
    fit_image,
    fit_mask,
    letterbox_box,
    sample_tile,
    tile_boxes,
    tile_starts,
)
from raydefect.inference import postprocess, upsample_prob


def test_letterbox_keeps_the_aspect_ratio_and_centres():
    assert letterbox_box(400, 100, 64) == Box(0, 24, 64, 16)
    assert letterbox_box(100, 400, 64) == Box(24, 0, 16, 64)
    assert letterbox_box(50, 50, 64) == Box(0, 0, 64, 64)
    assert letterbox_box(5000, 1, 64) == Box(0, 31, 64, 1)  # a 1-px strip keeps one row


def test_aspect_image_and_mask_land_in_the_same_rectangle():
    image = np.full((50, 200, 3), 200, np.uint8)
    mask = np.zeros((50, 200), bool)
    mask[10:20, 100:140] = True
    fitted, content = fit_image(image, 64, "aspect")
    box = letterbox_box(200, 50, 64)
    assert fitted.shape == (64, 64, 3) and content.sum() == box.w * box.h
    assert (fitted[~content] == 0).all() and (fitted[content] == 200).all()
    m = fit_mask(mask, 64, "aspect")
    assert not m[~content].any() and m[content].any()
    square, everywhere = fit_image(image, 64, "square")
    assert square.shape == (64, 64, 3) and everywhere.all()


def test_a_known_mask_comes_back_identical_at_full_size_under_aspect():
    """Identity logits: the letterboxed truth as probabilities, postprocessed, is the truth at the image's size."""
    truth = np.zeros((60, 120), bool)
    truth[10:30, 20:50] = True
    truth[44:46, 80:118] = True  # a 2-px line
    prob = fit_mask(truth, 240, "aspect").astype(np.float32)  # exact 2x scale
    out = postprocess(prob, 120, 60, 0.5, encode=False, geometry="aspect")
    assert np.array_equal(out.mask, truth)
    assert content_of(prob, 120, 60, "aspect").shape == (120, 240)
    assert upsample_prob(prob, 120, 60, "aspect").shape == (60, 120)


def test_tile_starts_cover_the_side_with_the_last_tile_flush():
    assert tile_starts(100, 128, 16) == [0]
    assert tile_starts(128, 128, 16) == [0]
    assert tile_starts(300, 128, 32) == [0, 96, 172]
    for length in (129, 500, 1999):
        starts = tile_starts(length, 128, 32)
        assert starts[-1] + 128 == length and all(b - a <= 96 for a, b in itertools.pairwise(starts))


def test_stitching_a_known_mask_through_identity_logits_is_exact():
    rng = np.random.default_rng(0)
    truth = rng.random((301, 517)) < 0.1
    for tile, overlap in ((64, 0), (64, 16), (128, 32), (600, 32)):
        boxes = tile_boxes(517, 301, tile, overlap)
        stitch = Stitcher(517, 301, tile, overlap)
        padded = cut_tiles(np.repeat(truth[:, :, None].astype(np.uint8) * 255, 3, axis=2), boxes)
        for b, t in zip(boxes, padded, strict=True):
            stitch.add(b, t[None, :, :, 0].astype(np.float32) / 255.0)
        assert np.array_equal(stitch.result()[0] >= 0.5, truth), (tile, overlap)
        assert np.allclose(stitch.result()[0], truth.astype(np.float32), atol=1e-6)


def test_overlap_seams_fade_instead_of_jumping():
    """Two tiles that disagree on their overlap give a ramp across it, not a step at one column."""
    stitch = Stitcher(96, 64, 64, 32)
    left, right = Box(0, 0, 64, 64), Box(32, 0, 64, 64)
    stitch.add(left, np.zeros((1, 64, 64), np.float32))
    stitch.add(right, np.ones((1, 64, 64), np.float32))
    row = stitch.result()[0, 32]
    assert row[0] == 0.0 and row[-1] == 1.0
    overlap = row[32:64]
    assert (np.diff(overlap) > 0).all() and np.abs(np.diff(overlap)).max() < 0.1
    window = blend_window(64, 16)
    assert window.min() > 0 and np.allclose(window, window.T) and window[32, 32] == 1.0


def test_image_score_is_the_highest_tile_and_its_class():
    score, probs = aggregate_tiles(np.array([0.1, 0.9, 0.3]), np.array([[0.9, 0.1], [0.1, 0.9], [0.7, 0.3]]))
    assert score == 0.9 and probs.tolist() == [0.1, 0.9]


def test_sampler_centres_on_defects_at_share_one_and_stays_inside():
    mask = np.zeros((400, 1000), bool)
    mask[300, 900] = True
    rng = np.random.default_rng(1)
    for _ in range(50):
        box, has_defect = sample_tile(mask, 128, rng, defect_share=1.0)
        assert has_defect and 0 <= box.x <= 1000 - 128 and 0 <= box.y <= 400 - 128
    hits = sum(sample_tile(mask, 128, rng, defect_share=0.0)[1] for _ in range(200))
    assert hits < 20  # anywhere: the one defect pixel is rarely inside
    small, has = sample_tile(np.ones((10, 20), bool), 128, rng, 0.5)
    assert small == Box(0, 0, 128, 128) and has


def test_geometry_config_keys_and_artifact_dict():
    cfg = load_config(None, sets=["data.geometry=tiles", "data.tile_size=256"])
    g = Geometry.from_data_config(cfg.data)
    assert (g.mode, g.image_size, g.scale, g.tile_overlap) == ("tiles", 256, 1.0, 64)
    assert Geometry.from_dict(g.to_dict(), 999) == g
    assert Geometry.from_dict(None, 64) == Geometry("square", 64)
    # what `train` announces: the tile size under tiles, never data.image_size
    assert g.describe() == "on 256 px tiles (scale 1, overlap 64)"
    assert Geometry("aspect", 192).describe() == "at 192 px (aspect kept)" and Geometry().describe() == "at 224 px"
    with pytest.raises(ConfigError, match="data.geometry"):
        DataConfig(geometry="crop")
    with pytest.raises(ConfigError, match="data.tile_overlap"):
        DataConfig(tile_size=64, tile_overlap=40)
    with pytest.raises(ConfigError, match=r"data\.tile_size: 250 is not a multiple"):
        load_config(None, sets=["data.geometry=tiles", "data.tile_size=250"])


def test_aspect_trains_into_an_artifact_whose_masks_have_each_images_size(synth_dataset, make_train_config, tmp_path):
    """A CNN trained under ``aspect``: model.yaml records it, and inference letterboxes and un-letterboxes."""
    import torch

    from raydefect.engine.fit import fit
    from raydefect.imaging import decode_image
    from raydefect.inference import Predictor, Preprocessor
    from raydefect.models.artifact import load_artifact

    torch.set_num_threads(1)
    cfg = make_train_config(
        synth_dataset.root,
        tmp_path,
        "model.backbone=test-tiny-cnn",
        "model.pretrained=false",
        "model.weights=null",
        "data.image_size=64",
        "data.geometry=aspect",
        "schedule.frozen_epochs=0",
        "schedule.partial_epochs=0",
        "schedule.full_epochs=1",
    )
    fit(cfg, synth_dataset, tmp_path / "run", device="cpu")
    loaded = load_artifact(tmp_path / "run" / "model")
    assert loaded.meta.geometry == Geometry("aspect", 64)
    assert loaded.meta.to_dict()["geometry"] == {"mode": "aspect"}
    image = decode_image(synth_dataset.frame("test")["image"].iloc[0])[:40]  # a wide crop: 64 x 40
    pre = Preprocessor(loaded.meta)
    x = pre(image)
    assert x.shape == (3, 64, 64) and pre.geometry == "aspect"
    out = Predictor(loaded, device="cpu").predict(x[None])
    mask = postprocess(out["mask_prob"][0], 64, 40, 0.0, encode=False, geometry=loaded.meta.geometry.mode).mask
    assert mask.shape == (40, 64) and mask.all()  # threshold 0: every pixel of the image, none of the padding


def test_augmenter_letterboxes_like_inference_under_aspect():
    from raydefect.engine.data import Augmenter

    cfg = DataConfig(
        image_size=64, geometry="aspect", scale_min=1.0, hflip=False, vflip=False, rot90=False, brightness=0.0,
        contrast=0.0,
    )  # fmt: skip
    image = np.full((30, 120, 3), 180, np.uint8)
    mask = np.zeros((30, 120), bool)
    mask[:, 60:] = True
    img, msk = Augmenter(cfg)(image, mask, np.random.default_rng(0))
    fitted, content = fit_image(image, 64, "aspect")
    assert np.array_equal(img.astype(np.uint8), fitted) and np.array_equal(msk, fit_mask(mask, 64, "aspect"))
    assert not msk[~content].any()


def test_tiles_train_validate_on_whole_images_and_predict_at_full_size(synth_dataset, make_train_config, tmp_path):
    """Training draws tiles, validation and inference stitch whole images; the artifact carries the geometry."""
    import torch

    from raydefect.engine.data import SampleSource
    from raydefect.engine.fit import fit
    from raydefect.imaging import decode_image
    from raydefect.inference import Predictor, infer_images
    from raydefect.models.artifact import load_artifact

    torch.set_num_threads(1)
    sets = [
        "model.backbone=test-tiny-cnn",
        "model.pretrained=false",
        "model.weights=null",
        "data.geometry=tiles",
        "data.tile_size=32",
        "data.tile_overlap=8",
        "data.scale=1.0",
        "data.tile_defect_share=1.0",
        "schedule.frozen_epochs=0",
        "schedule.partial_epochs=0",
        "schedule.full_epochs=1",
    ]
    cfg = make_train_config(synth_dataset.root, tmp_path, *sets)
    train = SampleSource.for_config(cfg, train=True)
    rows = synth_dataset.frame("train").to_dict("records")
    defect = next(r for r in rows if r["label"] == 1)
    row = {**defect, "class_id": 1, "key": 1, "mask_valid": True}
    sample = train.load(row, (0, 1))
    assert sample["image"].shape == (3, 32, 32) and sample["mask"].any() and sample["label"] == 1  # share 1.0
    whole = SampleSource.for_config(cfg, train=False).load(row)
    assert whole["whole"].shape[:2] == whole["mask"].shape == (64, 64)

    result = fit(cfg, synth_dataset, tmp_path / "run", device="cpu")
    assert math.isnan(result.history[0]["val_loss"]) and 0.0 <= result.history[0]["val_iou"] <= 1.0
    loaded = load_artifact(tmp_path / "run" / "model")
    assert loaded.meta.geometry == Geometry("tiles", 32, 1.0, 8) and loaded.meta.image_size == 32
    assert loaded.meta.to_dict()["geometry"] == {"mode": "tiles", "scale": 1.0, "tile_size": 32, "tile_overlap": 8}
    images = [decode_image(p) for p in synth_dataset.frame("test")["image"][:3]]
    images.append(np.zeros((20, 150, 3), np.uint8))  # a strip thinner than a tile
    out = infer_images(Predictor(loaded, device="cpu"), images, batch_size=5)
    assert [m.shape for m in out["mask_prob"]] == [(64, 64)] * 3 + [(20, 150)]
    assert out["class_probs"].shape == (4, loaded.meta.num_classes) and out["defect_score"].shape == (4,)


def _tiled_artifact(tmp_path, make_tiny_model):
    import torch

    from raydefect.config import ModelConfig
    from raydefect.models.artifact import save_artifact
    from raydefect.models.model import DefectModel

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test-tiny", pretrained=False, decoder_dim=16, head_hidden=16)
    model = DefectModel(cfg, 32, ("normal", "scratch"), geometry=Geometry("tiles", 32, 0.5, 8)).eval()
    save_artifact(model, tmp_path / "tiled", thresholds={"image": 0.5, "pixel": 0.5})
    return tmp_path / "tiled"


def _write_images(folder, sizes):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = folder / f"img_{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    (folder / "broken.png").write_bytes(b"not a png")
    return [*paths, str(folder / "broken.png")]


def test_tiled_batch_scorer_gives_one_row_per_image_with_its_own_mask_size(tmp_path, make_tiny_model):
    from raydefect.imaging import decode_png_mask
    from raydefect.inference import Predictor, infer_images
    from raydefect.scoring.scorer import BatchScorer

    artifact = _tiled_artifact(tmp_path, make_tiny_model)
    paths = _write_images(tmp_path / "images", [(130, 70), (40, 300), (10, 10)])
    table = BatchScorer(str(artifact), device="cpu", precision="fp32").score(paths, batch_size=3)
    rows = table.to_pylist()
    assert [r["path"] for r in rows] == paths and rows[-1]["error"] and not any(r["error"] for r in rows[:-1])
    assert [(r["width"], r["height"]) for r in rows[:-1]] == [(130, 70), (40, 300), (10, 10)]
    for row, (w, h) in zip(rows[:-1], [(130, 70), (40, 300), (10, 10)], strict=True):
        assert decode_png_mask(row["mask_png"]).shape == (h, w)
    # the same numbers as the Python entry point
    from raydefect.imaging import decode_image

    out = infer_images(Predictor(str(artifact), device="cpu"), [decode_image(p) for p in paths[:-1]])
    assert np.allclose([r["defect_score"] for r in rows[:-1]], out["defect_score"], atol=1e-5)


@pytest.mark.ray
@pytest.mark.slow
def test_tiled_model_scores_through_ray_data(ray_session, tmp_path, make_tiny_model):
    import pyarrow.parquet as pq

    from raydefect.pipelines.score import run_score

    artifact = _tiled_artifact(tmp_path, make_tiny_model)
    _write_images(tmp_path / "archive", [(130, 70), (40, 300), (64, 64), (200, 90)])
    cfg = load_config("default", sets=["score.batch_size=2", "score.commit_interval_s=0"])
    report = run_score(str(artifact), str(tmp_path / "archive"), str(tmp_path / "scores"), cfg)
    assert (report.scored, report.errors) == (5, 1)
    table = pq.read_table(str(tmp_path / "scores")).to_pylist()
    sizes = {(r["width"], r["height"]) for r in table if not r["error"]}
    assert sizes == {(130, 70), (40, 300), (64, 64), (200, 90)}


@pytest.mark.parametrize("name", ["tiled.onnx", "tiled.pt"])
def test_a_tiled_model_exports_with_its_geometry_and_stitched_parity(tmp_path, make_tiny_model, name):
    """ONNX and TorchScript alike: the file runs a tile batch and reproduces raydefect's stitched image."""
    import json

    from raydefect.tasks.export import export_model, sidecar_path

    artifact = _tiled_artifact(tmp_path, make_tiny_model)
    report = export_model(artifact, tmp_path / name, batch=2)
    assert report.format == ("onnx" if name.endswith(".onnx") else "torchscript")
    assert report.checked and set(report.parity) == {"batch_1", "batch_3", "stitched"}
    assert max(report.parity["stitched"].values()) <= 1e-4
    contract = json.loads(sidecar_path(report.path).read_text())
    g = contract["geometry"]
    assert (g["mode"], g["scale"], g["tile_size"], g["tile_overlap"]) == ("tiles", 0.5, 32, 8)
    assert "maximum" in g["aggregation"] and "sum(w * p) / sum(w)" in g["stitching"]


def test_bad_inputs_through_the_tile_path(tmp_path, make_tiny_model):
    """A 1x5000 strip, a 16-bit PNG, an EXIF-rotated JPEG, an image over the pixel limit: each scored with a mask of
    its own (oriented) size, or recorded as an error row while the job goes on."""
    from PIL import Image

    from raydefect.imaging import decode_png_mask
    from raydefect.scoring.scorer import BatchScorer

    artifact = _tiled_artifact(tmp_path, make_tiny_model)
    folder = tmp_path / "bad"
    folder.mkdir()
    Image.fromarray(np.full((1, 5000, 3), 90, np.uint8)).save(folder / "strip.png")
    Image.fromarray(np.arange(60 * 80, dtype=np.uint16).reshape(60, 80) * 13).save(folder / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: 120 x 40 stored, 40 x 120 shown
    Image.fromarray(np.full((40, 120, 3), 150, np.uint8)).save(folder / "rotated.jpg", exif=exif.tobytes())
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(folder / "huge.png")
    paths = [str(folder / n) for n in ("strip.png", "deep16.png", "rotated.jpg", "huge.png")]
    rows = BatchScorer(str(artifact), device="cpu", max_pixels=50_000).score(paths, batch_size=4).to_pylist()
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    expected = {"strip.png": (5000, 1), "deep16.png": (80, 60), "rotated.jpg": (40, 120)}
    for name, (w, h) in expected.items():
        row = by_name[name]
        assert not row["error"] and (row["width"], row["height"]) == (w, h), row
        assert decode_png_mask(row["mask_png"]).shape == (h, w)
    assert "score.max_image_pixels=50000" in by_name["huge.png"]["error"]


def test_predict_and_evaluate_honour_a_tiled_model(tmp_path, make_tiny_model, synth_dataset):
    import csv

    from raydefect.inference import Predictor
    from raydefect.tasks.evaluate import Evaluator, split_records
    from raydefect.tasks.predict import predict_images

    artifact = _tiled_artifact(tmp_path, make_tiny_model)
    _write_images(tmp_path / "images", [(130, 70), (40, 300)])
    summary = predict_images(artifact, tmp_path / "images", tmp_path / "out", device="cpu", batch_size=2)
    assert (summary.images, summary.errors) == (3, 1)
    with open(summary.scores_csv, newline="") as f:
        rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(f)}
    assert (rows["img_0.png"]["width"], rows["img_0.png"]["height"]) == ("130", "70") and rows["broken.png"]["error"]
    assert len(list((tmp_path / "out").rglob("*.png"))) == 2  # an overlay per readable image
    evaluator = Evaluator(Predictor(artifact, device="cpu"), synth_dataset.class_names)
    image_acc, pixel_acc = evaluator.new_accumulators()
    records = split_records(synth_dataset.frame("test"))[:4]
    out = evaluator.evaluate_batch(records, image_acc, pixel_acc)
    assert len(out) == 4 and all(0.0 <= r["defect_score"] <= 1.0 for r in out)
