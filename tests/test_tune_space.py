"""The search space, the study folder and `train --best` / `tune` CLI checks that need no Ray (fast)."""

from __future__ import annotations

import math
import os
import time

import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner

from raydefect.cli import cli
from raydefect.config import Config, load_config
from raydefect.errors import ConfigError, StudyError, TrainingError
from raydefect.tuning.space import BRANCH_SEP, check_space, config_params, load_space, parse_space
from raydefect.tuning.study import (
    ERROR,
    STOPPED,
    TERMINATED,
    best_file,
    collect_trials,
    find_study,
    rank,
    trial_config,
    write_best,
    write_study,
    write_trial_record,
    write_trials_csv,
    write_tune_status,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _space(params: dict) -> dict:
    return {"params": params}


LR = {"type": "loguniform", "low": 1e-5, "high": 1e-3}
BACKBONE = {"type": "categorical", "choices": ["dinov3-s", "dinov3-b", "dinov3-l"]}


def test_shipped_spaces_load_and_every_value_makes_a_valid_config():
    space, raw = load_space("tune")
    assert space.keys[0] == "model.backbone" and "optim.lr" in space.keys and raw["params"]
    assert space.get("optim.lr").by == "model.backbone"
    check_space(space, load_config("default"), trial_config)
    demo, _ = load_space("tune-demo")
    check_space(demo, load_config("demo"), trial_config)
    scratch, _ = load_space("tune-scratch")  # across CNN families, from scratch
    assert {"resnet10t", "resnet18", "convnext-atto", "efficientnet-b0"} <= set(scratch.get("model.backbone").choices)
    check_space(scratch, load_config("scratch"), trial_config)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"optim.lrr": LR}, r"unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
        ({"optimm.lr": LR}, r"unknown section 'optimm'.*did you mean 'optim'"),
        ({"optim.lr": {"type": "logunifrom", "low": 1e-5, "high": 1e-3}}, r"unknown type 'logunifrom'.*loguniform"),
        ({"optim.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-5}}, r"params.optim.lr: low \(0.001\) must be"),
        ({"optim.lr": {"type": "loguniform", "low": 0, "high": 1e-3}}, r"log scale needs low > 0"),
        ({"optim.lr": {"type": "uniform", "low": "a", "high": 1}}, r"params.optim.lr.low: expected a number"),
        ({"optim.lr": {"type": "loguniform", "low": 1e-5, "hihg": 1e-3}}, r"unknown field 'hihg'.*'high'"),
        ({"model.backbone": {"type": "categorical", "choices": []}}, r"non-empty list 'choices'"),
        ({"data.dataset": {"type": "categorical", "choices": ["a"]}}, r"'data.dataset' cannot be searched"),
        ({"schedule.frozen_epochs": {"type": "int", "low": 0.5, "high": 3}}, r"type int needs whole low/high"),
        (
            {
                "optim.weight_decay": {"type": "uniform", "low": 0, "high": 1},
                "optim.lr": {**LR, "by": "optim.weight_decay", "ranges": {0: [1e-5, 1e-4]}},
            },
            r"params.optim.lr.by: 'optim.weight_decay' is uniform; a range can depend on a categorical only",
        ),
        (
            {"optim.lr": {**LR, "by": "model.backbone", "ranges": {"dinov3-l": [1e-5, 1e-4]}}},
            r"'model.backbone' is not a parameter of this space",
        ),
        (
            {
                "model.backbone": BACKBONE,
                "optim.lr": {**LR, "by": "model.backbone", "ranges": {"dinov3-x": [1e-6, 1e-5]}},
            },
            r"ranges: 'dinov3-x' is not a choice of model.backbone",
        ),
        (
            {
                "model.backbone": BACKBONE,
                "optim.lr": {**LR, "by": "model.backbone", "ranges": {"dinov3-l": [1e-4, 1e-5]}},
            },
            r"ranges.dinov3-l: low .* must be smaller than high",
        ),
        ({"optim.lr": {**LR, "by": "model.backbone"}}, r"needs both 'by' .* and 'ranges'"),
    ],
)
def test_bad_space_errors_name_the_key_and_the_fix(params, match):
    with pytest.raises(ConfigError, match=match):
        parse_space(_space(params), source="space.yaml")


