"""`raydefect review`: which scored images a person should label next, and the review set written for them.

Three reasons, each with its share of the budget (``--mix``; what one reason cannot fill passes to the others):

- uncertain: the defect score nearest the model's image threshold (the decision could go either way);
- disagree: the heads disagree -- the class head says defect and the mask is empty, or it says normal and the mask
  is not; the more confident the class head, the stronger the disagreement;
- novel: far from the images the model was validated on. The scores hold no embedding, so distance is measured on
  the image statistics: the brightness and contrast z-distance to the validation distribution the model artifact
  stores (`metrics.drift.Reference`); only images at least `NOVEL_Z` away count. Without a stored reference the
  scanned rows' own distribution stands in (the pick then finds outliers of the night, not of training).

Bounded memory: the rows are streamed (only the small columns) and each reason keeps a heap of its best
`POOL_FACTOR` x budget candidates. Diversity: within a reason the picks go round-robin over folders (an image's
parent folder: line, day), best first in each, so one bad folder cannot take the whole budget. Masks are read in
a second pass, for the picked paths only.

The review set (``--out``)::

    images/0001_<stem>.<ext>           the original image bytes
    masks/0001_<stem>.png              the predicted mask, 0/255 at the image's size: the pre-label
    labels.csv                         file, mask, class (predicted; the reviewer corrects it), reason, ...
    annotations/instances_default.json COCO 1.0 (uncompressed RLE masks, iscrowd 1): CVAT's "Import dataset" /
                                       "Upload annotations" with format "COCO 1.0" loads them as masks

`raydefect prepare --reviewed DIR` reads labels.csv and masks/ back (`data.importers.import_reviewed`).
"""

from __future__ import annotations

import csv
import heapq
import json
import math
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raydefect.errors import DataError, OutputError, RaydefectError
from raydefect.imaging import decode_png_mask, encode_png
from raydefect.metrics.drift import Reference, histogram, mean_std
from raydefect.scoring.records import RunRecord
from raydefect.scoring.storage import Storage
from raydefect.scoring.store import ScoreStore
from raydefect.scoring.trends import BATCH_ROWS, reference_from_footer

REASONS = ("uncertain", "disagree", "novel")
REVIEW_COLUMNS = (
    "path",
    "defect_score",
    "is_defect",
    "defect_class",
    "mask_area_px",
    "error",
    "brightness",
    "contrast",
    "width",
    "height",
)
NOVEL_Z = 2.0
POOL_FACTOR = 20
LABELS_CSV = "labels.csv"
COCO_JSON = "annotations/instances_default.json"
LABEL_FIELDS = ("file", "mask", "class", "reason", "defect_score", "predicted", "detail", "path", "run_id")


def parse_mix(text: str) -> dict[str, float]:
    """'uncertain=0.4,disagree=0.3,novel=0.3' -> shares that sum to 1."""
    shares: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, value = part.partition("=")
        try:
            share = float(value)
        except ValueError:
            share = -1.0
        if name.strip() not in REASONS or share < 0:
            raise DataError(f"--mix {text!r}: expected REASON=SHARE,... with REASON one of {', '.join(REASONS)}")
        shares[name.strip()] = share
    total = sum(shares.values())
    if total <= 0:
        raise DataError(f"--mix {text!r}: the shares add up to 0; give at least one reason a share")
    return {r: shares.get(r, 0.0) / total for r in REASONS}


def budgets(n: int, shares: Mapping[str, float]) -> dict[str, int]:
    """`n` split by `shares` (largest remainders, so they add up to `n`)."""
    raw = {r: n * shares.get(r, 0.0) for r in REASONS}
    out = {r: math.floor(v) for r, v in raw.items()}
    for r in sorted(REASONS, key=lambda r: raw[r] - out[r], reverse=True)[: n - sum(out.values())]:
        out[r] += 1
    return out


@dataclass
class Pool:
    """The best `capacity` candidates by priority (a min-heap)."""

    capacity: int
    heap: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)
    seq: int = 0

    def push(self, priority: float, item: dict[str, Any]) -> None:
        self.seq += 1
        entry = (float(priority), -self.seq, item)
        if len(self.heap) < self.capacity:
            heapq.heappush(self.heap, entry)
        elif entry[:2] > self.heap[0][:2]:
            heapq.heapreplace(self.heap, entry)

    def best_first(self) -> list[dict[str, Any]]:
        return [item for _, _, item in sorted(self.heap, key=lambda e: e[:2], reverse=True)]


