"""Losses against hand-computed values on tiny tensors; empty masks stay finite."""

from __future__ import annotations

import math

import pytest
import torch

from raydefect.config import OptimConfig
from raydefect.models.losses import DefectLoss, balanced_class_weights, soft_dice_loss


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _masks(n=2, value=0.0):
    return torch.full((n, 1, 2, 2), value)


def test_cross_entropy_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    loss = DefectLoss(bce_weight=0.0, dice_weight=0.0)(logits, torch.zeros(2, 1, 2, 2), labels, _masks())
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.e / (1 + math.e))) / 2
    assert loss.cls.item() == pytest.approx(expected, rel=1e-6)
    assert loss.total.item() == pytest.approx(expected, rel=1e-6)


def test_class_weights_and_label_smoothing():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    loss = DefectLoss(class_weights=[1.0, 3.0], label_smoothing=0.2, bce_weight=0, dice_weight=0)
    out = loss(logits, torch.zeros(2, 1, 2, 2), labels, _masks())
    # smoothed target: (1 - eps) one-hot + eps / C; weighted mean divides by the sum of the targets' weights
    logp = torch.log_softmax(logits, dim=1)
    w = torch.tensor([1.0, 3.0])
    nll = -(w[labels] * logp[torch.arange(2), labels]).sum() / w[labels].sum()
    smooth = -(w * logp).sum(dim=1).sum() / w[labels].sum() / 2
    assert out.cls.item() == pytest.approx((0.8 * nll + 0.2 * smooth).item(), rel=1e-5)


def test_bce_and_dice_match_hand_computation():
    logits = torch.tensor([[[[0.0, 2.0], [-2.0, 0.0]]]])
    target = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    out = DefectLoss()(torch.zeros(1, 2), logits, torch.tensor([1]), target)
    p = [_sigmoid(0), _sigmoid(2), _sigmoid(-2), _sigmoid(0)]
    t = [0, 1, 0, 1]
    bce = -sum(ti * math.log(pi) + (1 - ti) * math.log(1 - pi) for pi, ti in zip(p, t, strict=True)) / 4
    dice = 1 - (2 * (p[1] + p[3]) + 1) / (sum(p) + 2 + 1)
    assert out.bce.item() == pytest.approx(bce, rel=1e-6)
    assert out.dice.item() == pytest.approx(dice, rel=1e-6)
    assert out.total.item() == pytest.approx(math.log(2) + bce + dice, rel=1e-6)


def test_empty_masks_are_finite_and_push_towards_zero():
    logits = torch.zeros(3, 1, 4, 4, requires_grad=True)
    dice = soft_dice_loss(logits, torch.zeros(3, 1, 4, 4))
    assert dice.item() == pytest.approx(1 - 1 / (0.5 * 48 + 1))
    dice.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad > 0).all()  # lowering logits lowers the loss
    out = DefectLoss()(
        torch.zeros(3, 2), torch.full((3, 1, 4, 4), -20.0), torch.zeros(3, dtype=torch.long), torch.zeros(3, 4, 4)
    )
    assert all(torch.isfinite(v) for v in out) and out.dice.item() < 1e-6


def test_weights_scale_the_parts():
    args = (torch.tensor([[0.5, -0.5]]), torch.randn(1, 1, 4, 4), torch.tensor([1]), (torch.rand(1, 1, 4, 4) > 0.5))
    base = DefectLoss()(*args)
    weighted = DefectLoss(cls_weight=2.0, bce_weight=0.5, dice_weight=0.0)(*args)
    assert weighted.total.item() == pytest.approx(2 * base.cls.item() + 0.5 * base.bce.item(), rel=1e-6)
    assert weighted.dice.item() == pytest.approx(base.dice.item())  # parts are logged unweighted


def test_mask_valid_excludes_images_without_masks():
    mask_logits = torch.zeros(2, 1, 2, 2, requires_grad=True)
    masks = torch.stack([torch.ones(1, 2, 2), torch.zeros(1, 2, 2)])
    only_first = DefectLoss()(torch.zeros(2, 2), mask_logits, torch.tensor([1, 1]), masks, torch.tensor([True, False]))
    assert only_first.bce.item() == pytest.approx(math.log(2))  # p=0.5 on four positive pixels
    none = DefectLoss()(torch.zeros(2, 2), mask_logits, torch.tensor([1, 1]), masks, torch.tensor([False, False]))
    assert none.bce.item() == 0.0 and none.dice.item() == 0.0
    none.total.backward()
    assert mask_logits.grad is not None  # still in the graph (DDP)


def test_mask_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="must match mask_logits"):
        DefectLoss()(torch.zeros(1, 2), torch.zeros(1, 1, 4, 4), torch.tensor([0]), torch.zeros(1, 1, 2, 2))


def test_balanced_class_weights():
    w = balanced_class_weights([90, 10, 0])
    assert w.tolist() == pytest.approx([100 / (2 * 90), 100 / (2 * 10), 1.0])
    loss = DefectLoss.from_config(OptimConfig(), class_counts=[90, 10])
    assert loss.class_weights.tolist() == pytest.approx([100 / 180, 100 / 20])
    assert DefectLoss.from_config(OptimConfig(class_weights="none")).class_weights is None
    with pytest.raises(ValueError, match="class_counts"):
        DefectLoss.from_config(OptimConfig())
