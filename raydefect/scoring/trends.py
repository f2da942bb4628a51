"""`raydefect scores report`: trends and drift over every run of a scores folder, in bounded memory.

The committed Parquet files are streamed batch by batch (`ScoreStore.iter_committed` with ``batch_rows``: pyarrow's
``iter_batches``, only the columns needed, never the masks). Each batch adds to small accumulators: per run (rows,
defects, errors, class mix, error kinds, fixed-bin histograms of the defect score and of the image statistics, see
`metrics.drift`) and per folder (rows, defects, errors). Memory grows with the number of runs and folders, never
with the number of rows. Rows are history: each run's own rows, so a run is a night's new images (an image scored
again with ``--rescore`` counts in each run that scored it).

Folder levels: a level k groups images by the first k folder names under the archive's root (the longest folder
prefix every scored path shares, or ``root`` when given), e.g. ``line_1`` for k=1 and ``line_1/day_03`` for k=2.

Alarms concern the newest run (the night a cron job just scored):

- drift: the PSI of its defect scores, brightness or contrast against the model's validation distribution, less
  its sampling noise (`metrics.drift.excess_psi`), reaches ``psi_alarm`` (`metrics.drift.PSI_ALARM`, 0.25;
  ``psi_warn`` 0.1 only warns). The validation distribution comes from
  the model artifact (``reference`` in model.yaml) or, where none is given, from the scores' file footers, which
  `raydefect score` fills from the artifact.
- defect rate: its rate exceeds ``max_defect_rate`` (absolute, off by default), or exceeds ``rate_factor`` times the
  pooled rate of the earlier runs (up to ``baseline_runs``) with a two-proportion z of at least ``RATE_Z`` (a jump,
  not noise).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raydefect.errors import DataError
from raydefect.metrics.drift import (
    BINS,
    IMAGE_STATS,
    PSI_ALARM,
    PSI_WARN,
    QUANTITIES,
    Reference,
    excess_psi,
    histogram,
    level,
    psi,
)
from raydefect.scoring.records import RunRecord
from raydefect.scoring.schema import read_file_metadata
from raydefect.scoring.storage import Storage
from raydefect.scoring.store import ScoreStore

REPORT_COLUMNS = ("path", "defect_score", "is_defect", "defect_class", "error", "brightness", "contrast")
BATCH_ROWS = 65_536
RATE_Z = 3.0
EXIT_ALARM = 3
TOP_ERRORS = 10


@dataclass(frozen=True)
class AlarmRules:
    psi_warn: float = PSI_WARN
    psi_alarm: float = PSI_ALARM
    max_defect_rate: float | None = None
    rate_factor: float = 2.0
    baseline_runs: int = 7


@dataclass
class RunStats:
    """What one run's rows add up to."""

    run_id: str
    state: str = ""
    rows: int = 0
    defects: int = 0
    errors: int = 0
    classes: Counter[str] = field(default_factory=Counter)
    error_kinds: Counter[str] = field(default_factory=Counter)
    hist: dict[str, np.ndarray] = field(default_factory=lambda: {q: np.zeros(BINS[q][2], np.int64) for q in BINS})

    @property
    def scored(self) -> int:
        return self.rows - self.errors

    @property
    def defect_rate(self) -> float | None:
        return self.defects / self.scored if self.scored else None

    def add(self, table: pa.Table) -> tuple[pa.Array, pa.Array]:
        """Adds a batch; returns its (defect, error) flags for the folder counts."""
        error = pc.is_valid(table.column("error"))
        defect = pc.fill_null(table.column("is_defect"), False)
        self.rows += table.num_rows
        n_err = int(pc.sum(error).as_py() or 0)
        self.errors += n_err
        self.defects += int(pc.sum(defect).as_py() or 0)
        classes = pc.value_counts(table.column("defect_class").filter(defect))
        for item in classes.to_pylist():
            self.classes[str(item["values"])] += int(item["counts"])
        if n_err:
            for e in table.column("error").filter(error).to_pylist():
                self.error_kinds[error_kind(e)] += 1
        ok = table.filter(pc.invert(error))
        for q in QUANTITIES:
            values = ok.column(q).drop_null().to_numpy(zero_copy_only=False)
            if values.size:
                self.hist[q] += histogram(values, q)
        return defect, error


