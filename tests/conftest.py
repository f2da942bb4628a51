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
