"""What runs inside each Ray Train worker: `train_fn_per_worker` builds the plain-PyTorch `engine.loop.Trainer` on
its data shard, trains epoch by epoch, and reports every epoch with a checkpoint written by rank 0 through
``ray.train.report``. The driver (`raydefect.pipelines.train`) starts the workers and reads what they report."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import (
    Checkpoint,
    CheckpointUploadMode,
)

from raydefect.config import Config
from raydefect.engine.run import (
    PROGRESS_FILE,
    checkpoint_name,
)

#: Test hook: "EPOCH:MARKER_FILE" makes rank 0 raise once, after training epoch EPOCH and before reporting it, and
#: create MARKER_FILE so the retry passes (the driver reads it and hands it to the workers).
#: Test hook: "EPOCH:MARKER_FILE" makes rank 0 raise once, after training epoch EPOCH and before reporting it, and
#: create MARKER_FILE so the retry passes (the driver reads it and hands it to the workers).
FAIL_ONCE_ENV = "RAYDEFECT_TEST_FAIL_ONCE"


#: Test hook: a file path; rank 0 writes its pid there when it starts (a test kills it with SIGKILL mid-epoch).
PID_FILE_ENV = "RAYDEFECT_TEST_PID_FILE"


#: Reported with every epoch for `CheckpointConfig`: schedule.metric, made finite (Ray cannot rank NaN / None).
SCORE_KEY = "checkpoint_score"


_WORST = 1e30


# ------------------------------------------------------------------------------------------------ worker
def _rows(shard: Any) -> list[dict[str, Any]]:
    """All rows of a dataset shard (manifest rows are small) as plain dicts; null masks stay None."""
    rows: list[dict[str, Any]] = []
    for batch in shard.iter_batches(batch_size=4096, batch_format="pandas"):
        for rec in batch.to_dict("records"):
            for column in ("mask", "class_mask"):  # Ray Data hands back a missing path as None or NaN
                value = rec.get(column)
                rec[column] = None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
            rows.append(rec)
    return rows


def _report_value(value: Any) -> Any:
    """Ray persists metrics as JSON: NaN becomes None (the CSV writer shows it as an empty cell)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _rank_value(value: Any, mode: str) -> float:
    """The checkpoint ranking value: schedule.metric, or the worst number when it is undefined (NaN) this epoch."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return -_WORST if mode == "max" else _WORST


def _maybe_fail(fail_once: str | None, epoch: int, rank: int) -> None:
    if not fail_once or rank != 0:
        return
    at, marker = fail_once.split(":", 1)
    if int(at) == epoch and not os.path.exists(marker):
        Path(marker).write_text(f"failed once at epoch {epoch}\n", encoding="utf-8")
        raise RuntimeError(f"{FAIL_ONCE_ENV}: injected failure at epoch {epoch}")


def _write_placement_group(path: str) -> None:
    """Record the worker group's placement group id (a Tune trial's driver removes it if the trial is killed: Ray
    Train's own clean-up of a killed controller needs the State API, which an embedded Ray without dashboard lacks)."""
    pg = ray.util.get_current_placement_group()
    if pg is not None:
        Path(path).write_text(pg.id.hex() + "\n", encoding="utf-8")


def _report(trainer: Any, metrics: dict[str, Any], epoch: int, rank: int, run_dir: str) -> None:
    """Every rank reports the epoch (a barrier); rank 0 with the checkpoint.

    Rank 0 writes the checkpoint straight into the run folder, which is Ray's experiment folder (``storage_path /
    name``), as a hidden folder renamed into place once complete, and reports it with ``NO_UPLOAD``: Ray registers
    it where it is instead of copying a checkpoint that holds the optimizer state (~260 MB for dinov3-s) every
    epoch. On a multi-node cluster the run folder must be shared storage, as Ray's own copy would need."""
    name = checkpoint_name(epoch)
    saved = None
    if rank == 0:
        final = Path(run_dir) / name
        partial = final.with_name(f".{name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            trainer.save(str(partial))
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)  # a full disk: leave no half checkpoint behind
            raise
        if final.exists():  # written before a failure, never reported: this epoch ran again
            shutil.rmtree(final)
        os.replace(partial, final)
        saved = Checkpoint.from_directory(str(final))
    ray.train.report(
        metrics, checkpoint=saved, checkpoint_dir_name=name, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD
    )


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: rebuild the config, restore the latest checkpoint, train the remaining epochs."""
    import torch
    from ray.train.torch import get_device, prepare_model

    from raydefect.engine.loop import Trainer

    cfg = Config.from_dict(config["config"], source="train_loop_config")
    torch.set_num_threads(int(config["threads"]))
    rank = ray.train.get_context().get_world_rank()
    if rank == 0 and config.get("placement_group_file"):
        _write_placement_group(config["placement_group_file"])
    checkpoint = ray.train.get_checkpoint()
    trainer = Trainer(
        cfg,
        config["class_names"],
        config["class_counts"],
        device=get_device(),
        wrap_model=lambda m: prepare_model(m, move_to_device=False),
        load_weights=checkpoint is None,  # resuming: the checkpoint has the weights, no need for the hub or file
    )
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.restore(folder)
    elif config.get("resume_from"):  # the driver set damaged checkpoints aside and chose the newest good one
        trainer.restore(config["resume_from"])
    if rank == 0:
        trainer.progress_file = Path(config["run_dir"]) / PROGRESS_FILE
    if config.get("pid_file") and rank == 0:
        Path(config["pid_file"]).write_text(f"{os.getpid()}\n", encoding="utf-8")
    val_rows = _rows(ray.train.get_dataset_shard("val"))
    shard = ray.train.get_dataset_shard("train")
    for epoch in trainer.pending_epochs():
        metrics = trainer.run_epoch(epoch, _rows(shard), val_rows)
        _maybe_fail(config.get("fail_once"), epoch, rank)
        metrics = {k: _report_value(v) for k, v in metrics.items()}
        metrics[SCORE_KEY] = _rank_value(metrics.get(cfg.schedule.metric), cfg.schedule.mode)
        _report(trainer, metrics, epoch, rank, config["run_dir"])
        if trainer.state.stopped:
            break
