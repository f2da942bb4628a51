"""Typed, frozen configuration (`sections`: the schema and its validation; `loader`: YAML, overrides, describe).

One `Config` holds eight frozen dataclass sections. Values come, in increasing priority, from the dataclass
defaults, a YAML file (a shipped name such as ``default`` or a path), explicit CLI options and repeatable
``--set section.key=value``. Unknown keys are errors with a closest-match suggestion; cross-field checks live in
``__post_init__`` and name the key the user typed. Configs cross process boundaries (Ray) as plain dicts and are
rebuilt -- and re-validated -- with `Config.from_dict`.

Each field carries its documentation in ``metadata["help"]`` (see `describe`), litgpt-style.
"""

from raydefect.config.fields import IMAGE_EXTENSIONS
from raydefect.config.loader import (
    describe,
    load_config,
    parse_set,
    read_yaml,
    resolve_config_path,
    save_config,
    shipped_configs,
)
from raydefect.config.scoring import ResourcesConfig, ScoreConfig
from raydefect.config.sections import (
    SCHEMA_VERSION,
    SECTIONS,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    TuneConfig,
    build_config,
    build_section,
    suggest,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SCHEMA_VERSION",
    "SECTIONS",
    "Config",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "ResourcesConfig",
    "ScheduleConfig",
    "ScoreConfig",
    "TrainConfig",
    "TuneConfig",
    "build_config",
    "build_section",
    "describe",
    "load_config",
    "parse_set",
    "read_yaml",
    "resolve_config_path",
    "save_config",
    "shipped_configs",
    "suggest",
]