def test_bad_space_shapes():
    with pytest.raises(ConfigError, match="'params' must map config keys"):
        parse_space({"params": []})
    with pytest.raises(ConfigError, match="unknown top-level key 'param'"):
        parse_space({"param": {}})
    with pytest.raises(ConfigError, match="expected a mapping with 'params'"):
        parse_space(["optim.lr"])


def test_values_that_break_the_config_are_found_before_any_trial(tmp_path):
    base = load_config("default")
    bad_backbone = parse_space(
        _space({"model.backbone": {"type": "categorical", "choices": ["dinov3-s", "dinov3-xl"]}}), "s.yaml"
    )
    with pytest.raises(
        ConfigError, match=r"s.yaml: params.model.backbone = 'dinov3-xl' is not valid: .*unknown backbone"
    ):
        check_space(bad_backbone, base, trial_config)
    patch14 = parse_space(
        _space({"model.backbone": {"type": "categorical", "choices": ["tiny", "dinov2-s"]}}), "s.yaml"
    )
    with pytest.raises(ConfigError, match=r"'dinov2-s' is not valid: .*data.image_size"):
        check_space(patch14, load_config("demo"), trial_config)  # 64 px is no multiple of DINOv2's 14-px patch
    too_big = parse_space(_space({"optim.lr": {"type": "uniform", "low": 0.1, "high": 2.0}}), "s.yaml")
    with pytest.raises(ConfigError, match=r"params.optim.lr = 2.0 is not valid: .*optim.lr: must be in \(0, 1\)"):
        check_space(too_big, base, trial_config)


def test_conditional_ranges_are_sampled_per_backbone():
    space, _ = load_space("tune")
    ranges = {"dinov3-s": (2e-5, 5e-4), "dinov3-b": (1e-5, 3e-4), "dinov3-l": (5e-6, 1.5e-4)}
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=1), direction="maximize")
    seen = set()
    for _ in range(40):
        trial = study.ask()
        values = space(trial)
        backbone, lr = values["model.backbone"], values["optim.lr"]
        lo, hi = ranges[backbone]
        assert lo <= lr <= hi
        assert f"optim.lr{BRANCH_SEP}{backbone}" in trial.params  # each branch is its own Optuna parameter
        assert 0 <= values["schedule.frozen_epochs"] <= 3 and isinstance(values["schedule.frozen_epochs"], int)
        assert set(config_params(trial.params)) == set(values) - {"optim.lr"}
        seen.add(backbone)
        study.tell(trial, -abs(math.log10(lr) + 4))
    assert seen == set(ranges)


def test_trial_config_is_low_fidelity_and_best_config_is_not(tmp_path):
    base = load_config(
        "default",
        sets=["tune.subset=0.25", "tune.image_size=112", "tune.epochs=4", "tune.metric=val_f1", "tune.mode=max"],
    )
    params = {"optim.lr": 3e-4, "schedule.frozen_epochs": 4}
    cfg = trial_config(base, params)
    assert cfg.optim.lr == 3e-4 and cfg.data.subset == 0.25 and cfg.data.image_size == 112
    # 4 trial epochs spread over the stages in the proportion of the params' full schedule (4, 2, 4)
    assert (cfg.schedule.frozen_epochs, cfg.schedule.partial_epochs, cfg.schedule.full_epochs) == (1, 1, 2)
    assert cfg.schedule.metric == "val_f1" and cfg.train.max_failures == 0 and cfg.train.keep_checkpoints == 1

    root = tmp_path / "runs" / "tune-s"
    study = write_study(root, "s", base, {"params": {}}, "tune")
    _fake_trial(root, "a1", params, [0.5, 0.7], planned=4, finished=True, metric="val_f1")
    rows = collect_trials(root, "val_f1", "max")
    path = write_best(study, rows)
    best = load_config(path)
    assert isinstance(best, Config)
    assert best.optim.lr == 3e-4 and best.schedule.frozen_epochs == 4
    assert best.data.subset == base.data.subset and best.data.image_size == 224 and best.schedule.full_epochs == 4
    assert best.train.name == "s-best" and best.train.runs_dir == str(tmp_path / "runs")  # next to the study
    header = path.read_text().splitlines()[0]
    assert header.startswith("# Best config of study s: trial a1, val_f1 0.7")


