"""Class-specific bounding-box regression (R-CNN ``rcnn_train_bbox_regressor.m``).

For each class a ridge regression maps (scaled) features of a proposal to the targets
``tx, ty, tw, th`` (``boxes.encode``) that take it to its ground-truth box. Following R-CNN:

* a box is a training sample if its best IoU over *all* ground-truth boxes of the image is
  at least ``MIN_OVERLAP``; its target is that best box and its class that box's class
  (ground-truth rows are samples too, with zero targets; difficult objects count);
* a bias column of ones is appended and regularised with the rest (``lambda * I`` on the
  whole system, solved by Cholesky);
* targets are centred (mean subtracted before the solve, added back after). R-CNN also
  decorrelates them with ``T = S^-1/2`` and undoes it with ``T^-1`` at test; for ridge with a
  shared design matrix the solution is linear in the targets, so ``T`` followed by ``T^-1``
  cancels exactly and we skip it. The mean is folded into the bias column, so the stored
  regressors give deltas directly; target mean and std are kept as statistics.

Training streams the records once, accumulating ``X^T X`` (D+1, D+1) and ``X^T t`` in float64
per class, allocated on a class's first sample: memory is ``8 (D+1)^2`` bytes per class
present (134 MB at D=4096, 680 MB at D=9216; with many classes and pool5 features train a
subset per call with ``classes_to_train``). R-CNN instead stored the samples.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from rcnn_cli.boxes import as_boxes, box_iou, clip, decode, encode
from rcnn_cli.config import default

logger = logging.getLogger("rcnn_cli.bbox_regression")

# rcnn_train_bbox_regressor.m 'min_overlap' and 'lambda' (ridge, features at mean norm 20):
# [train_svm] bbox_min_overlap and bbox_lambda of rcnn_cli/default.toml, the one place.
MIN_OVERLAP: float = default("train_svm.bbox_min_overlap")
LAMBDA: float = default("train_svm.bbox_lambda")
FLUSH_ROWS = 1024  # samples buffered per class (8 (D+1) x this bytes) before the X^T X update

RecordsFactory = Callable[[], Iterable[Mapping[str, Any]]]


@dataclass
class BBoxRegressionResult:
    """Output of :func:`train_bbox_regressors`.

    regressors (K, 4, D+1) float32: deltas = ``[x * feat_scale, 1] @ regressors[k].T``
    (target mean folded into the last, bias, column); trained (K,) bool; num_samples (K,)
    int64; target_mean, target_std (K, 4) float32 (statistics; zero for untrained classes).
    """

    regressors: NDArray[np.float32]
    trained: NDArray[np.bool_]
    num_samples: NDArray[np.int64]
    target_mean: NDArray[np.float32]
    target_std: NDArray[np.float32]


def train_bbox_regressors(records_factory: RecordsFactory, num_classes: int, feat_scale: float,
                          classes_to_train: Sequence[int] | None = None, *,
                          min_overlap: float = MIN_OVERLAP, lam: float = LAMBDA,
                          class_names: Sequence[str] | None = None) -> BBoxRegressionResult:
    """Train per-class ridge regressors in one streaming pass over extract records.

    Args:
        records_factory: returns an iterable of extract records (``boxes``, ``features``,
            ``gt_boxes``, ``gt_labels``; see ``docs/CONTRACTS.md``).
        num_classes: K.
        feat_scale: the SVM's feature scale (``SVMResult.feat_scale``); features are
            multiplied by it before regression, as in R-CNN.
        classes_to_train: class indices (default all); others get zero regressors (identity).
        min_overlap: samples need best IoU >= this with a ground-truth box.
        lam: ridge penalty on all D+1 coefficients.
        class_names: only for log messages.
    """
    todo = set(range(num_classes) if classes_to_train is None else classes_to_train)
    if any(not 0 <= k < num_classes for k in todo):
        raise ValueError(f"classes_to_train must lie in [0, {num_classes}), got {sorted(todo)}")
    names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
    gram: dict[int, np.ndarray] = {}
    xty: dict[int, np.ndarray] = {}
    tsum = np.zeros((num_classes, 4))
    tsq = np.zeros((num_classes, 4))
    count = np.zeros(num_classes, np.int64)
    dim = None
    buf: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # samples not yet in the sums

    def flush(k: int) -> None:
        """Add class k's buffered samples to its sums (one large product, not one per
        image: a (D+1)^2 float64 update per image was most of the regression's time)."""
        if not buf[k]:
            return
        x = np.concatenate([b[0] for b in buf[k]])
        t = np.concatenate([b[1] for b in buf[k]])
        buf[k] = []
        if k not in gram:
            gram[k], xty[k] = np.zeros((dim + 1, dim + 1)), np.zeros((dim + 1, 4))
        gram[k] += x.T @ x
        xty[k] += x.T @ t
        tsum[k] += t.sum(0)
        tsq[k] += (t * t).sum(0)

    for i, rec in enumerate(records_factory()):
        boxes = as_boxes(rec["boxes"])
        feats = np.asarray(rec["features"])
        gt_boxes = as_boxes(rec["gt_boxes"])
        gt_labels = np.asarray(rec["gt_labels"]).reshape(-1).astype(np.int64)
        if len(boxes) == 0 or len(gt_boxes) == 0:
            continue
        if feats.ndim != 2 or len(feats) != len(boxes):
            raise ValueError(f"record {i}: features {feats.shape} do not match boxes {boxes.shape}")
        if dim is not None and feats.shape[1] != dim:
            raise ValueError(f"record {i}: features have D={feats.shape[1]}, earlier records {dim}")
        dim = feats.shape[1]
        # Best ground-truth box of each row, over all classes (R-CNN get_examples).
        iou = box_iou(boxes, gt_boxes)
        best = iou.argmax(1)
        sel = iou[np.arange(len(boxes)), best] >= min_overlap
        cls = gt_labels[best]
        for k in np.unique(cls[sel]).tolist():
            if k not in todo:
                continue
            rows = np.flatnonzero(sel & (cls == k))
            x = np.empty((len(rows), dim + 1))
            x[:, :dim] = feats[rows].astype(np.float64) * feat_scale
            x[:, dim] = 1.0
            t = encode(boxes[rows], gt_boxes[best[rows]]).astype(np.float64)
            buf.setdefault(k, []).append((x, t))
            count[k] += len(rows)
            if sum(len(b[0]) for b in buf[k]) >= FLUSH_ROWS:
                flush(k)
    for k in list(buf):
        flush(k)

    d = 0 if dim is None else dim
    regressors = np.zeros((num_classes, 4, d + 1), np.float32)
    mean = np.zeros((num_classes, 4), np.float32)
    std = np.zeros((num_classes, 4), np.float32)
    trained = np.zeros(num_classes, bool)
    for k in sorted(todo):
        n = count[k]
        if n == 0:
            logger.warning("class %s: no boxes with IoU >= %g; regressor left at identity",
                           names[k], min_overlap)
            continue
        mu = tsum[k] / n
        # Centre the targets: X^T (t - mu) = X^T t - (X^T 1) mu^T, X^T 1 = the bias column.
        rhs = xty[k] - np.outer(gram[k][:, d], mu)
        a = gram.pop(k)
        a[np.diag_indices_from(a)] += lam
        beta = _cholesky_solve(a, rhs)  # (D+1, 4)
        beta[d] += mu  # fold the mean into the bias
        regressors[k] = beta.T.astype(np.float32)
        mean[k] = mu
        std[k] = np.sqrt(np.maximum(tsq[k] / n - mu * mu, 0))
        trained[k] = True
        logger.info("class %s: %d regression samples, target mean %s std %s", names[k], n,
                    np.round(mu, 4).tolist(), np.round(std[k], 4).tolist())
    return BBoxRegressionResult(regressors, trained, count, mean, std)


