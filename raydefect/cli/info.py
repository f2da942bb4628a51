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
