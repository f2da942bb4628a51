"""The scores table (contract 3 of docs/architecture.md), as one pyarrow schema that every writer uses.

One row per input image per run. Contract columns first, then the incremental key (``size``, ``mtime_ns``,
``sha1``) and ``node_id`` (the Ray node whose model actor scored the row: shows how work spread over a cluster),
then the image statistics ``brightness`` and ``contrast`` (`imaging.image_stats` of the image as the model saw it;
``scores report`` compares them with the model's validation images), then ``class_area_px``. Schema 1 files lack
``brightness`` and ``contrast``, schema 1 and 2 files ``class_area_px``: `conform` gives them null columns, so
folders written before them read as before.

Per-pixel classes (a ``model.mask_classes`` model): ``mask_png`` is then an indexed (palette) PNG whose pixel value
is the class id (0 background, ``i`` = ``class_names[i]``), its palette the overlays' class colours and its
``raydefect:classes`` text chunk the class names (`imaging.encode_class_png`); ``class_area_px`` holds the pixels
per class (``map<string, int64>``, classes without pixels left out). A binary model's ``mask_png`` is a 1-bit PNG
(0 normal, 1 defect) and its ``class_area_px`` is null.

Types are chosen so pandas, pyarrow, DuckDB and Spark read the files without raydefect: ``mask_png`` is
``large_binary`` (64-bit offsets: a file of big masks can never hit Arrow's 2 GiB limit of ``binary``),
``class_scores`` a ``map<string, float>`` (the same type whatever the model's classes, so runs of different
models share one schema), ``bbox`` a ``list<int32>`` ``[x0, y0, x1, y1]`` with x1/y1 exclusive, ``scored_at`` a UTC
timestamp in microseconds and ``mtime_ns`` a plain int64 (Spark cannot read nanosecond timestamps). Rows whose
``error`` is set have nulls in every score column. The file metadata carries the model id, thresholds, class
names, run id and the raydefect and schema versions under ``raydefect.*`` keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from raydefect import __version__

if TYPE_CHECKING:
    from raydefect.models.artifact import ArtifactMeta

SCHEMA_VERSION = 3

SCORE_FIELDS = (
    pa.field("path", pa.string(), nullable=False),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("defect_score", pa.float32()),
    pa.field("is_defect", pa.bool_()),
    pa.field("defect_class", pa.string()),
    pa.field("class_scores", pa.map_(pa.string(), pa.float32())),
    pa.field("mask_png", pa.large_binary()),
    pa.field("mask_area_px", pa.int64()),
    pa.field("mask_fraction", pa.float32()),
    pa.field("bbox", pa.list_(pa.int32())),
    pa.field("error", pa.string()),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("size", pa.int64()),
    pa.field("mtime_ns", pa.int64()),
    pa.field("sha1", pa.string()),
    pa.field("node_id", pa.string()),
    pa.field("brightness", pa.float32()),
    pa.field("contrast", pa.float32()),
    pa.field("class_area_px", pa.map_(pa.string(), pa.int64())),
)
SCORE_SCHEMA = pa.schema(list(SCORE_FIELDS))
COLUMNS = tuple(f.name for f in SCORE_FIELDS)
META_PREFIX = "raydefect."
#: columns added after schema 1 (brightness, contrast: schema 2; class_area_px: schema 3): null in older files
ADDED_COLUMNS = ("brightness", "contrast", "class_area_px")


def conform(table: pa.Table, columns: Sequence[str] | None = None) -> pa.Table:
    """`table` with `columns` (default: every scores column) in that order; a column an older file lacks (one of
    `ADDED_COLUMNS`) is added as nulls of its type."""
    names = list(columns) if columns else list(SCORE_SCHEMA.names)
    if table.column_names == names:
        return table
    arrays = [
        table.column(n) if n in table.column_names else pa.nulls(table.num_rows, SCORE_SCHEMA.field(n).type)
        for n in names
    ]
    fields = [table.schema.field(n) if n in table.column_names else SCORE_SCHEMA.field(n) for n in names]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=table.schema.metadata))


def file_metadata(
    meta: ArtifactMeta, run_id: str, key_mode: str, threshold_override: float | None = None
) -> dict[str, str]:
    """Key-value metadata stored in every Parquet footer (readable with ``pq.read_metadata(f).metadata``).
    ``threshold_override``: the image threshold of `score --threshold`, in place of the model's for this run
    (``thresholds`` then holds it too)."""
    override = {} if threshold_override is None else {"image": float(threshold_override)}
    return {
        f"{META_PREFIX}threshold_override": json.dumps(override),
        f"{META_PREFIX}schema_version": str(SCHEMA_VERSION),
        f"{META_PREFIX}version": __version__,
        f"{META_PREFIX}model_id": meta.model_id,
        f"{META_PREFIX}thresholds": json.dumps(dict(meta.thresholds), sort_keys=True),
        f"{META_PREFIX}class_names": json.dumps(list(meta.class_names)),
        f"{META_PREFIX}backbone": meta.backbone,
        f"{META_PREFIX}image_size": str(meta.image_size),
        f"{META_PREFIX}run_id": run_id,
        f"{META_PREFIX}key_mode": key_mode,
        # the validation distribution (`metrics.drift.Reference`), so `scores report` needs no model folder
        **({f"{META_PREFIX}reference": json.dumps(dict(meta.reference))} if meta.reference else {}),
    }


def schema_with_metadata(metadata: Mapping[str, str]) -> pa.Schema:
    return SCORE_SCHEMA.with_metadata({k.encode(): v.encode() for k, v in metadata.items()})


def read_file_metadata(raw: Mapping[bytes, bytes] | None) -> dict[str, Any]:
    """``raydefect.*`` footer metadata -> plain dict (JSON values decoded)."""
    out: dict[str, Any] = {}
    for k, v in (raw or {}).items():
        key = k.decode()
        if not key.startswith(META_PREFIX):
            continue
        value: Any = v.decode()
        if key.endswith(("thresholds", "class_names", "reference", "threshold_override")):
            value = json.loads(value)
        out[key[len(META_PREFIX) :]] = value
    return out
