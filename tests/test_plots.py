"""Plots: each writes a valid, non-blank PNG of a sane size; bad inputs give clear errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from raydefect.errors import DataError, OutputError
from raydefect.imaging import decode_image
from raydefect.metrics import image_metrics, pixel_metrics
from raydefect.viz.plots import (
    plot_confusion_matrix,
    plot_iou_histogram,
    plot_pr_curve,
    plot_pro_curve,
    plot_roc_curve,
    plot_training_curves,
    write_metric_plots,
)


def assert_png(path: Path, min_side: int = 300, max_side: int = 3000) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    image = decode_image(data, path=str(path))
    h, w = image.shape[:2]
    assert min_side <= h <= max_side and min_side <= w <= max_side, (h, w)
    assert image.std() > 5, "blank image"
    return image


@pytest.fixture(scope="module")
def results():
    rng = np.random.default_rng(0)
    ids = rng.choice(3, 80, p=[0.5, 0.3, 0.2])
    labels = (ids > 0).astype(int)
    scores = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1)
    probs = rng.dirichlet(np.ones(3), 80)
    probs[np.arange(80), ids] += 1
    probs /= probs.sum(1, keepdims=True)
    image = image_metrics(
        scores, labels, 0.5, class_probs=probs, class_ids=ids, class_names=["normal", "crack", "blowhole"]
    )
    probs_px, truths = [], []
    for i in range(10):
        t = np.zeros((24, 32), bool)
        if i % 2:
            t[5:12, 6:15] = True
        probs_px.append(np.clip(0.15 + 0.6 * t + rng.normal(0, 0.15, t.shape), 0, 1))
        truths.append(t)
    return image, pixel_metrics(probs_px, truths)


def test_write_metric_plots_writes_every_png(tmp_path, results):
    image, pixel = results
    written = write_metric_plots(tmp_path / "plots", image, pixel)
    assert set(written) == {
        "pr_curve",
        "roc_curve",
        "confusion_matrix",
        "pixel_roc_curve",
        "pro_curve",
        "iou_histogram",
    }
    for path in written.values():
        assert path.parent == tmp_path / "plots"
        assert_png(path)


def test_each_plot_function_returns_its_path(tmp_path, results):
    image, pixel = results
    c = image.curves
    out = [
        plot_pr_curve(c.pr_recall, c.pr_precision, tmp_path / "pr.png", ap=image.ap, prevalence=0.5),
        plot_roc_curve(c.roc_fpr, c.roc_tpr, tmp_path / "roc.png", auroc=image.auroc, operating_point=(0.1, 0.8)),
        plot_pro_curve(pixel.curves.pro_fpr, pixel.curves.pro, tmp_path / "pro.png", aupro=pixel.aupro),
        plot_confusion_matrix(image.confusion, image.class_names, tmp_path / "cm.png"),
        plot_iou_histogram(pixel.per_image_iou, tmp_path / "iou.png", has_defect=pixel.per_image_has_defect),
    ]
    assert out == [tmp_path / n for n in ("pr.png", "roc.png", "pro.png", "cm.png", "iou.png")]
    for path in out:
        assert_png(path)


def test_single_class_curves_still_render(tmp_path):
    image = image_metrics([0.1, 0.4, 0.7], [0, 0, 0])
    written = write_metric_plots(tmp_path, image)
    for path in written.values():
        assert_png(path)


def test_confusion_matrix_scales_to_many_classes(tmp_path):
    names = ["normal", *(f"defect class {i}" for i in range(1, 15))]
    matrix = np.random.default_rng(1).integers(0, 50, (15, 15))
    assert_png(plot_confusion_matrix(matrix, names, tmp_path / "cm.png"), max_side=2400)
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix(matrix, names[:3], tmp_path / "bad.png")


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_training_curves_from_metrics_csv(tmp_path):
    rows = []
    for epoch in range(1, 11):
        stage = 1 if epoch <= 3 else 2 if epoch <= 7 else 3
        rows.append(
            {"epoch": epoch, "stage": stage, "train_loss": 1 / epoch, "val_loss": 1.2 / epoch, "lr": 1e-3 / epoch,
             "val_f1": 0.5 + epoch / 25, "val_dice": "" if epoch == 1 else 0.3 + epoch / 20, "val_score": epoch / 10}
        )  # fmt: skip
    rows.insert(5, dict(rows[4], train_loss=9.9))  # a resumed run repeats epoch 5: the last row wins
    csv_path = _write_csv(tmp_path / "metrics.csv", rows)
    out = plot_training_curves(csv_path, tmp_path / "curves.png")
    assert_png(out)
    out2 = plot_training_curves(csv_path, tmp_path / "curves_f1.png", metrics=["val_f1"])
    assert_png(out2)
    with pytest.raises(DataError, match="val_nope"):
        plot_training_curves(csv_path, tmp_path / "x.png", metrics=["val_nope"])


def test_training_curves_need_an_epoch_column(tmp_path):
    csv_path = _write_csv(tmp_path / "metrics.csv", [{"step": 1, "train_loss": 0.5}])
    with pytest.raises(DataError, match="epoch"):
        plot_training_curves(csv_path, tmp_path / "x.png")
    with pytest.raises(DataError, match="cannot read"):
        plot_training_curves(tmp_path / "missing.csv", tmp_path / "x.png")


def test_unwritable_output_is_an_output_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write"):
        plot_roc_curve([0, 1], [0, 1], blocker / "roc.png", auroc=0.5)


def _captured(monkeypatch, module: str) -> list:
    """The figures `module` saves, kept for inspection (the PNG alone does not say where a line is)."""
    from raydefect.viz.plots import save_figure

    figures: list = []

    def keep(fig, path):
        figures.append(fig)
        return save_figure(fig, path)

    monkeypatch.setattr(f"{module}.save_figure", keep)
    return figures


def test_training_curves_mark_the_best_epoch(tmp_path, monkeypatch):
    rows = [{"epoch": e, "train_loss": 1 / e, "val_score": [0.2, 0.6, 0.9, 0.7][e - 1]} for e in range(1, 5)]
    figures = _captured(monkeypatch, "raydefect.viz.plots")
    csv_path = _write_csv(tmp_path / "metrics.csv", rows)
    assert_png(plot_training_curves(csv_path, tmp_path / "c.png", best_epoch=3, best_metric="val_score"))
    axes = figures[0].axes
    for ax in axes:  # a vertical line at epoch 3 in every panel
        assert any(list(line.get_xdata()) == [3, 3] for line in ax.get_lines())
    stars = [line for line in axes[1].get_lines() if line.get_marker() == "*"]
    assert len(stars) == 1 and list(stars[0].get_xdata()) == [3] and list(stars[0].get_ydata()) == [0.9]
    assert "best epoch 3: val_score 0.900" in [t.get_text() for t in axes[1].get_legend().get_texts()]


def test_tune_history_is_in_start_order_with_integer_ticks(tmp_path, monkeypatch):
    """Trials were plotted in id order under an axis that says start order, so the best-so-far line was wrong."""
    from raydefect.tuning.plots import plot_history
    from raydefect.tuning.study import TERMINATED, TrialRow

    rows = [  # ids in folder order; started t2, t0, t1
        TrialRow("t0", {}, TERMINATED, metric_best=0.5, epochs=2, started_at=200.0),
        TrialRow("t1", {}, TERMINATED, metric_best=0.7, epochs=2, started_at=300.0),
        TrialRow("t2", {}, TERMINATED, metric_best=0.9, epochs=2, started_at=100.0),
    ]
    figures = _captured(monkeypatch, "raydefect.tuning.plots")
    plot_history(rows, "val_score", "max", tmp_path / "h.png")
    ax = figures[0].axes[0]
    points = np.concatenate([c.get_offsets() for c in ax.collections if len(c.get_offsets())])
    assert sorted(map(tuple, points.tolist())) == [(1.0, 0.9), (2.0, 0.5), (3.0, 0.7)]
    (best,) = [line for line in ax.get_lines() if line.get_label() == "best so far"]
    assert list(best.get_ydata()) == [0.9, 0.9, 0.9]
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_score_histogram_labels_a_threshold_shared_by_several_recalls_once(tmp_path, monkeypatch):
    from raydefect.viz.plots import plot_score_histogram

    figures = _captured(monkeypatch, "raydefect.viz.plots")
    marks = [(0.9, 0.4), (0.95, 0.2), (0.99, 0.2), (0.999, 0.2)]
    plot_score_histogram([0.1, 0.2, 0.4, 0.8], [0, 1, 1, 1], tmp_path / "h.png", threshold=0.5, recall_thresholds=marks)
    texts = [t.get_text() for t in figures[0].axes[0].texts]
    assert sorted(texts) == ["recall 0.9", "recall 0.95 / 0.99 / 0.999"]
    assert any(list(line.get_xdata()) == [0.5, 0.5] for line in figures[0].axes[0].get_lines())  # stored threshold
