"""DESIGN.md's one rule: the core never imports Ray. Only raydefect.pipelines (and the CLI's commands) may."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import raydefect


def _core_modules() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.walk_packages(raydefect.__path__, "raydefect.")
        if not m.name.startswith(("raydefect.pipelines", "raydefect.cli"))
    )


def _last_line(code: str) -> str:
    """The last line `code` prints in a fresh interpreter (nothing imported yet), which must exit cleanly."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_core_modules_exist():
    names = _core_modules()
    assert "raydefect.config" in names and "raydefect.imaging" in names


def test_importing_every_core_module_leaves_ray_out():
    code = (
        "import importlib, sys\n"
        f"for name in {_core_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "print('RAY' if 'ray' in sys.modules else 'CLEAN')\n"
    )
    assert _last_line(code) == "CLEAN"


def test_scoring_tasks_need_no_torch(tiny_artifact):
    """Decoding, mask-finishing and write tasks get the pipeline's functions and an `ArtifactMeta` as arguments; only
    the model replicas need PyTorch. When unpickling the meta imported torch, every Ray worker that finished masks
    paid ~4 s of CPU and a few hundred MB for it (measured with py-spy in a camera-size run, 2026-11-24)."""
    import pickle

    from raydefect.models.artifact import read_artifact_meta

    meta = pickle.dumps(read_artifact_meta(str(tiny_artifact)))
    code = (
        "import pickle, sys\n"
        "import raydefect.pipelines.score, raydefect.scoring.scorer, raydefect.scoring.store\n"
        f"meta = pickle.loads({meta!r})\n"
        "assert meta.class_names\n"
        "print('TORCH' if 'torch' in sys.modules else 'CLEAN')\n"
    )
    assert _last_line(code) == "CLEAN"
