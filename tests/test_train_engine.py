"""The training engine without Ray: it learns, exports a working artifact, resumes exactly, stops early."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from raydefect.engine.checkpoint import TrainState, load_optimizer_state, read_state, save_checkpoint
from raydefect.engine.fit import fit
from raydefect.engine.loop import Trainer, check_metric, train_one_epoch
from raydefect.engine.run import CONSOLE_COLUMNS, console_header, console_row, list_checkpoints, read_metrics_csv
from raydefect.errors import ConfigError
from raydefect.inference.device import cpu_has_native_bf16
from raydefect.paths import new_file_mode

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_fit_learns_and_exports_a_working_model(synth_dataset, make_train_config, tmp_path):
    cfg = make_train_config(
        synth_dataset.root, tmp_path, "schedule.frozen_epochs=1", "schedule.partial_epochs=1", "schedule.full_epochs=10"
    )
    result = fit(cfg, synth_dataset, tmp_path / "run", device="cpu")
    history = result.history
    assert [r["epoch"] for r in history] == list(range(1, 13)) and result.epochs_run == list(range(1, 13))
    assert [r["stage"] for r in history[:3]] == [1, 2, 3]
    losses = [r["train_loss"] for r in history]
    assert np.mean(losses[-3:]) < 0.85 * losses[0]  # the loss falls
    best = result.best_metrics
    assert best["val_iou"] > 0.2  # an empty mask scores IoU 0 on defect images
    assert best["val_score"] == max(r["val_score"] for r in history)

    run = tmp_path / "run"
    csv_rows = read_metrics_csv(run / "metrics.csv")
    assert [r["epoch"] for r in csv_rows] == list(range(1, 13))
    for key in ("lr", "train_loss", "val_f1", "val_auroc", "val_iou", "val_dice", "seconds", "images_per_s"):
        assert key in csv_rows[0]
    assert (run / "config.yaml").is_file() and (run / "plots" / "training_curves.png").is_file()
    assert (run / "plots" / "test" / "pr_curve.png").is_file()
    assert len(list_checkpoints(run)) <= cfg.train.keep_checkpoints + 1 and result.best_epoch in list_checkpoints(run)

    from raydefect.inference import Predictor, Preprocessor
    from raydefect.models.artifact import load_artifact

    export = result.export
    loaded = load_artifact(run / "model")
    assert loaded.meta.model_id == export.model_id
    # the validation scores the image threshold was chosen on, and how each threshold was chosen
    from raydefect.models.retarget import read_validation_scores

    val_scores, val_labels = read_validation_scores(run / "model")
    assert len(val_scores) == len(synth_dataset.frame("val")) and val_labels.sum() > 0
    assert "best F1" in loaded.meta.extra["thresholds_chosen"]["image"]
    assert "pixel-probability" in loaded.meta.extra["thresholds_chosen"]["pixel"]
    assert dict(loaded.meta.thresholds) == pytest.approx(export.thresholds)
    assert loaded.meta.metrics["test_f1"] == pytest.approx(export.test_metrics["test_f1"])
    assert loaded.meta.metrics["val_iou"] == pytest.approx(export.val_metrics["val_iou"])
    test_json = json.loads((run / "test_metrics.json").read_text())
    assert test_json["model_id"] == export.model_id and test_json["thresholds"] == pytest.approx(export.thresholds)
    assert test_json["image"]["n_images"] == len(synth_dataset.frame("test"))
    # the exported weights are the best checkpoint's, and predict like the training model did
    from raydefect.imaging import decode_image

    rows = synth_dataset.frame("val")
    pre = Preprocessor(loaded.meta)
    batch = np.stack([pre(decode_image(p)) for p in rows["image"]])
    scores = Predictor(loaded, device="cpu").predict(batch)["defect_score"]
    assert np.all((scores >= 0) & (scores <= 1))
    val_from_meta = loaded.meta.metrics["val_ap"]
    from raydefect.metrics import image_metrics

    assert image_metrics(scores, rows["label"].to_numpy()).ap == pytest.approx(val_from_meta, abs=1e-6)


@pytest.mark.slow
def test_resume_continues_exactly_where_it_stopped(synth_dataset, make_train_config, tmp_path):
    cfg = make_train_config(synth_dataset.root, tmp_path, "schedule.full_epochs=2")  # epochs 1 | 2 | 3, 4
    straight = fit(cfg, synth_dataset, tmp_path / "straight", device="cpu", export=False)

    class Crash(Exception):
        pass

    def crash_after_3(metrics):
        if metrics["epoch"] == 3:
            raise Crash

    with pytest.raises(Crash):
        fit(cfg, synth_dataset, tmp_path / "resumed", device="cpu", export=False, on_epoch=crash_after_3)
    assert max(list_checkpoints(tmp_path / "resumed")) == 3
    resumed = fit(cfg, synth_dataset, tmp_path / "resumed", device="cpu", export=False)
    assert resumed.epochs_run == [4]
    assert [r["attempt"] for r in resumed.history] == [1, 1, 1, 2]
    for a, b in zip(straight.history, resumed.history, strict=True):
        for key in ("train_loss", "val_loss", "val_score", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["epoch"], key)
    from safetensors.torch import load_file

    last_a = load_file(str(list_checkpoints(tmp_path / "straight")[4] / "model.safetensors"))
    last_b = load_file(str(list_checkpoints(tmp_path / "resumed")[4] / "model.safetensors"))
    assert all(torch.allclose(last_a[k], last_b[k], rtol=1e-4, atol=1e-6) for k in last_a)
    rows = read_metrics_csv(tmp_path / "resumed" / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


def test_early_stopping_ends_a_run_without_improvement(synth_dataset, make_train_config, tmp_path):
    cfg = make_train_config(
        synth_dataset.root,
        tmp_path,
        "optim.lr=1e-9",
        "optim.head_lr=1e-9",
        "schedule.frozen_epochs=4",
        "schedule.partial_epochs=0",
        "schedule.full_epochs=0",
        "schedule.patience=2",
        "schedule.metric=val_loss",
        "schedule.mode=min",
    )
    result = fit(cfg, synth_dataset, tmp_path / "run", device="cpu", export=False)
    # the first epoch is the best; epoch 2 may still shave a hair off val_loss, then nothing moves: stop at <= 3
    assert result.stopped_early and len(result.history) <= 3 and result.best_epoch in (1, 2)
    assert read_state(list_checkpoints(tmp_path / "run")[len(result.history)]).stopped
    again = fit(cfg, synth_dataset, tmp_path / "run", device="cpu", export=False)
    assert again.epochs_run == []  # a stopped run stays stopped


def test_checkpoint_state_round_trips(make_tiny_model, tmp_path):
    model = make_tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).class_logits.sum().backward()
    opt.step()
    history = [{"epoch": 1, "x": math.nan}]
    state = TrainState(epoch=3, stage=2, steps_per_epoch=5, best=0.5, best_epoch=2, history=history)
    save_checkpoint(tmp_path / "ck", model, opt, state)
    assert (tmp_path / "ck" / "model.safetensors").stat().st_mode & 0o777 == new_file_mode()  # not 0600
    back = read_state(tmp_path / "ck")
    assert back.epoch == 3 and back.best == 0.5 and math.isnan(back.history[0]["x"])
    assert "NaN" not in (tmp_path / "ck" / "state.json").read_text()  # strict JSON
    opt_state = load_optimizer_state(tmp_path / "ck")
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(opt_state)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_gradient_accumulation_steps_once_per_group(make_tiny_model):
    from raydefect.models.losses import DefectLoss

    model = make_tiny_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batch = {
        "image": torch.randn(2, 3, 32, 32),
        "mask": torch.zeros(2, 1, 32, 32),
        "mask_valid": torch.ones(2, dtype=torch.bool),
        "label": torch.zeros(2, dtype=torch.long),
        "class_id": torch.zeros(2, dtype=torch.long),
    }
    out = train_one_epoch(
        model, DefectLoss(), opt, sch, [batch] * 5, 5, device=torch.device("cpu"), grad_accum=2, grad_clip=1.0
    )
    assert out["steps"] == 3 and out["images"] == 10 and sch.last_epoch == 3


def test_unknown_metric_is_a_config_error(synth_dataset, make_train_config):
    cfg = make_train_config(synth_dataset.root, None, "schedule.metric=val_f2")
    with pytest.raises(ConfigError, match="schedule.metric.*val_f1"):
        check_metric(cfg, synth_dataset.class_names)
    per_class = make_train_config(synth_dataset.root, None, "schedule.metric=val_acc_crack")
    check_metric(per_class, synth_dataset.class_names)


def test_trainer_reports_every_console_column(synth_dataset, make_train_config, tmp_path):
    from raydefect.engine.fit import training_rows

    cfg = make_train_config(synth_dataset.root)
    train, val, counts = training_rows(cfg, synth_dataset)
    trainer = Trainer(cfg, synth_dataset.class_names, counts, device="cpu")
    trainer.progress_file = tmp_path / ".progress.json"  # rank 0 under Ray Train: the driver's bar reads it
    metrics = trainer.run_epoch(1, train[:16], val)
    assert json.loads(trainer.progress_file.read_text()) == {"epoch": 1, "images": 16, "total": 16}
    assert {key for key, _title, _fmt in CONSOLE_COLUMNS} <= set(metrics)
    assert metrics["train_images"] == 16 and metrics["attempt"] == 1
    row = console_row(metrics)
    assert len(row) == len(console_header()) and row.split()[0] == "1"
    yaml.safe_dump(metrics)  # plain Python numbers only


def test_precision_is_fp32_on_cpu_unless_asked_and_bf16_autocast_on_cuda(capsys, monkeypatch):
    from raydefect.engine import loop
    from raydefect.engine.loop import autocast_dtype, eval_autocast_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    assert autocast_dtype("bf16", cpu) is None
    assert "this cpu has none: training in fp32" in capsys.readouterr().err
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and autocast_dtype("auto", cpu) is None
    assert eval_autocast_dtype("bf16", cpu) is None  # validation matches predict / evaluate's fp32 on a CPU
    assert autocast_dtype("auto", cuda) is torch.bfloat16 and eval_autocast_dtype("auto", cuda) is torch.bfloat16
    assert autocast_dtype("fp32", cuda) is None


@pytest.mark.gpu
def test_cuda_epoch_in_bf16(synth_dataset, make_train_config):
    from raydefect.engine.fit import training_rows

    cfg = make_train_config(synth_dataset.root)
    train, val, counts = training_rows(cfg, synth_dataset)
    trainer = Trainer(cfg, synth_dataset.class_names, counts, device="cuda")
    assert trainer.amp_dtype is torch.bfloat16
    metrics = trainer.run_epoch(1, train, val)
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no bf16 instructions (avx512_bf16 / amx_bf16)")
def test_a_cnn_trains_channels_last_in_bf16_on_a_cpu_and_validates_in_fp32(synth_dataset, make_train_config, tmp_path):
    from raydefect.engine.checkpoint import load_weights, save_checkpoint
    from raydefect.engine.fit import training_rows

    cfg = make_train_config(
        synth_dataset.root, None, "model.backbone=test-tiny-cnn", "model.weights=null", "model.pretrained=false",
        "train.precision=bf16",
    )  # fmt: skip
    train, val, counts = training_rows(cfg, synth_dataset)
    trainer = Trainer(cfg, synth_dataset.class_names, counts, device="cpu")
    assert trainer.amp_dtype is torch.bfloat16 and trainer.eval_amp_dtype is None and trainer.channels_last
    stem = next(p for p in trainer.model.backbone.parameters() if p.dim() == 4)
    assert stem.is_contiguous(memory_format=torch.channels_last)
    before = stem.detach().clone()
    metrics = trainer.run_epoch(1, train, val)
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
    assert not torch.equal(before, stem.detach())
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast: fp32 master weights
    # the checkpoint holds plain contiguous tensors: a fresh (contiguous) model loads them exactly
    save_checkpoint(tmp_path / "ckpt", trainer.model, None, trainer.state)
    fresh = Trainer(cfg, synth_dataset.class_names, counts, device="cpu").model
    load_weights(tmp_path / "ckpt", fresh)
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trainer.model.state_dict().values(), strict=True)
    )


def test_a_resumed_run_takes_its_weights_from_the_checkpoint(synth_dataset, make_train_config, tmp_path):
    from raydefect.engine.run import check_resumable

    cfg = make_train_config(
        synth_dataset.root, tmp_path, "schedule.frozen_epochs=2", "schedule.partial_epochs=0", "schedule.full_epochs=0"
    )

    def crash(metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, synth_dataset, tmp_path / "run", device="cpu", export=False, on_epoch=crash)
    # now the same run asks for pretrained weights that cannot be had (test-tiny has none): resuming must not care
    again = cfg.replace(**{"model.pretrained": True})
    assert check_resumable(tmp_path / "run", again)
    assert fit(again, synth_dataset, tmp_path / "run", device="cpu", export=False).epochs_run == [2]
