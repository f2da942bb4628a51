"""The model artifact: round trip, content-hash model id, atomic writes, and every broken artifact's error."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from raydefect.errors import ArtifactError, OutputError
from raydefect.models.artifact import (
    META_FILE,
    WEIGHTS_FILE,
    ArtifactMeta,
    load_artifact,
    read_artifact_meta,
    save_artifact,
)

THRESHOLDS = {"image": 0.5, "pixel": 0.5}


@pytest.fixture
def saved(tmp_path, tiny_artifact):
    """A private copy of the shared tiny artifact, safe to break."""
    out = tmp_path / "model"
    shutil.copytree(tiny_artifact, out)
    return out


def test_round_trip_gives_the_same_outputs(tmp_path, make_tiny_model):
    model = make_tiny_model("test-tiny-v2", seed=3)
    meta = save_artifact(model, tmp_path / "model", thresholds=THRESHOLDS, metrics={"val_f1": torch.tensor(0.75)})
    loaded = load_artifact(tmp_path / "model")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), loaded.model(x)
    assert torch.allclose(a.class_logits, b.class_logits, atol=1e-6)
    assert torch.allclose(a.mask_logits, b.mask_logits, atol=1e-6)
    assert loaded.meta == meta
    assert not loaded.model.training
    assert loaded.meta.metrics == {"val_f1": 0.75}


def test_model_yaml_holds_the_contract_fields(tiny_artifact):
    data = yaml.safe_load((tiny_artifact / META_FILE).read_text())
    for key in (
        "format_version",
        "raydefect_version",
        "model_id",
        "created_at",
        "backbone",
        "timm_name",
        "image_size",
        "mean",
        "std",
        "model",
        "class_names",
        "thresholds",
        "metrics",
        "weights_sha256",
    ):
        assert key in data, key
    assert data["backbone"] == "test-tiny" and data["timm_name"] == "vit_small_patch16_dinov3"
    assert data["class_names"] == ["normal", "scratch", "spot"] and data["image_size"] == 32
    assert data["thresholds"] == THRESHOLDS and data["mean"] == [0.485, 0.456, 0.406]
    assert data["model"]["decoder_dim"] == 16 and len(data["model_id"]) == 16
    assert sorted(p.name for p in tiny_artifact.iterdir()) == [WEIGHTS_FILE, META_FILE]


def test_model_id_is_a_content_hash(tmp_path, make_tiny_model):
    model = make_tiny_model(seed=4)
    first = save_artifact(model, tmp_path / "a", thresholds=THRESHOLDS, metrics={"f1": 0.1})
    again = save_artifact(model, tmp_path / "b", thresholds=THRESHOLDS, metrics={"f1": 0.9}, extra={"x": 1})
    assert first.model_id == again.model_id  # metrics, dates and extras do not change behaviour
    assert load_artifact(tmp_path / "a").meta.model_id == first.model_id
    other_threshold = save_artifact(model, tmp_path / "c", thresholds={"image": 0.4, "pixel": 0.5})
    assert other_threshold.model_id != first.model_id
    with torch.no_grad():
        model.classifier.fc2.bias.add_(0.01)
    changed = save_artifact(model, tmp_path / "d", thresholds=THRESHOLDS)
    assert changed.model_id != first.model_id


def test_save_is_atomic_replaces_artifacts_and_refuses_other_folders(tmp_path, make_tiny_model):
    model = make_tiny_model(seed=5)
    out = tmp_path / "model"
    save_artifact(model, out, thresholds=THRESHOLDS)
    second = save_artifact(model, out, thresholds={"image": 0.3, "pixel": 0.6})
    assert read_artifact_meta(out).model_id == second.model_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or old folders left
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="not a model artifact; refusing to overwrite"):
        save_artifact(model, precious, thresholds=THRESHOLDS)
    assert (precious / "notes.txt").read_text() == "keep"


def test_model_files_are_shared_like_every_other_output(tmp_path, make_tiny_model, monkeypatch):
    """safetensors creates its file 0600: a team's service account could read model.yaml but not the weights."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        save_artifact(make_tiny_model(), tmp_path / "model", thresholds=THRESHOLDS)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "model").iterdir()}
    assert modes == {"model.safetensors": 0o644, "model.yaml": 0o644}


def test_save_checks_its_arguments(tmp_path, make_tiny_model):
    model = make_tiny_model()
    with pytest.raises(ArtifactError, match=r"thresholds\.pixel must be a number in \[0, 1\]"):
        save_artifact(model, tmp_path / "m", thresholds={"image": 0.5, "pixel": 2})
    with pytest.raises(ValueError, match="image_size=64 does not match"):
        save_artifact(model, tmp_path / "m", thresholds=THRESHOLDS, image_size=64)
    meta = save_artifact(
        model,
        tmp_path / "m",
        thresholds=THRESHOLDS,
        image_size=32,
        class_names=["normal", "scratch", "spot"],
        model_cfg=model.model_cfg,
    )
    assert meta.image_size == 32


