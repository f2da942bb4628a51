"""`raydefect evaluate`, the core: score a labelled split with the model's STORED thresholds and write the report.

The work is split so that Ray can run the heavy part and the rest stays plain Python:

1. `Evaluator.evaluate_batch(records, image_acc, pixel_acc)` decodes images and masks, runs the model, upsamples
   each mask probability to the image's own size and feeds the metric accumulators (`raydefect.metrics`); it
   returns one row per image (scores, decision, IoU/Dice at the stored pixel threshold, or the error). It runs
   locally (`evaluate_records`) or inside Ray Data actors (`raydefect.pipelines.evaluate`); accumulators pickle
   and `merge`, so the driver combines what the workers collected.
2. `summarize` (`raydefect.tasks.evaluation`) turns merged accumulators and rows into the metrics dict written as
   ``metrics.json``.
3. `write_evaluation` writes metrics.json, per_image.csv, the plots (`raydefect.viz.plots`), the galleries of the
   worst mistakes (overlays with the true mask outlined; the few images shown are predicted again, locally) and
   one self-contained ``report.html`` (`raydefect.viz.report`).

Thresholds: the image decision is ``defect_score >= thresholds.image`` and pixels are ``prob >= thresholds.pixel``,
both from the artifact (fixed-threshold mode: a test split must not choose its own thresholds). The F1-best image
threshold and the best pixel threshold of this split are reported beside them as "what the data would have chosen".

A dataset class the model does not know (a new defect type) is kept: it gets a zero-probability column, so its
images count as wrong-class predictions in the confusion matrix, and a note says so.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raydefect import console
from raydefect.data.labels import decode_class_mask
from raydefect.data.pool import cpu_workers
from raydefect.errors import ImageError, OutputError
from raydefect.imaging import DEFAULT_MAX_PIXELS, decode_image, decode_mask
from raydefect.inference import (
    Predictor,
    Preprocessor,
    class_ids,
    decide,
    infer_images,
    postprocess,
    upsample_prob,
)
from raydefect.metrics import ImageMetricAccumulator, PixelMetricAccumulator
from raydefect.metrics.common import json_safe
from raydefect.metrics.pixel_classes import PixelClassAccumulator
from raydefect.tasks.evaluation import Evaluation, card_note, summarize, write_per_image_csv
from raydefect.viz.overlay import class_colour, render_overlay, save_png

if TYPE_CHECKING:
    from raydefect.data.manifest import Dataset
    from raydefect.models.artifact import ArtifactMeta

METRICS_JSON = "metrics.json"
PER_IMAGE_CSV = "per_image.csv"
REPORT_HTML = "report.html"
GALLERY_DIR = "gallery"
#: Record fields a worker needs from the manifest (the rest stays on the driver).
RECORD_FIELDS = ("index", "image", "mask", "label", "defect_class")


def evaluation_class_names(model_classes: Sequence[str], dataset_classes: Sequence[str]) -> tuple[str, ...]:
    """The model's classes, then dataset classes the model does not know (they can never be predicted)."""
    extra = [c for c in dataset_classes if c not in model_classes]
    return (*model_classes, *extra)


