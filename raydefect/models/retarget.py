"""Moving a model's operating point: new image / pixel thresholds on the same weights, as a new model artifact.

The image threshold can be given as a value or as a target recall on the validation images the training stored
(`VALIDATION_SCORES_FILE`). The weights are copied unchanged; model.yaml gets the new thresholds, a new `model_id`
(thresholds change predictions, so they are part of it), ``extra.thresholds_chosen`` (how each threshold was set)
and ``extra.derived_from`` (the model id it came from).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from raydefect.errors import ArtifactError, ConfigError, OutputError
from raydefect.metrics.thresholds import thresholds_at_recall
from raydefect.models.artifact import (
    META_FILE,
    VALIDATION_SCORES_FILE,
    WEIGHTS_FILE,
    ArtifactMeta,
    folder_beside,
    install_folder,
    read_artifact_meta,
    resolve_artifact_dir,
)
from raydefect.paths import share_like_other_outputs


def validation_scores_csv(scores: Any, labels: Any) -> bytes:
    """The `VALIDATION_SCORES_FILE` text: one row per validation image, ``defect_score,label`` (1 = defect)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["defect_score", "label"])
    writer.writerows((f"{float(s):.6g}", int(bool(y))) for s, y in zip(scores, labels, strict=True))
    return buf.getvalue().encode("utf-8")


def read_validation_scores(model: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(defect scores, labels) of the validation images stored with the model; None when it has none (a model
    trained before they were stored)."""
    path = resolve_artifact_dir(model) / VALIDATION_SCORES_FILE
    if not path.is_file():
        return None
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        scores = np.array([float(r["defect_score"]) for r in rows], np.float64)
        labels = np.array([int(r["label"]) for r in rows], bool)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(
            f"{path}: cannot read the validation scores ({e}); retrain, or give --image VALUE"
        ) from None
    return scores, labels


def choose_thresholds(
    meta: ArtifactMeta,
    validation: tuple[np.ndarray, np.ndarray] | None,
    *,
    image: float | None = None,
    image_recall: float | None = None,
    pixel: float | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """The new thresholds (unchanged where not given) and, per threshold, how it was chosen (one sentence)."""
    if image is not None and image_recall is not None:
        raise ConfigError("give --image or --image-recall, not both")
    for name, value in (("--image", image), ("--pixel", pixel)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} {value}: a threshold is a probability in [0, 1]")
    new = {"image": meta.image_threshold, "pixel": meta.pixel_threshold}
    how: dict[str, str] = {}
    if image_recall is not None:
        if not 0.0 < image_recall <= 1.0:
            raise ConfigError(f"--image-recall {image_recall}: a recall is in (0, 1], e.g. 0.99")
        if validation is None:
            raise ArtifactError(
                f"model {meta.model_id} has no stored validation scores ({VALIDATION_SCORES_FILE}, written by "
                "training): give the threshold as a value with --image VALUE, or retrain"
            )
        (row,) = thresholds_at_recall(*validation, [image_recall])
        if math.isnan(row["threshold"]):
            raise ArtifactError("the stored validation scores hold no defect image: no recall to aim at; use --image")
        new["image"] = row["threshold"]
        how["image"] = (
            f"set for recall {image_recall:g} on the {int(validation[1].sum())} validation defect images "
            f"(recall {row['recall']:.3f}, precision {row['precision']:.3f} there)"
        )
    elif image is not None:
        new["image"], how["image"] = float(image), f"set by hand to {image:g}"
    if pixel is not None:
        new["pixel"], how["pixel"] = float(pixel), f"set by hand to {pixel:g}"
    return new, how


def retarget(
    model: str | Path,
    *,
    image: float | None = None,
    image_recall: float | None = None,
    pixel: float | None = None,
    out: str | Path | None = None,
) -> tuple[ArtifactMeta, ArtifactMeta, dict[str, str]]:
    """Write the model with new thresholds to `out` (default: in place, atomically). Returns (old meta, new meta,
    how each changed threshold was chosen)."""
    src = resolve_artifact_dir(model)
    old = read_artifact_meta(src)
    if image is None and image_recall is None and pixel is None:
        raise ConfigError("nothing to change: give --image-recall R, --image VALUE and/or --pixel VALUE")
    thresholds, how = choose_thresholds(
        old, read_validation_scores(src), image=image, image_recall=image_recall, pixel=pixel
    )
    chosen = {**dict(old.extra.get("thresholds_chosen") or {}), **how}
    extra = {**dict(old.extra), "thresholds_chosen": chosen, "derived_from": old.model_id}
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    new = dataclasses.replace(old, thresholds=thresholds, extra=extra, created_at=now)
    new = dataclasses.replace(new, model_id=new.computed_model_id())
    dest = Path(out).expanduser() if out is not None else src
    if dest.exists() and dest != src and not (dest / META_FILE).exists() and any(dest.iterdir()):
        raise OutputError(f"{dest} exists and is not a model artifact; refusing to overwrite it (choose another --out)")
    tmp = folder_beside(dest, "the model")
    try:
        os.chmod(tmp, 0o755)
        for name in (WEIGHTS_FILE, VALIDATION_SCORES_FILE):
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
                share_like_other_outputs(tmp / name)
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            yaml.safe_dump(new.to_dict(), f, sort_keys=False)
        install_folder(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(
            f"cannot write the model to {dest}: {e.strerror or e}; free space or fix permissions"
        ) from None
    return old, new, how
