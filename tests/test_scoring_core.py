"""The scoring core without Ray: keys, inputs and listing, the batch scorer, the commit protocol, reading results."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raydefect.errors import DataError, OutputError
from raydefect.imaging import decode_png_mask
from raydefect.inference import Predictor, Preprocessor, decide, postprocess
from raydefect.models.artifact import load_artifact, read_artifact_meta
from raydefect.paths import glob_regex
from raydefect.scoring.keys import KeySet, contains, first_occurrence, key_digests
from raydefect.scoring.listing import ListFilter, plan_listing, walk
from raydefect.scoring.records import STAGING, RunRecord, StagedFile, write_staged
from raydefect.scoring.results import parse_where, read_scores, select_rows, summarize
from raydefect.scoring.schema import SCORE_SCHEMA, file_metadata, read_file_metadata
from raydefect.scoring.scorer import BatchScorer, Decoder, ModelStep, drop_known, finish, listing_table, stat_locations
from raydefect.scoring.sources import manifest_column, output_folder, resolve_input
from raydefect.scoring.storage import Storage, join_location
from raydefect.scoring.store import ScoreStore

STORAGE = Storage()


def _archive_files(root: str) -> list[str]:
    return sorted(str(p) for p in Path(root).rglob("*") if p.is_file())


# --- keys -----------------------------------------------------------------------------------------------------


def test_key_digests_separate_models_paths_and_versions():
    a = key_digests("m1", ["/a.png", "/b.png"], [10, 10], [5, 5], [], "stat")
    assert a[0] != a[1]
    assert key_digests("m1", ["/a.png"], [10], [5], [], "stat")[0] == a[0]  # deterministic
    assert key_digests("m2", ["/a.png"], [10], [5], [], "stat")[0] != a[0]  # another model
    assert key_digests("m1", ["/a.png"], [11], [5], [], "stat")[0] != a[0]  # changed size
    assert key_digests("m1", ["/a.png"], [10], [6], [], "stat")[0] != a[0]  # changed mtime
    h1 = key_digests("m1", ["/a.png"], [], [], ["ab" * 20], "hash")
    assert h1[0] == key_digests("m1", ["/a.png"], [99], [99], ["ab" * 20], "hash")[0]  # hash ignores stat
    assert h1[0] != key_digests("m1", ["/a.png"], [], [], ["cd" * 20], "hash")[0]
    with pytest.raises(ValueError, match="key mode"):
        key_digests("m", ["/a"], [1], [1], [], "mtime")


def test_keyset_contains_add_and_dedupe():
    d = key_digests("m", [f"/img{i}.png" for i in range(1000)], list(range(1000)), [0] * 1000, [], "stat")
    ks = KeySet(d[:500])
    hits = ks.contains(d)
    assert hits[:500].all() and not hits[500:].any()
    ks.add(d[400:700])
    assert len(ks) == 700 and ks.contains(d[:700]).all() and not ks.contains(d[700:]).any()
    assert not contains(KeySet().array, d).any()
    keep = first_occurrence(np.concatenate([d[:3], d[:2]]))
    assert keep.tolist() == [True, True, True, False, False]


# --- inputs and listing ---------------------------------------------------------------------------------------


def test_glob_regex():
    r = glob_regex("**/*.png")
    assert r.match("a.png") and r.match("x/y/a.png") and not r.match("a.jpg") and not r.match("a.png/x")
    assert glob_regex("line_*/day_0[12]/*.jpg").match("line_1/day_02/img.jpg")
    assert not glob_regex("line_*/day_0[12]/*.jpg").match("line_1/day_03/img.jpg")
    assert not glob_regex("*.png").match("sub/a.png")  # a single * never crosses folders
    assert glob_regex("img_??.png").match("img_01.png") and not glob_regex("img_??.png").match("img_1.png")


def test_resolve_input_kinds_and_errors(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="empty folder"):
        resolve_input(str(tmp_path / "d"), STORAGE)
    (tmp_path / "d" / "a.png").write_bytes(b"x")
    (tmp_path / "list.txt").write_text("a.png\n")
    (tmp_path / "list.csv").write_text("path\na.png\n")
    (tmp_path / "note.md").write_text("x")
    assert resolve_input(str(tmp_path / "d"), STORAGE).kind == "dir"
    spec = resolve_input(str(tmp_path / "d" / "**" / "*.png"), STORAGE)
    assert (spec.kind, spec.root, spec.pattern) == ("glob", str(tmp_path / "d"), "**/*.png")
    assert resolve_input(str(tmp_path / "list.txt"), STORAGE).manifest_format == "txt"
    assert resolve_input(str(tmp_path / "list.csv"), STORAGE).manifest_format == "csv"
    with pytest.raises(DataError, match="not found"):
        resolve_input(str(tmp_path / "missing"), STORAGE)
    with pytest.raises(DataError, match="not a manifest"):
        resolve_input(str(tmp_path / "note.md"), STORAGE)
    with pytest.raises(DataError, match="folder before the glob"):
        resolve_input(str(tmp_path / "nope" / "*.png"), STORAGE)
    assert manifest_column(["id", "image", "label"], "m.parquet") == "image"
    assert manifest_column(["only"], "m.csv") == "only"
    with pytest.raises(DataError, match="name the column"):
        manifest_column(["a", "b"], "m.csv")
    assert join_location("/data/m", "x/a.png") == "/data/m/x/a.png"
    assert join_location("s3://b/m", "x/a.png") == "s3://b/m/x/a.png"
    # one image, one name: an S3 manifest's "../" and "./" entries scored images a second time under another path
    assert join_location("s3://b/m/", "../archive/./a.png") == "s3://b/archive/a.png"
    assert join_location("/data", "s3://b/a.png") == "s3://b/a.png"


@pytest.mark.parametrize("min_parts", [1, 4, 50])
def test_listing_finds_every_file_once_whatever_the_split(synth_archive, tmp_path, min_parts):
    root = synth_archive["out"]
    spec = resolve_input(root, STORAGE)
    filt = ListFilter(spec.root, extensions=(".png", ".jpg"))
    parts = plan_listing(spec, STORAGE, filt, min_parts=min_parts)
    found = [row for part in parts for batch in walk(part, spec, STORAGE, filt, batch_rows=7) for row in batch]
    assert sorted(p for p, *_ in found) == _archive_files(root)
    assert all(
        size == os.path.getsize(p) and mtime == os.stat(p).st_mtime_ns and not err for p, size, mtime, err in found
    )
    if min_parts == 4:
        assert sum(p.walk is not None for p in parts) >= 3  # folders are handed out, not listed here


def test_listing_skips_hidden_other_extensions_and_the_output(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"1")
    (tmp_path / "a" / "x.PNG").write_bytes(b"1")
    (tmp_path / "a" / ".hidden.png").write_bytes(b"1")
    (tmp_path / "a" / "notes.txt").write_bytes(b"1")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "y.png").write_bytes(b"1")
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "z.png").write_bytes(b"1")
    spec = resolve_input(str(tmp_path), STORAGE)
    filt = ListFilter(spec.root, extensions=(".png",), exclude=output_folder(spec, str(tmp_path / "scores")))
    parts = plan_listing(spec, STORAGE, filt, min_parts=1)
    found = sorted(p for part in parts for b in walk(part, spec, STORAGE, filt) for p, *_ in b)
    assert found == [str(tmp_path / "a" / "x.PNG"), str(tmp_path / "a" / "x.png")]


@pytest.mark.parametrize("lister", ["client", "pyarrow"])
def test_gcs_listing_finds_files_under_folders_without_marker_objects(gcs_server, lister, monkeypatch):
    """Objects copied to GCS by other tools leave no folder markers, and pyarrow lists a GCS folder's sub-folders only
    from markers: walking folder by folder found no image under gs://factory/line/ ("an empty folder"). With the
    google-cloud-storage client (the `gcs` extra) folders are found from GCS's prefixes and listed in parallel parts;
    without it, by one recursive listing. Both find the same files, with the sizes and mtimes `Storage.stat` gives
    (the incremental key must not depend on how a file was listed)."""
    import pyarrow.fs as pafs

    from raydefect.scoring import listing as sources

    if lister == "pyarrow":
        monkeypatch.setattr(sources, "gcs_client", lambda emulator: None)

    gcs = pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=gcs_server.split("://", 1)[1])
    names = ["a/x.png", "a/b/y.png", "a/b/c/z.PNG", "a/.tmp/t.png", "a/.h.png", "a/notes.txt", "scores/s.png", "w.png"]
    for name in names:
        with gcs.open_output_stream(f"factory/line/{name}") as f:
            f.write(b"12345")
    assert gcs.get_file_info(pafs.FileSelector("factory/line", recursive=False))[0].path == "factory/line/w.png"
    spec = resolve_input("gs://factory/line", STORAGE)
    filt = ListFilter(spec.root, extensions=(".png",), exclude=output_folder(spec, "gs://factory/line/scores/"))
    assert output_folder(spec, "s3://factory/line/scores") is None and output_folder(spec, "scores") is None
    parts = plan_listing(spec, STORAGE, filt, min_parts=8)
    assert len(parts) == (1 if lister == "pyarrow" else 2)  # client: w.png on the way, then the walk of line/a/b/c
    found = sorted(row for part in parts for b in walk(part, spec, STORAGE, filt, batch_rows=2) for row in b)
    expected = ["a/b/c/z.PNG", "a/b/y.png", "a/x.png", "w.png"]
    assert [p for p, *_ in found] == [f"gs://factory/line/{n}" for n in expected]
    assert all(size == 5 and mtime > 0 and not err for _, size, mtime, err in found)
    assert [(size, mtime, "") for _, size, mtime, _ in found] == STORAGE.stat([p for p, *_ in found])
    spec = resolve_input("gs://factory/line/a/**/*.png", STORAGE)
    filt = ListFilter(spec.root, pattern=spec.pattern)
    found = sorted(
        p for part in plan_listing(spec, STORAGE, filt) for b in walk(part, spec, STORAGE, filt) for p, *_ in b
    )
    assert found == ["gs://factory/line/a/b/y.png", "gs://factory/line/a/x.png"]
    with gcs.open_output_stream("factory/deep/x/y.png") as f:
        f.write(b"1")
    with pytest.raises(OutputError, match="is not empty and holds no raydefect scores"):
        ScoreStore("gs://factory/deep").open()  # no object lies directly in it, only in a sub-folder


def test_unreachable_gcs_fails_in_seconds_with_a_short_message(monkeypatch):
    """google-cloud-cpp's own retry policy kept an unreachable gs:// call going for over 200 s; raydefect bounds it
    (`GCS_RETRY_S`, set to 1 s here) and cuts its ~400-character status to the code and what happened."""
    from raydefect.scoring import storage as sources

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(sources, "GCS_RETRY_S", 1.0)
    sources._filesystem.cache_clear()
    start = time.monotonic()
    try:
        with pytest.raises(DataError, match=r"--input gs://factory/x: cannot read it \(UNAVAILABLE: .*connect") as info:
            resolve_input("gs://factory/x", STORAGE)
    finally:
        sources._filesystem.cache_clear()
    assert time.monotonic() - start < 60
    assert "error_info" not in str(info.value) and len(str(info.value)) < 200, str(info.value)


def test_a_hung_s3_endpoint_from_aws_endpoint_url_fails_in_seconds(monkeypatch):
    """An endpoint that accepts connections and never answers: through FileSystem.from_uri (the AWS SDK's default
    retry policy) one call took 99 s, and a run makes several; raydefect bounds the attempts (`S3_ATTEMPTS`, 3 by
    default: 11 s a call) whichever way the endpoint is given, here by AWS_ENDPOINT_URL."""
    from raydefect.scoring import storage as sources

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # accepts (the kernel queues the connections), never answers
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
        monkeypatch.setattr(sources, "S3_ATTEMPTS", 2)
        sources._filesystem.cache_clear()
        start = time.monotonic()
        try:
            with pytest.raises(DataError, match=r"--input s3://factory/x: cannot read it \(.*NETWORK_CONNECTION"):
                resolve_input("s3://factory/x", STORAGE)
        finally:
            sources._filesystem.cache_clear()
        took = time.monotonic() - start
    assert took < 30, f"{took:.0f} s: the retries are not bounded"


def test_stat_locations_records_missing_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"12345")
    t = stat_locations([str(tmp_path / "a.png"), str(tmp_path / "gone.png"), str(tmp_path)], STORAGE)
    rows = t.to_pylist()
    assert rows[0]["size"] == 5 and rows[0]["error"] == ""
    assert rows[1]["size"] == -1 and "not found" in rows[1]["error"]
    assert "not a file" in rows[2]["error"]


# --- the batch scorer -----------------------------------------------------------------------------------------


def test_decoder_turns_every_bad_file_into_an_error_row(tmp_path, synth_archive):
    good = [p for p in _archive_files(synth_archive["out"]) if os.path.getsize(p) > 200][:2]
    (tmp_path / "big.png").write_bytes(_png(np.zeros((80, 60, 3), np.uint8)))
    (tmp_path / "text.png").write_bytes(b"not an image")
    png = _png(np.zeros((32, 32, 3), np.uint8))
    (tmp_path / "trunc.png").write_bytes(png[: len(png) // 2])
    locations = [*good, str(tmp_path / "big.png"), str(tmp_path / "text.png"), str(tmp_path / "trunc.png")]
    listing = stat_locations([*locations, str(tmp_path / "missing.png")], STORAGE)
    out = Decoder(32, STORAGE, max_pixels=64 * 64)(listing)
    errors = list(out["error"])
    assert errors[0] == errors[1] == ""
    assert "over the limit" in errors[2] and "score.max_image_pixels=4096 (raise it" in errors[2]  # 60x80 > 64x64
    assert "not a recognised image" in errors[3]
    assert "truncated" in errors[4] or "cannot decode" in errors[4]
    assert "not found" in errors[5]
    assert out["pixels"].shape == (6, 32, 32, 3) and out["pixels"].dtype == np.uint8
    assert out["sha1"][0] and out["width"][0] == 64 and out["height"][0] == 64


def test_model_step_gives_failed_images_zeros_and_the_others_their_own_outputs(tiny_artifact, synth_archive):
    from raydefect.scoring.scorer import ModelStep

    good = [p for p in _archive_files(synth_archive["out"]) if os.path.getsize(p) > 200][:3]
    batch = Decoder(32, STORAGE)(stat_locations(good, STORAGE))
    step = ModelStep(str(tiny_artifact), device="cpu", precision="fp32")
    whole = step(dict(batch))
    assert whole["mask_prob"].shape == (3, 32, 32) and "pixels" not in whole
    partial = step(dict(batch, error=np.asarray(["", "broken", ""], dtype=object)))
    for key in ("defect_score", "class_probs", "mask_prob"):
        assert not partial[key][1].any(), key
        assert np.allclose(partial[key][[0, 2]], whole[key][[0, 2]], atol=1e-5), key


@pytest.mark.parametrize("reduced", [True, False])
def test_decoder_reduced_jpeg_decode_reports_the_full_size(tmp_path, reduced):
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    path = tmp_path / "camera.jpg"
    Image.fromarray(coarse).resize((512, 384), Image.Resampling.BICUBIC).save(path, quality=92)
    out = Decoder(64, STORAGE, reduced_jpeg=reduced)(stat_locations([str(path)], STORAGE))
    assert out["error"][0] == "" and (out["width"][0], out["height"][0]) == (512, 384)
    x, size = Preprocessor(image_size=64, mean=(0, 0, 0), std=(1, 1, 1)).from_bytes(path, reduced_jpeg=reduced)
    assert size == (512, 384) and np.allclose(x.transpose(1, 2, 0) * 255, out["pixels"][0], atol=1e-3)
    full = Preprocessor(image_size=64, mean=(0, 0, 0), std=(1, 1, 1)).from_bytes(path, reduced_jpeg=False)[0]
    assert np.array_equal(x, full) == (not reduced)  # the reduced decode differs a little from the full one


def test_batch_scorer_matches_inference_run_directly(tiny_artifact, synth_archive):
    files = _archive_files(synth_archive["out"])
    # fp32, as the direct Predictor: the mechanics are compared exactly (on a CPU with native bf16 the scorer's
    # 'auto' would be bf16; see test_scoring_precision_auto_is_bf16_on_gpus_and_cpus_with_native_bf16)
    table = BatchScorer(str(tiny_artifact), device="cpu", precision="fp32").score(files, batch_size=16)
    assert table.schema == SCORE_SCHEMA and table.num_rows == len(files)
    loaded = load_artifact(tiny_artifact)
    pre, predictor, meta = Preprocessor(loaded.meta), Predictor(loaded, device="cpu"), loaded.meta
    n_err = 0
    for row in table.to_pylist():
        if row["error"]:
            n_err += 1
            assert row["defect_score"] is None and row["mask_png"] is None and row["width"] is None
            continue
        x, (w, h) = pre.from_bytes(Path(row["path"]).read_bytes(), path=row["path"])
        direct = predictor.predict(x[None])
        assert (row["width"], row["height"]) == (w, h)
        assert row["defect_score"] == pytest.approx(float(direct["defect_score"][0]), abs=1e-5)
        mask = decode_png_mask(row["mask_png"])
        assert mask.shape == (h, w)  # each image's own resolution
        expected = postprocess(direct["mask_prob"][0], w, h, meta.pixel_threshold)
        from raydefect.inference import upsample_prob

        prob = upsample_prob(direct["mask_prob"][0], w, h)
        settled = np.abs(prob - meta.pixel_threshold) > 1e-4  # batch size may move a probability by ~1e-7
        assert np.array_equal(mask[settled], expected.mask[settled])
        assert row["mask_area_px"] == int(mask.sum()) and row["mask_fraction"] == pytest.approx(mask.mean())
        is_defect, cls = decide(direct["defect_score"][0], direct["class_probs"][0], meta)
        assert (row["is_defect"], row["defect_class"]) == (is_defect, cls)
        assert dict(row["class_scores"]).keys() == set(meta.class_names)
    assert n_err == synth_archive["corrupt"]


def test_onnx_engine_matches_pytorch_and_reuses_its_export(tiny_artifact, tmp_path, monkeypatch):
    import raydefect.inference.onnx_runtime as onnx_runtime
    from raydefect.inference.graph import parity_inputs
    from raydefect.inference.onnx_runtime import OnnxPredictor, engine_file

    loaded = load_artifact(tiny_artifact)
    x = parity_inputs(loaded.meta, 5, seed=3)
    onnx = OnnxPredictor(loaded, threads=1, cache_dir=tmp_path)
    torch_out = Predictor(loaded, device="cpu", precision="fp32").predict(x)
    for n in (1, 5):  # a dynamic batch size
        got = onnx.predict(x[:n])
        for key in ("defect_score", "class_probs", "mask_prob"):
            assert got[key].dtype == np.float32 and got[key].shape == torch_out[key][:n].shape
            assert np.max(np.abs(got[key] - torch_out[key][:n])) < 1e-5
    assert onnx.engine == "onnx" and onnx.predict(x[:0])["mask_prob"].shape == (0, 32, 32)
    cached = engine_file(loaded, tmp_path)
    assert cached.name.startswith(loaded.meta.model_id) and [p.name for p in tmp_path.iterdir()] == [cached.name]

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_runtime, "export_onnx", no_export)
    OnnxPredictor(loaded, cache_dir=tmp_path)  # the cached graph: no second export
    monkeypatch.undo()
    cached.write_bytes(b"not onnx")  # a damaged cache file is exported again, once
    assert OnnxPredictor(loaded, cache_dir=tmp_path).predict(x[:1])["defect_score"].shape == (1,)


def test_engine_choice_and_fallback(tiny_artifact, monkeypatch, capsys):
    import raydefect.inference.device as inference
    import raydefect.inference.onnx_runtime as onnx_runtime
    from raydefect.errors import ConfigError
    from raydefect.inference import make_predictor, resolve_engine
    from raydefect.scoring.scorer import ModelStep

    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)  # a CPU where 'auto' means fp32
    assert resolve_engine("auto", "cpu") == "onnx"  # the test environment has the onnx extra
    assert resolve_engine("auto", "cuda") == "torch" and resolve_engine("auto", "cpu", "bf16") == "torch"
    with monkeypatch.context() as m:  # a CPU with native bf16: 'auto' runs PyTorch in bf16, an explicit onnx fp32
        m.setattr(inference, "cpu_has_native_bf16", lambda: True)
        assert resolve_engine("auto", "cpu") == "torch" and resolve_engine("auto", "cpu", "fp32") == "onnx"
        assert resolve_engine("onnx", "cpu") == "onnx"
    assert resolve_engine("torch", "cpu") == "torch"
    with pytest.raises(ConfigError, match=r"engine 'onnx' runs on CPU in fp32 only \(here: cuda"):
        resolve_engine("onnx", "cuda")
    with pytest.raises(ConfigError, match="engine must be one of auto, torch, onnx, got 'trt'"):
        resolve_engine("trt", "cpu")
    assert ModelStep(str(tiny_artifact), device="cpu").engine == "torch"  # the default
    assert ModelStep(str(tiny_artifact), device="cpu", engine="onnx").engine == "onnx"

    def broken(*args, **kwargs):
        raise RuntimeError("exporter cannot capture this graph")

    monkeypatch.setattr(onnx_runtime, "engine_file", broken)
    capsys.readouterr()
    assert make_predictor(str(tiny_artifact), device="cpu", engine="auto").engine == "torch"  # falls back, says so
    assert "ONNX Runtime engine unavailable" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="cannot capture"):
        make_predictor(str(tiny_artifact), device="cpu", engine="onnx")


def test_scoring_precision_auto_is_bf16_on_gpus_and_cpus_with_native_bf16(tiny_artifact, monkeypatch):
    import raydefect.inference.device as inference
    from raydefect.inference import cpu_has_native_bf16, resolve_precision
    from raydefect.scoring.scorer import ModelStep

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # what this machine says, read independently of the flags line's position
        assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(cpuinfo.read_text().split()))
    loaded = load_artifact(tiny_artifact)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    batch = {"pixels": pixels, "error": np.asarray(["", "", ""], dtype=object)}
    out = {}
    for native in (False, True):
        monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_precision("auto", "cuda") == "bf16" and resolve_precision("fp32", "cuda") == "fp32"
        want = "bf16" if native else "fp32"
        assert resolve_precision("auto", "cpu") == want and resolve_precision("bf16", "cpu") == "bf16"
        step = ModelStep(loaded, device="cpu")  # bulk scoring: 'auto' resolved for this CPU
        assert step.predictor.precision == want and step.engine == "torch"
        assert ModelStep(loaded, device="cpu", precision="fp32").predictor.precision == "fp32"
        assert ModelStep(loaded, device="cpu", engine="onnx").engine == "onnx"  # ONNX Runtime: fp32 on any CPU
        # predict and evaluate keep fp32 on every CPU: their numbers match what training validated
        assert Predictor(loaded, device="cpu").precision == "fp32"
        out[want] = step(dict(batch))
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")
    for key in ("defect_score", "class_probs", "mask_prob"):  # bf16 autocast: float32 outputs, close to fp32's
        assert out["bf16"][key].dtype == np.float32
        assert np.max(np.abs(out["bf16"][key] - out["fp32"][key])) < 0.05


def test_drop_known_filters_by_stat_key():
    listing = listing_table([("/a.png", 1, 1), ("/b.png", 2, 2), ("/a.png", 1, 1)])
    known = KeySet(key_digests("m", ["/b.png"], [2], [2], [], "stat")).array
    assert drop_known(listing, known, "m").column("path").to_pylist() == ["/a.png"]
    assert drop_known(listing, known, "other-model").num_rows == 2


# --- the commit protocol ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored_rows(tiny_artifact, synth_archive):
    """Scores of the synthetic archive, computed once without Ray."""
    return BatchScorer(str(tiny_artifact), run_id="r0", device="cpu").score(_archive_files(synth_archive["out"]))


def _with_run(table: pa.Table, run_id: str) -> pa.Table:
    return table.set_column(table.schema.get_field_index("run_id"), "run_id", pa.array([run_id] * table.num_rows))


def _stage(store: ScoreStore, table: pa.Table, run_id: str, meta) -> StagedFile:
    info = write_staged(table, store.staging(run_id), STORAGE, file_metadata(meta, run_id, "stat"), "stat")
    return StagedFile.from_row(info)


def test_commit_moves_files_writes_a_record_and_keeps_metadata(tmp_path, scored_rows, tiny_artifact):
    meta = read_artifact_meta(tiny_artifact)
    store = ScoreStore(str(tmp_path / "out"))
    store.open()
    rec = RunRecord("r1", meta.model_id, "stat")
    seen = KeySet()
    rows = _with_run(scored_rows, "r1")
    staged = [_stage(store, rows.slice(0, 20), "r1", meta), _stage(store, rows.slice(20), "r1", meta)]
    assert all(Path(s.location).name.endswith(".parquet.staged") for s in staged)
    store.commit(rec, staged, seen)
    data = sorted((tmp_path / "out" / meta.model_id / "r1").glob("*.parquet"))
    assert len(data) == 2 and not list((tmp_path / "out" / STAGING / "r1").glob("*.staged"))
    record = json.loads((tmp_path / "out" / "_commits" / "r1.json").read_text())
    assert record["rows"] == rows.num_rows and len(record["files"]) == 2
    md = read_file_metadata(pq.read_metadata(data[0]).metadata)
    assert md["model_id"] == meta.model_id and md["thresholds"] == {"image": 0.5, "pixel": 0.5}
    assert md["class_names"] == list(meta.class_names) and md["version"] and md["run_id"] == "r1"
    assert len(seen) == rows.num_rows
    # the same rows handed over again (a repeated listing entry) are dropped, never committed twice
    store.commit(rec, [_stage(store, rows.slice(0, 5), "r1", meta)], seen)
    assert pq.read_table(str(tmp_path / "out")).num_rows == rows.num_rows
    assert store.load_keys(meta.model_id, "stat").contains(seen.array).all()
    n_errors = sum(e is not None for e in rows.column("error").to_pylist())
    assert len(store.load_keys(meta.model_id, "stat", retry_errors=True)) == rows.num_rows - n_errors


class _CutAtMove:
    """The store's filesystem, but the `n`-th move raises KeyboardInterrupt after moving (Ctrl-C between a file's
    move and its record)."""

    def __init__(self, fs, n: int) -> None:
        self.fs, self.n = fs, n

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt

    def __getattr__(self, name: str):
        return getattr(self.fs, name)


def test_a_commit_cut_short_is_finished_by_the_next_one_with_each_row_once(tmp_path, scored_rows, tiny_artifact):
    meta = read_artifact_meta(tiny_artifact)
    store = ScoreStore(str(tmp_path / "out"))
    store.open()
    rows = _with_run(scored_rows, "r1")
    rec, seen = RunRecord("r1", meta.model_id, "stat"), KeySet()
    store.commit(rec, [_stage(store, rows.slice(0, 5), "r1", meta)], seen)
    # handed over: one file new, one half committed already (rewritten before its move), one new, one all committed
    pending = [
        _stage(store, rows.slice(5, 5), "r1", meta),
        _stage(store, rows.slice(0, 15), "r1", meta),
        _stage(store, rows.slice(15, 5), "r1", meta),
        _stage(store, rows.slice(0, 3), "r1", meta),
    ]
    real = store.fs
    store.fs = _CutAtMove(real, 2)  # cut right after moving the rewritten file, before it is recorded
    with pytest.raises(KeyboardInterrupt):
        store.commit(rec, pending, seen)
    store.fs = real
    assert len(pending) == 3  # the first file moved and left the list; the second moved, not yet recorded
    store.commit(rec, pending, seen)  # the run's final commit: it used to move a moved file again ("No such file")
    assert pending == []
    paths = pq.read_table(str(tmp_path / "out"), columns=["path"]).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 20
    record = json.loads((tmp_path / "out" / "_commits" / "r1.json").read_text())
    assert record["rows"] == 20 and len(record["files"]) == 4
    assert not [p for p in (tmp_path / "out" / STAGING).rglob("*") if p.is_file()]


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_recovery_after_a_kill_keeps_each_row_once(tmp_path, scored_rows, tiny_artifact, where, request):
    """Everything through the store's own filesystem, so that the same steps run on a GCS emulator (no rename: moves
    are copies and deletes; folders are marker objects or nothing)."""
    import pyarrow.fs as pafs

    if where == "gcs":
        request.getfixturevalue("gcs_server")
    meta = read_artifact_meta(tiny_artifact)
    out = str(tmp_path / "out") if where == "local" else f"gs://factory/{tmp_path.name}/out"
    store = ScoreStore(out)
    store.open()
    fs = store.fs
    rows = _with_run(scored_rows, "dead")
    rec = RunRecord("dead", meta.model_id, "stat")
    store.write_record(rec)
    store.commit(rec, [_stage(store, rows.slice(0, 10), "dead", meta)], KeySet())
    # the dead run had also: a staged file whose rows partly overlap committed ones (a retried task's twin),
    _stage(store, rows.slice(5, 10), "dead", meta)  # rows 5..14: 5..9 are committed already
    # a partial write under its temporary name,
    staging = store.path(STAGING, "dead")
    with fs.open_output_stream(f"{staging}/.part-x.parquet.staged.tmp") as f:
        f.write(b"PAR1 half a file")
    # and a file moved into the data area whose record update never happened.
    moved = _stage(store, rows.slice(20, 10), "dead", meta)
    fs.move(STORAGE.resolve(moved.location)[1], store.path(meta.model_id, "dead", "part-00009-aaaaaaaa.parquet"))
    report = store.recover("new-run")
    assert report.adopted_files == 1 and report.interrupted_runs == ["dead"]
    assert report.recovered_rows == 5 and report.dropped_rows == 5 and report.discarded_files == 1
    left = fs.get_file_info(pafs.FileSelector(staging, recursive=True, allow_not_found=True))
    assert not [i.path for i in left if i.type == pafs.FileType.File]
    table = read_scores(out, latest=False)
    assert table.num_rows == 25 and len(set(table.column("path").to_pylist())) == 25
    assert read_scores(out).num_rows == 25
    with fs.open_input_stream(store.path("_commits", "dead.json")) as f:
        record = json.loads(f.read())
    assert record["state"] == "interrupted" and record["rows"] == 25


class _StorageDown:
    """The store's filesystem, but reading a file fails as an unreachable store does (OSError), listings work."""

    def __init__(self, fs) -> None:
        self.fs = fs

    def open_input_file(self, path: str):
        raise OSError(f"When reading information for key '{path}': AWS Error NETWORK_CONNECTION during GetObject")

    def __getattr__(self, name: str):
        return getattr(self.fs, name)


