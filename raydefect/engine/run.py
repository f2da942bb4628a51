"""The run folder (contract 4 of docs/architecture.md) and the end of a training: export the best checkpoint, test it.

    runs/<name>/
      config.yaml          the resolved config (re-running the same name resumes with it)
      metrics.csv          one row per epoch: epoch, stage, lr, train losses, every val metric, seconds, images/s
      plots/               training_curves.png; val/ and test/: PR, ROC, PRO, confusion matrix, IoU histogram
      checkpoint_epoch_N/  training checkpoints (best K by schedule.metric, plus the last)
      model/               the best checkpoint as a self-contained model artifact, thresholds chosen on val
      test_metrics.json    the test split scored with those thresholds (also in model/model.yaml's metrics)

Both drivers (plain `fit` and Ray Train) use these functions, so their folders look the same.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raydefect import console
from raydefect.config import Config, save_config
from raydefect.engine.provenance import thresholds_chosen, validation_reference
from raydefect.errors import OutputError
from raydefect.geometry import Geometry
from raydefect.paths import write_text_atomic

if TYPE_CHECKING:
    from raydefect.data.manifest import Dataset

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
#: Rank 0's images done in the current epoch, for the driver's progress bar (hidden: a live figure, not a result).
PROGRESS_FILE = ".progress.json"
TEST_METRICS_FILE = "test_metrics.json"
MODEL_DIR = "model"
PLOTS_DIR = "plots"
CHECKPOINT_PREFIX = "checkpoint_epoch_"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")

#: The per-epoch console table: (metrics key, column title, format).
CONSOLE_COLUMNS = (
    ("epoch", "epoch", "d"),
    ("stage", "stage", "d"),
    ("train_loss", "loss", ".4f"),
    ("val_loss", "val_loss", ".4f"),
    ("val_f1", "val_f1", ".3f"),
    ("val_ap", "val_ap", ".3f"),
    ("val_iou", "val_iou", ".3f"),
    ("val_dice", "val_dice", ".3f"),
    ("val_score", "val_score", ".3f"),
    ("seconds", "s", ".1f"),
    ("images_per_s", "img/s", ".1f"),
)


def checkpoint_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def default_run_name(cfg: Config) -> str:
    data = Path(cfg.data.dataset).name if cfg.data.dataset else "run"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{data}-{cfg.model.backbone}-{stamp}"


def prepare_runs_dir(runs_dir: str | Path) -> Path:
    """The absolute runs folder, created and checked writable (OutputError naming the fix otherwise)."""
    root = Path(runs_dir).expanduser().absolute()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OutputError(
            f"runs folder {root} is not writable ({e.strerror or e}); choose another with --set train.runs_dir=DIR"
        ) from None
    return root


#: Keys that may change when a run is resumed: resources, patience, more epochs, I/O, where the initial weights came
#: from. Everything else (model, data, optimiser...) would make the checkpoint mean something else; the tune and
#: score sections do not matter to a training.
RESUMABLE_CHANGES = (
    "resources.",
    "tune.",
    "score.",
    "train.max_failures",
    "train.keep_checkpoints",
    "train.eval_batch_size",
    "data.loader_threads",
    "data.loader_processes",
    "schedule.frozen_epochs",
    "schedule.partial_epochs",
    "schedule.full_epochs",
    "schedule.patience",
    "model.pretrained",  # a resumed run loads its weights from the checkpoint
    "model.weights",
)


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two `Config.to_dict()` trees."""
    keys = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                keys.append(f"{section}.{key}")
    return keys


