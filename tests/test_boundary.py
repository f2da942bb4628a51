"""The layers of docs/architecture.md: the core never imports Ray (only raydefect.pipelines and the CLI's commands
may), imports point down the layers, and there are no import cycles."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

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


def test_the_package_root_exports_lazily():
    """``raydefect.load_model`` & co. come from modules imported on first access (PEP 562), so `import raydefect`
    stays light and the root imports nothing statically (the import graph cannot see these edges, so they are
    checked here): each export resolves, from a module of a layer without Ray."""
    code = (
        "import sys, raydefect\n"
        "light = not ({'torch', 'ray', 'raydefect.api'} & set(sys.modules))\n"
        "names = [n for n in raydefect.__all__ if n != '__version__']\n"
        "assert names and all(callable(getattr(raydefect, n)) for n in names)\n"
        "print('LIGHT' if light and 'ray' not in sys.modules else 'HEAVY')\n"
    )
    assert _last_line(code) == "LIGHT"
    for name, module in raydefect.LAZY_EXPORTS.items():
        assert layer_of(module) is not None and layer_of(module) < LAYERS["raydefect.pipelines"], (name, module)
        assert getattr(raydefect, name).__module__ == module


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


# ------------------------------------------------------------------ the import graph: arrows point down, no cycles
PACKAGE_DIR = Path(raydefect.__file__).parent

#: Layer of each part of the package (the longest matching dotted prefix wins; ``raydefect`` itself is matched only
#: exactly). A module may import its own layer and lower ones, never a higher one. Every module must be placed.
LAYERS = {
    "raydefect": 0,  # the package root: __version__, and LAZY_EXPORTS (test_the_package_root_exports_lazily)
    "raydefect.errors": 0,
    "raydefect.console": 0,
    "raydefect.paths": 0,
    "raydefect.imaging": 0,
    "raydefect.geometry": 0,  # input geometry: letterbox, tiles, stitching (numpy + PIL)
    "raydefect.configs": 0,  # shipped YAML (package data)
    "raydefect.config": 1,
    "raydefect.models.registry": 1,  # the backbone registry is a leaf, so config may validate backbone names
    "raydefect.data": 2,
    "raydefect.models": 2,
    "raydefect.metrics": 2,
    "raydefect.inference": 3,
    "raydefect.viz": 3,
    "raydefect.engine": 4,
    "raydefect.tuning": 4,
    "raydefect.scoring": 4,
    "raydefect.tasks": 5,
    "raydefect.api": 5,  # the Python API: load_model / predict, read_scores, load_dataset (over tasks.predict)
    "raydefect.pipelines": 6,
    "raydefect.cli": 7,
}


def _module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = ["raydefect", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """module -> the raydefect modules it imports anywhere in its source: at the top, inside functions, under
    TYPE_CHECKING. Relative imports are resolved; ``from raydefect.x import y`` counts y when y is a submodule."""
    files = _module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets.add(module)
                targets.update(f"{module}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def layer_of(module: str) -> int | None:
    if module == "raydefect":
        return LAYERS["raydefect"]
    keys = [k for k in LAYERS if k != "raydefect" and (module == k or module.startswith(k + "."))]
    return LAYERS[max(keys, key=len)] if keys else None


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    assert "raydefect.pipelines.train" in graph["raydefect.cli.train"]  # imported inside the command only
    assert "raydefect.models.artifact" in graph["raydefect.inference.preprocess"]  # under TYPE_CHECKING only
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_module_has_a_layer():
    assert [m for m in import_graph() if layer_of(m) is None] == []


def test_imports_point_down_the_layers():
    upward = [
        f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
        for m, deps in sorted(import_graph().items())
        for d in sorted(deps)
        if (layer_of(d) or 0) > (layer_of(m) or 0)
    ]
    assert upward == []


def test_no_private_name_is_imported_from_another_module():
    """A name another module needs is public: ``from raydefect.x import _y`` and imports of a private module from
    outside its package hide a shared dependency (ruff's PLC2701 sees only imports between top-level packages)."""
    private = []
    for name, path in _module_files().items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("raydefect"):
                continue
            hidden = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            owner = node.module.rsplit(".", 1)[0]
            if node.module.rsplit(".", 1)[-1].startswith("_") and not package.startswith(owner):
                hidden.append(f"(module {node.module})")
            private += [f"{name}:{node.lineno} imports {node.module}.{h}" for h in hidden]
    assert private == []


MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500
#: Functions allowed over MAX_FUNCTION_LINES: only pure data tables, each with the reason it stays whole.
LONG_FUNCTIONS_ALLOWED: dict[str, str] = {}


def test_functions_and_modules_stay_short():
    """No function in raydefect/ over 80 lines (from ``def`` to its last line; decorators aside) and no module over
    500: a longer one is split into named steps. Ruff's PLR0915 and C901 bound statements and branches, not lines."""
    long_functions, long_modules = [], []
    for name, path in _module_files().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                where = f"{name}.{node.name}"
                if lines > MAX_FUNCTION_LINES and where not in LONG_FUNCTIONS_ALLOWED:
                    long_functions.append(f"{where} ({path.name}:{node.lineno}): {lines} lines")
    assert long_functions == []
    assert long_modules == []
    assert all(reason for reason in LONG_FUNCTIONS_ALLOWED.values())
