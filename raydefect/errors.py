"""User-facing errors.

Every error a user can cause (a bad path, a bad config, a corrupt input, missing weights) is a `RaydefectError`
whose message says what went wrong *and* how to fix it. The CLI prints the message on one line and exits 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

# pyarrow's GCS errors carry google-cloud-cpp's whole status: "google::cloud::Status(UNAVAILABLE: Retry policy
# exhausted, with a last message of <what happened> error_info={...metadata...}})", ~400 characters
_GCLOUD_STATUS = re.compile(
    r"google::cloud::Status\((\w+): (?:[^:]*?with a last message of )?(.*?)\s*error_info=\{.*", re.S
)


def error_text(e: BaseException) -> str:
    """``str(e)``, with a Google Cloud status cut to its code and message ("UNAVAILABLE: ... Could not connect")."""
    return _GCLOUD_STATUS.sub(lambda m: f"{m.group(1)}: {m.group(2)}", str(e))


def first_line(e: BaseException, limit: int = 200) -> str:
    """The gist of an exception for a one-line message: its first non-empty line (or its type), at most `limit`
    characters, cut between words ("..." where it was cut, so the cut does not read as the message's end)."""
    text = error_text(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    if len(line) <= limit:
        return line
    cut = line[: limit - 3]
    head = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return head.rstrip(" ,;:.") + "..."


class RaydefectError(Exception):
    """Base class of all user errors. The message must name the thing at fault and the fix."""


class ConfigError(RaydefectError):
    """A config file, key or value is invalid."""


class DataError(RaydefectError):
    """A dataset, manifest or input folder is missing or invalid."""


class ImageError(RaydefectError):
    """One image (or mask) cannot be used. `path` and `reason` are kept for per-item reports."""

    def __init__(self, path: str | None, reason: str, fix: str = "") -> None:
        self.path = path
        self.reason = reason
        self.fix = fix
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{reason}" + (f" ({fix})" if fix else ""))


class CorruptImageError(ImageError):
    """The bytes are not a decodable image (truncated, not an image, unsupported format)."""


class ImageTooLargeError(ImageError):
    """The image declares more pixels than the configured limit (decompression-bomb guard)."""


class ModelError(RaydefectError):
    """Unknown backbone, bad model config, missing or mismatched weights, unreadable artifact."""


class ExportError(ModelError):
    """The export failed, or the exported file does not reproduce the PyTorch model."""


class WeightsError(ModelError):
    """Pretrained weights are missing or cannot be loaded."""


class ArtifactError(ModelError):
    """A model artifact or checkpoint folder is missing, partial or corrupt."""


class ClusterError(RaydefectError):
    """Cannot start or reach Ray."""


class StudyError(RaydefectError):
    """A tune study is missing, empty or cannot be resumed."""


class OutputError(RaydefectError):
    """An output location cannot be written (permissions, disk full, locked by another run)."""


class TrainingError(RaydefectError):
    """A training run failed on its workers beyond its retries; the message says how to resume."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a cron timeout, Kubernetes stopping the pod) during a scoring run, handled like Ctrl-C: what
    is done is committed and the run marked interrupted; the command exits 143."""
