"""Reading a scores folder back: the committed rows, a summary, and masks/overlays written out for people.

Rows are history: a run adds one row per image it scored, so an image that changed (or was re-scored with
``--rescore``) has one row per version. `read_scores` gives the current view -- the newest row per
(model_id, path) -- and always drops duplicate keys, the last safety net of the commit protocol. Only files that a
commit record lists are read (`ScoreStore.read_committed`; one found missing or unreadable is skipped with a
warning). Without raydefect, the same current view in DuckDB::

    SELECT * FROM read_parquet('OUT/*/*/*.parquet')
    QUALIFY row_number() OVER (PARTITION BY model_id, path ORDER BY scored_at DESC) = 1
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raydefect.errors import DataError, ImageError, OutputError, first_line
from raydefect.imaging import decode_class_png, decode_image, encode_png
from raydefect.inference.postprocess import format_bbox
from raydefect.paths import is_uri
from raydefect.scoring.records import RunRecord
from raydefect.scoring.schema import SCORE_SCHEMA
from raydefect.scoring.storage import Storage
from raydefect.scoring.store import ScoreStore
from raydefect.viz.overlay import class_colour, render_overlay, save_png

SUMMARY_COLUMNS = ("path", "defect_score", "is_defect", "defect_class", "mask_fraction", "error", "model_id",
                   "run_id", "scored_at", "size", "mtime_ns", "sha1")  # fmt: skip
#: columns `parse_where` filters on: every scalar column of the scores
NON_SCALAR = ("mask_png", "class_scores", "bbox", "class_area_px")
WHERE_COLUMNS = tuple(n for n in SCORE_SCHEMA.names if n not in NON_SCALAR)
_WHERE = re.compile(r"^\s*([A-Za-z_]\w*)\s*(>=|<=|!=|==|=|>|<)\s*(.+?)\s*$")


@contextmanager
def reading(out: str) -> Iterator[None]:
    """An object store that cannot be reached or refuses access: one line naming the folder, not a traceback."""
    try:
        yield
    except OSError as e:
        raise DataError(
            f"cannot read the scores at {out}: {first_line(e)}; check the address, the endpoint (AWS_ENDPOINT_URL "
            "for an S3-compatible store) and the credentials"
        ) from None


def open_scores(out: str, storage: Storage | None = None) -> ScoreStore:
    """The scores folder `out` (a `ScoreStore`); a folder without raydefect scores is a one-line `DataError`."""
    store = ScoreStore(out, storage)
    if not store.exists():
        raise DataError(
            f"{out}: no raydefect scores here (no _raydefect_scores.json); pass the --out of `raydefect score`"
        )
    return store


def committed_table(
    out: str, columns: Sequence[str] | None = None, model_id: str | None = None, storage: Storage | None = None
) -> pa.Table:
    """Every committed row (history, not de-duplicated), only `columns` if given."""
    parts = list(open_scores(out, storage).read_committed(columns, model_id))
    if not parts:
        schema = SCORE_SCHEMA if not columns else pa.schema([SCORE_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(parts)


def _newest(table: pa.Table, keys: Sequence[str]) -> pa.Table:
    """One row per `keys`: the newest by scored_at (then run_id)."""
    if table.num_rows == 0:
        return table
    idx = pa.array(np.arange(table.num_rows))
    t = table.select([*keys, "scored_at", "run_id"]).append_column("__i", idx)
    t = t.sort_by([*((k, "ascending") for k in keys), ("scored_at", "ascending"), ("run_id", "ascending")])
    last = t.group_by(list(keys), use_threads=False).aggregate([("__i", "last")])
    return table.take(pa.array(np.sort(last.column("__i_last").to_numpy())))


def read_scores(
    out: str,
    *,
    model_id: str | None = None,
    latest: bool = True,
    columns: Sequence[str] | None = None,
    storage: Storage | None = None,
) -> pa.Table:
    """Committed scores: one row per (model_id, path) with `latest`, else one per (model_id, path, key)."""
    wanted = list(columns) if columns else list(SCORE_SCHEMA.names)
    need = list(dict.fromkeys([*wanted, "model_id", "path", "size", "mtime_ns", "sha1", "scored_at", "run_id"]))
    table = committed_table(out, need, model_id, storage)
    table = _newest(table, ["model_id", "path", "size", "mtime_ns", "sha1"])  # duplicate keys: never expected
    if latest:
        table = _newest(table, ["model_id", "path"])
    return table.select(wanted)


def choose_model(records: Sequence[RunRecord], model: str | None, out: str) -> tuple[str | None, list[str]]:
    """(the model to read, every model in the folder `out`, newest first), from its run `records`. A folder scored by
    several models (a new model scores everything again) would otherwise count each image once per model; by
    default the model of the newest run is read. `model`: a model id, or a unique prefix of one."""
    newest: dict[str, str] = {}
    for r in records:
        newest[r.model_id] = max(newest.get(r.model_id, ""), r.run_id)
    models = sorted(newest, key=lambda m: newest[m], reverse=True)
    if model is None:
        return (models[0] if models else None), models
    matches = [m for m in models if m == model] or [m for m in models if m.startswith(model)]
    if len(matches) != 1:
        found = "several match" if matches else "no such model here"
        raise DataError(
            f"--model {model}: {found}; the models in {out} are {', '.join(models) or '(none)'} (newest first)"
        )
    return matches[0], models


def _rate(defects: int, images: int) -> float:
    return defects / images if images else 0.0


def summarize(
    out: str, top: int = 10, folders: int = 20, storage: Storage | None = None, model: str | None = None
) -> dict[str, Any]:
    """Counts, defect rate per run and per folder, and the top-scoring images (current view) of one model
    (`choose_model`: by default the newest run's); the runs table lists every run."""
    with reading(out):
        store = open_scores(out, storage)
        records = store.records()
        model_id, models = choose_model(records, model, store.out)
        current = read_scores(out, columns=SUMMARY_COLUMNS, storage=storage, model_id=model_id)
    ok = pc.is_null(current.column("error"))
    defect = pc.fill_null(current.column("is_defect"), False)
    n, n_def, n_err = current.num_rows, int(pc.sum(defect).as_py() or 0), int(pc.sum(pc.invert(ok)).as_py() or 0)
    runs = []
    for r in records:
        rows = sum(int(f["rows"]) for f in r.files)
        defects = sum(int(f.get("defects") or 0) for f in r.files)
        errors = sum(int(f.get("errors") or 0) for f in r.files)
        runs.append(
            {
                "run": r.run_id,
                "model": r.model_id,
                "state": r.state,
                "scored": rows,
                "defects": defects,
                "errors": errors,
                "defect %": round(100 * _rate(defects, rows - errors), 1),
                "skipped": r.stats.get("skipped", ""),
            }
        )
    folder_rows: list[dict[str, Any]] = []
    if n:
        parent = pc.replace_substring_regex(current.column("path"), r"/[^/]*$", "")
        t = pa.table({"folder": parent, "defect": defect, "error": pc.invert(ok)})
        g = t.group_by("folder").aggregate([("defect", "sum"), ("error", "sum"), ("folder", "count")])
        for row in sorted(g.to_pylist(), key=lambda r: r["folder"]):
            images = int(row["folder_count"])
            errs = int(row["error_sum"])
            folder_rows.append(
                {
                    "folder": row["folder"],
                    "images": images,
                    "defects": int(row["defect_sum"]),
                    "errors": errs,
                    "defect %": round(100 * _rate(int(row["defect_sum"]), images - errs), 1),
                }
            )
    scored = current.filter(ok)
    order = pc.sort_indices(scored.column("defect_score"), sort_keys=[("x", "descending")]) if scored.num_rows else []
    best = scored.take(order[:top]) if scored.num_rows else scored
    top_rows = [
        {
            "defect_score": r["defect_score"],
            "class": r["defect_class"],
            "mask %": round(100.0 * (r["mask_fraction"] or 0.0), 2),
            "path": r["path"],
        }
        for r in best.select(["defect_score", "defect_class", "mask_fraction", "path"]).to_pylist()
    ]
    return {
        "out": store.out,
        "images": n,
        "defects": n_def,
        "errors": n_err,
        "defect_rate": _rate(n_def, n - n_err),
        "model": model_id,
        "models": models,
        "history_rows": sum(r["scored"] for r in runs),
        "runs": runs,
        "folders": folder_rows[:folders] if folders else folder_rows,
        "folders_total": len(folder_rows),
        "top": top_rows,
    }


# --- selecting and extracting -----------------------------------------------------------------------------------


def parse_where(expr: str) -> pc.Expression:
    """``column OP value`` (OP one of = == != > >= < <=) -> a pyarrow filter; values are numbers, true/false or text."""
    m = _WHERE.match(expr)
    if not m:
        raise DataError(f"--where {expr!r}: expected COLUMN OP VALUE, e.g. 'defect_score>=0.9' or 'defect_class=crack'")
    col, op, raw = m.groups()
    if col not in SCORE_SCHEMA.names or col in NON_SCALAR:
        raise DataError(
            f"--where {expr!r}: unknown or non-scalar column {col!r}; use one of {', '.join(WHERE_COLUMNS)}"
        )
    raw = raw.strip("'\"")
    typ = SCORE_SCHEMA.field(col).type
    value: Any = raw
    try:
        if pa.types.is_boolean(typ):
            if raw.lower() not in ("true", "false"):
                raise ValueError(raw)
            value = raw.lower() == "true"
        elif pa.types.is_integer(typ):
            value = int(raw)
        elif pa.types.is_floating(typ):
            value = float(raw)
    except ValueError:
        raise DataError(f"--where {expr!r}: {raw!r} is not a valid value for {col} ({typ})") from None
    field = pc.field(col)
    ops = {"=": field == value, "==": field == value, "!=": field != value, ">": field > value, ">=": field >= value,
           "<": field < value, "<=": field <= value}  # fmt: skip
    return ops[op]


def select_rows(
    out: str,
    top: int | None = None,
    where: Sequence[str] = (),
    paths: Sequence[str] = (),
    storage: Storage | None = None,
    model: str | None = None,
) -> pa.Table:
    """Rows to extract from the current view of one model (`choose_model`): `paths` (exact), `where` filters (AND),
    then the `top` by score."""
    return _select(_current_of(out, storage, model), top, where, paths)


def _current_of(out: str, storage: Storage | None, model: str | None) -> pa.Table:
    """`read_scores` of the model `choose_model` picks, error rows included."""
    store = open_scores(out, storage)
    model_id, _ = choose_model(store.records(), model, store.out)
    return read_scores(out, storage=storage, model_id=model_id)


def _as_scored(path: str) -> str:
    """A path as the scores hold it: URIs as they are, local paths absolute and resolved."""
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def _select(table: pa.Table, top: int | None, where: Sequence[str], paths: Sequence[str]) -> pa.Table:
    table = table.filter(pc.is_null(table.column("error")))
    if paths:
        wanted = [_as_scored(p) for p in paths]
        table = table.filter(pc.is_in(table.column("path"), pa.array(wanted, pa.string())))
    for expr in where:
        table = table.filter(parse_where(expr))
    if top is not None and table.num_rows:
        order = pc.sort_indices(table.column("defect_score"), sort_keys=[("x", "descending")])
        table = table.take(order[:top])
    return table


def _safe_stem(path: str) -> str:
    """The file's stem for an output name: letters and digits of any script kept, the rest (spaces, separators,
    shell-special characters, bytes that are not UTF-8) as ``_``."""
    stem = path.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return re.sub(r"[^\w.-]+", "_", stem.encode("utf-8", "replace").decode("utf-8"))[:80].strip("_") or "image"


def _write_overlay(
    storage: Storage, r: dict[str, Any], mask: np.ndarray, target: Path, classes: np.ndarray | None
) -> None:
    """The row's overlay, as `raydefect predict` draws it (each class in its colour where `classes` holds per-pixel
    class ids), from the image read again; `ImageError` when the image changed size since it was scored."""
    image = decode_image(storage.read_bytes(r["path"]), mode="RGB", path=r["path"])
    if image.shape[:2] != mask.shape:
        raise ImageError(r["path"], f"now {image.shape[1]}x{image.shape[0]}, scored at {mask.shape[1]}x{mask.shape[0]}")
    label = r["defect_class"] if r["is_defect"] else "normal"
    colour = class_colour(_class_index(r, label))
    empty = "mask empty: no pixel above the pixel threshold" if r["is_defect"] and not mask.any() else None
    picture = render_overlay(image, mask, r["defect_score"], label, colour=colour, note=empty, classes=classes)
    save_png(picture, str(target))


def _missing_paths(paths: Sequence[str], rows: pa.Table, current: pa.Table) -> list[tuple[str, str]]:
    """(path as given, why) for each asked-for path that was not extracted: scored with an error, or not at all."""
    missing: list[tuple[str, str]] = []
    if paths:
        found = set(rows.column("path").to_pylist())
        absent = {p: _as_scored(p) for p in paths}
        absent = {p: a for p, a in absent.items() if p not in found and a not in found}
        if absent:  # scored with an error, or not at all: the current view says which
            why = dict(zip(current.column("path").to_pylist(), current.column("error").to_pylist(), strict=True))
            missing = [
                (p, f"scored with an error: {why[a]}" if why.get(a) else "not in the scores") for p, a in absent.items()
            ]
    return missing


def extract(
    out: str,
    dest: str | Path,
    top: int | None = None,
    where: Sequence[str] = (),
    paths: Sequence[str] = (),
    storage: Storage | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """Write the chosen masks (0/255 PNG at the image's size; a per-pixel class model's indexed PNG as stored: class
    ids, the class colours, the class names) and overlays (the same picture `raydefect predict` draws: the image
    beside the image with the mask, each class in its colour, class and score) to `dest`, with an ``index.csv``.
    Returns counts and the index path."""
    storage = storage or Storage()
    with reading(out):
        current = _current_of(out, storage, model)
    rows = _select(current, top, where, paths)
    dest = Path(dest).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        removed = _remove_previous_extract(dest)
    except OSError as e:
        raise OutputError(f"cannot create --out {dest}: {e.strerror}") from None
    index = []
    overlays = 0
    for rank, r in enumerate(rows.to_pylist(), 1):
        stem = f"{rank:04d}_{_safe_stem(r['path'])}"
        ids, names = decode_class_png(r["mask_png"])
        classes = ids if names is not None else None  # an indexed PNG of class ids (`model.mask_classes`)
        mask = ids > 0
        mask_bytes = r["mask_png"] if classes is not None else encode_png(mask.astype(np.uint8) * 255)
        (dest / f"{stem}_mask.png").write_bytes(mask_bytes)
        note, overlay_name = "", f"{stem}_overlay.png"
        try:
            _write_overlay(storage, r, mask, dest / overlay_name, classes)
            overlays += 1
        except (OSError, ImageError) as e:
            note, overlay_name = f"no overlay: {e}", ""
        index.append(
            {
                "rank": rank,
                "path": r["path"],
                "model_id": r["model_id"],
                "defect_score": r["defect_score"],
                "defect_class": r["defect_class"],
                "mask_area_px": r["mask_area_px"],
                "class_area_px": "" if r["class_area_px"] is None else json.dumps(dict(r["class_area_px"])),
                "bbox": format_bbox(r["bbox"]),
                "mask": f"{stem}_mask.png",
                "overlay": overlay_name,
                "note": note,
            }
        )
    index_path = dest / "index.csv"
    with index_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["rank", "path", "model_id", "defect_score", "defect_class",
                                               "mask_area_px", "class_area_px", "bbox", "mask", "overlay",
                                               "note"])  # fmt: skip
        writer.writeheader()
        writer.writerows(index)
    missing = _missing_paths(paths, rows, current)
    return {
        "masks": len(index),
        "overlays": overlays,
        "index": str(index_path),
        "missing": missing,
        "no_overlay": [r for r in index if r["note"]],
        "removed": removed,
    }


def _class_index(row: dict[str, Any], label: str) -> int:
    """`label`'s index among the model's classes (the keys of the row's ``class_scores``, in the model's order), so
    that a class has the colour `raydefect predict` and the evaluation report give it (0, green: normal)."""
    names = [name for name, _ in row.get("class_scores") or []]
    if label in names:
        return names.index(label)
    return 1 if row.get("is_defect") else 0


def _remove_previous_extract(dest: Path) -> int:
    """Delete the PNGs an earlier extract into `dest` wrote (named in its index.csv), so that the folder holds what
    the new index.csv lists; nothing else in the folder is touched. Returns the files deleted."""
    index = dest / "index.csv"
    if not index.is_file():
        return 0
    removed = 0
    with index.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            for name in (row.get("mask"), row.get("overlay")):
                if name and "/" not in name and name.endswith(".png") and (dest / name).is_file():
                    (dest / name).unlink()
                    removed += 1
    return removed
