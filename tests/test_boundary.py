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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("CLEAN")
