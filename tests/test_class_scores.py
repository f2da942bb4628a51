"""Per-pixel classes (`model.mask_classes`) past training: the indexed ``mask_png`` and ``class_area_px`` of the
scores, `scores extract`, the exported graph and its contract, and the Python API.

One random tiny model with the class head serves the module; its pixel threshold is the median of its mask
probabilities, so about half of each image is defect and every class id shows up.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydefect.imaging import (
    CLASS_NAMES_KEY,
    decode_class_png,
    decode_image,
    decode_png_mask,
    encode_class_png,
    encode_png,
)
from raydefect.inference import Predictor, Preprocessor, class_areas, class_ids, upsample_prob
from raydefect.viz.overlay import class_colour

NAMES = ["normal", "scratch", "spot"]


@pytest.fixture(scope="module")
def class_model(make_tiny_model, tmp_path_factory):
    """(artifact folder, a folder of 4 images of their own sizes + one corrupt file)."""
    import torch

    from raydefect.inference.graph import export_wrapper, parity_inputs, reference_outputs
    from raydefect.models.artifact import load_artifact, save_artifact

    root = tmp_path_factory.mktemp("class_scores")
    model = make_tiny_model(mask_classes=True)
    save_artifact(model, root / "probe", thresholds={"image": 0.5, "pixel": 0.5})
    loaded = load_artifact(root / "probe")
    with torch.no_grad():
        probs = reference_outputs(export_wrapper(loaded.model), parity_inputs(loaded.meta, 4))["mask_prob"]
    pixel = float(np.median(probs))
    save_artifact(model, root / "model", thresholds={"image": 0.5, "pixel": pixel})
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(5)
    for i, (h, w) in enumerate([(40, 56), (64, 48), (33, 33), (50, 70)]):
        yy, xx = np.mgrid[0:h, 0:w]
        shade = 80 + 100 * (xx / w) * (i % 2) + 60 * (yy / h)
        img = np.clip(shade[..., None] + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        (images / f"img{i}.png").write_bytes(encode_png(img))
    (images / "broken.png").write_bytes(b"not a png")
    return root / "model", images


def _expected_ids(artifact: Path, path: str) -> tuple[np.ndarray, np.ndarray]:
    """The torch predictor's class ids of one image (`class_ids`) and where they are settled: the mask probability
    and the two most probable classes further than 1e-4 from a tie (batching may move the last digits)."""
    predictor = Predictor(artifact, device="cpu", precision="fp32")
    meta = predictor.meta
    x, (w, h) = Preprocessor(meta).from_bytes(Path(path).read_bytes(), path=path)
    out = predictor.predict(x[None])
    ids = class_ids(out["mask_prob"][0], out["pixel_class_probs"][0], w, h, meta.pixel_threshold)
    prob = upsample_prob(out["mask_prob"][0], w, h)
    per_class = np.stack([upsample_prob(c, w, h) for c in out["pixel_class_probs"][0][1:]])
    top2 = np.sort(per_class, axis=0)[-2:]
    settled = (np.abs(prob - meta.pixel_threshold) > 1e-4) & (top2[1] - top2[0] > 1e-4)
    return ids, settled


def test_class_png_keeps_ids_colours_and_names():
    ids = np.zeros((5, 7), np.uint8)
    ids[1:3, 2:5], ids[4, 6] = 2, 1
    data = encode_class_png(ids, NAMES)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "P" and json.loads(img.text[CLASS_NAMES_KEY]) == NAMES
        palette = img.getpalette()
        assert np.array_equal(np.asarray(img), ids)
    assert [tuple(palette[3 * i : 3 * i + 3]) for i in (1, 2)] == [class_colour(1), class_colour(2)]
    back, names = decode_class_png(data)
    assert np.array_equal(back, ids) and names == NAMES
    assert np.array_equal(decode_png_mask(data), ids > 0)  # readers of binary masks see the defect pixels
    binary, none = decode_class_png(encode_png(ids > 0))
    assert none is None and np.array_equal(binary, (ids > 0).astype(np.uint8))


def test_batch_scorer_keeps_binary_masks_for_a_binary_model(tiny_artifact, class_model):
    from raydefect.scoring.scorer import BatchScorer

    _, images = class_model
    paths = sorted(str(p) for p in images.iterdir())
    rows = BatchScorer(str(tiny_artifact), device="cpu").score(paths).to_pylist()
    ok = [r for r in rows if not r["error"]]
    assert len(ok) == 4 and all(r["class_area_px"] is None for r in rows)
    for r in ok:
        with Image.open(io.BytesIO(r["mask_png"])) as img:
            assert img.mode == "1" and CLASS_NAMES_KEY not in img.info


@pytest.mark.ray
@pytest.mark.slow
def test_score_writes_class_masks_that_pandas_and_duckdb_read(ray_session, class_model, tmp_path):
    import duckdb
    import pandas as pd
    import pyarrow.parquet as pq

    import raydefect
    from raydefect.config import load_config
    from raydefect.pipelines.score import run_score
    from raydefect.scoring.results import extract
    from raydefect.scoring.schema import read_file_metadata

    artifact, images = class_model
    out = tmp_path / "scores"
    cfg = load_config("default", sets=["score.batch_size=2", "score.commit_interval_s=0", "score.precision=fp32"])
    report = run_score(str(artifact), str(images), str(out), cfg)
    assert (report.scored, report.errors) == (5, 1)

    frame = pd.read_parquet(str(out))  # pandas, no raydefect
    assert len(frame) == 5 and frame["class_area_px"].isna().sum() == 1  # the corrupt file: null
    files = sorted(out.glob("*/*/*.parquet"))
    assert read_file_metadata(pq.read_metadata(files[0]).metadata)["schema_version"] == "3"
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT path, mask_png, class_area_px, mask_area_px, width, height "
        f"FROM read_parquet('{out}/*/*/*.parquet') WHERE error IS NULL ORDER BY path"
    ).fetchall()
    assert len(rows) == 4
    seen: set[int] = set()
    for path, png, areas, area, w, h in rows:
        with Image.open(io.BytesIO(bytes(png))) as img:  # PIL alone: the pixel values are the class ids
            assert img.mode == "P" and json.loads(img.text[CLASS_NAMES_KEY]) == NAMES
            ids = np.asarray(img)
        assert ids.shape == (h, w)
        want, settled = _expected_ids(artifact, path)
        assert np.array_equal(ids[settled], want[settled]) and settled.mean() > 0.9
        assert dict(areas) == class_areas(ids, NAMES) and sum(dict(areas).values()) == area  # DuckDB: a MAP
        seen |= set(np.unique(ids).tolist())
    assert seen == {0, 1, 2}

    api = raydefect.read_scores(out)
    row = api[api["error"].isna()].iloc[0]
    ids, names = raydefect.decode_mask(row["mask_png"])
    assert names == NAMES and dict(row["class_area_px"]) == class_areas(ids, NAMES)

    r = extract(str(out), tmp_path / "x", top=2)
    assert r["masks"] == r["overlays"] == 2
    import csv

    with open(r["index"], newline="") as f:
        index = list(csv.DictReader(f))
    for entry in index:
        data = (tmp_path / "x" / entry["mask"]).read_bytes()
        ids, names = decode_class_png(data)
        assert names == NAMES and json.loads(entry["class_area_px"]) == class_areas(ids, NAMES)
        with Image.open(io.BytesIO(data)) as img:
            assert img.mode == "P" and tuple(img.getpalette()[3:6]) == class_colour(1)
        overlay = decode_image((tmp_path / "x" / entry["overlay"]).read_bytes())
        colours = {tuple(int(v) for v in c) for c in overlay.reshape(-1, 3)}
        assert class_colour(1) in colours and class_colour(2) in colours  # each class outlined in its colour


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_carries_the_pixel_classes(class_model, tmp_path, fmt):
    from raydefect.inference.graph import PIXEL_CLASS_OUTPUT, parity_inputs
    from raydefect.tasks.export import export_model, sidecar_path

    artifact, _ = class_model
    out = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt")
    report = export_model(artifact, out, legacy=True) if fmt == "onnx" else export_model(artifact, out)
    side = json.loads(sidecar_path(out).read_text())
    names = ["defect_score", "class_probs", "mask_prob", PIXEL_CLASS_OUTPUT]
    assert [o["name"] for o in side["outputs"]] == names and side["outputs"][3]["shape"] == ["batch", 3, 32, 32]
    assert side["pixel_classes"]["output"] == PIXEL_CLASS_OUTPUT and "argmax" in side["pixel_classes"]["class_ids"]
    parity = side["parity"]["max_abs_diff"]
    assert report.checked and parity["class_ids"]["pixels"] == 3 * 32 * 32 and not parity["class_ids"]["unexplained"]

    predictor = Predictor(artifact, device="cpu", precision="fp32")
    meta = predictor.meta
    x = parity_inputs(meta, 3, seed=11)
    if fmt == "onnx":  # the file alone, as another runtime would run it
        import onnxruntime as ort

        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = dict(zip(names, session.run(None, {"image": x}), strict=True))
    else:
        import torch

        with torch.inference_mode():
            got = dict(zip(names, (t.numpy() for t in torch.jit.load(str(out))(torch.from_numpy(x))), strict=True))
    want = predictor.predict(x)
    t, s = side["thresholds"]["pixel"], side["image_size"]
    for k in range(3):
        a = class_ids(want["mask_prob"][k], want[PIXEL_CLASS_OUTPUT][k], s, s, t)
        b = class_ids(got["mask_prob"][k], got[PIXEL_CLASS_OUTPUT][k], s, s, t)
        assert (a != b).sum() <= 2 and len(np.unique(a)) == 3  # ties aside, the same classes, every class present


def test_onnx_engine_gives_the_class_ids_of_pytorch(class_model, tiny_artifact, tmp_path):
    import shutil

    from raydefect.inference.graph import PIXEL_CLASS_OUTPUT, parity_inputs
    from raydefect.inference.onnx_runtime import OnnxPredictor, engine_file, engine_path
    from raydefect.models.artifact import load_artifact

    artifact, _ = class_model
    loaded = load_artifact(artifact)
    three_outputs = engine_file(load_artifact(tiny_artifact), tmp_path)
    shutil.copyfile(three_outputs, engine_path(loaded.meta, tmp_path))  # a graph without the class output: replaced
    torch_p = Predictor(artifact, device="cpu", precision="fp32")
    onnx_p = OnnxPredictor(loaded, cache_dir=tmp_path)
    assert onnx_p.engine == "onnx"
    x = parity_inputs(torch_p.meta, 2, seed=4)
    a, b = torch_p.predict(x), onnx_p.predict(x)
    assert np.abs(a[PIXEL_CLASS_OUTPUT] - b[PIXEL_CLASS_OUTPUT]).max() < 1e-4
    assert onnx_p.predict(x[:0])[PIXEL_CLASS_OUTPUT].shape == (0, 3, 32, 32)


def test_api_predictions_carry_the_class_mask(class_model, tiny_artifact):
    import raydefect

    artifact, images = class_model
    paths = sorted(str(p) for p in images.glob("img*.png"))
    results = raydefect.load_model(artifact, device="cpu").predict(paths)
    for p, path in zip(results, paths, strict=True):
        assert p.classes.shape == (p.height, p.width) and p.classes.dtype == np.uint8
        assert np.array_equal(p.classes > 0, p.mask)
        assert p.class_area_px == class_areas(p.classes, NAMES) and sum(p.class_area_px.values()) == p.mask_area_px
        want, settled = _expected_ids(artifact, path)
        assert np.array_equal(p.classes[settled], want[settled])
    binary = raydefect.load_model(tiny_artifact, device="cpu").predict(paths[:1])[0]
    assert binary.classes is None and binary.class_area_px is None


def test_finish_takes_the_half_precision_maps_of_a_gpu_model_step(class_model):
    """On a GPU the model step hands on float16 maps (`Predictor.predict(half_masks=True)`); the finish stage
    turns them into the class ids of the float32 maps, ties aside."""
    from raydefect.inference.graph import PIXEL_CLASS_OUTPUT, parity_inputs
    from raydefect.scoring.scorer import finish

    artifact, _ = class_model
    predictor = Predictor(artifact, device="cpu", precision="fp32")
    meta = predictor.meta
    x = parity_inputs(meta, 2, seed=2)
    full, half = predictor.predict(x), predictor.predict(x, half_masks=True)
    assert half["mask_prob"].dtype == half[PIXEL_CLASS_OUTPUT].dtype == np.float16
    sizes = [(40, 30), (32, 32)]
    batch = {
        "path": np.asarray(["a.png", "b.png"], object),
        "size": np.asarray([1, 1]),
        "mtime_ns": np.asarray([1, 1]),
        "sha1": np.asarray(["", ""], object),
        "width": np.asarray([w for w, _ in sizes]),
        "height": np.asarray([h for _, h in sizes]),
        "error": np.asarray(["", ""], object),
        **half,
    }
    rows = finish(batch, meta, "run").to_pylist()
    for k, (row, (w, h)) in enumerate(zip(rows, sizes, strict=True)):
        ids, names = decode_class_png(row["mask_png"])
        want = class_ids(full["mask_prob"][k], full[PIXEL_CLASS_OUTPUT][k], w, h, meta.pixel_threshold)
        assert names == NAMES and ids.shape == (h, w) and (ids == want).mean() > 0.97
        assert dict(row["class_area_px"]) == class_areas(ids, NAMES)
