"""Window labels for detection training (R-CNN ``window_data_layer``).

A *window* (a proposal or a ground-truth box) whose IoU with a ground truth is >= ``fg_iou``
takes that ground truth's class, any other is background; a window that reaches ``fg_iou``
only with VOC *difficult* objects is ignored. Fine-tuning (:mod:`rcnn_cli.finetune`) and the
fc head (:mod:`rcnn_cli.head`) label their windows with these rules.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from rcnn_cli import boxes as box_ops
from rcnn_cli.config import default

#: Windows with IoU >= this with a ground truth take its class (R-CNN window_data_layer
#: fg_threshold 0.5; everything below is background, bg_threshold 0.5).
FG_IOU: float = default("finetune.fg_iou")


def label_windows(gt_boxes: ArrayLike, gt_labels: ArrayLike, proposals: ArrayLike,
                  fg_iou: float = FG_IOU, gt_difficult: ArrayLike | None = None
                  ) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.float32]]:
    """Training windows of one image with their labels (R-CNN fine-tuning).

    Args:
        gt_boxes (NDArray[G, 4] float32): x1y1x2y2 ground truth.
        gt_labels (NDArray[G] int64): class index of each ground truth (0..K-1).
        proposals (NDArray[N, 4] float32): x1y1x2y2; boxes of zero area are dropped.
        fg_iou: IoU with a ground truth at which a window takes its class.
        gt_difficult (NDArray[G] bool): difficult objects are not windows themselves, and a
            window that reaches ``fg_iou`` only with difficult objects is ignored.
    Returns:
        (windows (M, 4) float32, labels (M,) int64, iou (M,) float32): the non-difficult
        ground-truth boxes first, then the proposals; label 0 = background, k + 1 = class k,
        -1 = ignored; ``iou`` = the largest IoU with a (non-difficult) ground truth.
    """
    gt, gl, diff = _ground_truth(gt_boxes, gt_labels, gt_difficult)
    props = box_ops.as_boxes(proposals)
    props = props[box_ops.valid_mask(props)]
    windows = np.concatenate([gt[~diff], props]).astype(np.float32)
    labels, iou_out = window_labels(windows, gt, gl, fg_iou, diff)
    return windows, labels, iou_out


def _ground_truth(gt_boxes: ArrayLike, gt_labels: ArrayLike, gt_difficult: ArrayLike | None
                  ) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.bool_]]:
    """Validated (boxes (G, 4), labels (G,), difficult (G,)); no ``difficult`` = all False."""
    gt = box_ops.as_boxes(gt_boxes)
    gl = np.asarray(gt_labels, np.int64).reshape(-1)
    if len(gl) != len(gt):
        raise ValueError(f"gt_labels must have shape ({len(gt)},), got {gl.shape}")
    diff = (np.zeros(len(gt), bool) if gt_difficult is None
            else np.asarray(gt_difficult, bool).reshape(-1))
    if len(diff) != len(gt):
        raise ValueError(f"gt_difficult must have shape ({len(gt)},), got {diff.shape}")
    return gt, gl, diff


def window_labels(windows: ArrayLike, gt_boxes: ArrayLike, gt_labels: ArrayLike,
                  fg_iou: float = FG_IOU, gt_difficult: ArrayLike | None = None
                  ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Labels (M,) (0 background, k + 1 class k, -1 ignored) and best IoU (M,) with a
    non-difficult ground truth of given windows (M, 4); the rules of :func:`label_windows`."""
    windows = box_ops.as_boxes(windows)
    gt, gl, diff = _ground_truth(gt_boxes, gt_labels, gt_difficult)
    labels = np.zeros(len(windows), np.int64)
    iou_out = np.zeros(len(windows), np.float32)
    if len(gt) == 0 or len(windows) == 0:
        return labels, iou_out
    iou = box_ops.box_iou(windows, gt)  # (M, G)
    easy = iou[:, ~diff]
    if easy.shape[1]:
        best = easy.argmax(1)
        iou_out = easy[np.arange(len(windows)), best]
        fg = iou_out >= fg_iou
        labels[fg] = gl[~diff][best[fg]] + 1
    if diff.any():
        labels[(labels == 0) & (iou[:, diff].max(1) >= fg_iou)] = -1
    return labels, iou_out