def _fake_trial(root, trial_id, params, values, planned, finished=False, error=None, metric="val_score"):
    """A trial folder as a trial writes it: trial.json + metrics.csv."""
    from raydefect.engine.run import write_metrics_csv

    run = root / "trials" / trial_id
    start = 1000.0
    write_trial_record(run, trial_id=trial_id, params=params, planned_epochs=planned, started_at=start)
    rows = [
        {"epoch": i + 1, metric: v, "seconds": 2.0, "finished_at": start + 3 * (i + 1)} for i, v in enumerate(values)
    ]
    if rows:
        write_metrics_csv(run / "metrics.csv", rows)
    if finished:
        write_trial_record(run, finished_at=start + 3 * len(values) + 1)
    if error:
        write_trial_record(run, error=error, failed_at=start + 5)
    return run


def test_trials_csv_statuses_ranking_and_plots(tmp_path):
    from raydefect.tuning.plots import importances, write_study_plots

    root = tmp_path / "tune-x"
    base = load_config("default")
    study = write_study(root, "x", base, {"params": {}}, "tune")
    space = parse_space(_space({"model.backbone": BACKBONE, "optim.lr": LR}))
    _fake_trial(root, "t1", {"model.backbone": "dinov3-s", "optim.lr": 1e-4}, [0.5, 0.6, 0.55], 3, finished=True)
    _fake_trial(root, "t2", {"model.backbone": "dinov3-b", "optim.lr": 3e-4}, [0.9], 3)  # ASHA stopped it
    _fake_trial(root, "t3", {"model.backbone": "dinov3-l", "optim.lr": 1e-5}, [], 3, error="TrainingError: loss nan")
    _fake_trial(root, "t4", {"model.backbone": "dinov3-s", "optim.lr": 5e-5}, [0.4], 3)  # interrupted, Tune: running
    # ASHA stopped t5: Tune removed its workers, so the trial saw an error on the way out; Tune's status wins
    t5 = _fake_trial(root, "t5", {"model.backbone": "dinov3-s", "optim.lr": 2e-4}, [0.3], 3, error="ActorDiedError: x")
    write_tune_status(t5, TERMINATED)
    rows = collect_trials(root, "val_score", "max", {"t1": TERMINATED, "t2": TERMINATED, "t3": ERROR, "t4": "RUNNING"})
    by_id = {r.trial_id: r for r in rows}
    assert by_id["t5"].status == STOPPED and by_id["t5"].error == ""
    rows = [r for r in rows if r.trial_id != "t5"]
    assert [by_id[t].status for t in ("t1", "t2", "t3", "t4")] == [TERMINATED, STOPPED, ERROR, "RUNNING"]
    assert by_id["t1"].metric_best == 0.6 and by_id["t1"].metric_last == 0.55 and by_id["t1"].epochs == 3
    assert by_id["t1"].duration_s == pytest.approx(10.0) and by_id["t1"].train_s == pytest.approx(6.0)
    assert by_id["t3"].error == "TrainingError: loss nan" and math.isnan(by_id["t3"].metric_best)
    # fully trained trials rank before those stopped early (lower fidelity), whatever their metric
    assert [r.trial_id for r in rank(rows, "max")] == ["t1", "t2"]

    csv_path = write_trials_csv(root, rows, space.keys, "val_score")
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "trial_id,model.backbone,optim.lr,val_score_best,val_score_last,epochs,status,error,duration_s"
    assert lines[3].startswith("t3,dinov3-l,1e-05,,,0,ERROR,TrainingError: loss nan,")
    best = write_best(study, rows)
    assert "trial t1" in best.read_text().splitlines()[0]

    values, method = importances(rows, space, "max")
    assert set(values) == {"model.backbone", "optim.lr"} and sum(values.values()) == pytest.approx(1.0)
    assert method
    plots = write_study_plots(root, rows, space, "val_score", "max")
    for path in plots.values():
        assert path.is_file() and path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"