@dataclass
class Picked:
    """The chosen rows (each with its ``reason``), and what they were chosen against."""

    model_id: str
    image_threshold: float
    class_names: list[str]
    records: list[RunRecord]
    rows: list[dict[str, Any]]
    note: str = ""


def _spread(candidates: list[dict[str, Any]], k: int, taken: set[str]) -> list[dict[str, Any]]:
    """Up to `k` candidates, round-robin over their folders (best first within each), skipping `taken` paths."""
    by_folder: dict[str, list[dict[str, Any]]] = {}
    for c in candidates:
        if c["path"] not in taken:
            by_folder.setdefault(posixpath.dirname(c["path"]), []).append(c)
    queues = list(by_folder.values())
    out: list[dict[str, Any]] = []
    while len(out) < k and queues:
        nxt = []
        for q in queues:
            while q and q[0]["path"] in taken:
                q.pop(0)
            if q and len(out) < k:
                item = q.pop(0)
                out.append(item)
                taken.add(item["path"])
            if q:
                nxt.append(q)
        queues = nxt
    return out


def _stats_reference(store: ScoreStore, records: Sequence[RunRecord], model_id: str) -> dict[str, tuple[float, float]]:
    """Mean and spread of brightness and contrast over the scanned rows (the stand-in for a missing reference)."""
    counts = {q: np.zeros(20, np.int64) for q in ("brightness", "contrast")}
    for t in store.iter_committed(["brightness", "contrast"], model_id, batch_rows=BATCH_ROWS, records=records):
        for q in counts:
            counts[q] += histogram(t.column(q).drop_null().to_numpy(zero_copy_only=False), q)
    return {q: mean_std(c, q) for q, c in counts.items() if c.sum()}


def _scan(
    store: ScoreStore,
    records: Sequence[RunRecord],
    model_id: str,
    threshold: float,
    centre: Mapping[str, tuple[float, float]],
    pools: dict[str, Pool],
) -> None:
    for record in records:
        for t in store.iter_committed(REVIEW_COLUMNS, model_id, batch_rows=BATCH_ROWS, records=[record]):
            t = t.filter(pc.is_null(t.column("error")))
            if not t.num_rows:
                continue
            score = t.column("defect_score").to_numpy(zero_copy_only=False).astype(np.float64)
            defect = pc.fill_null(t.column("is_defect"), False).to_numpy(zero_copy_only=False)
            area = pc.fill_null(t.column("mask_area_px"), 0).to_numpy(zero_copy_only=False)
            priority = {
                "uncertain": -np.abs(score - threshold),
                "disagree": np.where(
                    (defect & (area == 0)) | (~defect & (area > 0)), np.abs(score - threshold), -np.inf
                ),
            }
            if centre:
                z2 = np.zeros(t.num_rows)
                for q, (mean, std) in centre.items():
                    v = pc.fill_null(t.column(q), math.nan).to_numpy(zero_copy_only=False).astype(np.float64)
                    z2 += ((v - mean) / std) ** 2
                z = np.sqrt(z2)
                priority["novel"] = np.where(np.isfinite(z) & (z >= NOVEL_Z), z, -np.inf)
            for reason, p in priority.items():
                pool = pools[reason]
                k = min(pool.capacity, t.num_rows)
                idx = np.argpartition(-p, k - 1)[:k] if k < t.num_rows else np.arange(t.num_rows)
                idx = idx[np.isfinite(p[idx])]
                if not idx.size:
                    continue
                rows = t.take(pa.array(idx)).to_pylist()
                for i, row in zip(idx, rows, strict=True):
                    if reason == "novel":
                        row["detail"] = f"image-stat distance {p[i]:.1f} sd"
                    elif reason == "disagree":
                        row["detail"] = "defect class, empty mask" if row["is_defect"] else "normal class, mask found"
                    else:
                        row["detail"] = f"score {row['defect_score']:.3f} vs threshold {threshold:.3f}"
                    row["run_id"] = record.run_id
                    pool.push(float(p[i]), row)


