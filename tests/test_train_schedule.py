"""The three-stage schedule: stage plan, epoch split, LR curve, freezing and the optimiser's parameter groups."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from raydefect.config import OptimConfig, ScheduleConfig
from raydefect.engine.schedule import (
    apply_stage,
    build_optimizer,
    build_scheduler,
    group_lrs,
    lr_factor,
    plan_stages,
    split_epochs,
    stage_for_epoch,
)


def test_stages_are_numbered_across_and_empty_ones_skipped():
    stages = plan_stages(ScheduleConfig(frozen_epochs=2, partial_epochs=0, full_epochs=3, unfreeze_blocks=2), depth=4)
    assert [(s.number, s.first_epoch, s.last_epoch, s.trainable_blocks) for s in stages] == [(1, 1, 2, 0), (3, 3, 5, 4)]
    assert stage_for_epoch(stages, 2).name == "frozen" and stage_for_epoch(stages, 3).name == "full"
    with pytest.raises(ValueError):
        stage_for_epoch(stages, 6)
    partial = plan_stages(ScheduleConfig(frozen_epochs=0, partial_epochs=1, full_epochs=0, unfreeze_blocks=9), 4)
    assert partial[0].trainable_blocks == 4  # more blocks than the backbone has: all of them
    assert plan_stages(ScheduleConfig(), 12)[0].warmup_epochs == 0.0  # heads only: no warm-up


def test_a_random_init_backbone_trains_whole_for_every_epoch():
    sched = ScheduleConfig(frozen_epochs=2, partial_epochs=2, full_epochs=4, warmup_epochs=1.5)
    (stage,) = plan_stages(sched, 4, random_init=True)
    assert (stage.name, stage.first_epoch, stage.last_epoch, stage.trainable_blocks) == ("full", 1, 8, 4)
    assert stage.warmup_epochs == 1.5


@pytest.mark.parametrize("total", [1, 2, 3, 5, 8, 13, 40])
def test_split_epochs_keeps_the_total_and_zero_stages(total):
    sched = ScheduleConfig(frozen_epochs=2, partial_epochs=2, full_epochs=4)
    parts = split_epochs(total, sched)
    assert sum(parts) == total
    assert split_epochs(8, sched) == (2, 2, 4)
    no_partial = split_epochs(total, ScheduleConfig(frozen_epochs=1, partial_epochs=0, full_epochs=3))
    assert no_partial[1] == 0 and sum(no_partial) == total
    assert split_epochs(1, sched) == (0, 0, 1)  # fine-tuning keeps its share first


def test_lr_warms_up_linearly_then_decays_by_cosine():
    f = [lr_factor(s, total_steps=20, warmup_steps=5, min_ratio=0.1) for s in range(20)]
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[5:]))
    assert lr_factor(20, 20, 5, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 10, 0, 0.0) == pytest.approx(1.0)
    mid = lr_factor(5 + 15 // 2, 20, 5, 0.0)
    assert 0.4 < mid < 0.6


def test_stage_freezing_and_parameter_groups(make_tiny_model):
    model = make_tiny_model().train()
    optim = OptimConfig(lr=1e-3, head_lr=1e-2, layer_decay=0.5)
    sched = ScheduleConfig(frozen_epochs=1, partial_epochs=1, full_epochs=1, unfreeze_blocks=2)
    s1, s2, s3 = plan_stages(sched, model.num_blocks)
    head_ids = {id(p) for p in model.head_parameters()}

    apply_stage(model, s1)
    opt = build_optimizer(model, optim, s1)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == head_ids
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not model.backbone.training and model.decoder.training  # frozen features: no drop-path noise
    assert math.isnan(group_lrs(opt)["lr_backbone"]) and group_lrs(opt)["lr"] == pytest.approx(1e-2)

    apply_stage(model, s2)
    opt = build_optimizer(model, optim, s2)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.2.", "blocks.3.", "norm.")) for n in trainable)
    by_name = {g["name"]: g["lr"] for g in opt.param_groups}
    assert by_name["block3.decay"] == pytest.approx(1e-3) and by_name["block2.decay"] == pytest.approx(5e-4)
    assert model.backbone.training

    apply_stage(model, s3)
    opt = build_optimizer(model, optim, s3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert min(g["lr"] for g in opt.param_groups) == pytest.approx(1e-3 * 0.5**4)  # embeddings: depth steps down
    no_decay = [g for g in opt.param_groups if g["name"].endswith("no_decay")]
    assert no_decay and all(g["weight_decay"] == 0.0 for g in no_decay)


def test_scheduler_steps_every_group_and_round_trips_as_json(make_tiny_model):
    import json

    model = make_tiny_model()
    sched_cfg = ScheduleConfig(frozen_epochs=0, partial_epochs=0, full_epochs=2, warmup_epochs=1, min_lr_ratio=0.0)
    (stage,) = plan_stages(sched_cfg, model.num_blocks)
    apply_stage(model, stage)
    opt = build_optimizer(model, OptimConfig(), stage)
    sch = build_scheduler(opt, stage, sched_cfg, steps_per_epoch=4)
    peaks = [g["initial_lr"] for g in opt.param_groups]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([p * 0.25 for p in peaks])
    for _ in range(3):
        opt.step()
        sch.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(peaks)  # end of warm-up
    state = json.loads(json.dumps(sch.state_dict()))
    opt2 = build_optimizer(model, OptimConfig(), stage)
    sch2 = build_scheduler(opt2, stage, sched_cfg, steps_per_epoch=4)
    sch2.load_state_dict(state)
    opt.step()
    sch.step()
    opt2.step()
    sch2.step()
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])
    assert isinstance(sch, torch.optim.lr_scheduler.LambdaLR)
