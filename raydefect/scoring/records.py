"""The scores folder's layout names and what its runs write down: staged files, commit records (`RunRecord`), what
recovery did (`Recovery`), and the staged-file writer the pipeline's write tasks run. The protocol itself is
`raydefect.scoring.store`'s."""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from raydefect import __version__
from raydefect.errors import OutputError, error_text, first_line
from raydefect.paths import is_remote, split_scheme, write_atomic
from raydefect.scoring.keys import (
    DIGEST,
    digests_from_bytes,
    key_digests,
)
from raydefect.scoring.schema import SCORE_SCHEMA
from raydefect.scoring.storage import Storage

if TYPE_CHECKING:
    import pyarrow as pa

STORE_FORMAT = 1
MARKER = "_raydefect_scores.json"
COMMITS = "_commits"
STAGING = "_staging"
STAGED_SUFFIX = ".parquet.staged"
DAMAGED = "_damaged"


def new_run_id(now: dt.datetime | None = None) -> str:
    """Sortable and unique: ``20250101T020000Z-1a2b3c``."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def read_error_gist(error: BaseException) -> str:
    """The gist of a read error: its first line, without pyarrow's repetition of the path."""
    return re.sub(r"^Could not open Parquet input source '[^']*': ", "", first_line(error, 1000))[:160]


def json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=1) + "\n").encode()


def json_or_none(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data.decode())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class StagedFile:
    """What a writer hands the driver about one staged file."""

    location: str
    rows: int
    errors: int
    defects: int
    digests: np.ndarray  # dtype DIGEST, one per row
    nodes: tuple[str, ...] = ()
    moved_to: str | None = None  # set by `ScoreStore.commit` as it starts moving the file into the data area

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> StagedFile:
        return cls(
            location=row["file"],
            rows=int(row["rows"]),
            errors=int(row["errors"]),
            defects=int(row["defects"]),
            digests=digests_from_bytes(row["digests"]),
            nodes=tuple(row.get("nodes") or ()),
        )


@dataclass
class RunRecord:
    """``_commits/<run_id>.json``: the run and every file it committed (paths relative to OUT)."""

    run_id: str
    model_id: str
    key_mode: str
    input: str = ""
    state: str = "running"  # running -> finished | failed | interrupted (Ctrl-C, or found dead by a later run)
    started_at: str = field(default_factory=utc_now)
    updated_at: str = field(default_factory=utc_now)
    files: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    lost_files: list[dict[str, Any]] = field(default_factory=list)  # committed, later found missing or damaged
    raydefect_version: str = __version__
    format: int = STORE_FORMAT

    @property
    def rows(self) -> int:
        return sum(int(f["rows"]) for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "run_id": self.run_id,
            "model_id": self.model_id,
            "key_mode": self.key_mode,
            "input": self.input,
            "state": self.state,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "raydefect_version": self.raydefect_version,
            "rows": self.rows,
            "files": self.files,
            "stats": self.stats,
            **({"lost_files": self.lost_files} if self.lost_files else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        return cls(
            run_id=d["run_id"],
            model_id=d["model_id"],
            key_mode=d.get("key_mode", "stat"),
            input=d.get("input", ""),
            state=d.get("state", "running"),
            started_at=d.get("started_at", ""),
            updated_at=d.get("updated_at", ""),
            files=list(d.get("files", [])),
            stats=dict(d.get("stats", {})),
            lost_files=list(d.get("lost_files", [])),
            raydefect_version=d.get("raydefect_version", ""),
            format=int(d.get("format", STORE_FORMAT)),
        )


def write_staged(
    table: pa.Table,
    staging: str,
    storage: Storage,
    metadata: dict[str, str],
    key_mode: str,
    node_id: str | None = None,
) -> dict[str, Any]:
    """Write one batch of score rows as a staged Parquet file, atomically; returns what the driver commits.

    Runs on Ray workers (the pipeline's last stage) and in tests.
    """
    import pyarrow.parquet as pq

    from raydefect.scoring.schema import conform, schema_with_metadata

    fs, folder = storage.resolve(staging)
    name = f"part-{uuid.uuid4().hex[:12]}{STAGED_SUFFIX}"
    final = f"{folder}/{name}"
    table = conform(table).cast(SCORE_SCHEMA).replace_schema_metadata(schema_with_metadata(metadata).metadata)
    try:
        fs.create_dir(folder, recursive=True)
        if is_remote(staging):  # an upload becomes visible only when complete
            with fs.open_output_stream(final) as f:
                pq.write_table(table, f, compression="zstd")
        else:  # a half-written file never stays behind (it only ever has a hidden name)
            write_local_parquet(table, final)
    except OSError as e:
        raise OutputError(f"cannot write scores to {staging}: {error_text(e)}; check space and permissions") from None
    digests = row_digests(table, key_mode)
    errors, defects = row_counts(table)
    return {
        "file": Storage.location(split_scheme(staging)[0], final),
        "rows": table.num_rows,
        "errors": errors,
        "defects": defects,
        "digests": digests.tobytes(),
        "nodes": sorted({n for n in table.column("node_id").to_pylist() if n} | ({node_id} if node_id else set())),
    }


def write_local_parquet(table: pa.Table, path: str) -> None:
    """A local Parquet file (zstd), whole or not at all (`paths.write_atomic`)."""
    import pyarrow.parquet as pq

    write_atomic(path, lambda tmp: pq.write_table(table, str(tmp), compression="zstd"))


def row_digests(table: pa.Table, key_mode: str) -> np.ndarray:
    """Key digests of score rows (``model_id`` is taken from the rows)."""
    if table.num_rows == 0:
        return np.empty(0, DIGEST)
    model_ids = table.column("model_id").to_pylist()
    paths = table.column("path").to_pylist()
    sizes = table.column("size").to_pylist()
    mtimes = table.column("mtime_ns").to_pylist()
    sha1s = table.column("sha1").to_pylist()
    if len(set(model_ids)) == 1:
        return key_digests(model_ids[0], paths, sizes, mtimes, sha1s, key_mode)
    return np.concatenate(
        [
            key_digests(m, [p], [s], [t], [h], key_mode)
            for m, p, s, t, h in zip(model_ids, paths, sizes, mtimes, sha1s, strict=True)
        ]
    )


def row_counts(table: pa.Table) -> tuple[int, int]:
    """(rows with an error, rows judged defect)."""
    import pyarrow.compute as pc

    errors = pc.sum(pc.is_valid(table.column("error"))).as_py() or 0
    defects = pc.sum(pc.fill_null(table.column("is_defect"), False)).as_py() or 0
    return int(errors), int(defects)


@dataclass
class Recovery:
    adopted_files: int = 0
    recovered_rows: int = 0
    dropped_rows: int = 0
    discarded_files: int = 0
    interrupted_runs: list[str] = field(default_factory=list)
