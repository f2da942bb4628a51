"""Where images come from: local paths and object-store URIs through pyarrow filesystems, and how inputs are listed.

Every row that crosses the pipeline names its file by a *location*: an absolute local path or a URI
(``s3://bucket/key``, ``gs://bucket/key``). Any process turns a location back into (filesystem, path) with a
`Storage` (which only holds options, so it pickles to Ray workers; credentials come from each process's own
environment or instance role, the usual AWS/GCP chain, and are never shipped). ``AWS_ENDPOINT_URL`` or
``score.endpoint_override`` point ``s3://`` at a MinIO-like store.

Inputs (`resolve_input`): a directory (recursive, by extension), a glob (``**`` recurses), or a manifest -- a
``.txt``/``.lst`` (one location per line, ``#`` comments), ``.csv`` or ``.parquet`` list (column ``path``, else
``image`` as in a prepared dataset's manifest, else ``uri``/``file``, else the only column). Relative entries are
relative to the manifest's folder.

Listing scales by splitting, not by enumerating on one process: `plan_listing` lists the top levels only (a few
calls) and returns independent parts; `walk` lists one part directory by directory and yields bounded batches, so
listing tasks run in parallel and downstream work starts with the first batch. Names starting with ``.`` (hidden
files, temporary files being written) are skipped.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from raydefect.errors import DataError, error_text, first_line
from raydefect.paths import glob_regex, has_glob, is_remote, printable_path, split_scheme

if TYPE_CHECKING:
    import pyarrow.fs as pafs

MANIFEST_SUFFIXES = {".txt": "txt", ".lst": "txt", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
MANIFEST_COLUMNS = ("path", "image", "uri", "file")


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
    endpoint = _s3_endpoint(endpoint_override)
    if endpoint:
        return pafs.S3FileSystem(endpoint_override=endpoint, retry_strategy=retry)
    return pafs.S3FileSystem(region=pafs.resolve_s3_region(bucket), retry_strategy=retry)


def _s3_endpoint(endpoint_override: str | None) -> str | None:
    return endpoint_override or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


class ConditionalObjects(Protocol):
    """Create-if-absent and compare-and-swap on single objects of one bucket. pyarrow's filesystems have neither, and
    a lock needs one: two runs that both read "no lock" and both write one would each believe they hold it."""

    def read(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and version; None if there is none."""
        ...

    def put(self, key: str, body: bytes, version: str | None) -> str | None:
        """Write `body` only if the object is absent (`version` None) or still at `version`: its new version, or None
        when it was not (another writer got there first, or it was deleted)."""
        ...

    def delete(self, key: str, version: str) -> bool:
        """Delete the object only if it is still at `version`: False when it was not (replaced, or already gone)."""
        ...


class S3ConditionalObjects:
    """`ConditionalObjects` on S3: PutObject with ``If-None-Match: *`` or ``If-Match: <ETag>`` (AWS S3 since 2024,
    MinIO; boto3, the ``s3`` extra). The version is the ETag."""

    def __init__(self, client: object, bucket: str) -> None:
        self.client, self.bucket = client, bucket

    def read(self, key: str) -> tuple[bytes, str] | None:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=key)  # type: ignore[attr-defined]
            return got["Body"].read(), got["ETag"]
        except Exception as e:
            if _s3_status(e) == 404:
                return None
            raise OSError(f"cannot read s3://{self.bucket}/{key}: {first_line(e)}") from None

    def put(self, key: str, body: bytes, version: str | None) -> str | None:
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            return self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **condition)["ETag"]  # type: ignore[attr-defined]
        except Exception as e:
            if _s3_status(e) in (404, 409, 412):  # absent for If-Match; a concurrent conditional write; not met
                return None
            raise OSError(f"cannot write s3://{self.bucket}/{key}: {first_line(e)}") from None

    def delete(self, key: str, version: str) -> bool:
        # AWS S3 since 2025-09 (412 if replaced, 404 if absent). A store that ignores If-Match deletes as before it; one
        # that refuses it (400, 501) gets the plain delete the caller's read has just justified, as before it too
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=version)  # type: ignore[attr-defined]
        except Exception as e:
            status = _s3_status(e)
            if status in (404, 412):
                return False
            if status not in (400, 501):
                raise OSError(f"cannot delete s3://{self.bucket}/{key}: {first_line(e)}") from None
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key)  # type: ignore[attr-defined]
            except Exception as e2:
                raise OSError(f"cannot delete s3://{self.bucket}/{key}: {first_line(e2)}") from None
        return True


