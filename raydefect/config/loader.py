"""Where a `Config` comes from and goes: shipped YAML names or files, explicit options and ``--set`` overrides (in
increasing priority over the dataclass defaults), the resolved config written into a run folder, and `describe`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from raydefect.config.sections import SCHEMA_VERSION, Config, build_config, set_dotted, suggest
from raydefect.errors import ConfigError
from raydefect.paths import write_atomic


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``--set section.key=value`` strings; values are YAML scalars/lists (``1e-4``, ``true``, ``[a, b]``)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set optim.lr=3e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({e.problem})") from None
        out[key.strip()] = value
    return out


def shipped_configs() -> dict[str, Path]:
    """Shipped YAML files by name (``default``, ``tune``, ...)."""
    root = resources.files("raydefect.configs")
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A shipped config name or a path to a YAML file."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if str(name_or_path) in shipped:  # a folder of the same name (e.g. `demo/` made by `make demo`) does not hide it
        return shipped[str(name_or_path)]
    if path.suffix in (".yaml", ".yml") or path.exists() or len(path.parts) > 1:
        raise ConfigError(f"config file not found: {path} (pass a YAML path or one of {sorted(shipped)})")
    raise ConfigError(f"unknown config '{name_or_path}'" + suggest(str(name_or_path), shipped))


def read_yaml(path: str | Path) -> Any:
    """`yaml.safe_load` of a file, with errors that name it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None


def load_config(
    config: str | Path | None = "default",
    options: Mapping[str, Any] | None = None,
    sets: Iterable[str] = (),
) -> Config:
    """Defaults <- YAML file <- explicit CLI options (dotted keys; None means "not given") <- ``--set`` items."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if config is not None:
        path = resolve_config_path(config)
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data, model, ...)")
        if "schema_version" in data:
            version = data.pop("schema_version")
            if version != SCHEMA_VERSION:
                raise ConfigError(f"{path}: schema_version {version} is not supported (expected {SCHEMA_VERSION})")
        build_config(data, source=str(path))  # validates the file on its own, so errors name it
        tree = {k: dict(v or {}) for k, v in data.items()}
        source = str(path)
    for key, value in (options or {}).items():
        if value is not None:
            set_dotted(tree, key, value, source="option")
    set_values = parse_set(sets)
    for key, value in set_values.items():
        set_dotted(tree, key, value, source="--set")
    return build_config(tree, source="--set" if set_values else source)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (with schema version) so a run can be reproduced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"schema_version": SCHEMA_VERSION, **cfg.to_dict()}
    return write_atomic(path, lambda tmp: tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8"))


def describe(cfg: Config | None = None) -> str:
    """YAML of a config with each field's documentation as a comment (``raydefect config``)."""
    cfg = cfg or Config()
    lines = [f"schema_version: {SCHEMA_VERSION}"]
    for section_field in dataclasses.fields(cfg):
        section = getattr(cfg, section_field.name)
        lines.append(f"{section_field.name}:")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            value = list(value) if isinstance(value, tuple) else value
            rendered = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
            rendered = rendered.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"  {f.name}: {rendered}  # {f.metadata.get('help', '')}")
    return "\n".join(lines) + "\n"