def check_resumable(run_dir: str | Path, cfg: Config) -> bool:
    """True when ``run_dir`` holds an earlier run of ``cfg`` (resume), False for a new run; `ConfigError` when the
    folder holds a run whose config differs in a key that cannot change mid-run."""
    from raydefect.config import read_yaml
    from raydefect.errors import ConfigError

    saved = Path(run_dir) / CONFIG_FILE
    if not saved.is_file():
        return False
    old = read_yaml(saved) or {}
    old.pop("schema_version", None)
    new = cfg.to_dict()
    changed = [k for k in config_differences(old, new) if not k.startswith(RESUMABLE_CHANGES)]
    changed = [k for k in changed if k != "train.name"]
    if changed:
        shown = ", ".join(f"{k} ({_get(old, k)!r} -> {_get(new, k)!r})" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ConfigError(
            f"run {Path(run_dir).name} already exists with a different config: {shown}{more}. Re-running a name "
            f"resumes it, so pass a new --name for a new run (or keep the settings in {saved})"
        )
    return True


def _get(tree: dict[str, Any], dotted: str) -> Any:
    section, key = dotted.split(".", 1)
    return (tree.get(section) or {}).get(key)


def write_run_config(run_dir: Path, cfg: Config) -> Path:
    try:
        return save_config(cfg, run_dir / CONFIG_FILE)
    except OSError as e:
        raise OutputError(f"cannot write {run_dir / CONFIG_FILE}: {e.strerror}") from None


# ------------------------------------------------------------------------------------------- metrics.csv
def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def write_metrics_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Rewrite metrics.csv atomically: one row per epoch (the last one wins), columns in first-seen order."""
    path = Path(path)
    by_epoch: dict[int, dict[str, Any]] = {}
    for row in rows:
        by_epoch[int(row["epoch"])] = row
    columns: list[str] = []
    for row in by_epoch.values():
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for epoch in sorted(by_epoch):
        writer.writerow([_cell(by_epoch[epoch].get(c)) for c in columns])
    return write_text_atomic(path, buf.getvalue())


def read_metrics_csv(path: str | Path) -> list[dict[str, Any]]:
    """metrics.csv back as dicts of floats (ints for epoch and stage; NaN for empty cells)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in rec.items():
                try:
                    row[k] = int(v) if k in ("epoch", "stage", "attempt") else (float(v) if v != "" else math.nan)
                except ValueError:
                    row[k] = v
            rows.append(row)
    return rows


def append_metrics_row(path: str | Path, row: dict[str, Any]) -> Path:
    """Add one epoch's row; rows of this epoch or later (from an attempt that did not finish) are replaced."""
    rows = [r for r in read_metrics_csv(path) if int(r["epoch"]) < int(row["epoch"])]
    return write_metrics_csv(path, [*rows, row])


def console_header() -> str:
    cells = [title.rjust(max(len(title), 7)) for _key, title, _fmt in CONSOLE_COLUMNS]
    return "  ".join(cells)


def console_row(metrics: dict[str, Any]) -> str:
    cells = []
    for key, title, fmt in CONSOLE_COLUMNS:
        value = metrics.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            text = "-"
        else:
            text = format(int(value) if fmt == "d" else float(value), fmt)
        cells.append(text.rjust(max(len(title), 7)))
    return "  ".join(cells)


# ------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """Complete checkpoint folders of a run by epoch."""
    from raydefect.engine.checkpoint import is_checkpoint

    out = {}
    root = Path(run_dir)
    if root.is_dir():
        for child in root.iterdir():
            m = _CHECKPOINT_RE.match(child.name)
            if m and is_checkpoint(child):
                out[int(m.group(1))] = child
    return dict(sorted(out.items()))


def best_epoch(history: Sequence[dict[str, Any]], metric: str, mode: str, among: Sequence[int] | None = None) -> int:
    """The epoch with the best finite ``metric`` (earliest on ties); the last epoch when none is finite."""
    rows = [r for r in history if among is None or int(r["epoch"]) in among]
    scored = [(float(r[metric]), int(r["epoch"])) for r in rows if math.isfinite(float(r.get(metric, math.nan)))]
    if not scored:
        return max(int(r["epoch"]) for r in rows) if rows else 0
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda t: (sign * t[0], -t[1]))[1]


