"""`raydefect train` on Ray Train: the driver (`train`, `run_training`) and `train_fn_per_worker`.

Data path. The driver reads the manifest (small: one row per image) and hands the training and validation rows to
Ray Data (``ray.data.from_pandas``). `TorchTrainer` splits the training dataset into equal shards (``streaming_split``;
equal row counts keep DDP's collectives in step) and gives every worker the whole validation dataset, of which each
rank scores ``rows[rank::world]`` and the accumulators are all-gathered, so metrics are exact with any worker count.
Each epoch a worker reads its shard's rows and decodes + augments them on its own loader threads (CPU workers) or
loader processes (GPU workers: threads share one interpreter lock and fed an H200 half as fast), prefetching while
the model computes. Why not decode in a Ray Data ``map_batches`` step: on CPU nodes those tasks would compete with
the training workers for the same cores and ship float tensors through the object store (4x the bytes of the
encoded images) for no gain; with rows only, Ray Data needs no CPU of its own, so a worker may reserve every core.
On GPU clusters decoding stays off the GPU either way, on the worker's reserved CPUs (``resources.cpus_per_worker``,
``data.loader_processes``).

Checkpoints and resume (Ray Train V2). Every epoch all ranks call ``ray.train.report`` (a barrier); rank 0 writes
the checkpoint folder (`raydefect.engine.checkpoint`), named ``checkpoint_epoch_NNNN``, straight into
``<runs_dir>/<name>/`` (Ray's experiment folder) and reports it with ``NO_UPLOAD``, so Ray registers it in place.
`CheckpointConfig` keeps the best ``train.keep_checkpoints`` by ``schedule.metric`` and
the latest. Re-running the same name builds a `TorchTrainer` with the same ``RunConfig(name, storage_path)``: Ray
restores its checkpoint-manager snapshot and ``ray.train.get_checkpoint()`` returns the latest checkpoint, from
which the worker continues with the next epoch. `FailureConfig(max_failures)` restarts a failed worker group the
same way.

Console. A `UserCallback` (on the Train controller, which runs on the driver's node) appends each epoch to
``metrics.csv``; the driver prints new rows as a table. Ray's own logs appear only with ``-v``.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    CheckpointUploadMode,
    DataConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback
from ray.train.v2.api.config import LoggingConfig

from raydefect import console
from raydefect.config import Config
from raydefect.engine.run import (
    METRICS_FILE,
    ExportResult,
    append_metrics_row,
    best_epoch,
    check_resumable,
    checkpoint_name,
    console_header,
    console_row,
    default_run_name,
    export_run,
    list_checkpoints,
    prepare_runs_dir,
    read_metrics_csv,
    set_aside_damaged_checkpoints,
    write_metrics_csv,
    write_run_config,
)
from raydefect.errors import ConfigError, DataError, RaydefectError, TrainingError
from raydefect.pipelines.failures import disk_error, user_error

#: Test hook: "EPOCH:MARKER_FILE" makes rank 0 raise once, after training epoch EPOCH and before reporting it, and
#: create MARKER_FILE so the retry passes (the driver reads it and hands it to the workers).
FAIL_ONCE_ENV = "RAYDEFECT_TEST_FAIL_ONCE"
#: Test hook: a file path; rank 0 writes its pid there when it starts (a test kills it with SIGKILL mid-epoch).
PID_FILE_ENV = "RAYDEFECT_TEST_PID_FILE"
#: Ray Train's checkpoint-manager snapshot in the run folder (it lists the checkpoints Ray restores from).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
#: Reported with every epoch for `CheckpointConfig`: schedule.metric, made finite (Ray cannot rank NaN / None).
SCORE_KEY = "checkpoint_score"
_WORST = 1e30


@dataclass
class TrainResult:
    """What a training run produced (the tune helper reads ``best_metrics``; the CLI prints the rest)."""

    name: str
    run_dir: Path
    history: list[dict[str, Any]]  # one dict per completed epoch, from the latest checkpoint
    epochs_run: list[int]  # epochs this call trained (a resumed run skips finished ones)
    best_epoch: int
    best_checkpoint: Path | None
    resumed: bool
    stopped_early: bool
    export: ExportResult | None = None
    seconds: float = 0.0

    @property
    def best_metrics(self) -> dict[str, Any]:
        return next((r for r in self.history if int(r["epoch"]) == self.best_epoch), {})


# ------------------------------------------------------------------------------------------------ worker
def _rows(shard: Any) -> list[dict[str, Any]]:
    """All rows of a dataset shard (manifest rows are small) as plain dicts; null masks stay None."""
    rows: list[dict[str, Any]] = []
    for batch in shard.iter_batches(batch_size=4096, batch_format="pandas"):
        for rec in batch.to_dict("records"):
            mask = rec.get("mask")
            rec["mask"] = None if mask is None or (isinstance(mask, float) and math.isnan(mask)) else str(mask)
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


# ------------------------------------------------------------------------------------------------ driver
class MetricsCsvCallback(UserCallback):
    """Runs on the Train controller (on the driver's node): appends each reported epoch to metrics.csv."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and metrics[0] and "epoch" in metrics[0]:
            row = {k: (math.nan if v is None else v) for k, v in metrics[0].items() if k != SCORE_KEY}
            append_metrics_row(Path(self.run_dir) / METRICS_FILE, row)


class _ProgressPrinter(threading.Thread):
    """Prints metrics.csv rows as they appear (the driver is blocked in ``fit()`` meanwhile)."""

    def __init__(self, path: Path, after_epoch: int) -> None:
        super().__init__(daemon=True, name="raydefect-progress")
        self.path = path
        self.printed = after_epoch
        self.stop_event = threading.Event()

    def poll(self) -> None:
        try:
            rows = read_metrics_csv(self.path)
        except (OSError, ValueError, KeyError):
            return  # half-written: next time
        for row in rows:
            if int(row["epoch"]) > self.printed:
                console.info(console_row(row))
                self.printed = int(row["epoch"])

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            self.poll()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
        self.poll()


def uses_gpu(cfg: Config) -> bool:
    from raydefect.pipelines.cluster import cluster_gpus

    if cfg.resources.use_gpu == "yes":
        if cluster_gpus() < cfg.resources.gpus_per_worker:
            raise ConfigError(
                "resources.use_gpu: 'yes' but the Ray cluster has no GPU; use 'auto' or 'no', or connect to a "
                "cluster with GPUs (--address)"
            )
        return True
    return cfg.resources.use_gpu == "auto" and cluster_gpus() > 0


def gpu_loader_hint(cfg: Config, cpus: float, gpus: float) -> str | None:
    """A warning when GPU workers reserve few CPUs while the cluster has many per GPU: those CPUs decode and augment
    (``data.loader_processes``), and on an H200 the loader, not the GPU, set the pace (262 vs 520 images/s)."""
    per_gpu = cpus / gpus if gpus else 0.0
    share = math.floor(per_gpu * cfg.resources.gpus_per_worker) - 1
    if cfg.data.loader_processes is not None or cfg.resources.cpus_per_worker >= 4 or share < 4:
        return None
    return (
        f"each GPU worker reserves {cfg.resources.cpus_per_worker:g} CPU(s) to decode and augment images "
        f"(resources.cpus_per_worker) while this cluster has {per_gpu:g} per GPU; the loader will likely starve the "
        f"GPU: pass --cpus-per-worker {share}"
    )


def _root_error(exc: BaseException) -> BaseException:
    """The first RaydefectError inside Ray's wrappers (worker_failures, cause, __cause__), else ``exc``."""
    return user_error(exc) or exc


def _frame(rows: Sequence[dict[str, Any]]) -> Any:
    import pandas as pd

    from raydefect.engine.data import ROW_COLUMNS

    df = pd.DataFrame(list(rows), columns=list(ROW_COLUMNS))
    df["mask"] = df["mask"].astype(object)
    return df


def run_training(
    cfg: Config,
    *,
    name: str | None = None,
    storage_path: str | Path | None = None,
    callbacks: Sequence[Any] | None = None,
    export: bool = True,
    show_progress: bool = True,
    address: str | None = None,
    fail_once: str | None = None,
    placement_group_file: str | None = None,
) -> TrainResult:
    """Fit ``cfg`` with a `TorchTrainer` into ``<storage_path>/<name>/`` (defaults: train.runs_dir, train.name).

    Everything that can be checked without Ray (dataset, splits, metric name, weights, runs folder, a changed config
    under a re-used name) is checked first; then Ray is joined if needed (``address``; inside a Tune trial it
    already is). Re-running a name
    resumes it. ``callbacks`` are Ray Train `UserCallback`s (Tune passes ``TuneReportCallback()``); every epoch is
    reported with a checkpoint, so its metrics persist. ``export`` writes ``model/`` and the test metrics at the end.
    Multi-fidelity (tuning) needs only config: data.subset, data.image_size and the schedule's epochs.
    ``fail_once`` is the `FAIL_ONCE_ENV` test hook passed directly (a Tune trial's environment is Ray's);
    ``placement_group_file``: rank 0 writes the worker group's placement group id there (see `_write_placement_group`).
    """
    from raydefect.data.manifest import load_dataset
    from raydefect.engine.fit import training_rows
    from raydefect.engine.loop import check_metric
    from raydefect.models.weights import check_weights_available

    start = time.perf_counter()
    if not cfg.data.dataset:
        raise DataError("no dataset: pass --data DATASET (a folder written by `raydefect prepare`)")
    dataset = load_dataset(cfg.data.dataset)
    train_rows, val_rows, counts = training_rows(cfg, dataset)
    check_metric(cfg, dataset.class_names)
    if len(train_rows) < cfg.resources.num_workers:
        raise DataError(
            f"{dataset.root}: {len(train_rows)} training images for {cfg.resources.num_workers} workers; use fewer "
            "workers (--num-workers) or more data"
        )
    name = name or cfg.train.name or default_run_name(cfg)
    root = prepare_runs_dir(storage_path or cfg.train.runs_dir)
    run_dir = root / name
    cfg = cfg.replace(**{"train.name": name, "train.runs_dir": str(root)})
    resumed = check_resumable(run_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run_dir, cfg)
    damaged = set_aside_damaged_checkpoints(run_dir)
    for message in damaged:
        console.warn(f"{message}; resuming from the newest good checkpoint")
    if damaged:  # Ray's checkpoint-manager snapshot names the moved folder: start Ray's bookkeeping afresh
        (run_dir / RAY_SNAPSHOT).unlink(missing_ok=True)
    done_before = max(list_checkpoints(run_dir), default=0)
    resume_from = str(list_checkpoints(run_dir)[done_before]) if damaged and done_before else None
    if not done_before:
        check_weights_available(cfg.model)  # a resumed run takes its weights from the checkpoint

    if done_before and _finished(run_dir, done_before, cfg):
        return _finish(run_dir, cfg, dataset, name, done_before, export, resumed, start, show_progress)

    from raydefect.pipelines.cluster import connect, quiet_ray_data

    connect(address)
    use_gpu = uses_gpu(cfg)
    resources = {"CPU": cfg.resources.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.resources.gpus_per_worker
        from raydefect.pipelines.cluster import cluster_cpus, cluster_gpus

        hint = gpu_loader_hint(cfg, cluster_cpus(), cluster_gpus())
        if hint:
            console.warn(hint)
    verbose = console.verbosity() >= 1
    quiet_ray_data()
    datasets = {"train": ray.data.from_pandas(_frame(train_rows)), "val": ray.data.from_pandas(_frame(val_rows))}
    fail_once = fail_once or os.environ.get(FAIL_ONCE_ENV) or None
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "class_names": dataset.class_names,
            "class_counts": counts,
            "threads": max(1, int(cfg.resources.cpus_per_worker)),
            "fail_once": fail_once,
            "resume_from": resume_from,
            "pid_file": os.environ.get(PID_FILE_ENV) or None,
            "placement_group_file": placement_group_file,
            "run_dir": str(run_dir),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.resources.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(root),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=SCORE_KEY,
                checkpoint_score_order=cfg.schedule.mode,
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[MetricsCsvCallback(str(run_dir)), *(callbacks or [])],
            logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    if show_progress:
        total = cfg.schedule.total_epochs
        where = f"{cfg.resources.num_workers} worker(s), {'GPU' if use_gpu else 'CPU'}"
        action = f"resuming {name} after epoch {done_before}" if done_before else f"training {name}"
        console.info(
            f"{action}: {cfg.model.backbone} at {cfg.data.image_size} px, {total} epochs, "
            f"{len(train_rows)} train / {len(val_rows)} val images, {where}"
        )
        console.info(f"run folder: {run_dir}")
        console.info(console_header())
    printer = _ProgressPrinter(run_dir / METRICS_FILE, done_before) if show_progress else None
    if printer is not None:
        printer.start()
    try:
        result = trainer.fit()
    except Exception as e:
        root_error = _root_error(e)
        if isinstance(root_error, RaydefectError):
            raise root_error from None
        last = max(list_checkpoints(run_dir), default=0)
        full = disk_error(e, f"under train.runs_dir {root}", f"re-run the same command to resume after epoch {last}")
        if full is not None:
            raise full from None
        detail = " ".join(str(root_error).split())[:400]
        raise TrainingError(
            f"training {name} failed ({type(root_error).__name__}: {detail}); the last checkpoint is epoch {last}: "
            f"re-run the same command (same --name) to resume from it"
        ) from e
    finally:
        if printer is not None:
            printer.stop()

    if result.checkpoint is None:
        raise TrainingError(f"training {name} reported no checkpoint; see the Ray logs (-v) and re-run")
    return _finish(run_dir, cfg, dataset, name, done_before, export, resumed, start, False)


def _finished(run_dir: Path, last: int, cfg: Config) -> bool:
    """The run's last checkpoint already covers every epoch (or early stopping ended it): nothing to train."""
    from raydefect.engine.checkpoint import read_state

    state = read_state(list_checkpoints(run_dir)[last])
    return state.stopped or state.epoch >= cfg.schedule.total_epochs


def _finish(
    run_dir: Path,
    cfg: Config,
    dataset: Any,
    name: str,
    done_before: int,
    export: bool,
    resumed: bool,
    start: float,
    announce: bool,
) -> TrainResult:
    """History from the latest checkpoint -> metrics.csv; the best kept checkpoint -> model/ and test metrics."""
    from raydefect.engine.checkpoint import read_state

    kept = list_checkpoints(run_dir)
    state = read_state(kept[max(kept)])
    if announce:
        console.info(f"run {name} already finished {state.epoch} epochs; exporting its best checkpoint")
    history = state.history
    write_metrics_csv(run_dir / METRICS_FILE, history)
    best = best_epoch(history, cfg.schedule.metric, cfg.schedule.mode, among=list(kept))
    out = TrainResult(
        name=name,
        run_dir=run_dir,
        history=history,
        epochs_run=[int(r["epoch"]) for r in history if int(r["epoch"]) > done_before],
        best_epoch=best,
        best_checkpoint=kept.get(best),
        resumed=resumed and done_before > 0,
        stopped_early=state.stopped,
    )
    if export and out.best_checkpoint is not None:
        out.export = export_run(run_dir, out.best_checkpoint, cfg, dataset, extra={"best_epoch": best})
    out.seconds = time.perf_counter() - start
    return out


def train(cfg: Config, address: str | None = None) -> TrainResult:
    """`raydefect train`: the training with console output on ``address`` (default: an embedded local Ray)."""
    return run_training(cfg, address=address)
