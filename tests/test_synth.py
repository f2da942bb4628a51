"""`raydefect synth`: determinism, exact masks, visible defects, the archive's corrupt files, the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from raydefect.cli import cli
from raydefect.data import synth
from raydefect.data.synth import DEFECT_CLASSES, TEXTURES, generate_archive, generate_raw, sample
from raydefect.errors import CorruptImageError, DataError
from raydefect.imaging import decode_image, decode_mask, read_info


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path):
    a = generate_raw(tmp_path / "a", 3, 4, 32, seed=7, workers=1)
    b = generate_raw(tmp_path / "b", 3, 4, 32, seed=7, workers=1)
    c = generate_raw(tmp_path / "c", 3, 4, 32, seed=8, workers=1)
    fa, fb, fc = _files(Path(a["out"])), _files(Path(b["out"])), _files(Path(c["out"]))
    assert len(fa) == 4 * 3 * 2 + 4 + 1  # images + masks + normals + synth.yaml
    assert fa == fb
    differing = [k for k in fa if k.endswith(".png") and fa[k] != fc[k]]
    assert len(differing) >= 4 * 3 + 4  # every image differs (masks of a different seed too, mostly)


def test_more_images_keep_the_first_ones_unchanged(tmp_path):
    small = _files(Path(generate_raw(tmp_path / "s", 2, 2, 32, seed=1, workers=1)["out"]))
    big = _files(Path(generate_raw(tmp_path / "b", 4, 5, 32, seed=1, workers=1)["out"]))
    for name, data in small.items():
        if name != "synth.yaml":
            assert big[name] == data, name


@pytest.mark.parametrize("kind", DEFECT_CLASSES)
@pytest.mark.parametrize("color", ["gray", "rgb"])
def test_mask_is_exactly_where_the_defect_was_painted(kind, color):
    for i in range(6):
        s = sample(kind, i, seed=3, size=(48, 40), color=color)
        assert s.image.shape[:2] == (40, 48) and s.mask.shape == (40, 48)
        assert s.image.ndim == (3 if color == "rgb" else 2)
        changed = s.image != s.clean
        if changed.ndim == 3:
            changed = changed.any(axis=2)
        assert s.mask.sum() >= 4
        np.testing.assert_array_equal(changed, s.mask)


@pytest.mark.parametrize("kind", DEFECT_CLASSES)
def test_defects_are_high_contrast_so_tiny_models_see_them(kind):
    for i in range(8):
        s = sample(kind, i, seed=0, size=32, color="gray")
        diff = np.abs(s.image.astype(int) - s.clean.astype(int))[s.mask]
        assert diff.min() >= 15, (kind, i)  # every defect pixel moves at least 15 grey levels
        assert diff.mean() >= 40, (kind, i)


def test_textures_differ_and_normal_images_have_no_mask():
    seen = set()
    for i in range(40):
        s = sample("normal", i, seed=0, size=32)
        assert not s.mask.any() and s.defect_class == "normal"
        assert np.array_equal(s.image, s.clean)
        seen.add(s.texture)
    assert seen == set(TEXTURES)


def test_written_files_match_the_samples(tmp_path):
    raw = generate_raw(tmp_path, 2, 2, 32, seed=5, mask_suffix="_mask", color="mixed", workers=1)
    for kind in DEFECT_CLASSES:
        for i in range(2):
            s = sample(kind, i, seed=5, size=32, color="mixed")
            img = Path(raw["defect_images"]) / kind / f"{kind}_{i:05d}.png"
            mask = Path(raw["defect_masks"]) / kind / f"{kind}_{i:05d}_mask.png"
            mode = "RGB" if s.image.ndim == 3 else "L"
            np.testing.assert_array_equal(decode_image(img, mode=mode), s.image)
            m = decode_mask(mask)
            np.testing.assert_array_equal(m.array, s.mask)
            assert m.soft_pixels == 0
    assert sorted(p.name for p in Path(raw["normal_images"]).iterdir()) == ["normal_00000.png", "normal_00001.png"]


def test_parallel_writing_gives_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "PARALLEL_MIN_IMAGES", 8)
    one = _files(Path(generate_raw(tmp_path / "one", 3, 6, 32, seed=2, workers=1)["out"]))
    two = _files(Path(generate_raw(tmp_path / "two", 3, 6, 32, seed=2, workers=2)["out"]))
    assert one == two


def test_archive_has_nested_mixed_files_and_exactly_the_corrupt_ones(tmp_path):
    arc = generate_archive(tmp_path / "archive", 30, 32, seed=0, n_corrupt=3, workers=1)
    root = Path(arc["out"])
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert len(files) == 30
    assert {p.suffix for p in files} == {".png", ".jpg"}
    assert all(len(p.relative_to(root).parts) == 3 for p in files)  # line_k/day_dd/img
    with open(arc["truth_csv"], newline="") as f:
        truth = list(csv.DictReader(f))
    assert Path(arc["truth_csv"]).parent == root.parent  # beside the archive, not in it
    assert len(truth) == 30
    corrupt = {r["path"]: r["corrupt_reason"] for r in truth if r["kind"] == "corrupt"}
    assert sorted(corrupt.values()) == ["text_named_png", "truncated", "zero_bytes"]
    for r in truth:
        path = root / r["path"]
        if r["path"] in corrupt:
            with pytest.raises(CorruptImageError):
                decode_image(path)
        else:
            assert decode_image(path).shape == (32, 32, 3)
    truncated = next(root / p for p, why in corrupt.items() if why == "truncated")
    assert read_info(truncated).width == 32  # the header survives: only a full decode finds truncation
    assert any(r["kind"] != "normal" and r["kind"] != "corrupt" for r in truth)
    again = generate_archive(tmp_path / "archive2", 30, 32, seed=0, n_corrupt=3, workers=1)
    assert _files(Path(again["out"])) == _files(root)


def test_refuses_to_mix_with_an_earlier_set_unless_overwrite(tmp_path):
    generate_raw(tmp_path, 2, 2, 32, workers=1)
    with pytest.raises(DataError, match="--overwrite"):
        generate_raw(tmp_path, 1, 1, 32, workers=1)
    generate_raw(tmp_path, 1, 1, 32, overwrite=True, workers=1)
    assert len(list((tmp_path / "defect_images" / "spot").iterdir())) == 1  # the old files are gone


def test_bad_options_are_user_errors(tmp_path):
    with pytest.raises(DataError, match="unknown synthetic defect class"):
        generate_raw(tmp_path, 1, 1, 32, classes=["dent"])
    with pytest.raises(DataError, match="unknown texture"):
        generate_raw(tmp_path, 1, 1, 32, textures=["wood"])
    with pytest.raises(DataError, match="size"):
        generate_raw(tmp_path, 1, 1, 4)


def test_cli_synth_writes_raw_and_archive(tmp_path):
    out = tmp_path / "raw"
    result = CliRunner().invoke(
        cli,
        ["synth", str(out), "--per-class", "2", "--normal", "3", "--size", "40x32", "--classes", "spot,crack",
         "--color", "gray", "--archive", "10"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote 7 images" in result.output and "archive of 10 files (3 corrupt)" in result.output
    assert sorted(p.name for p in (out / "defect_images").iterdir()) == ["crack", "spot"]
    assert decode_image(out / "defect_images" / "spot" / "spot_00001.png", mode="L").shape == (32, 40)
    assert (out / "archive_truth.csv").is_file()
    again = CliRunner().invoke(cli, ["synth", str(out), "--per-class", "1"])
    assert again.exit_code == 1 and "--overwrite" in again.output
    bad = CliRunner().invoke(cli, ["synth", str(out), "--size", "4"])
    assert bad.exit_code == 2


def test_synthetic_dataset_for_benchmarks(tmp_path):
    from raydefect.data.manifest import load_dataset
    from raydefect.data.synth import DEFECT_CLASSES, synthetic_dataset

    ds = load_dataset(synthetic_dataset(tmp_path, 50, 32))
    assert ds.table.num_rows == 50 and ds.class_names[0] == "normal" and set(ds.class_names[1:]) == set(DEFECT_CLASSES)


def test_defect_size_draws_small_defects_in_large_images():
    import numpy as np

    from raydefect.data.synth import sample

    for kind in ("scratch", "crack", "spot", "missing_piece"):
        big = sample(kind, 0, seed=1, size=(640, 480), defect_size=64, color="gray")
        rows, cols = np.nonzero(big.mask)
        assert big.image.shape == (480, 640) and big.mask.sum() >= 4, kind
        assert rows.max() - rows.min() < 64 and cols.max() - cols.min() < 64, kind  # within one 64 px window
        assert np.array_equal(big.image != big.clean, big.mask), kind  # the mask is exactly the painted pixels
    same = sample("scratch", 3, seed=1, size=96, defect_size=None)
    assert np.array_equal(same.mask, sample("scratch", 3, seed=1, size=96).mask)  # default: unchanged