def _text(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def split_records(frame: Any) -> list[dict[str, Any]]:
    """Manifest rows (a pandas frame with absolute paths) -> plain dicts with `RECORD_FIELDS`, in manifest order;
    plus ``class_mask`` when the dataset has per-pixel classes."""
    records = []
    with_classes = "class_mask" in frame.columns
    for i, row in enumerate(frame.itertuples(index=False)):
        record = {
            "index": i,
            "image": str(row.image),
            "mask": _text(getattr(row, "mask", None)),
            "label": int(row.label),
            "defect_class": str(row.defect_class),
        }
        if with_classes:
            record["class_mask"] = _text(row.class_mask)
        records.append(record)
    return records


def new_accumulators(
    meta: ArtifactMeta, dataset_classes: Sequence[str], num_bins: int = 1000, fpr_limit: float = 0.3
) -> tuple[ImageMetricAccumulator, PixelMetricAccumulator]:
    """Empty accumulators for this model and dataset: the stored pixel threshold is the fixed one."""
    return (
        ImageMetricAccumulator(evaluation_class_names(meta.class_names, dataset_classes)),
        PixelMetricAccumulator(meta.pixel_threshold, num_bins=num_bins, fpr_limit=fpr_limit),
    )


@dataclass
class _Loaded:
    record: dict[str, Any]
    image: np.ndarray | None = None
    truth: np.ndarray | None = None  # bool HxW; None when the image has no mask (normal, or unknown)
    classes: np.ndarray | None = None  # per-pixel classes: evaluation class ids HxW; None: none known
    x: np.ndarray | None = None
    error: str | None = None


class Evaluator:
    """Per-batch evaluation with one model; cheap to call many times (Ray actors keep one for their lifetime).

    predictor: a `Predictor` or anything with its interface (``meta``, ``predict(batch) -> dict``): tests pass
    stubs whose predictions they control.
    """

    def __init__(
        self,
        predictor: Predictor | Any,
        dataset_classes: Sequence[str],
        *,
        num_bins: int = 1000,
        fpr_limit: float = 0.3,
        workers: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.predictor = predictor
        self.meta: ArtifactMeta = predictor.meta
        self.class_names = evaluation_class_names(self.meta.class_names, dataset_classes)
        self.class_index = {name: i for i, name in enumerate(self.class_names)}
        self.pre = Preprocessor(self.meta)
        self.num_bins = num_bins
        self.fpr_limit = fpr_limit
        self.max_pixels = max_pixels
        self.workers = workers or min(4, cpu_workers())
        self._pool: ThreadPoolExecutor | None = None
        #: model.mask_classes: the pixel-class confusion matrix (dataset class ids -> evaluation ids via the table)
        with_classes = bool(getattr(getattr(self.meta, "model", None), "mask_classes", False))
        self.class_acc = PixelClassAccumulator(self.class_names) if with_classes else None
        self._class_lut = np.zeros(256, np.uint8)
        for i, name in enumerate(dataset_classes):
            self._class_lut[i] = self.class_index[name]

    def new_accumulators(self) -> tuple[ImageMetricAccumulator, PixelMetricAccumulator]:
        return new_accumulators(self.meta, self.class_names, self.num_bins, self.fpr_limit)

    def _load(self, record: dict[str, Any]) -> _Loaded:
        path = record["image"]
        item = _Loaded(record)
        try:
            item.image = decode_image(path, mode="RGB", path=path, max_pixels=self.max_pixels)
            if record["mask"] is not None:
                item.truth = decode_mask(record["mask"], path=record["mask"], max_pixels=self.max_pixels).array
            if self.class_acc is not None and record.get("class_mask"):
                item.classes = self._class_lut[decode_class_mask(record["class_mask"], self.max_pixels)]
        except ImageError as e:
            item.error = str(e)
            return item
        except OSError as e:
            item.error = f"{path}: cannot read ({e.strerror or e})"
            return item
        if item.truth is not None and item.truth.shape != item.image.shape[:2]:
            h, w = item.image.shape[:2]
            item.error = (
                f"{record['mask']}: mask is {item.truth.shape[1]}x{item.truth.shape[0]}, the image is {w}x{h} "
                "(re-run `raydefect prepare`, which checks this)"
            )
            return item
        if record["defect_class"] not in self.class_index:
            item.error = f"class {record['defect_class']!r} is not in the dataset's class list"
            return item
        item.x = None if self.meta.geometry.tiled else self.pre(item.image)  # tiles are cut by `infer_images`
        return item

    def load(self, records: Sequence[dict[str, Any]]) -> list[_Loaded]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="evaluate")
        return list(self._pool.map(self._load, records))

    def evaluate_batch(
        self,
        records: Sequence[dict[str, Any]],
        image_acc: ImageMetricAccumulator,
        pixel_acc: PixelMetricAccumulator,
    ) -> list[dict[str, Any]]:
        """Score one batch of records into the accumulators; one row per record (see `EvaluationRow` keys)."""
        loaded = self.load(records)
        ok = [item for item in loaded if item.error is None]
        rows: list[dict[str, Any]] = []
        if ok:
            if self.meta.geometry.tiled:
                out = infer_images(self.predictor, [item.image for item in ok], len(ok))
            else:
                out = self.predictor.predict(np.stack([item.x for item in ok]))
            n_extra = len(self.class_names) - self.meta.num_classes
            probs = np.asarray(out["class_probs"], np.float64)
            if n_extra:
                probs = np.concatenate([probs, np.zeros((len(ok), n_extra))], axis=1)
            scores = np.asarray(out["defect_score"], np.float64)
            labels = np.array([item.record["label"] for item in ok], np.int64)
            class_ids = np.array([self.class_index[item.record["defect_class"]] for item in ok], np.int64)
            image_acc.update(scores, labels, probs, class_ids)
            with_mask = [k for k, item in enumerate(ok) if item.truth is not None or item.record["label"] == 0]
            prob_maps = [
                upsample_prob(out["mask_prob"][k], ok[k].image.shape[1], ok[k].image.shape[0], self.meta.geometry.mode)
                for k in with_mask
            ]
            truths = [ok[k].truth for k in with_mask]  # None (normal image) = empty truth
            ious, dices = pixel_acc.update(prob_maps, truths) if with_mask else (np.zeros(0), np.zeros(0))
            pixel_of = {k: j for j, k in enumerate(with_mask)}
            if self.class_acc is not None and "pixel_class_probs" in out:
                self._update_classes(ok, with_mask, out["mask_prob"], out["pixel_class_probs"])
            for k, item in enumerate(ok):
                is_defect, pred_class = decide(scores[k], out["class_probs"][k], self.meta)
                j = pixel_of.get(k)
                pred_area = int(np.count_nonzero(prob_maps[j] >= self.meta.pixel_threshold)) if j is not None else None
                rows.append(
                    {
                        **item.record,
                        "width": int(item.image.shape[1]),
                        "height": int(item.image.shape[0]),
                        "defect_score": float(scores[k]),
                        "is_defect": bool(is_defect),
                        "predicted_class": pred_class,
                        "class_probs": [float(p) for p in probs[k]],
                        "iou": float(ious[j]) if j is not None else math.nan,
                        "dice": float(dices[j]) if j is not None else math.nan,
                        "true_area_px": int(item.truth.sum()) if item.truth is not None else 0,
                        "pred_area_px": pred_area,
                        "error": None,
                    }
                )
        for item in loaded:
            if item.error is not None:
                rows.append({**item.record, "error": item.error})
        return rows

    def fresh_class_accumulator(self) -> PixelClassAccumulator | None:
        """Hand over the pixel-class confusion matrix so far and start a new one (per-batch results on Ray)."""
        done = self.class_acc
        if done is not None:
            self.class_acc = PixelClassAccumulator(self.class_names)
        return done

    def _update_classes(
        self, ok: list[_Loaded], with_mask: list[int], mask_prob: np.ndarray, class_probs: np.ndarray
    ) -> None:
        """Per-pixel classes at each image's own size, as inference reports them (`metrics.pixel_classes.class_map`),
        against the class masks; a normal image's truth is all background."""
        if self.class_acc is None:
            return
        mode = self.meta.geometry.mode
        for k in with_mask:
            item = ok[k]
            h, w = item.image.shape[:2]
            if item.truth is not None and item.classes is None:  # a defect image without per-pixel classes
                continue
            pred = class_ids(mask_prob[k], class_probs[k], w, h, self.meta.pixel_threshold, mode)
            truth = item.classes if item.classes is not None else np.zeros((h, w), np.uint8)
            self.class_acc.update(pred, truth)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def evaluate_records(
    evaluator: Evaluator, records: Sequence[dict[str, Any]], batch_size: int = 16
) -> tuple[list[dict[str, Any]], ImageMetricAccumulator, PixelMetricAccumulator]:
    """The local loop: every record through `evaluator`, in batches; (rows in record order, accumulators)."""
    image_acc, pixel_acc = evaluator.new_accumulators()
    rows: list[dict[str, Any]] = []
    try:
        with console.progress("evaluate", len(records)) as bar:
            for start in range(0, len(records), batch_size):
                rows += evaluator.evaluate_batch(records[start : start + batch_size], image_acc, pixel_acc)
                bar.update(len(records[start : start + batch_size]))
    finally:
        evaluator.close()
    rows.sort(key=lambda r: r["index"])
    return rows, image_acc, pixel_acc


# --- writing ---------------------------------------------------------------------------------------------------


def _caption(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "image": row["image"],
        "file": os.path.basename(row["image"]),
        "defect_score": row["defect_score"],
        "true_class": row["defect_class"],
        "predicted_class": row["predicted_class"],
        "iou": None if math.isnan(row["iou"]) else row["iou"],
    }


def render_galleries(
    predictor: Predictor | Any,
    galleries: dict[str, list[dict[str, Any]]],
    out_dir: Path,
    class_names: Sequence[str],
) -> dict[str, list[dict[str, Any]]]:
    """Predict the gallery images again (a few dozen at most) and write overlays with the truth outlined.

    Returns {gallery: [caption dict + "png" (path relative to out_dir)]}.
    """
    meta = predictor.meta
    evaluator = Evaluator(predictor, class_names)
    unique = {r["index"]: r for rows in galleries.values() for r in rows}
    loaded = {item.record["index"]: item for item in evaluator.load([unique[i] for i in sorted(unique)])}
    evaluator.close()
    ok = [i for i in sorted(loaded) if loaded[i].error is None]
    predicted: dict[int, np.ndarray] = {}
    if ok:
        out = infer_images(predictor, [loaded[i].image for i in ok])
        predicted = {i: out["mask_prob"][k] for k, i in enumerate(ok)}
    written: dict[str, list[dict[str, Any]]] = {}
    for key, rows in galleries.items():
        written[key] = []
        for n, row in enumerate(rows, start=1):
            item = loaded[row["index"]]
            if item.error is not None:  # the file changed since it was scored
                continue
            h, w = item.image.shape[:2]
            mask = postprocess(
                predicted[row["index"]], w, h, meta.pixel_threshold, encode=False, geometry=meta.geometry.mode
            ).mask
            truth = item.truth if item.truth is not None else np.zeros((h, w), bool)
            cls = row["predicted_class"]
            note = card_note(cls, mask, truth, row["iou"])
            overlay = render_overlay(
                item.image,
                mask,
                row["defect_score"],
                cls,
                colour=class_colour(list(class_names).index(cls)),
                true_mask=truth,
                true_text=f"truth: {row['defect_class']}",
                note=note,
            )
            stem = os.path.splitext(os.path.basename(row["image"]))[0]
            rel = f"{GALLERY_DIR}/{key}/{n:02d}_{stem}.png"
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            save_png(overlay, str(out_dir / rel))
            shown = {} if mask.any() or truth.any() else {"iou": None}  # two empty masks: no IoU to show
            written[key].append({**_caption(row), **shown, "note": note, "png": rel})
    return written


def write_evaluation(
    evaluation: Evaluation,
    out: str | Path,
    predictor: Predictor | Any | None = None,
    *,
    gallery_size: int = 8,
) -> dict[str, Path]:
    """metrics.json, per_image.csv, plots, galleries (needs `predictor`) and report.html into `out`."""
    from raydefect.viz.plots import write_metric_plots
    from raydefect.viz.report import write_report

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out}: {e.strerror or e}; choose a writable --out") from None
    start = time.perf_counter()
    plots = write_metric_plots(out, evaluation.image, evaluation.pixel)
    plots["score_histogram"] = _score_histogram(evaluation, out)
    galleries: dict[str, list[dict[str, Any]]] = {}
    if predictor is not None and gallery_size > 0:
        chosen = {k: rows[:gallery_size] for k, rows in evaluation.galleries.items()}
        galleries = render_galleries(predictor, chosen, out, evaluation.image.class_names)
    metrics = dict(evaluation.metrics)
    metrics["files"] = {
        "per_image": PER_IMAGE_CSV,
        "report": REPORT_HTML,
        "plots": {name: p.name for name, p in plots.items()},
        "galleries": {k: [g["png"] for g in v] for k, v in galleries.items()},
    }
    metrics["galleries"] = json_safe(galleries)
    evaluation.metrics = metrics
    paths = {
        "metrics": out / METRICS_JSON,
        "per_image": out / PER_IMAGE_CSV,
        "report": out / REPORT_HTML,
        **plots,
    }
    try:
        write_per_image_csv(paths["per_image"], evaluation.rows, evaluation.image.class_names)
        with open(paths["metrics"], "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2, allow_nan=False)
            f.write("\n")
        write_report(paths["report"], metrics, out)
    except OSError as e:
        raise OutputError(f"cannot write the evaluation to {out}: {e.strerror or e}; choose a writable --out") from None
    console.debug(f"report written in {time.perf_counter() - start:.1f} s")
    return paths


def _score_histogram(evaluation: Evaluation, out: Path) -> Path:
    from raydefect.viz.plots import plot_score_histogram

    scored = [r for r in evaluation.rows if not r.get("error")]
    story = evaluation.metrics["thresholds"]
    marks = [(r["target_recall"], r["threshold"]) for r in story["validation_at_recall"] or story["at_recall"]]
    return plot_score_histogram(
        [r["defect_score"] for r in scored],
        [r["label"] == 1 for r in scored],
        out / "score_histogram.png",
        threshold=story["image"],
        recall_thresholds=[(t, v) for t, v in marks if v is not None],
    )


#: records -> (rows, image accumulator, pixel accumulator, pixel-class accumulator or None)
Scorer = Callable[
    [list[dict[str, Any]]],
    tuple[list[dict[str, Any]], ImageMetricAccumulator, PixelMetricAccumulator, PixelClassAccumulator | None],
]


def run_evaluation(
    predictor: Predictor | Any,
    dataset: Dataset,
    split: str,
    out: str | Path,
    *,
    model_path: str = "",
    batch_size: int = 16,
    gallery_size: int = 8,
    scorer: Scorer | None = None,
    engine: str = "local",
) -> Evaluation:
    """Evaluate one split and write every output into `out`.

    scorer: records -> (rows, image accumulator, pixel accumulator, pixel-class accumulator or None); default the
    local loop with `predictor` (`raydefect.pipelines.evaluate` passes a Ray Data one). `predictor` also renders the
    galleries.
    """
    start = time.perf_counter()
    records = split_records(dataset.split(split))
    if scorer is None:
        console.info(f"evaluating {console.count(len(records), 'image')} of the {split!r} split locally")
        evaluator = Evaluator(predictor, dataset.class_names)
        rows, image_acc, pixel_acc = evaluate_records(evaluator, records, batch_size)
        class_acc = evaluator.class_acc
    else:
        rows, image_acc, pixel_acc, class_acc = scorer(records)
    evaluation = summarize(
        predictor.meta,
        rows,
        image_acc,
        pixel_acc,
        model_path=model_path,
        data_path=str(dataset.root),
        split=split,
        engine=engine,
        seconds=time.perf_counter() - start,
        dataset_classes=dataset.class_names,
    )
    if class_acc is not None and class_acc.pixels:  # per-class IoU / Dice, their means, the confusion matrix
        evaluation.metrics["pixel_classes"] = class_acc.compute()
    write_evaluation(evaluation, out, predictor, gallery_size=gallery_size)
    return evaluation
