"""The `raydefect` command line: parse, load config, call one pipeline function.

Thin by design. Heavy modules (torch, ray, timm, pyarrow) are imported inside each command so that
``raydefect --help`` is instant. User errors (`RaydefectError`) print one line and exit 1; Click usage errors
exit 2.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from raydefect import __version__


@dataclass
class State:
    """Global options shared by every command."""

    address: str | None = None
    verbosity: int = 0


class RaydefectGroup(click.Group):
    """Turns user errors into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        from raydefect.errors import RaydefectError

        try:
            return super().invoke(ctx)
        except RaydefectError as e:
            message = " ".join(str(e).split())  # one line, whatever the message holds
            click.echo(f"error: {message}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=RaydefectGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="raydefect")
@click.option(
    "--address",
    envvar="RAY_ADDRESS",
    default=None,
    metavar="ADDR",
    help="Ray cluster: 'auto', 'host:port' or 'ray://host:10001' (also RAY_ADDRESS). Default: an embedded local "
    "Ray, started only by commands that need it.",
)
@click.option("-v", "--verbose", count=True, help="More output (repeat for more; shows Ray's own logs).")
@click.option("-q", "--quiet", count=True, help="Less output: errors and final results only.")
@click.pass_context
def cli(ctx: click.Context, address: str | None, verbose: int, quiet: int) -> None:
    """raydefect: find defects in inspection images at dataset scale, on Ray.

    \b
    Typical flow:
      raydefect prepare ...        raw folders  -> dataset (manifest.parquet)
      raydefect tune ...           dataset      -> study with the best config
      raydefect train --best ...   best config  -> model artifact (runs/<name>/model/)
      raydefect score ...          archive      -> Parquet of scores and masks
    """
    from raydefect import console

    state = State(address=address, verbosity=verbose - quiet)
    console.set_verbosity(state.verbosity)
    ctx.obj = state


def config_options(func: Callable) -> Callable:
    """``--config`` and repeatable ``--set`` for commands that build a `Config`."""

    @click.option(
        "--config",
        "config_name",
        default="default",
        show_default=True,
        metavar="NAME|FILE",
        help="A shipped config name (see `raydefect config --list`) or a YAML file.",
    )
    @click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="SECTION.KEY=VALUE",
        help="Override one config value (repeatable), e.g. --set optim.lr=3e-4.",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


def build_config(config_name: str, sets: tuple[str, ...], **options: Any):
    """Load the config: file <- explicit options (dotted keys; None = not given) <- --set."""
    from raydefect.config import load_config

    return load_config(config_name, options=options, sets=sets)


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
    """List every backbone with its parameter counts (computed on the meta device: nothing is downloaded).

    \b
    Counts: the backbone, the classification head, the segmentation head and the total, for heads sized by the
    config (model.decoder_dim, model.head_hidden, model.feature_blocks) at each backbone's default image size
    (the size its weights were made for; set data.image_size to a multiple of the patch size).
    Use a name, its torch-hub name or its timm name as model.backbone.
    """
    from raydefect.console import table
    from raydefect.models.model import format_count, parameter_table

    cfg = build_config(config_name, sets)
    rows = parameter_table(cfg.model, num_classes=classes)
    if not exact:
        for row in rows:
            for key in ("backbone params", "cls head", "seg head", "total"):
                row[key] = format_count(row[key])
    click.echo(table(rows))


def main() -> None:
    cli(prog_name="raydefect")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
