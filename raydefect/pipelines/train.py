"""`raydefect train` on Ray Train: the driver (`train`, `run_training`); each worker runs `train_fn_per_worker`
(`raydefect.pipelines.train_worker`).

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

import json
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import (
    CheckpointConfig,
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
    PROGRESS_FILE,
    ExportResult,
    append_metrics_row,
    best_epoch,
    check_resumable,
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
from raydefect.geometry import Geometry
from raydefect.pipelines.failures import disk_error, user_error
from raydefect.pipelines.train_worker import FAIL_ONCE_ENV, PID_FILE_ENV, SCORE_KEY, train_fn_per_worker

#: Ray Train's checkpoint-manager snapshot in the run folder (it lists the checkpoints Ray restores from).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


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
        self.bar: console.Progress | None = None  # the current epoch's images (rank 0's `PROGRESS_FILE`)
        self.bar_epoch = 0

    def poll(self) -> None:
        try:
            rows = read_metrics_csv(self.path)
        except (OSError, ValueError, KeyError):
            rows = []  # half-written: next time
        for row in rows:
            if int(row["epoch"]) > self.printed:
                if self.bar_epoch <= int(row["epoch"]):  # not a later epoch's bar that is already running
                    self._close_bar()
                console.info(console_row(row))
                self.printed = int(row["epoch"])
        self._poll_batches()

    def _poll_batches(self) -> None:
        try:
            live = json.loads((self.path.parent / PROGRESS_FILE).read_text(encoding="utf-8"))
            epoch, images, total = int(live["epoch"]), int(live["images"]), int(live["total"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if epoch <= self.printed or epoch < self.bar_epoch or (self.bar is None and epoch == self.bar_epoch):
            return  # that epoch's row is out, or its bar was shown and closed: done
        if self.bar is None or epoch != self.bar_epoch:
            self._close_bar()
            self.bar, self.bar_epoch = console.Progress(f"epoch {epoch}", total), epoch
        self.bar.set_done(min(images, total))

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            self.poll()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
        self.poll()
        self._close_bar()


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
    df["class_mask"] = df["class_mask"].astype(object)
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
    start = time.perf_counter()
    dataset, train_rows, val_rows, counts = _training_data(cfg)
    plan = _plan_run(cfg, name, storage_path)
    cfg, name, root, run_dir, done_before = plan.cfg, plan.name, plan.root, plan.run_dir, plan.done_before
    if done_before and _finished(run_dir, done_before, cfg):
        return _finish(run_dir, cfg, dataset, name, done_before, export, plan.resumed, start, show_progress)

    from raydefect.pipelines.cluster import connect, quiet_ray_data

    connect(address, log_dir=run_dir)
    use_gpu, resources = _worker_resources(cfg)
    quiet_ray_data()
    trainer = _trainer(
        cfg,
        dataset.class_names,
        counts,
        train_rows,
        val_rows,
        run_dir,
        name=name,
        root=root,
        use_gpu=use_gpu,
        resources=resources,
        callbacks=callbacks,
        fail_once=fail_once or os.environ.get(FAIL_ONCE_ENV) or None,
        resume_from=plan.resume_from,
        placement_group_file=placement_group_file,
    )
    if show_progress:
        _announce(cfg, name, run_dir, done_before, len(train_rows), len(val_rows), use_gpu)
    result = _fit_with_progress(trainer, name, root, run_dir, done_before if show_progress else None)
    if result.checkpoint is None:
        raise TrainingError(f"training {name} reported no checkpoint; see the Ray logs (-v) and re-run")
    return _finish(run_dir, cfg, dataset, name, done_before, export, plan.resumed, start, False)


def _training_data(cfg: Config) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]], Any]:
    """The dataset, its training and validation rows and class counts, checked before Ray starts."""
    from raydefect.data.manifest import load_dataset
    from raydefect.engine.fit import training_rows
    from raydefect.engine.loop import check_metric

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
    return dataset, train_rows, val_rows, counts


@dataclass
class _RunPlan:
    """The run folder, ready: its config written, damaged checkpoints set aside, where a resumed run starts."""

    cfg: Config
    name: str
    root: Path
    run_dir: Path
    resumed: bool
    done_before: int
    resume_from: str | None


def _plan_run(cfg: Config, name: str | None, storage_path: str | Path | None) -> _RunPlan:
    from raydefect.models.weights import check_weights_available

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
    return _RunPlan(cfg, name, root, run_dir, resumed, done_before, resume_from)


def _fit_with_progress(trainer: TorchTrainer, name: str, root: Path, run_dir: Path, shown_from: int | None) -> Any:
    """`_fit`, with the epochs' console rows printed from metrics.csv as they land (``shown_from``: the epochs done
    before, None for no progress)."""
    printer = _ProgressPrinter(run_dir / METRICS_FILE, shown_from) if shown_from is not None else None
    if printer is not None:
        printer.start()
    try:
        return _fit(trainer, name, root, run_dir)
    finally:
        if printer is not None:
            printer.stop()


def _worker_resources(cfg: Config) -> tuple[bool, dict[str, float]]:
    """(whether the workers use GPUs, what each reserves); with GPUs, a warning when too few CPUs feed them."""
    use_gpu = uses_gpu(cfg)
    resources = {"CPU": cfg.resources.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.resources.gpus_per_worker
        from raydefect.pipelines.cluster import cluster_cpus, cluster_gpus

        hint = gpu_loader_hint(cfg, cluster_cpus(), cluster_gpus())
        if hint:
            console.warn(hint)
    return use_gpu, resources


def _announce(cfg: Config, name: str, run_dir: Path, done_before: int, n_train: int, n_val: int, use_gpu: bool) -> None:
    """What is about to train, where it goes, and the header of the per-epoch lines."""
    total = cfg.schedule.total_epochs
    where = f"{cfg.resources.num_workers} worker(s), {'GPU' if use_gpu else 'CPU'}"
    action = f"resuming {name} after epoch {done_before}" if done_before else f"training {name}"
    console.info(
        f"{action}: {cfg.model.backbone} {Geometry.from_data_config(cfg.data).describe()}, {total} epochs, "
        f"{n_train} train / {n_val} val images, {where}"
    )
    console.info(f"run folder: {run_dir}")
    console.info(console_header())


def _trainer(
    cfg: Config,
    class_names: Sequence[str],
    counts: Any,
    train_rows: Any,
    val_rows: Any,
    run_dir: Path,
    *,
    name: str,
    root: Path,
    use_gpu: bool,
    resources: dict[str, float],
    callbacks: Sequence[Any] | None,
    fail_once: str | None,
    resume_from: str | None,
    placement_group_file: str | None,
) -> TorchTrainer:
    """The `TorchTrainer` of a run: `train_fn_per_worker` on ``resources.num_workers`` workers, every epoch reported
    with a checkpoint into ``run_dir`` (the best ``train.keep_checkpoints`` kept), ``train.max_failures`` retries."""
    verbose = console.verbosity() >= 1
    datasets = {"train": ray.data.from_pandas(_frame(train_rows)), "val": ray.data.from_pandas(_frame(val_rows))}
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "class_names": class_names,
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


def _fit(trainer: TorchTrainer, name: str, root: Path, run_dir: Path) -> Any:
    """`trainer.fit()`, its failures as one user-facing error: a `RaydefectError` raised in a worker as itself, a
    full disk as `disk_error`'s, anything else as `TrainingError` naming the checkpoint to resume from."""
    try:
        return trainer.fit()
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
