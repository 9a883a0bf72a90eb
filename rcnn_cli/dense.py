"""Dense sliding windows, the OverFeat way: every window of one size scored in one pass.

OverFeat (Sermanet et al., ICLR 2014) made the point that a window classifier applied at
every position of an image is a convolution: the pooling that turns a window into a vector is
a box filter over the feature map, and the fully connected layers on top are 1x1
convolutions over the positions. :func:`detect_dense` applies that to a trained R-CNN model
whose features are the ``grid`` tap of mobilenet_v2 in shared mode (:class:`GridHead`), with
no proposals at all:

1. the trunk runs once on the resized image (:meth:`FeatureExtractor.shared_maps`): the mid
   map (96 channels, stride 16) and the top map (1280 channels, stride 32);
2. for each window shape (a side ``scale * shorter side`` of the resized image and an aspect
   ratio, as ``--method sliding``), the windows sit on a regular grid of positions, stepping
   by ``stride`` pixels (default 32: one cell of the top map, the network's stride; the last
   row and column flush with the image's edge). The region feature of a window is
   ``[mean of the top map over the window] ++ [the mid map averaged over 4 x 4 parts of the
   context-padded window]``; each part is an interval in x times an interval in y, so the
   features of *all* ``ny x nx`` windows of the shape are two separable products of the maps
   with the per-interval weights of :func:`rcnn_cli.features.roi_area_pool` (an exact box
   filter: fractional cells weigh their covered fraction, the outside of the map counts as
   zero). On the stride-32 lattice this is a strided convolution with a fixed kernel; as
   matrix products it costs a few milliseconds per shape;
3. the model reads all windows of all shapes as one matrix: fc6/fc7 and the SVMs (and the
   box regressors) are matrix products over the positions, i.e. 1x1 convolutions;
4. each class's score map (one per window shape) keeps its local maxima (equal to the max
   of their 3 x 3 neighbourhood) above the score threshold;
5. the kept windows are box-regressed with the model's regressors and post-processed exactly
   as :func:`rcnn_cli.detect.detect_image` does (clip, threshold, per-class NMS, cap).

Geometry and exactness: a window is the box ``[x1, x2) x [y1, y2)`` in the pixels of the
resized image (returned in original pixels, divided by the resize factors). Its dense feature
equals what :meth:`FeatureExtractor.extract` computes for that box, up to float rounding
(tests/test_dense.py checks it), for any window size: no snapping to the feature grid is
needed because the pooling weights are exact fractions of cells.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from rcnn_cli import boxes as bx
from rcnn_cli.config import ConfigError
from rcnn_cli.features import GridHead, _cell_weights
from rcnn_cli.proposals.sliding import DEFAULT_ASPECT_RATIOS, DEFAULT_SCALES

log = logging.getLogger("rcnn_cli.dense")

#: Window positions step by this many pixels of the resized image: one cell of mobilenet_v2's
#: stride-32 top map (OverFeat evaluates its classifier at the network's stride).
DENSE_STRIDE = 32
#: Window sides as fractions of the shorter image side, and aspect ratios (width / height):
#: those of ``--method sliding`` (configs/default.toml [propose] sliding_*).
DENSE_SCALES = DEFAULT_SCALES
DENSE_RATIOS = DEFAULT_ASPECT_RATIOS
#: Local maxima of a score map: equal to the maximum of their PEAK_KERNEL x PEAK_KERNEL cells.
PEAK_KERNEL = 3


def dense_settings(scales: Sequence[float] = DENSE_SCALES,
                   ratios: Sequence[float] = DENSE_RATIOS,
                   stride: int = DENSE_STRIDE) -> dict[str, Any]:
    """The window geometry as JSON-able settings (part of detect's stage key)."""
    return {"scales": [float(s) for s in scales], "ratios": [float(r) for r in ratios],
            "stride": int(stride), "peak_kernel": PEAK_KERNEL}


def check_dense(extractor) -> None:
    """Raise :class:`ConfigError` (a ValueError, key ``detect.dense``) unless the extractor
    computes shared-mode ``grid`` features, the only ones :func:`detect_dense` densifies."""
    if getattr(extractor, "mode", None) != "shared" or not isinstance(
            getattr(extractor, "head", None), GridHead):
        raise ConfigError(
            f"--dense needs a model with extract mode 'shared' and tap 'grid' (mobilenet_v2), "
            f"this model has backbone {extractor.backbone!r}, mode "
            f"{getattr(extractor, 'mode', None)!r}, tap {getattr(extractor, 'tap', None)!r}",
            key="detect.dense")


def window_positions(length: int, window: float, stride: float) -> NDArray[np.float64]:
    """Start coordinates of a ``window`` sliding over ``length`` pixels by ``stride`` pixels,
    plus a last one flush with the end (one start, 0, when the window fills the length)."""
    last = max(length - window, 0.0)
    return np.append(np.arange(0.0, last, stride), last)


def window_grid(size: tuple[int, int], side: float, ratio: float, stride: float
                ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """The x- and y-intervals of one window shape over an image of ``size = (h, w)``.

    The window is ``side * sqrt(ratio)`` wide and ``side / sqrt(ratio)`` high (shrunk to
    the image where it is larger, as :func:`rcnn_cli.proposals.sliding_windows`).

    Returns:
        (xs (NDArray[nx, 2] float32) x1, x2 of each column; ys (NDArray[ny, 2]) y1, y2 of
        each row): the windows are all ``ny x nx`` pairs (row-major: y, then x).
    """
    h, w = size
    ww, wh = min(side * np.sqrt(ratio), w), min(side / np.sqrt(ratio), h)
    x1, y1 = window_positions(w, ww, stride), window_positions(h, wh, stride)
    return (np.stack([x1, x1 + ww], 1).astype(np.float32),
            np.stack([y1, y1 + wh], 1).astype(np.float32))


def _weights(iv: torch.Tensor, cells: int, n: int, scale: float) -> torch.Tensor:
    """(M, cells, n) pooling weights of M intervals (pixels) split into ``cells`` parts, on a
    map of ``n`` cells of ``1 / scale`` pixels (roi_area_pool's, so the features agree)."""
    return _cell_weights(iv[:, 0] * scale, iv[:, 1] * scale, cells, n)


def dense_grid_features(mid: torch.Tensor, top: torch.Tensor,
                        grids: Sequence[tuple[NDArray[np.float32], NDArray[np.float32]]],
                        head: GridHead) -> torch.Tensor:
    """``grid`` features of every window of every shape, in one pass over the two maps.

    A window's vector is separable: ``what[c] = sum_yx wy[y] wx[x] top[c, y, x]`` with
    ``wx``, ``wy`` the pooling weights of its x- and y-interval (and likewise for each of the
    grid x grid parts of its context-padded box on the mid map). So the maps are first
    contracted along x with the weights of *all* x-intervals of all shapes (one matrix product
    per map), then, per shape, along y with the weights of its y-intervals, which yields the
    ``ny x nx`` windows of the shape at once (their Cartesian product). The intermediate
    layouts are chosen so that these products write rows in the final order (few copies).

    Args:
        mid (Tensor[C_mid, H_mid, W_mid]), top (Tensor[C_top, H_top, W_top]): the trunk's
            maps of one image (float32).
        grids: per window shape, (xs (NDArray[nx, 2]), ys (NDArray[ny, 2])) window intervals
            in the pixels of the image the trunk saw (:func:`window_grid`).
        head: the extractor's :class:`GridHead` (grid size, strides, context factor).
    Returns:
        Tensor[sum ny * nx, C_top + C_mid * grid**2]: shape after shape, row ``j * nx + i``
        of a shape its window (ys[j], xs[i]), laid out as :class:`GridHead` lays out a box's
        vector (the top-map mean, then the mid map's parts as (C_mid, grid_y, grid_x)).
    """
    dev, g = mid.device, head.grid
    ct, ht, wt = top.shape
    cm, hm, wm = mid.shape

    def padded(t: torch.Tensor) -> torch.Tensor:  # the context-padded intervals
        c, half = t.mean(1, keepdim=True), (t[:, 1:] - t[:, :1]) / 2 * head.context
        return torch.cat([c - half, c + half], 1)

    tx = [torch.from_numpy(xs).to(dev) for xs, _ in grids]
    ty = [torch.from_numpy(ys).to(dev) for _, ys in grids]
    # 1. contract x for all x-intervals of all shapes, in the layout the rows want:
    #    top_x (H_top, sum nx, C_top), mid_x (H_mid, sum nx, C_mid, g_x)
    wx = torch.cat([_weights(t, 1, wt, 1.0 / head.top_stride)[:, 0] for t in tx])
    px = torch.cat([_weights(padded(t), g, wm, 1.0 / head.mid_stride) for t in tx])
    top_x = torch.matmul(wx, top.permute(1, 2, 0))
    mid_x = torch.matmul(mid.permute(1, 0, 2), px.reshape(-1, wm).T) \
        .view(hm, cm, -1, g).permute(0, 2, 1, 3).contiguous()
    # 2. per shape, contract y: every (y-interval, x-interval) pair is a window
    n = sum(len(x) * len(y) for x, y in zip(tx, ty))
    out = top.new_empty((n, ct + cm * g * g))
    r0 = c0 = 0
    for x, y in zip(tx, ty):
        nx, ny = len(x), len(y)
        wy = _weights(y, 1, ht, 1.0 / head.top_stride)[:, 0]  # (ny, H_top)
        py = _weights(padded(y), g, hm, 1.0 / head.mid_stride)  # (ny, g_y, H_mid)
        what = wy @ top_x[:, c0:c0 + nx].reshape(ht, -1)  # (ny, nx * C_top)
        where = py.reshape(ny * g, hm) @ mid_x[:, c0:c0 + nx].reshape(hm, -1)
        rows = out[r0:r0 + ny * nx]
        rows[:, :ct].copy_(what.view(ny * nx, ct))
        rows[:, ct:].view(ny, nx, cm, g, g).copy_(  # (ny, g_y, nx, C, g_x) -> GridHead's
            where.view(ny, g, nx, cm, g).permute(0, 2, 3, 1, 4))
        r0, c0 = r0 + ny * nx, c0 + nx
    return out


def local_maxima(scores: NDArray[np.float32], kernel: int = PEAK_KERNEL) -> NDArray[np.bool_]:
    """Where each class's score map (ny, nx, K) equals the max of its ``kernel x kernel``
    neighbourhood (the map's outside counts as -inf); returns a bool (ny, nx, K) mask."""
    s = torch.from_numpy(np.ascontiguousarray(scores.transpose(2, 0, 1)))  # (K, ny, nx)
    m = torch.nn.functional.max_pool2d(s[None], kernel, stride=1, padding=kernel // 2)[0]
    return (s == m).numpy().transpose(1, 2, 0)


@torch.inference_mode()
def dense_windows(image: NDArray[np.uint8], extractor,
                  scales: Sequence[float] = DENSE_SCALES, ratios: Sequence[float] = DENSE_RATIOS,
                  stride: int = DENSE_STRIDE
                  ) -> tuple[NDArray[np.float32], NDArray[np.float32], list[tuple[int, int]]]:
    """Every window of every shape of one image and its ``grid`` feature (steps 1-2 of the
    module docstring).

    Args:
        image (NDArray[H, W, 3] uint8): RGB.
        extractor: a shared-mode ``grid`` :class:`FeatureExtractor` (:func:`check_dense`).
        scales: window sides as fractions of the image's shorter side.
        ratios: window aspect ratios (width / height).
        stride: pixels of the resized image between window positions.
    Returns:
        (windows (NDArray[N, 4] float32) x1y1x2y2 in original pixels; features
        (NDArray[N, D] float32), row i the feature ``extractor.extract`` gives window i;
        the (ny, nx) grid of each shape, in order: shape by shape, row-major within one).
    """
    check_dense(extractor)
    if stride < 1 or not scales or min(scales) <= 0 or not ratios or min(ratios) <= 0:
        raise ValueError(f"need stride >= 1 and positive scales and ratios, got {stride}, "
                         f"{list(scales)}, {list(ratios)}")
    h, w = image.shape[:2]
    # 1. the trunk, once per image: mid (stride 16) and top (stride 32) maps
    (mid, top), (f_y, f_x) = extractor.shared_maps(image)
    mid, top = mid[0].float(), top[0].float()
    size = (round(h * f_y), round(w * f_x))  # the resized image the trunk saw
    # 2. every window of every shape, with its feature, in one pass per shape
    grids = [window_grid(size, s * min(size), a, stride) for s in scales for a in ratios]
    feats = dense_grid_features(mid, top, grids, extractor.head)
    boxes = [np.stack(np.broadcast_arrays(xs[None, :, 0], ys[:, None, 0], xs[None, :, 1],
                                          ys[:, None, 1]), -1).reshape(-1, 4)
             for xs, ys in grids]
    windows = bx.scale(np.concatenate(boxes), 1.0 / f_y, 1.0 / f_x)  # original pixels
    return windows, feats.cpu().numpy(), [(len(ys), len(xs)) for xs, ys in grids]


def detect_dense(image: NDArray[np.uint8], model, extractor, settings,
                 scales: Sequence[float] = DENSE_SCALES, ratios: Sequence[float] = DENSE_RATIOS,
                 stride: int = DENSE_STRIDE) -> dict[str, Any]:
    """Detections of one image (uint8 (H, W, 3) RGB) by dense window scoring (module
    docstring): the same model, thresholds and post-processing as
    :func:`rcnn_cli.detect.detect_image`, windows instead of proposals.

    Args:
        model: a loaded :class:`rcnn_cli.model.Model`.
        extractor: its :class:`FeatureExtractor` (shared mode, ``grid`` tap).
        settings: :class:`rcnn_cli.detect.DetectSettings`.
        scales, ratios, stride: the window geometry (:func:`dense_windows`).
    Returns:
        dict with ``boxes`` (M, 4) float32 original pixels, ``scores`` (M,) float32,
        ``labels`` (M,) int64, ``times`` (seconds per step).

    Raises:
        ConfigError: the extractor is not shared-mode ``grid`` (:func:`check_dense`).
    """
    from rcnn_cli.postprocess import postprocess

    t0 = time.perf_counter()
    # 1.-2. trunk once, then every window's feature by separable pooling
    windows, feats, shapes = dense_windows(image, extractor, scales, ratios, stride)
    t1 = time.perf_counter()
    # 3. class scores: fc head + SVMs over all positions at once (1x1 convolutions)
    scores = model.score(feats)
    scores[:, ~model.svm_trained] = -np.inf
    # 4. keep each score map's local maxima (other windows cannot win the class there)
    start = 0
    for ny, nx in shapes:
        part = slice(start, start + ny * nx)
        peak = local_maxima(scores[part].reshape(ny, nx, -1)).reshape(ny * nx, -1)
        scores[part] = np.where(peak, scores[part], -np.inf)
        start += ny * nx
    rows = np.flatnonzero((scores > settings.score_thresh).any(1))
    n_windows = len(windows)
    scores, windows, feats = scores[rows], windows[rows], feats[rows]
    # 5. per-class box regression of the kept windows, else the window itself
    k = scores.shape[1]
    if settings.bbox_regression and model.regressors is not None:
        deltas = model.deltas(feats)  # (N, K, 4)
        out_boxes = bx.decode(np.repeat(windows, k, axis=0),
                              deltas.reshape(-1, 4)).reshape(-1, k, 4)
    else:
        out_boxes = np.repeat(windows[:, None, :], k, axis=1)
    # 6. clip, threshold, per-class NMS, cap (detect's post-processing)
    b, sc, lab = postprocess(out_boxes, scores, image.shape[:2], settings)
    t2 = time.perf_counter()
    log.debug("dense: %d windows in %d shapes, %d local maxima, %d detections",
              n_windows, len(shapes), len(rows), len(b))
    return {"boxes": b, "scores": sc, "labels": lab,
            "times": {"features": t1 - t0, "scoring": t2 - t1}}
