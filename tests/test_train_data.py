"""Training data: manifest rows, mask-aligned augmentation, deterministic sampling and the threaded loader."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from raydefect.config import DataConfig
from raydefect.engine.data import (
    Augmenter,
    LoadStats,
    SampleSource,
    class_counts,
    epoch_order,
    iterate_batches,
    loader_processes,
    manifest_rows,
    subset_rows,
)
from raydefect.errors import ConfigError, DataError
from raydefect.inference import Preprocessor

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _rect_sample(h: int = 48, w: int = 64) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((h, w), bool)
    mask[8:30, 10:40] = True
    mask[35:44, 50:60] = True
    image = np.repeat((mask * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    return image, mask


@pytest.mark.parametrize("seed", range(12))
def test_geometric_augmentation_keeps_the_mask_on_its_pixels(seed):
    image, mask = _rect_sample()
    aug = Augmenter(DataConfig(image_size=32, scale_min=0.5, brightness=0.0, contrast=0.0))
    img, msk = aug(image, mask, np.random.default_rng(seed))
    assert img.shape == (32, 32, 3) and img.dtype == np.float32
    assert msk.shape == (32, 32) and msk.dtype == bool
    bright = img[:, :, 0] >= 128
    assert (bright == msk).mean() > 0.93  # only bilinear edge pixels may disagree


def test_augmentation_varies_and_photometric_jitter_leaves_the_mask_alone():
    image, mask = _rect_sample()
    geo = DataConfig(image_size=32, scale_min=1.0, brightness=0.0, contrast=0.0)
    photo = DataConfig(image_size=32, scale_min=1.0, brightness=0.3, contrast=0.3)
    outs = {Augmenter(geo)(image, mask, np.random.default_rng(s))[1].tobytes() for s in range(16)}
    assert len(outs) >= 4  # flips and rotations give different masks
    a_img, a_msk = Augmenter(geo)(image, mask, np.random.default_rng(3))
    b_img, b_msk = Augmenter(photo)(image, mask, np.random.default_rng(3))
    assert np.array_equal(a_msk, b_msk)  # same geometric draws: jitter is drawn after them, on the image only
    assert not np.array_equal(a_img, b_img)
    assert b_img.min() >= 0.0 and b_img.max() <= 255.0


def test_disabled_augmentation_is_the_inference_preprocessing(synth_dataset):
    rows = manifest_rows(synth_dataset, "val")
    source = SampleSource(32, MEAN, STD, augment=None)
    from raydefect.imaging import decode_image

    sample = source.load(rows[0])
    expected = Preprocessor(image_size=32, mean=MEAN, std=STD)(decode_image(rows[0]["image"]))
    assert np.array_equal(sample["image"], expected)
    no_aug = SampleSource(32, MEAN, STD, augment=DataConfig(image_size=32, augment=False))
    assert np.array_equal(no_aug.load(rows[0], (1, 2))["image"], expected)


def test_samples_are_deterministic_per_seed(synth_dataset):
    rows = manifest_rows(synth_dataset, "train")
    source = SampleSource(32, MEAN, STD, augment=DataConfig(image_size=32))
    a = source.load(rows[0], (0, 1, 0, 5))
    b = source.load(rows[0], (0, 1, 0, 5))
    c = source.load(rows[0], (0, 2, 0, 5))
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    assert not np.array_equal(a["image"], c["image"])
    assert a["image"].shape == (3, 32, 32) and a["image"].dtype == np.float32


def test_manifest_rows_mark_masks_and_classes(synth_dataset):
    rows = manifest_rows(synth_dataset, "train")
    names = synth_dataset.class_names
    assert all((r["label"] == 0) == (r["class_id"] == 0) for r in rows)
    assert all(r["mask_valid"] for r in rows)  # synthetic defects all have masks, normals are empty by definition
    assert all((r["mask"] is None) == (r["label"] == 0) for r in rows)
    counts = class_counts(rows, len(names))
    assert counts == [synth_dataset.info["counts"][c]["train"] for c in names]
    assert len({r["key"] for r in rows}) == len(rows)


def test_defect_without_pixels_has_no_valid_mask(synth_dataset, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydefect.data.manifest import load_dataset

    out = tmp_path / "ds"
    shutil.copytree(synth_dataset.root, out)
    table = pq.read_table(out / "manifest.parquet")
    labels = table.column("label").to_pylist()
    first_defect = labels.index(1)
    fractions = table.column("mask_fraction").to_pylist()
    fractions[first_defect] = 0.0  # an "empty mask" flagged by prepare
    masks = table.column("mask").to_pylist()
    second = labels.index(1, first_defect + 1)
    masks[second] = None  # a defect image without any mask
    table = table.set_column(table.schema.get_field_index("mask_fraction"), "mask_fraction", pa.array(fractions))
    table = table.set_column(table.schema.get_field_index("mask"), "mask", pa.array(masks, pa.string()))
    pq.write_table(table, out / "manifest.parquet")
    ds = load_dataset(out)
    rows = {r["image"]: r for split in ("train", "val", "test") for r in manifest_rows(ds, split)}
    images = ds.frame()["image"].tolist()
    assert rows[images[first_defect]]["mask_valid"] is False
    assert rows[images[second]]["mask_valid"] is False
    sample = SampleSource(32, MEAN, STD).load(rows[images[second]])
    assert sample["mask_valid"] is False and not sample["mask"].any()


def test_subset_is_stratified_and_nested(synth_dataset):
    rows = manifest_rows(synth_dataset, "train")
    half = subset_rows(rows, 0.5, seed=3)
    quarter = subset_rows(rows, 0.25, seed=3)
    assert subset_rows(rows, 1.0, seed=3) == rows
    assert {r["key"] for r in quarter} <= {r["key"] for r in half}
    full_counts = Counter(r["class_id"] for r in rows)
    half_counts = Counter(r["class_id"] for r in half)
    assert set(half_counts) == set(full_counts)  # every class keeps at least one image
    assert all(half_counts[c] == -(-full_counts[c] // 2) for c in full_counts)
    assert subset_rows(rows, 0.5, seed=4) != half


def test_epoch_order_is_a_seeded_permutation_or_balanced_draw():
    rows = [{"class_id": 0}] * 90 + [{"class_id": 1}] * 10
    a = epoch_order(rows, epoch=1, seed=0)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, epoch_order(rows, epoch=1, seed=0))
    assert not np.array_equal(a, epoch_order(rows, epoch=2, seed=0))
    assert not np.array_equal(a, epoch_order(rows, epoch=1, seed=0, rank=1))
    draws = np.concatenate([epoch_order(rows, epoch=e, seed=0, balanced=True) for e in range(20)])
    share = np.mean([rows[i]["class_id"] == 1 for i in draws])
    assert 0.4 < share < 0.6  # 10 % defects drawn about half of the time


def test_threaded_loader_matches_inline_and_skips_bad_files(synth_dataset, tmp_path):
    rows = manifest_rows(synth_dataset, "train")[:12]
    source = SampleSource(32, MEAN, STD, augment=DataConfig(image_size=32))
    order = list(range(len(rows)))[::-1]
    inline = list(iterate_batches(source, rows, order, 5, threads=0, seed=(7,)))
    threaded = list(iterate_batches(source, rows, order, 5, threads=3, seed=(7,)))
    assert [b["image"].shape[0] for b in inline] == [5, 5, 2]
    for a, b in zip(inline, threaded, strict=True):
        for key in a:
            assert np.array_equal(a[key].numpy(), b[key].numpy())
    assert inline[0]["mask"].shape == (5, 1, 32, 32)

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    broken = [dict(rows[0], image=str(bad)), *rows[1:4]]
    stats = LoadStats()
    batches = list(iterate_batches(source, broken, range(4), 4, threads=2, stats=stats))
    assert batches[0]["image"].shape[0] == 3
    assert stats.skipped and stats.skipped[0][0] == str(bad)
    with pytest.raises(DataError, match="every image of a batch failed"):
        list(iterate_batches(source, [dict(r, image=str(bad)) for r in rows[:2]], range(2), 2, threads=0))


def test_process_loader_gives_the_same_batches_and_records_bad_files(synth_dataset, tmp_path):
    rows = manifest_rows(synth_dataset, "train")[:12]
    source = SampleSource(32, MEAN, STD, augment=DataConfig(image_size=32))
    order = list(range(len(rows)))[::-1]
    inline = list(iterate_batches(source, rows, order, 5, threads=0, seed=(7,)))
    spawned = list(iterate_batches(source, rows, order, 5, seed=(7,), processes=2))
    assert len(spawned) == len(inline) == 3
    for a, b in zip(inline, spawned, strict=True):
        for key in a:
            assert np.array_equal(a[key].numpy(), b[key].numpy()), key

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    stats = LoadStats()
    broken = [*rows[:2], dict(rows[2], image=str(bad)), *rows[3:6]]
    batches = list(iterate_batches(source, broken, range(6), 3, stats=stats, processes=2))
    assert [b["image"].shape[0] for b in batches] == [2, 3]
    assert stats.skipped == [(str(bad), "not a recognised image format")]
    with pytest.raises(DataError, match="every image of a batch failed"):
        list(iterate_batches(source, [dict(r, image=str(bad)) for r in rows[:2]], range(2), 2, processes=2))


def test_loader_processes_default_to_none_on_cpu_and_the_cores_on_a_gpu():
    assert loader_processes(DataConfig(), "cpu", 16) == 0
    assert loader_processes(DataConfig(), "cuda", 16) == 15
    assert loader_processes(DataConfig(), "cuda", 1) == 2
    assert loader_processes(DataConfig(loader_processes=3), "cpu", 16) == 3
    with pytest.raises(ConfigError, match="data.loader_processes"):
        DataConfig(loader_processes=-1)


def test_non_square_images_become_square(tmp_path):
    img = tmp_path / "wide.png"
    Image.fromarray(np.zeros((20, 60, 3), np.uint8)).save(img)
    row = {"image": str(img), "mask": None, "label": 0, "class_id": 0, "key": 1, "mask_valid": True}
    for augment in (None, DataConfig(image_size=32)):
        sample = SampleSource(32, MEAN, STD, augment=augment).load(row, (0,))
        assert sample["image"].shape == (3, 32, 32) and sample["mask"].shape == (32, 32)
