"""The search space of `raydefect tune`: a small YAML schema turned into an Optuna define-by-run function.

    params:
      model.backbone: {type: categorical, choices: [dinov3-s, dinov3-b, dinov3-l]}
      optim.lr: {type: loguniform, low: 1e-5, high: 1e-3, by: model.backbone, ranges: {dinov3-l: [5e-6, 2e-4]}}
      optim.weight_decay: {type: loguniform, low: 1e-3, high: 0.2}
      schedule.frozen_epochs: {type: int, low: 0, high: 3}

Every key is a dotted config key (``raydefect config`` lists them). Types: ``categorical`` (``choices``), ``uniform``
and ``loguniform`` (``low``, ``high``), ``int`` (``low``, ``high``, optional ``step`` or ``log: true``). A numeric
parameter may take its range from the value of a categorical one (``by`` + ``ranges``: bigger backbones want smaller
learning rates); values without an entry in ``ranges`` use ``low``/``high``. Optuna sees each conditional branch as
its own parameter (``optim.lr|dinov3-l``), so TPE models every backbone's learning rate separately; the trial gets
the plain config key.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raydefect.config import SECTIONS, Config, read_yaml, resolve_config_path, suggest
from raydefect.errors import ConfigError

TYPES = ("categorical", "uniform", "loguniform", "int")
_PARAM_KEYS = {"type", "choices", "low", "high", "step", "log", "by", "ranges"}
#: Keys a trial must not change: where data and runs live, the study's own settings.
NOT_SEARCHABLE = ("data.dataset", "train.name", "train.runs_dir", "tune.", "score.", "resources.")
BRANCH_SEP = "|"


@dataclass(frozen=True)
class Param:
    """One searched config key."""

    key: str
    type: str
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    by: str | None = None
    ranges: Mapping[Any, tuple[float, float]] = field(default_factory=dict)

    def bounds(self, condition: Any = None) -> tuple[float, float]:
        if self.by is not None and condition in self.ranges:
            return self.ranges[condition]
        return float(self.low), float(self.high)  # type: ignore[arg-type]

    def optuna_name(self, condition: Any = None) -> str:
        return self.key if self.by is None else f"{self.key}{BRANCH_SEP}{condition}"


@dataclass(frozen=True)
class SearchSpace:
    """Parameters in sampling order (a parameter another one depends on comes first). Picklable: Ray Tune stores
    the searcher with its define-by-run function in the experiment state, so that `--resume` can continue."""

    params: tuple[Param, ...]
    source: str = "space"

    def __call__(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run: suggest every parameter; return the config values keyed by config key."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.type == "categorical":
                values[p.key] = trial.suggest_categorical(p.key, list(p.choices))
                continue
            condition = values.get(p.by) if p.by else None
            low, high = p.bounds(condition)
            name = p.optuna_name(condition)
            if p.type == "int":
                step = int(p.step or 1)
                values[p.key] = trial.suggest_int(name, int(low), int(high), step=step, log=p.log)
            else:
                kwargs = {"step": p.step} if p.step else {"log": p.type == "loguniform"}
                values[p.key] = trial.suggest_float(name, low, high, **kwargs)
        return values

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def get(self, key: str) -> Param | None:
        return next((p for p in self.params if p.key == key), None)


def config_params(values: Mapping[str, Any]) -> dict[str, Any]:
    """The config keys of a suggestion (Optuna's per-branch names dropped)."""
    return {k: v for k, v in values.items() if BRANCH_SEP not in k}


def _number(value: Any, where: str) -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)  # YAML 1.1 reads 1e-5 as a string
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _check_key(key: str, where: str) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{where}: '{key}' must be a dotted config key like optim.lr")
    section, name = parts
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section '{section}' in '{key}'" + suggest(section, SECTIONS))
    fields = SECTIONS[section].__dataclass_fields__
    if name not in fields:
        raise ConfigError(f"{where}: unknown config key '{key}'" + suggest(name, fields, prefix=f"{section}."))
    if key.startswith(NOT_SEARCHABLE) or key in NOT_SEARCHABLE:
        raise ConfigError(f"{where}: '{key}' cannot be searched (a study sets it for every trial); remove it")


def _range(low: Any, high: Any, log: bool, where: str) -> tuple[float, float]:
    lo, hi = _number(low, f"{where}.low"), _number(high, f"{where}.high")
    if lo >= hi:
        raise ConfigError(f"{where}: low ({lo:g}) must be smaller than high ({hi:g}); swap or widen them")
    if log and lo <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {lo:g}; use type: uniform or a positive low")
    return lo, hi


