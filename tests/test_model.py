"""DefectModel: output shapes, the seg branch steering the classifier, freezing stages and parameter groups."""

from __future__ import annotations

import pytest
import torch

from raydefect.config import ModelConfig
from raydefect.errors import ConfigError, ModelError
from raydefect.models.model import DefectModel, FPNDecoder, feature_indices

TINY_CLASSES = ("normal", "scratch", "spot")


@pytest.fixture
def build_tiny_model(make_tiny_model):
    return make_tiny_model


@pytest.mark.parametrize(
    ("backbone", "size"), [("test-tiny", 32), ("test-tiny", 64), ("test-tiny-v2", 32), ("tiny", 64)]
)
def test_forward_shapes(backbone, size, build_tiny_model):
    model = build_tiny_model(backbone, size)
    out = model(torch.randn(2, 3, size, size))
    assert out.class_logits.shape == (2, len(TINY_CLASSES))
    assert out.mask_logits.shape == (2, 1, size, size)
    assert out.coarse_logits.shape == (2, 1, size // 8, size // 8)
    assert torch.isfinite(out.mask_logits).all() and torch.isfinite(out.class_logits).all()


def test_feature_indices_are_evenly_spaced_and_end_at_the_last_block():
    assert feature_indices(12, 4) == [2, 5, 8, 11]
    assert feature_indices(24, 4) == [5, 11, 17, 23]
    assert feature_indices(4, 4) == [0, 1, 2, 3]
    assert feature_indices(12, 1) == [11]
    with pytest.raises(ConfigError, match="model.feature_blocks: 5 is more than the backbone's 4 blocks"):
        feature_indices(4, 5)


def test_model_uses_the_configured_blocks(build_tiny_model):
    model = build_tiny_model(feature_blocks=2)
    assert model.feature_indices == [1, 3] and len(model.decoder.proj) == 2
    captured = []
    handles = [b.register_forward_hook(lambda m, i, o: captured.append(id(m))) for b in model.backbone_blocks()]
    model(torch.randn(1, 3, 32, 32))
    for h in handles:
        h.remove()
    assert len(captured) == 4


def test_mask_guided_pooling_depends_on_the_segmentation_logits(build_tiny_model):
    head = build_tiny_model().classifier
    tokens = torch.randn(2, 16, 32)
    flat = torch.zeros(2, 1, 4, 4)
    pooled_flat = head.pool(tokens, flat)
    assert torch.allclose(pooled_flat, tokens.mean(dim=1), atol=1e-6)  # uniform logits = mean pooling
    peaked = flat.clone()
    peaked[:, 0, 1, 2] = 30.0  # the seg branch is sure about patch 6
    pooled_peaked = head.pool(tokens, peaked)
    assert torch.allclose(pooled_peaked, tokens[:, 6], atol=1e-4)
    cls_token = torch.randn(2, 32)
    assert not torch.allclose(head(cls_token, tokens, flat), head(cls_token, tokens, peaked))


def _class_loss_reaches_decoder(model, x) -> bool:
    model.zero_grad()
    model(x).class_logits[:, 1].sum().backward()
    grad = model.decoder.coarse.weight.grad
    return grad is not None and bool(grad.abs().sum() > 0)


def _mask_steers_classifier(model, x) -> bool:
    """The coarse logits shift the classifier's output (forward), through pooling weights and mask statistics."""
    with torch.no_grad():
        before = model(x).class_logits.clone()
        model.decoder.coarse.bias += 3.0
        after = model(x).class_logits
        model.decoder.coarse.bias -= 3.0
    return not torch.allclose(before, after)


def test_the_mask_steers_the_classifier_but_the_classification_loss_does_not_train_it(build_tiny_model):
    """Gradient-flow adjustment (Bozic et al. 2021): the classifier reads the coarse mask logits, the class loss
    does not push them (it would light the mask up on whole defect images)."""
    model = build_tiny_model()
    x = torch.randn(2, 3, 32, 32)
    assert _mask_steers_classifier(model, x)
    assert not _class_loss_reaches_decoder(model, x)


def test_every_parameter_gets_a_gradient(build_tiny_model):
    """DDP fails on parameters that never receive a gradient."""
    model = build_tiny_model("test-tiny-v2").train()
    out = model(torch.randn(2, 3, 32, 32))
    (out.class_logits.sum() + out.mask_logits.sum()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_grad_checkpointing_gives_the_same_gradients(build_tiny_model):
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model = build_tiny_model(drop_path_rate=0.0).train()
        model.set_grad_checkpointing(enable)
        model(x).class_logits.sum().backward()
        grads.append(model.backbone.blocks[0].attn.qkv.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_class_names_must_start_with_normal():
    cfg = ModelConfig(backbone="test-tiny", pretrained=False)
    with pytest.raises(ModelError, match="must start with 'normal'"):
        DefectModel(cfg, 32, ["scratch", "normal"])
    with pytest.raises(ModelError, match="at least one defect class"):
        DefectModel(cfg, 32, ["normal"])
    with pytest.raises(ModelError, match="unique"):
        DefectModel(cfg, 32, ["normal", "a", "a"])


def test_image_size_must_tile_the_patch_grid():
    with pytest.raises(ConfigError, match=r"data\.image_size: 36 is not a multiple of test-tiny's patch size 8"):
        DefectModel(ModelConfig(backbone="test-tiny", pretrained=False), 36, TINY_CLASSES)


def _trainable(model, prefix="backbone."):
    return {n for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix)}


def test_freeze_and_unfreeze_stages(build_tiny_model):
    model = build_tiny_model()
    heads = {n for n, _ in model.named_parameters() if not n.startswith("backbone.")}
    model.freeze_backbone()
    assert _trainable(model) == set() and _trainable(model, "") == heads
    model.unfreeze_last(1)
    assert _trainable(model) == {
        n for n, _ in model.named_parameters() if n.startswith(("backbone.blocks.3.", "backbone.norm."))
    }
    model.unfreeze_last(2)
    assert any(n.startswith("backbone.blocks.2.") for n in _trainable(model))
    assert not any(
        n.startswith(("backbone.blocks.1.", "backbone.patch_embed", "backbone.cls_token")) for n in _trainable(model)
    )
    model.unfreeze_last(model.num_blocks)
    assert _trainable(model, "") == {n for n, _ in model.named_parameters()}
    model.freeze_backbone()
    model.unfreeze_all()
    assert all(p.requires_grad for p in model.parameters())


def test_param_groups_layer_decay_and_no_weight_decay(build_tiny_model):
    model = build_tiny_model()
    lr, head_lr, ld, wd = 1e-4, 1e-3, 0.5, 0.05
    groups = model.param_groups(lr, head_lr, wd, ld)
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(by_param) == len(names) == sum(len(g["params"]) for g in groups)  # each parameter exactly once

    def group(name):
        return by_param[id(names[name])]

    depth = model.num_blocks
    for i in range(depth):
        g = group(f"backbone.blocks.{i}.attn.qkv.weight")
        assert g["lr"] == pytest.approx(lr * ld ** (depth - 1 - i)) and g["weight_decay"] == wd
    assert group("backbone.norm.weight")["lr"] == pytest.approx(lr)
    assert group("backbone.patch_embed.proj.weight")["lr"] == pytest.approx(lr * ld**depth)
    assert group("classifier.fc2.weight")["lr"] == head_lr
    for no_decay in (
        "backbone.cls_token",
        "backbone.reg_token",
        "backbone.norm.weight",
        "backbone.blocks.0.gamma_1",
        "backbone.blocks.0.attn.proj.bias",
        "classifier.fc2.bias",
        "classifier.norm.weight",
    ):
        assert group(no_decay)["weight_decay"] == 0.0, no_decay
    assert group("decoder.proj.0.weight")["weight_decay"] == wd
    torch.optim.AdamW(groups)  # the groups are valid optimizer input


def test_param_groups_follow_trainable_blocks_and_requires_grad(build_tiny_model):
    model = build_tiny_model("test-tiny-v2")
    heads_only = model.param_groups(1e-4, 1e-3, 0.05, 0.75, trainable_blocks=0)
    assert {g["name"].split(".")[0] for g in heads_only} == {"heads"}
    last_two = model.param_groups(1e-4, 1e-3, 0.05, 0.75, trainable_blocks=2)
    assert {g["name"].split(".")[0] for g in last_two} == {"heads", "block3", "block2"}
    model.unfreeze_last(1)
    current = model.param_groups(1e-4, 1e-3, 0.05, 0.75)
    assert sum(len(g["params"]) for g in current) == sum(p.requires_grad for p in model.parameters())
    assert "backbone.pos_embed" in {n for n, p in model.named_parameters() if not p.requires_grad}
    everything = model.param_groups(1e-4, 1e-3, 0.05, 0.75, trainable_blocks=model.num_blocks)
    pos = next(g for g in everything if any(p is model.backbone.pos_embed for p in g["params"]))
    assert pos["weight_decay"] == 0.0 and pos["name"] == "embed.no_decay"


# ------------------------------------------------------------------------------------------------ CNN backbones
@pytest.mark.parametrize(("size", "shape"), [(64, (64, 64)), (96, (96, 96))])
def test_cnn_forward_shapes(size, shape, build_tiny_model):
    model = build_tiny_model("test-tiny-cnn", size)
    out = model(torch.randn(2, 3, *shape))
    assert out.class_logits.shape == (2, len(TINY_CLASSES))
    assert out.mask_logits.shape == (2, 1, *shape)
    assert out.coarse_logits.shape == (2, 1, shape[0] // 32, shape[1] // 32)
    assert isinstance(model.decoder, FPNDecoder) and model.num_blocks == 4


def test_cnn_every_parameter_gets_a_gradient_and_the_mask_steers_the_classifier(build_tiny_model):
    model = build_tiny_model("test-tiny-cnn", 64).train()
    out = model(torch.randn(2, 3, 64, 64))
    (out.class_logits.sum() + out.mask_logits.sum()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    x = torch.randn(2, 3, 64, 64)
    assert _mask_steers_classifier(model, x)
    assert not _class_loss_reaches_decoder(model, x)


@pytest.mark.parametrize(
    ("backbone", "stem", "level0", "level3"),
    [
        (
            "test-tiny-cnn",
            "backbone.conv1.0.weight",
            "backbone.layer1.0.conv1.weight",
            "backbone.layer4.0.conv2.weight",
        ),
        ("resnet18", "backbone.conv1.weight", "backbone.layer1.0.conv1.weight", "backbone.layer4.1.bn2.bias"),
        (
            "convnext-atto",
            "backbone.stem_0.weight",
            "backbone.stages_0.blocks.0.conv_dw.weight",
            "backbone.stages_3.blocks.1.mlp.fc2.bias",
        ),
        (
            "efficientnet-b0",
            "backbone.conv_stem.weight",
            "backbone.blocks.1.0.conv_pw.weight",
            "backbone.blocks.6.0.bn3.bias",
        ),
    ],
)
def test_cnn_stages_freeze_and_decay_like_blocks(backbone, stem, level0, level3):
    with torch.device("meta"):
        model = build_cnn(backbone)
    assert model._layer(stem.removeprefix("backbone.")) == -1
    assert model._layer(level0.removeprefix("backbone.")) == 0
    assert model._layer(level3.removeprefix("backbone.")) == 3
    model.unfreeze_last(1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert level3 in trainable and level0 not in trainable and stem not in trainable
    groups = model.param_groups(1e-3, 1e-2, 0.05, 0.5, trainable_blocks=4)
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert by_param[id(names[level3])]["lr"] == pytest.approx(1e-3)
    assert by_param[id(names[level0])]["lr"] == pytest.approx(1e-3 * 0.5**3)
    assert by_param[id(names[stem])]["lr"] == pytest.approx(1e-3 * 0.5**4)


def build_cnn(backbone):
    from raydefect.models.weights import fast_meta_init

    with fast_meta_init():
        return DefectModel(ModelConfig(backbone=backbone, pretrained=False), 64, TINY_CLASSES, load_weights=False)
