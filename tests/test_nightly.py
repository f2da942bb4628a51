"""The nightly loop: `scores report` (trends, drift, alarms), `review` (what to label next) and the way back into a
dataset. Scores folders are written straight with pyarrow (`raydefect.scoring.synthetic`): no model, no Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from raydefect.cli import cli
from raydefect.errors import DataError
from raydefect.metrics.drift import PSI_ALARM, PSI_WARN, build_reference, excess_psi, histogram, level, psi
from raydefect.scoring.results import read_scores, summarize
from raydefect.scoring.synthetic import Night, write_scores_folder
from raydefect.scoring.trends import EXIT_ALARM, build_report

CALM = [Night(f"2026010{d}T020000Z-00000{d}", 600, seed=d) for d in range(1, 5)]
SHIFTED = Night("20260105T020000Z-ffffff", 600, brightness=0.62, score_a=1.0, score_b=2.0, seed=9)


def _reference() -> dict:
    rng = np.random.default_rng(1)
    return build_reference(
        rng.beta(0.5, 4.0, 800), 0.5, np.clip(rng.normal(0.45, 0.04, 800), 0, 1), rng.normal(0.12, 0.02, 800)
    ).to_dict()


@pytest.fixture
def folder(tmp_path):
    made = []

    def make(nights, *, reference=True, **kwargs):
        made.append(1)
        out = str(tmp_path / f"scores{len(made)}")
        root = str(tmp_path / "archive")
        return write_scores_folder(out, nights, root=root, reference=_reference() if reference else None, **kwargs)

    return make


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    a = histogram(rng.normal(0.45, 0.04, 20_000), "brightness")
    same = psi(a, histogram(rng.normal(0.45, 0.04, 5_000), "brightness"))
    shifted = psi(a, histogram(rng.normal(0.55, 0.04, 5_000), "brightness"))
    assert same < 0.02 and level(same) == "ok"
    assert shifted > PSI_ALARM and level(shifted) == "alarm"
    assert level(0.15) == "warn" and level(None) == "n/a"
    assert psi(a, np.zeros_like(a)) is None
    # small samples: the raw index is mostly sampling noise, the excess is not
    small_ref, small = (
        histogram(rng.normal(0.45, 0.04, 50), "brightness"),
        histogram(rng.normal(0.45, 0.04, 40), "brightness"),
    )
    excess, noise = excess_psi(small_ref, small)
    assert noise > 0.1 and psi(small_ref, small) > excess and excess < PSI_WARN
    moved, _ = excess_psi(small_ref, histogram(rng.normal(0.65, 0.04, 40), "brightness"))
    assert moved > PSI_ALARM
    assert excess_psi(small_ref, histogram(rng.normal(0.45, 0.04, 10), "brightness"))[0] is None  # under MIN_IMAGES


def test_report_flags_a_shifted_night_and_exits_3(folder, tmp_path):
    out = folder([*CALM, SHIFTED])
    result = CliRunner().invoke(cli, ["scores", "report", out, "--out", str(tmp_path / "report")])
    assert result.exit_code == EXIT_ALARM, result.output
    assert "ALARM: brightness PSI" in result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    night = report["night"]
    assert night["run"] == SHIFTED.run_id and night["alarm"]
    assert report["runs"][-1]["drift"]["brightness"]["level"] == "alarm"
    assert all(r["drift"]["brightness"]["level"] == "ok" for r in report["runs"][:-1])
    assert night["rate"]["alarm"]  # Beta(1, 2) has far more scores above 0.5 than Beta(0.5, 4)
    assert report["reference"]["source"] == "scores footer"
    assert report["images"] == 3000 and [len(report["folders"][k]) for k in ("1", "2")] == [3, 21]
    assert {r["folder"] for r in report["folders"]["1"]} == {"line_0", "line_1", "line_2"}
    assert sum(r["images"] for r in report["folders"]["2"]) == 3000
    page = (tmp_path / "report" / "report.html").read_text()
    assert "ALARM on run" in page and "line_1/day_03" in page and "<svg" in page


def test_report_of_calm_nights_exits_0_and_counts_add_up(folder, tmp_path):
    out = folder(CALM)
    result = CliRunner().invoke(cli, ["scores", "report", out, "--out", str(tmp_path / "r"), "--levels", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert not report["night"]["alarm"] and list(report["folders"]) == ["1"]
    table = read_scores(out, latest=False, columns=["is_defect", "error"])
    assert report["defects"] == int(np.sum(table.column("is_defect").to_numpy(zero_copy_only=False) == True))  # noqa: E712
    assert report["errors"] == table.num_rows - table.column("error").null_count
    for r in report["runs"]:
        assert sum(r["classes"].values()) == r["defects"]
        assert sum(r["histograms"]["defect_score"]) == r["scored"]


def test_report_streams_in_small_batches_with_the_same_figures(folder):
    out = folder([*CALM, SHIFTED], rows_per_file=250)
    whole, small = build_report(out), build_report(out, batch_rows=64)
    assert whole["runs"] == small["runs"] and whole["folders"] == small["folders"]


def test_defect_rate_alarm_against_earlier_runs_and_an_absolute_limit(folder, tmp_path):
    jump = Night("20260105T020000Z-eeeeee", 600, score_a=1.0, score_b=2.0, seed=7)
    rate = build_report(folder([*CALM, jump]))["night"]["rate"]
    assert rate["alarm"] and rate["baseline_runs"] == 4 and rate["rate"] > 2 * rate["baseline"]
    one = folder(CALM[:1])
    calm = build_report(one)  # one run: no baseline, so only the absolute limit can fire
    assert not calm["night"]["alarm"] and calm["night"]["rate"]["baseline"] is None
    result = CliRunner().invoke(
        cli, ["scores", "report", one, "--out", str(tmp_path / "r"), "--max-defect-rate", "0.01"]
    )
    assert result.exit_code == EXIT_ALARM and "above --max-defect-rate 1.0%" in result.output


def test_old_folders_without_image_statistics_still_report(folder, tmp_path):
    out = folder([Night(n.run_id, n.rows, stats=False, seed=n.seed) for n in CALM], reference=False)
    for f in (tmp_path / "scores1").rglob("*.parquet"):  # as schema 1 wrote them: no brightness, contrast, classes
        t = pq.read_table(f)
        old = t.drop_columns(["brightness", "contrast", "class_area_px"])
        pq.write_table(old.replace_schema_metadata(t.schema.metadata), f)
    report = build_report(out)
    drift = report["runs"][-1]["drift"]
    assert drift["brightness"]["note"].startswith("not recorded") and drift["defect_score"]["level"] == "n/a"
    assert not report["night"]["alarm"] and report["reference"]["source"] == "none"
    current = read_scores(out)
    assert current.column("brightness").null_count == current.num_rows == 2400
    assert current.column("class_area_px").null_count == 2400
    assert summarize(out)["images"] == 2400


def test_report_of_an_empty_or_missing_folder_is_one_line(folder, tmp_path):
    for target in (tmp_path / "nothing", folder([])):
        for command in (["scores", "report"], ["review"]):
            result = CliRunner().invoke(cli, [*command, str(target), "--out", str(tmp_path / "r")])
            assert result.exit_code == 1
            line = result.output.strip()
            assert "\n" not in line and "raydefect score" in line and "Traceback" not in line
    with pytest.raises(DataError, match="no committed rows"):
        build_report(folder([]))


def test_artifact_keeps_the_validation_reference_without_changing_the_model_id(make_tiny_model, tmp_path):
    from raydefect.models.artifact import ArtifactMeta, read_artifact_meta, save_artifact

    model = make_tiny_model()
    plain = save_artifact(model, tmp_path / "a", thresholds={"image": 0.5, "pixel": 0.5})
    ref = _reference()
    with_ref = save_artifact(model, tmp_path / "b", thresholds={"image": 0.5, "pixel": 0.5}, reference=ref)
    assert plain.model_id == with_ref.model_id and plain.reference == {}
    loaded = read_artifact_meta(tmp_path / "b")
    assert loaded.reference["counts"]["brightness"] == ref["counts"]["brightness"]
    old = plain.to_dict()  # an artifact from before the reference: no such key at all
    assert "reference" not in old and ArtifactMeta.from_dict(old).reference == {}


def test_scorer_records_brightness_and_contrast(tiny_artifact, tmp_path):
    from raydefect.imaging import encode_png
    from raydefect.scoring.scorer import BatchScorer

    dark = np.full((40, 48, 3), 30, np.uint8)
    bright = np.full((40, 48, 3), 220, np.uint8)
    bright[::2] = 160  # stripes: contrast
    for name, img in (("dark.png", dark), ("bright.png", bright)):
        (tmp_path / name).write_bytes(encode_png(img))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    table = BatchScorer(str(tiny_artifact), device="cpu").score(
        [str(tmp_path / n) for n in ("dark.png", "bright.png", "broken.png")]
    )
    b, c = table.column("brightness").to_pylist(), table.column("contrast").to_pylist()
    assert b[0] == pytest.approx(30 / 255, abs=1e-3) and c[0] == pytest.approx(0.0, abs=1e-4)
    assert b[1] == pytest.approx(190 / 255, abs=0.01) and c[1] == pytest.approx(30 / 255, abs=0.01)
    assert b[2] is None and c[2] is None  # an error row has no statistics


def _write_images(out: str) -> None:
    """A tiny PNG at every path the synthetic scores name (the review copies the originals)."""
    from pathlib import Path

    from raydefect.imaging import encode_png

    png = encode_png(np.full((8, 8, 3), 128, np.uint8))
    for path in read_scores(out, columns=["path"]).column("path").to_pylist():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(png)


def _decode_rle(counts: list[int], size: list[int]) -> np.ndarray:
    flat = np.zeros(size[0] * size[1], bool)
    pos, value = 0, False
    for c in counts:
        flat[pos : pos + c] = value
        pos, value = pos + c, not value
    return flat.reshape(size, order="F")


def test_review_picks_the_shifted_uncertain_and_disagreeing_images(folder, tmp_path):
    import csv

    from raydefect.imaging import decode_mask

    calm = Night("20260101T020000Z-000001", 400, seed=1)
    shifted = Night("20260102T020000Z-000002", 20, brightness=0.75, seed=2)
    out = folder([calm, shifted])
    _write_images(out)
    dest = tmp_path / "review"
    result = CliRunner().invoke(cli, ["review", out, "--out", str(dest), "--n", "30", "--runs", "0"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((dest / "labels.csv").open()))
    reasons = [r["reason"] for r in rows]
    assert len(rows) == 30 and len({r["path"] for r in rows}) == 30
    assert reasons.count("uncertain") == 12 and reasons.count("disagree") == 9 and reasons.count("novel") == 9
    table = read_scores(out)
    by_path = {r["path"]: r for r in table.to_pylist()}
    novel = [by_path[r["path"]] for r in rows if r["reason"] == "novel"]
    assert all(r["run_id"] == shifted.run_id and r["brightness"] > 0.6 for r in novel)  # all from the shifted night
    ok = [r for r in table.to_pylist() if r["error"] is None]
    median = float(np.median([abs(r["defect_score"] - 0.5) for r in ok]))
    uncertain = [by_path[r["path"]] for r in rows if r["reason"] == "uncertain"]
    assert all(abs(r["defect_score"] - 0.5) < median / 4 for r in uncertain)
    assert len({r["path"].rsplit("/", 1)[0] for r in uncertain}) == 12  # spread: one per folder
    for r in rows:
        if r["reason"] == "disagree":
            s = by_path[r["path"]]
            assert s["is_defect"] != (s["mask_area_px"] > 0)
        assert (dest / r["file"]).is_file() and (dest / r["mask"]).is_file()
    coco = json.loads((dest / "annotations" / "instances_default.json").read_text())
    assert len(coco["images"]) == 30 and {c["name"] for c in coco["categories"]} == {"scratch", "spot"}
    ann = coco["annotations"][0]
    image = next(i for i in coco["images"] if i["id"] == ann["image_id"])
    mask = decode_mask(dest / "masks" / (image["file_name"].rsplit(".", 1)[0] + ".png")).array
    assert np.array_equal(_decode_rle(ann["segmentation"]["counts"], ann["segmentation"]["size"]), mask)
    assert ann["area"] == int(mask.sum()) > 0
    again = CliRunner().invoke(cli, ["review", out, "--out", str(dest), "--n", "5", "--runs", "0"])
    assert again.exit_code == 0 and len(list((dest / "images").iterdir())) == 5  # the first review's files are gone


def test_review_without_a_reference_measures_novelty_against_the_scores_themselves(folder, tmp_path):
    from raydefect.scoring.review import budgets, parse_mix, pick_review

    out = folder([Night("20260101T020000Z-000001", 300, seed=1), Night("20260102T020000Z-000002", 10, brightness=0.8)],
                 reference=False)  # fmt: skip
    picked = pick_review(out, n=10, shares=parse_mix("novel=1"), runs=0)
    assert "scanned runs' own" in picked.note
    assert [r["run_id"] for r in picked.rows] == ["20260102T020000Z-000002"] * 10
    assert budgets(7, parse_mix("uncertain=1,disagree=1,novel=1")) == {"uncertain": 3, "disagree": 2, "novel": 2}
    with pytest.raises(DataError, match="--mix"):
        parse_mix("curious=1")


def _review_folder(dest, images: dict[str, tuple[np.ndarray, np.ndarray | None, str]]):
    """A checked review set as `raydefect review` writes it: images/, masks/, labels.csv (class as reviewed)."""
    import csv

    from raydefect.imaging import encode_png

    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    with (dest / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "mask", "class", "reason", "predicted"])
        writer.writeheader()
        for name, (image, mask, cls) in images.items():
            (dest / "images" / f"{name}.png").write_bytes(encode_png(image))
            m = mask if mask is not None else np.zeros(image.shape[:2], bool)
            (dest / "masks" / f"{name}.png").write_bytes(encode_png(m.astype(np.uint8) * 255))
            writer.writerow({"file": f"images/{name}.png", "mask": f"masks/{name}.png", "class": cls,
                             "reason": "uncertain", "predicted": "normal"})  # fmt: skip
    return dest


def test_prepare_adds_reviewed_labels_and_old_images_keep_their_split(synth_raw, tmp_path):
    import yaml

    from raydefect.data.importers import import_classic
    from raydefect.data.prepare import prepare_dataset

    ds = tmp_path / "ds"
    prepare_dataset(import_classic(synth_raw["defect_images"], synth_raw["defect_masks"], synth_raw["normal_images"]),
                    ds, workers=1)  # fmt: skip
    before = pq.read_table(ds / "manifest.parquet").to_pylist()
    rng = np.random.default_rng(0)
    mask = np.zeros((64, 64), bool)
    mask[10:20, 5:50] = True
    noise = [rng.integers(0, 255, (64, 64, 3), np.uint8) for _ in range(13)]
    checked = {f"new_{i}": (noise[i], mask, "scratch") if i % 2 else (noise[i], None, "normal") for i in range(12)}
    review = _review_folder(tmp_path / "review", {**checked, "unsure": (noise[12], None, "")})
    result = CliRunner().invoke(cli, ["prepare", "--out", str(ds), "--reviewed", str(review), "--workers", "1"])
    assert result.exit_code == 0, result.output
    after = {r["sha1"]: r for r in pq.read_table(ds / "manifest.parquet").to_pylist()}
    assert all(after[r["sha1"]]["split"] == r["split"] for r in before)  # old images keep their split
    new = [r for r in after.values() if "/review/" in r["original_image"]]
    assert len(new) == 12 and len(after) == len(before) + 12
    assert {r["defect_class"] for r in new} == {"scratch", "normal"}
    assert all(r["mask_fraction"] > 0 for r in new if r["defect_class"] == "scratch")
    assert {r["split"] for r in new} <= {"train", "val", "test"}
    info = yaml.safe_load((ds / "dataset.yaml").read_text())
    assert info["importer"]["name"] == "dataset+reviewed" and info["split"]["kept_previous"] == len(before)
    assert "not reviewed" in (ds / "problems.csv").read_text()
    missing = CliRunner().invoke(cli, ["prepare", "--out", str(tmp_path / "none"), "--reviewed", str(review)])
    assert missing.exit_code == 1 and "manifest.parquet is missing" in missing.output


def test_synth_makes_a_brighter_night(tmp_path):
    from raydefect.data.synth import generate_archive
    from raydefect.imaging import decode_image, image_stats

    base = generate_archive(tmp_path / "a", 6, 32, seed=0, n_corrupt=0)
    shifted = generate_archive(tmp_path / "b", 6, 32, seed=0, n_corrupt=0, brightness=0.3)
    for path in (tmp_path / "a").rglob("*.png"):
        twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
        b0, b1 = image_stats(decode_image(path))[0], image_stats(decode_image(twin))[0]
        assert b1 > b0 + 0.15
    assert base["files"] == shifted["files"] == 6


@pytest.mark.ray
@pytest.mark.slow
def test_nightly_loop_end_to_end(ray_session, synth_raw, make_train_config, tmp_path):
    """Train (the artifact stores the validation distribution), score a calm and a brighter night through Ray, the
    report alarms on the brighter one, review picks from it, the checked labels grow the dataset, and it trains."""
    import csv

    from raydefect.config import load_config
    from raydefect.data.importers import import_classic
    from raydefect.data.prepare import prepare_dataset
    from raydefect.data.synth import generate_archive
    from raydefect.engine.fit import fit
    from raydefect.models.artifact import read_artifact_meta
    from raydefect.pipelines.score import run_score

    ds = tmp_path / "ds"
    prepare_dataset(import_classic(synth_raw["defect_images"], synth_raw["defect_masks"], synth_raw["normal_images"]),
                    ds, workers=1)  # fmt: skip
    fit(make_train_config(ds, tmp_path / "runs"), str(ds), tmp_path / "run", device="cpu")
    model = tmp_path / "run" / "model"
    reference = read_artifact_meta(model).reference
    splits = pq.read_table(ds / "manifest.parquet").column("split").to_pylist()
    assert reference["images"] == splits.count("val")  # defect scores: the validation split
    assert sum(reference["counts"]["brightness"]) == splits.count("val") + splits.count("train")  # what it saw

    cfg = load_config("default", sets=["score.batch_size=8", "score.commit_interval_s=0"])
    scores = str(tmp_path / "scores")
    generate_archive(tmp_path / "calm", 40, 64, seed=1, n_corrupt=1)
    generate_archive(tmp_path / "bright", 40, 64, seed=2, n_corrupt=0, brightness=0.45)
    run_score(str(model), str(tmp_path / "calm"), scores, cfg)
    calm = CliRunner().invoke(cli, ["scores", "report", scores, "--out", str(tmp_path / "r1")])
    assert calm.exit_code == 0, calm.output
    run_score(str(model), str(tmp_path / "bright"), scores, cfg)
    bright = CliRunner().invoke(
        cli, ["scores", "report", scores, "--out", str(tmp_path / "r2"), "--root", str(tmp_path)]
    )
    assert bright.exit_code == EXIT_ALARM and "ALARM: brightness PSI" in bright.output, bright.output
    report = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert [r["images"] for r in report["runs"]] == [40, 40] and report["runs"][0]["errors"] == 1
    assert report["runs"][0]["drift"]["defect_score"]["note"].startswith("too few images")  # a 6-image val split
    assert {r["folder"] for r in report["folders"]["1"]} == {"calm", "bright"}

    review = tmp_path / "review"
    result = CliRunner().invoke(cli, ["review", scores, "--out", str(review), "--n", "8", "--runs", "0"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((review / "labels.csv").open()))
    novel = [r for r in rows if r["reason"] == "novel"]
    assert novel and all("/bright/" in r["path"] for r in novel)
    assert any(r["reason"] == "uncertain" for r in rows)
    with (review / "labels.csv").open("w", newline="") as f:  # the reviewer: everything checked as normal
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "class": "normal"} for r in rows)
    before = pq.read_table(ds / "manifest.parquet").num_rows
    grown = CliRunner().invoke(cli, ["prepare", "--out", str(ds), "--reviewed", str(review), "--workers", "1"])
    assert grown.exit_code == 0, grown.output
    assert pq.read_table(ds / "manifest.parquet").num_rows == before + len(rows)
    again = fit(make_train_config(ds, tmp_path / "runs"), str(ds), tmp_path / "run2", device="cpu")
    assert (tmp_path / "run2" / "model" / "model.yaml").is_file() and again.history


def test_report_and_review_read_scores_and_images_on_s3(s3_server, tmp_path):
    from pathlib import Path

    from raydefect.imaging import encode_png
    from raydefect.scoring.review import pick_review, write_review

    local = write_scores_folder(str(tmp_path / "scores"), [CALM[0], SHIFTED], root="s3://factory/nightly/archive",
                                reference=_reference())  # fmt: skip
    for f in Path(local).rglob("*"):
        if f.is_file():
            s3_server.put_object(Bucket="factory", Key=f"nightly/scores/{f.relative_to(local)}", Body=f.read_bytes())
    png = encode_png(np.full((8, 8, 3), 200, np.uint8))
    for path in read_scores(local, columns=["path"]).column("path").to_pylist():
        s3_server.put_object(Bucket="factory", Key=path.removeprefix("s3://factory/"), Body=png)
    report = build_report("s3://factory/nightly/scores")
    assert report["night"]["alarm"] and report["root"] == "s3://factory/nightly/archive" and report["images"] == 1200
    assert {r["folder"] for r in report["folders"]["1"]} == {"line_0", "line_1", "line_2"}
    picked = pick_review("s3://factory/nightly/scores", n=10, runs=0)
    written = write_review("s3://factory/nightly/scores", picked, tmp_path / "review")
    assert written["images"] == 10 and not written["problems"]
    assert (tmp_path / "review" / "images").is_dir() and len(list((tmp_path / "review" / "images").iterdir())) == 10
    with pytest.raises(DataError, match="no raydefect scores here"):
        build_report("s3://factory/nothing")


def test_report_reads_scores_on_gcs(gcs_server, tmp_path):
    from pathlib import Path

    from raydefect.scoring.review import pick_review
    from raydefect.scoring.storage import Storage

    local = write_scores_folder(str(tmp_path / "scores"), [CALM[0], SHIFTED], root="gs://factory/nightly/archive",
                                reference=_reference())  # fmt: skip
    fs, _ = Storage().resolve("gs://factory/nightly/scores")
    for f in Path(local).rglob("*"):
        if f.is_file():
            with fs.open_output_stream(f"factory/nightly/scores/{f.relative_to(local)}") as out:
                out.write(f.read_bytes())
    report = build_report("gs://factory/nightly/scores")
    assert report["night"]["alarm"] and report["images"] == 1200 and report["root"] == "gs://factory/nightly/archive"
    assert len(pick_review("gs://factory/nightly/scores", n=10, runs=0).rows) == 10
