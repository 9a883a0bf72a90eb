"""Tests of rcnn_cli.visualize on tiny synthetic images."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from rcnn_cli.visualize import GT_COLOR, class_color, draw_detections, line_thickness, save_image

NAMES = ["cat", "dog", "bird"]


def black(h=200, w=200):
    return np.zeros((h, w, 3), np.uint8)


def test_output_shape_dtype_and_input_untouched():
    img = black()
    out = draw_detections(img, [[10, 10, 50, 50]], [1], [0.93], NAMES)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not img.any()  # drawn on a copy
    assert out.any()


def test_box_edges_take_the_class_colour():
    # box [10, 10, 50, 50] covers pixel columns/rows 10..49; 200 px image -> 1 px outline
    assert line_thickness(200, 200) == 1
    out = draw_detections(black(), [[10, 10, 50, 50]], [1], [0.93], NAMES)
    col = class_color(1)
    for y, x in ((30, 10), (30, 49), (49, 30)):  # left, right, bottom edge
        assert tuple(out[y, x]) == col, (y, x)
    assert not out[35, 30].any() and not out[30, 52].any()  # inside and outside untouched


def test_label_has_filled_background_in_class_colour():
    out = draw_detections(black(), [[60, 100, 150, 180]], [0], [0.5], NAMES)
    is_col = (out == class_color(0)).all(2)
    ys, xs = np.nonzero(is_col[:100])  # the label sits above the top edge (row 100)
    assert xs.min() == 60 and 85 <= ys.min() < 100 and 80 < xs.max() < 150
    label = is_col[ys.min():100, 60:xs.max() + 1]
    assert 0.4 < label.mean() < 0.95  # filled background with text in another colour
    assert label[:, 0].all() and label[0].all()  # the background's left and top borders


def test_image_without_detections_is_unchanged():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = draw_detections(img, np.zeros((0, 4)), [], [], NAMES)
    np.testing.assert_array_equal(out, img)


def test_ground_truth_drawn_in_its_colour():
    out = draw_detections(black(), np.zeros((0, 4)), [], None, NAMES,
                          gt_boxes=[[20, 20, 80, 80]])
    assert tuple(out[50, 20]) == GT_COLOR


def test_class_colours_are_distinct():
    colours = [class_color(i) for i in range(40)]
    assert len(set(colours)) == 40
    assert all(all(0 <= v <= 255 for v in c) for c in colours)


def test_thickness_scales_with_image_size():
    assert line_thickness(2000, 3000) > line_thickness(375, 500) >= 1


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="image must be uint8"):
        draw_detections(np.zeros((10, 10, 3), np.float32), [], [], [], NAMES)
    with pytest.raises(ValueError, match="labels must be in"):
        draw_detections(black(), [[0, 0, 5, 5]], [3], [1.0], NAMES)
    with pytest.raises(ValueError, match="same length"):
        draw_detections(black(), [[0, 0, 5, 5]], [0, 1], [1.0], NAMES)


def test_save_image_writes_bgr_and_makes_parents(tmp_path):
    img = np.zeros((8, 6, 3), np.uint8)
    img[..., 0] = 255  # pure red in RGB
    path = save_image(tmp_path / "a" / "b" / "red.png", img)
    back = cv2.imread(str(path))
    assert back.shape == (8, 6, 3) and tuple(back[0, 0]) == (0, 0, 255)  # BGR on disk
    assert [p.name for p in path.parent.iterdir()] == ["red.png"]  # no temp file left
    with pytest.raises(ValueError, match="cannot encode"):
        save_image(tmp_path / "x.notanimage", img)
    with pytest.raises(ValueError, match="image must be uint8"):
        save_image(tmp_path / "x.png", img.astype(np.float32))


def test_label_goes_inside_a_box_at_the_top_edge():
    out = draw_detections(black(), [[10, 0, 100, 60]], [2], [0.9], NAMES)
    is_col = (out == class_color(2)).all(2)
    assert is_col[0:3, 10:30].all()  # label background from row 0, inside the box
    assert not is_col[:, :10].any()  # nothing left of the box
