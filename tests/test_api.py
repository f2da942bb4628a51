"""The Python API (`raydefect.load_model`, `Model.predict`, `read_scores`, `load_dataset`): every input kind, bad
inputs, and the same numbers as `raydefect predict` and `raydefect score`."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import raydefect
from raydefect.errors import ArtifactError, DataError
from raydefect.imaging import decode_image
from raydefect.tasks.predict import predict_images


@pytest.fixture(scope="module")
def model(tiny_artifact):
    return raydefect.load_model(tiny_artifact, device="cpu")


@pytest.fixture(scope="module")
def pngs(synth_archive) -> list[str]:
    """Readable PNGs of the archive (lossless, so decoding them gives the arrays the API is handed in memory)."""
    files = sorted(str(p) for p in Path(synth_archive["out"]).rglob("*.png"))
    good = []
    for f in files:
        try:
            decode_image(f)
        except raydefect.errors.RaydefectError:
            continue
        good.append(f)
    return good[:5]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_same(a, b):
    assert (a.width, a.height, a.is_defect, a.defect_class, a.bbox, a.mask_area_px) == (
        b.width,
        b.height,
        b.is_defect,
        b.defect_class,
        b.bbox,
        b.mask_area_px,
    )
    assert a.defect_score == pytest.approx(b.defect_score, abs=1e-6)
    assert np.array_equal(a.mask, b.mask)


def _assert_matches_csv(predictions, rows, class_names):
    assert [p.path for p in predictions] == [r["path"] for r in rows]
    for p, r in zip(predictions, rows, strict=True):
        if r["error"]:
            assert not p.ok and p.defect_score is None and p.mask is None and p.error == r["error"]
            continue
        assert p.ok and (p.width, p.height) == (int(r["width"]), int(r["height"]))
        assert f"{p.defect_score:.6f}" == r["defect_score"]
        assert (int(p.is_defect), p.defect_class) == (int(r["is_defect"]), r["defect_class"])
        assert [f"{p.class_scores[c]:.6f}" for c in class_names] == [r[f"p_{c}"] for c in class_names]
        assert p.mask.dtype == bool and p.mask.shape == (p.height, p.width)
        assert p.mask_area_px == int(r["mask_area_px"]) == int(p.mask.sum())
        assert (" ".join(map(str, p.bbox)) if p.bbox else "") == r["bbox"]


def test_import_raydefect_is_light_and_the_api_is_reachable_from_it():
    assert {"load_model", "read_scores", "load_dataset"} <= set(dir(raydefect))
    assert raydefect.Prediction is raydefect.api.Prediction
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = raydefect.nothing


def test_a_folder_gives_the_numbers_of_raydefect_predict(model, tiny_artifact, synth_archive, tmp_path):
    """The parity the API promises: one prediction per scores.csv row, same order, same numbers, same errors."""
    summary = predict_images(tiny_artifact, synth_archive["out"], tmp_path, batch_size=8, overlays=False, device="cpu")
    predictions = model.predict(synth_archive["out"], batch_size=5)  # another batch size changes nothing
    assert len(predictions) == summary.images == 40
    assert sum(not p.ok for p in predictions) == summary.errors == synth_archive["corrupt"] == 3
    _assert_matches_csv(predictions, _csv_rows(tmp_path / "scores.csv"), model.class_names)
    assert sum(p.is_defect for p in predictions if p.ok) == summary.defects


def test_paths_arrays_pil_and_a_batch_array_agree(model, pngs):
    by_path = model.predict(pngs)
    assert [p.path for p in by_path] == pngs and all(p.ok for p in by_path)
    arrays = [decode_image(p) for p in pngs]
    for other in (
        model.predict(arrays),
        model.predict([Image.fromarray(a) for a in arrays]),
        model.predict(np.stack(arrays)),
        [model.predict(a)[0] for a in arrays],
        [model.predict(Path(p))[0] for p in pngs],
    ):
        assert len(other) == len(by_path)
        for a, b in zip(other, by_path, strict=True):
            _assert_same(a, b)
    assert model.predict(arrays[0])[0].path is None
    grey = model.predict(arrays[0][:, :, 0])[0]  # H x W grey becomes RGB
    assert grey.ok and grey.mask.shape == arrays[0].shape[:2]
    opaque = np.dstack([arrays[0], np.full(arrays[0].shape[:2], 255, np.uint8)])
    _assert_same(model.predict(opaque)[0], by_path[0])
    clear = np.dstack([arrays[0], np.zeros(arrays[0].shape[:2], np.uint8)])  # composited onto black, as files are
    _assert_same(model.predict(clear)[0], model.predict(np.zeros_like(arrays[0]))[0])
    _assert_same(model.predict(Image.fromarray(clear))[0], model.predict(np.zeros_like(arrays[0]))[0])


def test_a_corrupt_file_among_good_ones_is_a_result_with_its_error(model, pngs, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy(pngs[0], tmp_path / "good.png")
    out = model.predict([pngs[1], str(broken), str(tmp_path / "good.png")], batch_size=2)
    assert [p.ok for p in out] == [True, False, True]
    assert out[1].path == str(broken) and out[1].error and out[1].class_scores == {} and out[1].bbox is None
    _assert_same(out[2], model.predict(pngs[0])[0])
    folder = model.predict(tmp_path)  # the same in a folder: listed, scored, the bad one recorded
    assert [Path(p.path).name for p in folder] == ["broken.png", "good.png"] and [p.ok for p in folder] == [0, 1]


def test_thresholds_can_be_replaced_per_call(model, pngs):
    everything = model.predict(pngs, threshold=0.0, pixel_threshold=0.0)
    assert all(p.is_defect and p.defect_class != "normal" for p in everything)
    assert all(p.mask_area_px == p.width * p.height for p in everything)
    assert model.thresholds == {"image": 0.5, "pixel": 0.5}  # the model's own are unchanged
    with pytest.raises(DataError, match="--threshold 2"):
        model.predict(pngs, threshold=2)


def test_bad_inputs_raise_one_line_errors(model, tiny_artifact, tmp_path):
    with pytest.raises(ArtifactError, match="model artifact not found"):
        raydefect.load_model(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="not a raydefect model artifact"):
        raydefect.load_model(tmp_path)
    cases = [
        (tmp_path / "missing.png", "no such file or folder"),
        (tmp_path, "no image files found"),
        (np.zeros((8, 8, 3), np.float32), "dtype float32"),
        (np.zeros((8, 8, 2), np.uint8), r"shape \(8, 8, 2\)"),
        ([], "an empty list"),
        ([1], r"x\[0\]: a int"),
        (3.5, "a float"),
    ]
    for x, message in cases:
        with pytest.raises(DataError, match=message) as info:
            model.predict(x)
        assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="batch_size 0"):
        model.predict(np.zeros((8, 8, 3), np.uint8), batch_size=0)
    assert repr(model).startswith(f"Model({model.model_id}") and model.class_names[0] == "normal"


def test_a_tiled_model_predicts_whole_images_as_predict_does(tmp_path):
    """The model's geometry travels with it: under tiles, each image is cut, scored and stitched at its own size."""
    import torch

    from raydefect.config import ModelConfig
    from raydefect.geometry import Geometry
    from raydefect.models.artifact import save_artifact
    from raydefect.models.model import DefectModel

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test-tiny", pretrained=False, decoder_dim=16, head_hidden=16)
    net = DefectModel(cfg, 32, ("normal", "scratch"), geometry=Geometry("tiles", 32, 1.0, 8)).eval()
    save_artifact(net, tmp_path / "tiled", thresholds={"image": 0.5, "pixel": 0.5})
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (w, h) in enumerate([(70, 45), (32, 32), (100, 20)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    predict_images(tmp_path / "tiled", folder, tmp_path / "out", batch_size=2, overlays=False, device="cpu")
    tiled = raydefect.load_model(tmp_path / "tiled", device="cpu")
    predictions = tiled.predict(folder, batch_size=3)
    assert [p.mask.shape for p in predictions] == [(45, 70), (32, 32), (20, 100)]
    _assert_matches_csv(predictions, _csv_rows(tmp_path / "out" / "scores.csv"), ["normal", "scratch"])


def test_read_scores_gives_what_score_committed_and_load_dataset_opens_a_dataset(
    model, tiny_artifact, synth_archive, synth_dataset, tmp_path
):
    """A scores folder committed through the scoring core (no Ray: the protocol `raydefect score` drives), read
    back as pandas; its numbers are the API's. As predict, the scorer here decodes JPEGs in full (score's
    ``reduced_jpeg`` off) and runs fp32 (score's 'auto' is bf16 on a CPU with native bf16)."""
    from raydefect.models.artifact import read_artifact_meta
    from raydefect.scoring.keys import KeySet
    from raydefect.scoring.records import RunRecord, StagedFile, write_staged
    from raydefect.scoring.schema import file_metadata
    from raydefect.scoring.scorer import BatchScorer
    from raydefect.scoring.storage import Storage
    from raydefect.scoring.store import ScoreStore

    files = sorted(str(p) for p in Path(synth_archive["out"]).rglob("*") if p.is_file())
    scorer = BatchScorer(str(tiny_artifact), "r1", device="cpu", precision="fp32", reduced_jpeg=False)
    table = scorer.score(files)
    meta = read_artifact_meta(tiny_artifact)
    store = ScoreStore(str(tmp_path / "scores"))
    store.open()
    info = write_staged(table, store.staging("r1"), Storage(), file_metadata(meta, "r1", "stat"), "stat")
    store.commit(RunRecord("r1", meta.model_id, "stat"), [StagedFile.from_row(info)], KeySet())

    frame = raydefect.read_scores(tmp_path / "scores")
    assert len(frame) == 40 and {"path", "defect_score", "is_defect", "mask_png", "error"} <= set(frame.columns)
    by_path = {p.path: p for p in model.predict(files)}
    for row in frame.itertuples():
        p = by_path[row.path]
        assert isinstance(row.error, str) != p.ok  # pandas holds a missing error as NaN
        if p.ok:
            assert row.defect_score == pytest.approx(p.defect_score, abs=1e-5) and row.is_defect == p.is_defect
    with pytest.raises(DataError, match="no raydefect scores here"):
        raydefect.read_scores(tmp_path)

    dataset = raydefect.load_dataset(synth_dataset.root)
    assert dataset.class_names == synth_dataset.class_names and len(dataset) == len(synth_dataset)
    with pytest.raises(DataError, match="does not exist"):
        raydefect.load_dataset(tmp_path / "nothing")
