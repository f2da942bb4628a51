"""Metrics against hand-computed values and independent brute-force computations."""

from __future__ import annotations

import itertools
import json
import math
import pickle

import numpy as np
import pytest
import torch
from scipy import ndimage
from torchmetrics.functional.classification import binary_average_precision

from raydefect.metrics import (
    ImageMetricAccumulator,
    PixelMetricAccumulator,
    choose_image_threshold,
    choose_pixel_threshold,
    class_key,
    composite_score,
    image_metrics,
    mask_iou_dice,
    operating_point,
    pixel_metrics,
    validation_summary,
)

# ----------------------------------------------------------------------------------------------- references


def brute_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(defect outscores normal), ties 1/2, over every pair."""
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (pos.size * neg.size)


def brute_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """sum_n (R_n - R_{n-1}) P_n over distinct thresholds, each computed from scratch."""
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        called = scores >= t
        tp = int((called & (labels == 1)).sum())
        recall = tp / int(labels.sum())
        ap += (recall - prev_recall) * tp / int(called.sum())
        prev_recall = recall
    return ap


def exact_pixel_auroc(probs: list[np.ndarray], truths: list[np.ndarray]) -> float:
    """Mann-Whitney U over all pooled pixels (independent of the binned ROC)."""
    from scipy.stats import rankdata

    p = np.concatenate([x.ravel() for x in probs])
    t = np.concatenate([x.ravel() for x in truths]).astype(bool)
    ranks = rankdata(p)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def exact_aupro(probs: list[np.ndarray], truths: list[np.ndarray], limit: float = 0.3) -> float:
    """MVTec AD's definition written directly: at every distinct score, mean region overlap vs normal-pixel FPR."""
    regions, normals = [], []
    for p, t in zip(probs, truths, strict=True):
        lab, n = ndimage.label(t, structure=np.ones((3, 3), int))
        regions += [p[lab == k] for k in range(1, n + 1)]
        normals.append(p[~t.astype(bool)])
    normal = np.concatenate(normals)
    xs, ys = [0.0], [0.0]
    for thr in sorted(set(np.concatenate([x.ravel() for x in probs]).tolist()), reverse=True):
        xs.append(float((normal >= thr).mean()))
        ys.append(float(np.mean([(r >= thr).mean() for r in regions])))
    xs.append(1.0)
    ys.append(1.0)
    x, y = np.array(xs), np.array(ys)
    area = 0.0
    for i in range(1, len(x)):
        if x[i] <= limit:
            area += 0.5 * (y[i] + y[i - 1]) * (x[i] - x[i - 1])
        else:
            y_at = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
            area += 0.5 * (y[i - 1] + y_at) * (limit - x[i - 1])
            break
    return area / limit


# ----------------------------------------------------------------------------------------------- image level


def test_perfect_model_scores_one_everywhere():
    m = image_metrics([0.1, 0.2, 0.3, 0.7, 0.8, 0.9], [0, 0, 0, 1, 1, 1], 0.5)
    at = m.at_threshold
    assert (at.tp, at.fp, at.tn, at.fn) == (3, 0, 3, 0)
    assert at.accuracy == at.precision == at.recall == at.f1 == 1.0
    assert m.auroc == 1.0 and m.ap == 1.0
    assert m.best.value == pytest.approx(0.5)  # centre of the gap (0.3, 0.7]
    assert m.best.objective == 1.0 and not m.best.fallback
    assert m.confusion.tolist() == [[3, 0], [0, 3]]
    assert m.per_class_accuracy == {"normal": 1.0, "defect": 1.0}


def test_all_wrong_model_scores_zero():
    m = image_metrics([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0], 0.5)
    at = m.at_threshold
    assert (at.tp, at.fp, at.tn, at.fn) == (0, 2, 0, 2)
    assert at.accuracy == 0.0 and at.precision == 0.0 and at.recall == 0.0 and at.f1 == 0.0
    assert m.auroc == 0.0
    # PR points: (recall 0.5, precision 1/3) then (1, 2/4): AP = 0.5/3 + 0.5/2.
    assert m.ap == pytest.approx(5 / 12)
    # Best F1 here is calling everything a defect: 2*2 / (2*2 + 2) = 2/3, cut at the lowest score.
    assert m.best.value == 0.1 and m.best.objective == pytest.approx(2 / 3)


