"""`raydefect evaluate` end to end: local for small splits, Ray Data for large ones; the core writes the report.

On Ray, the split's records (paths and labels, not pixels) become a Ray Data dataset; an actor pool of
`_EvalActor`s (one `raydefect.tasks.evaluate.Evaluator`, i.e. one model, per actor) decodes, predicts and updates fresh
metric accumulators per batch and returns them pickled, one output row per batch. The driver merges the
accumulators (`merge` is order-free) and the rows, then computes the metrics and writes the report exactly as the
local path does. Workers read the images, masks and model folder by path, so on a multi-node cluster those must be
on storage every node sees.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path
from typing import Any

from raydefect import console
from raydefect.pipelines.cluster import quiet_ray_data
from raydefect.tasks.evaluate import RECORD_FIELDS, Evaluation, Evaluator, new_accumulators, run_evaluation

#: Splits with more images than this run on Ray Data unless told otherwise (`use_ray`).
RAY_ABOVE = 2000


class _EvalActor:
    """One model per actor; each call scores one batch into fresh accumulators and returns them pickled."""

    def __init__(self, model: str, dataset_classes: list[str], device: str, num_bins: int, fpr_limit: float) -> None:
        from raydefect.inference import Predictor

        predictor = Predictor(model, device=device)
        self.evaluator = Evaluator(predictor, dataset_classes, num_bins=num_bins, fpr_limit=fpr_limit)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        records = [
            {
                "index": int(batch["index"][i]),
                "image": str(batch["image"][i]),
                "mask": _mask_path(batch["mask"][i]),
                "label": int(batch["label"][i]),
                "defect_class": str(batch["defect_class"][i]),
                "class_mask": _mask_path(batch["class_mask"][i]),
            }
            for i in range(len(batch["index"]))
        ]
        image_acc, pixel_acc = self.evaluator.new_accumulators()
        rows = self.evaluator.evaluate_batch(records, image_acc, pixel_acc)
        classes = self.evaluator.fresh_class_accumulator()  # this batch's; None without per-pixel classes
        blob = pickle.dumps((rows, image_acc, pixel_acc, classes), protocol=pickle.HIGHEST_PROTOCOL)
        return {"result": np.array([blob], dtype=object)}


def _mask_path(value: Any) -> str | None:
    """A mask column value from Ray Data: a path, or None / NaN (numpy batches turn None into NaN) for no mask."""
    return value if isinstance(value, str) and value else None


def evaluate_on_ray(
    model: str,
    meta: Any,
    dataset_classes: list[str],
    records: list[dict[str, Any]],
    *,
    address: str | None = None,
    batch_size: int = 16,
    actors: int | None = None,
    num_bins: int = 1000,
    fpr_limit: float = 0.3,
) -> tuple[list[dict[str, Any]], Any, Any, Any]:
    """Score `records` on Ray Data; returns (rows in record order, merged image, pixel and, with per-pixel classes,
    pixel-class accumulators (else None))."""
    import ray

    from raydefect.pipelines.cluster import cluster_cpus, cluster_gpus, connect

    connect(address)
    quiet_ray_data()
    gpus = cluster_gpus()
    use_gpu = gpus >= 1
    if actors is None:
        actors = int(gpus) if use_gpu else max(1, min(4, int(cluster_cpus()) // 2))
    console.info(
        f"evaluating {console.count(len(records), 'image')} on Ray Data with {actors} model actor(s) "
        f"({'GPU' if use_gpu else 'CPU'})"
    )
    ds = ray.data.from_items([{**{k: r[k] for k in RECORD_FIELDS}, "class_mask": r.get("class_mask")} for r in records])
    results = ds.map_batches(
        _EvalActor,
        fn_constructor_kwargs={
            "model": str(model),
            "dataset_classes": list(dataset_classes),
            "device": "cuda" if use_gpu else "cpu",
            "num_bins": num_bins,
            "fpr_limit": fpr_limit,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )
    rows: list[dict[str, Any]] = []
    image_acc, pixel_acc = new_accumulators(meta, dataset_classes, num_bins, fpr_limit)
    class_acc = None
    with console.progress("evaluate", len(records)) as bar:
        for out in results.iter_rows():
            batch_rows, img, px, classes = pickle.loads(out["result"])
            rows += batch_rows
            image_acc.merge(img)
            pixel_acc.merge(px)
            if classes is not None and class_acc is None:
                class_acc = classes
            elif classes is not None:
                class_acc.merge(classes)
            bar.update(len(batch_rows))
    rows.sort(key=lambda r: r["index"])
    return rows, image_acc, pixel_acc, class_acc


def evaluate(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    use_ray: bool | None = None,
    ray_above: int = RAY_ABOVE,
    address: str | None = None,
    batch_size: int = 16,
    actors: int | None = None,
    device: str = "auto",
    gallery_size: int = 8,
) -> Evaluation:
    """Evaluate `model` on one split of the dataset `data` and write everything into `out`.

    use_ray: True / False forces the engine; None uses Ray Data when the split has more than `ray_above` images.
    """
    from raydefect.data.manifest import load_dataset
    from raydefect.inference import Predictor
    from raydefect.models.artifact import resolve_artifact_dir

    model_dir = str(resolve_artifact_dir(model))
    dataset = load_dataset(data)
    n = len(dataset.split(split))
    on_ray = n > ray_above if use_ray is None else use_ray
    predictor = Predictor(model_dir, device="cpu" if on_ray else device)  # on Ray the driver only draws galleries
    scorer = None
    if on_ray:
        scorer = functools.partial(
            evaluate_on_ray,
            model_dir,
            predictor.meta,
            dataset.class_names,
            address=address,
            batch_size=batch_size,
            actors=actors,
        )
    return run_evaluation(
        predictor,
        dataset,
        split,
        out,
        model_path=model_dir,
        batch_size=batch_size,
        gallery_size=gallery_size,
        scorer=scorer,
        engine="ray" if on_ray else "local",
    )