def prune_checkpoints(
    run_dir: str | Path, history: Sequence[dict[str, Any]], keep: int, metric: str, mode: str
) -> None:
    """Keep the best ``keep`` checkpoints by ``metric`` plus the last one (what Ray's CheckpointConfig does)."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return
    values = {int(r["epoch"]): float(r.get(metric, math.nan)) for r in history}
    sign = 1.0 if mode == "max" else -1.0

    def rank(epoch: int) -> tuple[float, int]:
        v = values.get(epoch, math.nan)
        return (sign * v if math.isfinite(v) else -math.inf, epoch)

    ranked = sorted(ckpts, key=rank, reverse=True)
    keep_set = set(ranked[:keep]) | {max(ckpts)}
    for epoch, path in ckpts.items():
        if epoch not in keep_set:
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ export
@dataclass
class ExportResult:
    """What the end of a training produced."""

    model_dir: Path
    model_id: str
    epoch: int
    thresholds: dict[str, float]
    val_metrics: dict[str, float]
    test_metrics: dict[str, float] = field(default_factory=dict)
    test_metrics_path: Path | None = None
    plots: dict[str, Path] = field(default_factory=dict)


def _finite_threshold(value: float) -> float:
    return float(min(1.0, max(0.0, value))) if math.isfinite(value) else 0.5


def _score_test_split(
    score: Callable[[list[dict[str, Any]], float], Any],
    dataset: Dataset,
    thresholds: dict[str, float],
    epoch: int,
    plots_dir: Path,
    plots: dict[str, Path],
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """The test split scored at the thresholds chosen on val: (test metrics, test_metrics.json's content), its plots
    added to `plots`; nothing, with a warning, for a dataset without a test split."""
    from raydefect.engine.data import manifest_rows
    from raydefect.metrics import validation_summary
    from raydefect.metrics.pixel_classes import pixel_class_summary
    from raydefect.viz.plots import write_metric_plots

    test_rows = manifest_rows(dataset, "test", required=False)
    if not test_rows:
        console.warn(f"{dataset.root}: no test split, so no test metrics (prepare with a test fraction to get them)")
        return {}, None
    test = score(test_rows, thresholds["pixel"])
    test_image, test_pixel = test.image.compute(thresholds["image"]), test.pixel.compute()
    test_metrics = validation_summary(test_image, test_pixel, prefix="test_", use_fixed_pixel_threshold=True)
    test_metrics.update(pixel_class_summary(test.classes, "test_"))
    test_metrics["test_image_threshold"] = thresholds["image"]
    test_metrics["test_pixel_threshold"] = thresholds["pixel"]
    for key in ("test_image_threshold_fallback", "test_pixel_threshold_fallback"):
        test_metrics.pop(key, None)
    test_payload = {
        "split": "test",
        "checkpoint_epoch": epoch,
        "thresholds": thresholds,
        "metrics": test_metrics,
        "image": test_image.to_dict(),
        "pixel": test_pixel.to_dict(),
    }
    if test.classes is not None:  # model.mask_classes: per-class IoU / Dice, their means, the confusion matrix
        test_payload["pixel_classes"] = test.classes.compute()
    for name, path in write_metric_plots(plots_dir / "test", test_image, test_pixel).items():
        plots[f"test_{name}"] = path
    return test_metrics, test_payload


def _split_scorer(
    checkpoint_dir: str | Path, cfg: Config, dataset: Dataset, geometry: Geometry, torch_device: Any
) -> tuple[Any, Callable[[list[dict[str, Any]], float], Any]]:
    """The checkpoint's model on `torch_device`, and a function that scores manifest rows with it (`evaluate`, per-image
    scores kept)."""
    from raydefect.engine.checkpoint import load_weights
    from raydefect.engine.data import SampleSource, iterate_batches
    from raydefect.engine.loop import eval_autocast_dtype
    from raydefect.engine.validation import evaluate
    from raydefect.models.model import DefectModel

    model = DefectModel(cfg.model, geometry.image_size, dataset.class_names, load_weights=False, geometry=geometry)
    load_weights(checkpoint_dir, model)
    model.to(torch_device).eval()
    amp = eval_autocast_dtype(cfg.train.precision, torch_device)
    source = SampleSource.for_config(cfg, train=False)

    def score(rows: list[dict[str, Any]], pixel_threshold: float) -> Any:
        batches = iterate_batches(
            source, rows, range(len(rows)), cfg.train.eval_batch_size, threads=cfg.data.loader_threads
        )
        return evaluate(
            model,
            batches,
            dataset.class_names,
            device=torch_device,
            amp_dtype=amp,
            pixel_threshold=pixel_threshold,
            keep_per_image=True,
        )

    return model, score


@dataclass
class _Validation:
    """The validation split scored with the exported weights, and the thresholds chosen on it."""

    image: Any
    pixel: Any
    arrays: dict[str, Any]
    metrics: dict[str, float]
    thresholds: dict[str, float]

    @classmethod
    def of(cls, val: Any) -> _Validation:
        from raydefect.metrics import validation_summary

        image, pixel = val.image.compute(), val.pixel.compute()
        arrays = val.image.arrays()
        metrics = validation_summary(image, pixel)
        thresholds = {
            "image": _finite_threshold(metrics["val_image_threshold"]),
            "pixel": _finite_threshold(metrics["val_pixel_threshold"]),
        }
        return cls(image, pixel, arrays, metrics, thresholds)


def _plot_training_curves(run_dir: Path, plots_dir: Path, cfg: Config, epoch: int, plots: dict[str, Path]) -> None:
    from raydefect.viz.plots import plot_training_curves

    metrics_csv = run_dir / METRICS_FILE
    if metrics_csv.is_file():
        plots["training_curves"] = plot_training_curves(
            metrics_csv,
            plots_dir / "training_curves.png",
            title=f"Training: {run_dir.name}",
            best_epoch=epoch,
            best_metric=cfg.schedule.metric,
        )


def export_run(
    run_dir: str | Path,
    checkpoint_dir: str | Path,
    cfg: Config,
    dataset: Dataset,
    *,
    device: str = "auto",
    extra: dict[str, Any] | None = None,
) -> ExportResult:
    """The best checkpoint -> ``run_dir/model`` (thresholds chosen on val), test metrics, plots.

    The validation split is scored again with the exported weights, on this device, so the stored thresholds and
    validation metrics describe exactly the artifact; the test split is then scored with those thresholds.
    """
    from raydefect.engine.checkpoint import read_state
    from raydefect.engine.data import manifest_rows
    from raydefect.inference.device import resolve_device
    from raydefect.metrics.common import json_safe
    from raydefect.models.artifact import VALIDATION_SCORES_FILE, save_artifact
    from raydefect.models.retarget import validation_scores_csv
    from raydefect.viz.plots import write_metric_plots

    run_dir = Path(run_dir)
    state = read_state(checkpoint_dir)
    torch_device = resolve_device(device)
    geometry = Geometry.from_data_config(cfg.data)
    model, score = _split_scorer(checkpoint_dir, cfg, dataset, geometry, torch_device)
    val_rows = manifest_rows(dataset, "val")
    val = _Validation.of(score(val_rows, 0.5))
    thresholds = val.thresholds
    plots: dict[str, Path] = {}
    plots_dir = run_dir / PLOTS_DIR
    for name, path in write_metric_plots(plots_dir / "val", val.image, val.pixel).items():
        plots[f"val_{name}"] = path

    test_metrics, test_payload = _score_test_split(score, dataset, thresholds, state.epoch, plots_dir, plots)
    test_path = None
    stats_rows = manifest_rows(dataset, "train", required=False) + val_rows
    reference = validation_reference(val.arrays["scores"], thresholds["image"], stats_rows, cfg, geometry)
    meta = save_artifact(
        model,
        run_dir / MODEL_DIR,
        thresholds=thresholds,
        metrics={**val.metrics, **test_metrics, "epoch": state.epoch},
        extra={
            "run": run_dir.name,
            "dataset": str(dataset.root),
            "epoch": state.epoch,
            "thresholds_chosen": thresholds_chosen(val.image, val.pixel),
            **(extra or {}),
        },
        reference=reference.to_dict(),
        extra_files={VALIDATION_SCORES_FILE: validation_scores_csv(val.arrays["scores"], val.arrays["labels"])},
    )
    if test_payload is not None:
        test_payload["model_id"] = meta.model_id
        test_path = write_text_atomic(run_dir / TEST_METRICS_FILE, json.dumps(json_safe(test_payload), indent=2))
    _plot_training_curves(run_dir, plots_dir, cfg, state.epoch, plots)
    return ExportResult(
        model_dir=run_dir / MODEL_DIR,
        model_id=meta.model_id,
        epoch=state.epoch,
        thresholds=thresholds,
        val_metrics=val.metrics,
        test_metrics=test_metrics,
        test_metrics_path=test_path,
        plots=plots,
    )


DAMAGED_DIR = "damaged"


def set_aside_damaged_checkpoints(run_dir: str | Path) -> list[str]:
    """Validate the run's checkpoints newest first; move each damaged one to ``<run>/damaged/`` (kept for a look,
    never resumed from) until a good one is found. Returns one warning per checkpoint moved, naming it and why."""
    from raydefect.engine.checkpoint import validate_checkpoint
    from raydefect.errors import ArtifactError

    run_dir = Path(run_dir)
    warnings = []
    for epoch, folder in sorted(list_checkpoints(run_dir).items(), reverse=True):
        try:
            validate_checkpoint(folder)
            break
        except ArtifactError as e:
            dest = run_dir / DAMAGED_DIR / folder.name
            if dest.exists():
                shutil.rmtree(dest)
            dest.parent.mkdir(exist_ok=True)
            os.replace(folder, dest)
            warnings.append(f"checkpoint {folder} (epoch {epoch}) is damaged: {e}; moved to {dest}")
    return warnings
