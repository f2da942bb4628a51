"""`raydefect config` and `raydefect models`: what a config resolves to and which backbones exist."""

from __future__ import annotations

import click

from raydefect.cli.app import build_config, cli, config_options


@cli.command("config")
@config_options
@click.option("--list", "list_", is_flag=True, help="List the shipped config files.")
def config_cmd(config_name: str, sets: tuple[str, ...], list_: bool) -> None:
    """Show the resolved config, each key with its documentation."""
    from raydefect.config import describe, shipped_configs

    if list_:
        for name, path in sorted(shipped_configs().items()):
            click.echo(f"{name:12s} {path}")
        return
    click.echo(describe(build_config(config_name, sets)), nl=False)


@cli.command("models")
@config_options
@click.option(
    "--classes",
    type=click.IntRange(min=2),
    default=2,
    show_default=True,
    help="Classes the heads are sized for: normal + defect classes.",
)
@click.option("--exact", is_flag=True, help="Exact parameter counts instead of 21.6M-style.")
def models_cmd(config_name: str, sets: tuple[str, ...], classes: int, exact: bool) -> None:
    """List every backbone with its parameter counts (registry data: nothing is built or downloaded).

    \b
    Counts: the backbone, the classification head, the segmentation head and the total, for heads sized by the
    config (model.decoder_dim, model.head_hidden, model.feature_blocks) at each backbone's default image size
    (the size its weights were made for; set data.image_size to a multiple of the patch size, for CNNs of 32).
    Kind: vit (DINOv3 / DINOv2, best with pretrained weights) or cnn (timm ResNet / ConvNeXt / EfficientNet,
    which also learn from your labels alone with --config scratch).
    Use a name, its torch-hub name or its timm name as model.backbone.
    """
    from raydefect.console import table
    from raydefect.models.sizes import format_count, parameter_table

    cfg = build_config(config_name, sets)
    rows = parameter_table(cfg.model, num_classes=classes)
    if not exact:
        for row in rows:
            for key in ("backbone params", "cls head", "seg head", "total"):
                row[key] = format_count(row[key])
    click.echo(table(rows))


@cli.command("thresholds")
@click.argument("model", type=click.Path())
@click.option(
    "--image-recall",
    type=float,
    help="Set the image threshold for this recall on the stored validation images (e.g. 0.99: miss at most 1%).",
)
@click.option("--image", "image", type=float, help="Set the image threshold to this defect score.")
@click.option("--pixel", "pixel", type=float, help="Set the pixel threshold to this probability.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Write the new model here (default: replace MODEL in place; the old one's id stays in its model.yaml).",
)
def thresholds_cmd(
    model: str, image_recall: float | None, image: float | None, pixel: float | None, out: str | None
) -> None:
    """Show how MODEL's thresholds were chosen and the image thresholds for target recalls; with --image-recall,
    --image or --pixel, write the model with new thresholds (a new model id, recorded in model.yaml).

    \b
    Examples:
      raydefect thresholds runs/demo/model                        the table, nothing written
      raydefect thresholds runs/demo/model --image-recall 0.99    miss at most 1% of the validation defects
      raydefect thresholds runs/demo/model --image 0.3 --pixel 0.6 --out runs/demo/model-strict
    For one scoring run only: raydefect score --threshold VALUE (the model stays as it is).
    """
    from raydefect import console
    from raydefect.metrics.thresholds import thresholds_at_recall
    from raydefect.models.artifact import read_artifact_meta
    from raydefect.models.retarget import read_validation_scores, retarget

    meta = read_artifact_meta(model)
    validation = read_validation_scores(model)
    chosen = dict(meta.extra.get("thresholds_chosen") or {})
    for key in ("image", "pixel"):
        console.result(f"{key} threshold {meta.thresholds[key]:.4g}: {chosen.get(key, 'chosen on validation data')}")
    if validation is None:
        console.result("no stored validation scores (a model trained before they were kept): no recall table")
    else:
        rows = [
            {"target recall": r["target_recall"], "image threshold": r["threshold"], "recall": r["recall"],
             "precision": r["precision"], "false alarms": r["false_alarm_rate"], "defects missed": r["defects_missed"]}
            for r in thresholds_at_recall(*validation)
        ]  # fmt: skip
        n, n_defect = len(validation[1]), int(validation[1].sum())
        console.result(f"\non the {console.count(n, 'validation image')} ({n_defect} defect):")
        console.result(console.table(rows, floatfmt=".4g"))
    if image_recall is None and image is None and pixel is None:
        return
    old, new, how = retarget(model, image=image, image_recall=image_recall, pixel=pixel, out=out)
    for key, text in how.items():
        console.result(f"{key} threshold {old.thresholds[key]:.4g} -> {new.thresholds[key]:.4g}: {text}")
    console.result(f"model {new.model_id} (was {old.model_id}) written to {out or model}")
