from __future__ import annotations

import dataclasses

import pytest
import yaml

from raydefect.config import (
    Config,
    describe,
    load_config,
    parse_set,
    read_yaml,
    save_config,
    shipped_configs,
)
from raydefect.errors import ConfigError


def _is_training_config(data: dict) -> bool:
    return isinstance(data, dict) and set(data) - {"schema_version"} <= set(Config.__dataclass_fields__)


def test_every_shipped_yaml_loads():
    """Training configs with the config loader, search spaces (a 'params' mapping) with the space loader."""
    from raydefect.tuning.space import SearchSpace, load_space

    configs = shipped_configs()
    assert {"default", "tune", "tune-demo"} <= set(configs)
    loaded = spaces = 0
    for name, path in configs.items():
        data = read_yaml(path)
        if isinstance(data, dict) and "params" in data:
            assert isinstance(load_space(name)[0], SearchSpace)
            spaces += 1
        elif _is_training_config(data):
            assert isinstance(load_config(name), Config)
            loaded += 1
        else:
            raise AssertionError(f"{path}: neither a training config nor a search space")
    assert loaded >= 1 and spaces >= 2


def test_default_yaml_matches_dataclass_defaults():
    assert load_config("default") == Config()


def test_default_yaml_lists_every_key_with_its_documentation():
    """configs/default.yaml is `raydefect config` as shipped: no key or description may drift from the dataclasses."""
    from raydefect.config import describe, shipped_configs

    shipped = shipped_configs()["default"].read_text(encoding="utf-8")
    body = "\n".join(line for line in shipped.splitlines() if not line.startswith("#")) + "\n"
    assert body == describe(Config())


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr'.*did you mean 'optim\.lr'"):
        load_config(None, sets=["optim.lrr=1e-3"])


def test_unknown_section_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        load_config(None, sets=["optm.lr=1e-3"])


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  bakbone: dinov3-b\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml.*model\.bakbone.*did you mean 'model\.backbone'"):
        load_config(path)


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.batch_size: expected an integer"):
        load_config(None, sets=["train.batch_size=abc"])
    with pytest.raises(ConfigError, match="data.augment: expected true or false"):
        load_config(None, sets=["data.augment=3"])


def test_cross_field_checks_name_the_key():
    with pytest.raises(ConfigError, match="schedule.frozen_epochs"):
        load_config(None, sets=["schedule.frozen_epochs=0", "schedule.partial_epochs=0", "schedule.full_epochs=0"])
    with pytest.raises(ConfigError, match="model.weights"):
        load_config(None, sets=["model.pretrained=false", "model.weights=/x.pth"])


def test_yaml_scientific_notation_is_a_number():
    assert load_config(None, sets=["optim.lr=3e-4"]).optim.lr == pytest.approx(3e-4)


def test_priority_defaults_file_options_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.002\n  head_lr: 0.02\ntrain:\n  batch_size: 4\n")
    cfg = load_config(path, options={"train.batch_size": 8, "optim.head_lr": None}, sets=["optim.lr=0.003"])
    assert cfg.optim.lr == 0.003  # --set beats the file
    assert cfg.train.batch_size == 8  # an explicit option beats the file
    assert cfg.optim.head_lr == 0.02  # None means "option not given"
    assert cfg.optim.weight_decay == Config().optim.weight_decay


def test_roundtrip_dict_and_file(tmp_path):
    cfg = load_config(None, sets=["score.extensions=[.png, .jpg]", "model.backbone=dinov2-s"])
    assert cfg.score.extensions == (".png", ".jpg")
    assert Config.from_dict(cfg.to_dict()) == cfg
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["schema_version"] == 1


def test_from_dict_revalidates():
    data = Config().to_dict()
    data["optim"]["lr"] = -1
    with pytest.raises(ConfigError, match="optim.lr"):
        Config.from_dict(data)


def test_configs_are_frozen_and_replace_validates():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    assert cfg.replace(**{"optim.lr": 0.01}).optim.lr == 0.01
    with pytest.raises(ConfigError):
        cfg.replace(**{"optim.lr": 5.0})


def test_parse_set_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_set(["optim.lr"])
    with pytest.raises(ConfigError, match="section.key"):
        load_config(None, sets=["lr=0.1"])


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml line \d+: invalid YAML"):
        load_config(path)


def test_missing_file_and_unknown_name():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/c.yaml")
    with pytest.raises(ConfigError, match="unknown config 'defualt'.*did you mean 'default'"):
        load_config("defualt")


def test_describe_documents_every_field():
    text = describe()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help"
            assert f"  {f.name}: " in text
    parsed = yaml.safe_load(text)
    parsed.pop("schema_version")
    assert Config.from_dict(parsed) == Config()


def test_a_folder_named_like_a_shipped_config_does_not_hide_it(tmp_path, monkeypatch):
    """`make demo` writes ./demo/; `--config demo` must still mean the shipped demo.yaml."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert load_config("demo").train.name == load_config(shipped_configs()["demo"]).train.name
    (tmp_path / "mine").mkdir()
    with pytest.raises(ConfigError, match="config file not found: mine"):
        load_config("mine")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("sub/c")