def error_kind(error: str) -> str:
    """An error's kind for counting: its text up to the first colon (paths and details vary, kinds do not)."""
    return (error or "").split(":", 1)[0].strip()[:80] or "(empty)"


def _rate(defects: int, scored: int) -> float | None:
    return defects / scored if scored else None


def reference_from_footer(store: ScoreStore, records: Sequence[RunRecord], model_id: str) -> dict[str, Any]:
    """The footer metadata of the newest committed file of `model_id` ({} when there is none)."""
    import pyarrow.parquet as pq

    for record in sorted(records, key=lambda r: r.run_id, reverse=True):
        if record.model_id != model_id:
            continue
        for entry in record.files:
            try:
                with store.fs.open_input_file(store.path(entry["path"])) as f:
                    return read_file_metadata(pq.ParquetFile(f).schema_arrow.metadata)
            except (OSError, ValueError):
                continue
    return {}


def common_root(folders: Sequence[str]) -> str:
    """The longest folder prefix (whole names) that every folder shares."""
    if not folders:
        return ""
    split = [f.rstrip("/").split("/") for f in folders]
    first = split[0]
    n = len(first)
    for parts in split[1:]:
        n = min(n, len(parts))
        for i in range(n):
            if parts[i] != first[i]:
                n = i
                break
    return "/".join(first[:n])


def level_key(folder: str, root: str, depth: int) -> str:
    """The first `depth` folder names of `folder` under `root` ('.' for the root itself)."""
    rel = folder[len(root) :].strip("/") if folder.startswith(root) else folder
    parts = [p for p in rel.split("/") if p]
    return "/".join(parts[:depth]) or "."


def _z_jump(defects: int, scored: int, base_defects: int, base_scored: int) -> float:
    """Two-proportion z of the night's rate against the baseline's."""
    pooled = (defects + base_defects) / (scored + base_scored)
    se = math.sqrt(pooled * (1 - pooled) * (1 / scored + 1 / base_scored)) if 0 < pooled < 1 else 0.0
    return (defects / scored - base_defects / base_scored) / se if se else 0.0


def drift_of(run: RunStats, reference: Reference | None, rules: AlarmRules) -> dict[str, dict[str, Any]]:
    """Per quantity: the PSI against the reference and its level, or why there is none."""
    out = {}
    for q in QUANTITIES:
        counts = run.hist[q]
        if counts.sum() == 0:
            why = "not recorded (scored before image statistics existed)" if q in IMAGE_STATS else "no scored rows"
            out[q] = {"psi": None, "level": "n/a", "note": why}
        elif reference is None or q not in reference.counts:
            out[q] = {"psi": None, "level": "n/a", "note": "no validation reference in the model"}
        else:
            value, noise = excess_psi(reference.counts[q], counts)
            n_ref, n_night = sum(reference.counts[q]), int(counts.sum())
            note = "" if value is not None else f"too few images for a drift figure ({n_ref} reference, {n_night} here)"
            out[q] = {"psi": value, "raw_psi": psi(reference.counts[q], counts), "noise": noise,
                      "level": level(value, rules.psi_warn, rules.psi_alarm), "note": note}  # fmt: skip
    return out


