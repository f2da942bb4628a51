"""Where images and scores live: local paths and object-store URIs through pyarrow filesystems.

Every row that crosses the pipeline names its file by a *location*: an absolute local path or a URI
(``s3://bucket/key``, ``gs://bucket/key``). Any process turns a location back into (filesystem, path) with a
`Storage` (which only holds options, so it pickles to Ray workers; credentials come from each process's own
environment or instance role, the usual AWS/GCP chain, and are never shipped). ``AWS_ENDPOINT_URL`` or
``score.endpoint_override`` point ``s3://`` at a MinIO-like store.
"""

from __future__ import annotations

import functools
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raydefect.errors import DataError
from raydefect.paths import is_remote, split_scheme

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def absolute(location: str) -> str:
    """A URI as it is; a local path absolute (records, jobs on a cluster and stores outlive the working directory)."""
    return location if is_remote(location) else os.path.abspath(os.path.expanduser(location))


def join_location(base: str, relative: str) -> str:
    """A manifest entry relative to the manifest's folder (or already absolute / a URI)."""
    if is_remote(relative) or relative.startswith("file://") or os.path.isabs(os.path.expanduser(relative)):
        return relative if is_remote(relative) else split_scheme(relative)[1]
    scheme, path = split_scheme(base)
    if scheme:  # normalised like local paths: "manifests/../archive/a.png" named the same image a second time
        return f"{scheme}://{posixpath.normpath(path.rstrip('/') + '/' + relative)}"
    return os.path.normpath(os.path.join(path, relative))


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, endpoint_override: str | None, bucket: str) -> pafs.FileSystem:
    import pyarrow.fs as pafs

    if scheme == "":
        return pafs.LocalFileSystem()
    if scheme in ("gs", "gcs"):
        return _gcs_filesystem()
    try:
        if scheme == "s3":
            return _s3_filesystem(bucket, endpoint_override)
        fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for unknown schemes and bad URIs
        hint = (
            "for an S3-compatible store set AWS_ENDPOINT_URL (or score.endpoint_override for `raydefect score`)"
            if scheme == "s3"
            else "use a local path, s3:// or gs:// (pyarrow filesystems)"
        )
        raise DataError(f"cannot open {scheme}://{bucket}: {' '.join(str(e).split())}; {hint}") from None
    return fs


# Attempts per s3:// call. FileSystem.from_uri leaves retries to the AWS SDK's default policy (10 attempts with
# backoff): one call against an endpoint that accepts and never answers failed after 99 s (measured), and a run makes
# several. With 3 (the AwsStandard strategy pyarrow's own S3FileSystem defaults to) the same call fails in 11 s.
# (A pickled S3FileSystem, as Ray Data's read tasks get it, drops its retry strategy and is rebuilt with that
# default, which is why this stays at 3.)
S3_ATTEMPTS = 3


def _s3_filesystem(bucket: str, endpoint_override: str | None) -> pafs.FileSystem:
    """S3 as `FileSystem.from_uri` builds it (an endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else the
    bucket's own region), but with bounded retries; credentials from the usual AWS chain."""
    import pyarrow.fs as pafs

    retry = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)
    endpoint = s3_endpoint(endpoint_override)
    if endpoint:
        return pafs.S3FileSystem(endpoint_override=endpoint, retry_strategy=retry)
    return pafs.S3FileSystem(region=pafs.resolve_s3_region(bucket), retry_strategy=retry)


def s3_endpoint(endpoint_override: str | None) -> str | None:
    return endpoint_override or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


# How long one gs:// call retries before it fails. With google-cloud-cpp's own default, a call without network or
# credentials was still retrying after 200 s (measured; stopped there), so a misconfigured nightly run sat silent. 30 s
# rides out throttling and short outages; an image whose read still fails is an error row scored again by the next
# run. Checking --input makes two calls: a refused connection failed it in 43 s, an endpoint that accepts and never
# answers in 120 s (the limit does not cut a request short; each has its own 60 s timeout, which pyarrow cannot set).
GCS_RETRY_S = 30.0


def _gcs_filesystem() -> pafs.FileSystem:
    """Google Cloud Storage: credentials from the usual chain (GOOGLE_APPLICATION_CREDENTIALS, gcloud, the instance's
    service account); ``STORAGE_EMULATOR_HOST`` (the Google clients' variable, e.g. ``http://127.0.0.1:4443``) points
    gs:// at an emulator, anonymously."""
    import datetime

    import pyarrow.fs as pafs

    retry = datetime.timedelta(seconds=GCS_RETRY_S)
    emulator = gcs_emulator()
    if not emulator:
        return pafs.GcsFileSystem(retry_time_limit=retry)
    scheme, sep, host = emulator.partition("://")
    if not sep:
        scheme, host = "http", emulator
    return pafs.GcsFileSystem(anonymous=True, scheme=scheme, endpoint_override=host, retry_time_limit=retry)