def test_nothing_called_defect_gives_precision_zero_not_nan():
    at = operating_point([0.1, 0.2, 0.3], [0, 1, 1], 0.9)
    assert at.precision == 0.0 and at.recall == 0.0 and at.f1 == 0.0


def test_all_tied_scores():
    m = image_metrics([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5)
    assert m.auroc == 0.5 and m.ap == 0.5
    assert m.best.value == 0.5 and m.best.objective == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(6))
def test_auroc_ap_match_brute_force_and_torchmetrics(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    labels[:2] = [0, 1]
    scores = np.round(rng.random(40) * 0.6 + 0.3 * labels, 1)  # coarse: many ties across classes
    m = image_metrics(scores, labels)
    assert m.auroc == pytest.approx(brute_auroc(scores, labels), abs=1e-12)
    assert m.ap == pytest.approx(brute_ap(scores, labels), abs=1e-12)
    tm_ap = float(binary_average_precision(torch.tensor(scores), torch.tensor(labels)))
    assert m.ap == pytest.approx(tm_ap, abs=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_best_threshold_is_f1_optimal_against_every_cut(seed):
    rng = np.random.default_rng(100 + seed)
    labels = rng.integers(0, 2, 30)
    labels[:2] = [0, 1]
    scores = np.round(rng.random(30), 2)
    best = choose_image_threshold(scores, labels)
    cuts = np.unique(scores)
    candidates = np.r_[cuts, (cuts[1:] + cuts[:-1]) / 2, cuts[-1] + 1]
    brute = max(operating_point(scores, labels, t).f1 for t in candidates)
    assert best.objective == pytest.approx(brute)
    assert operating_point(scores, labels, best.value).f1 == pytest.approx(brute)


def test_best_threshold_ties_go_to_the_lowest_run():
    # Ascending labels 1,0,0,1: calling all (F1 2/3) ties with calling only the top one (F1 2/3).
    best = choose_image_threshold([0.1, 0.2, 0.3, 0.4], [1, 0, 0, 1])
    assert best.value == 0.1 and best.objective == pytest.approx(2 / 3)
    # One winning cut: the centre of its gap (0.3, 0.6].
    best = choose_image_threshold([0.1, 0.3, 0.6, 0.9], [0, 0, 1, 1])
    assert best.value == pytest.approx(0.45)
    # Two adjacent winning cuts (all four called: F1 2/3; only 0.8 called: F1 2/3): the centre of [0.2, 0.8].
    best = choose_image_threshold([0.2, 0.2, 0.2, 0.8], [1, 0, 0, 1])
    assert best.value == pytest.approx(0.5) and best.objective == pytest.approx(2 / 3)
    assert operating_point([0.2, 0.2, 0.2, 0.8], [1, 0, 0, 1], best.value).f1 == pytest.approx(2 / 3)


@pytest.mark.parametrize(("labels", "which"), [([0, 0, 0], "no defect images"), ([1, 1], "no normal images")])
def test_single_class_gives_nan_and_flags_not_errors(labels, which):
    scores = np.linspace(0.2, 0.8, len(labels))
    m = image_metrics(scores, labels)
    assert math.isnan(m.auroc) and math.isnan(m.ap) and m.single_class
    assert m.best.fallback and m.best.value == 0.5 and which in m.best.reason
    assert any("undefined" in n for n in m.notes)
    assert not m.curves.defined
    json.dumps(m.to_dict(), allow_nan=False)  # NaN becomes null: strict JSON
    if which == "no defect images":
        assert math.isnan(m.at_threshold.recall) and math.isnan(m.at_threshold.f1)
        assert m.at_threshold.precision == 0.0  # the one image called a defect is a false alarm
    best = choose_image_threshold(scores, labels, fallback=0.7)
    assert best.fallback and best.value == 0.7


def test_no_images_at_all():
    m = ImageMetricAccumulator().compute()
    assert m.n_images == 0 and math.isnan(m.auroc) and math.isnan(m.at_threshold.accuracy)
    assert m.best.fallback


def test_multiclass_confusion_follows_the_score_threshold():
    names = ["normal", "crack", "hole"]
    #            normal ok     normal->hole  crack ok       crack missed   hole->crack    hole ok
    scores = [0.1, 0.9, 0.8, 0.2, 0.7, 0.95]
    ids = [0, 0, 1, 1, 2, 2]
    probs = [
        [0.9, 0.05, 0.05],
        [0.6, 0.1, 0.3],  # argmax is normal, but the score calls it a defect: the best defect class (hole) wins
        [0.1, 0.8, 0.1],
        [0.8, 0.15, 0.05],
        [0.2, 0.5, 0.3],
        [0.0, 0.1, 0.9],
    ]
    labels = [0, 0, 1, 1, 1, 1]
    m = image_metrics(scores, labels, 0.5, class_probs=probs, class_ids=ids, class_names=names)
    assert m.confusion.tolist() == [[1, 0, 1], [1, 1, 0], [0, 1, 1]]
    assert m.per_class_accuracy == {"normal": 0.5, "crack": 0.5, "hole": 0.5}
    assert m.class_accuracy == 0.5
    at = m.at_threshold
    assert (at.tp, at.fp, at.tn, at.fn) == (3, 1, 1, 1) and at.accuracy == pytest.approx(4 / 6)


def test_class_absent_from_split_is_nan_with_a_note():
    m = image_metrics(
        [0.1, 0.9], [0, 1], 0.5, class_probs=[[0.9, 0.1, 0.0], [0.1, 0.9, 0.0]], class_ids=[0, 1],
        class_names=["normal", "crack", "hole"],
    )  # fmt: skip
    assert math.isnan(m.per_class_accuracy["hole"]) and m.per_class_accuracy["crack"] == 1.0
    assert any("hole" in n for n in m.notes)


def test_class_inputs_are_checked():
    with pytest.raises(ValueError, match="disagree"):
        image_metrics([0.1, 0.9], [0, 0], class_probs=[[0.9, 0.1], [0.1, 0.9]], class_ids=[0, 1])
    with pytest.raises(ValueError, match="together"):
        image_metrics([0.1, 0.9], [0, 1], class_probs=[[0.9, 0.1], [0.1, 0.9]])
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        image_metrics([0.1, 0.9], [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        image_metrics([0.1, float("nan")], [0, 1])


def test_image_accumulator_batches_and_merge_equal_one_shot():
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 3, 50)
    labels = (ids > 0).astype(int)
    probs = rng.dirichlet(np.ones(3), 50)
    scores = 1 - probs[:, 0]
    names = ["normal", "a", "b"]
    one_shot = image_metrics(scores, labels, class_probs=probs, class_ids=ids, class_names=names)
    acc, other = ImageMetricAccumulator(names), ImageMetricAccumulator(names)
    for lo in range(0, 30, 7):
        acc.update(torch.tensor(scores[lo : min(lo + 7, 30)]), labels[lo : min(lo + 7, 30)],
                   probs[lo : min(lo + 7, 30)], ids[lo : min(lo + 7, 30)])  # fmt: skip
    other.update(scores[30:], labels[30:], torch.tensor(probs[30:]).to(torch.bfloat16), ids[30:])
    acc.merge(other)
    assert len(acc) == 50
    got = acc.compute()
    assert got.confusion.tolist() == one_shot.confusion.tolist()
    assert got.auroc == pytest.approx(one_shot.auroc) and got.ap == pytest.approx(one_shot.ap)
    assert got.best.value == pytest.approx(one_shot.best.value)
    with pytest.raises(ValueError, match="every batch"):
        acc.update([0.5], [1])


# ----------------------------------------------------------------------------------------------- pixel level


@pytest.mark.parametrize(
    ("pred", "truth", "expected"),
    [
        ([[0, 0], [0, 0]], [[0, 0], [0, 0]], (1.0, 1.0)),  # both empty: nothing to find, nothing claimed
        ([[0, 0], [0, 0]], [[1, 0], [0, 0]], (0.0, 0.0)),  # missed defect
        ([[1, 0], [0, 0]], [[0, 0], [0, 0]], (0.0, 0.0)),  # false mask on a normal image
        ([[1, 1, 0], [0, 0, 0]], [[0, 1, 1], [0, 1, 0]], (0.25, 0.4)),  # |P&T|=1, |P|=2, |T|=3
    ],
)
def test_mask_iou_dice_cases(pred, truth, expected):
    assert mask_iou_dice(np.array(pred), np.array(truth)) == pytest.approx(expected)


def test_perfect_segmentation_scores_one_everywhere():
    t1 = np.zeros((16, 16), bool)
    t1[2:5, 2:6] = True
    t1[10:14, 9:15] = True
    t2 = np.zeros((20, 12), bool)  # a normal image, other size
    m = pixel_metrics([t1.astype(float), t2.astype(float)], [t1, t2])
    for point in (m.at_threshold, m.at_best):
        assert point.iou == point.dice == point.iou_all == point.dice_all == 1.0
        assert point.precision == point.recall == point.f1 == 1.0
    assert m.pixel_auroc == 1.0 and m.pixel_ap == 1.0 and m.aupro == pytest.approx(1.0)
    assert m.n_regions == 2 and m.n_defect_images == 1 and m.n_images == 2
    assert m.best.value == pytest.approx(0.5)  # centre of the plateau of edges 0.001 .. 1.0
    assert m.per_image_iou.tolist() == [1.0, 1.0] and m.per_image_has_defect.tolist() == [True, False]


def test_all_wrong_segmentation():
    t = np.zeros((8, 8), bool)
    t[2:4, 2:4] = True
    m = pixel_metrics([(~t).astype(float)], [t])
    assert m.at_threshold.iou == 0.0 and m.at_threshold.dice == 0.0
    assert m.pixel_auroc == 0.0 and m.aupro == pytest.approx(0.0)


def test_empty_mask_cases_and_separate_means():
    sq = np.zeros((6, 6), bool)
    sq[1:3, 1:3] = True
    one_px = np.zeros((6, 6), bool)
    one_px[5, 5] = True
    none = np.zeros((6, 6), bool)
    probs = [sq, none, one_px, none, none]  # predicted masks
    truths = [sq, none, none, sq, None]  # None = normal image
    acc = PixelMetricAccumulator()
    ious, dices = acc.update([p.astype(np.float32) for p in probs], truths)
    assert ious.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0] and dices.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]
    m = acc.compute()
    assert m.at_threshold.iou == 0.5 and m.at_threshold.dice == 0.5  # defect images: exact, missed
    assert m.at_threshold.iou_all == pytest.approx(3 / 5)  # all images: the false pixel costs a whole image
    assert m.n_defect_images == 2 and m.n_images == 5


def test_aupro_weighs_regions_equally_unlike_pixel_recall():
    """Two regions of 4 and 16 pixels; the small one found entirely, the big one a quarter, at every FPR < 0.1.

    PRO = mean(1, 1/4) = 0.625 whereas pixel recall = 8/20 = 0.4; at FPR 0.1 the rest of B is found. Curve (0, 0),
    (0, .625), (.1, .625), (.1, 1), (1, 1): area to 0.3 = .1 * .625 + .2 * 1 = .2625 -> AUPRO .875 (pixel-recall
    version: .04 + .2 = .24 -> .8).
    """
    prob = np.zeros((10, 10))
    truth = np.zeros((10, 10), bool)
    truth[1:3, 1:3] = True  # region A, 4 px
    prob[1:3, 1:3] = 0.9
    truth[5:9, 5:9] = True  # region B, 16 px: 4 found at 0.9, 12 only at 0.3
    prob[5:9, 5:9] = 0.3
    prob[5:7, 5:7] = 0.9
    normal_idx = np.flatnonzero(~truth.ravel())[:8]  # 8 of 80 normal pixels at 0.6: FPR 0.1
    prob.ravel()[normal_idx] = 0.6
    m = pixel_metrics([prob], [truth])
    assert m.n_regions == 2
    assert m.aupro == pytest.approx(0.875, abs=1e-9)
    assert m.aupro == pytest.approx(exact_aupro([prob], [truth]), abs=1e-9)
    assert abs(m.aupro - 0.8) > 0.05  # an implementation computing pixel recall would give 0.8
    assert m.pixel_auroc == pytest.approx(exact_pixel_auroc([prob], [truth]), abs=1e-9)


def test_aupro_without_normal_pixel_false_alarms():
    """Same regions, no false alarm at all: PRO .625 from FPR 0 to 1 at threshold 0 (all pixels called): AUPRO
    = (.3 * (.625 + (.625 + .3 * .375))) / 2 / .3 = .68125 (pixel recall version .49)."""
    prob = np.zeros((10, 10))
    truth = np.zeros((10, 10), bool)
    truth[1:3, 1:3] = True
    prob[1:3, 1:3] = 0.9
    truth[5:9, 5:9] = True
    prob[5:7, 5:7] = 0.9
    m = pixel_metrics([prob], [truth])
    assert m.aupro == pytest.approx(0.68125, abs=1e-9)


def test_regions_use_8_connectivity_like_mvtec():
    truth = np.zeros((6, 6), bool)
    truth[1, 1] = truth[2, 2] = True  # diagonal neighbours: one region
    acc = PixelMetricAccumulator()
    acc.update([truth.astype(float)], [truth])
    assert acc.n_regions == 1
    acc4 = PixelMetricAccumulator(connectivity=4)
    acc4.update([truth.astype(float)], [truth])
    assert acc4.n_regions == 2


def _random_split(seed: int, quantum: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images of different sizes, some normal, blobs of different sizes, noisy probabilities."""
    rng = np.random.default_rng(seed)
    probs, truths = [], []
    for i in range(9):
        h, w = (int(v) for v in rng.integers(12, 30, 2))
        t = np.zeros((h, w), bool)
        if i % 3:
            for _ in range(int(rng.integers(1, 3))):
                y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
                t[y : y + int(rng.integers(1, 5)), x : x + int(rng.integers(1, 5))] = True
        p = np.clip(0.25 + 0.4 * t + rng.normal(0, 0.2, (h, w)), 0, 1)
        if quantum:
            p = np.round(p * quantum) / quantum
        probs.append(p)
        truths.append(t)
    return probs, truths


@pytest.mark.parametrize("seed", range(3))
def test_binned_metrics_exact_when_probabilities_sit_on_bin_edges(seed):
    probs, truths = _random_split(seed, quantum=50)
    m = pixel_metrics(probs, truths, num_bins=100)
    assert m.pixel_auroc == pytest.approx(exact_pixel_auroc(probs, truths), abs=1e-9)
    assert m.aupro == pytest.approx(exact_aupro(probs, truths), abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_binned_metrics_close_to_exact_for_continuous_probabilities(seed):
    probs, truths = _random_split(seed)
    m = pixel_metrics(probs, truths, num_bins=1000)
    assert m.pixel_auroc == pytest.approx(exact_pixel_auroc(probs, truths), abs=2e-3)
    assert m.aupro == pytest.approx(exact_aupro(probs, truths), abs=1e-2)
    # Per-image IoU/Dice at the fixed threshold are exact, whatever the bins.
    expected = [mask_iou_dice(p >= 0.5, t) for p, t in zip(probs, truths, strict=True)]
    assert m.per_image_iou.tolist() == pytest.approx([e[0] for e in expected])
    assert m.per_image_dice.tolist() == pytest.approx([e[1] for e in expected])
    defect = [e for e, t in zip(expected, truths, strict=True) if t.any()]
    assert m.at_threshold.dice == pytest.approx(np.mean([d for _, d in defect]))
    assert m.at_threshold.iou_all == pytest.approx(np.mean([i for i, _ in expected]))


def test_binned_mean_at_a_bin_edge_equals_the_exact_per_image_mean():
    probs, truths = _random_split(5)
    acc = PixelMetricAccumulator(threshold=0.4)
    acc.update(probs, truths)
    k = 400  # edge 0.4 with num_bins=1000
    assert acc.thresholds[k] == 0.4
    exact = acc.compute().at_threshold
    assert acc.binned_mean("dice", "defect")[k] == pytest.approx(exact.dice)
    assert acc.binned_mean("iou", "all")[k] == pytest.approx(exact.iou_all)


def _numbers(tree: object) -> list[float]:
    """Every number in a nested dict/list, in order (None as NaN), to compare results up to float summation order."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers(v)]
    if tree is None:
        return [math.nan]
    return [float(tree)] if isinstance(tree, (int, float)) else []


def test_streaming_batches_and_merge_equal_one_batch():
    probs, truths = _random_split(11)
    whole = pixel_metrics(probs, truths)
    streamed, other = PixelMetricAccumulator(), PixelMetricAccumulator()
    for i in range(0, 6, 2):
        streamed.update(probs[i : i + 2], truths[i : i + 2])
    for p, t in zip(probs[6:], truths[6:], strict=True):
        other.update(torch.tensor(p)[None, None], torch.tensor(t)[None])  # (1, 1, H, W) tensor batches
    streamed.merge(pickle.loads(pickle.dumps(other)))  # as it comes back from another worker
    got = streamed.compute()
    assert _numbers(got.to_dict()) == pytest.approx(_numbers(whole.to_dict()), abs=1e-12, nan_ok=True)
    assert got.best == whole.best
    assert got.per_image_iou.tolist() == whole.per_image_iou.tolist()
    with pytest.raises(ValueError, match="different settings"):
        streamed.merge(PixelMetricAccumulator(num_bins=500))


def test_best_pixel_threshold_on_a_separable_case():
    rng = np.random.default_rng(3)
    probs, truths = [], []
    for i in range(6):
        t = np.zeros((16, 16), bool)
        if i % 2:
            t[4:9, 3:12] = True
        probs.append(np.where(t, rng.uniform(0.7, 1.0, t.shape), rng.uniform(0.0, 0.3, t.shape)))
        truths.append(t)
    acc = PixelMetricAccumulator()
    acc.update(probs, truths)
    gap = (max(p[~t].max() for p, t in zip(probs, truths, strict=True)),
           min(p[t].min() for p, t in zip(probs, truths, strict=True) if t.any()))  # fmt: skip
    for criterion in ("dice", "dice_defect", "f1"):
        best = choose_pixel_threshold(acc, criterion)
        assert best.objective == pytest.approx(1.0) and not best.fallback
        assert gap[0] < best.value <= gap[1]
        assert best.value == pytest.approx(round(best.value * 1000) / 1000)  # a bin edge
    m = acc.compute()
    assert m.at_best.dice == 1.0 and m.at_best.dice_all == 1.0 and m.at_best.f1 == 1.0
    with pytest.raises(ValueError, match="criterion"):
        choose_pixel_threshold(acc, "iou")  # type: ignore[arg-type]


def test_pixel_criteria_differ_where_they_should():
    """A false blob on a normal image: "dice" (all images) raises the threshold above it, "dice_defect" ignores it."""
    t = np.zeros((10, 10), bool)
    t[2:6, 2:6] = True
    defect = np.where(t, 0.9, 0.0)
    defect[2:6, 2:4] = 0.4  # half the defect only reaches 0.4
    normal = np.zeros((10, 10))
    normal[0:2, 0:2] = 0.6  # a false blob at 0.6
    acc = PixelMetricAccumulator()
    acc.update([defect, normal], [t, None])
    assert choose_pixel_threshold(acc, "dice_defect").value <= 0.4  # cover the whole defect
    assert 0.6 < choose_pixel_threshold(acc, "dice").value <= 0.9  # keep the normal image clean


def test_no_defect_pixels_falls_back_without_crashing():
    m = pixel_metrics(np.random.default_rng(0).random((3, 8, 8)), None)
    assert math.isnan(m.pixel_auroc) and math.isnan(m.aupro) and math.isnan(m.at_threshold.dice)
    assert m.best.fallback and m.best.value == 0.5
    assert any("no defect pixels" in n for n in m.notes)
    json.dumps(m.to_dict(), allow_nan=False)


def test_pixel_inputs_are_checked():
    acc = PixelMetricAccumulator()
    with pytest.raises(ValueError, match="sigmoid"):
        acc.update(np.full((1, 4, 4), 3.0), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="resize"):
        acc.update([np.zeros((4, 4))], [np.zeros((4, 5))])
    with pytest.raises(ValueError, match="batch"):
        acc.update(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="2 true masks"):
        acc.update(np.zeros((1, 4, 4)), np.zeros((2, 4, 4)))
    assert acc.n_images == 0  # nothing half-added
    acc.update([np.full((4, 4), 1.0000001)], [np.full((4, 4), 255, np.uint8)])  # rounding noise and 0/255 masks
    assert acc.compute().at_threshold.iou == 1.0


# ----------------------------------------------------------------------------------------------- summary


def test_validation_summary_names_and_values():
    names = ["normal", "MT Blowhole", "MT_Crack"]
    image = ImageMetricAccumulator(names)
    image.update([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.2, 0.7, 0.1],
                 [0.1, 0.1, 0.8]], [0, 0, 1, 2])  # fmt: skip
    pixel = PixelMetricAccumulator()
    t = np.zeros((8, 8), bool)
    t[2:4, 2:6] = True
    pred = np.where(t, 0.9, 0.1)
    pred[2, 2:6] = 0.1  # half the defect missed at any threshold above 0.1: Dice 2*4/(4+8) = 2/3
    pixel.update([np.zeros((8, 8)), np.zeros((8, 8)), pred, pred], [None, None, t, t])
    s = validation_summary(image, pixel)
    expected = {
        "accuracy", "precision", "recall", "f1", "auroc", "ap", "class_accuracy", "acc_normal", "acc_mt_blowhole",
        "acc_mt_crack", "iou", "dice", "iou_all", "dice_all", "pixel_auroc", "pixel_ap", "aupro", "score",
        "image_threshold", "pixel_threshold", "image_threshold_fallback", "pixel_threshold_fallback",
    }  # fmt: skip
    assert set(s) == {f"val_{k}" for k in expected}
    assert all(isinstance(v, float) for v in s.values())
    assert s["val_f1"] == 1.0 and s["val_ap"] == 1.0 and s["val_acc_mt_crack"] == 1.0
    assert s["val_dice"] == pytest.approx(2 / 3)
    assert s["val_score"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert s["val_image_threshold"] == pytest.approx(0.5) and s["val_image_threshold_fallback"] == 0.0
    assert 0.1 < s["val_pixel_threshold"] <= 0.9 and s["val_pixel_threshold_fallback"] == 0.0


def test_validation_summary_with_stored_thresholds_and_prefix():
    image = ImageMetricAccumulator()
    image.update([0.1, 0.6, 0.8], [0, 1, 1])
    pixel = PixelMetricAccumulator(threshold=0.7)
    pixel.update([np.full((4, 4), 0.65)], [np.ones((4, 4))])
    s = validation_summary(image, pixel, prefix="test_", image_threshold=0.7, use_fixed_pixel_threshold=True)
    assert s["test_image_threshold"] == 0.7 and s["test_recall"] == 0.5
    assert s["test_pixel_threshold"] == 0.7 and s["test_dice"] == 0.0  # 0.65 < 0.7: nothing predicted


def test_validation_summary_survives_a_split_without_defects():
    image = ImageMetricAccumulator()
    image.update([0.1, 0.3], [0, 0])
    pixel = PixelMetricAccumulator()
    pixel.update(np.zeros((2, 4, 4)), None)
    s = validation_summary(image, pixel)
    assert math.isnan(s["val_ap"]) and math.isnan(s["val_dice"])
    assert s["val_score"] == 0.0
    assert s["val_image_threshold_fallback"] == 1.0 and s["val_pixel_threshold_fallback"] == 1.0
    assert validation_summary(image)["val_score"] == 0.0  # classification only


def test_composite_score_and_class_key():
    assert composite_score(0.8, 0.6) == pytest.approx(0.7)
    assert composite_score(float("nan"), 0.6) == 0.6
    assert composite_score(0.8, float("nan")) == 0.8
    taken: set[str] = set()
    assert class_key("MT Blowhole", taken) == "mt_blowhole"
    assert class_key("mt-blowhole", taken) == "mt_blowhole_2"
    assert class_key("???") == "class"