def _parse_param(key: str, spec: Any, source: str) -> Param:
    where = f"{source}: params.{key}"
    _check_key(key, f"{source}: params")
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping like {{type: loguniform, low: 1e-5, high: 1e-3}}")
    unknown = set(spec) - _PARAM_KEYS
    if unknown:
        bad = sorted(map(str, unknown))[0]
        raise ConfigError(f"{where}: unknown field '{bad}'" + suggest(bad, _PARAM_KEYS))
    kind = spec.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{where}: unknown type {kind!r}" + suggest(str(kind), TYPES).replace("keys", "types"))
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: categorical needs a non-empty list 'choices'")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where}: choices repeat a value; list each once")
        extra = {"low", "high", "step", "log", "by", "ranges"} & set(spec)
        if extra:
            raise ConfigError(f"{where}: categorical takes only 'choices', not {sorted(extra)}")
        return Param(key=key, type=kind, choices=tuple(choices))
    if "choices" in spec:
        raise ConfigError(f"{where}: 'choices' belongs to type: categorical")
    log = kind == "loguniform" or bool(spec.get("log", False))
    if kind == "uniform" and spec.get("log"):
        raise ConfigError(f"{where}: use type: loguniform instead of uniform with log: true")
    low, high = _range(spec.get("low"), spec.get("high"), log, where)
    step = spec.get("step")
    if step is not None:
        step = _number(step, f"{where}.step")
        if step <= 0 or log:
            raise ConfigError(f"{where}: step must be > 0 and cannot be combined with a log scale")
    if kind == "int" and (not float(low).is_integer() or not float(high).is_integer()):
        raise ConfigError(f"{where}: type int needs whole low/high, got {low:g}..{high:g}")
    by, ranges = spec.get("by"), spec.get("ranges")
    parsed: dict[Any, tuple[float, float]] = {}
    if (by is None) != (ranges is None):
        raise ConfigError(f"{where}: a conditional range needs both 'by' (a categorical parameter) and 'ranges'")
    if by is not None:
        if not isinstance(ranges, Mapping) or not ranges:
            raise ConfigError(f"{where}.ranges: expected a mapping like {{dinov3-l: [5e-6, 2e-4]}}")
        for value, pair in ranges.items():
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ConfigError(f"{where}.ranges.{value}: expected [low, high]")
            parsed[value] = _range(pair[0], pair[1], log, f"{where}.ranges.{value}")
    return Param(key=key, type=kind, low=low, high=high, step=step, log=log, by=by, ranges=parsed)


def parse_space(data: Any, source: str = "space") -> SearchSpace:
    """A space mapping (the YAML's content) -> `SearchSpace`; every mistake is a `ConfigError` naming the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping with 'params' (see configs/tune.yaml)")
    data = {k: v for k, v in data.items() if k != "schema_version"}
    unknown = set(data) - {"params"}
    if unknown:
        bad = sorted(map(str, unknown))[0]
        raise ConfigError(f"{source}: unknown top-level key '{bad}'; a space file holds 'params' only")
    raw = data.get("params")
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{source}: 'params' must map config keys to parameter specs (see configs/tune.yaml)")
    params = {str(k): _parse_param(str(k), v, source) for k, v in raw.items()}
    for p in params.values():
        if p.by is None:
            continue
        parent = params.get(p.by)
        if parent is None:
            raise ConfigError(
                f"{source}: params.{p.key}.by: '{p.by}' is not a parameter of this space" + suggest(p.by, params)
            )
        if parent.type != "categorical":
            raise ConfigError(
                f"{source}: params.{p.key}.by: '{p.by}' is {parent.type}; a range can depend on a categorical only"
            )
        stray = [v for v in p.ranges if v not in parent.choices]
        if stray:
            raise ConfigError(
                f"{source}: params.{p.key}.ranges: {stray[0]!r} is not a choice of {p.by} "
                f"({', '.join(map(str, parent.choices))})"
            )
    ordered = [p for p in params.values() if p.type == "categorical"] + [
        p for p in params.values() if p.type != "categorical"
    ]
    return SearchSpace(params=tuple(ordered), source=source)


def resolve_space_path(name_or_path: str | Path) -> Path:
    """A shipped space name (``tune``, ``tune-demo``) or a YAML path."""
    return resolve_config_path(name_or_path)


def load_space(name_or_path: str | Path) -> tuple[SearchSpace, dict[str, Any]]:
    """(parsed space, raw mapping) of a space file; the raw mapping is stored in the study for `--resume`."""
    path = resolve_space_path(name_or_path)
    data = read_yaml(path)
    return parse_space(data, source=str(path)), data


def check_space(space: SearchSpace, base: Config, apply: Any) -> None:
    """Every choice and every range end, applied alone to the trial config ``apply(base, params)``, must give a
    valid config (a wrong backbone name, an image size the patch does not tile, lr >= 1...): found before any trial
    runs, with the space file and key in the message."""
    for p in space.params:
        if p.type == "categorical":
            probes = [{p.key: c} for c in p.choices]
        else:
            ends: set[float] = {p.low, p.high}  # type: ignore[arg-type]
            for lo, hi in p.ranges.values():
                ends |= {lo, hi}
            probes = [{p.key: int(v) if p.type == "int" else v} for v in sorted(ends)]
        for probe in probes:
            try:
                apply(base, probe)
            except ConfigError as e:
                value = next(iter(probe.values()))
                raise ConfigError(f"{space.source}: params.{p.key} = {value!r} is not valid: {e}") from None
