"""Proposal quality: recall at IoU thresholds, average recall, (mean) average best overlap.

Definitions (Uijlings et al. IJCV 2013 section 5.1; Hosang et al. PAMI 2016 for AR):

* best overlap of a ground-truth box: the highest IoU with any proposal of its image;
* recall@t: the fraction of ground-truth boxes whose best overlap is ``>= t``;
* AR: recall averaged over ``t = 0.5, 0.55, ..., 0.95``;
* ABO: the mean best overlap over the ground-truth boxes of one class; MABO: the mean of
  the per-class ABOs (equal to ABO when no labels are given).

All of it is also computed on the first ``n`` proposals of each image for ``n`` in
``num_boxes`` (proposals must be ranked best first) to give the recall-vs-#boxes curve.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from .. import boxes as box_ops

#: Hosang et al.: average recall over IoU thresholds 0.5:0.05:0.95.
AR_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
DEFAULT_NUM_BOXES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


def proposal_recall(proposals: Sequence[NDArray], gts: Sequence[NDArray],
                    num_boxes: Sequence[int] = DEFAULT_NUM_BOXES,
                    labels: Sequence[NDArray] | None = None,
                    class_names: Sequence[str] | None = None) -> dict:
    """Recall and overlap statistics of ranked proposals against ground truth.

    Args:
        proposals: per image, boxes (N_i, 4) x1y1x2y2, best first.
        gts: per image, ground-truth boxes (G_i, 4) x1y1x2y2 (same image order).
        num_boxes: budgets for the recall curve (each image's first ``n`` proposals).
        labels: optional per image (G_i,) integer class of each ground-truth box; gives
            per-class ABO and their mean (MABO).
        class_names: optional names for the label indices in ``per_class``.

    Returns:
        dict with ``num_images``, ``num_gt``, ``boxes_per_image`` (mean proposals used),
        ``recall@0.5``, ``recall@0.7``, ``ar``, ``abo``, ``mabo`` (all proposals), and
        ``per_class`` ({name: {"num_gt", "abo", "recall@0.5"}}) and ``curve``
        ({"num_boxes": [...], "recall@0.5": [...], "recall@0.7": [...], "ar": [...],
        "abo": [...]}). With no ground-truth boxes the rates are ``nan``.
    """
    if len(proposals) != len(gts):
        raise ValueError(f"proposals and gts must list the same images, got {len(proposals)} "
                         f"and {len(gts)}")
    if labels is not None and len(labels) != len(gts):
        raise ValueError(f"labels must have one entry per image, got {len(labels)} for "
                         f"{len(gts)} images")
    props = [box_ops.as_boxes(p) for p in proposals]
    gt = [box_ops.as_boxes(g) for g in gts]
    lab = (np.concatenate([np.asarray(x, np.int64).reshape(-1) for x in labels])
           if labels is not None and gts else np.zeros(sum(len(g) for g in gt), np.int64))
    if len(lab) != sum(len(g) for g in gt):
        raise ValueError(f"labels have {len(lab)} entries for {sum(len(g) for g in gt)} boxes")
    budgets = sorted({int(n) for n in num_boxes})
    # iou[i]: (G_i, N_i) for each image, then the best overlap within each budget
    ious = [box_ops.box_iou(g, p) for g, p in zip(gt, props)]
    best_all = _best(ious, None)
    out = {"num_images": len(gt), "num_gt": len(best_all),
           "boxes_per_image": float(np.mean([len(p) for p in props])) if props else 0.0}
    out.update(_summary(best_all, lab))
    per_class = {}
    for c in np.unique(lab) if labels is not None else []:
        name = class_names[c] if class_names is not None else str(int(c))
        sel = best_all[lab == c]
        per_class[name] = {"num_gt": len(sel), "abo": float(sel.mean()),
                           "recall@0.5": float((sel >= 0.5).mean())}
    out["per_class"] = per_class
    curve = {"num_boxes": budgets, "recall@0.5": [], "recall@0.7": [], "ar": [], "abo": []}
    for n in budgets:
        s = _summary(_best(ious, n), lab)
        for key in ("recall@0.5", "recall@0.7", "ar", "abo"):
            curve[key].append(s[key])
    out["curve"] = curve
    return out


def _best(ious: list[NDArray], n: int | None) -> NDArray[np.float64]:
    """Best overlap (sum G_i,) of each ground-truth box with the first ``n`` proposals."""
    best = [iou[:, :n].max(axis=1) if iou.shape[1] and n != 0 else np.zeros(len(iou))
            for iou in ious]
    return np.concatenate(best).astype(np.float64) if best else np.zeros(0)


def _summary(best: NDArray, lab: NDArray) -> dict:
    """recall@0.5, recall@0.7, AR, ABO, MABO of best overlaps ``best`` with classes ``lab``."""
    if len(best) == 0:
        nan = float("nan")
        return {"recall@0.5": nan, "recall@0.7": nan, "ar": nan, "abo": nan, "mabo": nan}
    # a small tolerance so that an IoU of exactly t (in float32) counts at threshold t
    eps = 1e-6
    return {"recall@0.5": float((best >= 0.5 - eps).mean()),
            "recall@0.7": float((best >= 0.7 - eps).mean()),
            "ar": float(np.mean([(best >= t - eps).mean() for t in AR_THRESHOLDS])),
            "abo": float(best.mean()),
            "mabo": float(np.mean([best[lab == c].mean() for c in np.unique(lab)]))}


def plot_recall_curve(curves: dict[str, tuple[Sequence[int], Sequence[float]]], path,
                      ylabel: str = "recall@0.5") -> None:
    """Plot recall against the number of proposals per image, one line per method.

    Args:
        curves: {method name: (num_boxes, recall)}.
        path: where to write the PNG (matplotlib's Agg backend; no display needed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for name, (n, r) in curves.items():
        ax.plot(n, r, marker="o", markersize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("proposals per image")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
