"""Thresholds in the user's hands: the image thresholds for target recalls, `raydefect thresholds` (a new model with
new thresholds and a new id), and `score --threshold` recorded in the Parquet footer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from raydefect.cli import cli
from raydefect.metrics.thresholds import thresholds_at_recall
from raydefect.models.artifact import VALIDATION_SCORES_FILE, load_artifact, read_artifact_meta, save_artifact
from raydefect.models.retarget import validation_scores_csv

DEFECT = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.05]  # ten defect images
NORMAL = [0.0, 0.02, 0.1, 0.2, 0.35, 0.45]


def test_thresholds_at_recall_take_the_kth_defect_score_with_its_precision():
    scores = DEFECT + NORMAL
    labels = [1] * len(DEFECT) + [0] * len(NORMAL)
    rows = {r["target_recall"]: r for r in thresholds_at_recall(scores, labels)}
    assert rows[0.9]["threshold"] == 0.3  # 9 of 10 defects at >= 0.3
    assert rows[0.9]["recall"] == 0.9 and rows[0.9]["defects_missed"] == 1
    assert rows[0.9]["precision"] == pytest.approx(9 / (9 + 2))  # 0.35 and 0.45 are false alarms
    assert rows[0.9]["false_alarm_rate"] == pytest.approx(2 / 6)
    for target in (0.95, 0.99, 0.999):  # ten defect images cannot tell these apart: all of them
        assert rows[target]["threshold"] == 0.05 and rows[target]["recall"] == 1.0
        assert rows[target]["precision"] == pytest.approx(10 / 14)  # 0.1, 0.2, 0.35, 0.45 above
    assert math.isnan(thresholds_at_recall([0.1, 0.2], [0, 0])[0]["threshold"])


@pytest.fixture()
def model_with_validation(tmp_path, make_tiny_model):
    scores = DEFECT + NORMAL
    labels = [1] * len(DEFECT) + [0] * len(NORMAL)
    out = tmp_path / "model"
    save_artifact(
        make_tiny_model(),
        out,
        thresholds={"image": 0.5, "pixel": 0.5},
        extra={"thresholds_chosen": {"image": "best F1 on 16 validation images", "pixel": "best Dice"}},
        extra_files={VALIDATION_SCORES_FILE: validation_scores_csv(scores, labels)},
    )
    return out


def test_thresholds_command_writes_a_new_model_for_a_target_recall(model_with_validation, tmp_path):
    old = read_artifact_meta(model_with_validation)
    shown = CliRunner().invoke(cli, ["thresholds", str(model_with_validation)])
    assert shown.exit_code == 0, shown.output
    assert "best F1 on 16 validation images" in shown.output and "target recall" in shown.output
    assert (model_with_validation / "model.yaml").read_text() == yaml.safe_dump(old.to_dict(), sort_keys=False)

    out = tmp_path / "strict"
    args = ["thresholds", str(model_with_validation), "--image-recall", "0.9", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    new = load_artifact(out).meta  # loads and verifies: the weights are the same, the id is the new content's
    assert new.thresholds == {"image": 0.3, "pixel": 0.5}
    assert new.model_id != old.model_id and new.model_id == new.computed_model_id()
    assert new.extra["derived_from"] == old.model_id
    assert "recall 0.9" in new.extra["thresholds_chosen"]["image"]
    assert new.extra["thresholds_chosen"]["pixel"] == "best Dice"  # unchanged, still says how
    assert (out / VALIDATION_SCORES_FILE).is_file() and new.model_id in result.output
    assert (out / "model.safetensors").stat().st_mode & 0o777 == (
        model_with_validation / "model.safetensors"
    ).stat().st_mode & 0o777

    # explicit values, in place
    result = CliRunner().invoke(cli, ["thresholds", str(out), "--image", "0.7", "--pixel", "0.25"])
    assert result.exit_code == 0, result.output
    again = read_artifact_meta(out)
    assert again.thresholds == {"image": 0.7, "pixel": 0.25} and again.extra["derived_from"] == new.model_id
    assert again.extra["thresholds_chosen"]["pixel"] == "set by hand to 0.25"


def test_thresholds_command_errors_are_one_line(model_with_validation, tiny_artifact):
    for args, fragment in (
        ([str(tiny_artifact), "--image-recall", "0.99"], "no stored validation scores"),
        ([str(model_with_validation), "--image-recall", "1.5"], "a recall is in (0, 1]"),
        ([str(model_with_validation), "--image", "0.2", "--image-recall", "0.9"], "not both"),
        ([str(model_with_validation), "--pixel", "2"], "[0, 1]"),
    ):
        result = CliRunner().invoke(cli, ["thresholds", *args])
        assert result.exit_code == 1 and fragment in result.output and "Traceback" not in result.output, result.output
    assert np.isclose(read_artifact_meta(model_with_validation).image_threshold, 0.5)  # nothing written


def test_score_threshold_is_one_runs_and_the_footer_records_it(tiny_artifact):
    from raydefect.config import load_config
    from raydefect.errors import ConfigError
    from raydefect.scoring.schema import file_metadata, read_file_metadata

    meta = read_artifact_meta(tiny_artifact)
    raw = file_metadata(meta, "r1", "stat", threshold_override=0.25)
    md = read_file_metadata({k.encode(): v.encode() for k, v in raw.items()})
    assert md["threshold_override"] == {"image": 0.25}
    assert (
        read_file_metadata({k.encode(): v.encode() for k, v in file_metadata(meta, "r", "stat").items()})[
            "threshold_override"
        ]
        == {}
    )
    assert load_config(None, sets=["score.threshold=0.25"]).score.threshold == 0.25
    with pytest.raises(ConfigError, match="score.threshold"):
        load_config(None, sets=["score.threshold=3"])
    help_text = CliRunner().invoke(cli, ["score", "--help"]).output
    assert "--threshold" in help_text
