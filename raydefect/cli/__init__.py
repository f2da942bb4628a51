"""The `raydefect` command line: parse, load config, call one function below.

Thin by design. Heavy modules (torch, ray, timm, pyarrow) are imported inside each command so that
``raydefect --help`` is instant. User errors (`RaydefectError`) print one line and exit 1; Click usage errors
exit 2. `app` holds the group and the shared options; one module per command group registers its commands on it.
"""

from __future__ import annotations

from raydefect.cli import data, info, nightly, score, tasks, train  # noqa: F401  (registers the commands)
from raydefect.cli.app import cli

__all__ = ["cli", "main"]


def main() -> None:
    from raydefect import console

    console.allow_notice_routing()  # Ray's and other libraries' notices to a log file, unless -v
    cli(prog_name="raydefect")
