"""Synthetic scores folders, written straight with pyarrow (no model, no Ray): for the report's memory benchmark
and tests. The folder follows the store's layout and commit records exactly, so every reader treats it as a real
one. Rows: ``line_<k>/day_<dd>/img_<i>.png`` under `root`, defect scores from a beta distribution, brightness and
contrast from normal distributions that a night can shift."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from raydefect.imaging import encode_png
from raydefect.scoring.records import COMMITS, MARKER, STORE_FORMAT, RunRecord, json_bytes, row_counts
from raydefect.scoring.schema import META_PREFIX, SCHEMA_VERSION, SCORE_SCHEMA

CLASSES = ("normal", "scratch", "spot")


@dataclass(frozen=True)
class Night:
    """One run to write: `rows` images, defect scores ~ Beta(a, b), brightness ~ N(brightness, 0.04), contrast ~
    N(contrast, 0.02); ``stats=False`` writes null statistics (a folder scored before they existed)."""

    run_id: str
    rows: int
    score_a: float = 0.5
    score_b: float = 4.0
    brightness: float = 0.45
    contrast: float = 0.12
    stats: bool = True
    seed: int = 0


def footer(model_id: str, threshold: float, reference: Mapping[str, Any] | None, run_id: str) -> dict[bytes, bytes]:
    meta = {
        "schema_version": str(SCHEMA_VERSION),
        "model_id": model_id,
        "thresholds": json.dumps({"image": threshold, "pixel": 0.5}),
        "class_names": json.dumps(list(CLASSES)),
        "run_id": run_id,
        "key_mode": "stat",
        **({"reference": json.dumps(dict(reference))} if reference else {}),
    }
    return {f"{META_PREFIX}{k}".encode(): v.encode() for k, v in meta.items()}


def night_table(night: Night, root: str, model_id: str, threshold: float, start: int = 0) -> pa.Table:
    """`night.rows` score rows (row i of the folder is image ``start + i``)."""
    rng = np.random.default_rng([night.seed, start])
    n = night.rows
    idx = np.arange(start, start + n)
    paths = [f"{root}/line_{i % 3}/day_{(i // 3) % 7:02d}/img_{i:09d}.png" for i in idx.tolist()]
    score = rng.beta(night.score_a, night.score_b, n).astype(np.float32)
    defect = score >= threshold
    error = np.zeros(n, bool)
    error[rng.random(n) < 0.001] = True
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:6] = 255
    png = encode_png(mask)
    area = np.where(defect, 12, 0)
    disagree = rng.random(n) < 0.03  # a few images where the heads disagree: an empty mask or a normal with one
    area[disagree] = np.where(defect[disagree], 0, 12)
    ok = ~error
    cols: dict[str, Any] = {
        "path": paths,
        "width": np.where(ok, 8, 0).astype(np.int32),
        "height": np.where(ok, 8, 0).astype(np.int32),
        "defect_score": pa.array(score, mask=error),
        "is_defect": pa.array(defect, mask=error),
        "defect_class": pa.array(np.where(defect, np.where(idx % 2 == 0, "scratch", "spot"), "normal"), mask=error),
        "class_scores": pa.nulls(n, SCORE_SCHEMA.field("class_scores").type),
        "mask_png": pa.array([png if a else None for a in area.tolist()], pa.large_binary()),
        "mask_area_px": pa.array(area.astype(np.int64), mask=error),
        "mask_fraction": pa.array((area / 64).astype(np.float32), mask=error),
        "bbox": pa.nulls(n, SCORE_SCHEMA.field("bbox").type),
        "error": pa.array(np.where(error, "cannot decode: truncated", ""), mask=ok),
        "model_id": [model_id] * n,
        "run_id": [night.run_id] * n,
        "scored_at": pa.array(
            [dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)] * n, SCORE_SCHEMA.field("scored_at").type
        ),
        "size": np.full(n, 1000, np.int64),
        "mtime_ns": idx.astype(np.int64),
        "sha1": pa.nulls(n, pa.string()),
        "node_id": pa.nulls(n, pa.string()),
        "class_area_px": pa.nulls(n, SCORE_SCHEMA.field("class_area_px").type),
    }
    for name, mean, sd in (("brightness", night.brightness, 0.04), ("contrast", night.contrast, 0.02)):
        values = np.clip(rng.normal(mean, sd, n), 0, 1).astype(np.float32)
        cols[name] = pa.array(values, mask=error | (not night.stats))
    arrays = [
        pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], pa.Array) else cols[f.name] for f in SCORE_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=SCORE_SCHEMA)


def write_scores_folder(
    out: str,
    nights: list[Night],
    *,
    root: str = "/archive",
    model_id: str = "synthetic0000000",
    threshold: float = 0.5,
    reference: Mapping[str, Any] | None = None,
    rows_per_file: int = 1_000_000,
) -> str:
    """Write a local scores folder holding `nights`, one commit record each; returns `out`."""
    import os

    import pyarrow.parquet as pq

    os.makedirs(os.path.join(out, COMMITS), exist_ok=True)
    with open(os.path.join(out, MARKER), "wb") as f:
        f.write(json_bytes({"format": STORE_FORMAT, "created_at": "2026-01-01T00:00:00+00:00", "tool": "raydefect"}))
    start = 0
    for night in nights:
        record = RunRecord(night.run_id, model_id, "stat", input=root, state="finished")
        folder = os.path.join(out, model_id, night.run_id)
        os.makedirs(folder, exist_ok=True)
        for k, first in enumerate(range(0, night.rows, rows_per_file)):
            part = Night(**{**night.__dict__, "rows": min(rows_per_file, night.rows - first)})
            table = night_table(part, root, model_id, threshold, start + first)
            table = table.replace_schema_metadata(footer(model_id, threshold, reference, night.run_id))
            rel = f"{model_id}/{night.run_id}/part-{k:05d}.parquet"
            pq.write_table(table, os.path.join(out, rel), compression="zstd")
            errors, defects = row_counts(table)
            record.files.append({"path": rel, "rows": table.num_rows, "errors": errors, "defects": defects})
        start += night.rows
        with open(os.path.join(out, COMMITS, f"{night.run_id}.json"), "wb") as f:
            f.write(json_bytes(record.to_dict()))
    return out