def rate_alarm(runs: Sequence[RunStats], rules: AlarmRules) -> dict[str, Any]:
    """The defect-rate check of the newest run against the absolute limit and the earlier runs."""
    night = runs[-1]
    base = [r for r in runs[:-1] if r.scored][-rules.baseline_runs :] if rules.baseline_runs else []
    base_def, base_n = sum(r.defects for r in base), sum(r.scored for r in base)
    out: dict[str, Any] = {"rate": night.defect_rate, "baseline": _rate(base_def, base_n), "baseline_runs": len(base)}
    reasons = []
    if night.scored and rules.max_defect_rate is not None and night.defects / night.scored > rules.max_defect_rate:
        reasons.append(
            f"defect rate {night.defects / night.scored:.1%} above --max-defect-rate {rules.max_defect_rate:.1%}"
        )
    if night.scored and base_n:
        z = _z_jump(night.defects, night.scored, base_def, base_n)
        out["z"] = z
        rate, baseline = night.defects / night.scored, base_def / base_n
        if rate > rules.rate_factor * baseline and z >= RATE_Z:
            reasons.append(
                f"defect rate {rate:.1%} is over {rules.rate_factor:g}x the {baseline:.1%} of the {len(base)} "
                f"earlier run(s) (z={z:.1f})"
            )
    out["alarm"] = bool(reasons)
    out["reasons"] = reasons
    return out


def _folder_table(groups: dict[str, list[int]]) -> list[dict[str, Any]]:
    rows = []
    for key in sorted(groups):
        images, defects, errors = groups[key]
        rate = _rate(defects, images - errors)
        rows.append({"folder": key, "images": images, "defects": defects, "errors": errors, "defect_rate": rate})
    return rows


def _accumulate(
    store: ScoreStore, records: Sequence[RunRecord], model_id: str, batch_rows: int
) -> tuple[list[RunStats], dict[str, list[int]]]:
    runs: list[RunStats] = []
    folders: dict[str, list[int]] = {}
    for record in sorted(records, key=lambda r: r.run_id):
        if record.model_id != model_id:
            continue
        run = RunStats(record.run_id, record.state)
        for table in store.iter_committed(REPORT_COLUMNS, model_id, batch_rows=batch_rows, records=[record]):
            if not table.num_rows:
                continue
            defect, error = run.add(table)
            parent = pc.replace_substring_regex(table.column("path"), r"/[^/]*$", "")
            t = pa.table({"folder": parent, "defect": pc.cast(defect, pa.int64()), "error": pc.cast(error, pa.int64())})
            g = t.group_by("folder").aggregate([("folder", "count"), ("defect", "sum"), ("error", "sum")])
            for folder, n, d, e in zip(
                *(g.column(c).to_pylist() for c in ("folder", "folder_count", "defect_sum", "error_sum")), strict=True
            ):
                acc = folders.setdefault(folder, [0, 0, 0])
                acc[0] += n
                acc[1] += d
                acc[2] += e
        runs.append(run)
    return runs, folders


@dataclass
class _Streamed:
    """What one pass over a scores folder gives the report: the model chosen, the footers' reference, the sums."""

    out: str
    model_id: str
    models: list[str]
    footer: dict[str, Any]
    runs: list[RunStats]
    folders: dict[str, list[int]]


def _stream_scores(out: str, storage: Storage | None, model: str | None, batch_rows: int) -> _Streamed:
    from raydefect.scoring.results import choose_model, open_scores, reading

    with reading(out):
        store = open_scores(out, storage)
        records = store.records()
        model_id, models = choose_model(records, model, store.out)
        if model_id is None or not any(r.files for r in records if r.model_id == model_id):
            raise DataError(
                f"{out}: the scores folder holds no committed rows yet; run `raydefect score` into it first"
            )
        footer = reference_from_footer(store, records, model_id)
        runs, folders = _accumulate(store, records, model_id, batch_rows)
    return _Streamed(store.out, model_id, models, footer, runs, folders)


def _folders_by_level(folders: dict[str, list[int]], base: str, levels: Sequence[int]) -> dict[str, Any]:
    by_level = {}
    for depth in levels:
        groups: dict[str, list[int]] = {}
        for folder, counts in folders.items():
            acc = groups.setdefault(level_key(folder, base, depth), [0, 0, 0])
            for i in range(3):
                acc[i] += counts[i]
        by_level[str(depth)] = _folder_table(groups)
    return by_level


