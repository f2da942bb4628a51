"""Connect to Ray: an existing cluster (``--address`` / ``RAY_ADDRESS``) or an embedded local one.

Embedded Ray is started lazily, only by commands that need it, with usage stats and the dashboard off (this must
work offline) and Ray's own log forwarding only with -v.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from typing import Any

from raydefect import console
from raydefect.errors import ClusterError

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def resolve_address(address: str | None) -> str | None:
    """`None` means an embedded local Ray; otherwise ``auto`` or ``host:port`` (``ray://`` is refused by `connect`)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address in ("local", "embedded"):
        return None
    return address


#: The file in the run / output folder that Ray's and other libraries' notices go to (see `route_notices`).
NOTICES_LOG = "_raydefect-notices.log"  # "_": pandas and pyarrow skip it in a scores folder
_routed: dict[str, Any] = {}


def route_notices(folder: str | os.PathLike | None) -> str | None:
    """In the `raydefect` command without -v (`console.notice_routing`): what Ray and other libraries say to the
    console goes to `folder`/`NOTICES_LOG` (default: a raydefect-logs folder in the temp folder) instead, so users see
    raydefect's lines and real errors only. That is: C++ log lines written to the process's stderr (file descriptor
    2, pointed at the log; Python's sys.stderr keeps the terminal), Python warnings, library log records, and the
    raylet / autoscaler lines Ray's driver prints on stdout ("(raylet) WARNING: 8 PYTHON worker processes have been
    started...", `RayNoticeFilter`); workers' own output stays off the driver (``log_to_driver`` off without -v).
    Once per process; returns the log file, or None when notices stay on the console."""
    if not console.notice_routing():
        return None
    if "path" in _routed:
        return _routed["path"]
    import tempfile

    base = folder if folder is not None and not str(folder).startswith(("s3://", "gs://")) else None
    target = os.path.join(base or os.path.join(tempfile.gettempdir(), "raydefect-logs"), NOTICES_LOG)
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        log = open(target, "a", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    except OSError:
        return None  # an unwritable folder: the notices stay where they were
    import ray  # noqa: F401  (its loggers and handlers exist from here on: moved below with the others)

    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if hasattr(v, "handlers"))]
    for handler in (h for lg in loggers for h in lg.handlers):  # library records: to the log
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.__stderr__):
            handler.setStream(log)
    sys.stderr.flush()
    os.dup2(log.fileno(), 2)
    sys.stderr = terminal
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the log
    logging.getLogger("py.warnings").addHandler(logging.StreamHandler(log))
    logging.getLogger("py.warnings").propagate = False
    sys.stdout.flush()
    sys.stdout = RayNoticeFilter(sys.stdout, log)
    _routed.update(path=target, log=log)
    return target


#: A line Ray's driver prints for the raylet or the autoscaler: "(raylet) WARNING: ...", "(raylet, ip=...) ...",
#: possibly wrapped in ANSI colour codes.
_RAY_NOTICE = re.compile(r"^(?:\x1b\[[0-9;]*m)*\((?:raylet|autoscaler)\b[^)]*\)")


