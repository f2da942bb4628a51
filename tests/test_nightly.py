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
from raydefect.metrics.drift import PSI_ALARM, build_reference, histogram, level, psi
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
    for f in (tmp_path / "scores1").rglob("*.parquet"):  # as schema 1 wrote them: no brightness/contrast columns
        t = pq.read_table(f)
        pq.write_table(t.drop_columns(["brightness", "contrast"]).replace_schema_metadata(t.schema.metadata), f)
    report = build_report(out)
    drift = report["runs"][-1]["drift"]
    assert drift["brightness"]["note"].startswith("not recorded") and drift["defect_score"]["level"] == "n/a"
    assert not report["night"]["alarm"] and report["reference"]["source"] == "none"
    current = read_scores(out)
    assert current.column("brightness").null_count == current.num_rows == 2400
    assert summarize(out)["images"] == 2400


def test_report_of_an_empty_or_missing_folder_is_one_line(folder, tmp_path):
    for target in (tmp_path / "nothing", folder([])):
        result = CliRunner().invoke(cli, ["scores", "report", str(target), "--out", str(tmp_path / "r")])
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
