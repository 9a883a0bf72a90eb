"""Tests of rcnn_cli.bbox_regression: ridge recovery, centring, selection, round trip."""
from __future__ import annotations

import numpy as np
import pytest

from rcnn_cli import bbox_regression as br
from rcnn_cli.boxes import decode, encode


def _proposals_for(gt: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Boxes P (N, 4) with encode(P, gt) == t (N, 4), for one gt box (4,)."""
    gw, gh = gt[2] - gt[0], gt[3] - gt[1]
    gx, gy = gt[0] + gw / 2, gt[1] + gh / 2
    pw, ph = gw / np.exp(t[:, 2]), gh / np.exp(t[:, 3])
    px, py = gx - t[:, 0] * pw, gy - t[:, 1] * ph
    return np.stack([px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2], 1).astype(np.float32)


def _linear_stream(seed: int, dim: int = 8, images: int = 40, per_image: int = 30,
                   label: int = 1, scale: float = 0.5):
    """Records whose regression targets are exactly W_true @ (x * scale) for class ``label``.

    Each image also holds a far-away proposal (IoU 0) with wild features: it must be ignored.
    """
    rng = np.random.default_rng(seed)
    w_true = rng.normal(0, 0.01, (4, dim))
    recs = []
    for _ in range(images):
        gt = np.array([50, 40, 150, 160], np.float64) + rng.uniform(-20, 20, 4)
        x = rng.normal(0, 2, (per_image, dim))
        t = (x * scale) @ w_true.T
        props = _proposals_for(gt, t)
        feats = np.concatenate([np.zeros((1, dim)), x, rng.normal(0, 100, (1, dim))])
        boxes = np.concatenate([gt[None].astype(np.float32), props,
                                np.float32([[400, 400, 450, 450]])])
        recs.append({"boxes": boxes, "features": feats.astype(np.float32),
                     "gt_label": np.r_[label, -np.ones(per_image + 1)].astype(np.int32),
                     "gt_boxes": gt[None].astype(np.float32),
                     "gt_labels": np.array([label]), "gt_difficult": np.zeros(1, bool)})
    return recs, w_true


def test_ridge_recovers_known_linear_map():
    recs, w_true = _linear_stream(seed=0)
    res = br.train_bbox_regressors(lambda: recs, 2, feat_scale=0.5, lam=1e-4)
    assert res.trained.tolist() == [False, True]
    assert res.num_samples.tolist() == [0, 40 * 31]  # GT rows + proposals, not the far box
    np.testing.assert_allclose(res.regressors[1, :, :-1], w_true, atol=2e-5)
    np.testing.assert_allclose(res.regressors[1, :, -1], 0, atol=2e-5)
    assert not res.regressors[0].any()


def test_regressor_path_round_trips_encode_decode():
    recs, _ = _linear_stream(seed=1)
    res = br.train_bbox_regressors(lambda: recs, 2, feat_scale=0.5, lam=1e-4)
    rec = recs[0]
    props, feats, gt = rec["boxes"][1:-1], rec["features"][1:-1], rec["gt_boxes"][0]
    out = br.apply_regression(props, feats, 1, res.regressors, 0.5, (300, 300))
    np.testing.assert_allclose(out, np.broadcast_to(gt, out.shape), atol=0.05)
    # All classes at once: class 1's slice is the same; class 0 (untrained) is the identity.
    every = br.apply_regression(props, feats, None, res.regressors, 0.5, (300, 300))
    assert every.shape == (len(props), 2, 4)
    np.testing.assert_allclose(every[:, 1], out, atol=1e-4)
    np.testing.assert_allclose(every[:, 0], props, atol=1e-4)
    # Per-box class indices, and clipping to the image.
    mixed = br.apply_regression(props, feats, np.arange(len(props)) % 2, res.regressors, 0.5,
                                (100, 120))
    assert mixed[:, 0::2].max() <= 120 and mixed[:, 1::2].max() <= 100
    assert mixed.min() >= 0


def test_targets_are_centred_so_the_regularised_bias_is_not_shrunk():
    # Constant targets t = mu, random features, heavy ridge: the prediction must be mu
    # (R-CNN subtracts the mean before the solve); without centring the bias would shrink.
    rng = np.random.default_rng(2)
    mu = np.array([0.05, -0.04, 0.1, -0.08])
    recs = []
    for _ in range(10):
        gt = np.array([30, 30, 130, 110], np.float64)
        props = _proposals_for(gt, np.tile(mu, (20, 1)))
        recs.append({"boxes": props, "features": rng.normal(0, 1, (20, 5)).astype(np.float32),
                     "gt_label": -np.ones(20, np.int32), "gt_boxes": gt[None].astype(np.float32),
                     "gt_labels": np.array([0]), "gt_difficult": np.zeros(1, bool)})
    res = br.train_bbox_regressors(lambda: recs, 1, feat_scale=1.0)  # lambda = 1000
    np.testing.assert_allclose(res.target_mean[0], mu, atol=1e-5)
    np.testing.assert_allclose(res.target_std[0], 0, atol=1e-5)
    d = br.predict_deltas(recs[0]["features"], res.regressors, 1.0, 0)
    np.testing.assert_allclose(d, np.tile(mu, (20, 1)), atol=1e-4)


def test_selection_uses_min_overlap_and_the_best_gt_box():
    gt = np.float32([[0, 0, 100, 100], [200, 0, 300, 100]])
    boxes = np.float32([[0, 0, 100, 100],  # IoU 1 with gt 0
                        [0, 0, 100, 62],  # IoU 0.62 >= 0.6 with gt 0
                        [0, 0, 100, 58],  # IoU 0.58 < 0.6
                        [205, 0, 305, 100]])  # best is gt 1 (class 1)
    rec = {"boxes": boxes, "features": np.eye(4, dtype=np.float32),
           "gt_label": np.int32([0, -1, -1, -1]), "gt_boxes": gt,
           "gt_labels": np.array([0, 1]), "gt_difficult": np.zeros(2, bool)}
    res = br.train_bbox_regressors(lambda: [rec], 2, feat_scale=1.0)
    assert res.num_samples.tolist() == [2, 1]
    sub = br.train_bbox_regressors(lambda: [rec], 2, feat_scale=1.0, classes_to_train=[1])
    assert sub.trained.tolist() == [False, True]
    np.testing.assert_allclose(sub.target_mean[1], encode(boxes[3:], gt[1:])[0], atol=1e-6)


def test_decode_clamps_and_input_errors():
    assert np.isfinite(decode(np.float32([[0, 0, 10, 10]]), [[0, 0, 1e4, 1e4]])).all()
    with pytest.raises(ValueError, match=r"regressors \(K, 4, D\+1\) disagree"):
        br.predict_deltas(np.ones((2, 3)), np.zeros((1, 4, 3)), 1.0, 0)
    with pytest.raises(ValueError, match=r"class_idx must lie in \[0, 1\)"):
        br.predict_deltas(np.ones((2, 3)), np.zeros((1, 4, 4)), 1.0, 1)
    with pytest.raises(ValueError, match=r"classes_to_train must lie in \[0, 2\)"):
        br.train_bbox_regressors(list, 2, 1.0, classes_to_train=[2])
    rec = {"boxes": np.float32([[0, 0, 5, 5]]), "features": np.ones((2, 3), np.float32),
           "gt_boxes": np.float32([[0, 0, 5, 5]]), "gt_labels": np.array([0])}
    with pytest.raises(ValueError, match="record 0: features"):
        br.train_bbox_regressors(lambda: [rec], 1, 1.0)


def test_buffered_sums_do_not_depend_on_the_flush_size(monkeypatch):
    """Samples are added to X^T X in blocks of FLUSH_ROWS: any block size, one answer."""
    recs, _ = _linear_stream(seed=3, images=12)
    ref = br.train_bbox_regressors(lambda: recs, 2, feat_scale=0.5)
    monkeypatch.setattr(br, "FLUSH_ROWS", 7)  # several flushes, most mid-image
    small = br.train_bbox_regressors(lambda: recs, 2, feat_scale=0.5)
    assert small.num_samples.tolist() == ref.num_samples.tolist() == [0, 12 * 31]
    np.testing.assert_allclose(small.regressors, ref.regressors, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(small.target_std, ref.target_std, rtol=1e-6)


def test_cholesky_solve_matches_a_general_solve_and_rejects_indefinite_matrices():
    """The ridge system's solver (Cholesky + triangular solves) gives the general solution
    and says when the matrix is not positive definite."""
    rng = np.random.default_rng(0)
    m = rng.standard_normal((300, 60))
    a = m.T @ m + 1e-3 * np.eye(60)
    b = rng.standard_normal((60, 4))
    before = a.copy()
    np.testing.assert_allclose(br._cholesky_solve(a, b), np.linalg.solve(a, b), rtol=1e-9,
                               atol=1e-9)
    np.testing.assert_array_equal(a, before)  # the caller's matrix is left as it was
    with pytest.raises(np.linalg.LinAlgError):
        br._cholesky_solve(-a, b)
