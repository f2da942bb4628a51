"""`fit`: the whole training in one process with plain PyTorch (no Ray).

It runs exactly the epochs the Ray Train driver runs (same `Trainer`, same data, same run folder), which makes it
the reference for the throughput benchmark and lets tests check the training logic without a cluster. It resumes
from the run folder's last checkpoint like the Ray driver does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raydefect import console
from raydefect.config import Config
from raydefect.data.manifest import Dataset, load_dataset
from raydefect.engine.data import class_counts, manifest_rows, subset_rows
from raydefect.engine.run import (
    METRICS_FILE,
    ExportResult,
    append_metrics_row,
    best_epoch,
    checkpoint_name,
    export_run,
    list_checkpoints,
    prune_checkpoints,
    set_aside_damaged_checkpoints,
    write_metrics_csv,
    write_run_config,
)
from raydefect.errors import DataError


@dataclass
class FitResult:
    run_dir: Path
    history: list[dict[str, Any]]
    epochs_run: list[int]  # epochs executed by this call (a resumed run skips the finished ones)
    best_epoch: int
    best_checkpoint: Path | None
    export: ExportResult | None = None
    stopped_early: bool = False
    skipped_images: list[tuple[str, str]] = field(default_factory=list)

    @property
    def best_metrics(self) -> dict[str, Any]:
        return next((r for r in self.history if int(r["epoch"]) == self.best_epoch), {})


def training_rows(cfg: Config, dataset: Dataset) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    """(train rows after data.subset, val rows, per-class training counts); empty splits raise `DataError`, as
    does ``model.mask_classes`` on a dataset without per-pixel classes."""
    if cfg.model.mask_classes and not dataset.has_class_masks:
        raise DataError(
            f"{dataset.root}: model.mask_classes needs per-pixel classes, and this dataset has binary masks only; "
            "prepare it with --mask-format index, --coco or --rle-csv (docs/labels.md), or set model.mask_classes=false"
        )
    train = subset_rows(manifest_rows(dataset, "train"), cfg.data.subset, cfg.train.seed)
    val = manifest_rows(dataset, "val")
    return train, val, class_counts(train, dataset.num_classes)


def fit(
    cfg: Config,
    dataset: Dataset | str | Path,
    run_dir: str | Path,
    *,
    device: str = "auto",
    resume: bool = True,
    export: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train ``cfg`` on ``dataset``, writing the run folder ``run_dir`` (config, metrics.csv, checkpoints, and with
    ``export`` the model artifact + test metrics). ``on_epoch`` sees every epoch's metrics."""
    from raydefect.engine.loop import Trainer, check_metric

    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    train_rows, val_rows, counts = training_rows(cfg, ds)
    check_metric(cfg, ds.class_names)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run_dir, cfg)
    if resume:  # the same fallback as the Ray driver: a damaged newest checkpoint is set aside, with a warning
        for message in set_aside_damaged_checkpoints(run_dir):
            console.warn(f"{message}; resuming from the newest good checkpoint")
    checkpoints = list_checkpoints(run_dir) if resume else {}
    trainer = Trainer(cfg, ds.class_names, counts, device=device, load_weights=not checkpoints)
    if checkpoints:
        last = max(checkpoints)
        trainer.restore(checkpoints[last])
        console.info(f"resuming {run_dir.name} after epoch {last}")
    epochs_run = []
    for epoch in trainer.pending_epochs():
        metrics = trainer.run_epoch(epoch, train_rows, val_rows)
        trainer.save(run_dir / checkpoint_name(epoch))
        append_metrics_row(run_dir / METRICS_FILE, metrics)
        prune_checkpoints(run_dir, trainer.history, cfg.train.keep_checkpoints, cfg.schedule.metric, cfg.schedule.mode)
        epochs_run.append(epoch)
        if on_epoch is not None:
            on_epoch(metrics)
        if trainer.state.stopped:
            console.info(
                f"early stop after epoch {epoch}: {cfg.schedule.metric} did not improve for "
                f"{cfg.schedule.patience} epochs"
            )
            break
    history = trainer.history
    write_metrics_csv(run_dir / METRICS_FILE, history)
    kept = list_checkpoints(run_dir)
    best = best_epoch(history, cfg.schedule.metric, cfg.schedule.mode, among=list(kept))
    best_dir = kept.get(best)
    result = FitResult(
        run_dir=run_dir,
        history=history,
        epochs_run=epochs_run,
        best_epoch=best,
        best_checkpoint=best_dir,
        stopped_early=trainer.state.stopped,
        skipped_images=list(trainer.load_stats.skipped),
    )
    if export and best_dir is not None:
        result.export = export_run(run_dir, best_dir, cfg, ds, device=device)
    return result
