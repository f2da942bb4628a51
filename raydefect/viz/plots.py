"""Report plots as PNG files: PR, ROC and PRO curves, confusion matrix, IoU histogram, training curves.

Engineers decide from pictures, so each plot has a title, labelled axes and the headline number (AP, AUROC,
AUPRO) in its legend. Figures are built with matplotlib's object API and rendered by Agg straight to the file:
no pyplot, no display, no global backend state (safe in Ray workers and threads). Every function is
`plot_x(..., path) -> Path` and creates the parent folder.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from raydefect.console import format_number
from raydefect.errors import DataError, OutputError

_DPI = 120
_NAVY = "#1f4e79"
_ORANGE = "#d9531e"
_GREY = "#888888"
#: Validation columns plotted by `plot_training_curves` when present (the names of metrics.validation_summary).
DEFAULT_CURVE_METRICS = ("val_score", "val_f1", "val_auroc", "val_ap", "val_dice", "val_iou", "val_aupro")


def new_figure(width: float = 6.0, height: float = 5.0) -> Figure:
    """A figure drawn off-screen (Agg) without pyplot's global state: safe in threads and worker processes."""
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """`fig` as a PNG at `path` (folders created); a failure is one `OutputError` naming the file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.15)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the plot ({exc.strerror or exc}); choose a writable --out") from exc
    return path


def _finite_curve(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def draw_undefined(ax: Any, why: str) -> None:
    """Say inside the axes why a plot is empty (one class only, no images) rather than draw nothing."""
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color=_GREY, wrap=True)


def _unit_axes(ax: Any, xlabel: str, ylabel: str, title: str, xmax: float = 1.0) -> None:
    ax.set_xlim(0.0, xmax)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)


def plot_pr_curve(
    recall: Any,
    precision: Any,
    path: str | Path,
    *,
    ap: float | None = None,
    prevalence: float | None = None,
    operating_point: tuple[float, float] | None = None,
    operating_label: str = "threshold",
    title: str = "Precision-recall curve",
) -> Path:
    """PR curve as a step plot (the curve AP sums), with the no-skill line at the defect prevalence and the
    operating point (recall, precision) of the chosen threshold."""
    fig = new_figure()
    ax = fig.add_subplot()
    r, p = _finite_curve(recall, precision)
    if r.size > 1:
        ax.step(r, p, where="pre", color=_NAVY, lw=2, label=f"model (AP = {format_number(ap)})")
        if prevalence is not None and math.isfinite(prevalence):
            ax.axhline(prevalence, color=_GREY, ls="--", lw=1, label=f"no skill (prevalence {prevalence:.3f})")
        if operating_point is not None:
            ax.plot(*operating_point, "o", color=_ORANGE, ms=8, label=operating_label)
        ax.legend(loc="lower left")
    else:
        draw_undefined(ax, "PR curve undefined:\nonly one class in the data")
    _unit_axes(ax, "Recall", "Precision", title)
    return save_figure(fig, path)


def plot_roc_curve(
    fpr: Any,
    tpr: Any,
    path: str | Path,
    *,
    auroc: float | None = None,
    operating_point: tuple[float, float] | None = None,
    operating_label: str = "threshold",
    title: str = "ROC curve",
) -> Path:
    """ROC curve with the chance diagonal and the operating point (FPR, TPR) of the chosen threshold."""
    fig = new_figure()
    ax = fig.add_subplot()
    x, y = _finite_curve(fpr, tpr)
    if x.size > 1:
        ax.plot(x, y, color=_NAVY, lw=2, label=f"model (AUROC = {format_number(auroc)})")
        ax.plot([0, 1], [0, 1], color=_GREY, ls="--", lw=1, label="chance (AUROC = 0.5)")
        if operating_point is not None:
            ax.plot(*operating_point, "o", color=_ORANGE, ms=8, label=operating_label)
        ax.legend(loc="lower right")
    else:
        draw_undefined(ax, "ROC curve undefined:\nonly one class in the data")
    _unit_axes(ax, "False positive rate", "True positive rate (recall)", title)
    return save_figure(fig, path)


def plot_pro_curve(
    fpr: Any,
    pro: Any,
    path: str | Path,
    *,
    aupro: float | None = None,
    fpr_limit: float = 0.3,
    title: str = "Per-region overlap (PRO) curve",
) -> Path:
    """PRO curve up to the AUPRO integration limit, with the integrated area shaded."""
    fig = new_figure()
    ax = fig.add_subplot()
    x, y = _finite_curve(fpr, pro)
    if x.size > 1:
        shown = x <= fpr_limit
        y_at = float(np.interp(fpr_limit, x, y))
        xs, ys = np.r_[x[shown], fpr_limit], np.r_[y[shown], y_at]
        ax.plot(xs, ys, color=_NAVY, lw=2, label=f"model (AUPRO@{fpr_limit:g} = {format_number(aupro)})")
        ax.fill_between(xs, ys, color=_NAVY, alpha=0.12)
        ax.legend(loc="lower right")
    else:
        draw_undefined(ax, "PRO curve undefined:\nno defect regions or no normal pixels")
    _unit_axes(ax, "False positive rate (normal pixels)", "Mean per-region overlap", title, xmax=fpr_limit)
    return save_figure(fig, path)


def plot_confusion_matrix(
    matrix: Any, class_names: Sequence[str], path: str | Path, *, title: str = "Confusion matrix"
) -> Path:
    """Counts per (true, predicted) class with the row percentage; colour = share of the true class."""
    m = np.asarray(matrix, dtype=np.int64)
    n = m.shape[0]
    if m.shape != (n, n) or len(class_names) != n:
        raise ValueError(f"confusion matrix {m.shape} does not match {len(class_names)} class names")
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros(m.shape, np.float64), where=rows > 0)
    side = min(max(4.5, 1.1 * n + 2.5), 16.0)
    fig = new_figure(side, side * 0.9)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    size = 11 if n <= 6 else 8 if n <= 12 else 7
    for i in range(n):
        for j in range(n):
            pct = f"\n{100 * share[i, j]:.0f}%" if rows[i, 0] else ""
            colour = "white" if share[i, j] > 0.55 else "black"
            ax.text(j, i, f"{m[i, j]}{pct}", ha="center", va="center", color=colour, fontsize=size)
    ax.set_xticks(range(n), labels=list(class_names), rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(f"{title}, N = {int(m.sum())}")
    return save_figure(fig, path)


def plot_iou_histogram(
    ious: Any,
    path: str | Path,
    *,
    has_defect: Any = None,
    threshold: float | None = None,
    bins: int = 20,
    title: str = "Per-image IoU",
) -> Path:
    """Histogram of per-image IoU, defect images and normal images stacked, with their means marked."""
    values = np.asarray(ious, dtype=np.float64)
    defect = np.ones(values.shape, bool) if has_defect is None else np.asarray(has_defect, bool)
    if defect.shape != values.shape:
        raise ValueError(f"has_defect ({defect.size}) and ious ({values.size}) differ in length")
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    edges = np.linspace(0.0, 1.0, bins + 1)
    groups = [(values[defect], "defect images", _NAVY), (values[~defect], "normal images", "#9ecae1")]
    groups = [g for g in groups if g[0].size]
    if groups:
        ax.hist(
            [g[0] for g in groups],
            bins=edges,
            stacked=True,
            color=[g[2] for g in groups],
            label=[f"{g[1]} (n = {g[0].size}, mean {g[0].mean():.3f})" for g in groups],
            edgecolor="white",
        )
        for data, _, colour in groups:
            ax.axvline(float(data.mean()), color=colour, ls="--", lw=1.5)
        ax.legend(loc="upper center")
    else:
        draw_undefined(ax, "no images")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("IoU of predicted and true mask (both empty = 1)")
    ax.set_ylabel("Images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    where = f" at threshold {threshold:.3g}" if threshold is not None else ""
    ax.set_title(f"{title}{where}")
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_score_histogram(
    scores: Any,
    labels: Any,
    path: str | Path,
    *,
    threshold: float,
    recall_thresholds: Sequence[tuple[float, float]] = (),
    bins: int = 40,
) -> Path:
    """Defect scores of normal and of defect images (side by side, not stacked), the stored image threshold as a
    solid line and (target recall, threshold) pairs as dotted ones: where the operating point sits between them."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, bool)
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    edges = np.linspace(0.0, 1.0, bins + 1)
    groups = [(s[~y], "normal images", "#2e8b57"), (s[y], "defect images", "#b3261e")]
    for data, name, colour in groups:
        if data.size:
            ax.hist(data, bins=edges, color=colour, alpha=0.55, label=f"{name} (n = {data.size})", edgecolor="white")
    if not s.size:
        draw_undefined(ax, "no images")
    ax.axvline(threshold, color="black", lw=2, label=f"stored image threshold {threshold:.3g}")
    same: dict[float, list[float]] = {}  # few defect images: several targets share one threshold, one label
    for target, value in recall_thresholds:
        if math.isfinite(value):
            same.setdefault(value, []).append(target)
    for value, targets in same.items():
        ax.axvline(value, color=_GREY, ls=":", lw=1.5)
        text = "recall " + " / ".join(f"{t:g}" for t in targets)
        ax.annotate(text, xy=(value, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=7, rotation=90, va="top", color="#555555")  # fmt: skip
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("Defect score (score >= threshold: called defective)")
    ax.set_ylabel("Images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Defect scores of normal and defect images")
    ax.legend(loc="upper center", fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def _read_metrics_csv(path: Path) -> tuple[list[str], dict[str, np.ndarray], list[str]]:
    """Columns as float arrays (one row per epoch, the last row of a repeated epoch wins) plus the stage column."""
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the metrics file ({exc.strerror or exc})") from exc
    if not rows or "epoch" not in rows[0]:
        raise DataError(f"{path}: expected a CSV with a header including 'epoch' and one row per epoch")
    by_epoch: dict[float, dict[str, str]] = {}
    for row in rows:
        try:
            by_epoch[float(row["epoch"])] = row  # a resumed run may repeat an epoch: keep its last row
        except (TypeError, ValueError):
            continue
    ordered = [by_epoch[e] for e in sorted(by_epoch)]
    columns = list(rows[0])

    def number(text: str | None) -> float:
        try:
            return float(text) if text not in (None, "") else math.nan
        except ValueError:
            return math.nan

    data = {c: np.array([number(r.get(c)) for r in ordered]) for c in columns}
    stages = [str(r.get("stage", "") or "") for r in ordered]
    return columns, data, stages


def plot_training_curves(
    metrics_csv: str | Path,
    path: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    title: str | None = None,
    best_epoch: int | None = None,
    best_metric: str | None = None,
) -> Path:
    """Loss and validation metrics against epoch from a run's metrics.csv, stage changes marked.

    ``best_epoch``: the epoch the model was exported from, marked in every panel (a solid green line) and, when
    ``best_metric`` is a column, as a star on that metric's curve with its value.

    Reads columns `epoch` (required), every column whose name contains "loss", the `metrics` columns (default: the
    `DEFAULT_CURVE_METRICS` present) and, when present, `stage` (dashed lines where it changes) and `lr` (a third
    panel, log scale).
    """
    csv_path = Path(metrics_csv)
    columns, data, stages = _read_metrics_csv(csv_path)
    epoch = data["epoch"]
    loss_cols = [c for c in columns if "loss" in c.lower() and np.isfinite(data[c]).any()]
    wanted = list(metrics) if metrics is not None else [c for c in DEFAULT_CURVE_METRICS if c in data]
    missing = [c for c in wanted if c not in data]
    if missing:
        raise DataError(f"{csv_path}: no column {', '.join(missing)}; columns are {', '.join(columns)}")
    metric_cols = [c for c in wanted if np.isfinite(data[c]).any()]
    lr_cols = [c for c in columns if c.lower() == "lr" or c.lower().startswith("lr_")]
    lr_cols = [c for c in lr_cols if np.isfinite(data[c]).any() and (data[c] > 0).any()]
    panels = 2 + bool(lr_cols)
    fig = new_figure(7.5, 3.0 * panels + 0.5)
    axes = fig.subplots(panels, 1, sharex=True)
    # (x of the marker, stage name): a stage's first epoch; the line sits half an epoch before it.
    starts = [
        (float(epoch[i]) - (0.5 if i else 0.0), stages[i])
        for i in range(len(stages))
        if stages[i] and (i == 0 or stages[i] != stages[i - 1])
    ]
    boundaries = [x for x, _ in starts if x != epoch[0]]

    def draw(ax: Any, cols: list[str], ylabel: str, empty: str) -> None:
        for c in cols:
            ok = np.isfinite(data[c])
            ax.plot(epoch[ok], data[c][ok], marker="o", ms=3, lw=1.5, label=c)
        if cols:
            ax.legend(loc="best", fontsize=8)
        else:
            draw_undefined(ax, empty)
        for x in boundaries:
            ax.axvline(x, color=_GREY, ls="--", lw=1)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)

    draw(axes[0], loss_cols, "Loss", "no loss column")
    draw(axes[1], metric_cols, "Validation metric", "no validation metric column")
    if metric_cols:
        axes[1].set_ylim(-0.02, 1.02)
    if lr_cols:
        draw(axes[2], lr_cols, "Learning rate", "")
        axes[2].set_yscale("log")
    for x, stage in starts:
        axes[0].annotate(
            f"stage {stage}",
            xy=(x, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize=8,
            color="#555555",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85},
        )
    if best_epoch is not None:
        _mark_best(axes, data, best_epoch, best_metric)
    axes[-1].set_xlabel("Epoch")
    axes[0].set_title(title or f"Training curves: {csv_path.parent.name or csv_path.name}")
    return save_figure(fig, path)


#: The colour of the best epoch's marks in the training curves.
BEST_COLOUR = "#2e8b57"


def _mark_best(axes: Any, data: dict[str, np.ndarray], best_epoch: int, metric: str | None) -> None:
    """The exported (best) epoch: a line through every panel, and a labelled star on the metric that chose it."""
    for ax in axes:
        ax.axvline(best_epoch, color=BEST_COLOUR, lw=1.5, alpha=0.8, zorder=1)
    hit = np.flatnonzero(data["epoch"] == best_epoch)
    value = float(data[metric][hit[0]]) if metric in data and hit.size else math.nan
    label = f"best epoch {best_epoch}" + (f": {metric} {value:.3f}" if math.isfinite(value) else "")
    if math.isfinite(value):
        axes[1].plot([best_epoch], [value], marker="*", ms=14, color=BEST_COLOUR, zorder=4, ls="none", label=label)
        axes[1].legend(loc="best", fontsize=8)
    else:
        axes[1].annotate(label, xy=(best_epoch, 0.02), xycoords=("data", "axes fraction"), xytext=(4, 4),
                         textcoords="offset points", fontsize=8, color=BEST_COLOUR)  # fmt: skip


def write_metric_plots(out_dir: str | Path, image: Any = None, pixel: Any = None) -> dict[str, Path]:
    """Every metric plot of an evaluation into `out_dir`, from `ImageMetrics` and/or `PixelMetrics`.

    Files: pr_curve.png, roc_curve.png, confusion_matrix.png (image); pixel_roc_curve.png, pro_curve.png,
    iou_histogram.png (pixel). Returns {name: path}.
    """
    out = Path(out_dir)
    written: dict[str, Path] = {}
    if image is not None:
        at = image.at_threshold
        prevalence = image.n_defect / image.n_images if image.n_images else None
        label = f"threshold {at.threshold:.3g}"
        if image.curves.defined:
            written["pr_curve"] = plot_pr_curve(
                image.curves.pr_recall,
                image.curves.pr_precision,
                out / "pr_curve.png",
                ap=image.ap,
                prevalence=prevalence,
                operating_point=(at.recall, at.precision),
                operating_label=label,
                title="Precision-recall curve (image level)",
            )
            written["roc_curve"] = plot_roc_curve(
                image.curves.roc_fpr,
                image.curves.roc_tpr,
                out / "roc_curve.png",
                auroc=image.auroc,
                operating_point=(at.fp / max(at.fp + at.tn, 1), at.recall),
                operating_label=label,
                title="ROC curve (image level)",
            )
        else:
            written["pr_curve"] = plot_pr_curve([], [], out / "pr_curve.png", title="Precision-recall (image level)")
            written["roc_curve"] = plot_roc_curve([], [], out / "roc_curve.png", title="ROC curve (image level)")
        written["confusion_matrix"] = plot_confusion_matrix(
            image.confusion, image.class_names, out / "confusion_matrix.png", title=f"Confusion matrix at {label}"
        )
    if pixel is not None:
        c = pixel.curves
        written["pixel_roc_curve"] = plot_roc_curve(
            c.roc_fpr, c.roc_tpr, out / "pixel_roc_curve.png", auroc=pixel.pixel_auroc, title="ROC curve (pixel level)"
        )
        written["pro_curve"] = plot_pro_curve(
            c.pro_fpr, c.pro, out / "pro_curve.png", aupro=pixel.aupro, fpr_limit=pixel.fpr_limit
        )
        written["iou_histogram"] = plot_iou_histogram(
            pixel.per_image_iou,
            out / "iou_histogram.png",
            has_defect=pixel.per_image_has_defect,
            threshold=pixel.at_threshold.threshold,
        )
    return written
