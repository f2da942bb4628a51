"""The scores folder and its commit protocol: exactly one row per image per model, whatever kills a run.

Layout of ``OUT`` (a local folder or an object-store prefix)::

    OUT/_raydefect_scores.json                      marker: this folder holds raydefect scores (format version)
    OUT/<model_id>/<run_id>/part-00000-<uid>.parquet   committed data: what readers see
    OUT/_commits/<run_id>.json                      commit record: run, model, state, files with row counts
    OUT/_staging/<run_id>/part-<uid>.parquet.staged    written by workers, not yet committed
    OUT/.lock                                       local runs: an flock'ed file naming the holder
    OUT/_damaged/<model_id>/<run_id>/part-...parquet   committed files later found unreadable, set aside

Protocol. Workers write each output file into the run's staging folder, atomically (a hidden temporary name
renamed into place; an object-store upload is atomic by itself), and hand the file's name, row count and key
digests to the driver. Only the driver commits: every ``score.commit_interval_s`` it moves the staged files it was
handed into the data area and rewrites the run's commit record (temporary file + rename). So:

- a file written by a Ray task that was then retried (its worker died after writing) is never handed to the
  driver: it stays in staging and is deleted with it; the retry's file is the one committed;
- a partially written file (SIGKILL mid-write) only ever exists under a hidden temporary name;
- readers without raydefect read ``OUT/*/*/*.parquet`` (pyarrow and pandas skip ``_``/``.`` names by themselves),
  which only ever holds complete, committed files.

Recovery (`ScoreStore.recover`, at the start of every run, under the lock so every other run is dead): (1) files
in the data area that no record lists (killed between a move and the record update) are adopted into their run's
record; (2) complete staged files of dead runs are recovered -- their rows not yet committed (by key) are written
into the data area, the rest dropped -- and partial ones deleted; a dead run's record is marked ``interrupted``.
The driver also checks every file's digests against what this run already committed, and readers de-duplicate
by key (`raydefect.scoring.results`), as final safety nets.

A committed file that is later missing (deleted by hand, a retention rule, a partial copy) or unreadable (cut
short) is skipped with a warning naming it by readers (`read_committed`); a scoring run, under the lock, also moves
it out of its record into the record's ``lost_files`` (an unreadable file is set aside under ``_damaged/``), so its
images count as unscored and are scored again, and the warning is not repeated every night.

Concurrency: one run per ``OUT``. Locally an exclusive ``fcntl.flock`` on ``OUT/.lock`` (released by the kernel
when the holder dies, even by SIGKILL); a second run fails at once naming the holder (pid, host, start). On
object stores a lock object with a heartbeat. On S3 with boto3 and on GCS with google-cloud-storage it is created,
taken over and renewed with conditional writes (`ConditionalObjects`: If-None-Match / If-Match on the ETag;
ifGenerationMatch on the generation), so of two runs that both found it free only one gets it. pyarrow has no atomic
create, so without those libraries it is written and read back (a best effort that catches runs started apart, not
at the same second) -- schedule with one scheduler (cron, or a Kubernetes CronJob with
``concurrencyPolicy: Forbid`` as in ``jobs/kuberay-nightly.yaml``). A thread renews the
heartbeat every ``REMOTE_LOCK_BEAT_S`` while the lock is held; a lock object not renewed for
``REMOTE_LOCK_LEASE_S`` is free, one whose holder ran on this host and is gone is taken over at once, and a run
whose lock was taken commits nothing more (`check_lock`, before every commit).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from raydefect import __version__, console
from raydefect.errors import OutputError, error_text, first_line
from raydefect.paths import is_remote, split_scheme, write_atomic, write_bytes_atomic
from raydefect.scoring.keys import (
    DIGEST,
    RETRY_PREFIX,
    KeySet,
    contains,
    digests_from_bytes,
    first_occurrence,
    key_digests,
)
from raydefect.scoring.schema import SCORE_SCHEMA
from raydefect.scoring.sources import (
    CONDITIONAL_WRITES_NEED,
    ConditionalObjects,
    Storage,
    absolute,
    conditional_objects,
    sees_folders,
)

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

STORE_FORMAT = 1
MARKER = "_raydefect_scores.json"
COMMITS = "_commits"
STAGING = "_staging"
LOCK_FILE = ".lock"
REMOTE_LOCK = "_lock.json"
REMOTE_LOCK_LEASE_S = 5 * 60  # a lock object whose heartbeat is older is free (its run died without releasing it)
REMOTE_LOCK_BEAT_S = 30.0  # a thread renews the heartbeat this often while the lock is held
STAGED_SUFFIX = ".parquet.staged"
DAMAGED = "_damaged"


def new_run_id(now: dt.datetime | None = None) -> str:
    """Sortable and unique: ``20250101T020000Z-1a2b3c``."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def _first_line(error: BaseException) -> str:
    """The gist of a read error: its first line, without pyarrow's repetition of the path."""
    return re.sub(r"^Could not open Parquet input source '[^']*': ", "", first_line(error, 1000))[:160]


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=1) + "\n").encode()


