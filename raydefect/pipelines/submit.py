"""`raydefect score --submit`: run the scoring job on a cluster through Ray's Jobs API.

The job runs ``raydefect score ...`` on the cluster (raydefect must be installed in its image). The entrypoint is
built from an argv list and quoted with `shlex.join`, so no path or value can inject shell syntax. The resolved
``score.*`` settings travel as ``--set`` options, so a local ``--config`` file need not exist on the cluster.
Secrets never appear in the entrypoint: ``--env NAME`` copies the variable's value from this environment into the
job's ``runtime_env`` (the entrypoint and the CLI line only ever carry the name).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from typing import Any

from raydefect import console
from raydefect.config import Config, ScoreConfig
from raydefect.errors import ClusterError, ConfigError, first_line
from raydefect.paths import is_remote
from raydefect.scoring.storage import absolute


def _value(v: object) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(str(x) for x in v) + "]"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def score_argv(
    model: str,
    input_: str,
    out: str,
    cfg: Config,
    *,
    rescore: bool = False,
    retry_errors: bool = False,
    dry_run: bool = False,
    json_path: str | None = None,
) -> list[str]:
    """The ``raydefect score`` command line the job runs (score settings that differ from the defaults as --set).

    Local paths are sent absolute, resolved here (a relative one would be resolved in the job's working directory on
    the head node: the job failed, or wrote its scores somewhere else)."""
    model, input_, out = absolute(model), absolute(input_), absolute(out)
    argv = ["raydefect", "score", "--model", model, "--input", input_, "--out", out]
    defaults = ScoreConfig()
    for name, value in cfg.to_dict()["score"].items():
        default = getattr(defaults, name)
        if (list(default) if isinstance(default, tuple) else default) != value:
            argv += ["--set", f"score.{name}={_value(value)}"]
    if rescore:
        argv.append("--rescore")
    if retry_errors:
        argv.append("--retry-errors")
    if dry_run:
        argv.append("--dry-run")  # the job lists what it would score (in its logs) and writes nothing
    if json_path:
        json_path = absolute(json_path)
        argv += ["--json", json_path]
    named = [("--model", model), ("--input", input_), ("--out", out)] + ([("--json", json_path)] if json_path else [])
    for name, path in named:
        if not is_remote(path):
            console.warn(f"{name} {path} is a local path: it must exist on the cluster's head node (shared storage)")
    return argv


def check_submission(address: str | None, env_names: Sequence[str] = ()) -> None:
    if not address or not address.startswith(("http://", "https://")):
        raise ClusterError(
            "--submit needs the cluster's dashboard address, e.g. --address http://head:8265 "
            + (f"(got {address!r}, a GCS address)" if address else "(none given: --address or RAY_ADDRESS)")
        )
    missing = [n for n in env_names if n not in os.environ]
    if missing:
        raise ConfigError(f"--env {', '.join(missing)}: not set in this environment; export it or drop --env")


def submit_score(
    address: str | None,
    model: str,
    input_: str,
    out: str,
    cfg: Config,
    *,
    env_names: Sequence[str] = (),
    **options: Any,
) -> str:
    """`raydefect score ...` as a job on the cluster at `address` (`options`: those of `score_argv`); returns the
    job id."""
    check_submission(address, env_names)
    return submit_job(address, score_argv(model, input_, out, cfg, **options), env_names)


def submit_job(address: str | None, argv: Sequence[str], env_names: Sequence[str] = ()) -> str:
    """Submit `argv` as a Ray job at the dashboard `address` (http://head:8265); returns the job id."""
    check_submission(address, env_names)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from raydefect.pipelines.cluster import auth_hint

    runtime_env = {"env_vars": {n: os.environ[n] for n in env_names}} if env_names else None
    try:
        client = JobSubmissionClient(address)
        return client.submit_job(entrypoint=shlex.join(list(argv)), runtime_env=runtime_env)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"cannot submit to {address}: {e}; check the address and that the dashboard runs") from None
    except AuthenticationError as e:
        hint = auth_hint() or "; check that the token given is the cluster's"
        raise ClusterError(f"cannot submit to {address}: {first_line(e)}" + hint) from None
