"""Per-pixel class labels in `prepare`: class-index masks, COCO JSON, run-length CSVs, and their bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from raydefect.cli import cli
from raydefect.data.label_importers import import_coco, import_rle_csv, listing_with_labels, parse_runs
from raydefect.data.labels import coco_counts, decode_class_mask, parse_class_names, severstal_mask
from raydefect.data.manifest import load_dataset
from raydefect.data.prepare import prepare_dataset
from raydefect.errors import DataError
from raydefect.imaging import decode_mask, encode_png

SIZE = 32


def _image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    path.write_bytes(encode_png(rng.integers(0, 255, (SIZE, SIZE), dtype=np.uint8)))
    return path


def _index_mask(i: int) -> np.ndarray:
    """Two classes per image, never a normal one: class 1 + (i % 3) large, another small."""
    m = np.zeros((SIZE, SIZE), np.uint8)
    big, small = 1 + i % 3, 1 + (i + 1) % 3
    m[2:18, 2:18] = big  # 256 px
    m[24:28, 24:30] = small  # 24 px
    return m


def _problems(root: Path) -> list[dict]:
    with open(root / "problems.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def index_raw(tmp_path) -> Path:
    """A generic layout of 12 images with grayscale class-index masks (values 1-3), one palette mask among them."""
    root = tmp_path / "raw"
    for i in range(12):
        _image(root / "img" / f"im_{i}.png", i)
        mask = root / "ann" / f"im_{i}.png"
        mask.parent.mkdir(parents=True, exist_ok=True)
        if i == 0:  # a palette PNG: indices 1-3, colours bright enough that luminance would mislead
            img = Image.frombytes("P", (SIZE, SIZE), _index_mask(i).tobytes())
            img.putpalette([0, 0, 0, 255, 255, 255, 200, 200, 0, 0, 250, 250] + [0] * (256 - 4) * 3)
            img.save(mask)
        else:
            mask.write_bytes(encode_png(_index_mask(i)))
    return root


def test_index_masks_import_with_classes_per_pixel(index_raw, tmp_path):
    listing = listing_with_labels(
        mask_format="index",
        class_names="scratch,spot,crack",
        images=[str(index_raw / "img" / "*.png")],
        mask_template=str(index_raw / "ann" / "{stem}.png"),
    )
    report = prepare_dataset(listing, tmp_path / "ds", split=(0.5, 0.25, 0.25))
    ds = load_dataset(tmp_path / "ds")
    assert ds.class_names == ["normal", "crack", "scratch", "spot"]
    assert ds.info["mask_classes"] is True and ds.info["multi_class_images"] == 12
    df = ds.frame()
    assert len(df) == 12 and set(df["label"]) == {1}
    names = {1: "scratch", 2: "spot", 3: "crack"}
    for _, row in df.iterrows():
        i = int(Path(row["original_image"]).stem.split("_")[1])
        assert row["defect_class"] == names[1 + i % 3]  # the largest area
        assert "multi_class" in row["flags"]
        assert dict(row["class_area_px"]) == {names[1 + i % 3]: 256, names[1 + (i + 1) % 3]: 24}
        ids = decode_class_mask(row["class_mask"])
        expected = np.vectorize(lambda v: ds.class_names.index(names[v]) if v else 0)(_index_mask(i))
        np.testing.assert_array_equal(ids, expected)
        binary = decode_mask(row["mask"]).array
        np.testing.assert_array_equal(binary, _index_mask(i) > 0)
        assert row["mask_fraction"] == pytest.approx(280 / SIZE**2)
    assert report.problems == []


def test_index_mask_read_as_binary_is_a_problem_naming_the_option(index_raw, tmp_path):
    listing = listing_with_labels(
        images=[str(index_raw / "img" / "*.png")], mask_template=str(index_raw / "ann" / "{stem}.png")
    )
    report = prepare_dataset(listing, tmp_path / "ds")
    assert report.images == 1  # the palette mask: its colours' luminance reaches 128, so it reads as binary
    rows = _problems(tmp_path / "ds")
    flagged = [r for r in rows if r["reason"] == "mask looks like class indices"]
    assert len(flagged) == 11  # the palette mask's luminance has values >= 128: read as a binary mask
    assert all("--mask-format index" in r["detail"] for r in flagged)


def test_index_mask_values_above_the_class_count(index_raw, tmp_path):
    listing = listing_with_labels(
        mask_format="index",
        class_names="scratch,spot",  # value 3 has no name
        images=[str(index_raw / "img" / "*.png")],
        mask_template=str(index_raw / "ann" / "{stem}.png"),
    )
    report = prepare_dataset(listing, tmp_path / "ds")
    bad = [p for p in report.problems if p.reason == "mask value without a class"]
    assert len(bad) == 12 - 4  # images whose masks hold 1 and 2 only are kept (i % 3 == 0)
    assert all(p.file.endswith(".png") and "/ann/" in p.file and "value(s) 3" in p.detail for p in bad)
    assert report.images == 4


def test_class_names_from_a_yaml_map(tmp_path):
    path = tmp_path / "classes.yaml"
    path.write_text("1: scratch\n3: crack\n")
    assert parse_class_names(str(path)) == ((1, "scratch"), (3, "crack"))
    assert parse_class_names("a, b") == ((1, "a"), (2, "b"))
    with pytest.raises(DataError, match="reserved"):
        parse_class_names("a,normal")


def _coco_file(root: Path) -> Path:
    """3 images: a polygon + a compressed RLE (two classes), an uncompressed crowd RLE, one without annotations."""
    for name, seed in (("a.png", 1), ("b.png", 2), ("c.png", 3)):
        _image(root / name, seed)
    from pycocotools import mask as coco_mask

    spot = np.zeros((SIZE, SIZE), np.uint8)
    spot[20:24, 20:30] = 1  # 40 px
    rle = coco_mask.encode(np.asfortranarray(spot))
    crowd = np.zeros((SIZE, SIZE), bool)
    crowd[:, 0:3] = True  # column-major runs: 96 on, the rest off
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": SIZE, "height": SIZE},
            {"id": 2, "file_name": "b.png", "width": SIZE, "height": SIZE},
            {"id": 3, "file_name": "c.png", "width": SIZE, "height": SIZE},
        ],
        "categories": [{"id": 7, "name": "scratch"}, {"id": 9, "name": "spot"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "segmentation": [[2, 2, 14, 2, 14, 12, 2, 12]], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 9, "iscrowd": 0,
             "segmentation": {"size": [SIZE, SIZE], "counts": rle["counts"].decode()}},
            {"id": 3, "image_id": 2, "category_id": 9, "iscrowd": 1,
             "segmentation": {"size": [SIZE, SIZE], "counts": [0, 96, SIZE * SIZE - 96]}},
        ],
    }  # fmt: skip
    path = root / "annotations.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_polygons_and_rle_import(tmp_path):
    path = _coco_file(tmp_path / "coco")
    report = prepare_dataset(import_coco(path), tmp_path / "ds", split=(0.34, 0.33, 0.33))
    ds = load_dataset(tmp_path / "ds")
    assert ds.class_names == ["normal", "scratch", "spot"] and report.problems == []
    rows = {Path(r["original_image"]).name: r for _, r in ds.frame().iterrows()}
    a, b, c = rows["a.png"], rows["b.png"], rows["c.png"]
    assert a["defect_class"] == "scratch" and "multi_class" in a["flags"]
    areas = dict(a["class_area_px"])
    assert areas["spot"] == 40 and 100 <= areas["scratch"] <= 170  # a 12x10 polygon, edges as COCO draws them
    ids = decode_class_mask(a["class_mask"])
    assert (ids[20:24, 20:30] == 2).all() and ids[6, 6] == 1 and ids[0, 31] == 0
    assert b["defect_class"] == "spot" and dict(b["class_area_px"]) == {"spot": 96}
    assert decode_class_mask(b["class_mask"])[:, :3].all()
    assert c["label"] == 0 and c["defect_class"] == "normal" and c["class_mask"] is None


def test_coco_bad_inputs_are_recorded(tmp_path):
    root = tmp_path / "coco"
    path = _coco_file(root)
    data = json.loads(path.read_text())
    _image(root / "d.png", 4)
    _image(root / "e.png", 5)
    data["images"] += [
        {"id": 4, "file_name": "d.png", "width": SIZE, "height": SIZE},
        {"id": 5, "file_name": "e.png", "width": SIZE, "height": SIZE},
        {"id": 6, "file_name": "e.png", "width": SIZE, "height": SIZE},  # listed twice
    ]
    data["annotations"] += [
        {"id": 10, "image_id": 4, "category_id": 99, "segmentation": [[1, 1, 5, 1, 5, 5]]},  # unknown category
        {"id": 11, "image_id": 2, "category_id": 7,
         "segmentation": {"size": [SIZE, SIZE], "counts": [0, SIZE * SIZE + 5]}},  # past the image
    ]  # fmt: skip
    path.write_text(json.dumps(data))
    report = prepare_dataset(import_coco(path), tmp_path / "ds", split=(0.5, 0.25, 0.25))
    by_reason = {p.reason: p for p in report.problems}
    assert by_reason["unknown category id"].file.endswith("d.png")
    assert "category_id 99" in by_reason["unknown category id"].detail
    assert by_reason["image listed twice"].file.endswith("e.png")
    assert "keep one entry" in by_reason["image listed twice"].detail
    assert by_reason["run-length past the image"].file.endswith("b.png")
    assert str(path) in by_reason["run-length past the image"].detail
    assert report.images == 2  # a.png and c.png


def test_broken_coco_json_is_one_clear_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(DataError, match=r"broken\.json: broken JSON at line 1.*export it again"):
        import_coco(path)


def _rle(mask: np.ndarray) -> str:
    """Severstal encoding of a bool mask: 1-based starts, column-major."""
    flat = np.concatenate([[0], mask.T.ravel().astype(np.int8), [0]])
    changes = np.flatnonzero(np.diff(flat)) + 1
    starts, ends = changes[::2], changes[1::2]
    return " ".join(f"{s} {e - s}" for s, e in zip(starts, ends, strict=True))


def test_rle_csv_imports_severstal_style(tmp_path):
    root = tmp_path / "steel"
    for i in range(4):
        _image(root / "train_images" / f"s{i}.png", i)
    one = np.zeros((SIZE, SIZE), bool)
    one[4:10, 3:20] = True
    three = np.zeros((SIZE, SIZE), bool)
    three[25:30, 25:27] = True
    rows = [
        ["ImageId", "ClassId", "EncodedPixels"],
        ["s0.png", "1", _rle(one)],
        ["s0.png", "3", _rle(three)],
        ["s1.png", "3", _rle(one)],
        ["s2.png", "2", ""],  # an empty row: no defect of that class
    ]  # s3.png is in no row: normal
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    listing = listing_with_labels(
        rle_csv=str(root / "train.csv"), image_dir=str(root / "train_images"), class_names="pit,inclusion,scratch"
    )
    report = prepare_dataset(listing, tmp_path / "ds", split=(0.5, 0.25, 0.25))
    ds = load_dataset(tmp_path / "ds")
    assert ds.class_names == ["normal", "pit", "scratch"] and report.problems == []
    rows_by = {Path(r["original_image"]).name: r for _, r in ds.frame().iterrows()}
    s0 = rows_by["s0.png"]
    assert s0["defect_class"] == "pit" and dict(s0["class_area_px"]) == {"pit": 102, "scratch": 10}
    ids = decode_class_mask(s0["class_mask"])
    np.testing.assert_array_equal(ids == 1, one)
    np.testing.assert_array_equal(ids == 2, three)
    assert rows_by["s1.png"]["defect_class"] == "scratch"
    assert rows_by["s2.png"]["label"] == 0 and rows_by["s3.png"]["label"] == 0


def test_rle_convention_is_one_based_column_major():
    mask = severstal_mask(((1, 2), (SIZE + 1, 1)), SIZE, SIZE, "row 2", "x.csv")
    assert mask[0, 0] and mask[1, 0] and mask[0, 1] and mask.sum() == 3
    assert parse_runs("1 3 10 2") == ((1, 3), (10, 2))
    with pytest.raises(ValueError, match="pairs"):
        parse_runs("1 3 10")
    assert coco_counts("0140M0001") == [0, 1, 4, 1, 1, 1, 1, 1, 2]


def test_rle_csv_bad_rows_are_recorded(tmp_path):
    root = tmp_path / "steel"
    for i in range(5):
        _image(root / f"s{i}.png", i)
    rows = [
        ["ImageId_ClassId", "EncodedPixels"],  # Severstal's first layout
        ["s0.png_1", "1 10"],
        ["s1.png_1", f"{SIZE * SIZE - 2} 5"],  # past the image
        ["s2.png_2", "1 10"],
        ["s2.png_2", "20 3"],  # listed twice
        ["s3.png_1", "1 x"],  # not numbers
    ]
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    report = prepare_dataset(import_rle_csv(root / "train.csv"), tmp_path / "ds", split=(0.5, 0.5, 0.0))
    by_reason = {p.reason: p for p in report.problems}
    assert by_reason["run-length past the image"].file.endswith("s1.png")
    assert "top to bottom, then left to right" in by_reason["run-length past the image"].detail
    assert by_reason["image listed twice"].file.endswith("s2.png") and "row 5" in by_reason["image listed twice"].detail
    assert by_reason["bad run-length"].file.endswith("s3.png")
    assert report.images == 2 and report.classes == ["normal", "class_1"]


def test_prepare_cli_reads_each_label_format(index_raw, tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "prepare", "--images", str(index_raw / "img" / "*.png"), "--mask-template",
            str(index_raw / "ann" / "{stem}.png"), "--mask-format", "index", "--class-names", "a,b,c",
            "--out", str(tmp_path / "idx"), "--copy",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    ds = load_dataset(tmp_path / "idx")
    assert ds.info["paths"] == "relative" and ds.info["mask_classes"]
    assert all(Path(p).is_file() for p in ds.frame()["class_mask"])
    coco = _coco_file(tmp_path / "coco")
    res = runner.invoke(
        cli, ["prepare", "--coco", str(coco), "--out", str(tmp_path / "c"), "--split", "0.34,0.33,0.33"]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["prepare", "--coco", str(coco), "--class-names", "a", "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "categories name the classes" in res.output


def test_coco_box_without_segmentation_is_its_rectangle(tmp_path):
    root = tmp_path / "coco"
    _image(root / "a.png", 1)
    _image(root / "b.png", 2)
    data = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
        "categories": [{"id": 1, "name": "dent"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [], "bbox": [4, 6, 10, 5]}],
    }
    (root / "ann.json").write_text(json.dumps(data))
    prepare_dataset(import_coco(root / "ann.json"), tmp_path / "ds", split=(0.5, 0.5, 0.0))
    row = next(r for _, r in load_dataset(tmp_path / "ds").frame().iterrows() if r["label"] == 1)
    assert dict(row["class_area_px"]) == {"dent": 50}
    assert (decode_class_mask(row["class_mask"])[6:11, 4:14] == 1).all()
