"""Overlay pictures: layout and size, the mask fill and contour where the mask is, labels, display scaling."""

from __future__ import annotations

import numpy as np
import pytest

from raydefect.viz.overlay import (
    DEFECT_COLOURS,
    NORMAL_COLOUR,
    TRUTH_COLOUR,
    class_colour,
    display_scale,
    mask_edge,
    render_overlay,
)

RED = (255, 0, 0)


def _scene(h: int = 256, w: int = 320) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((h, w, 3), 90, np.uint8)
    mask = np.zeros((h, w), bool)
    mask[150:200, 200:280] = True  # away from the label box in the top-left corner
    return image, mask


def test_mask_edge_is_the_inner_boundary():
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    edge = mask_edge(mask)
    ring = mask.copy()
    ring[3:6, 3:6] = False
    assert np.array_equal(edge, ring)
    assert np.array_equal(mask_edge(mask, width=2), mask & ~np.pad(np.ones((1, 1), bool), 4))
    full = np.ones((4, 5), bool)  # the border of the picture closes a mask that touches it
    assert mask_edge(full).sum() == 4 * 5 - 2 * 3
    assert not mask_edge(np.zeros((3, 3), bool)).any()


def test_side_by_side_at_the_image_resolution():
    image, mask = _scene()
    out = render_overlay(image, mask, 0.87, "scratch", colour=RED)
    assert out.shape == (256, 640, 3) and out.dtype == np.uint8
    left, right = out[:, :320], out[:, 320:]
    assert np.array_equal(left[100:], image[100:])  # the original, untouched below the label area
    inside = right[160:190, 210:270]  # fill: 45% red over grey 90
    assert np.all(inside[..., 0] == round(0.55 * 90 + 0.45 * 255)) and np.all(inside[..., 1] == round(0.55 * 90))
    edge = mask_edge(mask)
    assert np.all(right[edge] == RED)  # the contour, in the class colour
    outside = ~mask
    outside[:60] = False  # label box
    outside[:, 0] = False  # separator line
    assert np.array_equal(right[outside], image[outside])
    assert not np.array_equal(right[:40, :200], image[:40, :200])  # the label box is drawn


def test_truth_outline_and_note_on_the_left():
    image, mask = _scene()
    truth = np.zeros_like(mask)
    truth[120:180, 100:150] = True
    out = render_overlay(image, mask, 0.5, "spot", true_mask=truth, true_text="truth: spot", note="IoU 0.000")
    left = out[:, :320]
    assert np.all(left[mask_edge(truth)] == TRUTH_COLOUR)
    assert np.array_equal(left[200:, :], image[200:, :])  # nothing below the outline changes


def test_small_images_are_enlarged_by_an_integer_factor():
    image, mask = np.zeros((64, 48, 3), np.uint8), np.zeros((64, 48), bool)
    mask[10:20, 10:20] = True
    out = render_overlay(image, mask, 0.1, "normal", colour=NORMAL_COLOUR)
    scale = display_scale(64, 48)
    assert scale == 5.0 and out.shape == (64 * 5, 2 * 48 * 5, 3)
    assert np.all(out[60:90, 48 * 5 + 60 : 48 * 5 + 90] != 0)  # the 10x10 mask became 50x50 px, nearest
    exact = render_overlay(image, mask, None, "x", scale=1)
    assert exact.shape == (64, 96, 3)
    gray = render_overlay(np.zeros((300, 300), np.uint8), None, None, "no mask")
    assert gray.shape == (300, 600, 3)


def test_huge_images_are_shrunk_and_strips_stay_reasonable():
    assert display_scale(3000, 4000) == pytest.approx(1600 / 4000)
    assert display_scale(16, 2000) == 1.0  # a thin strip is not enlarged past the long-side limit
    assert display_scale(256, 256) == 1.0


def test_long_labels_are_shrunk_to_fit():
    image, mask = _scene(64, 64)
    out = render_overlay(image, mask, 0.99, "a_very_long_defect_class_name_" * 4, scale=1)
    assert out.shape == (64, 128, 3)


def test_colours_and_bad_input():
    assert class_colour(0) == NORMAL_COLOUR and class_colour(1) == DEFECT_COLOURS[0]
    assert class_colour(len(DEFECT_COLOURS) + 1) == DEFECT_COLOURS[0]
    assert len(set(DEFECT_COLOURS)) == len(DEFECT_COLOURS)
    image, mask = _scene()
    with pytest.raises(ValueError, match="resize it first"):
        render_overlay(image, mask[:10], 0.5, "x")
    with pytest.raises(ValueError, match="uint8"):
        render_overlay(image.astype(np.float32), mask, 0.5, "x")


@pytest.mark.parametrize("where", ["top_left", "top_right"])
def test_the_label_sits_off_the_mask(where):
    """The label box always sat in the top left corner, over a mask there (a defect near the corner was hidden by
    the text describing it). Every mask pixel keeps its fill or contour colour; the box moves to a free corner."""
    image = np.full((256, 320, 3), 90, np.uint8)
    mask = np.zeros((256, 320), bool)
    if where == "top_left":
        mask[0:90, 0:200] = True
    else:
        mask[0:90, 120:320] = True
    out = render_overlay(image, mask, 0.87, "a rather long class name", colour=RED)
    right = out[:, 320:]
    fill = np.array([round(0.55 * 90 + 0.45 * 255), round(0.55 * 90), round(0.55 * 90)])
    m = mask.copy()
    m[:, 0] = False  # the panel separator line
    drawn = right[m]
    assert np.all(np.all(drawn == fill, axis=1) | np.all(drawn == RED, axis=1))  # nothing covers the mask
    dark = np.all(right < 60, axis=2)  # the label box (black at 2/3 over grey 90, white text)
    assert dark.sum() > 500 and not (dark & mask).any()
    ys, _ = np.nonzero(dark)
    assert ys.min() > 90  # the free corners are below the mask
