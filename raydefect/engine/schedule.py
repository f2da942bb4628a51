"""The three-stage fine-tuning schedule and its optimiser / learning-rate schedule.

1. ``frozen``: the backbone is frozen (and kept in eval mode, so its features are deterministic); only the decoder
   and classifier train, at ``optim.head_lr``.
2. ``partial``: the last ``schedule.unfreeze_blocks`` blocks (and the final norm) train too, with layer-wise LR decay
   (block i from the top gets ``optim.lr * optim.layer_decay**i``).
3. ``full``: everything trains, with the same layer-wise decay.

Each stage gets a fresh AdamW (parameter groups from `DefectModel.param_groups`) and a per-step schedule: a linear
warm-up of ``schedule.warmup_epochs`` (stages 2 and 3; pretrained features must not be wrecked by the first large
updates of randomly initialised heads), then a cosine decay to ``min_lr_ratio`` of the peak by the stage's end.
A stage with 0 epochs is skipped. Epochs are numbered from 1 across stages.

A random-init backbone (``model.pretrained: false`` and no ``model.weights``) has no features worth protecting:
freezing it would train heads on noise. Its schedule is one ``full`` stage of all the configured epochs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raydefect.config import OptimConfig, ScheduleConfig

if TYPE_CHECKING:
    import torch

    from raydefect.models.model import DefectModel

STAGE_NAMES = {1: "frozen", 2: "partial", 3: "full"}


@dataclass(frozen=True)
class Stage:
    number: int  # 1, 2 or 3
    epochs: int
    first_epoch: int  # 1-based global epoch of the stage's first epoch
    trainable_blocks: int  # 0 (heads only), schedule.unfreeze_blocks, or the backbone depth (everything)
    warmup_epochs: float

    @property
    def name(self) -> str:
        return STAGE_NAMES[self.number]

    @property
    def last_epoch(self) -> int:
        return self.first_epoch + self.epochs - 1

    def contains(self, epoch: int) -> bool:
        return self.first_epoch <= epoch <= self.last_epoch


def plan_stages(schedule: ScheduleConfig, depth: int, *, random_init: bool = False) -> list[Stage]:
    """The stages with epochs > 0, in order; a random-init backbone trains whole for all the epochs."""
    if random_init:
        return [Stage(3, schedule.total_epochs, 1, depth, schedule.warmup_epochs)]
    stages, first = [], 1
    for number, epochs, blocks, warmup in (
        (1, schedule.frozen_epochs, 0, 0.0),
        (2, schedule.partial_epochs, min(schedule.unfreeze_blocks, depth), schedule.warmup_epochs),
        (3, schedule.full_epochs, depth, schedule.warmup_epochs),
    ):
        if epochs > 0:
            stages.append(Stage(number, epochs, first, blocks, warmup))
            first += epochs
    return stages


def stage_for_epoch(stages: Sequence[Stage], epoch: int) -> Stage:
    for stage in stages:
        if stage.contains(epoch):
            return stage
    raise ValueError(f"epoch {epoch} is outside the schedule (1..{stages[-1].last_epoch if stages else 0})")


def split_epochs(total: int, schedule: ScheduleConfig) -> tuple[int, int, int]:
    """Spread ``total`` epochs over the stages in proportion to the configured ones (a stage at 0 stays 0;
    largest remainder, ties to the later stage, so fine-tuning keeps its share)."""
    weights = [schedule.frozen_epochs, schedule.partial_epochs, schedule.full_epochs]
    if total < 1:
        raise ValueError("total epochs must be >= 1")
    wsum = sum(weights)
    raw = [total * w / wsum for w in weights]
    out = [math.floor(r) for r in raw]
    order = sorted(range(3), key=lambda i: (-(raw[i] - out[i]), -i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out[0], out[1], out[2]


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimiser step ``step`` (0-based) of a stage: linear warm-up, then cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_stage(model: DefectModel, stage: Stage) -> None:
    """Set ``requires_grad`` (and the backbone's train/eval mode) for a stage."""
    if stage.trainable_blocks == 0:
        model.freeze_backbone()
    elif stage.trainable_blocks >= model.num_blocks:
        model.unfreeze_all()
    else:
        model.unfreeze_last(stage.trainable_blocks)
    set_train_mode(model, stage)


def set_train_mode(model: DefectModel, stage: Stage) -> None:
    """Training mode, except a frozen backbone stays in eval mode (no drop-path noise on features it cannot fit)."""
    model.train()
    if stage.trainable_blocks == 0:
        model.backbone.eval()


def build_optimizer(model: DefectModel, optim: OptimConfig, stage: Stage) -> torch.optim.Optimizer:
    """AdamW over the stage's trainable parameters, with layer-wise LR decay and no decay on norms/biases."""
    import torch

    groups = model.param_groups(
        optim.lr, optim.head_lr, optim.weight_decay, optim.layer_decay, trainable_blocks=stage.trainable_blocks
    )
    return torch.optim.AdamW(groups, lr=optim.head_lr, betas=(0.9, 0.999))


def build_scheduler(
    optimizer: torch.optim.Optimizer, stage: Stage, schedule: ScheduleConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR over the stage (its state_dict is plain JSON: step counters and base LRs)."""
    import torch

    total = max(1, stage.epochs * steps_per_epoch)
    warmup = min(total - 1, round(stage.warmup_epochs * steps_per_epoch)) if stage.warmup_epochs > 0 else 0
    ratio = schedule.min_lr_ratio

    def factor(step: int) -> float:
        return lr_factor(step, total, warmup, ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current LR of the heads and of the top trainable backbone block (NaN when the backbone is frozen)."""
    head = [g["lr"] for g in optimizer.param_groups if str(g.get("name", "")).startswith("heads")]
    backbone = [g["lr"] for g in optimizer.param_groups if not str(g.get("name", "")).startswith("heads")]
    return {
        "lr": float(head[0]) if head else math.nan,
        "lr_backbone": float(max(backbone)) if backbone else math.nan,
    }
