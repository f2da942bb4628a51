"""`raydefect train` on Ray Train, end to end: two gloo workers, an injected worker failure, crash + resume.

Ray Train runs are expensive (~15 s+ each on 2 cores), so each test checks several things on one run.
"""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from raydefect.cli import cli
from raydefect.engine.run import list_checkpoints, read_metrics_csv
from raydefect.errors import TrainingError
from raydefect.pipelines.train import FAIL_ONCE_ENV, run_training

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_two_workers_survive_a_failure_and_write_the_run_folder(
    ray_session, synth_dataset, make_train_config, tmp_path, monkeypatch
):
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_ONCE_ENV, f"2:{marker}")
    runs = tmp_path / "runs"
    cfg = make_train_config(synth_dataset.root, runs, "resources.num_workers=2", "train.max_failures=1")
    result = run_training(cfg, name="ddp", show_progress=False)

    # the failure happened once, after epoch 2 trained and before it was reported; the retry redid epoch 2 only
    assert marker.is_file()
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert [r["attempt"] for r in result.history] == [1, 2, 2]
    run = runs / "ddp"
    assert [r["epoch"] for r in read_metrics_csv(run / "metrics.csv")] == [1, 2, 3]
    n_train = len(synth_dataset.frame("train"))
    assert all(r["train_images"] == 2 * (n_train // 2) for r in result.history)  # two equal shards

    # the run folder: config, checkpoints (best K + last), plots, model artifact, test metrics
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["resources"]["num_workers"] == 2 and saved["train"]["name"] == "ddp"
    kept = list_checkpoints(run)
    assert 3 in kept and len(kept) <= cfg.train.keep_checkpoints + 1 and result.best_epoch in kept
    assert (run / "plots" / "training_curves.png").is_file()
    from raydefect.models.artifact import load_artifact

    loaded = load_artifact(run / "model")
    export = result.export
    assert export is not None and loaded.meta.model_id == export.model_id
    assert dict(loaded.meta.thresholds) == pytest.approx(export.thresholds)
    assert loaded.meta.metrics["epoch"] == result.best_epoch
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["metrics"]["test_f1"] == pytest.approx(loaded.meta.metrics["test_f1"], nan_ok=True)

    # validation was sharded over the two ranks and all-gathered: the metrics equal a single-process evaluation
    from raydefect.engine.checkpoint import load_weights
    from raydefect.engine.data import SampleSource, iterate_batches, manifest_rows
    from raydefect.engine.validation import evaluate
    from raydefect.metrics import validation_summary
    from raydefect.models.model import DefectModel

    model = DefectModel(cfg.model, cfg.data.image_size, synth_dataset.class_names, load_weights=False)
    load_weights(kept[3], model)
    rows = manifest_rows(synth_dataset, "val")
    source = SampleSource.for_config(cfg, train=False)
    ev = evaluate(
        model,
        iterate_batches(source, rows, range(len(rows)), 4, threads=0),
        synth_dataset.class_names,
        device=__import__("torch").device("cpu"),
    )
    single = validation_summary(ev.image, ev.pixel)
    reported = result.history[2]
    for key in ("val_ap", "val_auroc", "val_f1", "val_iou", "val_dice", "val_pixel_ap"):
        assert reported[key] == pytest.approx(single[key], abs=1e-5, nan_ok=True), key


def test_rerunning_a_crashed_run_resumes_from_its_last_checkpoint(
    ray_session, synth_dataset, make_train_config, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(FAIL_ONCE_ENV, f"2:{tmp_path / 'marker'}")
    cfg = make_train_config(synth_dataset.root, None, "train.max_failures=0")  # runs_dir: ./runs
    with pytest.raises(TrainingError, match="last checkpoint is epoch 1: re-run the same command"):
        run_training(cfg, name="crash", show_progress=False, export=False)
    before = read_metrics_csv(tmp_path / "runs" / "crash" / "metrics.csv")
    assert [r["epoch"] for r in before] == [1]

    # the user re-runs with just the name: the config comes from the run folder, training goes on at epoch 2
    monkeypatch.delenv(FAIL_ONCE_ENV)
    out = CliRunner().invoke(cli, ["train", "--name", "crash"])
    assert out.exit_code == 0, out.output
    assert "resuming crash after epoch 1" in out.output
    table = [line.split() for line in out.output.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in table] == ["2", "3"]  # the console table: epochs of this call only
    assert "best epoch" in out.output and "model:" in out.output
    after = read_metrics_csv(tmp_path / "runs" / "crash" / "metrics.csv")
    assert [r["epoch"] for r in after] == [1, 2, 3]
    assert [r["attempt"] for r in after] == [1, 2, 2]
    assert after[0]["seconds"] == before[0]["seconds"]  # epoch 1 was not trained again
    assert (tmp_path / "runs" / "crash" / "model" / "model.yaml").is_file()


def test_gpu_workers_with_one_cpu_on_a_cpu_rich_cluster_get_a_hint():
    from raydefect.config import load_config
    from raydefect.pipelines.train import gpu_loader_hint

    default = load_config("default")
    hint = gpu_loader_hint(default, cpus=16, gpus=1)
    assert hint and "reserves 1 CPU(s)" in hint and "16 per GPU" in hint and hint.endswith("--cpus-per-worker 15")
    assert gpu_loader_hint(default, cpus=64, gpus=8).endswith(
        "has 8 per GPU; the loader will likely starve the GPU: pass --cpus-per-worker 7"
    )
    assert gpu_loader_hint(default, cpus=4, gpus=1) is None  # few CPUs to give
    assert gpu_loader_hint(load_config("default", sets=["resources.cpus_per_worker=8"]), cpus=16, gpus=1) is None
    assert gpu_loader_hint(load_config("default", sets=["data.loader_processes=3"]), cpus=16, gpus=1) is None