def gcs_emulator() -> str:
    """``STORAGE_EMULATOR_HOST`` as set (the Google clients' variable), or ""."""
    return os.environ.get("STORAGE_EMULATOR_HOST", "").strip().rstrip("/")


@functools.lru_cache(maxsize=1)
def gcs_client(emulator: str) -> object | None:
    """The google-cloud-storage client (the ``gcs`` extra), or None where it is not installed or finds no
    credentials. It lists one folder with its sub-folders (GCS's ``prefixes``), which pyarrow's GCS filesystem cannot:
    with it, gs:// folders are listed in parallel and streamed like local and S3 ones. Same credentials chain and
    ``STORAGE_EMULATOR_HOST`` as pyarrow."""
    try:
        from google.cloud import storage
    except ImportError:
        return None
    try:
        if emulator:
            from google.auth.credentials import AnonymousCredentials

            return storage.Client(credentials=AnonymousCredentials(), project="raydefect")
        return storage.Client()
    except Exception:  # no credentials found (google.auth's DefaultCredentialsError): pyarrow's own chain decides
        return None


def datetime_ns(t: object) -> int:
    """A timezone-aware datetime in integer nanoseconds since the epoch, exactly as pyarrow reports GCS mtimes (the
    listing and `Storage.stat` must agree: (path, size, mtime) is the incremental key)."""
    import datetime

    if not isinstance(t, datetime.datetime):
        return -1
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    return (t - epoch) // datetime.timedelta(microseconds=1) * 1000


@dataclass(frozen=True)
class Storage:
    """Resolves locations to pyarrow filesystems; cheap to pickle (options only, filesystems cached per process)."""

    endpoint_override: str | None = None

    def resolve(self, location: str) -> tuple[pafs.FileSystem, str]:
        scheme, path = split_scheme(location)
        bucket = path.split("/", 1)[0] if scheme else ""
        return _filesystem(scheme, self.endpoint_override, bucket), path

    @staticmethod
    def location(scheme: str, path: str) -> str:
        return f"{scheme}://{path}" if scheme else path

    def read_bytes(self, location: str) -> bytes:
        fs, path = self.resolve(location)
        with fs.open_input_stream(path) as f:
            return f.read()

    def stat(self, locations: Sequence[str]) -> list[tuple[int, int, str]]:
        """(size, mtime_ns, error) per location; -1 and a reason for files that cannot be statted."""
        import pyarrow.fs as pafs

        out: list[tuple[int, int, str]] = [(-1, -1, "")] * len(locations)
        groups: dict[int, tuple[pafs.FileSystem, list[int], list[str]]] = {}
        for i, loc in enumerate(locations):
            try:
                fs, path = self.resolve(loc)
            except DataError as e:
                out[i] = (-1, -1, str(e))
                continue
            groups.setdefault(id(fs), (fs, [], []))
            groups[id(fs)][1].append(i)
            groups[id(fs)][2].append(path)
        for fs, idx, paths in groups.values():
            try:
                infos = fs.get_file_info(paths)
            except OSError:  # one bad entry fails the whole call: fall back to one at a time
                infos = []
                for p in paths:
                    try:
                        infos.append(fs.get_file_info(p))
                    except OSError as e:
                        infos.append(e)
            for i, info in zip(idx, infos, strict=True):
                if isinstance(info, OSError):
                    out[i] = (-1, -1, f"cannot stat: {info}")
                elif info.type == pafs.FileType.NotFound:
                    out[i] = (-1, -1, "file not found")
                elif info.type != pafs.FileType.File:
                    out[i] = (-1, -1, "not a file")
                else:
                    out[i] = (int(info.size or 0), mtime_ns(info), "")
        return out


def mtime_ns(info: pafs.FileInfo) -> int:
    ns = info.mtime_ns
    return int(ns) if ns is not None else -1


def sees_folders(fs: pafs.FileSystem) -> bool:
    """Whether listing one folder of `fs` shows its sub-folders. pyarrow's GCS filesystem shows a sub-folder only
    where a marker object (``name/``) exists, and archives copied in with ``gcloud storage cp`` have none: there a
    folder is listed whole, recursively (the listing then holds every file under it)."""
    return fs.type_name != "gcs"
