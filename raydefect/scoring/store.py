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

import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import numpy as np

from raydefect import console
from raydefect.errors import OutputError, error_text
from raydefect.paths import is_remote, split_scheme, write_bytes_atomic
from raydefect.scoring.keys import (
    RETRY_PREFIX,
    KeySet,
    first_occurrence,
)
from raydefect.scoring.lock import ConditionalObjects, StoreLock
from raydefect.scoring.records import (
    COMMITS,
    DAMAGED,
    MARKER,
    STAGED_SUFFIX,
    STAGING,
    STORE_FORMAT,
    RunRecord,
    StagedFile,
    json_bytes,
    json_or_none,
    read_error_gist,
    row_counts,
    row_digests,
    utc_now,
)
from raydefect.scoring.recovery import StoreRecovery
from raydefect.scoring.schema import conform
from raydefect.scoring.storage import Storage, absolute, sees_folders

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs


class ScoreStore(StoreLock, StoreRecovery):
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
                self._write_json(
                    self.path(MARKER), {"format": STORE_FORMAT, "created_at": utc_now(), "tool": "raydefect"}
                )
            if not self.remote and not os.access(self.root, os.W_OK):
                raise OutputError(f"--out {self.out} is not writable; fix its permissions or choose another folder")
        except OSError as e:
            raise OutputError(
                f"cannot write to --out {self.out}: {error_text(e)}; check the path and permissions"
            ) from None

    def _write_json(self, path: str, data: dict[str, Any]) -> None:
        payload = json_bytes(data)
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
                return json_or_none(f.read())
        except FileNotFoundError:
            return None
        except OSError as e:
            if "not found" in str(e).lower() or "does not exist" in str(e).lower():
                return None
            raise

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
        record.updated_at = utc_now()
        self.fs.create_dir(self.path(COMMITS), recursive=True)
        self._write_json(self.path(COMMITS, f"{record.run_id}.json"), record.to_dict())

    def read_committed(
        self, columns: Sequence[str] | None = None, model_id: str | None = None, repair: bool = False
    ) -> Iterator[pa.Table]:
        """Every committed file's table (only `columns` if given), optionally of one model. A file that is missing or
        unreadable is skipped with a warning that names it; with `repair` (a scoring run, under the lock) it also
        leaves its run's record for ``lost_files`` (an unreadable one is moved under ``_damaged/``), so the images it
        held count as unscored from then on."""
        yield from self.iter_committed(columns, model_id, repair)

    def iter_committed(
        self,
        columns: Sequence[str] | None = None,
        model_id: str | None = None,
        repair: bool = False,
        batch_rows: int | None = None,
        records: Sequence[RunRecord] | None = None,
    ) -> Iterator[pa.Table]:
        """`read_committed`, streamed: with `batch_rows`, each file in tables of at most that many rows (bounded
        memory over any number of rows). Columns a file of an older schema lacks come back as nulls
        (`schema.conform`). `records`: these runs' files only (default: every run's)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        wanted = list(columns) if columns else None
        for record in self.records() if records is None else records:
            if model_id is not None and record.model_id != model_id:
                continue
            lost = []
            for entry in record.files:
                path = self.path(entry["path"])
                try:
                    with self.fs.open_input_file(path) as f:
                        pf = pq.ParquetFile(f)
                        have = set(pf.schema_arrow.names)
                        present = [c for c in wanted if c in have] if wanted else None
                        if batch_rows is None:
                            parts = [pf.read(columns=present)]
                        else:
                            parts = (pa.Table.from_batches([b]) for b in pf.iter_batches(batch_rows, columns=present))
                        for part in parts:
                            yield conform(part, wanted)
                    continue
                except (ValueError, EOFError) as e:  # pa.ArrowInvalid: cut short, not Parquet
                    problem = f"unreadable ({read_error_gist(e)})"
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
        return f"unreadable ({read_error_gist(error)})"

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
        record.lost_files.append({**entry, "problem": problem, "found_at": utc_now()})
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
        errors, defects = row_counts(table)
        return new, StagedFile(
            Storage.location(split_scheme(item.location)[0], new),
            table.num_rows,
            errors,
            defects,
            item.digests[keep],
            item.nodes,
        )
