"""`raydefect predict`: input listing, scores.csv rows that match the core inference API, overlays, bad files."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from raydefect.cli import cli
from raydefect.errors import DataError
from raydefect.imaging import decode_image
from raydefect.inference import Predictor, Preprocessor, decide, postprocess
from raydefect.tasks.predict import COLUMNS, TAIL_COLUMNS, list_images, overlay_names, predict_images
from raydefect.viz.overlay import display_scale


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def predicted(tiny_artifact, synth_archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict")
    summary = predict_images(tiny_artifact, synth_archive["out"], out, batch_size=8, device="cpu", workers=2)
    return summary, out


def test_list_images_folder_glob_file(tmp_path):
    for rel in ("a/x.png", "a/b/y.JPG", "c/z.txt", "w.bmp"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    root = str(tmp_path)
    assert [os.path.relpath(p, root) for p in list_images(root)] == ["a/b/y.JPG", "a/x.png", "w.bmp"]
    assert [os.path.relpath(p, root) for p in list_images(f"{root}/**/*.png")] == ["a/x.png"]
    assert list_images([f"{root}/c/z.txt", f"{root}/w.bmp", f"{root}/w.bmp"]) == sorted(
        [f"{root}/c/z.txt", f"{root}/w.bmp"]
    )  # a file named explicitly is taken whatever its extension; duplicates once
    with pytest.raises(DataError, match="no such file or folder"):
        list_images(f"{root}/missing")
    with pytest.raises(DataError, match="no image files found"):
        list_images(f"{root}/c")


def test_overlay_names_keep_folders_and_never_collide():
    names = overlay_names(["/d/a/x.png", "/d/b/x.png", "/d/b/y.jpg", "/d/b/y.png"])
    assert names == ["a/x.png", "b/x.png", "b/y.jpg.png", "b/y.png.png"]
    assert len(set(names)) == 4


def test_scores_csv_has_a_row_per_file_and_errors_for_corrupt_ones(predicted, synth_archive):
    summary, out = predicted
    rows = _rows(out / "scores.csv")
    assert summary.images == len(rows) == synth_archive["files"] == 40
    classes = ["p_normal", "p_scratch", "p_spot"]
    assert list(rows[0]) == [*COLUMNS, *classes, *TAIL_COLUMNS]
    bad = [r for r in rows if r["error"]]
    assert len(bad) == summary.errors == synth_archive["corrupt"] == 3
    for r in bad:
        assert r["defect_score"] == "" and r["overlay"] == ""
    good = [r for r in rows if not r["error"]]
    for r in good:
        probs = [float(r[c]) for c in classes]
        assert sum(probs) == pytest.approx(1, abs=1e-5)
        assert float(r["defect_score"]) == pytest.approx(1 - probs[0], abs=1e-5)
        assert int(r["width"]) == int(r["height"]) == 64
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert summary.defects == sum(int(r["is_defect"]) for r in good)


def test_rows_match_the_core_inference_api(predicted, tiny_artifact):
    """Batching, threads and CSV formatting change nothing: every row equals a one-image run of the core API."""
    _, out = predicted
    predictor = Predictor(tiny_artifact, device="cpu")
    pre = Preprocessor(predictor.meta)
    for r in [r for r in _rows(out / "scores.csv") if not r["error"]][::6]:
        result = predictor.predict(pre(decode_image(r["path"]))[None])
        score = float(result["defect_score"][0])
        assert float(r["defect_score"]) == pytest.approx(score, abs=2e-6)
        is_defect, cls = decide(score, result["class_probs"][0], predictor.meta)
        assert (bool(int(r["is_defect"])), r["defect_class"]) == (is_defect, cls)
        mask = postprocess(result["mask_prob"][0], 64, 64, predictor.meta.pixel_threshold)
        assert int(r["mask_area_px"]) == mask.area_px
        expected_bbox = "" if mask.bbox is None else " ".join(map(str, mask.bbox))
        assert r["bbox"] == expected_bbox


def test_overlays_are_twice_as_wide_as_the_displayed_image(predicted, synth_archive):
    _, out = predicted
    rows = [r for r in _rows(out / "scores.csv") if not r["error"]]
    scale = int(display_scale(64, 64))
    for r in rows:
        overlay = out / r["overlay"]
        assert overlay.is_file(), overlay
        with Image.open(overlay) as im:
            assert im.size == (2 * 64 * scale, 64 * scale) and im.mode == "RGB"
    rel = os.path.relpath(rows[0]["path"], synth_archive["out"])
    assert rows[0]["overlay"] == "overlays/" + os.path.splitext(rel)[0] + ".png"  # sub-folders kept
    left = np.asarray(Image.open(out / rows[0]["overlay"]))[:, : 64 * scale]
    original = np.repeat(np.repeat(decode_image(rows[0]["path"]), scale, 0), scale, 1)
    assert np.array_equal(left[64:], original[64:])  # the left half is the original (below the label box)


def test_threshold_override(tiny_artifact, synth_archive, tmp_path):
    images = str(Path(synth_archive["out"]) / "line_0")
    everything = predict_images(tiny_artifact, images, tmp_path / "all", threshold=0.0, overlays=False, device="cpu")
    nothing = predict_images(tiny_artifact, images, tmp_path / "none", threshold=1.0, overlays=False, device="cpu")
    readable = everything.images - everything.errors
    assert everything.defects == readable and nothing.defects <= 1  # a score of exactly 1.0 would still count
    assert not (tmp_path / "all" / "overlays").exists()
    with pytest.raises(DataError, match="--threshold"):
        predict_images(tiny_artifact, images, tmp_path / "x", threshold=1.5)


def test_cli_predict(tiny_artifact, synth_archive, tmp_path):
    args = ["predict", "--model", str(tiny_artifact), "--images", f"{synth_archive['out']}/line_1/**/*.png"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path), "--batch-size", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "images/s" in result.output and "scores:" in result.output
    rows = _rows(tmp_path / "scores.csv")
    assert rows and all(r["path"].endswith(".png") and "/line_1/" in r["path"] for r in rows)
    one = CliRunner().invoke(cli, ["predict", "--model", str(tiny_artifact), "--images", rows[0]["path"], "--out",
                                   str(tmp_path / "one"), "--device", "cpu", "--no-overlays"])  # fmt: skip
    # "1 image", never "1 images" (a rate such as "55.1 images/s" is not a count)
    assert one.exit_code == 0 and "1 image in" in one.output, one.output
    assert not re.search(r"(?<![\d.])1 images", one.output), one.output
    # not a terminal: the progress ends with one plain line, no ANSI codes or carriage returns
    assert "predict: 1/1 image (100%)" in one.output and "\x1b" not in one.output and "\r" not in one.output
    missing = CliRunner().invoke(cli, ["predict", "--model", str(tmp_path), "--images", ".", "--out", str(tmp_path)])
    assert missing.exit_code == 1 and "model" in missing.output and "Traceback" not in missing.output
