"""Shared fixtures. One session-scoped local Ray for every test marked `ray` (starting Ray costs seconds)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download weights


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests without CUDA (they run on the GPU machine)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """An embedded local Ray shared by the whole session; logical CPUs > cores so small jobs can co-schedule."""
    import ray

    from raydefect.pipelines.cluster import connect

    connect(None, num_cpus=4)
    yield ray
    ray.shutdown()


TINY_CLASSES = ("normal", "scratch", "spot")


def build_tiny_model(backbone: str = "test-tiny", image_size: int = 32, seed: int = 0, **model_overrides):
    """A random tiny DefectModel (no weights are ever downloaded), seeded for reproducible tests."""
    import torch

    from raydefect.config import ModelConfig
    from raydefect.models.model import DefectModel

    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=backbone, pretrained=False, **{"decoder_dim": 16, "head_hidden": 16, **model_overrides})
    return DefectModel(cfg, image_size, TINY_CLASSES).eval()


@pytest.fixture(scope="session")
def make_tiny_model():
    """`build_tiny_model(backbone="test-tiny", image_size=32, seed=0, **model_overrides)` as a fixture."""
    return build_tiny_model


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """Path of a saved model artifact: random `test-tiny` backbone, classes normal/scratch/spot, 32 px, thresholds
    0.5/0.5. Shared (read-only!) by model, scoring, predict and evaluate tests."""
    from raydefect.models.artifact import save_artifact

    out = tmp_path_factory.mktemp("artifact") / "model"
    save_artifact(
        build_tiny_model(),
        out,
        thresholds={"image": 0.5, "pixel": 0.5},
        metrics={"val_f1": 0.5, "val_iou": 0.25},
        extra={"note": "tiny random test model"},
    )
    return out
