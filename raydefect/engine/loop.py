"""One data-parallel replica's training: `train_one_epoch`, `engine.validation.evaluate` and the `Trainer` that strings
them together.

The same `Trainer` runs in the plain-PyTorch `fit` and inside every Ray Train worker; the only differences are
injected: ``wrap_model`` (``ray.train.torch.prepare_model`` -> DDP) and the rows each epoch gets (a Ray Data shard).
When ``torch.distributed`` is initialised with more than one process, training losses and image counts are summed
and the validation accumulators are gathered across ranks (each rank validates ``val_rows[rank::world]``), so every
rank computes the same metrics and takes the same early-stopping decision.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raydefect import console
from raydefect.config import Config
from raydefect.engine.checkpoint import (
    TrainState,
    load_optimizer_state,
    load_weights,
    read_state,
    save_checkpoint,
)
from raydefect.engine.data import LoadStats, SampleSource, epoch_order, iterate_batches, loader_processes
from raydefect.engine.schedule import (
    Stage,
    apply_stage,
    build_optimizer,
    build_scheduler,
    group_lrs,
    plan_stages,
    set_train_mode,
    stage_for_epoch,
)
from raydefect.engine.validation import Evaluation, autocast, evaluate, to_device
from raydefect.errors import ArtifactError, ConfigError, TrainingError
from raydefect.geometry import Geometry
from raydefect.inference.device import cpu_has_native_bf16, resolve_device
from raydefect.metrics import ImageMetricAccumulator, PixelMetricAccumulator, validation_summary
from raydefect.metrics.pixel_classes import pixel_class_summary
from raydefect.models.losses import DefectLoss
from raydefect.models.model import DefectModel
from raydefect.paths import write_text_atomic

#: Per-epoch keys besides the validation summary (``val_*``).
TRAIN_KEYS = (
    "epoch",
    "stage",
    "attempt",
    "lr",
    "lr_backbone",
    "train_loss",
    "train_loss_cls",
    "train_loss_bce",
    "train_loss_dice",
    "val_loss",
    "train_images",
    "skipped_images",
    "train_seconds",
    "seconds",
    "cpu_seconds",
    "images_per_s",
    "best_epoch",
    "finished_at",
)
_LOSS_PARTS = ("loss", "loss_cls", "loss_bce", "loss_dice")


# ------------------------------------------------------------------------------------------------ distributed
def world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, (0, 1) when it is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum a few floats across ranks (identity without torch.distributed)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return [float(v) for v in values]
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=on)
    dist.all_reduce(t)
    return [float(v) for v in t.cpu().tolist()]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    import torch.distributed as dist

    if world()[1] == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------- precision
def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Training's autocast: bf16 on CUDA for 'auto'/'bf16'. On a CPU fp32, except 'bf16' on a CPU that computes bf16
    in hardware (AVX512-BF16 / AMX, `cpu_has_native_bf16`); elsewhere PyTorch emulates bf16, slower than fp32, so
    'bf16' falls back to fp32 with a warning."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.bfloat16
    if precision == "bf16" and device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    if precision == "bf16":
        console.warn(
            f"train.precision=bf16 applies on GPUs and on CPUs with bf16 instructions (avx512_bf16 / amx_bf16); "
            f"this {device.type} has none: training in fp32"
        )
    return None


def eval_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Validation's autocast: training's on a GPU; fp32 on a CPU, where predict and evaluate run in fp32
    (`Predictor`), so the thresholds chosen on validation hold there."""
    return autocast_dtype(precision, device) if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------------- epochs
