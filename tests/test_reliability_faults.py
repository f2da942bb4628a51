"""Issue 7 §2: faults. A Ray Train worker killed with SIGKILL mid-epoch, damaged checkpoints, `score` killed with
SIGKILL in a loop of random kill points. Slow (Ray runs, trainings, subprocesses): each test checks several things
on one run."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raydefect.engine.run import list_checkpoints, read_metrics_csv
from raydefect.errors import ArtifactError, TrainingError

# --- checkpoints -----------------------------------------------------------------------------------------------------


def test_validate_checkpoint_names_the_damaged_file(make_tiny_model, tmp_path):
    from raydefect.engine.checkpoint import TrainState, save_checkpoint, validate_checkpoint
    from raydefect.engine.run import set_aside_damaged_checkpoints

    model = make_tiny_model()
    import torch

    opt = torch.optim.AdamW(model.parameters())
    run = tmp_path / "run"
    for epoch in (1, 2, 3):
        save_checkpoint(run / f"checkpoint_epoch_{epoch:04d}", model, opt, TrainState(epoch=epoch))
    weights = run / "checkpoint_epoch_0003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # cut short (a full disk, a copy killed)
    with pytest.raises(ArtifactError, match=r"checkpoint_epoch_0003/model\.safetensors: damaged"):
        validate_checkpoint(weights.parent)
    (run / "checkpoint_epoch_0002" / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match=r"optimizer\.pt: damaged"):
        validate_checkpoint(run / "checkpoint_epoch_0002")
    warnings = set_aside_damaged_checkpoints(run)
    assert len(warnings) == 2 and "checkpoint_epoch_0003" in warnings[0] and "checkpoint_epoch_0002" in warnings[1]
    assert list(list_checkpoints(run)) == [1]
    assert sorted(p.name for p in (run / "damaged").iterdir()) == ["checkpoint_epoch_0002", "checkpoint_epoch_0003"]


@pytest.mark.slow
def test_the_single_process_trainer_falls_back_too(synth_dataset, make_train_config, tmp_path, capsys):
    """`engine.fit` (no Ray) resumes through the same check: a damaged newest checkpoint is set aside."""
    from raydefect.engine.fit import fit

    cfg = make_train_config(synth_dataset.root, tmp_path, "schedule.full_epochs=0")  # epochs 1 | 2
    fit(cfg, synth_dataset, tmp_path / "run", device="cpu", export=False)
    state = list_checkpoints(tmp_path / "run")[2] / "state.json"
    state.write_text(state.read_text()[:40])  # a state file cut short
    more = cfg.replace(**{"schedule.full_epochs": 1})
    result = fit(more, synth_dataset, tmp_path / "run", device="cpu", export=False)
    assert "checkpoint_epoch_0002" in capsys.readouterr().err
    assert result.epochs_run == [2, 3] and [r["epoch"] for r in result.history] == [1, 2, 3]


@pytest.mark.ray
@pytest.mark.slow
def test_training_falls_back_to_the_previous_good_checkpoint(
    ray_session, synth_dataset, make_train_config, tmp_path, monkeypatch, capsys
):
    from raydefect.pipelines.train import FAIL_ONCE_ENV, RAY_SNAPSHOT, run_training

    monkeypatch.setenv(FAIL_ONCE_ENV, f"3:{tmp_path / 'marker'}")  # crash after epoch 3 trained, before reporting
    runs = tmp_path / "runs"
    cfg = make_train_config(synth_dataset.root, runs, "train.max_failures=0", "train.keep_checkpoints=3")
    with pytest.raises(TrainingError, match="last checkpoint is epoch 2"):
        run_training(cfg, name="damaged", show_progress=False, export=False)
    run = runs / "damaged"
    assert (run / RAY_SNAPSHOT).is_file()  # Ray's own bookkeeping lists epoch 2 as the latest
    weights = list_checkpoints(run)[2] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])  # the newest checkpoint is damaged

    monkeypatch.delenv(FAIL_ONCE_ENV)
    result = run_training(cfg, name="damaged", show_progress=False)
    err = capsys.readouterr().err
    assert "checkpoint_epoch_0002" in err and "damaged" in err and "newest good checkpoint" in err
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert result.epochs_run == [2, 3]  # epoch 1 came from its checkpoint, epoch 2 was trained again
    assert (run / "damaged" / "checkpoint_epoch_0002").is_dir()
    assert 2 in list_checkpoints(run) and 3 in list_checkpoints(run)  # a fresh epoch-2 checkpoint replaced it
    assert (run / "model" / "model.safetensors").is_file() and result.export is not None


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_killed_with_sigkill_mid_epoch_resumes_from_its_checkpoint(
    ray_session, synth_dataset, make_train_config, tmp_path, monkeypatch
):
    """The worker process dies with SIGKILL (no exception, no cleanup) while training epoch 2 or 3; Ray Train
    restarts the worker group from the last checkpoint (train.max_failures=1) and the run ends with a model."""
    from raydefect.pipelines.train import PID_FILE_ENV, run_training

    pid_file = tmp_path / "worker.pid"
    monkeypatch.setenv(PID_FILE_ENV, str(pid_file))
    runs = tmp_path / "runs"
    cfg = make_train_config(
        synth_dataset.root,
        runs,
        "train.max_failures=1",
        "schedule.frozen_epochs=1",
        "schedule.partial_epochs=1",
        "schedule.full_epochs=2",
    )
    killed: list[int] = []

    def killer() -> None:  # after epoch 1 is in metrics.csv: the worker is inside epoch 2 (or reporting it)
        deadline = time.monotonic() + 300
        csv_path = runs / "kill" / "metrics.csv"
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, KeyError):
                if pid_file.is_file() and csv_path.is_file() and len(read_metrics_csv(csv_path)) >= 1:
                    pid = int(pid_file.read_text())
                    time.sleep(0.3)
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_training(cfg, name="kill", show_progress=False)
    thread.join(timeout=5)
    assert killed, "the worker was never killed"
    assert int(pid_file.read_text()) != killed[0]  # a new worker process took over
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    attempts = [r["attempt"] for r in result.history]
    assert attempts[0] == 1 and attempts[-1] == 2  # the epochs after the kill were trained by the restarted group
    assert (runs / "kill" / "model" / "model.safetensors").is_file() and result.export is not None


# --- score killed in a loop ------------------------------------------------------------------------------------------

ROUNDS = 8
MID_RUN_KILLS = 4  # kills that must land after some rows were committed and before all were
MAX_ROUNDS = 18  # extra rounds (same cycle of kill points) until MID_RUN_KILLS is reached
N_IMAGES = 40
SETS = ["score.rows_per_file=3", "score.commit_interval_s=0", "score.batch_size=4"]


def _committed_rows(out: Path) -> int:
    total = 0
    for rec in (out / "_commits").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            total += json.loads(rec.read_text())["rows"]
    return total


def _wait_and_kill(proc: subprocess.Popen, out: Path, mode: str, rng: random.Random) -> tuple[bool, int]:
    """SIGKILL `proc`'s process group at a random point of the kind `mode`; returns (killed, rows committed then)
    (killed is False when the run had already finished)."""
    deadline = time.monotonic() + 240
    if mode == "start":  # interpreter start, imports, Ray connect
        time.sleep(rng.uniform(0.2, 3.0))
    elif mode == "listing":  # the run holds OUT/.lock: recovering a dead run's leftovers, listing, first batches
        while not (out / ".lock").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
    else:  # "commit": right after a commit (staged files, an open record); "mid": after a random share of rows
        target = 1 if mode == "commit" else rng.randint(2, N_IMAGES - 10)
        while _committed_rows(out) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed, _committed_rows(out)


def _check_exactly_once(out: Path, files: list[str]) -> None:
    table = pq.read_table(str(out), columns=["path"])
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == len(files), "duplicates or losses"
    assert sorted(paths) == files
    assert not [p for p in (out / "_staging").rglob("*") if p.is_file()]
    records = [json.loads(p.read_text()) for p in (out / "_commits").glob("*.json")]
    assert sum(r["rows"] for r in records) == len(files)  # the records list every committed row once


@pytest.mark.ray
@pytest.mark.slow
def test_score_killed_at_random_points_in_a_loop_ends_with_one_row_per_image(ray_session, tiny_artifact, tmp_path):
    """ROUNDS rounds, each on a fresh output: `raydefect score` in a subprocess is SIGKILLed (with its process
    group) at a random point -- while starting, while it holds the lock (recovery, listing, first batches), right
    after a commit, or after a random number of rows --, every other round a second time while it recovers from the
    first kill; then the run is completed and the Parquet files are read directly: exactly one row per image.
    Commits can land in large steps on a loaded machine (CI once saw one jump from under 19 rows to all 40), so
    rounds go on, up to MAX_ROUNDS, until MID_RUN_KILLS kills have hit a run part-way through its commits."""
    from raydefect.config import load_config
    from raydefect.data.synth import generate_archive
    from raydefect.pipelines.score import run_score

    archive = generate_archive(tmp_path / "archive", N_IMAGES, 32, seed=11, n_corrupt=2)["out"]
    files = sorted(str(p) for p in Path(archive).rglob("*") if p.is_file())
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rng = random.Random(7)
    modes = ["start", "listing", "commit", "mid"]
    log = []

    def mid_run_kills() -> int:
        return sum(0 < n < N_IMAGES for ks in log for _, n in ks if n != "finished")

    for round_ in range(MAX_ROUNDS):
        if round_ >= ROUNDS and mid_run_kills() >= MID_RUN_KILLS:
            break
        out = tmp_path / f"scores-{round_}"
        argv = [
            sys.executable, "-m", "raydefect.cli", "--address", address, "score",
            "--model", str(tiny_artifact), "--input", archive, "--out", str(out),
            *[a for s in SETS for a in ("--set", s)],
        ]  # fmt: skip
        kills = []
        for k in range(1 + round_ % 2):
            mode = modes[round_ % 4] if k == 0 else "listing"  # the second kill lands in the recovery
            proc = subprocess.Popen(
                argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            killed, rows = _wait_and_kill(proc, out, mode, rng)
            kills.append((mode, rows if killed else "finished"))
        report = run_score(str(tiny_artifact), archive, str(out), load_config("default", sets=SETS))
        _check_exactly_once(out, files)
        assert report.scored + report.skipped == N_IMAGES
        log.append(kills)
    print(f"(kill point, rows committed when killed) per round: {log}")
    rows = [n for ks in log for _, n in ks if n != "finished"]
    assert len(rows) >= 10, log  # real kills, not runs that had already ended
    assert any(n == 0 for n in rows) and mid_run_kills() >= MID_RUN_KILLS, log  # the kills hit mid-run