def _cholesky_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve ``a x = b`` for symmetric positive definite ``a`` (float64).

    LAPACK's Cholesky, then two triangular solves (scipy's ``cho_solve``): ``np.linalg.solve``
    on the triangular factors ran a general LU on each, two (D+1)^3 factorisations more
    (profiled: 3.6 of train-svm's 6.3 s of regression on the demo's 4 classes, D = 2816).
    Raises ``numpy.linalg.LinAlgError`` when ``a`` is not positive definite.
    """
    from scipy.linalg import cho_factor, cho_solve

    return cho_solve(cho_factor(a, lower=True, check_finite=False), b, check_finite=False)


def predict_deltas(features: ArrayLike, regressors: ArrayLike, feat_scale: float,
                   class_idx: int | ArrayLike | None = None) -> NDArray[np.float32]:
    """Regression deltas of raw features (N, D).

    ``class_idx`` an int or (N,) ints: deltas (N, 4) of that class per box; ``None``: every
    class, (N, K, 4). ``regressors`` is (K, 4, D+1).
    """
    x = np.asarray(features, np.float32) * np.float32(feat_scale)
    r = np.asarray(regressors, np.float32)
    if x.ndim != 2 or r.ndim != 3 or r.shape[1] != 4 or r.shape[2] != x.shape[1] + 1:
        raise ValueError(f"features (N, D) and regressors (K, 4, D+1) disagree: {x.shape} and "
                         f"{r.shape}")
    if class_idx is None:
        k = r.shape[0]
        return (x @ r[:, :, :-1].reshape(k * 4, -1).T + r[:, :, -1].reshape(-1)).reshape(-1, k, 4)
    idx = np.broadcast_to(np.asarray(class_idx, np.int64), (len(x),))
    if len(idx) and (idx.min() < 0 or idx.max() >= r.shape[0]):
        raise ValueError(f"class_idx must lie in [0, {r.shape[0]}), got {idx.min()}..{idx.max()}")
    out = np.empty((len(x), 4), np.float32)
    for k in np.unique(idx).tolist():
        m = idx == k
        out[m] = x[m] @ r[k, :, :-1].T + r[k, :, -1]
    return out


def apply_regression(boxes: ArrayLike, features: ArrayLike, class_idx: int | ArrayLike | None,
                     regressors: ArrayLike, feat_scale: float,
                     image_size: tuple[int, int]) -> NDArray[np.float32]:
    """Refine boxes (N, 4) with their class's regressor, clipped to ``image_size = (h, w)``.

    ``class_idx`` an int or (N,) ints gives (N, 4); ``None`` refines each box for every
    class, giving (N, K, 4).
    """
    b = as_boxes(boxes)
    deltas = predict_deltas(features, regressors, feat_scale, class_idx)
    if deltas.ndim == 2:
        return clip(decode(b, deltas), image_size)
    n, k = deltas.shape[:2]
    out = decode(np.repeat(b, k, axis=0), deltas.reshape(-1, 4))
    return clip(out, image_size).reshape(n, k, 4)
