"""Compact training stores (rcnn_cli.compact) and the bounded head sample (rcnn_cli.head)."""
from __future__ import annotations

import numpy as np
import pytest

from rcnn_cli import compact, config
from rcnn_cli.boxes import box_iou
from rcnn_cli.head import collect_windows

TRAIN = {"keep": "train", "keep_near_iou": 0.1, "keep_background": 5, "keep_seed": 0}


def _image(seed: int = 0, n_far: int = 60):
    """Two ground-truth boxes (rows 0-1), proposals at known IoU (0.5, 0.2, 0.1 exactly,
    0.05) with the first, and ``n_far`` windows far from both."""
    rng = np.random.default_rng(seed)
    gt = np.array([[0, 0, 100, 100], [300, 300, 340, 340]], np.float32)
    near = np.array([[0, 0, 100, 50],     # IoU 0.5
                     [0, 0, 100, 20],     # IoU 0.2
                     [0, 0, 100, 10],     # IoU 0.1 exactly: kept (>=)
                     [0, 0, 100, 5]],     # IoU 0.05: background
                    np.float32)
    xy = rng.uniform(120, 250, (n_far, 2)).astype(np.float32)
    far = np.concatenate([xy, xy + 30], 1)
    boxes = np.concatenate([gt, near, far])
    gt_label = np.r_[[0, 1], -np.ones(len(near) + n_far)].astype(np.int32)
    return boxes, gt_label, gt


def test_select_rows_keeps_every_gt_and_near_window_and_a_sized_sample():
    boxes, gt_label, gt = _image()
    idx = compact.select_rows(boxes, gt_label, gt, 0.1, 5, np.random.default_rng(0))
    assert (np.diff(idx) > 0).all()  # sorted, no duplicates
    kept = set(idx.tolist())
    assert {0, 1, 2, 3, 4} <= kept  # ground truth, IoU 0.5, 0.2 and exactly 0.1
    max_iou = box_iou(boxes, gt).max(1)
    near = set(np.flatnonzero(max_iou >= 0.1).tolist())
    assert near <= kept
    background = kept - near
    assert len(background) == 5 and all(max_iou[i] < 0.1 for i in background)
    # fewer candidates than asked: all of them
    idx = compact.select_rows(boxes, gt_label, gt, 0.1, 10**6, np.random.default_rng(0))
    assert len(idx) == len(boxes)
    # no ground truth (an image without objects): only the background sample
    idx = compact.select_rows(boxes[2:], gt_label[2:], np.zeros((0, 4), np.float32), 0.1, 7,
                              np.random.default_rng(0))
    assert len(idx) == 7


def test_background_sample_is_seeded_by_seed_and_image_not_by_order():
    boxes, gt_label, gt = _image()
    s = compact.keep_settings(TRAIN, annotated=True)
    a = compact.compact_rows(s, "x/a.jpg", boxes, gt_label, gt)
    compact.compact_rows(s, "x/b.jpg", boxes, gt_label, gt)  # another image in between
    assert np.array_equal(a, compact.compact_rows(s, "x/a.jpg", boxes, gt_label, gt))
    others = [compact.compact_rows(s, "x/b.jpg", boxes, gt_label, gt),
              compact.compact_rows({**s, "seed": 1}, "x/a.jpg", boxes, gt_label, gt)]
    assert all(not np.array_equal(a, o) for o in others)


def test_compact_record_records_what_it_kept():
    boxes, gt_label, gt = _image()
    rng = np.random.default_rng(1)
    full = {"boxes": boxes, "features": rng.normal(size=(len(boxes), 6)).astype(np.float16),
            "gt_label": gt_label, "gt_boxes": gt, "gt_labels": np.array([0, 1]),
            "gt_difficult": np.zeros(2, bool), "image_size": np.array([400, 400])}
    s = compact.keep_settings(TRAIN, annotated=True)
    rec = compact.compact_record(full, s, "a.jpg")
    idx = rec["kept_rows"]
    assert int(rec["num_windows"]) == len(boxes) and len(idx) == 2 + 3 + 5
    for k in ("boxes", "features", "gt_label"):
        assert np.array_equal(rec[k], full[k][idx])
    assert rec["gt_boxes"] is full["gt_boxes"]
    assert compact.compact_record(full, {"keep": "all"}, "a.jpg").keys() == full.keys()


