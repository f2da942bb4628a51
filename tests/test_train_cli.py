"""`raydefect train` options and its user errors: each bad input fails before Ray starts, in one line, exit 1."""

from __future__ import annotations

import shutil

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from raydefect.cli import cli
from raydefect.config import load_config
from raydefect.engine.run import check_resumable, write_run_config
from raydefect.errors import ConfigError

TINY = ["--backbone", "test-tiny", "--image-size", "32", "--set", "model.pretrained=false"]


def _invoke(args, tmp_path):
    return CliRunner().invoke(cli, ["train", *args, "--set", f"train.runs_dir={tmp_path / 'runs'}"])


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _filtered_dataset(synth_dataset, tmp_path, keep):
    out = tmp_path / "ds"
    shutil.copytree(synth_dataset.root, out)
    table = pq.read_table(out / "manifest.parquet")
    pq.write_table(table.filter(keep(table)), out / "manifest.parquet")
    return out


@pytest.fixture(autouse=True)
def no_ray_start(monkeypatch):
    """These errors must come before Ray: make starting it fail loudly."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("Ray was started for an input that is wrong before training")

    monkeypatch.setattr("raydefect.pipelines.cluster.connect", refuse)


def test_train_help_lists_the_options():
    out = CliRunner().invoke(cli, ["train", "--help"])
    assert out.exit_code == 0
    for option in (
        "--data",
        "--name",
        "--backbone",
        "--epochs",
        "--num-workers",
        "--gpus-per-worker",
        "--freeze-backbone",
        "--batch-size",
        "--lr",
        "--image-size",
        "--config",
        "--set",
    ):
        assert option in out.output


def test_unknown_backbone(synth_dataset, tmp_path):
    line = _error_line(_invoke(["--data", str(synth_dataset.root), "--backbone", "dinov3_vitb14"], tmp_path))
    assert "dinov3_vitb16" in line and "dinov2_vitb14" in line


def test_missing_weights_file(synth_dataset, tmp_path):
    args = ["--data", str(synth_dataset.root), "--backbone", "dinov3-s", "--image-size", "32"]
    line = _error_line(_invoke([*args, "--set", f"model.weights={tmp_path / 'nope.pth'}"], tmp_path))
    assert "nope.pth" in line and "file not found" in line


def test_pretrained_weights_offline(synth_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    line = _error_line(
        _invoke(["--data", str(synth_dataset.root), "--backbone", "dinov3-s", "--image-size", "32"], tmp_path)
    )
    assert "HF_HUB_OFFLINE" in line and "model.pretrained=false" in line


def test_default_config_without_internet_fails_fast_before_ray(synth_dataset, tmp_path, monkeypatch):
    """The default config (pretrained DINOv3) with no internet: one whole error line in seconds, Ray never started
    (`no_ray_start`); the hub client's retries inside the workers took minutes and the message was cut mid-word."""
    import time

    import huggingface_hub.constants as hf_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    line = _error_line(_invoke(["--data", str(synth_dataset.root), "--image-size", "32"], tmp_path))
    assert time.perf_counter() - start < 10
    assert "dinov3-s" in line and "cannot be reached" in line
    assert line.endswith("--set model.pretrained=false")


def test_missing_and_empty_dataset(synth_dataset, tmp_path):
    line = _error_line(_invoke([*TINY], tmp_path))
    assert "--data" in line
    line = _error_line(_invoke(["--data", str(tmp_path / "nothing"), *TINY], tmp_path))
    assert "raydefect prepare" in line
    empty = _filtered_dataset(synth_dataset, tmp_path, lambda t: pc.equal(t.column("split"), "nope"))
    line = _error_line(_invoke(["--data", str(empty), *TINY], tmp_path))
    assert "'train' split is empty" in line and "raydefect prepare" in line