def _json_or_none(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data.decode())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _dead_here(holder: dict[str, Any]) -> bool:
    """Whether a lock holder ran on this host and its process is gone (SIGKILL, OOM: it never released the lock)."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        pid = int(holder.get("pid", 0))
        if pid <= 0:
            return False
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError):
        return False  # alive under another user, or no usable pid: let the lease decide
    return False


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
    started_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)
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

    from raydefect.scoring.schema import schema_with_metadata

    fs, folder = storage.resolve(staging)
    name = f"part-{uuid.uuid4().hex[:12]}{STAGED_SUFFIX}"
    final = f"{folder}/{name}"
    table = table.cast(SCORE_SCHEMA).replace_schema_metadata(schema_with_metadata(metadata).metadata)
    try:
        fs.create_dir(folder, recursive=True)
        if is_remote(staging):  # an upload becomes visible only when complete
            with fs.open_output_stream(final) as f:
                pq.write_table(table, f, compression="zstd")
        else:  # a half-written file never stays behind (it only ever has a hidden name)
            _write_local_parquet(table, final)
    except OSError as e:
        raise OutputError(f"cannot write scores to {staging}: {error_text(e)}; check space and permissions") from None
    digests = row_digests(table, key_mode)
    errors, defects = _counts(table)
    return {
        "file": Storage.location(split_scheme(staging)[0], final),
        "rows": table.num_rows,
        "errors": errors,
        "defects": defects,
        "digests": digests.tobytes(),
        "nodes": sorted({n for n in table.column("node_id").to_pylist() if n} | ({node_id} if node_id else set())),
    }


def _write_local_parquet(table: pa.Table, path: str) -> None:
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


def _counts(table: pa.Table) -> tuple[int, int]:
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


class ScoreStore:
    """One scores folder. Create with `ScoreStore(out)`; `open()` checks it can be written and marks it."""

    def __init__(self, out: str, storage: Storage | None = None) -> None:
        self.out = absolute(out)
        self.storage = storage or Storage()
        self.remote = is_remote(self.out)
        self.fs, self.root = self.storage.resolve(self.out)
        self.root = self.root.rstrip("/")
        self._lock_fd: int | None = None
        self._holder: dict[str, Any] | None = None  # the remote lock object this store holds, while it does
        self._cond: ConditionalObjects | None = None  # conditional writes for the lock object, where the store has them
        self._version: str | None = None  # the lock object's version (S3 ETag, GCS generation) this run last wrote
        self._lost: dict[str, Any] | None = None  # what the heartbeat found in its place (empty: deleted)

    # --- paths ----------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def location(self, *parts: str) -> str:
        return Storage.location(split_scheme(self.out)[0], self.path(*parts))

    def _key(self, *parts: str) -> str:
        """An object's key within its bucket (``path`` without the bucket)."""
        return self.path(*parts).split("/", 1)[1]

    def staging(self, run_id: str) -> str:
        return self.location(STAGING, run_id)

    def _info(self, path: str) -> pafs.FileInfo:
        return self.fs.get_file_info(path)

    def _ls(self, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info(self.path(MARKER)).type == pafs.FileType.File

    # --- set-up ---------------------------------------------------------------------------------------------
    def open(self) -> None:
        """Create or check ``OUT``: it must be empty or a raydefect scores folder, and writable."""
        import pyarrow.fs as pafs

        try:
            info = self._info(self.root)
            if info.type == pafs.FileType.File:
                raise OutputError(f"--out {self.out} is a file; pass a folder for the scores")
            if info.type == pafs.FileType.Directory and not self.exists():
                # recursive where listing a folder hides its sub-folders (GCS): an archive's prefix is not empty
                entries = [e for e in self._ls(self.root, not sees_folders(self.fs)) if not e.base_name.startswith(".")]
                if entries:
                    raise OutputError(
                        f"--out {self.out} is not empty and holds no raydefect scores ({MARKER} is missing); "
                        "choose a new or empty folder"
                    )
            self.fs.create_dir(self.root, recursive=True)
            if not self.exists():
                self._write_json(self.path(MARKER), {"format": STORE_FORMAT, "created_at": _now(), "tool": "raydefect"})
            if not self.remote and not os.access(self.root, os.W_OK):
                raise OutputError(f"--out {self.out} is not writable; fix its permissions or choose another folder")
        except OSError as e:
            raise OutputError(
                f"cannot write to --out {self.out}: {error_text(e)}; check the path and permissions"
            ) from None

    def _write_json(self, path: str, data: dict[str, Any]) -> None:
        payload = _json_bytes(data)
        if self.remote:
            with self.fs.open_output_stream(path) as f:
                f.write(payload)
            return
        try:
            write_bytes_atomic(path, payload)
        except OSError as e:  # disk full, read-only: the previous version of `path` stays as it was
            raise OutputError(
                f"cannot write {path}: {e.strerror or e}; free space or fix permissions on --out and re-run "
                "(what was committed before is complete; the rest is scored again)"
            ) from None

    def _read_json(self, path: str) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return _json_or_none(f.read())
        except FileNotFoundError:
            return None
        except OSError as e:
            if "not found" in str(e).lower() or "does not exist" in str(e).lower():
                return None
            raise

    # --- lock -----------------------------------------------------------------------------------------------
    @contextmanager
    def lock(self, run_id: str) -> Iterator[None]:
        """Exclusive use of ``OUT`` for one run (see the module docstring for object stores)."""
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": _now(), "run_id": run_id}
        if self.remote:
            self._remote_lock(holder)
            stop = threading.Event()
            beat = threading.Thread(
                target=self._beat, args=(holder, stop), daemon=True, name="raydefect-lock-heartbeat"
            )
            beat.start()
            try:
                yield
            finally:
                stop.set()
                beat.join(timeout=5)
                self._remote_unlock(run_id)
                self._holder = None
            return
        import fcntl

        path = self.path(LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(self._busy_message(self._read_json(path))) from None
        except OSError as e:
            os.close(fd)
            raise OutputError(f"cannot lock {path}: {e}; put --out on a file system that supports locks") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._lock_fd = fd
        try:
            yield
        finally:
            self._lock_fd = None
            os.ftruncate(fd, 0)
            os.close(fd)  # closing releases the flock

    def _busy_message(self, holder: dict[str, Any] | None) -> str:
        who = "another run"
        if holder:
            who = (
                f"run {holder.get('run_id')} (pid {holder.get('pid')} on host {holder.get('host')}, "
                f"started {holder.get('started_at')})"
            )
        return f"--out {self.out} is locked by {who}; wait for it to finish, or write to another --out"

    def _remote_lock(self, holder: dict[str, Any]) -> None:
        path = self.path(REMOTE_LOCK)
        self._cond = conditional_objects(self.out, self.storage)
        version: str | None = None  # the lock object's version as read, for a conditional takeover
        if self._cond is not None:
            current, version = self._lock_object()
        else:
            need = CONDITIONAL_WRITES_NEED.get(split_scheme(self.out)[0], "conditional writes")
            console.warn(
                f"the lock on {self.out} is not atomic without {need}: two runs started in the same second could "
                "both run; install it, or start runs from one scheduler"
            )
            current = self._read_json(path)
        if current:
            age = time.time() - float(current.get("heartbeat", 0))
            if _dead_here(current):
                console.warn(
                    f"taking over the lock of run {current.get('run_id')} on {self.out}: its process (pid "
                    f"{current.get('pid')} on this host) is gone"
                )
            elif age < REMOTE_LOCK_LEASE_S:
                lapse = dt.datetime.fromtimestamp(time.time() + REMOTE_LOCK_LEASE_S - age, dt.timezone.utc)
                raise OutputError(
                    self._busy_message(current) + f" (lock object {self.location(REMOTE_LOCK)}, last heartbeat "
                    f"{age:.0f} s ago; if that run died, its lock lapses at {lapse:%H:%M:%S} UTC, "
                    f"{REMOTE_LOCK_LEASE_S // 60} min after its last heartbeat, or delete the lock object)"
                )
        payload = {**holder, "heartbeat": time.time()}
        if self._cond is not None:  # atomic: of two runs that both found the lock free, one write fails here
            self._version = self._conditional_write(payload, version)
            if self._version is None:
                raise OutputError(self._busy_message(self._read_json(path)))
        else:
            self._write_json(path, payload)
        time.sleep(0.2)  # and read back: a store without conditional writes (or one that ignores them)
        mine = self._read_json(path)
        if not mine or mine.get("run_id") != holder["run_id"]:
            raise OutputError(self._busy_message(mine))
        self._holder, self._lost = holder, None

    def _lock_object(self) -> tuple[dict[str, Any] | None, str | None]:
        """The lock object as read by the conditional writer: (its holder, its version); (None, None) if absent."""
        assert self._cond is not None
        found = self._cond.read(self._key(REMOTE_LOCK))
        return (_json_or_none(found[0]), found[1]) if found else (None, None)

    def _conditional_write(self, payload: dict[str, Any], version: str | None) -> str | None:
        """Write the lock object if it is still at `version` (None: absent); its new version, or None if another run
        holds it. A refused write whose object holds this run's own id is this run's: an earlier attempt went through
        and its answer was lost (a timeout, then the SDK's retry found the condition no longer met)."""
        assert self._cond is not None
        new = self._cond.put(self._key(REMOTE_LOCK), _json_bytes(payload), version)
        if new is None:
            current, version = self._lock_object()
            if current and current.get("run_id") == payload["run_id"]:
                return version
        return new

    def _beat(self, holder: dict[str, Any], stop: threading.Event) -> None:
        """Renew the lock object's heartbeat until `stop`, for as long as the lock is held (listing, recovery and
        scoring alike: renewed only at commits, it lapsed under a run scoring its first 5,000 images slowly, and a
        second run took over and deleted the live run's staged files). Stops renewing once another run holds it, or
        once the lock object is gone (deleted by hand to break it: never written back)."""
        while not stop.wait(REMOTE_LOCK_BEAT_S):
            try:
                payload = {**holder, "heartbeat": time.time()}
                if self._cond is not None:  # renewed only if still the version this run wrote
                    self._version = self._conditional_write(payload, self._version)
                    if self._version is None:
                        self._lost = self._read_json(self.path(REMOTE_LOCK)) or {}
                        return
                    continue
                current = self._read_json(self.path(REMOTE_LOCK))
                if not current or current.get("run_id") != holder["run_id"]:
                    self._lost = current or {}
                    return
                self._write_json(self.path(REMOTE_LOCK), payload)
            except OSError as e:  # an object store that does not answer for a while: try again at the next beat
                console.debug(f"lock heartbeat on {self.out} failed: {e}")

    def check_lock(self) -> None:
        """Raise if another run has taken this run's lock object (a lapsed heartbeat): committing now could put an
        image's row in twice. Local locks cannot be lost."""
        if self._holder is None:
            return
        current = self._lost if self._lost is not None else self._read_json(self.path(REMOTE_LOCK))
        if not current or current.get("run_id") != self._holder["run_id"]:
            how = (
                f"the lock object is now held by run {current.get('run_id')} (pid {current.get('pid')} on host "
                f"{current.get('host')})"
                if current
                else "the lock object was deleted"
            )
            raise OutputError(
                f"this run lost its lock on {self.out} ({how}): stopping without committing; the images not committed "
                "are scored by the next run"
            )

    def _remote_unlock(self, run_id: str) -> None:
        """Delete the lock object if this run still holds it. With conditional writes the delete is conditional too,
        on the version read: a lock taken over between that read and the delete (this run's lease lapsed) stays with
        its new holder."""
        if self._cond is None:
            current = self._read_json(self.path(REMOTE_LOCK))
            if current and current.get("run_id") == run_id:
                self.fs.delete_file(self.path(REMOTE_LOCK))
            return
        for _ in range(3):  # refused: replaced since the read (another run, or this run's last heartbeat): look again
            current, version = self._lock_object()
            if not current or current.get("run_id") != run_id or version is None:
                return
            if self._cond.delete(self._key(REMOTE_LOCK), version):
                return

    # --- records --------------------------------------------------------------------------------------------
    def records(self) -> list[RunRecord]:
        import pyarrow.fs as pafs

        out = []
        for info in self._ls(self.path(COMMITS)):
            if (
                info.type == pafs.FileType.File
                and info.base_name.endswith(".json")
                and not info.base_name.startswith(".")
            ):
                data = self._read_json(info.path)
                if data is not None:
                    out.append(RunRecord.from_dict(data))
        return sorted(out, key=lambda r: r.run_id)

    def write_record(self, record: RunRecord) -> None:
        record.updated_at = _now()
        self.fs.create_dir(self.path(COMMITS), recursive=True)
        self._write_json(self.path(COMMITS, f"{record.run_id}.json"), record.to_dict())

    def read_committed(
        self, columns: Sequence[str] | None = None, model_id: str | None = None, repair: bool = False
    ) -> Iterator[pa.Table]:
        """Every committed file's table (only `columns` if given), optionally of one model. A file that is missing or
        unreadable is skipped with a warning that names it; with `repair` (a scoring run, under the lock) it also
        leaves its run's record for ``lost_files`` (an unreadable one is moved under ``_damaged/``), so the images it
        held count as unscored from then on."""
        import pyarrow.parquet as pq

        for record in self.records():
            if model_id is not None and record.model_id != model_id:
                continue
            lost = []
            for entry in record.files:
                path = self.path(entry["path"])
                try:
                    yield pq.read_table(path, filesystem=self.fs, columns=list(columns) if columns else None)
                    continue
                except (ValueError, EOFError) as e:  # pa.ArrowInvalid: cut short, not Parquet
                    problem = f"unreadable ({_first_line(e)})"
                except OSError as e:
                    problem = self._file_problem(path, e)
                lost.append((entry, problem))
            for entry, problem in lost:
                self._lost_file(record, entry, problem, repair)

    def _file_problem(self, path: str, error: OSError) -> str:
        """'missing' or 'unreadable (...)' for a committed file that failed to read; re-raises what may be the
        storage's fault rather than the file's (a network error on an object store), never a reason to forget it."""
        import pyarrow.fs as pafs

        if isinstance(error, FileNotFoundError) or self._info(path).type == pafs.FileType.NotFound:
            return "missing"
        if self.remote:
            raise error
        return f"unreadable ({_first_line(error)})"

    def _lost_file(self, record: RunRecord, entry: dict[str, Any], problem: str, repair: bool) -> None:
        loc, rows = self.location(entry["path"]), int(entry.get("rows") or 0)
        if not repair:
            console.warn(
                f"committed scores file {loc} is {problem}: its {rows:,} row(s) are left out; the next "
                "`raydefect score` run into this --out scores those images again"
            )
            return
        note = ""
        if problem != "missing":
            aside = self.path(DAMAGED, entry["path"])
            with suppress(OSError):
                self.fs.create_dir(aside.rsplit("/", 1)[0], recursive=True)
                self.fs.move(self.path(entry["path"]), aside)
                note = f"; moved to {self.location(DAMAGED, entry['path'])}"
        record.files = [f for f in record.files if f["path"] != entry["path"]]
        record.lost_files.append({**entry, "problem": problem, "found_at": _now()})
        self.write_record(record)
        console.warn(
            f"committed scores file {loc} is {problem}: removed from run {record.run_id}'s record{note}; its "
            f"{rows:,} image(s) count as unscored and are scored again"
        )

    # --- keys -----------------------------------------------------------------------------------------------
    def load_keys(self, model_id: str, key_mode: str, retry_errors: bool = False, repair: bool = False) -> KeySet:
        """Digests of every committed row of `model_id` (rows with an error left out with `retry_errors`, rows whose
        file the storage failed to read always: `RETRY_PREFIX`); `repair` as in `read_committed`."""
        import pyarrow.compute as pc

        parts = []
        columns = ["model_id", "path", "size", "mtime_ns", "sha1", "error"]
        for table in self.read_committed(columns, model_id, repair):
            error = table.column("error")
            if retry_errors:
                table = table.filter(pc.is_null(error))
            else:
                table = table.filter(pc.invert(pc.fill_null(pc.starts_with(error, RETRY_PREFIX), False)))
            parts.append(row_digests(table, key_mode))
        return KeySet.union(parts)

    # --- commit ---------------------------------------------------------------------------------------------
    def commit(self, record: RunRecord, staged: list[StagedFile], seen: KeySet) -> list[StagedFile]:
        """Move staged files into ``OUT/<model>/<run>/`` and rewrite the record. Rows whose key `seen` already holds
        (committed earlier) are dropped first -- a safety net that keeps the table free of duplicates even when
        the listing repeats a file. `seen` grows by what is committed. Each file leaves `staged` once it is moved,
        so a commit cut short by an error is not repeated for the files it moved (gone from staging: repeating it
        failed with "No such file"; a run killed before rewriting its record has them adopted by the next run's
        `recover`); one whose move was under way is recorded by the next commit. Returns the files committed."""
        import pyarrow.fs as pafs

        done = []
        data_dir = self.path(record.model_id, record.run_id)
        self.fs.create_dir(data_dir, recursive=True)
        seq = len(record.files)
        while staged:
            item = staged[0]
            keep = first_occurrence(item.digests) & ~seen.contains(item.digests)
            source = self.storage.resolve(item.location)[1]
            if not keep.any():  # every row committed before: nothing to read
                console.debug(f"dropping {item.location}: its {item.rows} row(s) are committed already")
                with suppress(FileNotFoundError):
                    self.fs.delete_file(source)
                staged.pop(0)
                continue
            if not keep.all():
                source, item = self._rewrite(item, keep)
                staged[0] = item  # the original is deleted: a repeated commit moves the rewritten file
            if item.moved_to is None:
                item.moved_to = f"{data_dir}/part-{seq:05d}-{uuid.uuid4().hex[:8]}.parquet"
                self.fs.move(source, item.moved_to)
            elif self._info(item.moved_to).type == pafs.FileType.File:  # moved by a commit cut short, not recorded
                with suppress(FileNotFoundError):  # an object store's move is a copy, then a delete
                    self.fs.delete_file(source)
            else:
                self.fs.move(source, item.moved_to)
            record.files.append(
                {
                    "path": f"{record.model_id}/{record.run_id}/{item.moved_to.rsplit('/', 1)[1]}",
                    "rows": item.rows,
                    "errors": item.errors,
                    "defects": item.defects,
                    "nodes": list(item.nodes),
                }
            )
            seen.add(item.digests)  # from here a repeated commit drops the file as committed
            staged.pop(0)
            done.append(item)
            seq += 1
        self.write_record(record)
        return done

    def _rewrite(self, item: StagedFile, keep: np.ndarray) -> tuple[str, StagedFile]:
        """A staged file minus rows at `~keep` (some kept): written beside it; the original is deleted."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, path = self.storage.resolve(item.location)
        table = pq.read_table(path, filesystem=fs)
        metadata = table.schema.metadata
        table = table.filter(pa.array(keep))
        console.debug(f"dropping {int((~keep).sum())} duplicate row(s) from {item.location}")
        new = path[: -len(STAGED_SUFFIX)] + f"-d{STAGED_SUFFIX}"
        pq.write_table(table.replace_schema_metadata(metadata), new, filesystem=fs, compression="zstd")
        fs.delete_file(path)
        errors, defects = _counts(table)
        return new, StagedFile(
            Storage.location(split_scheme(item.location)[0], new),
            table.num_rows,
            errors,
            defects,
            item.digests[keep],
            item.nodes,
        )

    # --- recovery -------------------------------------------------------------------------------------------
    def recover(self, current_run: str) -> Recovery:
        """Make the folder consistent after runs that died (see the module docstring). Call under `lock`."""
        import pyarrow.fs as pafs

        report = Recovery()
        records = {r.run_id: r for r in self.records()}
        listed = {f["path"] for r in records.values() for f in r.files}
        # one recursive listing for both steps: on GCS a one-level listing shows a folder only through a marker
        # object, and a dead run's staging folder must be found without one
        staged: dict[str, list[pafs.FileInfo]] = {}  # run id -> its staging folder's entries, for (2)
        # (1) data files no record lists: a run died between moving a file and rewriting its record
        for info in self._ls(self.root, recursive=True):
            rel = info.path[len(self.root) + 1 :]
            parts = rel.split("/")
            if len(parts) >= 2 and parts[0] == STAGING:
                staged.setdefault(parts[1], []).append(info)
                continue
            if len(parts) == 3 and not parts[0].startswith(("_", ".")) and parts[2].startswith("."):
                self.fs.delete_file(info.path)  # a temporary file of a killed recovery
                continue
            if (
                info.type != pafs.FileType.File
                or len(parts) != 3
                or parts[0].startswith(("_", "."))
                or not parts[2].endswith(".parquet")
                or parts[2].startswith(".")
                or rel in listed
            ):
                continue
            model_id, run_id, _ = parts
            counted = self._count_file(info.path)
            if counted is None:
                console.warn(f"deleting unreadable uncommitted file {self.location(rel)}")
                self.fs.delete_file(info.path)
                continue
            rows, errors, defects = counted
            rec = records.setdefault(run_id, RunRecord(run_id, model_id, "stat", state="interrupted"))
            rec.files.append({"path": rel, "rows": rows, "errors": errors, "defects": defects, "recovered": True})
            listed.add(rel)
            self.write_record(rec)
            report.adopted_files += 1
        # (2) staged files of dead runs
        for run_id, entries in sorted(staged.items()):
            if run_id != current_run:
                self._recover_staging(run_id, entries, records, report)
        for rec in records.values():
            if rec.state == "running" and rec.run_id != current_run:
                rec.state = "interrupted"
                self.write_record(rec)
                report.interrupted_runs.append(rec.run_id)
        return report

    def _count_file(self, path: str) -> tuple[int, int, int] | None:
        """(rows, errors, defects) of a complete scores file; None if damaged."""
        table = self._read_left_file(path, columns=["error", "is_defect"])
        return None if table is None else (table.num_rows, *_counts(table))

    def _read_left_file(self, path: str, columns: list[str] | None = None) -> pa.Table | None:
        """A file a dead run left, for recovery: None if its content is damaged (a partial or foreign file, safe to
        delete: its rows are recorded nowhere, so its images are scored again). A failure to *read* it (the store
        unreachable, throttled, a permission) is not damage: it stops the run with an OutputError and deletes
        nothing, and the next run recovers the file."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            with self.fs.open_input_file(path) as f:
                data = f.read()
        except OSError as e:
            raise OutputError(
                f"cannot read {self.location(path[len(self.root) + 1 :])} to recover an interrupted run: "
                f"{error_text(e)}; nothing was changed, start the run again once the storage answers"
            ) from None
        try:
            return pq.read_table(pa.BufferReader(data), columns=columns)
        except Exception:  # truncated, half-written or not Parquet at all
            return None

    def _recover_staging(
        self, run_id: str, entries: list[pafs.FileInfo], records: dict[str, RunRecord], report: Recovery
    ) -> None:
        import pyarrow as pa
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        seen_by_model: dict[tuple[str, str], KeySet] = {}
        for info in entries:
            if info.type != pafs.FileType.File:
                continue
            if not info.base_name.endswith(STAGED_SUFFIX) or info.base_name.startswith("."):
                self.fs.delete_file(info.path)  # a partial write
                report.discarded_files += 1
                continue
            table = self._read_left_file(info.path)
            if table is None:
                self.fs.delete_file(info.path)
                report.discarded_files += 1
                continue
            from raydefect.scoring.schema import read_file_metadata

            meta = read_file_metadata(table.schema.metadata)
            model_id, key_mode = meta.get("model_id", ""), meta.get("key_mode", "stat")
            if not model_id or table.num_rows == 0:
                self.fs.delete_file(info.path)
                continue
            if (model_id, key_mode) not in seen_by_model:
                seen_by_model[(model_id, key_mode)] = self.load_keys(model_id, key_mode, repair=True)
            seen = seen_by_model[(model_id, key_mode)]
            digests = row_digests(table, key_mode)
            keep = first_occurrence(digests) & ~contains(seen.array, digests)
            report.dropped_rows += int((~keep).sum())
            if keep.any():
                rec = records.setdefault(run_id, RunRecord(run_id, model_id, key_mode, state="interrupted"))
                kept = table.filter(pa.array(keep))
                data_dir = self.path(model_id, run_id)
                self.fs.create_dir(data_dir, recursive=True)
                name = f"part-r{len(rec.files):04d}-{uuid.uuid4().hex[:8]}.parquet"
                if self.remote:
                    tmp = f"{data_dir}/.{name}.tmp"  # never matches *.parquet globs
                    pq.write_table(kept, tmp, filesystem=self.fs, compression="zstd")
                    self.fs.move(tmp, f"{data_dir}/{name}")
                else:
                    write_atomic(
                        f"{data_dir}/{name}", lambda tmp, kept=kept: pq.write_table(kept, str(tmp), compression="zstd")
                    )
                rec.files.append(
                    {
                        "path": f"{model_id}/{run_id}/{name}",
                        "rows": kept.num_rows,
                        "errors": _counts(kept)[0],
                        "defects": _counts(kept)[1],
                        "recovered": True,
                    }
                )
                self.write_record(rec)
                seen.add(digests[keep])
                report.recovered_rows += int(keep.sum())
            self.fs.delete_file(info.path)
        self.remove_staging(run_id)

    def remove_staging(self, run_id: str) -> None:
        with suppress(OSError):  # already gone
            self.fs.delete_dir(self.path(STAGING, run_id))