def test_recovery_deletes_nothing_when_the_storage_fails_a_read(tmp_path, scored_rows, tiny_artifact):
    """A dead run's files that cannot be *read* (the store down, throttled) are not damaged files: recovery stops
    with a clear error and leaves them, and the next run recovers every row; only damaged content is discarded."""
    meta = read_artifact_meta(tiny_artifact)
    out = tmp_path / "out"
    store = ScoreStore(str(out))
    store.open()
    rows = _with_run(scored_rows, "dead")
    store.write_record(RunRecord("dead", meta.model_id, "stat"))
    _stage(store, rows.slice(0, 10), "dead", meta)  # staged, never committed
    moved = _stage(store, rows.slice(10, 10), "dead", meta)  # moved into the data area, never recorded
    store.fs.create_dir(store.path(meta.model_id, "dead"), recursive=True)
    store.fs.move(STORAGE.resolve(moved.location)[1], store.path(meta.model_id, "dead", "part-00009-bbbbbbbb.parquet"))
    before = sorted(str(p) for p in out.rglob("*.parquet*"))
    real = store.fs
    store.fs = _StorageDown(real)
    with pytest.raises(
        OutputError,
        match=r"cannot read .*part-00009-bbbbbbbb\.parquet to recover .*NETWORK_CONNECTION"
        r".*nothing was changed, start the run again",
    ):
        store.recover("new-run")
    store.fs = real
    assert sorted(str(p) for p in out.rglob("*.parquet*")) == before
    report = store.recover("new-run")
    assert report.adopted_files == 1 and report.recovered_rows == 10 and report.discarded_files == 0
    assert read_scores(str(out), latest=False).num_rows == 20


