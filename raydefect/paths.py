"""File names as text: what a CSV, a Parquet string column or a log line can hold.

POSIX file names are bytes; Python keeps bytes that are not UTF-8 as lone surrogates (PEP 383), which open()
accepts but no UTF-8 writer does. Every output that writes a path as text goes through `printable_path`, so one
odd name becomes a readable, stable string (its bad bytes as ``\\xNN``) instead of crashing the whole job.
Also the one copy of what every writer and reader of paths shares: `write_atomic` (a file written whole or not at
all), the glob characters (`has_glob`), and URI schemes (`split_scheme`, `is_remote`, `is_uri`).
"""

from __future__ import annotations

import glob
import os
import re
import uuid
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from raydefect.errors import OutputError


def printable_path(path: str) -> str:
    """`path` as valid UTF-8 text: undecodable bytes become ``\\xNN``; already valid names are returned unchanged."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_printable(path: str) -> bool:
    """True when `path` is valid UTF-8 text as it is."""
    return printable_path(path) == path


#: What makes a path a glob pattern (as Python's glob reads it).
GLOB_CHARS = frozenset("*?[")


def has_glob(text: str) -> bool:
    """Whether `text` holds a glob character (``*``, ``?`` or ``[``)."""
    return bool(GLOB_CHARS.intersection(text))


def is_uri(location: str) -> bool:
    """Whether `location` names a scheme (``s3://``, ``gs://``, ``file://`` ...) rather than a plain path."""
    return "://" in location


def is_remote(location: str) -> bool:
    """Whether `location` is on object or cluster storage: a URI whose scheme is not ``file``."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.lower() != "file"


def split_scheme(location: str) -> tuple[str, str]:
    """``s3://b/k`` -> ("s3", "b/k"); a local path -> ("", absolute path); ``file:///x`` -> ("", "/x")."""
    scheme, sep, rest = location.partition("://")
    if sep and scheme.lower() != "file":
        return scheme.lower(), rest
    path = rest if sep else location
    return "", os.path.abspath(os.path.expanduser(path))


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob relative to its base folder -> regex over '/'-separated relative paths (``**`` spans folders)."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 2)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j]
                body = "^" + body[1:] if body.startswith("!") else body
                out.append(f"[{body}]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def glob_files(pattern: str) -> list[str]:
    """Like ``glob.glob(pattern, recursive=True)`` (sorted; hidden names left out), but ``**`` never follows a
    symlinked folder: Python's glob does, so a link to a parent folder repeats the tree 40 times (until ELOOP), and
    two such links make the walk exponential. Folder walks elsewhere use ``os.walk`` (which does not follow links)."""
    pattern = os.path.expanduser(pattern)
    if "**" not in pattern:
        return sorted(glob.glob(pattern))
    parts = pattern.split("/")
    first = next(i for i, p in enumerate(parts) if has_glob(p))
    base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
    regex = glob_regex("/".join(parts[first:]))
    found = []
    for root, dirs, files in os.walk(base):  # followlinks=False
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = os.path.relpath(root, base)
        for name in files:
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if not name.startswith(".") and regex.match(rel):
                found.append(os.path.join(base, rel) if base != "." else rel)
    return sorted(found)


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (a rename in it), to the disk. A folder the platform cannot flush
    this way is left to the OS."""
    folder = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(fd)


def new_file_mode() -> int:
    """The permission bits ``open()`` gives a new file here (0o666 less the umask, usually 0o644)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def share_like_other_outputs(path: str | Path) -> None:
    """Give a file written by a library that creates it private (safetensors writes 0600) the mode of every other
    output, so a team's service account reads a model as it reads the YAML beside it."""
    os.chmod(path, new_file_mode())


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write `path` whole or not at all. ``write(tmp)`` fills a hidden temporary file in the same folder; that file
    is flushed to disk, renamed over `path` (``os.replace``), and the folder is flushed so the rename survives a
    power cut too. A reader, a crash or a full disk never sees half a file; on any failure the temporary file is
    removed, the previous `path` stays as it was, and the exception propagates."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise
    fsync_path(path.parent)
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """`write_atomic` of `data`."""
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`write_atomic` of UTF-8 `text` (CSV, YAML, JSON records); a failure is one `OutputError` naming the file."""
    try:
        return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def check_report_file(path: str | Path, option: str, scores_out: str | None = None) -> Path:
    """Refuse, before any work, a report file (``--json``, ``--summary-json``) that could not be written at the end
    of a long run, or that would sit among the Parquet files of the scores folder `scores_out` (``pd.read_parquet``
    and ``pq.read_table`` of the folder would then fail on it; names starting with ``_`` or ``.`` are skipped by
    them and allowed)."""
    path = Path(path).expanduser().absolute()
    parent = path.parent
    out = Path(scores_out).expanduser().absolute() if scores_out and not is_uri(scores_out) else None
    if out is not None and path.is_relative_to(out) and not path.relative_to(out).parts[0].startswith(("_", ".")):
        raise OutputError(
            f"{option} {path} is inside the scores folder {out}, where pandas and pyarrow would try to read it "
            f"as Parquet; write it beside the folder, or name it _{path.name}"
        )
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name")
    if parent == out and not out.exists():
        return path  # OUT/_name.json: the folder is created by the run
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: the folder {parent} does not exist; create it or write elsewhere")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"{option} {path} is not writable; fix the permissions or write elsewhere")
    return path
