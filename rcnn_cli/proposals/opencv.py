"""OpenCV's selective search (``cv2.ximgproc.segmentation``), the peer we compare against.

OpenCV ranks boxes with the C library's ``rand()`` and never seeds it, so its order changes
from run to run. We call libc ``srand(seed)`` right before ``process()`` (under a lock, so
threads of this process do not interleave their seeding), which makes the order a function
of ``seed`` (tested). Where libc cannot be loaded the boxes are still returned, in OpenCV's
unseeded order.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading

import cv2
import numpy as np
from numpy.typing import NDArray

from .. import boxes as box_ops
from .selective_search import (
    DEFAULT_MAX_SIDE,
    DEFAULT_MIN_SIZE,
    DEFAULT_SEED,
    DEFAULT_STRATEGY,
    DEFAULT_TOP_K,
    _empty,
    _finish,
    prepare_input,
)

#: OpenCV's own strategies: switchToSingleStrategy (k=200 by default),
#: switchToSelectiveSearchFast (HSV, Lab; k = 150, 300), ...Quality (5 spaces; k = 150..600).
MODES = ("single", "fast", "quality")

_RAND_LOCK = threading.Lock()
_LIBC = None


def _libc():
    """The C library whose ``rand`` OpenCV calls (``None`` where it cannot be loaded)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)
            _LIBC.srand.argtypes = [ctypes.c_uint]
        except (OSError, AttributeError):  # pragma: no cover - exotic platforms
            _LIBC = False
    return _LIBC or None


def opencv_selective_search(image: NDArray[np.uint8], mode: str = DEFAULT_STRATEGY,
                            max_side: int | None = DEFAULT_MAX_SIDE,
                            min_size: int = DEFAULT_MIN_SIZE, top_k: int | None = DEFAULT_TOP_K,
                            seed: int = DEFAULT_SEED
                            ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """OpenCV selective search proposals of one image, reproducible for a given ``seed``.

    Args:
        image (NDArray[H, W, 3] uint8): RGB image (grey and RGBA accepted as in
            :func:`~rcnn_cli.proposals.selective_search`).
        mode: ``"single"``, ``"fast"`` or ``"quality"`` (OpenCV's switchTo... methods).
        max_side, min_size, top_k: as :func:`~rcnn_cli.proposals.selective_search`.
        seed: passed to libc ``srand`` before OpenCV's ranking.

    Returns:
        (boxes (NDArray[N, 4] float32), scores (NDArray[N] float32)): x1, y1, x2, y2 in
        original pixels in OpenCV's order, best first; ``scores = -rank``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    prepared = prepare_input(image, max_side, min_size, top_k)
    if prepared is None:
        return _empty()
    (h, w), small = prepared
    sh, sw = small.shape[:2]
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(small[:, :, ::-1]))  # OpenCV wants BGR
    if mode == "single":
        ss.switchToSingleStrategy()
    elif mode == "fast":
        ss.switchToSelectiveSearchFast()
    else:
        ss.switchToSelectiveSearchQuality()
    libc = _libc()
    with _RAND_LOCK:
        if libc is not None:
            libc.srand(seed & 0xFFFFFFFF)
        rects = ss.process()
    if rects is None or len(rects) == 0:
        return _empty()
    xywh = np.asarray(rects, np.float32).reshape(-1, 4)
    b = box_ops.from_xywh(xywh)
    b = box_ops.clip(box_ops.scale(b, h / sh, w / sw), (h, w))
    scores = -np.arange(len(b), dtype=np.float32)
    return _finish(b, scores, min_size, top_k)