class RayNoticeFilter:
    """``sys.stdout`` in the raydefect command without -v: lines Ray's driver prints on behalf of the raylet or the
    autoscaler go to the notices log (Ray sends them to every driver, ``log_to_driver`` or not: "(raylet) WARNING: 8
    PYTHON worker processes have been started ..."); every other line passes through unchanged."""

    def __init__(self, out: Any, log: Any) -> None:
        self._out, self._log, self._partial = out, log, ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            (self._log if _RAY_NOTICE.match(line) else self._out).write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self._out.write(self._partial)
            self._partial = ""
        self._out.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the real stream's
        return getattr(self._out, name)


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    log_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Initialise Ray once per process and return the cluster's resources.

    Re-entrant: when Ray is already initialised (tests share one session, a job calls several pipelines), the
    existing connection is used. ``log_dir``: the run / output folder, where `route_notices` writes.
    """
    resolved = resolve_address(address)
    if resolved and resolved.startswith("ray://"):
        # Tried against Ray 2.60 (`ray start --head`): with token authentication (the default since Ray 2.59) the
        # client does not connect at all, and without it Ray Data fails inside the client ("'Worker' object has no
        # attribute 'core_worker'"). Every raydefect job reads data through Ray Data, so say so up front.
        raise ClusterError(
            f"--address {resolved}: Ray Client (ray://) cannot run raydefect's jobs (Ray Data and Ray Train need the "
            "driver on the cluster); run raydefect on a cluster node with --address auto, or submit it as a Ray job: "
            "`ray job submit --address http://HEAD:8265 -- raydefect ...` (scoring: `raydefect --address "
            "http://HEAD:8265 score --submit ...`)"
        )
    if resolved and resolved.startswith(("http://", "https://")):
        raise ClusterError(
            f"--address/RAY_ADDRESS {resolved}: that is a Ray Jobs API (dashboard) address, used only to submit a "
            f"run: `raydefect --address {resolved} score --submit ...`; to run here, give the cluster's GCS address "
            "(`--address auto` on a cluster node, or HOST:6379)"
        )
    import ray

    if not ray.is_initialized():
        if resolved and resolved != "auto":
            _check_reachable(resolved)
        route_notices(log_dir)
        verbose = console.verbosity() >= 1
        if not verbose:
            # "Token authentication is enabled for this Ray cluster" at every embedded start: the secure default,
            # nothing for the user to do (logged by Ray's authentication setup; shown with -v)
            logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
        kwargs: dict[str, Any] = {"log_to_driver": verbose, "logging_level": "INFO" if verbose else "WARNING"}
        slow: contextlib.AbstractContextManager = contextlib.nullcontext()
        if resolved is None:
            # An explicit address=None would still pick up RAY_ADDRESS; "local" forces a new embedded instance.
            kwargs.update(address="local", include_dashboard=False, num_cpus=num_cpus, num_gpus=num_gpus)
            console.debug("starting an embedded local Ray")
        else:
            kwargs["address"] = resolved
            console.debug(f"connecting to Ray at {resolved}")
            # a cluster that refuses this machine's token answers only after ~20 s of Ray's retries: not in silence
            slow = console.waiting(
                f"Ray at {resolved}: no answer yet after {SLOW_CONNECT_S:.0f} s, still connecting (a cluster that "
                "refuses this machine's token says so after about 20 s)",
                SLOW_CONNECT_S,
            )
        try:
            with slow:
                ray.init(**kwargs)
        except ConnectionError as e:
            raise ClusterError(
                f"cannot reach Ray at {resolved!r}: {e}; check the address (`ray status` on the head node), "
                "or leave out --address/RAY_ADDRESS to run on an embedded local Ray" + auth_hint()
            ) from None
        except Exception as e:  # Ray raises several types for a bad address
            if resolved is None:
                raise
            raise ClusterError(
                f"cannot connect to Ray at {resolved!r}: {type(e).__name__}: {e}; "
                "use 'auto' or 'host:port' (GCS, on a cluster node), or leave out --address for an embedded local Ray"
            ) from None
    return dict(ray.cluster_resources())


#: Seconds after which connecting to an existing cluster says it is still waiting.
SLOW_CONNECT_S = 5.0

#: Seconds to wait for a TCP connection to a cluster's GCS, and then for its gRPC handshake, before saying it is not
#: there (ray.init itself retries for good: tried against a closed port, it was still retrying after 11 minutes,
#: holding the scores folder's lock).
REACH_TIMEOUT_S = 10.0


def _check_reachable(address: str) -> None:
    """Fail fast, naming the address, when nothing accepts a TCP connection at HOST:PORT, or when what accepts it does
    not speak gRPC (the GCS does): against a port that accepts and never answers, ray.init makes 20 attempts of ~41 s
    each (measured on Ray 2.60: 3 attempts in 123 s)."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return  # not HOST:PORT: left to ray.init and its own error
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as e:
        why = f"no answer within {REACH_TIMEOUT_S:.0f} s" if isinstance(e, TimeoutError) else e.strerror or str(e)
        raise ClusterError(
            f"cannot reach Ray at {address!r} ({why}); is the cluster up (`ray status` on its head node) and is "
            "this its GCS address (port 6379 by default)? Leave out --address/RAY_ADDRESS to run on an embedded "
            "local Ray"
        ) from None
    if not _speaks_grpc(address):
        raise ClusterError(
            f"Ray at {address!r} accepts connections but does not answer as a cluster's GCS (no gRPC handshake in "
            f"{REACH_TIMEOUT_S:.0f} s); give the GCS address (port 6379 by default; `ray status` on the head node), "
            "not the dashboard's (8265; for --submit, as http://HOST:8265)"
        )


