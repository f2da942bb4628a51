"""`raydefect tune` end to end on Ray (CPU, synthetic data, tiny backbones) and `raydefect train --best`.

One study (3 trials, one of which fails by an injected error) is shared by several tests; the resume test runs its
own study in a subprocess that is killed after the first trial finished.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from raydefect.cli import cli
from raydefect.config import Config, load_config
from raydefect.engine.run import read_metrics_csv
from raydefect.pipelines.tune import FAIL_TRIALS_ENV, tune_study

pytestmark = [pytest.mark.ray, pytest.mark.slow]

#: seed 0 samples backbones test-tiny, test-tiny, tiny from configs/tune-demo.yaml; trials with tiny are made to fail
# the demo space searches random-init backbones (tiny, test-tiny): no weights file
STUDY_SETS = (
    "tune.space=tune-demo",
    "tune.num_samples=3",
    "tune.epochs=2",
    "tune.subset=0.5",
    "tune.seed=0",
    "model.pretrained=false",
    "model.weights=null",
)


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def study(ray_session, synth_dataset, make_train_config, tmp_path_factory):
    runs = tmp_path_factory.mktemp("tune") / "runs"
    cfg = make_train_config(synth_dataset.root, runs, *STUDY_SETS, "tune.name=shared", "tune.max_concurrent=2")
    os.environ[FAIL_TRIALS_ENV] = "model.backbone=tiny"
    try:
        result = tune_study(cfg)
    finally:
        del os.environ[FAIL_TRIALS_ENV]
    return result


def test_study_folder_trials_csv_and_best_yaml(study):
    root = study.study.root
    assert root.name == "tune-shared"
    for name in ("study.yaml", "trials.csv", "best.yaml", "tune", "trials"):
        assert (root / name).exists(), name
    rows = _rows(root / "trials.csv")
    assert len(rows) == 3
    assert list(rows[0]) == [
        "trial_id", "model.backbone", "optim.lr", "optim.weight_decay",
        "val_score_best", "val_score_last", "epochs", "status", "error", "duration_s",
    ]  # fmt: skip
    failed = [r for r in rows if r["status"] == "ERROR"]
    ok = [r for r in rows if r["status"] != "ERROR"]
    # the failing trial raised in its worker after epoch 1; the study went on
    assert [r["model.backbone"] for r in failed] == ["tiny"]
    assert "RuntimeError" in failed[0]["error"] and "injected failure at epoch 1" in failed[0]["error"]
    assert len(ok) == 2 and all(r["model.backbone"] == "test-tiny" for r in ok)
    for r in ok:
        assert r["status"] in ("TERMINATED", "STOPPED-EARLY")
        assert 1 <= int(r["epochs"]) <= 2 and float(r["duration_s"]) > 0 and r["val_score_best"] != ""
        lo, hi = 5e-4, 5e-3  # tune-demo's range for test-tiny (tiny has its own)
        assert lo <= float(r["optim.lr"]) <= hi

    # every trial trained at the study's fidelity: half the training split, 2 epochs; checkpoints ranked by the metric
    trial = yaml.safe_load((root / "trials" / ok[0]["trial_id"] / "config.yaml").read_text())
    assert (
        trial["data"]["subset"] == 0.5
        and trial["schedule"]["full_epochs"]
        + trial["schedule"]["frozen_epochs"]
        + (trial["schedule"]["partial_epochs"])
        == 2
    )
    metrics = read_metrics_csv(root / "trials" / ok[0]["trial_id"] / "metrics.csv")
    assert [m["epoch"] for m in metrics] == list(range(1, int(ok[0]["epochs"]) + 1))

    # best.yaml: a complete config at full fidelity with the best trial's params
    best = load_config(root / "best.yaml")
    assert isinstance(best, Config)
    assert best.data.subset == 1.0 and best.schedule.total_epochs == 3 and best.train.name == "shared-best"
    winner = study.best
    assert winner is not None and winner.status != "ERROR"
    assert best.optim.lr == pytest.approx(winner.params["optim.lr"]) and best.model.backbone == "test-tiny"
    assert f"trial {winner.trial_id}" in (root / "best.yaml").read_text().splitlines()[0]
    for plot in ("optimisation_history.png", "param_importance.png", "metric_vs_lr.png"):
        assert (root / "plots" / plot).stat().st_size > 5000
    assert not study.interrupted and study.concurrency == 2

    # no trial left its Ray Train workers' resources reserved (ASHA-stopped trials are killed with their controller)
    import ray

    table = ray.util.placement_group_table()
    for folder in (root / "trials").iterdir():
        pg_file = folder / "placement_group"
        if pg_file.is_file():
            assert table.get(pg_file.read_text().strip(), {}).get("state", "REMOVED") == "REMOVED", folder.name


def test_train_best_trains_the_winner_and_exports_a_model(study, monkeypatch):
    runs = study.study.root.parent
    monkeypatch.chdir(runs.parent)
    out = CliRunner().invoke(cli, ["train", "--best", "--set", f"train.runs_dir={runs}"])  # the latest study
    assert out.exit_code == 0, out.output
    assert f"training the best config of study tune-shared: {study.study.root / 'best.yaml'}" in out.output
    model = runs / "shared-best" / "model"
    assert (model / "model.yaml").is_file()
    saved = yaml.safe_load((runs / "shared-best" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == pytest.approx(study.best.params["optim.lr"]) and saved["data"]["subset"] == 1.0
    assert [r["epoch"] for r in read_metrics_csv(runs / "shared-best" / "metrics.csv")] == [1, 2, 3]


def test_resume_keeps_finished_trials(ray_session, synth_dataset, make_train_config, tmp_path):
    """Kill a study's driver (SIGKILL, whole process group) once a trial has finished; --resume finishes the rest
    and keeps the finished trial as it was (not trained again)."""
    runs = tmp_path / "runs"
    from raydefect.config import save_config

    cfg = make_train_config(synth_dataset.root, runs, *STUDY_SETS, "tune.seed=3", "tune.num_samples=2")
    base = save_config(cfg, tmp_path / "b.yaml")
    # seed 3: both trials are test-tiny; one at a time, so the kill comes while trial 2 runs
    args = [sys.executable, "-m", "raydefect.cli", "tune", "--config", str(base), "--name", "killed",
            "--max-concurrent", "1"]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("RAY_ADDRESS", None)
    trials_csv = runs / "tune-killed" / "trials.csv"
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finished: list[dict] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if trials_csv.is_file():
                finished = [r for r in _rows(trials_csv) if r["status"] in ("TERMINATED", "STOPPED-EARLY")]
                if finished:
                    break
            time.sleep(0.5)
        time.sleep(3)  # let Tune snapshot its state (tune_study sets a 2 s period); a later kill is handled too
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert finished, "no trial finished before the deadline"
    assert proc.returncode == -signal.SIGKILL  # the study was killed, it did not end by itself
    first = finished[0]["trial_id"]
    before = read_metrics_csv(runs / "tune-killed" / "trials" / first / "metrics.csv")

    out = CliRunner().invoke(cli, ["tune", "--resume", "--name", "killed", "--set", f"train.runs_dir={runs}"])
    assert out.exit_code == 0, out.output
    assert "resuming study killed" in out.output
    rows = _rows(trials_csv)
    assert len(rows) == 2 and all(r["status"] in ("TERMINATED", "STOPPED-EARLY") for r in rows), rows
    kept = next(r for r in rows if r["trial_id"] == first)
    assert kept["val_score_best"] == finished[0]["val_score_best"] and kept["epochs"] == finished[0]["epochs"]
    after = read_metrics_csv(runs / "tune-killed" / "trials" / first / "metrics.csv")
    assert [r["seconds"] for r in after] == [r["seconds"] for r in before]  # not trained again
    assert load_config(runs / "tune-killed" / "best.yaml").train.name == "killed-best"