def test_a_committed_file_found_missing_or_damaged_is_skipped_then_its_images_scored_again(
    tmp_path, scored_rows, tiny_artifact, capsys
):
    """A retention rule deleted one committed file, a partial copy cut another short: readers warn and go on, and
    the next scoring run (`repair`, under the lock) takes them out of their records, so their images are scored
    again and the warning is not repeated every night."""
    meta = read_artifact_meta(tiny_artifact)
    out = tmp_path / "out"
    store = ScoreStore(str(out))
    store.open()
    rows = _with_run(scored_rows, "r1")
    rec = RunRecord("r1", meta.model_id, "stat", state="finished")
    parts = [rows.slice(0, 10), rows.slice(10, 10), rows.slice(20)]
    store.commit(rec, [_stage(store, t, "r1", meta) for t in parts], KeySet())
    files = [out / f["path"] for f in rec.files]
    files[0].unlink()
    files[1].write_bytes(files[1].read_bytes()[:1000])
    capsys.readouterr()
    assert read_scores(str(out)).num_rows == rows.num_rows - 20
    assert summarize(str(out))["images"] == rows.num_rows - 20
    err = capsys.readouterr().err
    assert f"{files[0]} is missing: its 10 row(s) are left out" in err
    assert f"{files[1]} is unreadable (Parquet magic bytes not found" in err and "scores those images again" in err
    assert files[1].exists()  # readers only read
    keys = store.load_keys(meta.model_id, "stat", repair=True)
    assert len(keys) == rows.num_rows - 20
    err = capsys.readouterr().err
    assert err.count("removed from run r1's record") == 2
    assert err.count("moved to") == 1 and f"moved to {out / '_damaged' / files[1].relative_to(out)}" in err
    record = json.loads((out / "_commits" / "r1.json").read_text())
    assert record["rows"] == rows.num_rows - 20 and len(record["files"]) == 1
    assert [(f["path"], f["problem"].split(" ")[0]) for f in record["lost_files"]] == [
        (str(files[0].relative_to(out)), "missing"),
        (str(files[1].relative_to(out)), "unreadable"),
    ]
    assert not files[1].exists() and (out / "_damaged" / files[1].relative_to(out)).exists()
    # set aside where neither pandas/pyarrow (``_`` names) nor raydefect read it; no more warnings
    assert pq.read_table(str(out)).num_rows == rows.num_rows - 20
    assert store.recover("next").adopted_files == 0
    assert read_scores(str(out)).num_rows == rows.num_rows - 20 and capsys.readouterr().err == ""