def _s3_status(e: Exception) -> int | None:
    response = getattr(e, "response", None)  # botocore's ClientError
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None


#: What `conditional_objects` needs on each object store: the fix named when a lock cannot be atomic.
CONDITIONAL_WRITES_NEED = {
    "s3": "boto3 >= 1.36 (pip install 'raydefect[s3]')",
    "gs": "google-cloud-storage and credentials it finds (pip install 'raydefect[gcs]')",
}


def conditional_objects(location: str, storage: Storage) -> ConditionalObjects | None:
    """`ConditionalObjects` for an object-store location's bucket: on s3:// with boto3 (the endpoint, region and retry
    bound its pyarrow filesystem has), on gs:// with google-cloud-storage; None on other stores, or without them."""
    scheme, path = split_scheme(location)
    if scheme == "gs":
        client = _gcs_client(_gcs_emulator())
        return None if client is None else GcsConditionalObjects(client, path.split("/", 1)[0])
    if scheme != "s3":
        return None
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        return None
    fs, _ = storage.resolve(location)
    config = Config(retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"}, connect_timeout=5, read_timeout=30)
    client = boto3.client(
        "s3",
        endpoint_url=_s3_endpoint(storage.endpoint_override),
        region_name=getattr(fs, "region", None) or None,
        config=config,
    )
    members = client.meta.service_model.operation_model("PutObject").input_shape.members
    if not {"IfMatch", "IfNoneMatch"} <= set(members):  # botocore before late 2024: no conditional writes
        return None
    return S3ConditionalObjects(client, path.split("/", 1)[0])


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
    emulator = _gcs_emulator()
    if not emulator:
        return pafs.GcsFileSystem(retry_time_limit=retry)
    scheme, sep, host = emulator.partition("://")
    if not sep:
        scheme, host = "http", emulator
    return pafs.GcsFileSystem(anonymous=True, scheme=scheme, endpoint_override=host, retry_time_limit=retry)


def _gcs_emulator() -> str:
    """``STORAGE_EMULATOR_HOST`` as set (the Google clients' variable), or ""."""
    return os.environ.get("STORAGE_EMULATOR_HOST", "").strip().rstrip("/")


@functools.lru_cache(maxsize=1)
def _gcs_client(emulator: str) -> object | None:
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


def _gcs_list_dir(client: Any, path: str) -> list[Entry]:
    """One gs:// folder (``bucket/prefix``): its objects and, as "dir" entries, its sub-folders, markers or not."""
    from google.api_core.retry import Retry

    bucket, _, prefix = path.strip("/").partition("/")
    prefix = prefix + "/" if prefix else ""
    out: list[Entry] = []
    try:
        pages = client.list_blobs(bucket, prefix=prefix, delimiter="/", timeout=60, retry=Retry(timeout=GCS_RETRY_S))
        for blob in pages:
            if not blob.name.endswith("/"):  # "name/" is a folder marker
                out.append(Entry(f"{bucket}/{blob.name}", "file", int(blob.size or 0), _datetime_ns(blob.updated)))
        out.extend(Entry(f"{bucket}/{p.rstrip('/')}", "dir") for p in sorted(pages.prefixes))
    except Exception as e:  # google.api_core's exceptions (NotFound, Forbidden, RetryError), requests' errors
        raise DataError(f"cannot list gs://{path}: {first_line(e)}; check permissions and credentials") from None
    return out


class GcsConditionalObjects:
    """`ConditionalObjects` on Google Cloud Storage: uploads with ``ifGenerationMatch`` (0: the object must not exist;
    N: it must still be generation N), google-cloud-storage (the ``gcs`` extra). The version is the generation."""

    def __init__(self, client: Any, bucket: str) -> None:
        self.bucket = client.bucket(bucket)

    @staticmethod
    def _calls() -> dict[str, Any]:
        from google.api_core.retry import Retry

        # conditional calls are idempotent, so they are retried (bounded); a retry after a lost answer finds the
        # condition unmet, which `ScoreStore` recognises by the run's own id in the object
        return {"timeout": 60, "retry": Retry(timeout=GCS_RETRY_S)}

    def read(self, key: str) -> tuple[bytes, str] | None:
        for _ in range(3):  # the object replaced between its metadata and its bytes: read the new one
            try:
                blob = self.bucket.get_blob(key, **self._calls())
                if blob is None:
                    return None
                generation = blob.generation  # before the download, which resets it from a response header
                return blob.download_as_bytes(if_generation_match=generation, **self._calls()), str(generation)
            except Exception as e:
                if getattr(e, "code", None) not in (404, 412):
                    raise OSError(f"cannot read gs://{self.bucket.name}/{key}: {first_line(e)}") from None
        raise OSError(f"cannot read gs://{self.bucket.name}/{key}: it changed on every read; try again")

    def put(self, key: str, body: bytes, version: str | None) -> str | None:
        blob = self.bucket.blob(key)
        try:
            match = 0 if version is None else int(version)
            blob.upload_from_string(body, content_type="application/json", if_generation_match=match, **self._calls())
        except Exception as e:  # google.api_core's PreconditionFailed (412); NotFound; Conflict (concurrent writes)
            if getattr(e, "code", None) in (404, 409, 412):
                return None
            raise OSError(f"cannot write gs://{self.bucket.name}/{key}: {first_line(e)}") from None
        return str(blob.generation)

    def delete(self, key: str, version: str) -> bool:
        try:
            self.bucket.blob(key).delete(if_generation_match=int(version), **self._calls())
        except Exception as e:
            if getattr(e, "code", None) in (404, 412):
                return False
            raise OSError(f"cannot delete gs://{self.bucket.name}/{key}: {first_line(e)}") from None
        return True


def _datetime_ns(t: object) -> int:
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
                    out[i] = (int(info.size or 0), _mtime_ns(info), "")
        return out


def _mtime_ns(info: pafs.FileInfo) -> int:
    ns = info.mtime_ns
    return int(ns) if ns is not None else -1


# --- inputs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """A resolved ``--input``: what kind it is and where it lies."""

    kind: str  # "dir" | "glob" | "manifest"
    text: str  # as the user gave it
    scheme: str  # "" local, else "s3", "gs", ...
    root: str  # filesystem path: the folder, the glob's fixed base folder, or the manifest file
    pattern: str | None = None  # glob: the pattern relative to root
    manifest_format: str | None = None  # "txt" | "csv" | "parquet"

    def location(self, path: str) -> str:
        return Storage.location(self.scheme, path)


def resolve_input(text: str, storage: Storage) -> InputSpec:
    """Classify and check ``--input``; raises `DataError` naming the input and the fix."""
    import pyarrow.fs as pafs

    if not text or not text.strip():
        raise DataError("--input is empty; pass a folder, a quoted glob or a manifest (.txt, .csv, .parquet)")
    scheme, path = split_scheme(text)
    if has_glob(path):
        parts = path.split("/")
        fixed = []
        for part in parts:
            if has_glob(part):
                break
            fixed.append(part)
        base = "/".join(fixed) or ("/" if path.startswith("/") else ".")
        pattern = "/".join(parts[len(fixed) :])
        fs, _ = storage.resolve(Storage.location(scheme, base or "/"))
        info = fs.get_file_info(base)
        if info.type != pafs.FileType.Directory:
            raise DataError(f"--input {text}: the folder before the glob ({Storage.location(scheme, base)}) not found")
        glob_regex(pattern)  # fail early on nonsense
        return InputSpec("glob", text, scheme, base, pattern=pattern)
    fs, _ = storage.resolve(text)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise DataError(
            f"--input {text}: cannot read it ({error_text(e)}); check the path and the credentials"
        ) from None
    if info.type == pafs.FileType.Directory:
        # a GCS folder is a folder only while objects lie under it (or a marker object, below which the run finds none)
        if sees_folders(fs) and not fs.get_file_info(pafs.FileSelector(path, recursive=False)):
            raise DataError(f"--input {text} is an empty folder; pass the folder that holds the images")
        return InputSpec("dir", text, scheme, path.rstrip("/") or "/")
    if info.type == pafs.FileType.File:
        fmt = MANIFEST_SUFFIXES.get(Path(path).suffix.lower())
        if fmt is None:
            raise DataError(
                f"--input {text}: a single file that is not a manifest; pass its folder, a glob, or a manifest "
                f"({', '.join(MANIFEST_SUFFIXES)}) listing the images"
            )
        return InputSpec("manifest", text, scheme, path, manifest_format=fmt)
    raise DataError(f"--input {text}: not found; pass an existing folder, a quoted glob or a manifest file")


def output_folder(spec: InputSpec, out: str) -> str | None:
    """The scores folder `out` as a path on the input's filesystem, for the listing to leave out (it may lie inside
    the input: ``--input s3://b/line3/ --out s3://b/line3/scores``); None when it is on another filesystem."""
    scheme, path = split_scheme(absolute(out))
    return (path.rstrip("/") or "/") if scheme == spec.scheme else None


def manifest_column(names: Sequence[str], manifest: str) -> str:
    """Which manifest column lists the images."""
    lowered = {n.lower(): n for n in names}
    for want in MANIFEST_COLUMNS:
        if want in lowered:
            return lowered[want]
    if len(names) == 1:
        return names[0]
    raise DataError(
        f"{manifest}: no column named {', '.join(MANIFEST_COLUMNS)} among {', '.join(names)}; "
        "name the column of image paths 'path'"
    )


# --- listing --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListFilter:
    """Which files of a listing are inputs: by extension (folders) or by glob pattern, never hidden names."""

    root: str
    extensions: tuple[str, ...] = ()
    pattern: str | None = None
    exclude: str | None = None  # a folder to leave out (the scores output when it lies inside the input)

    @functools.cached_property
    def _regex(self) -> re.Pattern[str] | None:
        return glob_regex(self.pattern) if self.pattern else None

    @functools.cached_property
    def _exts(self) -> tuple[str, ...]:
        return tuple(e.lower() for e in self.extensions)

    def relative(self, path: str) -> str:
        root = self.root.rstrip("/")
        return path[len(root) + 1 :] if root and path.startswith(root + "/") else path.lstrip("/")

    def keep_dir(self, path: str) -> bool:
        if self.exclude and (path == self.exclude or path.startswith(self.exclude.rstrip("/") + "/")):
            return False
        return not path.rsplit("/", 1)[-1].startswith(".")

    def keep_file(self, path: str) -> bool:
        name = path.rsplit("/", 1)[-1]
        if name.startswith("."):
            return False
        if self._regex is not None:
            return self._regex.match(self.relative(path)) is not None
        return name.lower().endswith(self._exts)


@dataclass(frozen=True)
class ListPart:
    """One independent piece of a listing: a folder to walk recursively, or files already listed."""

    walk: str | None = None
    files: tuple[tuple[str, int, int], ...] = ()  # (path, size, mtime_ns)


@dataclass(frozen=True)
class Entry:
    """One folder entry. `kind` is "dir", "file" or "other": a FIFO, socket, device, broken or looping link -- listed
    so that it becomes an error row (with `error`) instead of vanishing or blocking a reader."""

    path: str
    kind: str
    size: int = -1
    mtime_ns: int = -1
    error: str = ""

    def row(self) -> tuple[str, int, int, str]:
        return (self.path, self.size, self.mtime_ns, self.error)


def _local_entries(path: str) -> list[Entry]:
    """A local folder through ``os.scandir``: pyarrow's listing raises on a non-UTF-8 name (one such file stopped
    the whole run) and silently drops broken links."""
    out = []
    try:
        it = os.scandir(path)
    except OSError as e:
        raise DataError(f"cannot list {path}: {e.strerror or e}; check permissions") from None
    here = os.path.realpath(path)
    with it:
        for d in it:
            name = printable_path(d.path)
            if name != d.path:
                out.append(Entry(name, "other", error="file name is not valid UTF-8 (shown with \\xNN); rename it"))
                continue
            try:
                if d.is_dir():  # follows links: a linked folder is walked, unless it links back up (a loop)
                    target = os.path.realpath(d.path)
                    if d.is_symlink() and (here == target or here.startswith(target.rstrip("/") + "/")):
                        continue
                    out.append(Entry(d.path, "dir"))
                    continue
                st = d.stat()
            except OSError as e:
                reason = "symbolic link loop" if e.errno == errno.ELOOP else "broken link" if d.is_symlink() else ""
                out.append(Entry(d.path, "other", error=f"cannot read: {reason or e.strerror or e}"))
                continue
            if stat.S_ISREG(st.st_mode):
                out.append(Entry(d.path, "file", int(st.st_size), int(st.st_mtime_ns)))
            else:
                out.append(Entry(d.path, "other", error="cannot read: not a regular file (FIFO, socket or device)"))
    return out


def _list_dir(fs: pafs.FileSystem, path: str) -> list[Entry]:
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        return _local_entries(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as e:
        raise DataError(f"cannot list {path}: {error_text(e)}; check permissions and credentials") from None
    kinds = {pafs.FileType.Directory: "dir", pafs.FileType.File: "file"}
    return [Entry(i.path, kinds.get(i.type, "other"), int(i.size or 0), _mtime_ns(i)) for i in infos]


def sees_folders(fs: pafs.FileSystem) -> bool:
    """Whether listing one folder of `fs` shows its sub-folders. pyarrow's GCS filesystem shows a sub-folder only
    where a marker object (``name/``) exists, and archives copied in with ``gcloud storage cp`` have none: there a
    folder is listed whole, recursively (the listing then holds every file under it)."""
    return fs.type_name != "gcs"


def _folder_lister(fs: pafs.FileSystem) -> Callable[[str], list[Entry]] | None:
    """How to list one folder with its sub-folders, or None where only a recursive listing finds every file (gs://
    without the google-cloud-storage client: the folder is then listed whole by one task)."""
    if sees_folders(fs):
        return functools.partial(_list_dir, fs)
    client = _gcs_client(_gcs_emulator()) if fs.type_name == "gcs" else None
    return None if client is None else functools.partial(_gcs_list_dir, client)


def _list_tree(fs: pafs.FileSystem, root: str, filt: ListFilter) -> list[Entry]:
    """Every wanted file under `root` by one recursive listing, minus those under folders `filt` leaves out."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise DataError(f"cannot list {root}: {error_text(e)}; check permissions and credentials") from None
    base = root.rstrip("/") + "/"
    out = []
    for i in infos:
        if i.type == pafs.FileType.Directory:
            continue
        folders = i.path[len(base) :].split("/")[:-1] if i.path.startswith(base) else []
        if all(filt.keep_dir(base + "/".join(folders[: k + 1])) for k in range(len(folders))):
            entry = Entry(i.path, "file" if i.type == pafs.FileType.File else "other", int(i.size or 0), _mtime_ns(i))
            if _wanted(entry, filt):
                out.append(entry)
    return out


def _walk_entries(fs: pafs.FileSystem, root: str, filt: ListFilter) -> Iterator[Entry]:
    """The wanted entries under `root`, folder by folder (depth first, sorted), or by one recursive listing where
    listing a folder does not show its sub-folders."""
    lister = _folder_lister(fs)
    if lister is None:
        yield from _list_tree(fs, root, filt)
        return
    stack = [root]
    while stack:
        folder = stack.pop()
        subdirs = []
        for entry in lister(folder):
            if entry.kind == "dir":
                if filt.keep_dir(entry.path):
                    subdirs.append(entry.path)
            elif _wanted(entry, filt):
                yield entry
        stack.extend(sorted(subdirs, reverse=True))


def _wanted(entry: Entry, filt: ListFilter) -> bool:
    """Files, and odd entries that look like inputs (so they get an error row)."""
    return entry.kind != "dir" and (entry.kind == "file" or bool(entry.error)) and filt.keep_file(entry.path)


def plan_listing(spec: InputSpec, storage: Storage, filt: ListFilter, min_parts: int = 8) -> list[ListPart]:
    """Split a folder/glob listing into parts by listing only the top levels (breadth-first, at most 3 levels, until
    there are `min_parts` folders). Cheap on the driver whatever the archive size: the folders found are walked by
    workers; files met on the way (small archives) are handed out in chunks of 1,000."""
    fs, _ = storage.resolve(spec.location(spec.root))
    lister = _folder_lister(fs)
    if lister is None:
        return [ListPart(walk=spec.root)]
    files: list[tuple[str, int, int, str]] = []
    frontier, levels = [spec.root], 0
    while frontier and len(frontier) < min_parts and levels < 3 and len(files) < 100_000:
        nxt: list[str] = []
        for folder in frontier:
            for entry in lister(folder):
                if entry.kind == "dir" and filt.keep_dir(entry.path):
                    nxt.append(entry.path)
                elif _wanted(entry, filt):
                    files.append(entry.row())
        frontier, levels = nxt, levels + 1
    parts = [ListPart(walk=folder) for folder in sorted(frontier)]
    for i in range(0, len(files), 1000):
        parts.append(ListPart(files=tuple(files[i : i + 1000])))
    return parts


def walk(
    part: ListPart, spec: InputSpec, storage: Storage, filt: ListFilter, batch_rows: int = 1000
) -> Iterator[list[tuple[str, int, int, str]]]:
    """Yield (location, size, mtime_ns, error) of matching entries of one part, at most `batch_rows` at a time."""
    batch = [(spec.location(f[0]), *f[1:3], f[3] if len(f) > 3 else "") for f in part.files]
    if part.walk is not None:
        fs, _ = storage.resolve(spec.location(part.walk))
        for entry in _walk_entries(fs, part.walk, filt):
            batch.append((spec.location(entry.path), entry.size, entry.mtime_ns, entry.error))
            if len(batch) >= batch_rows:
                yield batch
                batch = []
    if batch:
        yield batch