def train_one_epoch(
    net: nn.Module,
    loss_fn: DefectLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable[dict[str, torch.Tensor]],
    num_batches: int,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    grad_accum: int = 1,
    grad_clip: float = 0.0,
    channels_last: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One pass over ``batches``: forward, loss, backward, an optimiser + scheduler step every ``grad_accum``
    batches (and at the end). Returns sums weighted by images (``loss``, ``loss_cls``...), ``images``, ``steps``.
    ``on_batch(images so far)`` after each batch (the progress within the epoch). ``channels_last``: feed images in
    that memory format (a CNN whose weights are in it: oneDNN's fast convolutions on a CPU)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sums = dict.fromkeys(_LOSS_PARTS, 0.0)
    images = steps = 0
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(batches):
        batch = to_device(batch, device)
        boundary = (i + 1) % grad_accum == 0 or i + 1 == num_batches
        sync = contextlib.nullcontext() if boundary or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            images_in = (
                batch["image"].contiguous(memory_format=torch.channels_last) if channels_last else batch["image"]
            )
            with autocast(device, amp_dtype):
                out = net(images_in)
            loss = loss_fn(
                out.class_logits, out.mask_logits, batch["class_id"], batch["mask"], batch["mask_valid"],
                out.pixel_class_logits, batch.get("pixel_classes"),
            )  # fmt: skip
            (loss.total / grad_accum).backward()
        n = int(batch["image"].shape[0])
        floats = loss.as_floats()  # one device sync per batch, as before
        if not math.isfinite(floats["loss"]):
            raise TrainingError(
                f"the training loss became {floats['loss']} at batch {i + 1}: training diverged; lower optim.lr / "
                "optim.head_lr, keep optim.grad_clip > 0, or use train.precision=fp32"
            )
        for key, value in floats.items():
            sums[key] += value * n
        images += n
        if boundary:
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
        if on_batch is not None:
            on_batch(images)
    return {**sums, "images": float(images), "steps": float(steps)}


def metric_names(class_names: Sequence[str]) -> list[str]:
    """Every key a training epoch reports (validation summary + `TRAIN_KEYS`), for checking schedule.metric."""
    n = len(class_names)
    img = ImageMetricAccumulator(class_names)
    probs = np.full((2, n), 1.0 / n)
    img.update([0.2, 0.8], [0, 1], class_probs=probs, class_ids=[0, 1])
    px = PixelMetricAccumulator(num_bins=10)
    px.update(np.zeros((1, 2, 2)), np.ones((1, 2, 2), bool))
    return [*TRAIN_KEYS, *validation_summary(img, px)]


def check_metric(cfg: Config, class_names: Sequence[str]) -> None:
    names = metric_names(class_names)
    if cfg.schedule.metric not in names:
        import difflib

        close = difflib.get_close_matches(cfg.schedule.metric, names, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"schedule.metric: '{cfg.schedule.metric}' is not a reported metric; {hint}choose one of "
            f"{', '.join(n for n in names if n.startswith('val_'))}"
        )


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------------ trainer
class Trainer:
    """The model, loss, stage/optimiser/scheduler and bookkeeping of one replica; `run_epoch` does one epoch.

    ``class_counts`` (training split, per class) size the balanced class weights. ``wrap_model`` wraps the model at
    every stage change (DDP must be rebuilt when the set of trainable parameters changes).
    """

    def __init__(
        self,
        cfg: Config,
        class_names: Sequence[str],
        class_counts: Sequence[int],
        *,
        device: str | torch.device = "auto",
        wrap_model: Callable[[nn.Module], nn.Module] | None = None,
        load_weights: bool = True,
    ) -> None:
        self.cfg = cfg
        self.class_names = list(class_names)
        self.device = resolve_device(device)
        self.rank, self.world_size = world()
        self.progress_file: Path | None = None  # see `_progress_writer`
        self.amp_dtype = autocast_dtype(cfg.train.precision, self.device)
        self.eval_amp_dtype = eval_autocast_dtype(cfg.train.precision, self.device)
        torch.manual_seed(cfg.train.seed)
        geometry = Geometry.from_data_config(cfg.data)
        self.model = DefectModel(
            cfg.model, geometry.image_size, self.class_names, load_weights=load_weights, geometry=geometry
        )
        self.model.to(self.device)
        # CNN weights in channels-last: oneDNN's and cuDNN's fast convolutions (1.2x a training step on a CPU)
        self.channels_last = self.model.is_cnn
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.net: nn.Module = self.model
        self.wrap_model = wrap_model or (lambda m: m)
        self.loss_fn = DefectLoss.from_config(cfg.optim, list(class_counts)).to(self.device)
        random_init = not (cfg.model.pretrained or cfg.model.weights)
        self.stages = plan_stages(cfg.schedule, self.model.num_blocks, random_init=random_init)
        staged = cfg.schedule.frozen_epochs + cfg.schedule.partial_epochs
        if random_init and staged and self.rank == 0:
            console.info(
                f"model.pretrained is false: the random-init backbone trains whole for all {self.total_epochs} "
                "epochs (freezing random features would train the heads on noise)"
            )
        self.state = TrainState(config=cfg.to_dict(), class_names=self.class_names)
        self.stage: Stage | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.train_source = SampleSource.for_config(cfg, train=True)
        self.loader_processes = loader_processes(cfg.data, self.device.type, cfg.resources.cpus_per_worker)
        self.eval_source = SampleSource.for_config(cfg, train=False)
        self.load_stats = LoadStats()
        self._restored_optimizer: dict[str, Any] | None = None

    # -------------------------------------------------------------------------------------- bookkeeping
    @property
    def total_epochs(self) -> int:
        return self.stages[-1].last_epoch

    def pending_epochs(self) -> list[int]:
        if self.state.stopped:
            return []
        return list(range(self.state.epoch + 1, self.total_epochs + 1))

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.state.history

    def restore(self, directory: str | Path) -> None:
        """Continue from a checkpoint folder: weights now, optimiser/scheduler when its stage continues."""
        state = read_state(directory)
        if state.class_names != self.class_names:
            raise ArtifactError(
                f"{directory}: the checkpoint was trained on classes {state.class_names}, the dataset now has "
                f"{self.class_names}; start a new run name"
            )
        load_weights(directory, self.model)
        state.config = self.cfg.to_dict()
        state.attempt += 1
        self.state = state
        self.stage = None
        self._restored_optimizer = load_optimizer_state(directory)  # now: the folder may be temporary

    def save(self, directory: str | Path) -> Path:
        return save_checkpoint(directory, self.model, self.optimizer, self.state)

    def _enter_stage(self, stage: Stage, steps_per_epoch: int) -> None:
        apply_stage(self.model, stage)
        self.net = self.wrap_model(self.model)
        self.optimizer = build_optimizer(self.model, self.cfg.optim, stage)
        self.scheduler = build_scheduler(self.optimizer, stage, self.cfg.schedule, steps_per_epoch)
        restored = self._restored_optimizer
        if restored is not None and stage.number == self.state.stage and self.state.scheduler is not None:
            self.optimizer.load_state_dict(restored)
            self.scheduler.load_state_dict(self.state.scheduler)
        self._restored_optimizer = None
        self.stage = stage
        self.state.steps_per_epoch = steps_per_epoch

    def _improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.state.best is None:
            return True
        return value > self.state.best if self.cfg.schedule.mode == "max" else value < self.state.best

    # --------------------------------------------------------------------------------------------- epoch
    def _progress_writer(self, epoch: int, rows: int) -> Callable[[int], None] | None:
        """With `progress_file` (rank 0 under Ray Train): the epoch's images so far (this rank's times the world
        size), at most once a second, for the driver's progress bar (`PROGRESS_FILE`)."""
        path = self.progress_file
        if path is None:
            return None
        last = [0.0]

        def write(images: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 1.0 or images >= rows:
                last[0] = now
                record = {"epoch": epoch, "images": images * self.world_size, "total": rows * self.world_size}
                with contextlib.suppress(OSError):  # progress must never fail a training
                    write_text_atomic(path, json.dumps(record))

        return write

    def run_epoch(self, epoch: int, train_rows: Sequence[dict[str, Any]], val_rows: Sequence[dict[str, Any]]) -> dict:
        """Train on ``train_rows`` (this rank's share), validate on ``val_rows`` (all of them; each rank takes its
        slice), update early stopping and the history; return the epoch's flat metrics."""
        start, cpu_start = time.perf_counter(), time.process_time()
        stage, num_batches = self._begin_epoch(epoch, len(train_rows))
        sums, skipped = self._train_batches(epoch, train_rows, num_batches)
        train_seconds = time.perf_counter() - start
        assert self.optimizer is not None
        lrs = group_lrs(self.optimizer)
        totals = all_reduce_sum([sums[k] for k in _LOSS_PARTS] + [sums["images"], float(skipped)], self.device)
        images = totals[len(_LOSS_PARTS)]
        train = {f"train_{k}": totals[i] / images if images else math.nan for i, k in enumerate(_LOSS_PARTS)}

        evaluation = self.validate(val_rows)
        summary = {
            **validation_summary(evaluation.image, evaluation.pixel),
            **pixel_class_summary(evaluation.classes, "val_"),
        }
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "stage": stage.number,
            "attempt": self.state.attempt,
            **lrs,
            **train,
            "val_loss": evaluation.loss,
            **summary,
            "train_images": int(images),
            "skipped_images": int(totals[-1]),
            "train_seconds": train_seconds,
        }
        self._track_best(epoch, float(metrics[self.cfg.schedule.metric]))
        metrics["best_epoch"] = self.state.best_epoch
        metrics["seconds"] = time.perf_counter() - start
        metrics["cpu_seconds"] = time.process_time() - cpu_start  # this process, all threads: robust to other load
        metrics["images_per_s"] = images / train_seconds if train_seconds > 0 else math.nan
        metrics["finished_at"] = time.time()  # wall clock: epoch-to-epoch throughput including checkpoints
        self._record_epoch(epoch, stage, metrics)
        return metrics

    def _begin_epoch(self, epoch: int, rows: int) -> tuple[Stage, int]:
        """The epoch's stage, entered (new optimizer and scheduler) when it changes, and its number of batches."""
        cfg = self.cfg
        stage = stage_for_epoch(self.stages, epoch)
        num_batches = math.ceil(rows / cfg.train.batch_size)
        if num_batches == 0:
            raise ConfigError(
                f"worker {self.rank} got no training images for epoch {epoch}; use fewer workers "
                "(--num-workers) or more data (data.subset)"
            )
        steps = math.ceil(num_batches / cfg.optim.grad_accum)
        if self.stage is None or self.stage.number != stage.number:
            self._enter_stage(stage, steps)
        else:
            set_train_mode(self.model, stage)
        return stage, num_batches

    def _train_batches(
        self, epoch: int, train_rows: Sequence[dict[str, Any]], num_batches: int
    ) -> tuple[dict[str, float], int]:
        """One pass over this rank's ``train_rows``: the loss sums and the number of images skipped as unreadable."""
        cfg = self.cfg
        assert self.optimizer is not None and self.scheduler is not None
        torch.manual_seed(epoch_seed(cfg.train.seed, epoch, self.rank))
        order = epoch_order(train_rows, epoch, cfg.train.seed, self.rank, cfg.data.balanced_sampling)
        skipped_before = len(self.load_stats.skipped)
        batches = iterate_batches(
            self.train_source,
            train_rows,
            order,
            cfg.train.batch_size,
            threads=cfg.data.loader_threads,
            seed=(cfg.train.seed, epoch, self.rank),
            stats=self.load_stats,
            processes=self.loader_processes,
        )
        sums = train_one_epoch(
            self.net,
            self.loss_fn,
            self.optimizer,
            self.scheduler,
            batches,
            num_batches,
            device=self.device,
            amp_dtype=self.amp_dtype,
            grad_accum=cfg.optim.grad_accum,
            grad_clip=cfg.optim.grad_clip,
            channels_last=self.channels_last,
            on_batch=self._progress_writer(epoch, len(train_rows)),
        )
        return sums, len(self.load_stats.skipped) - skipped_before

    def _track_best(self, epoch: int, value: float) -> None:
        """Early stopping: the best value so far, the epochs without improvement, and whether to stop."""
        schedule = self.cfg.schedule
        if self._improved(value):
            self.state.best, self.state.best_epoch, self.state.bad_epochs = value, epoch, 0
        else:
            self.state.bad_epochs += 1
        if schedule.patience and self.state.bad_epochs >= schedule.patience and epoch < self.total_epochs:
            self.state.stopped = True

    def _record_epoch(self, epoch: int, stage: Stage, metrics: dict[str, Any]) -> None:
        """What a checkpoint resumes from: the epoch, its stage, the scheduler and the history."""
        assert self.scheduler is not None
        self.state.epoch = epoch
        self.state.stage = stage.number
        self.state.scheduler = self.scheduler.state_dict()
        self.state.history.append(metrics)

    def validate(self, val_rows: Sequence[dict[str, Any]]) -> Evaluation:
        """This rank's slice of ``val_rows``, merged over ranks."""
        mine = list(val_rows)[self.rank :: self.world_size]
        batches = iterate_batches(
            self.eval_source,
            mine,
            range(len(mine)),
            self.cfg.train.eval_batch_size,
            threads=self.cfg.data.loader_threads,
            stats=self.load_stats,
            processes=self.loader_processes,
        )
        local = evaluate(
            self.model,
            batches,
            self.class_names,
            device=self.device,
            amp_dtype=self.eval_amp_dtype,
            loss_fn=self.loss_fn,
        )
        parts = all_gather(local)
        merged = parts[0]
        for other in parts[1:]:
            merged.merge(other)
        return merged
