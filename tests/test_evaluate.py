"""`raydefect evaluate`: metrics against hand-computed values with models whose predictions we control, the files
it writes, the self-contained report, bad inputs, and Ray Data giving the local answer."""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from raydefect.cli import cli
from raydefect.data.importers import import_classic
from raydefect.data.manifest import load_dataset
from raydefect.data.prepare import prepare_dataset
from raydefect.models.artifact import read_artifact_meta
from raydefect.tasks.evaluate import run_evaluation
from raydefect.viz.overlay import display_scale
from raydefect.viz.report import GALLERIES, PLOTS

S = 32  # images are exactly the model's input size, so nothing is resampled between truth and prediction
GREY, RED, BLUE = (100, 100, 100), (230, 30, 30), (30, 30, 230)
N_NORMAL, N_SCRATCH, N_SPOT = 4, 3, 3


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _painted_dataset(root: Path, with_defects: bool = True):
    """Grey 32 px images; scratches painted red and spots blue, each mask exactly the painted pixels."""
    rng = np.random.default_rng(0)
    for i in range(N_NORMAL):
        noise = rng.integers(0, 5, (S, S, 3), dtype=np.uint8)
        _write(root / "raw/normal" / f"n{i}.png", np.full((S, S, 3), GREY, np.uint8) + noise)
    if with_defects:
        for cls, colour, n in (("scratch", RED, N_SCRATCH), ("spot", BLUE, N_SPOT)):
            for i in range(n):
                image = np.full((S, S, 3), GREY, np.uint8)
                mask = np.zeros((S, S), np.uint8)
                y, x = 3 + 7 * i, 4 + 5 * i
                region = (slice(y, y + 4), slice(x, x + 12)) if cls == "scratch" else (slice(y, y + 5), slice(x, x + 5))
                image[region] = colour
                mask[region] = 255
                if cls == "spot" and i == 0:  # a second region: AUPRO counts regions, not images
                    image[26:29, 26:29] = colour
                    mask[26:29, 26:29] = 255
                _write(root / "raw/defect" / cls / f"{cls}{i}.png", image)
                _write(root / "raw/masks" / cls / f"{cls}{i}.png", mask)
    listing = import_classic(
        root / "raw/defect" if with_defects else None,
        root / "raw/masks" if with_defects else None,
        root / "raw/normal",
    )
    prepare_dataset(listing, root / "dataset", split=(1.0, 0.0, 0.0), workers=1)
    return load_dataset(root / "dataset")


