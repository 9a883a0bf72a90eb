"""Detection post-processing, shared by the proposal recipe (:func:`rcnn_cli.detect.detect_image`)
and the dense one (:func:`rcnn_cli.dense.detect_dense`): clip, threshold, drop degenerate
boxes, per-class NMS (R-CNN's greedy NMS or Gaussian soft-NMS), cap, box voting.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from rcnn_cli import boxes as bx
from rcnn_cli import config as cfgmod

#: boxes thinner than this (pixels) after regression and clipping are dropped
MIN_BOX_SIDE = 1e-2


#: Soft-NMS (Bodla et al., ICCV 2017): Gaussian decay width of the overlapping scores.
SOFT_NMS_SIGMA = 0.5
#: Soft-NMS: boxes whose decayed score is less than this above the threshold are dropped.
SOFT_NMS_FLOOR = 1e-3


@dataclass
class DetectSettings:
    """Post-processing thresholds (defaults live in the model bundle, flags override)."""

    # defaults: [detect] of rcnn_cli/default.toml, the one place they are written
    nms_iou: float = cfgmod.default("detect.nms_iou")  # per-class NMS overlap
    score_thresh: float = cfgmod.default("detect.score_thresh")  # SVM margin units
    max_per_image: int = cfgmod.default("detect.max_per_image")
    bbox_regression: bool = cfgmod.default("detect.bbox_regression")
    vis_thresh: float = cfgmod.default("detect.vis_thresh")  # pictures: detections above this
    nms: str = cfgmod.default("detect.nms")  # soft (Gaussian soft-NMS) | hard (greedy NMS)
    box_vote_iou: float = cfgmod.default("detect.box_vote_iou")  # box voting IoU (0 = off)


def postprocess(boxes: NDArray[np.float32], scores: NDArray[np.float32],
                image_size: tuple[int, int], settings: DetectSettings
                ) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.int64]]:
    """Per-class boxes (N, K, 4) and scores (N, K) -> final (boxes (M, 4), scores, labels).

    Steps: clip to the image, drop scores <= threshold, drop degenerate boxes, per-class NMS
    (torchvision ``batched_nms``; or soft-NMS), optional box voting, keep the
    ``max_per_image`` best.
    """
    n, k = scores.shape
    labels = np.broadcast_to(np.arange(k), (n, k))
    b = bx.clip(boxes.reshape(-1, 4), image_size)
    s, lab = scores.reshape(-1), labels.reshape(-1)
    # remove low scoring boxes
    keep = s > settings.score_thresh
    # remove boxes collapsed by clipping
    keep &= bx.valid_mask(b, MIN_BOX_SIDE)
    b, s, lab = b[keep], s[keep].astype(np.float32), lab[keep]
    # non-maximum suppression, independently per class
    if settings.nms == "soft":
        idx, s_out = soft_nms(b, s, lab, settings.score_thresh, limit=settings.max_per_image)
    else:
        import torch  # here: `rcnn detect` checks its inputs before torch's import

        from ._torchvision import batched_nms

        idx = batched_nms(torch.from_numpy(b), torch.from_numpy(s),
                          torch.from_numpy(lab.astype(np.int64)), settings.nms_iou).numpy()
        s_out = s[idx]
    # keep only the best detections
    idx, s_out = idx[: settings.max_per_image], s_out[: settings.max_per_image]
    kept = b[idx]
    # box voting: each kept box becomes the score-weighted mean of its class's boxes around it
    if settings.box_vote_iou > 0 and len(idx):
        kept = box_voting(kept, lab[idx], b, s, lab, settings.box_vote_iou)
    return kept, s_out.astype(np.float32), lab[idx].astype(np.int64)


def soft_nms(boxes: NDArray[np.float32], scores: NDArray[np.float32], labels: NDArray,
             score_thresh: float, sigma: float = SOFT_NMS_SIGMA, limit: int | None = None
             ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Gaussian soft-NMS per class (Bodla et al. 2017), for SVM margins.

    Hand-written: torchvision has hard NMS only. Margins can be negative, so the decay
    ``exp(-IoU^2 / sigma)`` applies to the height above ``score_thresh``; a box keeps its
    place unless a better box of its class overlaps it. Neighbours of a crowd keep a lowered
    score instead of vanishing.

    Args:
        boxes (N, 4) float32, scores (N,), labels (N,): the candidates (already thresholded).
        limit: stop after this many boxes per class (the picked scores never increase, so
            these are the class's best ``limit`` boxes; the rest cannot make the cap).

    Returns:
        (indices into the input, best first; their decayed scores).
    """
    order_out, score_out = [], []
    for c in np.unique(labels):
        ids = np.flatnonzero(labels == c)
        h = scores[ids].astype(np.float64) - score_thresh  # > 0
        iou = bx.box_iou(boxes[ids], boxes[ids]).astype(np.float64)
        alive = np.ones(len(ids), bool)
        for _ in range(len(ids) if limit is None else min(limit, len(ids))):
            cand = np.flatnonzero(alive)
            if not len(cand):
                break
            i = cand[np.argmax(h[cand])]
            if h[i] <= SOFT_NMS_FLOOR:
                break
            alive[i] = False
            order_out.append(ids[i])
            score_out.append(h[i] + score_thresh)
            h[alive] *= np.exp(-(iou[i, alive] ** 2) / sigma)
    idx = np.asarray(order_out, np.int64)
    sc = np.asarray(score_out, np.float32)
    o = np.argsort(-sc, kind="stable")
    return idx[o], sc[o]


def box_voting(kept: NDArray[np.float32], kept_labels: NDArray, boxes: NDArray[np.float32],
               scores: NDArray[np.float32], labels: NDArray, iou_thresh: float
               ) -> NDArray[np.float32]:
    """Box voting (Gidaris & Komodakis, ICCV 2015): each kept box (M, 4) becomes the mean of
    the candidate boxes (N, 4) of its class that overlap it at IoU >= ``iou_thresh``, each
    weighted by ``exp(score)`` (SVM margins); returns the voted boxes (M, 4) float32."""
    out = kept.copy()
    iou = bx.box_iou(kept, boxes)
    for m in range(len(kept)):
        sel = (iou[m] >= iou_thresh) & (labels == kept_labels[m])
        if sel.any():
            w = np.exp(scores[sel].astype(np.float64) - scores[sel].max())
            out[m] = (w[:, None] * boxes[sel]).sum(0) / w.sum()
    return out.astype(np.float32)