def _run_row(r: RunStats, ref: Reference | None, rules: AlarmRules) -> dict[str, Any]:
    return {
        "run": r.run_id,
        "state": r.state,
        "images": r.rows,
        "scored": r.scored,
        "defects": r.defects,
        "errors": r.errors,
        "defect_rate": r.defect_rate,
        "classes": dict(r.classes.most_common()),
        "error_kinds": dict(r.error_kinds.most_common(TOP_ERRORS)),
        "histograms": {q: r.hist[q].tolist() for q in QUANTITIES},
        "drift": drift_of(r, ref, rules),
    }


def _night(run_rows: list[dict[str, Any]], runs: Sequence[RunStats], rules: AlarmRules) -> dict[str, Any]:
    """The newest run's alarms: drift against the reference and a jump of the defect rate."""
    night = run_rows[-1]
    rate = rate_alarm(runs, rules)
    drift_alarms = [
        f"{q} PSI {d['psi']:.3f} >= {rules.psi_alarm}" for q, d in night["drift"].items() if d["level"] == "alarm"
    ]
    warnings = [
        f"{q} PSI {d['psi']:.3f} >= {rules.psi_warn}" for q, d in night["drift"].items() if d["level"] == "warn"
    ]
    return {
        "run": night["run"],
        "drift_alarms": drift_alarms,
        "rate": rate,
        "warnings": warnings,
        "alarm": bool(drift_alarms) or rate["alarm"],
    }


def _rules_dict(rules: AlarmRules) -> dict[str, Any]:
    return {
        "psi_warn": rules.psi_warn,
        "psi_alarm": rules.psi_alarm,
        "max_defect_rate": rules.max_defect_rate,
        "rate_factor": rules.rate_factor,
        "baseline_runs": rules.baseline_runs,
        "rate_z": RATE_Z,
    }


def build_report(
    out: str,
    *,
    levels: Sequence[int] = (1, 2),
    root: str | None = None,
    reference: dict[str, Any] | None = None,
    rules: AlarmRules | None = None,
    model: str | None = None,
    storage: Storage | None = None,
    batch_rows: int = BATCH_ROWS,
) -> dict[str, Any]:
    """The report's content (what report.json holds). `reference`: a model artifact's ``reference`` (default: the
    one the scores' footers carry)."""
    rules = rules or AlarmRules()
    streamed = _stream_scores(out, storage, model, batch_rows)
    footer, folders = streamed.footer, streamed.folders
    source = "model artifact" if reference else "scores footer" if footer.get("reference") else "none"
    ref = Reference.from_dict(reference if reference else footer.get("reference"))
    runs = [r for r in streamed.runs if r.rows] or streamed.runs
    base = root.rstrip("/") if root else common_root(list(folders))
    by_level = _folders_by_level(folders, base, levels)
    run_rows = [_run_row(r, ref, rules) for r in runs]
    night = _night(run_rows, runs, rules)
    total = [sum(r[k] for r in run_rows) for k in ("images", "defects", "errors")]
    return {
        "out": streamed.out,
        "model": streamed.model_id,
        "models": streamed.models,
        "root": base,
        "levels": [int(x) for x in levels],
        "images": total[0],
        "defects": total[1],
        "errors": total[2],
        "defect_rate": _rate(total[1], total[0] - total[2]),
        "reference": {
            "source": source,
            "images": ref.images if ref else 0,
            "defect_rate": ref.defect_rate if ref else None,
            "histograms": {q: list(v) for q, v in ref.counts.items()} if ref else {},
        },
        "bins": {q: list(BINS[q]) for q in QUANTITIES},
        "rules": _rules_dict(rules),
        "runs": run_rows,
        "folders": by_level,
        "night": night,
    }


def write_report(report: dict[str, Any], dest: str) -> dict[str, str]:
    """report.json and report.html into the local folder `dest`."""
    import json
    from pathlib import Path

    from raydefect.errors import OutputError
    from raydefect.paths import write_text_atomic
    from raydefect.viz.trends import render_trends

    folder = Path(dest).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create --out {folder}: {e.strerror}; choose a writable folder") from None
    json_path = write_text_atomic(folder / "report.json", json.dumps(report, indent=1, default=str))
    html_path = write_text_atomic(folder / "report.html", render_trends(report))
    return {"json": str(json_path), "html": str(html_path)}