def pick_review(
    out: str,
    *,
    n: int = 200,
    shares: Mapping[str, float] | None = None,
    runs: int = 1,
    reference: dict[str, Any] | None = None,
    model: str | None = None,
    storage: Storage | None = None,
) -> Picked:
    """Choose up to `n` images from the newest `runs` runs (0: all) of one model (`results.choose_model`)."""
    from raydefect.scoring.results import choose_model, open_scores, reading

    shares = shares or parse_mix("uncertain=0.4,disagree=0.3,novel=0.3")
    with reading(out):
        store = open_scores(out, storage)
        all_records = store.records()
        model_id, _ = choose_model(all_records, model, store.out)
        records = [r for r in all_records if r.model_id == model_id and r.files]
        if model_id is None or not records:
            raise DataError(
                f"{out}: the scores folder holds no committed rows yet; run `raydefect score` into it first"
            )
        records = records[-runs:] if runs else records
        footer = reference_from_footer(store, records, model_id)
        thresholds = footer.get("thresholds") or {}
        if "image" not in thresholds:
            raise DataError(f"{out}: the scores' file footers hold no thresholds; score again with this raydefect")
        ref = Reference.from_dict(reference or footer.get("reference"))
        centre = {q: mean_std(ref.counts[q], q) for q in ("brightness", "contrast") if ref and q in ref.counts}
        note = ""
        if not centre:
            centre = _stats_reference(store, records, model_id)
            note = (
                "novel: the model holds no validation image statistics, so distance is to the scanned runs' own "
                "brightness/contrast distribution"
                if centre
                else "novel: no image statistics in these scores"
            )
        want = budgets(n, shares)
        pools = {r: Pool(max(50, POOL_FACTOR * want[r])) for r in REASONS}
        _scan(store, records, model_id, float(thresholds["image"]), centre, pools)
    ranked = {r: pools[r].best_first() for r in REASONS}
    taken: set[str] = set()
    chosen: list[dict[str, Any]] = []
    for r in REASONS:
        chosen += [{**c, "reason": r} for c in _spread(ranked[r], want[r], taken)]
    for r in REASONS:  # what a reason could not fill passes to the others
        chosen += [{**c, "reason": r} for c in _spread(ranked[r], n - len(chosen), taken)]
    names = list(footer.get("class_names") or [])
    return Picked(model_id, float(thresholds["image"]), names, records, chosen, note)


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of a boolean mask: run lengths over the column-major pixels, zeros first."""
    flat = np.asarray(mask, bool).ravel(order="F")
    if not flat.size:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return [0, *runs] if flat[0] else runs


def _stem(path: str) -> str:
    stem = path.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return re.sub(r"[^\w.-]+", "_", stem)[:80].strip("_") or "image"


def _masks_of(store: ScoreStore, picked: Picked) -> dict[str, tuple[bytes | None, str]]:
    """(mask_png, run_id) of every picked path, from the picked runs (a second, filtered pass)."""
    wanted = pa.array(sorted({r["path"] for r in picked.rows}), pa.string())
    found: dict[str, tuple[bytes | None, str]] = {}
    for record in picked.records:
        for t in store.iter_committed(
            ["path", "mask_png", "error"], picked.model_id, batch_rows=4096, records=[record]
        ):
            t = t.filter(pc.and_(pc.is_in(t.column("path"), wanted), pc.is_null(t.column("error"))))
            for row in t.to_pylist():
                found[row["path"]] = (row["mask_png"], record.run_id)
    return found


def _remove_previous(folder: Path) -> None:
    """Delete the images and masks an earlier review into `folder` wrote (named in its labels.csv), so the folder
    holds what the new labels.csv lists; nothing else is touched."""
    labels = folder / LABELS_CSV
    if not labels.is_file():
        return
    with labels.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            for name in (row.get("file"), row.get("mask")):
                if name and name.count("/") == 1 and name.split("/")[0] in ("images", "masks"):
                    (folder / name).unlink(missing_ok=True)


class _Coco:
    """The review set's COCO json: one category per defect class, one image and at most one RLE annotation per
    picked image."""

    def __init__(self, picked: Picked) -> None:
        self.defect_classes = [c for c in picked.class_names[1:]] or sorted({r["defect_class"] for r in picked.rows})
        self.categories = [{"id": i + 1, "name": c, "supercategory": ""} for i, c in enumerate(self.defect_classes)]
        self.cat_id = {c["name"]: c["id"] for c in self.categories}
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def add(self, rank: int, file_name: str, row: dict[str, Any], mask: np.ndarray) -> None:
        h, w = mask.shape
        self.images.append({"id": rank, "file_name": file_name, "width": int(w), "height": int(h)})
        if not mask.any():
            return
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        self.annotations.append(
            {
                "id": len(self.annotations) + 1,
                "image_id": rank,
                "category_id": self.cat_id[self._category(row)],
                "segmentation": {"counts": rle_counts(mask), "size": [int(h), int(w)]},
                "area": int(mask.sum()),
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                "iscrowd": 1,
                "attributes": {"reason": row["reason"]},
            }
        )

    def _category(self, row: dict[str, Any]) -> str:
        cls = row["defect_class"] if row["defect_class"] in self.cat_id else None
        if cls is None:  # a mask without a defect class (the heads disagree): the first defect class
            cls = self.defect_classes[0] if self.defect_classes else "defect"
            self.cat_id.setdefault(cls, len(self.categories) + 1)
            if cls not in [c["name"] for c in self.categories]:
                self.categories.append({"id": self.cat_id[cls], "name": cls, "supercategory": ""})
        return cls

    def to_dict(self, out: str, model_id: str) -> dict[str, Any]:
        return {
            "info": {"description": f"raydefect review of {out}", "model_id": model_id},
            "licenses": [],
            "categories": self.categories,
            "images": self.images,
            "annotations": self.annotations,
        }


def _label_row(row: dict[str, Any], name: str, ext: str) -> dict[str, Any]:
    """labels.csv's row: the predicted class stands as the label until a reviewer changes it."""
    predicted = row["defect_class"] if row["is_defect"] else "normal"
    return {
        "file": f"images/{name}{ext}",
        "mask": f"masks/{name}.png",
        "class": predicted,
        "reason": row["reason"],
        "defect_score": f"{row['defect_score']:.4f}",
        "predicted": predicted,
        "detail": row["detail"],
        "path": row["path"],
        "run_id": row["run_id"],
    }


