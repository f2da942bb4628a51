"""The `raydefect` group and what its commands share: global options (--address, -v, -q), one-line user errors,
``--config``/``--set`` and the config they build. Each command group lives in its own module beside this one."""

from __future__ import annotations

import functools
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
        from raydefect.errors import RaydefectError, Terminated

        try:
            return super().invoke(ctx)
        except RaydefectError as e:
            message = " ".join(str(e).split())  # one line, whatever the message holds
            click.echo(f"error: {message}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt as e:
            terminated = isinstance(e, Terminated)  # SIGTERM during `score`: 128 + 15, as the shell's
            click.echo("terminated" if terminated else "interrupted", err=True)
            ctx.exit(143 if terminated else 130)


@click.group(cls=RaydefectGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="raydefect")
@click.option(
    "--address",
    envvar="RAY_ADDRESS",
    default=None,
    metavar="ADDR",
    help="Ray cluster: 'auto' or 'host:port' on a cluster node (also RAY_ADDRESS); 'http://head:8265' for "
    "`score --submit`. Default: an embedded local Ray, started only by commands that need it.",
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
      raydefect predict/evaluate/export ...     -> overlays, a report, ONNX / TorchScript
    """
    from raydefect import console

    state = State(address=address, verbosity=verbose - quiet)
    console.set_verbosity(state.verbosity)
    from raydefect.pipelines.cluster import resolve_address, send_known_token

    if resolve_address(address):  # an existing cluster or its Jobs API
        send_known_token()  # now: Ray reads RAY_AUTH_MODE once, when it is imported
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