def test_dataset_without_val_split(synth_dataset, tmp_path):
    no_val = _filtered_dataset(synth_dataset, tmp_path, lambda t: pc.not_equal(t.column("split"), "val"))
    line = _error_line(_invoke(["--data", str(no_val), *TINY], tmp_path))
    assert "'val' split is empty" in line and "--split" in line


def test_unwritable_runs_dir(synth_dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(
        cli, ["train", "--data", str(synth_dataset.root), *TINY, "--set", f"train.runs_dir={blocker / 'runs'}"]
    )
    line = _error_line(result)
    assert "not writable" in line and "train.runs_dir" in line


def test_bad_options_are_usage_errors(synth_dataset, tmp_path):
    for bad in (["--epochs", "2,2"], ["--epochs", "x"], ["--num-workers", "0"], ["--lr", "abc"]):
        result = _invoke(["--data", str(synth_dataset.root), *TINY, *bad], tmp_path)
        assert result.exit_code == 2, (bad, result.output)
    line = _error_line(_invoke(["--data", str(synth_dataset.root), *TINY, "--lr", "3"], tmp_path))
    assert "optim.lr" in line


def test_reusing_a_name_with_another_model_is_refused(synth_dataset, tmp_path):
    runs = tmp_path / "runs"
    old = load_config(None, sets=["model.backbone=test-tiny", "model.pretrained=false", "data.image_size=32"])
    write_run_config(runs / "exp", old.replace(**{"train.name": "exp"}))
    assert check_resumable(runs / "exp", old.replace(**{"schedule.full_epochs": 9, "resources.num_workers": 2}))
    with pytest.raises(ConfigError, match="model.decoder_dim"):
        check_resumable(runs / "exp", old.replace(**{"model.decoder_dim": 64}))
    args = ["--data", str(synth_dataset.root), "--name", "exp", "--backbone", "test-tiny-v2"]
    line = _error_line(_invoke(args, tmp_path))
    assert "already exists with a different config" in line and "model.backbone" in line and "--name" in line


def test_epochs_and_freeze_backbone_shape_the_schedule(tmp_path, monkeypatch):
    """--epochs N spreads over the stages; A,B,C sets each; --freeze-backbone keeps stage 1 only."""
    seen = {}

    def fake_train(cfg, address=None):
        seen["cfg"] = cfg
        raise ConfigError("stop here")

    monkeypatch.setattr("raydefect.pipelines.train.train", fake_train)
    cases = {
        ("--epochs", "4"): (1, 1, 2),
        ("--epochs", "0,1,5"): (0, 1, 5),
        ("--freeze-backbone", "--set", "model.pretrained=true"): (2, 0, 0),
        ("--freeze-backbone", "--epochs", "3", "--set", "model.pretrained=true"): (3, 0, 0),
    }
    for args, stages in cases.items():
        _invoke(["--data", str(tmp_path), *TINY, *args], tmp_path)
        s = seen["cfg"].schedule
        assert (s.frozen_epochs, s.partial_epochs, s.full_epochs) == stages, args
    _invoke(["--data", "rel/ds", *TINY, "--num-workers", "3", "--batch-size", "4", "--lr", "1e-3"], tmp_path)
    cfg = seen["cfg"]
    assert cfg.data.dataset.endswith("/rel/ds") and cfg.data.dataset.startswith("/")  # absolute: cwd-independent
    assert (cfg.resources.num_workers, cfg.train.batch_size, cfg.optim.lr) == (3, 4, 1e-3)


def test_freeze_backbone_refuses_a_random_init_backbone(tmp_path, no_ray_start):
    line = _error_line(_invoke(["--data", str(tmp_path), *TINY, "--freeze-backbone"], tmp_path))
    assert "--freeze-backbone" in line and "random-init" in line and "model.pretrained=true" in line


def test_shipped_demo_config_trains_tiny_from_scratch():
    cfg = load_config("demo")
    assert cfg.model.backbone == "tiny" and cfg.model.pretrained is False and cfg.data.image_size == 64
    assert cfg.schedule.total_epochs <= 12 and cfg.train.name == "demo"