def test_no_finished_trial_means_no_best_yaml_and_a_clear_error(tmp_path):
    root = tmp_path / "tune-y"
    study = write_study(root, "y", load_config("default"), {"params": {}}, "tune")
    _fake_trial(root, "t1", {}, [], 3, error="RuntimeError: boom")
    assert write_best(study, collect_trials(root, "val_score", "max")) is None
    with pytest.raises(StudyError, match=r"study tune-y has no finished trial.*raydefect tune --resume --name y"):
        best_file(root)


def test_find_study_by_name_path_and_latest(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(StudyError, match=r"no study under .*run `raydefect tune --data DATASET` first"):
        find_study(None, runs)
    old = write_study(runs / "tune-old", "old", load_config("default"), {"params": {}}, "tune").root
    new = write_study(runs / "tune-new", "new", load_config("default"), {"params": {}}, "tune").root
    past = time.time() - 100
    os.utime(old / "study.yaml", (past, past))
    assert find_study(None, runs) == new
    (old / "trials.csv").write_text("trial_id\n")  # the old study changed last
    assert find_study(None, runs) == old
    assert find_study("new", runs) == new and find_study("tune-new", runs) == new
    assert find_study(str(new), tmp_path / "elsewhere") == new
    with pytest.raises(StudyError, match=r"no study 'neww'.*studies in .*: new, old"):
        find_study("neww", runs)


def test_nan_loss_fails_fast_with_a_clear_error(make_tiny_model):
    from raydefect.engine.loop import train_one_epoch
    from raydefect.models.losses import LossOutput

    net = make_tiny_model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    calls = []

    def loss_fn(*_args):
        calls.append(1)
        value = torch.tensor(float("nan") if len(calls) == 2 else 1.0, requires_grad=True)
        return LossOutput(value, value.detach(), value.detach(), value.detach())

    batch = {
        "image": torch.zeros(2, 3, 32, 32),
        "class_id": torch.zeros(2, dtype=torch.long),
        "mask": torch.zeros(2, 1, 32, 32),
        "mask_valid": torch.ones(2, dtype=torch.bool),
    }
    with pytest.raises(TrainingError, match=r"training loss became nan at batch 2: training diverged; lower optim.lr"):
        train_one_epoch(net, loss_fn, opt, sched, [batch] * 4, 4, device=torch.device("cpu"))
    assert len(calls) == 2  # stopped at the first NaN, not at the end of the epoch


def test_concurrency_from_cluster_resources():
    from raydefect.pipelines.tune import concurrency

    cfg = load_config("default", sets=["tune.num_samples=8", "resources.num_workers=2", "resources.cpus_per_worker=2"])
    assert concurrency(cfg, False, {"CPU": 16.0}) == 4
    assert concurrency(cfg, False, {"CPU": 3.0}) == 1  # never 0: one trial runs (it waits for its workers)
    assert concurrency(cfg.replace(**{"resources.gpus_per_worker": 0.5}), True, {"GPU": 8.0, "CPU": 2}) == 8
    assert concurrency(cfg, True, {"GPU": 3.0}) == 1
    assert concurrency(cfg.replace(**{"tune.num_samples": 2}), False, {"CPU": 64.0}) == 2
    assert concurrency(cfg.replace(**{"tune.max_concurrent": 5}), False, {"CPU": 1.0}) == 5


# ------------------------------------------------------------------------------------------------------- CLI
def test_tune_help_and_resume_refuses_new_settings(tmp_path):
    runner = CliRunner()
    out = runner.invoke(cli, ["tune", "--help"])
    assert out.exit_code == 0
    for flag in (
        "--data",
        "--name",
        "--space",
        "--num-samples",
        "--time-budget",
        "--metric",
        "--mode",
        "--max-concurrent",
        "--resume",
        "--config",
        "--set",
    ):
        assert flag in out.output
    out = runner.invoke(cli, ["tune", "--resume", "--space", "tune", "--num-samples", "3"])
    assert out.exit_code == 2 and "drop --space, --num-samples" in out.output


def test_tune_bad_space_file_is_one_line_before_ray(tmp_path, synth_dataset):
    bad = tmp_path / "space.yaml"
    bad.write_text(yaml.safe_dump({"params": {"optim.lr": {"type": "loguniform", "low": 1e-2, "high": 1e-4}}}))
    out = CliRunner().invoke(
        cli,
        [
            "tune",
            "--data",
            str(synth_dataset.root),
            "--space",
            str(bad),
            "--set",
            f"train.runs_dir={tmp_path / 'runs'}",
        ],
    )
    assert out.exit_code == 1
    assert (
        out.output.strip()
        == f"error: {bad}: params.optim.lr: low (0.01) must be smaller than high (0.0001); swap or widen them"
    )
    assert not (tmp_path / "runs").exists()  # checked before anything is written or Ray is joined


def test_train_best_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    out = runner.invoke(cli, ["train", "--best"])
    assert out.exit_code == 1 and "error: no study under" in out.output and "raydefect tune --data" in out.output
    write_study(tmp_path / "runs" / "tune-s", "s", load_config("default"), {"params": {}}, "tune")
    out = runner.invoke(cli, ["train", "--best", "s"])
    assert out.exit_code == 1 and "study tune-s has no finished trial" in out.output
    out = runner.invoke(cli, ["train", "--best", "nope"])
    assert out.exit_code == 1 and "no study 'nope'" in out.output
    out = runner.invoke(cli, ["train", "--best", "s", "--config", "demo"])
    assert out.exit_code == 2 and "drop --config" in out.output


def test_tune_checks_every_backbones_weights_before_starting(tmp_path, synth_dataset, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    out = CliRunner().invoke(
        cli, ["tune", "--data", str(synth_dataset.root), "--set", f"train.runs_dir={tmp_path / 'runs'}"]
    )  # the shipped space: pretrained dinov3-s/b/l
    assert out.exit_code == 1 and out.output.startswith("error: ") and "dinov3" in out.output, out.output
    assert not (tmp_path / "runs").exists()


def test_a_trial_that_dies_before_its_function_runs_is_still_a_row(tmp_path, capsys):
    """On a cluster a trial's actor can die before the trial writes anything (a lost node, raydefect not importable
    on the workers): the driver's own record makes it a failed row of trials.csv, not '0 of 0 trials'."""
    from types import SimpleNamespace

    from raydefect.pipelines.tune import StudyCallback, finish_study

    root = tmp_path / "tune-z"
    base = load_config("default", sets=["tune.epochs=3"])
    study = write_study(root, "z", base, {"params": {}}, "tune")
    space = parse_space(_space({"model.backbone": BACKBONE, "optim.lr": LR}))
    callback = StudyCallback(str(root), "val_score", "max", space.keys, base)

    def trial(trial_id, backbone, trace=None):
        config = {"model.backbone": backbone, "optim.lr": 1e-4, f"optim.lr{BRANCH_SEP}{backbone}": 1e-4}
        return SimpleNamespace(trial_id=trial_id, config=config, status="RUNNING", get_error=lambda: trace)

    ok = trial("t1", "dinov3-s")
    trace = "Traceback (most recent call last):\n  File x\nModuleNotFoundError: No module named 'x'\n"
    dead = trial("t2", "dinov3-b", trace)
    for t in (ok, dead):
        callback.on_trial_start(0, [], t)
    _fake_trial(root, "t1", config_params(ok.config), [0.5, 0.6, 0.7], 3, finished=True)
    callback.on_trial_complete(0, [], ok)
    callback.on_trial_error(0, [], dead)

    result = finish_study(study, space, {}, {}, 2, 10.0)
    by_id = {r.trial_id: r for r in result.rows}
    assert set(by_id) == {"t1", "t2"}
    assert by_id["t1"].status == TERMINATED and by_id["t1"].metric_best == 0.7
    assert by_id["t2"].status == ERROR and by_id["t2"].error == "ModuleNotFoundError: No module named 'x'"
    assert by_id["t2"].params == {"model.backbone": "dinov3-b", "optim.lr": 1e-4}
    assert by_id["t2"].planned_epochs == 3 and by_id["t2"].epochs == 0
    assert "1 of 2 trials finished, 1 failed" in capsys.readouterr().out
    assert "t2,dinov3-b,0.0001,,,0,ERROR,ModuleNotFoundError: No module named 'x'," in result.trials_csv.read_text()


def test_tune_on_an_unreachable_cluster_leaves_no_study(tmp_path, synth_dataset, monkeypatch):
    """The cluster is joined before the study folder is written: fixing the address and running the same command
    again must not hit 'study ... already exists'."""
    from raydefect.errors import ClusterError
    from raydefect.pipelines import cluster

    def unreachable(address=None, **_):
        raise ClusterError(f"cannot reach Ray at {address!r}")

    monkeypatch.setattr(cluster, "connect", unreachable)
    args = ["--address", "10.0.0.1:6379", "tune", "--config", "demo", "--data", str(synth_dataset.root)]
    out = CliRunner().invoke(cli, [*args, "--set", f"train.runs_dir={tmp_path / 'runs'}"])
    assert out.exit_code == 1 and "cannot reach Ray at '10.0.0.1:6379'" in out.output, out.output
    assert not (tmp_path / "runs").exists()


def test_a_token_at_hand_is_sent_to_an_existing_cluster_and_the_errors_name_it(monkeypatch, no_ray_token):
    """Ray 2.60's `ray start` turns token authentication on, and a driver sends the token only with
    RAY_AUTH_MODE=token, read when Ray is imported: without it `--address HOST:PORT` failed after ~20 s even on the
    head node, whose ~/.ray/auth_token holds the token."""
    from raydefect.pipelines import cluster
    from raydefect.pipelines.cluster import auth_hint, send_known_token

    (no_ray_token / ".ray").mkdir()
    (no_ray_token / ".ray" / "auth_token").write_text("t" * 64)
    monkeypatch.setattr(cluster, "_ray_imported", lambda: True)
    send_known_token()  # Ray imported already: too late for this driver, and a Ray started later would want it
    assert "RAY_AUTH_MODE" not in os.environ
    monkeypatch.setattr(cluster, "_ray_imported", lambda: False)  # as in a `raydefect` process
    (no_ray_token / ".ray" / "auth_token").unlink()
    send_known_token()  # nothing at hand: nothing sent, and the error says how to give a token
    assert "RAY_AUTH_MODE" not in os.environ
    assert "set RAY_AUTH_MODE=token" in auth_hint() and "~/.ray/auth_token" in auth_hint()
    (no_ray_token / ".ray" / "auth_token").write_text("t" * 64)
    assert CliRunner().invoke(cli, ["config", "--list"]).exit_code == 0
    assert "RAY_AUTH_MODE" not in os.environ  # an embedded Ray: Ray itself handles its own token
    assert CliRunner().invoke(cli, ["--address", "10.0.0.1:6379", "config", "--list"]).exit_code == 0
    assert os.environ["RAY_AUTH_MODE"] == "token"  # set by the CLI group, before any command imports Ray
    assert "check that the token sent (from ~/.ray/auth_token) is its own" in auth_hint()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # an explicit choice is left alone
    send_known_token()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(no_ray_token / "missing"))  # a path given but empty: nothing sent
    send_known_token()
    assert "RAY_AUTH_MODE" not in os.environ
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x" * 64)
    send_known_token()
    assert os.environ["RAY_AUTH_MODE"] == "token" and "(from RAY_AUTH_TOKEN)" in auth_hint()