class PaintReader:
    """A stand-in model that reads the answer painted into the image (red = scratch, blue = spot).

    mode "perfect": right class, score 1/0 and exact masks; "wrong": every decision inverted (defects called normal,
    normal images called scratch) and every mask the complement of the truth; "empty": right decisions, empty masks;
    "called": every normal image called scratch, every mask empty.
    """

    def __init__(self, meta, mode: str) -> None:
        self.meta = meta
        self.mode = mode
        self.mean = np.asarray(meta.mean, np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(meta.std, np.float32).reshape(1, 3, 1, 1)

    def predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        x = batch * self.std + self.mean  # back to [0, 1]
        red = (x[:, 0] > 0.5) & (x[:, 2] < 0.5)
        blue = (x[:, 2] > 0.5) & (x[:, 0] < 0.5)
        defect = red | blue
        n = len(batch)
        cls = np.where(red.any(axis=(1, 2)), 1, np.where(blue.any(axis=(1, 2)), 2, 0))
        if self.mode == "wrong":
            cls = np.where(cls == 0, 1, 0)
        probs = np.zeros((n, 3), np.float32)
        probs[np.arange(n), cls] = 1.0
        if self.mode == "called":
            cls = np.where(cls == 0, 1, cls)
            probs = np.zeros((n, 3), np.float32)
            probs[np.arange(n), cls] = 1.0
        empty = np.zeros_like(defect)
        mask = {"perfect": defect, "wrong": ~defect, "empty": empty, "called": empty}[self.mode]
        return {"defect_score": 1.0 - probs[:, 0], "class_probs": probs, "mask_prob": mask.astype(np.float32)}


@pytest.fixture(scope="module")
def painted(tmp_path_factory):
    return _painted_dataset(tmp_path_factory.mktemp("painted"))


@pytest.fixture(scope="module")
def meta(tiny_artifact):
    m = read_artifact_meta(tiny_artifact)  # classes normal, scratch, spot at 32 px: the painted data's classes
    assert m.class_names == ("normal", "scratch", "spot") and m.image_size == S
    return dataclasses.replace(m, thresholds={"image": 0.5, "pixel": 0.5})


def _evaluate(meta, dataset, mode: str, out: Path, gallery: int = 8):
    return run_evaluation(PaintReader(meta, mode), dataset, "train", out, batch_size=4, gallery_size=gallery)


class _Page(HTMLParser):
    """Collects every <img> (with the <figure> section it sits in) and every external reference."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.external: list[str] = []
        self.headings: list[str] = []
        self._in_h3 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append({**a, "section": self.headings[-1] if self.headings else ""})
        for key in ("src", "href"):
            if key in a and not a[key].startswith(("data:", "#")):
                self.external.append(a[key])
        self._in_h3 = tag in ("h2", "h3")

    def handle_data(self, data):
        if self._in_h3 and data.strip():
            self.headings.append(data.strip())
            self._in_h3 = False


def _png_size(uri: str) -> tuple[int, int]:
    assert uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        im.load()
        return im.size


def test_perfect_model(meta, painted, tmp_path):
    ev = _evaluate(meta, painted, "perfect", tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    h = m["headline"]
    for key in ("accuracy", "precision", "recall", "f1", "auroc", "ap", "class_accuracy"):
        assert h[key] == 1.0, key
    for key in ("iou", "dice", "iou_all", "dice_all", "pixel_auroc", "aupro"):
        assert h[key] == pytest.approx(1.0), key
    assert m["image"]["confusion"] == [[N_NORMAL, 0, 0], [0, N_SCRATCH, 0], [0, 0, N_SPOT]]
    assert m["image"]["at_threshold"] == {
        "threshold": 0.5,
        "tp": 6,
        "fp": 0,
        "tn": 4,
        "fn": 0,
        "accuracy": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
    }
    assert m["pixel"]["n_regions"] == N_SCRATCH + N_SPOT + 1 and m["pixel"]["threshold"] == 0.5
    assert [r["recall"] for r in m["per_class"]] == [1.0, 1.0, 1.0]
    assert m["data"]["evaluated"] == 10 and m["errors"] == [] and m["engine"] == "local"
    assert all(not v for v in m["galleries"].values())  # nothing to show
    assert ev.metrics["model"]["thresholds"] == {"image": 0.5, "pixel": 0.5}


def test_all_wrong_model(meta, painted, tmp_path):
    _evaluate(meta, painted, "wrong", tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    h = m["headline"]
    for key in ("accuracy", "precision", "recall", "f1", "auroc", "class_accuracy"):
        assert h[key] == 0.0, key
    assert h["ap"] == pytest.approx(6 / 10)  # every defect ranked last: AP = prevalence
    for key in ("iou", "dice", "iou_all", "dice_all", "pixel_auroc", "aupro"):
        assert h[key] == pytest.approx(0.0), key
    assert m["image"]["confusion"] == [[0, N_NORMAL, 0], [N_SCRATCH, 0, 0], [N_SPOT, 0, 0]]
    g = m["galleries"]
    assert len(g["false_negatives"]) == 6 and len(g["false_positives"]) == 4
    assert g["wrong_class"] == [] and g["worst_iou"] == []
    assert {e["true_class"] for e in g["false_positives"]} == {"normal"}
    assert {e["predicted_class"] for e in g["false_negatives"]} == {"normal"}


def test_empty_masks(meta, painted, tmp_path):
    _evaluate(meta, painted, "empty", tmp_path, gallery=2)
    m = json.loads((tmp_path / "metrics.json").read_text())
    h = m["headline"]
    assert h["f1"] == 1.0 and h["auroc"] == 1.0
    assert h["iou"] == 0.0 and h["dice"] == 0.0
    assert h["iou_all"] == pytest.approx(N_NORMAL / 10)  # normal images: nothing predicted, nothing there = 1
    assert h["pixel_auroc"] == pytest.approx(0.5)  # every pixel tied
    # PRO curve (0,0) -> (1,1) in one step, interpolated at FPR 0.3: area 0.3 * 0.3 / 2, normalised by 0.3
    assert h["aupro"] == pytest.approx(0.15)
    assert len(m["galleries"]["worst_iou"]) == 2  # --gallery 2
    assert all(e["iou"] == 0.0 for e in m["galleries"]["worst_iou"])


def test_an_image_called_defective_with_an_empty_mask_says_so_never_iou_1(meta, painted, tmp_path):
    """False-positive cards read "IoU 1.000" (two empty masks) beside a picture with nothing drawn."""
    _evaluate(meta, painted, "called", tmp_path, gallery=8)
    cards = json.loads((tmp_path / "metrics.json").read_text())["galleries"]["false_positives"]
    assert len(cards) == N_NORMAL
    for card in cards:
        assert card["predicted_class"] == "scratch" and card["iou"] is None
        assert card["note"] == "called scratch, mask empty: no pixel above the pixel threshold"
        picture = np.asarray(Image.open(tmp_path / card["png"]).convert("RGB"))
        h, w = picture.shape[0], picture.shape[1] // 2
        assert np.array_equal(picture[h // 2 :, w + 1 :], picture[h // 2 :, 1:w])  # nothing drawn below the labels
    html = (tmp_path / "report.html").read_text()
    assert "IoU 1.000" not in html and "mask empty" in html


def test_the_report_tells_the_threshold_story(meta, painted, tmp_path):
    """The report never said how the thresholds were chosen, showed no score histogram and no recall table."""
    told = dataclasses.replace(meta, extra={"thresholds_chosen": {"image": "best F1 on 40 images", "pixel": "Dice"}})
    _evaluate(told, painted, "perfect", tmp_path, gallery=0)
    story = json.loads((tmp_path / "metrics.json").read_text())["thresholds"]
    assert story["how"] == {"image": "best F1 on 40 images", "pixel": "Dice"}
    assert [r["target_recall"] for r in story["at_recall"]] == [0.9, 0.95, 0.99, 0.999]
    assert all(r["precision"] == 1.0 and r["threshold"] == 1.0 for r in story["at_recall"])  # perfect scores
    assert (tmp_path / "score_histogram.png").is_file()
    page = _Page()
    html = (tmp_path / "report.html").read_text()
    page.feed(html)
    assert "Thresholds" in page.headings and "best F1 on 40 images" in html
    assert "Image thresholds for target recalls, on this split" in page.headings
    assert any(i.get("alt") == "score histogram" for i in page.images)
    untold = tmp_path / "untold"  # a model from before the record: the training rule, said as such
    _evaluate(meta, painted, "perfect", untold, gallery=0)
    assert (
        "best F1 on the validation split"
        in json.loads((untold / "metrics.json").read_text())["thresholds"]["how"]["image"]
    )


def test_split_without_defects(meta, tmp_path):
    dataset = _painted_dataset(tmp_path / "data", with_defects=False)
    _evaluate(meta, dataset, "perfect", tmp_path / "out")
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    h = m["headline"]
    assert h["accuracy"] == 1.0 and h["auroc"] is None and h["ap"] is None  # undefined: null, not NaN
    assert h["pixel_auroc"] is None and h["iou"] is None and h["iou_all"] == 1.0
    assert any("only normal images" in n for n in m["notes"])
    html = (tmp_path / "out" / "report.html").read_text()
    assert "n/a" in html and "none: no image of this kind" in html


def test_files_and_the_self_contained_report(meta, painted, tmp_path):
    _evaluate(meta, painted, "wrong", tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("metrics.json", "per_image.csv", "report.html", *(f"{k}.png" for k, _ in PLOTS)):
        assert (tmp_path / name).is_file(), name
    with open(tmp_path / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {r["iou"] for r in rows} == {"0.000000"}
    assert set(m["files"]["plots"]) == {k for k, _ in PLOTS} | {"score_histogram"}  # the latter under Thresholds

    page = _Page()
    page.feed((tmp_path / "report.html").read_text())
    assert page.external == []  # opens offline, as one file
    alts = {img.get("alt") for img in page.images}
    assert {k for k, _ in PLOTS} <= alts  # every plot embedded
    for img in page.images:
        _png_size(img["src"])  # every image is a decodable embedded PNG
    titles = {key: title for key, title, _ in GALLERIES}
    for key, entries in m["galleries"].items():
        shown = [img for img in page.images if img["section"].startswith(titles[key])]
        assert len(shown) == len(entries), key
        for img, entry in zip(shown, entries, strict=True):
            assert img["alt"] == entry["file"]
            assert (tmp_path / entry["png"]).is_file()
            width, height = _png_size(img["src"])
            scale = display_scale(S, S)
            assert (width, height) == (2 * S * scale, S * scale)  # overlay: image and prediction side by side


def test_unreadable_image_and_unknown_class(meta, painted, tmp_path):
    """A broken file is a recorded error, not a crash; a class the model lacks is kept and explained."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(painted.root, root)
    broken = root.parent / "broken.png"
    broken.write_bytes(b"not a png")
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    table = pq.read_table(root / "manifest.parquet").to_pylist()
    table[0]["image"] = str(broken)
    extra = dict(table[-1], defect_class="dent")  # a defect class the model was never trained on
    table.append(extra)
    pq.write_table(pa.Table.from_pylist(table), root / "manifest.parquet")
    info = yaml.safe_load((root / "dataset.yaml").read_text())
    info["classes"].append("dent")
    (root / "dataset.yaml").write_text(yaml.safe_dump(info))

    _evaluate(meta, load_dataset(root), "perfect", tmp_path / "out")
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["data"]["errors"] == 1 and m["errors"][0]["image"] == str(broken)
    assert "not a recognised image format" in m["errors"][0]["error"]
    assert m["image"]["class_names"] == ["normal", "scratch", "spot", "dent"]
    assert m["image"]["confusion"][3] == [0, 0, 1, 0]  # the dent (painted blue) is called spot: wrong class
    assert any("unknown to the model: dent" in n for n in m["notes"])
    assert "Unreadable images (1)" in (tmp_path / "out" / "report.html").read_text()


def test_cli_evaluate_on_the_tiny_artifact(tiny_artifact, synth_dataset, tmp_path):
    args = ["evaluate", "--model", str(tiny_artifact), "--data", str(synth_dataset.root), "--split", "test"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path), "--local", "--gallery", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "aupro" in result.output and "report.html" in result.output
    m = json.loads((tmp_path / "metrics.json").read_text())
    n_test = len(synth_dataset.split("test"))
    assert m["data"]["evaluated"] == n_test and m["image"]["n_images"] == n_test
    assert np.asarray(m["image"]["confusion"]).sum() == n_test and len(m["image"]["confusion"]) == 5
    g = m["galleries"]
    worst_first = {
        "false_positives": [-e["defect_score"] for e in g["false_positives"]],
        "false_negatives": [e["defect_score"] for e in g["false_negatives"]],
        "worst_iou": [e["iou"] for e in g["worst_iou"]],
    }
    for key, values in worst_first.items():
        assert values == sorted(values), key
    for entries in g.values():
        assert len(entries) <= 2
        for e in entries:
            with Image.open(tmp_path / e["png"]) as im:
                scale = display_scale(64, 64)
                assert im.size == (2 * 64 * scale, 64 * scale)
    bad = CliRunner().invoke(cli, ["evaluate", "--model", str(tiny_artifact), "--data", str(tmp_path), "--out", "x"])
    assert bad.exit_code == 1 and "not a prepared dataset" in bad.output
    # a file where the dataset folder goes: it said the existing file "does not exist"
    args = ["evaluate", "--model", str(tiny_artifact), "--data", str(synth_dataset.root / "problems.csv")]
    bad = CliRunner().invoke(cli, [*args, "--out", "x"])
    assert bad.exit_code == 1 and "problems.csv is a file, not a folder" in bad.output, bad.output
    assert "does not exist" not in bad.output


@pytest.mark.ray
@pytest.mark.slow
def test_ray_data_gives_the_local_answer(ray_session, tiny_artifact, synth_dataset, tmp_path, capsys):
    from raydefect.pipelines.evaluate import evaluate

    data, split = synth_dataset.root, "val"
    local = evaluate(tiny_artifact, data, tmp_path / "local", split=split, use_ray=False, device="cpu", gallery_size=0)
    on_ray = evaluate(tiny_artifact, data, tmp_path / "ray", split=split, use_ray=True, batch_size=3, gallery_size=0)
    n = len(local.rows)  # both engines end their progress with the same plain line (stderr is not a terminal)
    assert capsys.readouterr().err.count(f"evaluate: {n}/{n} images (100%)") == 2
    assert on_ray.metrics["engine"] == "ray" and local.metrics["engine"] == "local"
    for key, value in local.metrics["headline"].items():
        # batch composition moves float results by ~1e-7, which can move a pixel across a histogram bin edge
        assert on_ray.metrics["headline"][key] == pytest.approx(value, abs=1e-4, nan_ok=True), key
    assert local.metrics["image"]["confusion"] == on_ray.metrics["image"]["confusion"]
    assert local.metrics["pixel"]["n_regions"] == on_ray.metrics["pixel"]["n_regions"] > 0
    assert [r["defect_score"] for r in local.rows] == pytest.approx([r["defect_score"] for r in on_ray.rows])
    assert (tmp_path / "ray" / "report.html").is_file()