class _FlakyStorage(Storage):
    """Local files, but reading `down` fails as an object store's read does while it is unreachable."""

    def __init__(self, down: str) -> None:
        super().__init__()
        self.down = down

    def read_bytes(self, location: str) -> bytes:
        if location == self.down:
            raise OSError("When reading information for key 'a.png': AWS Error NETWORK_CONNECTION, Timeout was reached")
        return super().read_bytes(location)


def test_a_file_the_storage_failed_to_read_is_scored_again_by_the_next_run(tmp_path, tiny_artifact, synth_archive):
    """A 110 s object-store outage left an image with a "cannot read ... Timeout" row that every later nightly run
    counted as scored (only --retry-errors, which no nightly job passes, scored it again). A file that is gone or
    not readable for its own sake keeps its error row: scoring it again would give the same answer."""
    from raydefect.scoring.keys import RETRY_PREFIX

    meta = read_artifact_meta(tiny_artifact)
    files = [p for p in _archive_files(synth_archive["out"]) if os.path.getsize(p) > 200][:3]
    gone = str(tmp_path / "gone.png")
    (tmp_path / "gone.png").write_bytes(b"x")
    listing = stat_locations([*files, gone], STORAGE)
    (tmp_path / "gone.png").unlink()  # deleted between the listing and the read
    out = Decoder(32, _FlakyStorage(files[1]))(listing)
    errors = list(out["error"])
    assert errors[0] == errors[2] == ""
    assert errors[1].startswith(RETRY_PREFIX) and "Timeout was reached" in errors[1]
    assert errors[3].startswith("cannot read: FileNotFoundError")
    rows = finish(ModelStep(str(tiny_artifact), device="cpu", precision="fp32")(out), meta, "r1")
    store = ScoreStore(str(tmp_path / "out"))
    store.open()
    rec = RunRecord("r1", meta.model_id, "stat", state="finished")
    store.commit(rec, [_stage(store, rows, "r1", meta)], KeySet())
    keys = store.load_keys(meta.model_id, "stat")
    known = keys.contains(key_digests(meta.model_id, *_stat_columns(listing), "stat"))
    assert known.tolist() == [True, False, True, True]  # the network failure alone is pending again
    assert len(store.load_keys(meta.model_id, "stat", retry_errors=True)) == 2


