"""`raydefect train` and `raydefect tune` (Ray Train, Ray Tune + Optuna in raydefect.pipelines)."""

from __future__ import annotations

from typing import Any

import click

from raydefect.cli.app import build_config, cli, config_options


def _parse_epochs(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    """``8`` (total, spread over the stages) or ``2,2,4`` (per stage)."""
    if value is None:
        return None
    try:
        parts = tuple(int(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) not in (1, 3) or min(parts) < 0 or sum(parts) < 1:
        raise click.BadParameter(f"{value!r}: expected a total like 8 or per-stage epochs like 2,2,4")
    return parts


def train_config(
    ctx: click.Context,
    config_name: str,
    sets: tuple[str, ...],
    options: dict[str, Any],
    epochs: tuple[int, ...] | None = None,
    freeze_backbone: bool = False,
):
    """The config of a training: a re-used --name starts from that run's saved config.yaml (so the same command,
    or just --name, resumes it) unless --config is given; then explicit options, --epochs / --freeze-backbone,
    and --set (the rules: `raydefect.engine.options`)."""
    from raydefect.engine.options import STAGE_KEYS, refuse_frozen_random_backbone, saved_config, stage_epochs

    cfg = build_config(config_name, sets, **options)
    explicit_config = ctx.get_parameter_source("config_name") is not click.core.ParameterSource.DEFAULT
    saved = None if explicit_config else saved_config(cfg)
    if saved is not None:
        config_name = str(saved)
        cfg = build_config(config_name, sets, **options)
    refuse_frozen_random_backbone(cfg, freeze_backbone)
    try:
        stages = stage_epochs(cfg.schedule, epochs, freeze_backbone)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--epochs") from None
    if stages is None:
        return cfg
    return build_config(config_name, sets, **options, **dict(zip(STAGE_KEYS, stages, strict=True)))


@cli.command("train")
@config_options
@click.option("--data", type=click.Path(), help="Prepared dataset folder (`raydefect prepare --out`).")
@click.option("--name", help="Run name: output in <runs_dir>/<name>/; re-using a name resumes that run.")
@click.option("--backbone", help="Backbone from `raydefect models`, e.g. dinov3-s, dinov3-b, dinov2-s.")
@click.option(
    "--epochs",
    callback=_parse_epochs,
    metavar="N|A,B,C",
    help="Total epochs (spread over the three stages as configured) or epochs per stage: frozen,partial,full.",
)
@click.option("--freeze-backbone", is_flag=True, help="Stage 1 only: train the heads on a frozen backbone.")
@click.option("--num-workers", type=click.IntRange(1), help="Data-parallel Ray Train workers [resources.num_workers].")
@click.option(
    "--gpus-per-worker",
    type=click.FloatRange(0, min_open=True),
    help="GPUs per worker when the cluster has GPUs [resources.gpus_per_worker].",
)
@click.option(
    "--cpus-per-worker",
    type=click.FloatRange(0, min_open=True),
    help="CPUs per worker; on CPU-only machines also torch's threads [resources.cpus_per_worker].",
)
@click.option("--batch-size", type=click.IntRange(1), help="Images per batch per worker [train.batch_size].")
@click.option("--lr", type=float, help="Peak backbone learning rate [optim.lr].")
@click.option("--image-size", type=click.IntRange(16), help="Side the model sees, a multiple of the patch size.")
@click.option(
    "--best",
    "best",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[STUDY]",
    help="Train the best config of a `raydefect tune` study at full fidelity: a study name or folder; alone, the "
    "latest study under train.runs_dir. Options and --set still apply on top.",
)
@click.pass_context
def train_cmd(
    ctx: click.Context,
    config_name: str,
    sets: tuple[str, ...],
    data: str | None,
    name: str | None,
    backbone: str | None,
    epochs: tuple[int, ...] | None,
    freeze_backbone: bool,
    num_workers: int | None,
    gpus_per_worker: float | None,
    cpus_per_worker: float | None,
    batch_size: int | None,
    lr: float | None,
    image_size: int | None,
    best: str | None,
) -> None:
    """Fine-tune a defect model on a prepared dataset with Ray Train; write runs/<name>/ and its model/.

    \b
    Stages: 1 frozen backbone (heads only), 2 last blocks unfrozen, 3 full fine-tune (schedule.* epochs).
    Output: config.yaml, metrics.csv, plots/, checkpoints, model/ (thresholds chosen on val), test_metrics.json.
    Re-running the same --name resumes from its last checkpoint; --address runs it on a Ray cluster.
    --best [STUDY] trains a tune study's best.yaml (run <study>-best, the latest study when none is named).
    """
    from pathlib import Path

    from raydefect import console
    from raydefect.pipelines.train import train

    options = {
        "data.dataset": str(Path(data).expanduser().absolute()) if data else None,
        "train.name": name,
        "model.backbone": backbone,
        "resources.num_workers": num_workers,
        "resources.gpus_per_worker": gpus_per_worker,
        "resources.cpus_per_worker": cpus_per_worker,
        "train.batch_size": batch_size,
        "optim.lr": lr,
        "data.image_size": image_size,
    }
    if best is not None:
        if ctx.get_parameter_source("config_name") is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError("--best takes its config from the study's best.yaml; drop --config")
        from raydefect.config import load_config
        from raydefect.tuning.study import best_file, find_study

        runs_dir = load_config(config_name, sets=sets).train.runs_dir
        study = find_study(best or None, runs_dir)
        config_name = str(best_file(study))
        console.info(f"training the best config of study {study.name}: {config_name}")
    cfg = train_config(ctx, config_name, sets, options, epochs, freeze_backbone)
    result = train(cfg, address=ctx.obj.address)
    _print_training(result, cfg.schedule.metric)


def _print_training(result: Any, metric: str) -> None:
    """The end of a training on the console: the best epoch, the test metrics, where the model and metrics are."""
    from raydefect import console

    best = result.best_metrics

    def f(value: Any) -> str:
        return "-" if value is None or value != value else f"{value:.3f}"

    console.result("")
    console.result(
        f"best epoch {result.best_epoch} of {len(result.history)}: {metric} {f(best.get(metric))} "
        f"(val_f1 {f(best.get('val_f1'))}, val_iou {f(best.get('val_iou'))}, val_dice {f(best.get('val_dice'))})"
        + ("; stopped early" if result.stopped_early else "")
    )
    export = result.export
    if export is not None:
        t = export.test_metrics
        if t:
            console.result(
                f"test: f1 {f(t.get('test_f1'))}  ap {f(t.get('test_ap'))}  auroc {f(t.get('test_auroc'))}  "
                f"iou {f(t.get('test_iou'))}  dice {f(t.get('test_dice'))}  at thresholds image "
                f"{export.thresholds['image']:.3g}, pixel {export.thresholds['pixel']:.3g}"
            )
        console.result(f"model:   {export.model_dir} (id {export.model_id})")
        if export.test_metrics_path is not None:
            console.result(f"test:    {export.test_metrics_path}")
    console.result(f"metrics: {result.run_dir / 'metrics.csv'} (plots in {result.run_dir / 'plots'})")


# --- tuning (issue 4) ----------------------------------------------------------------------------------------------


@cli.command("tune")
@config_options
@click.option("--data", type=click.Path(), help="Prepared dataset folder (`raydefect prepare --out`).")
@click.option("--name", help="Study name: output in <runs_dir>/tune-<name>/ [tune.name; default: dataset + time].")
@click.option("--space", metavar="NAME|FILE", help="Search space: shipped name or YAML file [tune.space].")
@click.option("--num-samples", type=click.IntRange(1), help="Number of trials [tune.num_samples].")
@click.option(
    "--time-budget",
    type=click.FloatRange(0, min_open=True),
    metavar="SECONDS",
    help="Stop the study after this long; running trials stop, finished ones count [tune.time_budget_s].",
)
@click.option("--metric", help="Validation metric trials are ranked by, e.g. val_score, val_f1 [tune.metric].")
@click.option("--mode", type=click.Choice(["max", "min"]), help="Whether a larger metric is better [tune.mode].")
@click.option(
    "--max-concurrent",
    type=click.IntRange(1),
    help="Trials at a time [tune.max_concurrent; default: what the cluster's GPUs/CPUs fit].",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted study (--name NAME|PATH, or the latest one).")
@click.pass_context
def tune_cmd(
    ctx: click.Context,
    config_name: str,
    sets: tuple[str, ...],
    data: str | None,
    name: str | None,
    space: str | None,
    num_samples: int | None,
    time_budget: float | None,
    metric: str | None,
    mode: str | None,
    max_concurrent: int | None,
    resume: bool,
) -> None:
    """Search backbone, learning rate and more with Ray Tune + Optuna; write runs/tune-<name>/.

    \b
    Each trial fine-tunes with Ray Train on a cheaper setting (tune.subset of the training split, tune.image_size,
    tune.epochs); Optuna TPE proposes, ASHA stops weak trials early. Output: trials.csv, best.yaml (a complete
    training config at full fidelity), plots/. Then: raydefect train --best.
    """
    from pathlib import Path

    from raydefect.pipelines.tune import tune_study

    if resume:
        given = [
            flag
            for flag, value in (
                ("--config", ctx.get_parameter_source("config_name") is not click.core.ParameterSource.DEFAULT),
                ("--set", any(not item.startswith("train.runs_dir=") for item in sets)),
                ("--data", data),
                ("--space", space),
                ("--num-samples", num_samples),
                ("--time-budget", time_budget),
                ("--metric", metric),
                ("--mode", mode),
                ("--max-concurrent", max_concurrent),
            )
            if value
        ]
        if given:
            raise click.UsageError(
                f"--resume continues the study with the settings it was started with; drop {', '.join(given)} "
                "(or start a new study with another --name; --set train.runs_dir=DIR says where studies are)"
            )
        runs_dir = build_config("default", sets).train.runs_dir
        tune_study(None, resume=True, name=name, runs_dir=runs_dir, address=ctx.obj.address)
        return
    options = {
        "data.dataset": str(Path(data).expanduser().absolute()) if data else None,
        "tune.name": name,
        "tune.space": space,
        "tune.num_samples": num_samples,
        "tune.time_budget_s": time_budget,
        "tune.metric": metric,
        "tune.mode": mode,
        "tune.max_concurrent": max_concurrent,
    }
    cfg = build_config(config_name, sets, **options)
    tune_study(cfg, address=ctx.obj.address)


# --- scoring (issue 5) ---------------------------------------------------------------------------------------------
