"""PASCAL VOC scoring, by the VOCdevkit's rules: average precision of a precision-recall
curve (:func:`voc_ap`) and per-class matching of ranked detections to ground truth
(:func:`voc_eval`). The core that :mod:`rcnn_cli.evaluate` (metrics files, COCO) and
:mod:`rcnn_cli.diagnose` (error analysis) build on; the rules are stated in
:mod:`rcnn_cli.evaluate`'s docstring.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from rcnn_cli.boxes import as_boxes, box_iou
from rcnn_cli.config import default
from rcnn_cli.formats import as_detections

#: PASCAL VOC matching threshold (VOCdevkit ``VOCopts.minoverlap``).
#: PASCAL VOC matching threshold (VOCdevkit ``VOCopts.minoverlap``): [evaluate] iou.
VOC_IOU_THRESH: float = default("evaluate.iou")


def _as_gt(x: Any) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.bool_]]:
    """(boxes (G, 4), labels (G,), difficult (G,)) from an ImageRecord-like object or a tuple
    ``(boxes, labels[, difficult])``; a missing ``difficult`` means all False."""
    if hasattr(x, "boxes") and hasattr(x, "labels"):
        b, lab, d = x.boxes, x.labels, getattr(x, "difficult", None)
    elif isinstance(x, (tuple, list)) and len(x) in (2, 3):
        b, lab, d = x[0], x[1], x[2] if len(x) == 3 else None
    else:
        raise TypeError(f"ground truth must be ImageRecord-like or (boxes, labels, difficult), "
                        f"got {type(x)}")
    b = as_boxes(b)
    lab = np.asarray(lab, np.int64).reshape(-1)
    d = np.zeros(len(b), bool) if d is None else np.asarray(d, bool).reshape(-1)
    if not len(lab) == len(d) == len(b):
        raise ValueError(f"ground truth: boxes {b.shape}, labels {lab.shape} and difficult "
                         f"{d.shape} must have the same length")
    return b, lab, d


# ---------------------------------------------------------------- VOC
def voc_ap(recall: ArrayLike, precision: ArrayLike, use_07_metric: bool) -> float:
    """Average precision from a precision-recall curve, by the VOCdevkit's rules.

    Args:
        recall: (K,) float, non-decreasing, detections ranked best first.
        precision: (K,) float, same length.
        use_07_metric: True for VOC2007's 11-point interpolated AP (mean over t in
            {0, 0.1, ..., 1} of the best precision at recall >= t, 0 if none); False for
            VOC2010+'s all-point AP (area under the monotone precision envelope).

    Returns:
        AP as a float; ``nan`` if recall contains ``nan`` (a class with no ground truth).

    The 11 thresholds are ``k / 10`` (correctly rounded), so recall exactly 0.3 counts for
    t = 0.3; ``np.arange(0, 1.1, 0.1)`` (py-faster-rcnn) has 0.30000000000000004 there.
    """
    rec = np.asarray(recall, np.float64)
    prec = np.asarray(precision, np.float64)
    if rec.ndim != 1 or rec.shape != prec.shape:
        raise ValueError(f"recall and precision must be 1-D of equal length, got {rec.shape} "
                         f"and {prec.shape}")
    if np.isnan(rec).any():
        return math.nan
    if use_07_metric:
        ap = 0.0
        for k in range(11):
            p = prec[rec >= k / 10]
            ap += (float(p.max()) if p.size else 0.0) / 11
        return ap
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope, right to left
    i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1  # points where recall changes
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))


def voc_eval(dets: Mapping[str, Any], gts: Mapping[str, Any], num_classes: int,
             iou_thresh: float = VOC_IOU_THRESH) -> dict[int, dict[str, Any]]:
    """PASCAL VOC evaluation of every class (VOCdevkit ``VOCevaldet``).

    Args:
        dets: image file_name -> detections (see :func:`as_detections`). Every key must be in
            ``gts``; images of ``gts`` missing here simply have no detections.
        gts: image file_name -> ground truth (see module docstring).
        num_classes: C; labels are 0..C-1.
        iou_thresh: a detection is a true positive at IoU >= this.

    Returns:
        {class index: {"ap07", "ap", "npos", "num_dets", "recall" (K,), "precision" (K,),
        "tp" (K,), "fp" (K,) 0/1 per ranked detection, "scores" (K,) ranked}}.

    Rules: the class's detections of all images are ranked by score, descending, stable (ties
    keep image order of ``dets``, then order within the image). Each is matched to the
    ground-truth box of that class with the highest IoU in its image (first on ties). If that
    IoU >= ``iou_thresh``: a difficult box makes the detection ignored (neither TP nor FP, even
    when repeated); an unclaimed box makes it a TP and claims the box; a claimed box makes it
    a FP (duplicate). Otherwise FP. Difficult boxes do not count in ``npos``.
    """
    dets = {k: as_detections(v) for k, v in dets.items()}
    gts = {k: _as_gt(v) for k, v in gts.items()}
    unknown = [k for k in dets if k not in gts]
    if unknown:
        raise ValueError(f"dets: {len(unknown)} image(s) without ground truth, e.g. {unknown[0]!r}")
    results: dict[int, dict[str, Any]] = {}
    for c in range(num_classes):
        # 1. ground truth of class c per image; difficult boxes are not counted in npos
        gt_c = {k: (b[lab == c], d[lab == c]) for k, (b, lab, d) in gts.items()}
        npos = int(sum((~d).sum() for _, d in gt_c.values()))
        # 2. detections of class c with their IoU rows against their image's class-c ground truth
        names, ious, scores = [], [], []
        for k, det in dets.items():
            m = det.labels == c
            if m.any():
                ious.extend(box_iou(det.boxes[m], gt_c[k][0]))
                scores.append(det.scores[m])
                names.extend([k] * int(m.sum()))
        scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
        # 3. rank by score, best first (stable)
        order = np.argsort(-scores.astype(np.float64), kind="stable")
        # 4. greedy matching in rank order
        tp, fp = np.zeros(len(order)), np.zeros(len(order))
        claimed = {k: np.zeros(len(b), bool) for k, (b, _) in gt_c.items()}
        for r, i in enumerate(order):
            iou, difficult = ious[i], gt_c[names[i]][1]
            j = int(np.argmax(iou)) if iou.size else -1
            if j < 0 or iou[j] < iou_thresh:
                fp[r] = 1
            elif difficult[j]:
                pass  # ignored
            elif not claimed[names[i]][j]:
                tp[r], claimed[names[i]][j] = 1, True
            else:
                fp[r] = 1  # duplicate
        # 5. cumulative precision / recall and AP
        tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
        recall = tp_cum / npos if npos else np.full(len(tp), math.nan)
        precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
        ap07 = voc_ap(recall, precision, True) if npos else math.nan
        ap = voc_ap(recall, precision, False) if npos else math.nan
        results[c] = {"ap07": ap07, "ap": ap, "npos": npos, "num_dets": len(order),
                      "recall": recall, "precision": precision, "tp": tp, "fp": fp,
                      "scores": scores[order]}
    return results


def _nanmean(values: Iterable[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan
