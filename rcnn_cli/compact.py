"""Compact training stores: keep only the windows training reads (`rcnn extract --keep train`).

Storing the features of every proposal costs 2000 x D x 2 bytes per image (mobilenet_v2
``grid``, D = 2816: 11 MB; a 10 000-image dataset: 110 GB, as R-CNN's own caches). Training
does not read most of them:

* the SVMs' positives are the ground-truth rows; their negatives are mined from every window
  with IoU < 0.3 to the class's ground truth (``rcnn_train.m``), and mining keeps only the
  few that score above -1.0001 (:mod:`rcnn_cli.svm`): the windows that partly overlap an
  object are the hard ones, far background is easy;
* the fc head takes every window with IoU >= 0.5 as foreground and a random sample of the
  rest as background (:mod:`rcnn_cli.head`);
* the box regressors read the windows with IoU >= 0.6 (:mod:`rcnn_cli.bbox_regression`).

So a training store keeps, per image: every ground-truth row, every window whose IoU with
some ground-truth box is at least ``near_iou`` (by default 0.1 for up to 2000 annotated
images, 0.3 for more: :func:`near_iou`) and a seeded sample of ``background``
other windows (the far background the miner would mostly discard). The rows are selected
*before* the CNN runs, so extraction is also cheaper in warp mode.

Each record then carries ``kept_rows`` (M,) int32, the index of every stored row in the full
window list (ground truth first, then the proposals, as in a ``keep = "all"`` record), and
``num_windows`` (), the size of that list; the store's settings (and so its key) carry the
keep settings (:func:`keep_settings`), so a store written with other keep settings is
recomputed, never mixed.

The background sample of an image is seeded by (``seed``, the image's identity), so it does
not depend on the order, the worker or the shard that computed it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rcnn_cli.boxes import box_iou

#: choices of ``[extract] keep``
KEEP_CHOICES = ("all", "train")
#: windows at least this close (IoU) to some ground-truth box are all kept (they hold the
#: head's foreground and the regressors' samples): the choice of ``keep_near_iou = 0`` (auto)
#: for datasets of more than :data:`AUTO_MAX_IMAGES` annotated images (0.82 MB per image)
NEAR_IOU = 0.3
#: ``keep_near_iou = 0`` (auto) up to :data:`AUTO_MAX_IMAGES` annotated images: also keeps
#: every SVM negative at IoU 0.1-0.3 (2.2 MB per image). 5-fold CV on raccoon, paired with
#: the full store: COCO AP -0.006 +- 0.010 where 0.3 loses -0.021 +- 0.010 (README)
NEAR_IOU_SMALL = 0.1
#: the largest dataset ``keep_near_iou = 0`` gives :data:`NEAR_IOU_SMALL` (4.4 GB at most)
AUTO_MAX_IMAGES = 2000
#: far-background windows kept per image (seeded sample); measured on raccoon, README
BACKGROUND = 64


def near_iou(setting: float, images: int | None) -> float:
    """The IoU ``keep_near_iou = setting`` means for a dataset of ``images`` annotated
    images: the setting itself, or for 0 (auto) :data:`NEAR_IOU_SMALL` up to
    :data:`AUTO_MAX_IMAGES` images and :data:`NEAR_IOU` above.

    Raises:
        ValueError: ``setting`` is 0 and ``images`` is None (the size must be known).
    """
    if setting:
        return float(setting)
    if images is None:
        raise ValueError("keep_near_iou = 0 is resolved from the number of annotated images; "
                         "pass images=")
    return NEAR_IOU_SMALL if images <= AUTO_MAX_IMAGES else NEAR_IOU


def keep_settings(extract: Mapping[str, Any], annotated: bool,
                  images: int | None = None) -> dict[str, Any]:
    """The settings of the ``[extract]`` section that decide which rows a record keeps
    (part of the extract store's key), with ``keep_near_iou = 0`` (auto) resolved for a
    dataset of ``images`` annotated images (all of them, before any shard is taken).

    ``keep = "train"`` applies only to a store made with ground truth (``annotated``); a
    store without it is for detection-style scoring and keeps every proposal.
    """
    keep = extract["keep"]
    if keep not in KEEP_CHOICES:
        raise ValueError(f"extract.keep must be one of {', '.join(KEEP_CHOICES)}, got {keep!r}")
    if keep == "all" or not annotated:
        return {"keep": "all"}
    return {"keep": "train", "near_iou": near_iou(float(extract["keep_near_iou"]), images),
            "background": int(extract["keep_background"]), "seed": int(extract["keep_seed"])}


def image_rng(seed: int, rel: str) -> np.random.Generator:
    """A generator seeded by ``seed`` and an image's identity (order- and shard-free)."""
    digest = hashlib.sha256(f"{seed}\0{rel}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def select_rows(boxes: NDArray[np.float32], gt_label: NDArray[np.integer],
                gt_boxes: NDArray[np.float32], near_iou: float, background: int,
                rng: np.random.Generator) -> NDArray[np.int64]:
    """Rows of one image's window list that a training store keeps, sorted.

    Args:
        boxes: (M, 4) float32 x1y1x2y2, every window of the image (ground truth first).
        gt_label: (M,) class index for ground-truth rows, -1 for proposals.
        gt_boxes: (G, 4) float32 ground-truth boxes (G may be 0).
        near_iou: every window with IoU >= this to some ground-truth box is kept.
        background: at most this many of the other windows are kept (drawn without
            replacement from ``rng``).
        rng: the image's generator (:func:`image_rng`).

    Returns:
        (K,) int64 indices into ``boxes``, increasing: every row with ``gt_label >= 0``,
        every near window, and the background sample.
    """
    m = len(boxes)
    keep = np.asarray(gt_label).reshape(-1) >= 0
    if len(gt_boxes) and m:
        keep |= box_iou(boxes, gt_boxes).max(1) >= near_iou
    rest = np.flatnonzero(~keep)
    if len(rest) > background:
        rest = rng.choice(rest, background, replace=False)
    keep[rest] = True
    return np.flatnonzero(keep).astype(np.int64)


def compact_rows(settings: Mapping[str, Any], rel: str, boxes: NDArray[np.float32],
                 gt_label: NDArray[np.integer], gt_boxes: NDArray[np.float32]
                 ) -> NDArray[np.int64] | None:
    """The rows to keep of one image under :func:`keep_settings` ``settings`` (None: all)."""
    if settings.get("keep", "all") == "all":
        return None
    return select_rows(boxes, gt_label, gt_boxes, settings["near_iou"],
                       settings["background"], image_rng(settings["seed"], rel))


def compact_record(record: Mapping[str, np.ndarray], settings: Mapping[str, Any],
                   rel: str) -> dict[str, np.ndarray]:
    """A full extract record (every window) reduced to the rows ``settings`` keep, with
    ``kept_rows`` and ``num_windows`` (what `rcnn extract --keep train` would have written
    from the same features)."""
    rec = dict(record)
    idx = compact_rows(settings, rel, rec["boxes"], rec["gt_label"], rec["gt_boxes"])
    if idx is None:
        return rec
    n = len(rec["boxes"])
    for k in ("boxes", "features", "gt_label"):
        rec[k] = rec[k][idx]
    rec.update(kept_rows=idx.astype(np.int32), num_windows=np.int64(n))
    return rec