def _speaks_grpc(address: str) -> bool:
    """Whether a gRPC (HTTP/2) channel to ``address`` becomes ready within REACH_TIMEOUT_S, as a GCS's does at once.
    With TLS on (``RAY_USE_TLS``) a plain channel cannot tell, and without grpcio (installed by ray[default]) there is
    nothing to ask: the answer is then yes, and ray.init judges."""
    try:
        import grpc
    except ImportError:
        return True
    if os.environ.get("RAY_USE_TLS", "0").strip().lower() in ("1", "true"):
        return True
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=REACH_TIMEOUT_S)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def token_source() -> str | None:
    """Where a Ray authentication token is at hand, looked for as Ray does: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, then
    ``~/.ray/auth_token`` (written by `ray start` and by an embedded Ray); None if nowhere."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
    if path:
        return path if os.path.isfile(os.path.expanduser(path)) else None
    return "~/.ray/auth_token" if os.path.isfile(os.path.expanduser("~/.ray/auth_token")) else None


def _ray_imported() -> bool:
    return "ray" in sys.modules


def send_known_token() -> None:
    """Called by the CLI, before any command imports Ray, when --address names an existing cluster or its Jobs API: with
    RAY_AUTH_MODE unset and a token at hand, send it (RAY_AUTH_MODE=token). Ray 2.60's `ray start --head` turns
    token authentication on, but a driver connecting by host:port sends the token only with RAY_AUTH_MODE=token:
    without it Ray retried for ~20 s, printing its gcs_client warnings, then failed ("Authentication token is
    missing or incorrect"), even on the head node whose ``~/.ray/auth_token`` holds the token. Sending a token to a
    cluster without authentication is harmless (tried on a `RAY_AUTH_MODE=disabled ray start`: it connects). An
    explicit RAY_AUTH_MODE is left as it is. Ray reads RAY_AUTH_MODE when it is imported: call this before `import
    ray` (tried: set after, it was not sent). Once Ray is imported nothing is changed: the variable would no longer
    reach this driver, only a Ray it starts later (tried: that Ray's GCS then wanted a token the driver never sent,
    and `ray.init()` failed)."""
    if os.environ.get("RAY_AUTH_MODE") or _ray_imported():
        return
    source = token_source()
    if source:
        os.environ["RAY_AUTH_MODE"] = "token"
        console.debug(f"sending the Ray authentication token from {source} (RAY_AUTH_MODE=token)")


def auth_hint() -> str:
    """What to say when a cluster refused us (or could not be reached) and token authentication may be why."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        source = token_source()
        return (
            f"; if the cluster uses token authentication, check that the token sent (from {source}) is its own"
            if source
            else ""
        )
    return (
        "; if the cluster uses Ray's token authentication (the default of `ray start` since Ray 2.59), set "
        "RAY_AUTH_MODE=token and give the cluster's token in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN"
    )


def cluster_gpus() -> float:
    """GPUs the connected cluster has (0 when none); Ray must be initialised."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def quiet_ray_data() -> None:
    """Ray Data's progress bars and INFO lines (printed when stdout is not a terminal) only with -v."""
    import warnings

    import ray

    verbose = console.verbosity() >= 1
    ctx = ray.data.DataContext.get_current()  # importing ray.data configures its loggers: do it first
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        # a run with fewer model batches than replicas (a small nightly delta) is fine: no warning about idle actors
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
        # the same about tasks: a listing of one folder, or a small manifest, has fewer parts than listing tasks
        warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