def _stat_columns(listing: pa.Table) -> tuple:
    cols = listing.to_pydict()
    return cols["path"], cols["size"], cols["mtime_ns"], [None] * listing.num_rows


def test_open_refuses_foreign_and_unwritable_folders(tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.docx").write_text("x")
    with pytest.raises(OutputError, match="not empty and holds no raydefect scores"):
        ScoreStore(str(tmp_path / "foreign")).open()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        ScoreStore(str(tmp_path / "afile")).open()
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(OutputError, match="cannot write|not writable"):
                ScoreStore(str(ro / "out")).open()
        finally:
            ro.chmod(0o700)


def test_lock_names_the_holder_and_dies_with_it(tmp_path):
    store = ScoreStore(str(tmp_path / "out"))
    store.open()
    second = ScoreStore(str(tmp_path / "out"))
    busy = r"locked by run first \(pid \d+ on host .+, started "
    with store.lock("first"), pytest.raises(OutputError, match=busy), second.lock("second"):
        pass
    with store.lock("third"):  # released
        pass
    # a holder killed with SIGKILL releases the lock (the kernel drops the flock)
    code = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from raydefect.scoring.store import ScoreStore
        with ScoreStore({str(tmp_path / "out")!r}).lock("held"):
            print("locked", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match="locked by run held"), store.lock("fourth"):
            pass
    finally:
        proc.kill()
        proc.wait()
    with store.lock("fifth"):
        pass


class _LockObject:
    """The lock object of ``<scheme>://factory/<prefix>`` on the test S3 or GCS server, read and written directly
    (no conditions), as another run or a person would."""

    def __init__(self, scheme: str, prefix: str, request) -> None:
        self.out, self.key = f"{scheme}://factory/{prefix}", f"{prefix}/_lock.json"
        if scheme == "s3":
            self.s3 = request.getfixturevalue("s3_server")
        else:
            request.getfixturevalue("gcs_server")
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            self.s3, self.gcs = None, storage.Client(credentials=AnonymousCredentials(), project="t").bucket("factory")

    def holder(self) -> dict:
        if self.s3 is not None:
            return json.loads(self.s3.get_object(Bucket="factory", Key=self.key)["Body"].read())
        return json.loads(self.gcs.blob(self.key).download_as_bytes())

    def write(self, payload: dict) -> str:
        """-> the new version (ETag, generation)"""
        body = json.dumps(payload).encode()
        if self.s3 is not None:
            return self.s3.put_object(Bucket="factory", Key=self.key, Body=body)["ETag"]
        blob = self.gcs.blob(self.key)
        blob.upload_from_string(body)
        return str(blob.generation)

    def delete(self) -> None:
        if self.s3 is not None:
            self.s3.delete_object(Bucket="factory", Key=self.key)
        else:
            self.gcs.blob(self.key).delete()

    def exists(self) -> bool:
        if self.s3 is not None:
            return "Contents" in self.s3.list_objects_v2(Bucket="factory", Prefix=self.key)
        return self.gcs.get_blob(self.key) is not None


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_an_object_store_lock_is_renewed_while_held_and_freed_by_its_dead_holder(scheme, request, monkeypatch, capsys):
    """Object stores: the lock object's heartbeat is renewed by a thread for as long as the run holds it (renewed
    only at commits, it lapsed under a slow live run: a second run took over and deleted the live run's staged
    files); a run that finds its lock taken commits nothing; a holder that died on this host (SIGKILL) no longer
    blocks the restart for the whole lease."""
    import raydefect.scoring.lock as store_mod

    monkeypatch.setattr(store_mod, "REMOTE_LOCK_BEAT_S", 0.2)
    lock = _LockObject(scheme, "lock-test", request)
    a, b = ScoreStore(lock.out), ScoreStore(lock.out)
    a.open()

    with a.lock("run-a"):
        first = lock.holder()["heartbeat"]
        deadline = time.monotonic() + 30  # beats every 0.2 s; a loaded machine may take longer
        while lock.holder()["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lock.holder()["heartbeat"] > first  # renewed with no commit in between
        busy = r"locked by run run-a .*last heartbeat \d+ s ago; if that run died"
        with pytest.raises(OutputError, match=busy), b.lock("run-b"):
            pass
        a.check_lock()  # still ours
        # another run took the lock object (a lapsed lease): the heartbeat stops renewing it, and a commit is refused
        lock.write({"run_id": "run-c", "pid": 1, "host": "elsewhere", "heartbeat": time.time()})
        time.sleep(0.6)
        assert lock.holder()["run_id"] == "run-c"
        with pytest.raises(OutputError, match=f"lost its lock on {lock.out} .*held by run run-c"):
            a.check_lock()
    assert lock.holder()["run_id"] == "run-c"  # a run releases only its own lock
    # a lock object deleted by hand to break it: the live run does not write it back, and stops before committing
    lock.delete()
    with a.lock("run-f"):
        lock.delete()
        time.sleep(0.6)
        assert not lock.exists()
        with pytest.raises(OutputError, match="lost its lock .*the lock object was deleted"):
            a.check_lock()
    # a holder on this host whose process is gone (killed): taken over at once, with a warning
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write({"run_id": "run-d", "pid": int(dead.stdout), "host": socket.gethostname(), "heartbeat": time.time()})
    capsys.readouterr()
    with b.lock("run-e"):
        assert lock.holder()["run_id"] == "run-e"
    assert "taking over the lock of run run-d" in capsys.readouterr().err
    assert not lock.exists()  # released
    a.check_lock()  # holding no lock: nothing to lose


def test_an_s3_store_that_refuses_conditional_deletes_still_releases_the_lock(s3_server, monkeypatch):
    """S3-compatible stores that predate conditional deletes may refuse If-Match on DeleteObject (400 / 501) rather
    than ignore it: the release then deletes plainly, as before conditional deletes (the run has just read the lock
    as its own), instead of failing a finished run and leaving its lock to lapse."""
    from botocore.exceptions import ClientError

    import raydefect.scoring.lock as store_mod

    out = "s3://factory/refusing-test"
    store = ScoreStore(out)
    store.open()
    cond = store_mod.conditional_objects(out, store.storage)
    delete_object, calls = cond.client.delete_object, []

    def no_if_match(**kwargs):
        calls.append(sorted(kwargs))
        if "IfMatch" in kwargs:
            error = {"Error": {"Code": "NotImplemented"}, "ResponseMetadata": {"HTTPStatusCode": 501}}
            raise ClientError(error, "DeleteObject")
        return delete_object(**kwargs)

    monkeypatch.setattr(cond.client, "delete_object", no_if_match)
    monkeypatch.setattr(store_mod, "conditional_objects", lambda location, storage: cond)
    with store.lock("run-r"):
        pass
    assert calls == [["Bucket", "IfMatch", "Key"], ["Bucket", "Key"]]
    assert "Contents" not in s3_server.list_objects_v2(Bucket="factory", Prefix="refusing-test/_lock")


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_an_object_store_lock_that_cannot_be_atomic_says_so_and_names_the_fix(scheme, request, monkeypatch, capsys):
    """Without the library that writes conditionally (boto3 for s3://, google-cloud-storage for gs://) the lock is
    a read-then-write: each run says so and what to install, instead of silently allowing the same-second race."""
    import raydefect.scoring.lock as store_mod

    lock = _LockObject(scheme, "atomic-test", request)
    store = ScoreStore(lock.out)
    store.open()
    capsys.readouterr()
    with store.lock("run-1"):
        pass
    assert "not atomic" not in capsys.readouterr().err
    monkeypatch.setattr(store_mod, "conditional_objects", lambda location, storage: None)  # as without the library
    with store.lock("run-2"):
        assert lock.holder()["run_id"] == "run-2"
    extra = {"s3": "raydefect[s3]", "gs": "raydefect[gcs]"}[scheme]
    err = capsys.readouterr().err
    assert f"the lock on {lock.out} is not atomic" in err and f"pip install '{extra}'" in err, err


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_two_runs_that_both_find_an_object_store_lock_free_cannot_both_take_it(scheme, request, monkeypatch):
    """The race the read-then-write lock could not close: run A reads "no lock" (or a lapsed one), run B takes the
    lock, then A writes. The lock object is written with conditions (S3: If-None-Match / If-Match with boto3; GCS:
    ifGenerationMatch with google-cloud-storage), so A's write fails and A stops; before, A overwrote B's lock and
    both ran until B's heartbeat noticed."""
    import raydefect.scoring.lock as store_mod

    lock = _LockObject(scheme, "race-test", request)
    a, b = ScoreStore(lock.out), ScoreStore(lock.out)
    a.open()
    real = store_mod.conditional_objects
    seen: dict[str, tuple[bytes, str] | None] = {"view": None}

    def as_read_a_moment_ago(location, storage):  # run A's read happened just before run B's write
        cond = real(location, storage)
        cond.read = lambda _key: seen["view"]
        return cond

    # 1. both found no lock object
    with b.lock("run-b"):
        monkeypatch.setattr(store_mod, "conditional_objects", as_read_a_moment_ago)
        with pytest.raises(OutputError, match="locked by run run-b"), a.lock("run-a"):
            pass
        assert lock.holder()["run_id"] == "run-b"
        b.check_lock()  # still B's
        monkeypatch.setattr(store_mod, "conditional_objects", real)
    # 2. both found the same lapsed lock object and took it over
    lapsed = {"run_id": "run-x", "pid": 1, "host": "elsewhere", "heartbeat": time.time() - 3600}
    version = lock.write(lapsed)
    with b.lock("run-b2"):
        seen["view"] = (json.dumps(lapsed).encode(), version)
        monkeypatch.setattr(store_mod, "conditional_objects", as_read_a_moment_ago)
        with pytest.raises(OutputError, match="locked by run run-b2"), a.lock("run-a2"):
            pass
        assert lock.holder()["run_id"] == "run-b2"
        b.check_lock()
    monkeypatch.setattr(store_mod, "conditional_objects", real)

    # 3. a write that went through but whose answer was lost (the SDK's retry then finds the condition unmet) is
    # recognised by the run's own id in the object: the run holds the lock, and its heartbeat goes on renewing it
    def answer_lost(location, storage):
        cond = real(location, storage)
        put = cond.put
        cond.put = lambda key, body, version: put(key, body, version) and None
        return cond

    monkeypatch.setattr(store_mod, "conditional_objects", answer_lost)
    monkeypatch.setattr(store_mod, "REMOTE_LOCK_BEAT_S", 0.1)
    with a.lock("run-a3"):
        first = lock.holder()["heartbeat"]
        deadline = time.monotonic() + 30
        while lock.holder()["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lock.holder()["run_id"] == "run-a3" and lock.holder()["heartbeat"] > first
        a.check_lock()

    # 4. released only if still the version this run saw as its own: a lock taken over between that look and the
    # delete (this run's lease lapsed) stays with its new holder; before, a read-then-delete removed it
    monkeypatch.setattr(store_mod, "REMOTE_LOCK_BEAT_S", 60)
    monkeypatch.setattr(store_mod, "conditional_objects", as_read_a_moment_ago)
    seen["view"] = None
    with a.lock("run-a4"):
        own = real(lock.out, a.storage).read(lock.key)
        seen["view"] = own  # the run's last look, made just before the takeover
        monkeypatch.setattr(a, "_read_json", lambda _path: json.loads(own[0]))
        lock.write({"run_id": "run-b4", "pid": 1, "host": "elsewhere", "heartbeat": time.time()})
    assert lock.exists() and lock.holder()["run_id"] == "run-b4"


# --- reading results ------------------------------------------------------------------------------------------


def test_read_scores_history_latest_summary_and_selection(tmp_path, scored_rows, tiny_artifact, synth_archive):
    meta = read_artifact_meta(tiny_artifact)
    store = ScoreStore(str(tmp_path / "out"))
    store.open()
    first = _with_run(scored_rows, "r1")
    store.commit(RunRecord("r1", meta.model_id, "stat", state="finished"), [_stage(store, first, "r1", meta)], KeySet())
    # run 2: a changed version of one file (new size) -> history keeps both rows, the current view the newest
    changed = _with_run(first.slice(0, 1), "r2")
    changed = changed.set_column(changed.schema.get_field_index("size"), "size", pa.array([123456], pa.int64()))
    ts = pa.array([first.column("scored_at")[0].as_py().replace(year=2099)], SCORE_SCHEMA.field("scored_at").type)
    changed = changed.set_column(changed.schema.get_field_index("scored_at"), "scored_at", ts)
    store.commit(
        RunRecord("r2", meta.model_id, "stat", state="finished"), [_stage(store, changed, "r2", meta)], KeySet()
    )
    history = read_scores(str(tmp_path / "out"), latest=False)
    current = read_scores(str(tmp_path / "out"))
    assert history.num_rows == first.num_rows + 1 and current.num_rows == first.num_rows
    path0 = first.column("path")[0].as_py()
    row0 = next(r for r in current.to_pylist() if r["path"] == path0)
    assert row0["run_id"] == "r2" and row0["size"] == 123456
    s = summarize(str(tmp_path / "out"), top=3)
    n_err = synth_archive["corrupt"]
    assert s["images"] == first.num_rows and s["errors"] == n_err and s["history_rows"] == first.num_rows + 1
    assert [r["run"] for r in s["runs"]] == ["r1", "r2"] and len(s["top"]) == 3
    assert sum(f["images"] for f in s["folders"]) == first.num_rows or s["folders_total"] > len(s["folders"])
    top = s["top"][0]["defect_score"]
    assert top == max(r["defect_score"] for r in current.to_pylist() if r["defect_score"] is not None)
    chosen = select_rows(str(tmp_path / "out"), top=2, where=["defect_score>=0"])
    assert chosen.num_rows == 2 and chosen.column("defect_score")[0].as_py() == pytest.approx(top)
    assert select_rows(str(tmp_path / "out"), paths=[path0]).column("path").to_pylist() == [path0]


def test_extracted_file_names_keep_the_images_own_name_in_any_script():
    from raydefect.scoring.results import _safe_stem

    assert _safe_stem("/a/dir with space/画像 ü.png") == "画像_ü"
    assert _safe_stem("/a/b/x;rm -rf $HOME.jpg") == "x_rm_-rf_HOME"
    assert _safe_stem("/a/\udcff\udcfe.png") == "image" and _safe_stem("/a/.png") == "image"


def test_parse_where():
    t = pa.table({"defect_class": ["crack", "spot"], "defect_score": [0.9, 0.2], "is_defect": [True, False]})
    assert t.filter(parse_where("defect_class = crack")).num_rows == 1
    assert t.filter(parse_where("defect_score>=0.5")).num_rows == 1
    assert t.filter(parse_where("is_defect==false")).column("defect_class").to_pylist() == ["spot"]
    with pytest.raises(DataError, match="unknown or non-scalar column"):
        parse_where("mask_png=1")
    with pytest.raises(DataError, match="not a valid value"):
        parse_where("defect_score>high")
    with pytest.raises(DataError, match="expected COLUMN OP VALUE"):
        parse_where("defect_score")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_copying_a_scores_folder_keeps_it_readable(tmp_path, scored_rows, tiny_artifact):
    """Commit records hold paths relative to OUT, so a copied or moved folder still reads."""
    meta = read_artifact_meta(tiny_artifact)
    store = ScoreStore(str(tmp_path / "a"))
    store.open()
    store.commit(
        RunRecord("r1", meta.model_id, "stat"), [_stage(store, _with_run(scored_rows, "r1"), "r1", meta)], KeySet()
    )
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert read_scores(str(tmp_path / "b")).num_rows == scored_rows.num_rows


def _committed(out: Path, rows: pa.Table, meta) -> None:
    store = ScoreStore(str(out))
    store.open()
    store.commit(RunRecord("r1", meta.model_id, "stat"), [_stage(store, rows, "r1", meta)], KeySet())


def test_extract_draws_each_class_in_its_colour_with_predicts_path_and_bbox_format(
    tmp_path, scored_rows, tiny_artifact, synth_archive, monkeypatch
):
    """`scores extract` drew every class in crack's red (the overlay's default colour) and wrote bboxes as "[x0, y0,
    x1, y1]" beside predict's "x0 y0 x1 y1"; predict wrote the paths as given (relative), extract absolute."""
    import csv

    import pyarrow.compute as pc

    from raydefect.imaging import decode_image, encode_png
    from raydefect.scoring.results import extract
    from raydefect.tasks.predict import predict_images
    from raydefect.viz.overlay import class_colour, display_scale, render_overlay

    meta = read_artifact_meta(tiny_artifact)
    ok = _with_run(scored_rows, "r1").filter(pc.is_null(scored_rows.column("error")))
    records = ok.to_pylist()[:3]
    for k, r in enumerate(records):  # three defects of three classes, each with a known mask in the lower right
        h, w = r["height"], r["width"]
        mask = np.zeros((h, w), bool)
        mask[h // 2 : h - 4, w // 2 : w - 4] = True
        cls = meta.class_names[1 + k % (len(meta.class_names) - 1)]
        r.update(
            is_defect=True,
            defect_class=cls,
            defect_score=0.9 - k / 10,
            mask_png=encode_png(mask.astype(np.uint8) * 255),
        )
        r.update(mask_area_px=int(mask.sum()), bbox=[w // 2, h // 2, w - 4, h - 4])
    called = dict(ok.to_pylist()[3], is_defect=True, defect_class=meta.class_names[1], defect_score=0.5)
    called.update(mask_png=encode_png(np.zeros((called["height"], called["width"]), np.uint8)), bbox=None)
    called.update(mask_area_px=0)  # called defective, nothing above the pixel threshold
    _committed(tmp_path / "out", pa.Table.from_pylist([*records, called], schema=ok.schema), meta)
    r = extract(str(tmp_path / "out"), tmp_path / "x")
    with open(r["index"], newline="") as f:
        index = {row["path"]: row for row in csv.DictReader(f)}
    empty = index.pop(called["path"])
    assert empty["bbox"] == "" and empty["mask_area_px"] == "0"
    image = decode_image(Path(called["path"]).read_bytes(), mode="RGB")
    note = "mask empty: no pixel above the pixel threshold"
    expected = render_overlay(image, np.zeros(image.shape[:2], bool), 0.5, meta.class_names[1],
                              colour=class_colour(1), note=note)  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x" / empty["overlay"]).convert("RGB")), expected)
    assert len(index) == 3
    for rec in records:
        row = index[rec["path"]]
        assert row["bbox"] == " ".join(str(v) for v in rec["bbox"])
        overlay = np.asarray(Image.open(tmp_path / "x" / row["overlay"]).convert("RGB"))
        s = display_scale(rec["height"], rec["width"])
        panel_w = round(rec["width"] * s)
        x1, y1 = rec["bbox"][2], rec["bbox"][3]
        corner = overlay[round(y1 * s) - 1, panel_w + round(x1 * s) - 1]  # the contour's lower right pixel
        assert tuple(corner) == class_colour(meta.class_names.index(rec["defect_class"])), rec["defect_class"]

    # predict over the same files, named relative to the working folder: the same path and bbox text
    monkeypatch.chdir(Path(records[0]["path"]).parent)
    names = [os.path.relpath(rec["path"]) for rec in records]
    summary = predict_images(tiny_artifact, names, tmp_path / "p", pixel_threshold=0.0, overlays=False, workers=1)
    with open(summary.scores_csv, newline="") as f:
        predicted = {row["path"]: row for row in csv.DictReader(f)}
    assert set(predicted) == set(index)  # absolute, as the scores hold them
    bboxes = [row["bbox"] for row in predicted.values()]
    assert all(b.count(" ") == 3 and b.replace(" ", "").isdigit() for b in bboxes), bboxes
