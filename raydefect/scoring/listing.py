"""How inputs are listed, at scale, by splitting rather than enumerating on one process: `plan_listing` lists the
top levels only (a few calls) and returns independent parts; `walk` lists one part directory by directory and
yields bounded batches, so listing tasks run in parallel and downstream work starts with the first batch. Names
starting with ``.`` (hidden files, temporary files being written) are skipped.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raydefect.errors import DataError, error_text, first_line
from raydefect.paths import glob_regex, printable_path
from raydefect.scoring import storage as object_storage
from raydefect.scoring.sources import InputSpec
from raydefect.scoring.storage import Storage, datetime_ns, gcs_client, gcs_emulator, mtime_ns, sees_folders

if TYPE_CHECKING:
    import pyarrow.fs as pafs


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
    return [Entry(i.path, kinds.get(i.type, "other"), int(i.size or 0), mtime_ns(i)) for i in infos]


def _folder_lister(fs: pafs.FileSystem) -> Callable[[str], list[Entry]] | None:
    """How to list one folder with its sub-folders, or None where only a recursive listing finds every file (gs://
    without the google-cloud-storage client: the folder is then listed whole by one task)."""
    if sees_folders(fs):
        return functools.partial(_list_dir, fs)
    client = gcs_client(gcs_emulator()) if fs.type_name == "gcs" else None
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
            entry = Entry(i.path, "file" if i.type == pafs.FileType.File else "other", int(i.size or 0), mtime_ns(i))
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


def _gcs_list_dir(client: Any, path: str) -> list[Entry]:
    """One gs:// folder (``bucket/prefix``): its objects and, as "dir" entries, its sub-folders, markers or not."""
    from google.api_core.retry import Retry

    bucket, _, prefix = path.strip("/").partition("/")
    prefix = prefix + "/" if prefix else ""
    out: list[Entry] = []
    try:
        pages = client.list_blobs(
            bucket, prefix=prefix, delimiter="/", timeout=60, retry=Retry(timeout=object_storage.GCS_RETRY_S)
        )
        for blob in pages:
            if not blob.name.endswith("/"):  # "name/" is a folder marker
                out.append(Entry(f"{bucket}/{blob.name}", "file", int(blob.size or 0), datetime_ns(blob.updated)))
        out.extend(Entry(f"{bucket}/{p.rstrip('/')}", "dir") for p in sorted(pages.prefixes))
    except Exception as e:  # google.api_core's exceptions (NotFound, Forbidden, RetryError), requests' errors
        raise DataError(f"cannot list gs://{path}: {first_line(e)}; check permissions and credentials") from None
    return out
