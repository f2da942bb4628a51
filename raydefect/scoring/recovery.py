"""Recovery at the start of every run, under the lock (`StoreRecovery`, part of `ScoreStore`): files a dead run
moved but never recorded are adopted, its complete staged files are recovered by key and partial ones deleted (see
`raydefect.scoring.store` for the whole protocol)."""

from __future__ import annotations

import uuid
from contextlib import suppress
from typing import TYPE_CHECKING

from raydefect import console
from raydefect.errors import OutputError, error_text
from raydefect.paths import write_atomic
from raydefect.scoring.keys import (
    KeySet,
    contains,
    first_occurrence,
)
from raydefect.scoring.records import STAGED_SUFFIX, STAGING, Recovery, RunRecord, row_counts, row_digests

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs


class StoreRecovery:
    """The recovery half of `ScoreStore` (a mixin: it uses the store's ``fs``, paths, records and key sets)."""

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
        return None if table is None else (table.num_rows, *row_counts(table))

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
                        "errors": row_counts(kept)[0],
                        "defects": row_counts(kept)[1],
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
