"""Per-pixel classes in the model (`model.mask_classes`): the head, the loss, the metrics, train + evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raydefect.data.label_importers import listing_with_labels
from raydefect.data.prepare import prepare_dataset
from raydefect.errors import ConfigError, DataError
from raydefect.imaging import encode_png
from raydefect.metrics.pixel_classes import PixelClassAccumulator, class_map
from raydefect.models.losses import DefectLoss, pixel_class_losses
from raydefect.models.model import DefectModel

SIZE = 32
CLASSES = ("scratch", "spot", "streak")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_class_head_exists_only_with_mask_classes(make_train_config):
    plain = make_train_config(None, None).model
    names = ["normal", *CLASSES]
    torch.manual_seed(0)
    binary = DefectModel(plain, SIZE, names, load_weights=False)
    torch.manual_seed(0)
    both = DefectModel(make_train_config(None, None, "model.mask_classes=true").model, SIZE, names, load_weights=False)
    extra = set(both.state_dict()) - set(binary.state_dict())
    assert extra == {"decoder.class_out.weight", "decoder.class_out.bias"}
    for key, value in binary.state_dict().items():  # built last: the shared parts start from the same weights
        assert torch.equal(value, both.state_dict()[key]), key
    x = torch.randn(2, 3, SIZE, SIZE)
    a, b = binary.eval()(x), both.eval()(x)
    assert a.pixel_class_logits is None and b.pixel_class_logits.shape == (2, 4, SIZE, SIZE)
    assert torch.equal(a.mask_logits, b.mask_logits) and torch.equal(a.class_logits, b.class_logits)


def test_pixel_class_loss_rewards_the_right_classes():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, :4, :4] = 2
    right = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 20.0
    wrong = torch.roll(right, 1, dims=1)
    ce_r, dice_r = pixel_class_losses(right, target)
    ce_w, dice_w = pixel_class_losses(wrong, target)
    assert ce_r < 1e-3 and ce_w > 5 and dice_r < 0.5 * dice_w
    loss = DefectLoss()
    logits, mask = torch.zeros(1, 3), torch.zeros(1, 1, 8, 8)
    base = loss(logits, mask, torch.tensor([1]), (target > 0).float()[:, None])
    with_classes = loss(logits, mask, torch.tensor([1]), (target > 0).float()[:, None], None, wrong, target)
    assert with_classes.total > base.total and with_classes.cls == base.cls and with_classes.bce == base.bce
    none_valid = loss(logits, mask, torch.tensor([1]), mask, torch.tensor([False]), wrong, target)
    assert torch.isfinite(none_valid.total)


def test_pixel_class_metrics_and_the_class_map():
    acc = PixelClassAccumulator(["normal", "a", "b"])
    truth = np.array([[0, 1, 1, 2]])
    pred = np.array([[0, 1, 2, 2]])
    acc.update(pred, truth)
    result = acc.compute()
    assert result["iou"] == {"a": 0.5, "b": 0.5} and result["dice"]["a"] == pytest.approx(2 / 3)
    assert result["mean_iou"] == 0.5 and result["confusion"]["matrix"] == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    prob = np.array([[[0.9, 0.2]]])
    logits = np.array([[[[9.0, 9.0]], [[1.0, 5.0]], [[2.0, 0.0]]]])  # background never wins above the threshold
    assert class_map(prob, logits, 0.5).tolist() == [[[2, 0]]]


def test_mask_classes_needs_a_dataset_with_per_pixel_classes(synth_dataset, make_train_config, tmp_path):
    from raydefect.engine.fit import training_rows

    cfg = make_train_config(synth_dataset.root, tmp_path, "model.mask_classes=true")
    with pytest.raises(DataError, match="mask_classes needs per-pixel classes.*--mask-format index"):
        training_rows(cfg, synth_dataset)
    with pytest.raises(ConfigError, match="mask_classes"):
        make_train_config(
            None, None, "model.mask_classes=true", "data.geometry=tiles", "data.tile_size=32", "data.tile_overlap=8"
        )


def _index_set(root: Path) -> Path:
    """48 images, each with two classes (a bright vertical bar, a dark square or a mid horizontal bar)."""
    rng = np.random.default_rng(0)
    for i in range(48):
        img = rng.integers(60, 90, (SIZE, SIZE), dtype=np.uint8)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        for k in range(2):
            c = 1 + (i + k) % 3
            y, x = rng.integers(0, SIZE - 10, 2)
            h, w = {1: (10, 3), 2: (6, 6), 3: (3, 10)}[c]
            mask[y : y + h, x : x + w] = c
            img[y : y + h, x : x + w] = {1: 230, 2: 10, 3: 160}[c]
        for folder, data in (("img", img), ("ann", mask)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / f"i{i}.png").write_bytes(encode_png(data))
    listing = listing_with_labels(
        mask_format="index",
        class_names=",".join(CLASSES),
        images=[str(root / "img" / "*.png")],
        mask_template=str(root / "ann" / "{stem}.png"),
    )
    prepare_dataset(listing, root / "ds", split=(0.6, 0.2, 0.2))
    return root / "ds"


@pytest.fixture(scope="module")
def trained(make_train_config, tmp_path_factory):
    """A tiny model trained with `model.mask_classes` on a class-index set: (dataset, run folder)."""
    from raydefect.data.manifest import load_dataset
    from raydefect.engine.fit import fit

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mask_classes")
    ds = load_dataset(_index_set(root / "raw"))
    cfg = make_train_config(ds.root, root / "runs", "model.mask_classes=true")
    result = fit(cfg, ds, root / "run", device="cpu")
    torch.set_num_threads(before)
    return ds, root / "run", result


@pytest.mark.slow
def test_train_and_evaluate_with_pixel_classes(trained, tmp_path):
    from raydefect.inference import Predictor
    from raydefect.models.artifact import load_artifact
    from raydefect.tasks.evaluate import run_evaluation

    ds, run, result = trained
    assert all("val_class_mean_iou" in r and "val_class_iou_spot" in r for r in result.history)
    losses = [r["train_loss"] for r in result.history]
    parts = result.history[0]
    assert parts["train_loss"] > parts["train_loss_cls"] + parts["train_loss_bce"] + parts["train_loss_dice"]
    assert losses[-1] < losses[0]
    test = json.loads((run / "test_metrics.json").read_text())["pixel_classes"]
    assert set(test["iou"]) == set(CLASSES) and test["confusion"]["classes"] == ["normal", *CLASSES]
    assert test["pixels"] == 10 * SIZE * SIZE and 0.0 < test["mean_iou"] <= 1.0

    artifact = load_artifact(run / "model")
    assert artifact.meta.model.mask_classes
    run_evaluation(Predictor(artifact, device="cpu"), ds, "test", tmp_path / "eval", gallery_size=0)
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["pixel_classes"]
    assert evaluated["iou"] == pytest.approx(test["iou"])  # the same images, the same rule as training's test
    assert evaluated["confusion"]["matrix"] == test["confusion"]["matrix"]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_evaluation_gives_the_local_pixel_classes(ray_session, trained, tmp_path):
    from raydefect.pipelines.evaluate import evaluate

    ds, run, _ = trained
    local = evaluate(run / "model", ds.root, tmp_path / "local", use_ray=False, device="cpu", gallery_size=0)
    on_ray = evaluate(run / "model", ds.root, tmp_path / "ray", use_ray=True, batch_size=3, gallery_size=0)
    assert on_ray.metrics["pixel_classes"]["confusion"] == local.metrics["pixel_classes"]["confusion"]
    assert on_ray.metrics["pixel_classes"]["pixels"] == 10 * SIZE * SIZE


def test_class_ids_and_areas_at_the_image_size():
    from raydefect.inference import class_areas, class_ids

    prob = np.zeros((4, 4), np.float32)
    prob[:2] = 0.9  # the top half is defect
    probs = np.zeros((3, 4, 4), np.float32)
    probs[0] = 0.9  # background wins everywhere, but never above the threshold
    probs[1, :, :2], probs[2, :, 2:] = 0.1, 0.1  # left half class 1, right half class 2
    ids = class_ids(prob, probs, 8, 8, 0.5)
    assert ids.shape == (8, 8) and set(np.unique(ids[4:])) == {0}
    assert (ids[:4, :4] == 1).all() and (ids[:4, 4:] == 2).all()
    assert class_areas(ids, ["normal", "a", "b"]) == {"a": 16, "b": 16}


def test_overlay_colours_each_class():
    from raydefect.viz.overlay import class_colour, render_overlay

    image = np.full((64, 64), 128, np.uint8)
    ids = np.zeros((64, 64), np.uint8)
    ids[40:60, 4:24], ids[40:60, 34:54] = 1, 2  # the bottom half: the label is written at the top
    out = render_overlay(image, ids > 0, 0.9, "a", classes=ids, scale=1.0)
    right = out[:, 64:]
    assert tuple(right[59, 10]) == class_colour(1) and tuple(right[59, 40]) == class_colour(2)  # the contours
    assert tuple(right[62, 10]) == (128, 128, 128)  # outside every class: the image


@pytest.mark.slow
def test_predict_writes_class_areas(trained, tmp_path):
    import csv

    from raydefect.tasks.predict import predict_images

    ds, run, _ = trained
    images = [str(p) for p in ds.frame("test")["image"]]
    predict_images(run / "model", images, tmp_path / "out", device="cpu")
    with open(tmp_path / "out" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(images) and all(r["class_area_px"] for r in rows)
    for r in rows:
        areas = json.loads(r["class_area_px"])
        assert set(areas) <= set(CLASSES) and sum(areas.values()) == int(r["mask_area_px"])
    assert len(list((tmp_path / "out" / "overlays").rglob("*.png"))) == len(images)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_carries_the_class_masks(ray_session, trained, make_train_config, tmp_path):
    from raydefect.pipelines.train import run_training

    ds, _, _ = trained
    cfg = make_train_config(ds.root, tmp_path / "runs", "model.mask_classes=true", "schedule.full_epochs=0")
    result = run_training(cfg, name="classes", show_progress=False)
    assert all("val_class_mean_iou" in r for r in result.history)
    test = json.loads((tmp_path / "runs" / "classes" / "test_metrics.json").read_text())
    assert set(test["pixel_classes"]["iou"]) == set(CLASSES)
