"""`raydefect score` on Ray Data end to end: output contract, errors, masks, readers, incremental runs, new model.

One archive copy and one scores folder are shared by the module; tests run in file order: first the ones that
read the first run's output, then the incremental runs that change the archive.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydefect.config import load_config
from raydefect.errors import DataError
from raydefect.imaging import decode_image, decode_png_mask, encode_png
from raydefect.inference import Predictor, Preprocessor, upsample_prob
from raydefect.models.artifact import load_artifact, read_artifact_meta, save_artifact
from raydefect.scoring.results import extract, read_scores, summarize
from raydefect.scoring.schema import SCORE_SCHEMA, read_file_metadata
from raydefect.viz.overlay import display_scale

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SETS = ["score.rows_per_file=16", "score.commit_interval_s=0", "score.batch_size=8"]


def _files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def _data_files(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*/*/*.parquet"))


@pytest.fixture(scope="module")
def first(ray_session, tiny_artifact, synth_archive, tmp_path_factory):
    from raydefect.pipelines.score import run_score

    base = tmp_path_factory.mktemp("score")
    archive = base / "archive"
    shutil.copytree(synth_archive["out"], archive)
    out = base / "scores"
    # the first run uses the ONNX Runtime engine (the later runs PyTorch, the default): the mask and score checks
    # below compare it with PyTorch
    onnx = load_config("default", sets=[*SETS, "score.engine=onnx"])
    report = run_score(str(tiny_artifact), str(archive), str(out), onnx)
    cfg = load_config("default", sets=SETS)
    return SimpleNamespace(archive=archive, out=out, report=report, cfg=cfg, base=base)


def test_first_run_scores_every_file_once(first, synth_archive):
    r = first.report
    assert (r.listed, r.skipped, r.scored, r.errors) == (40, 0, 40, synth_archive["corrupt"])
    assert r.engine == "onnx" and "actor(s) on cpu (ONNX Runtime, fp32)" in "\n".join(r.summary_lines())
    table = pq.read_table(str(first.out))
    assert sorted(table.column("path").to_pylist()) == _files(first.archive)
    files = _data_files(first.out)
    assert r.files == len(files) >= 3  # 40 rows, at most 16 per file
    assert all(pq.read_metadata(f).num_rows <= 16 for f in files)
    assert not list((first.out / "_staging").rglob("*"))  # nothing left uncommitted
    assert r.images_per_s > 0 and r.defects == sum(table.column("is_defect").fill_null(False).to_pylist())


def test_corrupt_files_become_error_rows(first, synth_archive):
    import csv

    with open(synth_archive["truth_csv"], newline="") as f:
        truth = {row["path"]: row for row in csv.DictReader(f)}
    rows = {Path(r["path"]).relative_to(first.archive).as_posix(): r for r in read_scores(str(first.out)).to_pylist()}
    for rel, t in truth.items():
        row = rows[rel]
        if t["corrupt_reason"]:
            assert row["error"], rel
            reason = {"truncated": "truncated", "zero_bytes": "empty file", "text_named_png": "not a recognised"}
            assert reason[t["corrupt_reason"]] in row["error"]
            assert all(row[c] is None for c in ("defect_score", "is_defect", "mask_png", "bbox", "width"))
            assert row["size"] is not None and row["model_id"] and row["run_id"] == first.report.run_id
        else:
            assert row["error"] is None and row["mask_png"] is not None


def test_masks_have_each_images_size_and_match_inference(first, tiny_artifact):
    loaded = load_artifact(tiny_artifact)
    pre, predictor, meta = Preprocessor(loaded.meta), Predictor(loaded, device="cpu"), loaded.meta
    compared = 0
    for row in read_scores(str(first.out)).to_pylist():
        if row["error"]:
            continue
        data = Path(row["path"]).read_bytes()
        assert hashlib.sha1(data).hexdigest() == row["sha1"]
        x, (w, h) = pre.from_bytes(data, path=row["path"])
        direct = predictor.predict(x[None])
        mask = decode_png_mask(row["mask_png"])
        assert mask.shape == (h, w) == (row["height"], row["width"])
        prob = upsample_prob(direct["mask_prob"][0], w, h)
        settled = np.abs(prob - meta.pixel_threshold) > 1e-4
        assert np.array_equal(mask[settled], (prob >= meta.pixel_threshold)[settled])
        assert row["defect_score"] == pytest.approx(float(direct["defect_score"][0]), abs=1e-5)
        scores = dict(row["class_scores"])
        assert scores == pytest.approx(dict(zip(meta.class_names, direct["class_probs"][0].tolist(), strict=True)))
        if row["bbox"] is not None:
            x0, y0, x1, y1 = row["bbox"]
            assert mask[y0:y1, x0:x1].sum() == mask.sum() == row["mask_area_px"]
        compared += 1
    assert compared == 37


def test_readable_without_raydefect_by_pandas_pyarrow_and_duckdb(first, tiny_artifact):
    import duckdb
    import pandas as pd

    meta = read_artifact_meta(tiny_artifact)
    arrow = pq.read_table(str(first.out))
    assert arrow.schema.remove_metadata() == SCORE_SCHEMA.remove_metadata()
    assert arrow.schema.field("mask_png").type == pa.large_binary()
    df = pd.read_parquet(str(first.out))
    assert len(df) == 40 and df["defect_score"].notna().sum() == 37
    glob = str(first.out / "*" / "*" / "*.parquet")
    con = duckdb.connect()
    n, n_err, top = con.execute(
        f"SELECT count(*), count(error), max(defect_score) FROM read_parquet('{glob}')"
    ).fetchone()
    assert (n, n_err) == (40, 3) and top == pytest.approx(df["defect_score"].max())
    png = con.execute(f"SELECT mask_png FROM read_parquet('{glob}') WHERE error IS NULL LIMIT 1").fetchone()[0]
    assert decode_png_mask(bytes(png)).shape == (64, 64)
    md = read_file_metadata(pq.read_metadata(_data_files(first.out)[0]).metadata)
    assert md["model_id"] == meta.model_id and md["thresholds"] == dict(meta.thresholds)
    assert md["class_names"] == list(meta.class_names) and md["version"] and md["key_mode"] == "stat"


def test_summarize_and_extract_on_a_real_output(first, tmp_path):
    s = summarize(str(first.out), top=5, folders=0)
    assert s["images"] == 40 and s["errors"] == 3 and len(s["runs"]) == 1 and s["runs"][0]["state"] == "finished"
    assert s["folders_total"] == 21 and sum(f["images"] for f in s["folders"]) == 40
    r = extract(str(first.out), tmp_path / "x", top=3)
    assert r["masks"] == r["overlays"] == 3
    import csv

    with open(r["index"], newline="") as f:
        index = list(csv.DictReader(f))
    for row in index:
        mask = decode_image((tmp_path / "x" / row["mask"]).read_bytes(), mode="L")
        overlay = decode_image((tmp_path / "x" / row["overlay"]).read_bytes())
        original = decode_image(Path(row["path"]).read_bytes())
        assert mask.shape == original.shape[:2] and set(np.unique(mask)) <= {0, 255}
        h, w = original.shape[:2]  # the predict picture: the image beside the image with the mask, at display scale
        s = display_scale(h, w)
        assert overlay.shape[:2] == (max(1, round(h * s)), 2 * max(1, round(w * s)))
    scores = [float(row["defect_score"]) for row in index]
    assert scores == sorted(scores, reverse=True)


# --- incremental runs (they change the archive: keep them after the tests above) ------------------------------


def test_only_new_and_changed_images_are_scored(first, tiny_artifact):
    from raydefect.pipelines.score import run_score

    scored = [r["path"] for r in read_scores(str(first.out)).to_pylist() if not r["error"]]
    changed = Path(sorted(p for p in scored if p.endswith(".png"))[0])
    old_key = (changed.stat().st_size, changed.stat().st_mtime_ns)
    image = np.zeros((48, 80, 3), np.uint8)
    image[10:20, 10:40] = 255
    changed.write_bytes(encode_png(image))  # a new version: another size
    added = first.archive / "line_9" / "new.png"
    added.parent.mkdir()
    added.write_bytes(encode_png(image[:, ::-1].copy()))
    r = run_score(str(tiny_artifact), str(first.archive), str(first.out), first.cfg)
    assert (r.listed, r.skipped, r.scored, r.errors) == (41, 39, 2, 0)
    from raydefect.inference import resolve_precision  # PyTorch, the default, in this CPU's precision

    want = resolve_precision("auto", "cpu")
    assert (r.engine, r.precision) == ("torch", want) and f"(PyTorch, {want})" in "\n".join(r.summary_lines())
    history = pq.read_table(str(first.out))
    assert history.num_rows == 42  # the old version's row stays: history
    current = read_scores(str(first.out))
    assert current.num_rows == 41 and len(set(current.column("path").to_pylist())) == 41
    row = next(r for r in current.to_pylist() if r["path"] == str(changed))
    assert (row["width"], row["height"], row["run_id"]) == (80, 48, r.run_id)
    assert (row["size"], row["mtime_ns"]) != old_key
    assert decode_png_mask(row["mask_png"]).shape == (48, 80)


def test_hash_key_rescores_nothing_when_only_mtimes_change(first, tiny_artifact):
    from raydefect.pipelines.score import run_score

    touched = sorted(first.archive.rglob("*.jpg"))[0]
    os.utime(touched, ns=(time.time_ns(), time.time_ns()))  # same content, new mtime
    cfg = first.cfg.replace(**{"score.incremental_key": "hash"})
    r = run_score(str(tiny_artifact), str(first.archive), str(first.out), cfg)
    assert (r.listed, r.scored, r.skipped) == (41, 0, 41)  # by content, everything is scored already
    assert pq.read_table(str(first.out)).num_rows == 42


def test_a_new_model_scores_everything_again(first, tmp_path, make_tiny_model):
    from raydefect.pipelines.score import run_score

    other = tmp_path / "model2"
    meta2 = save_artifact(make_tiny_model(seed=1), other, thresholds={"image": 0.5, "pixel": 0.5})
    run2 = run_score(str(other), str(first.archive), str(first.out), first.cfg)
    assert run2.scored == 41 and run2.model_id == meta2.model_id
    current = read_scores(str(first.out))
    assert current.num_rows == 82
    assert sorted(set(current.column("model_id").to_pylist())) == sorted([meta2.model_id, first.report.model_id])
    # summarize and extract read one model, by default the newest run's: each image counted once, not per model
    s = summarize(str(first.out))
    assert [run["model"] for run in s["runs"]].count(meta2.model_id) == 1
    assert s["models"] == [meta2.model_id, first.report.model_id] and s["model"] == meta2.model_id
    assert s["images"] == 41 and s["errors"] == run2.errors
    older = summarize(str(first.out), model=first.report.model_id[:6])  # a unique prefix is enough
    assert older["model"] == first.report.model_id and older["images"] == 41
    with pytest.raises(DataError, match="no such model here; the models in .* are " + meta2.model_id):
        summarize(str(first.out), model="nope")
    r = extract(str(first.out), tmp_path / "x", top=50)
    with open(r["index"], newline="") as f:
        index = list(csv.DictReader(f))
    assert len(index) == 41 - run2.errors and {row["model_id"] for row in index} == {meta2.model_id}


def test_model_weights_reach_the_actors_by_reference_not_inside_their_arguments(ray_session, tiny_artifact):
    """Ray Data keys a callable class by its constructor arguments, by their ``repr`` when unhashable: with the
    weights' bytes inside them the driver built a string ~2.8x the weights (252 MB for a ViT-S) at every run."""
    from raydefect.pipelines.score_stages import actor_kwargs as _actor_kwargs
    from raydefect.pipelines.score_stages import artifact_files as _artifact_files

    kwargs = _actor_kwargs(str(tiny_artifact), model_id="m", threads=1)
    files = _artifact_files(str(tiny_artifact))
    assert sum(len(v) for v in files.values()) > 100_000  # the test model's weights are not trivially small
    hash(tuple(sorted(kwargs.items())))  # hashable: Ray Data needs no repr
    assert len(repr(kwargs)) < 1_000
    assert ray_session.get(kwargs["artifact"][0]) == files
