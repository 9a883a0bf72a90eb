"""Multi-scale sliding windows (OverFeat-style exhaustive search), a proposal baseline.

Windows of several sizes and aspect ratios slide over the image with a stride that is a
fraction of the window size; the last window of each row and column is aligned with the image
edge so the border is covered. Sermanet et al. (OverFeat, ICLR 2014) slide a fixed window over
a pyramid of 6 image scales; sliding windows of several sizes over one image is the same set
of boxes up to rounding.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from .. import boxes as box_ops
from ..config import default
from .selective_search import DEFAULT_MIN_SIZE, DEFAULT_TOP_K, _check_settings, _empty, _finish

# Defaults: [propose] sliding_* of rcnn_cli/default.toml, the one place they are written.
#: Window sides as fractions of the image's shorter side (six scales, like OverFeat's six).
DEFAULT_SCALES: tuple[float, ...] = tuple(default("propose.sliding_scales"))
#: Width / height of the windows.
DEFAULT_ASPECT_RATIOS: tuple[float, ...] = tuple(default("propose.sliding_ratios"))
#: Stride as a fraction of the window's width (horizontally) and height (vertically).
DEFAULT_STRIDE_FRAC: float = default("propose.sliding_stride")


def sliding_windows(size: tuple[int, int], scales: tuple[float, ...] = DEFAULT_SCALES,
                    aspect_ratios: tuple[float, ...] = DEFAULT_ASPECT_RATIOS,
                    stride_frac: float = DEFAULT_STRIDE_FRAC, min_size: int = DEFAULT_MIN_SIZE,
                    top_k: int | None = DEFAULT_TOP_K
                    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Sliding windows over an image of ``size = (height, width)``.

    A window of scale ``s`` and aspect ratio ``a`` has area ``(s * min(H, W))**2`` and
    ``width / height = a`` (shrunk to fit inside the image, keeping ``a`` where the image
    allows). Its positions step by ``stride_frac`` times its width and height from the
    top-left corner, plus a last one flush with the right and bottom edges.

    Returns:
        (boxes (NDArray[N, 4] float32), scores (NDArray[N] float32)): unique windows
        x1, y1, x2, y2 at least ``min_size`` wide and high, larger windows first (raster
        order within a size), at most ``top_k``; ``scores`` = window area / image area.
    """
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (height, width) with both >= 1, got {size!r}")
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive fractions, got {scales!r}")
    if not aspect_ratios or min(aspect_ratios) <= 0:
        raise ValueError(f"aspect_ratios must be positive, got {aspect_ratios!r}")
    if not 0 < stride_frac <= 1:
        raise ValueError(f"stride_frac must be in (0, 1], got {stride_frac!r}")
    _check_settings(None, min_size, top_k)
    h, w = int(size[0]), int(size[1])
    out = []
    for s in scales:
        side = s * min(h, w)
        for a in aspect_ratios:
            ww, wh = min(side * np.sqrt(a), w), min(side / np.sqrt(a), h)
            xs = _positions(w, ww, stride_frac)
            ys = _positions(h, wh, stride_frac)
            gx, gy = np.meshgrid(xs, ys)
            x1, y1 = gx.ravel(), gy.ravel()
            out.append(np.stack([x1, y1, x1 + ww, y1 + wh], 1))
    if not out:
        return _empty()
    boxes = np.round(np.concatenate(out), 2).astype(np.float32)
    boxes = box_ops.clip(boxes, (h, w))
    # unique windows (first kept), larger first (stable: raster order within a size)
    _, first = np.unique(boxes, axis=0, return_index=True)
    boxes = boxes[np.sort(first)]
    scores = (box_ops.area(boxes) / float(h * w)).astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    return _finish(boxes[order], scores[order], min_size, top_k)


def _positions(length: int, window: float, stride_frac: float) -> NDArray[np.float64]:
    """Start coordinates of a ``window`` sliding over ``length`` (last one flush with the end)."""
    last = max(length - window, 0.0)
    pos = np.arange(0.0, last, max(stride_frac * window, 1.0))
    return np.append(pos, last)