def test_load_accepts_the_run_folder_and_the_yaml(tmp_path, tiny_artifact):
    run = tmp_path / "runs" / "x"
    shutil.copytree(tiny_artifact, run / "model")
    expected = read_artifact_meta(tiny_artifact).model_id
    assert load_artifact(run).meta.model_id == expected
    assert load_artifact(run / "model" / META_FILE).meta.model_id == expected


def test_missing_folder(tmp_path):
    with pytest.raises(ArtifactError, match=r"model artifact not found: .*nowhere.*runs/<name>/model"):
        load_artifact(tmp_path / "nowhere")


def test_folder_without_model_yaml(tmp_path):
    with pytest.raises(ArtifactError, match=r"no model\.yaml, so this is not a raydefect model artifact"):
        load_artifact(tmp_path)


def test_corrupt_yaml(saved):
    (saved / META_FILE).write_text("model_id: [unclosed\n")
    with pytest.raises(ArtifactError, match=r"model\.yaml: corrupt YAML .*re-export"):
        load_artifact(saved)


def test_yaml_missing_fields(saved):
    data = yaml.safe_load((saved / META_FILE).read_text())
    del data["class_names"], data["thresholds"]
    (saved / META_FILE).write_text(yaml.safe_dump(data))
    with pytest.raises(ArtifactError, match=r"missing field\(s\) class_names, thresholds"):
        load_artifact(saved)


def test_newer_format_version(saved):
    data = yaml.safe_load((saved / META_FILE).read_text())
    data["format_version"] = 99
    (saved / META_FILE).write_text(yaml.safe_dump(data))
    with pytest.raises(ArtifactError, match="format_version 99 is newer .* upgrade raydefect"):
        load_artifact(saved)


def test_missing_weights(saved):
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"model\.safetensors is missing, the artifact is incomplete"):
        load_artifact(saved)


def test_truncated_weights(saved):
    path = saved / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ArtifactError, match="unreadable .*truncated or corrupt, re-copy or re-export"):
        load_artifact(saved)


def test_changed_weight_bytes_fail_verification(saved):
    path = saved / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's data: still a valid file
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"does not match weights_sha256 .*corrupt or replaced"):
        load_artifact(saved)
    assert load_artifact(saved, verify=False).meta.model_id  # verification can be skipped explicitly


def test_weight_file_bytes_are_deterministic(tmp_path, make_tiny_model):
    model = make_tiny_model(seed=6)
    save_artifact(model, tmp_path / "a", thresholds=THRESHOLDS)
    save_artifact(model, tmp_path / "b", thresholds=THRESHOLDS)
    assert (tmp_path / "a" / WEIGHTS_FILE).read_bytes() == (tmp_path / "b" / WEIGHTS_FILE).read_bytes()


def test_weights_from_another_architecture(saved):
    data = yaml.safe_load((saved / META_FILE).read_text())
    data["model"]["decoder_dim"] = 24
    (saved / META_FILE).write_text(yaml.safe_dump(data))
    with pytest.raises(ArtifactError, match=r"weights do not match the architecture in model\.yaml .*size mismatch"):
        load_artifact(saved)


def test_backbone_that_changed_meaning(saved):
    data = yaml.safe_load((saved / META_FILE).read_text())
    data["timm_name"] = "vit_tiny_patch16_224"
    (saved / META_FILE).write_text(yaml.safe_dump(data))
    with pytest.raises(ArtifactError, match="saved with backbone test-tiny = timm vit_tiny_patch16_224"):
        load_artifact(saved)


def test_hand_edited_threshold_gets_a_new_model_id(saved, capsys):
    data = yaml.safe_load((saved / META_FILE).read_text())
    old_id = data["model_id"]
    data["thresholds"]["image"] = 0.7
    (saved / META_FILE).write_text(yaml.safe_dump(data))
    loaded = load_artifact(saved)
    assert loaded.meta.image_threshold == 0.7 and loaded.meta.model_id != old_id
    assert "edited after saving" in capsys.readouterr().err


def test_meta_dict_round_trip(tiny_artifact):
    meta = read_artifact_meta(tiny_artifact)
    assert ArtifactMeta.from_dict(meta.to_dict()) == meta
    assert meta.defect_classes == ("scratch", "spot") and meta.pixel_threshold == 0.5


def test_cnn_round_trip_gives_the_same_outputs(tmp_path, make_tiny_model):
    model = make_tiny_model("test-tiny-cnn", image_size=64, seed=4)
    meta = save_artifact(model, tmp_path / "model", thresholds=THRESHOLDS, metrics={})
    loaded = load_artifact(tmp_path / "model")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), loaded.model(x)
    assert torch.allclose(a.class_logits, b.class_logits, atol=1e-6)
    assert torch.allclose(a.mask_logits, b.mask_logits, atol=1e-6)
    assert meta.backbone == "test-tiny-cnn" and loaded.meta == meta