def _prepare_review_folder(folder: Path) -> None:
    try:
        for sub in ("images", "masks", "annotations"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        _remove_previous(folder)
    except OSError as e:
        raise OutputError(f"cannot create --out {folder}: {e.strerror}; choose a writable folder") from None


def write_review(out: str, picked: Picked, dest: str | Path, storage: Storage | None = None) -> dict[str, Any]:
    """Write the review set (images, masks, labels.csv, COCO json) for `picked` into `dest`."""
    storage = storage or Storage()
    folder = Path(dest).expanduser()
    _prepare_review_folder(folder)
    from raydefect.scoring.results import reading

    with reading(out):
        masks = _masks_of(ScoreStore(out, storage), picked)
    coco = _Coco(picked)
    labels, problems = [], []
    reasons: dict[str, int] = {}
    for row in picked.rows:
        rank = len(labels) + 1
        ext = Path(row["path"]).suffix.lower() or ".png"
        name = f"{rank:04d}_{_stem(row['path'])}"
        mask_bytes, _ = masks.get(row["path"], (None, ""))
        try:
            data = storage.read_bytes(row["path"])
            mask = decode_png_mask(mask_bytes) if mask_bytes else np.zeros((row["height"], row["width"]), bool)
        except (OSError, ValueError, RaydefectError) as e:
            problems.append(f"{row['path']}: left out of the review set ({e})")
            continue
        (folder / "images" / f"{name}{ext}").write_bytes(data)
        (folder / "masks" / f"{name}.png").write_bytes(encode_png(mask.astype(np.uint8) * 255))
        labels.append(_label_row(row, name, ext))
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
        coco.add(rank, f"{name}{ext}", row, mask)
    labels_path = folder / LABELS_CSV
    with labels_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(LABEL_FIELDS))
        writer.writeheader()
        writer.writerows(labels)
    coco_path = folder / COCO_JSON
    coco_path.write_text(json.dumps(coco.to_dict(out, picked.model_id)), encoding="utf-8")
    return {
        "images": len(labels),
        "reasons": reasons,
        "labels": str(labels_path),
        "coco": str(coco_path),
        "problems": problems,
    }