def test_keep_settings():
    assert compact.keep_settings({**TRAIN, "keep": "all"}, annotated=True) == {"keep": "all"}
    assert compact.keep_settings(TRAIN, annotated=False) == {"keep": "all"}  # no ground truth
    assert compact.keep_settings(TRAIN, annotated=True) == {
        "keep": "train", "near_iou": 0.1, "background": 5, "seed": 0}
    with pytest.raises(ValueError, match="extract.keep"):
        compact.keep_settings({**TRAIN, "keep": "some"}, annotated=True)


def test_keep_near_iou_zero_follows_the_dataset_size():
    """keep_near_iou = 0 (the default): 0.1 up to AUTO_MAX_IMAGES annotated images, 0.3
    above; a set value is used as it is, whatever the size."""
    auto = {**TRAIN, "keep_near_iou": 0.0}
    n = compact.AUTO_MAX_IMAGES
    assert compact.keep_settings(auto, annotated=True, images=1)["near_iou"] == 0.1
    assert compact.keep_settings(auto, annotated=True, images=n)["near_iou"] == 0.1
    assert compact.keep_settings(auto, annotated=True, images=n + 1)["near_iou"] == 0.3
    assert compact.keep_settings(TRAIN, annotated=True, images=n + 1)["near_iou"] == 0.1
    with pytest.raises(ValueError, match="images="):  # never resolved without the size
        compact.keep_settings(auto, annotated=True)
    assert compact.keep_settings(auto, annotated=False) == {"keep": "all"}
    assert config.default("extract.keep_near_iou") == 0.0
    assert config.check_value("extract.keep_near_iou", 0.0) is None
    assert config.check_value("extract.keep_near_iou", -0.1) is not None


def _window_records(n_images: int, seed: int = 0):
    """Records with 1 ground-truth box, 3 foreground and 20 background windows each."""
    rng = np.random.default_rng(seed)
    recs = []
    for _ in range(n_images):
        gt = np.array([[20, 20, 60, 60]], np.float32)
        fg = gt + rng.uniform(-1, 1, (3, 4)).astype(np.float32)
        xy = rng.uniform(70, 150, (20, 2)).astype(np.float32)
        boxes = np.concatenate([gt, fg, np.concatenate([xy, xy + 20], 1)])
        recs.append({"boxes": boxes, "features": rng.normal(size=(len(boxes), 4)),
                     "gt_label": np.r_[0, -np.ones(23)].astype(np.int32), "gt_boxes": gt,
                     "gt_labels": np.array([0])})
    return recs


def test_head_windows_are_bounded_and_unchanged_under_the_bound():
    recs = _window_records(50)
    x, y, n = collect_windows(lambda: iter(recs), 1, bg_per_image=100, seed=0)
    assert n == 50 and (y > 0).sum() == 200 and (y == 0).sum() == 1000
    x2, y2, _ = collect_windows(lambda: iter(recs), 1, bg_per_image=100, seed=0,
                                max_fg=10**6, max_bg=10**6)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    xb, yb, _ = collect_windows(lambda: iter(recs), 1, bg_per_image=100, seed=0,
                                max_fg=30, max_bg=70)
    assert (yb > 0).sum() == 30 and (yb == 0).sum() == 70 and len(xb) == 100
    # a sample of the rows seen, not the first images' rows
    rows = {r.tobytes() for r in x}
    assert all(r.tobytes() in rows for r in xb)
    assert not np.array_equal(xb[yb == 0], x[y == 0][:70])
    xc, _, _ = collect_windows(lambda: iter(recs), 1, bg_per_image=100, seed=0,
                               max_fg=30, max_bg=70)
    assert np.array_equal(xb, xc)  # seeded


def test_head_windows_merged_into_blocks_are_the_same(monkeypatch):
    from rcnn_cli import head

    recs = _window_records(50)
    for bounds in ({}, {"max_fg": 30, "max_bg": 70}):
        ref = collect_windows(lambda: iter(recs), 1, bg_per_image=100, seed=0, **bounds)
        monkeypatch.setattr(head, "BLOCK_ROWS", 50)  # a block every ~2 images
        got = collect_windows(lambda: iter(recs), 1, bg_per_image=100, seed=0, **bounds)
        monkeypatch.undo()
        assert all(np.array_equal(a, b) for a, b in zip(ref, got))
