"""`raydefect prepare`: importers on good and broken folders, checks, duplicates, splits, --strict, --copy, CLI."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from raydefect.cli import cli
from raydefect.data.importers import (
    import_classic,
    import_generic,
    import_mvtec,
    listing_from_options,
)
from raydefect.data.manifest import load_dataset
from raydefect.data.prepare import prepare_dataset
from raydefect.data.synth import sample
from raydefect.errors import DataError
from raydefect.imaging import decode_mask, encode_png


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(array))
    return path


def _defect(root: Path, cls: str, i: int, size: int = 32, mask_name: str | None = None, seed: int = 0) -> None:
    s = sample(cls, i, seed=seed, size=size, color="gray")
    _png(root / "defect_images" / cls / f"{cls}_{i}.png", s.image)
    _png(root / "defect_masks" / cls / (mask_name or f"{cls}_{i}.png"), s.mask.astype(np.uint8) * 255)


def _normal(root: Path, i: int, size: int = 32, seed: int = 0) -> Path:
    return _png(root / "normal_images" / f"normal_{i}.png", sample("normal", i, seed=seed, size=size).image)


def _problems(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def broken(tmp_path) -> Path:
    """A classic layout with one of every problem prepare must catch, plus good images around them."""
    root = tmp_path / "raw"
    for cls in ("scratch", "spot"):
        for i in range(6):
            _defect(root, cls, i)
    for i in range(12):
        _normal(root, i)
    d_img, d_mask = root / "defect_images", root / "defect_masks"
    (d_mask / "scratch" / "scratch_0.png").unlink()  # missing mask
    _png(d_mask / "scratch" / "scratch_1.png", np.zeros((16, 16), np.uint8))  # wrong size
    data = (d_img / "spot" / "spot_0.png").read_bytes()
    (d_img / "spot" / "spot_0.png").write_bytes(data[: len(data) // 2])  # truncated
    (d_img / "spot" / "spot_1.png").write_bytes(b"")  # zero bytes
    (d_img / "spot" / "notes.png").write_text("not an image")  # text named .png
    soft = sample("spot", 2, size=32).mask.astype(np.uint8) * 200  # >= 128: defect; a ring of 60s: soft, not defect
    soft[0, :] = 60
    _png(d_mask / "spot" / "spot_2.png", soft)
    _png(d_mask / "spot" / "spot_3.png", np.zeros((32, 32), np.uint8))  # empty mask in a defect class
    shutil.copyfile(d_img / "scratch" / "scratch_5.png", root / "normal_images" / "copy_of_scratch_5.png")  # duplicate
    _png(root / "normal_images" / "huge.png", np.zeros((80, 80), np.uint8))  # over the pixel limit below
    (root / "normal_images" / "README.txt").write_text("stray")
    (root / "normal_images" / ".DS_Store").write_bytes(b"\0")  # hidden: silently ignored
    _png(d_mask / "scratch" / "orphan.png", np.zeros((32, 32), np.uint8))  # a mask without image
    os.rename(d_mask / "scratch" / "scratch_4.png", d_mask / "scratch" / "scratch_4_mask.png")  # _mask suffix
    return root


def _classic(root: Path):
    return import_classic(root / "defect_images", root / "defect_masks", root / "normal_images")


def test_every_problem_is_reported_with_file_and_reason_and_bad_items_skipped(broken, tmp_path):
    out = tmp_path / "ds"
    report = prepare_dataset(_classic(broken), out, max_pixels=40 * 40, workers=2)
    rows = _problems(out / "problems.csv")
    by_file = {(Path(r["file"]).name, r["reason"]): r for r in rows}
    expected = {
        ("scratch_0.png", "missing mask"): "skipped",
        ("scratch_1.png", "mask size mismatch"): "skipped",
        ("spot_0.png", "unreadable image"): "skipped",
        ("spot_1.png", "unreadable image"): "skipped",
        ("notes.png", "unreadable image"): "skipped",
        ("spot_2.png", "soft mask"): "binarised at 128",
        ("spot_3.png", "empty mask"): "kept, flagged",
        ("copy_of_scratch_5.png", "duplicate"): "skipped",
        ("huge.png", "image too large"): "skipped",
        ("README.txt", "not an image file"): "ignored",
        ("orphan.png", "mask without image"): "ignored",
    }
    for key, action in expected.items():
        assert key in by_file, (key, rows)
        assert by_file[key]["action"] == action
    assert len(rows) == len(expected)  # nothing else (the .DS_Store is not reported, scratch_4_mask matched)
    assert "truncated" in by_file[("spot_0.png", "unreadable image")]["detail"]
    assert "0 bytes" in by_file[("spot_1.png", "unreadable image")]["detail"]
    assert "scratch_5.png" in by_file[("copy_of_scratch_5.png", "duplicate")]["detail"]
    assert "16x16" in by_file[("scratch_1.png", "mask size mismatch")]["detail"]

    table = pq.read_table(out / "manifest.parquet").to_pylist()
    names = {Path(r["image"]).name: r for r in table}
    candidates = 6 + 7 + 14  # scratch, spot (+ notes.png), normal (+ the copy and huge.png)
    assert len(table) == report.images == candidates - 7  # 7 skipped
    for skipped in ("scratch_0.png", "scratch_1.png", "spot_0.png", "spot_1.png", "huge.png", "copy_of_scratch_5.png"):
        assert skipped not in names
    assert names["spot_3.png"]["flags"] == ["empty_mask"] and names["spot_3.png"]["mask_fraction"] == 0.0
    assert names["spot_3.png"]["label"] == 1
    soft = names["spot_2.png"]
    assert soft["flags"] == ["soft_mask"] and soft["mask_soft_pixels"] == 32 + int(
        sample("spot", 2, size=32).mask.sum()
    )
    assert soft["mask"].endswith("spot_2.png")  # the original mask path is kept ...
    assert soft["mask_fraction"] == pytest.approx(sample("spot", 2, size=32).mask.mean())  # ... fraction binarised
    assert names["scratch_4.png"]["mask"].endswith("scratch_4_mask.png")
    assert names["normal_0.png"]["mask"] is None and names["normal_0.png"]["defect_class"] == "normal"
    assert all(r["width"] == 32 and r["height"] == 32 and len(r["sha1"]) == 40 for r in table)
    assert all(os.path.isabs(r["image"]) for r in table)
    assert report.problems_by_reason[("soft mask", "binarised at 128")] == 1


def test_source_files_are_never_modified(broken, tmp_path):
    before = {p: p.read_bytes() for p in broken.rglob("*") if p.is_file()}
    prepare_dataset(_classic(broken), tmp_path / "ds", copy=True, workers=1)
    after = {p: p.read_bytes() for p in broken.rglob("*") if p.is_file()}
    assert before == after


def test_strict_fails_with_the_count_and_where_problems_csv_is(broken, tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(DataError) as e:
        prepare_dataset(_classic(broken), out, strict=True, max_pixels=40 * 40, workers=1)
    msg = str(e.value)
    assert "9 problem(s)" in msg and str(out / "problems.csv") in msg and "without --strict" in msg
    assert (out / "problems.csv").is_file() and not (out / "manifest.parquet").exists()


def test_strict_passes_on_a_clean_folder_with_only_stray_files(synth_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(synth_raw["out"], raw)
    (raw / "normal_images" / "Thumbs.txt").write_text("stray")
    report = prepare_dataset(_classic(raw), tmp_path / "ds", strict=True, workers=1)
    assert report.images == 56 and [p.reason for p in report.problems] == ["not an image file"]


def test_header_only_skips_pixel_decoding(broken, tmp_path):
    report = prepare_dataset(_classic(broken), tmp_path / "ds", verify_pixels=False, workers=1)
    reasons = {(Path(p.file).name, p.reason) for p in report.problems}
    assert ("spot_0.png", "unreadable image") not in reasons  # truncation is only found by a full decode
    assert ("spot_1.png", "unreadable image") in reasons  # zero bytes: no header


def test_copy_makes_a_self_contained_dataset(broken, tmp_path):
    out = tmp_path / "ds"
    prepare_dataset(_classic(broken), out, copy=True, workers=2)
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    shutil.rmtree(broken)  # the sources are gone: the dataset must not need them
    ds = load_dataset(moved)
    assert ds.info["paths"] == "relative"
    for row in ds.table.to_pylist():
        assert not os.path.isabs(row["image"]) and ".." not in row["image"]
        assert row["image"].startswith(f"images/{row['defect_class']}/")
    frame = ds.frame()
    assert all(Path(p).is_file() and Path(p).is_relative_to(moved) for p in frame["image"])
    masks = [m for m in frame["mask"] if m is not None]
    assert masks and all(Path(m).is_relative_to(moved / "masks") for m in masks)
    for m in masks:
        assert decode_mask(m).soft_pixels == 0  # written binarised
    soft = frame[frame["image"].str.contains("spot_2-")].iloc[0]
    np.testing.assert_array_equal(decode_mask(soft["mask"]).array, sample("spot", 2, size=32).mask)


def test_copy_never_writes_outside_the_dataset_root(tmp_path):
    root = tmp_path / "in" / "evil..name"
    for i in range(3):
        s = sample("spot", i, size=32)
        _png(root / f"x{i}.png", s.image)
        _png(root / f"x{i}_m.png", s.mask.astype(np.uint8) * 255)
    # the class regex captures a whole absolute folder path, slashes and dots included
    listing = import_generic(str(root / "x?.png"), "{parent}/{stem}_m.png", class_regex=r"^(.*)/x\d")
    out = tmp_path / "out" / "ds"
    prepare_dataset(listing, out, copy=True, workers=1)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(tmp_path / "in")]
    assert len(written) == 3 + 3 + 3  # images, masks, manifest + dataset.yaml + problems.csv
    assert all(p.resolve().is_relative_to(out.resolve()) for p in written)


def test_duplicates_are_kept_once(tmp_path):
    root = tmp_path / "raw"
    for i in range(10):
        _normal(root, i)
    shutil.copyfile(root / "normal_images" / "normal_3.png", root / "normal_images" / "z_again.png")
    report = prepare_dataset(import_classic(normal_images=root / "normal_images"), tmp_path / "ds", workers=1)
    rows = pq.read_table(tmp_path / "ds" / "manifest.parquet").to_pylist()
    assert len(rows) == 10 and len({r["sha1"] for r in rows}) == 10
    assert [Path(p.file).name for p in report.problems] == ["z_again.png"]


def test_splits_are_stratified_and_every_class_gets_val_and_test(synth_dataset):
    counts = synth_dataset.counts()
    assert synth_dataset.class_names == ["normal", "crack", "missing_piece", "scratch", "spot"]
    for cls in ("crack", "missing_piece", "scratch", "spot"):
        assert counts[cls] == {"train": 6, "val": 1, "test": 1}
    assert counts["normal"] == {"train": 19, "val": 3, "test": 2}
    info = synth_dataset.info
    assert info["counts"]["spot"] == {"train": 6, "val": 1, "test": 1, "total": 8}
    assert info["importer"]["name"] == "classic" and info["schema_version"] == 1


def test_split_is_deterministic_and_depends_on_the_seed(synth_raw, tmp_path):
    listing = _classic(Path(synth_raw["out"]))
    a = prepare_dataset(listing, tmp_path / "a", workers=1)
    b = prepare_dataset(listing, tmp_path / "b", workers=1)
    c = prepare_dataset(listing, tmp_path / "c", seed=1, workers=1)

    def splits(report):
        t = pq.read_table(report.manifest)
        return dict(zip(t.column("sha1").to_pylist(), t.column("split").to_pylist(), strict=True))

    assert splits(a) == splits(b)
    assert splits(a) != splits(c)
    assert a.counts == c.counts  # a new seed changes which images, not how many


def test_re_preparing_with_more_images_keeps_old_images_in_their_split(tmp_path):
    root = tmp_path / "raw"
    for i in range(10):
        _defect(root, "crack", i)
    for i in range(20):
        _normal(root, i)
    out = tmp_path / "ds"
    prepare_dataset(_classic(root), out, workers=1)
    old = {r["sha1"]: r["split"] for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    for i in range(10, 40):
        _defect(root, "crack", i)
    for i in range(20, 60):
        _normal(root, i)
    shutil.copyfile(root / "normal_images" / "normal_0.png", root / "normal_images" / "zz_dup.png")
    report = prepare_dataset(_classic(root), out, workers=1)
    new = {r["sha1"]: r["split"] for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert report.kept_previous == 30
    assert all(new[sha] == split for sha, split in old.items())
    assert report.counts["crack"] == {"train": 32, "val": 4, "test": 4}  # still stratified as the class grew
    assert report.counts["normal"] == {"train": 48, "val": 6, "test": 6}
    assert yaml.safe_load((out / "dataset.yaml").read_text())["split"]["kept_previous"] == 30


def test_refuses_an_output_folder_that_holds_something_else(synth_raw, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        prepare_dataset(_classic(Path(synth_raw["out"])), tmp_path, workers=1)


def test_no_usable_images_is_an_error(tmp_path):
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="no usable images"):
        prepare_dataset(import_classic(normal_images=tmp_path / "n"), tmp_path / "ds", workers=1)


# --- importers ------------------------------------------------------------------------------------------------------


def test_classic_masks_match_by_stem_across_folders_and_flat_defects_get_one_class(tmp_path):
    for i in range(3):
        s = sample("crack", i, size=32)
        _png(tmp_path / "imgs" / f"c{i}.jpg".replace(".jpg", ".png"), s.image)
        _png(tmp_path / "masks" / "nested" / f"c{i}_mask.png", s.mask.astype(np.uint8) * 255)
    listing = import_classic(tmp_path / "imgs", tmp_path / "masks")
    assert {c.defect_class for c in listing.candidates} == {"defect"}
    assert all(c.mask and c.mask.endswith(f"{Path(c.image).stem}_mask.png") for c in listing.candidates)
    _png(tmp_path / "masks" / "other" / "c0.png", np.zeros((32, 32), np.uint8))
    listing = import_classic(tmp_path / "imgs", tmp_path / "masks")
    assert [p.reason for p in listing.problems] == ["ambiguous mask"]


def test_classic_usage_errors(tmp_path):
    with pytest.raises(DataError, match="--defect-masks"):
        import_classic(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        import_classic(normal_images=tmp_path / "nope")
    (tmp_path / "d" / "normal").mkdir(parents=True)
    _png(tmp_path / "d" / "normal" / "a.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="reserved"):
        import_classic(tmp_path / "d", tmp_path)


def _mvtec(root: Path) -> Path:
    cat = root / "bottle"
    for i in range(4):
        _png(cat / "train" / "good" / f"{i:03d}.png", sample("normal", i, size=32).image)
    for i in range(2):
        _png(cat / "test" / "good" / f"{i:03d}.png", sample("normal", 10 + i, size=32).image)
    for cls in ("broken_large", "contamination"):
        for i in range(3):
            s = sample("spot" if cls == "contamination" else "missing_piece", i, size=32)
            _png(cat / "test" / cls / f"{i:03d}.png", s.image)
            _png(cat / "ground_truth" / cls / f"{i:03d}_mask.png", s.mask.astype(np.uint8) * 255)
    (cat / "ground_truth" / "contamination" / "002_mask.png").unlink()
    (cat / "license.txt").write_text("CC BY-NC-SA")
    return cat


def test_mvtec_importer(tmp_path):
    cat = _mvtec(tmp_path)
    report = prepare_dataset(import_mvtec(cat), tmp_path / "ds", workers=1)
    assert report.classes == ["normal", "broken_large", "contamination"]
    assert {c: sum(v.values()) for c, v in report.counts.items()} == {
        "normal": 6,
        "broken_large": 3,
        "contamination": 2,
    }
    assert [(Path(p.file).name, p.reason) for p in report.problems] == [("002.png", "missing mask")]
    assert yaml.safe_load((tmp_path / "ds" / "dataset.yaml").read_text())["importer"]["name"] == "mvtec"
    with pytest.raises(DataError, match="categories bottle"):
        import_mvtec(tmp_path)
    with pytest.raises(DataError, match="not an MVTec AD category"):
        import_mvtec(cat / "train")


def _tiles(root: Path) -> Path:
    """A miniature magnetic-tile layout: MT_<Class>/Imgs/<name>.jpg with the mask <name>.png beside it."""
    for cls, kind, n in (("Free", "normal", 6), ("Crack", "crack", 5), ("Blowhole", "spot", 5)):
        for i in range(n):
            s = sample(kind, i, size=32)
            folder = root / f"MT_{cls}" / "Imgs"
            folder.mkdir(parents=True, exist_ok=True)
            from PIL import Image

            Image.fromarray(s.image).save(folder / f"exp_{i}.jpg", quality=95)
            _png(folder / f"exp_{i}.png", s.mask.astype(np.uint8) * 255)
    _png(root / "MT_Crack" / "Imgs" / "exp_0.png", np.zeros((32, 32), np.uint8))  # an empty mask
    return root


def test_generic_importer_with_classes_from_the_path(tmp_path):
    root = _tiles(tmp_path / "tiles")
    listing = import_generic(str(root / "MT_*" / "Imgs" / "*.jpg"), "{parent}/{stem}.png", r"MT_(\w+)/", "Free")
    report = prepare_dataset(listing, tmp_path / "ds", workers=1)
    assert report.classes == ["normal", "Blowhole", "Crack"]
    assert {c: sum(v.values()) for c, v in report.counts.items()} == {"normal": 6, "Blowhole": 5, "Crack": 5}
    assert [(Path(p.file).parent.parent.name, p.reason) for p in report.problems] == [("MT_Crack", "empty mask")]
    named = import_generic(str(root / "MT_*" / "Imgs" / "*.jpg"), "{parent}/{stem}.png", r"MT_(?P<class>\w+)/", "Free")
    assert {c.defect_class for c in named.candidates} == {"normal", "Blowhole", "Crack"}


def test_generic_importer_without_classes_uses_the_mask(tmp_path):
    for i in range(4):
        s = sample("scratch", i, size=32)
        _png(tmp_path / "img" / f"a{i}.png", s.image)
        if i < 2:
            _png(tmp_path / "gt" / f"a{i}.png", s.mask.astype(np.uint8) * 255)
    _png(tmp_path / "img" / "b.png", sample("normal", 0, size=32).image)
    _png(tmp_path / "gt" / "b.png", np.zeros((32, 32), np.uint8))  # empty mask: normal
    listing = import_generic(str(tmp_path / "img" / "*.png"), str(tmp_path / "gt" / "{name}"))
    report = prepare_dataset(listing, tmp_path / "ds", workers=1)
    assert report.counts["defect"]["train"] + report.counts["defect"]["val"] + report.counts["defect"]["test"] == 2
    assert sum(report.counts["normal"].values()) == 3 and report.problems == []


def test_generic_importer_errors_name_the_option_and_the_fix(tmp_path):
    _png(tmp_path / "MT_A" / "x.png", np.zeros((8, 8), np.uint8))
    glob = str(tmp_path / "MT_*" / "*.png")
    with pytest.raises(DataError, match=r"unknown field\(s\) \{stemm\}.*valid fields"):
        import_generic(glob, "{parent}/{stemm}.png")
    with pytest.raises(DataError, match="needs a group"):
        import_generic(glob, "{parent}/{stem}_m.png", class_regex="MT_")
    with pytest.raises(DataError, match="invalid regular expression"):
        import_generic(glob, "{parent}/{stem}_m.png", class_regex="MT_(")
    with pytest.raises(DataError, match="'Free' matched no image; classes found by --class-regex: A"):
        import_generic(glob, "{parent}/{stem}_m.png", class_regex=r"MT_(\w+)/", normal_class="Free")
    with pytest.raises(DataError, match="matched no files"):
        import_generic(str(tmp_path / "nothing" / "*.png"), "{parent}/{stem}_m.png")
    with pytest.raises(DataError, match="--mask-template"):
        import_generic(glob)
    with pytest.raises(DataError, match="one layout per run"):
        listing_from_options(normal_images=str(tmp_path), mvtec=str(tmp_path))
    with pytest.raises(DataError, match="no input given"):
        listing_from_options()


# --- CLI ------------------------------------------------------------------------------------------------------------


def test_cli_prepare_prints_the_summary_and_where_outputs_went(broken, tmp_path):
    out = tmp_path / "ds"
    args = ["prepare", "--defect-images", str(broken / "defect_images"), "--defect-masks", str(broken / "defect_masks")]
    args += ["--normal-images", str(broken / "normal_images"), "--out", str(out), "--max-pixels", "1600"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.split()[:4] == ["class", "train", "val", "test"] for line in lines)
    assert any(line.split()[:1] == ["total"] and line.split()[-1] == "20" for line in lines)
    assert any("unreadable image" in line and line.split()[-1] == "3" for line in lines)
    assert f"dataset:  {out / 'manifest.parquet'}" in result.output
    assert f"problems: {out / 'problems.csv'}" in result.output
    strict = CliRunner().invoke(cli, [*args, "--strict"])
    assert strict.exit_code == 1
    assert next(line for line in strict.output.splitlines() if line.startswith("error:")).count("problems.csv") == 1
    usage = CliRunner().invoke(cli, ["prepare", "--out", str(out), "--mvtec", str(broken), "--images", "x"])
    assert usage.exit_code == 1 and "one layout per run" in usage.output
    bad_split = CliRunner().invoke(cli, [*args, "--split", "0.8,0.3,0.1"])
    assert bad_split.exit_code == 1 and "sum to 1.2" in bad_split.output


def test_cli_prepare_max_pixels_comes_from_the_config_too(broken, tmp_path):
    args = ["prepare", "--normal-images", str(broken / "normal_images"), "--out", str(tmp_path / "ds")]
    result = CliRunner().invoke(cli, [*args, "--set", "data.max_image_pixels=1600"])
    assert result.exit_code == 0, result.output
    assert "image too large" in result.output


def test_parallel_scan_gives_the_same_dataset_as_one_worker(synth_raw, tmp_path, monkeypatch):
    from raydefect.data import prepare

    monkeypatch.setattr(prepare, "PROCESS_MIN_ITEMS", 8)  # forked processes (or threads when Ray is loaded)
    listing = _classic(Path(synth_raw["out"]))
    one = prepare_dataset(listing, tmp_path / "one", workers=1)
    two = prepare_dataset(listing, tmp_path / "two", workers=2)
    assert one.images == 56 and pq.read_table(one.manifest).equals(pq.read_table(two.manifest))


def test_an_output_folder_inside_the_input_is_never_imported(tmp_path):
    root = tmp_path / "normal_images"
    for i in range(6):
        _normal(tmp_path, i)
    out = root / "dataset"
    prepare_dataset(import_classic(normal_images=root), out, copy=True, workers=1)
    again = prepare_dataset(import_classic(normal_images=root), out, copy=True, workers=1)
    assert again.images == 6 and again.kept_previous == 6
    assert {p.reason for p in again.problems} == {"inside the output folder"}  # not even manifest.parquet
    assert not any(p.reason == "duplicate" for p in again.problems)


def test_re_preparing_drops_copies_that_are_no_longer_referenced(tmp_path):
    for i in range(6):
        _normal(tmp_path, i)
    out = tmp_path / "ds"
    prepare_dataset(import_classic(normal_images=tmp_path / "normal_images"), out, copy=True, workers=1)
    (tmp_path / "normal_images" / "normal_0.png").unlink()
    prepare_dataset(import_classic(normal_images=tmp_path / "normal_images"), out, copy=True, workers=1)
    assert len(list((out / "images").rglob("*.png"))) == 5 and len(load_dataset(out)) == 5
    prepare_dataset(import_classic(normal_images=tmp_path / "normal_images"), out, workers=1)  # no --copy now
    assert not (out / "images").exists() and load_dataset(out).info["paths"] == "absolute"
