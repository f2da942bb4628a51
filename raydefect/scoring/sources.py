"""Inputs of `raydefect score` (`resolve_input`): a directory (recursive, by extension), a glob (``**`` recurses),
or a manifest -- a ``.txt``/``.lst`` (one location per line, ``#`` comments), ``.csv`` or ``.parquet`` list (column
``path``, else ``image`` as in a prepared dataset's manifest, else ``uri``/``file``, else the only column). Relative
entries are relative to the manifest's folder. Files are reached through `raydefect.scoring.storage` and listed by
`raydefect.scoring.listing`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from raydefect.errors import DataError, error_text
from raydefect.paths import glob_regex, has_glob, split_scheme
from raydefect.scoring.storage import Storage, absolute, sees_folders

if TYPE_CHECKING:
    pass

MANIFEST_SUFFIXES = {".txt": "txt", ".lst": "txt", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
MANIFEST_COLUMNS = ("path", "image", "uri", "file")


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
