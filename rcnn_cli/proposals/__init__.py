"""Object proposals: selective search (ours and OpenCV's), sliding windows, and their metrics.

``propose(image, method, **settings)`` is what the CLI calls; the functions below it can be
used directly.
"""
from __future__ import annotations

import inspect

import numpy as np
from numpy.typing import NDArray

from ..config import default
from ._felzenszwalb import felzenszwalb
from .metrics import plot_recall_curve, proposal_recall
from .opencv import opencv_selective_search
from .selective_search import STRATEGIES, selective_search
from .sliding import sliding_windows

__all__ = [
    "METHODS",
    "STRATEGIES",
    "felzenszwalb",
    "opencv_selective_search",
    "plot_recall_curve",
    "proposal_recall",
    "propose",
    "selective_search",
    "sliding_windows",
]

#: Proposal methods by name (the CLI's ``--method``).
METHODS = {"selective_search": selective_search, "opencv": opencv_selective_search,
           "sliding": sliding_windows}


def propose(image: NDArray[np.uint8], method: str = default("propose.method"), **settings
            ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Proposals of one image with ``method`` and its keyword ``settings``.

    Args:
        image (NDArray[H, W, 3] uint8): RGB image.
        method: ``"selective_search"``, ``"opencv"`` or ``"sliding"``.
        **settings: keyword arguments of that method's function (e.g. ``strategy``,
            ``max_side``, ``top_k`` for selective search; ``scales`` for sliding windows).

    Returns:
        (boxes (NDArray[N, 4] float32), scores (NDArray[N] float32)): x1y1x2y2 in original
        pixels, best first.

    Raises:
        ValueError: unknown method or a setting the method does not take.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    fn = METHODS[method]
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("image", "size")]
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for method {method!r}; "
                         f"accepted: {accepted}")
    if method == "sliding":
        if not isinstance(image, np.ndarray) or image.ndim not in (2, 3):
            raise ValueError(f"image must have shape (H, W) or (H, W, C), got "
                             f"{getattr(image, 'shape', type(image).__name__)}")
        return fn(image.shape[:2], **settings)
    return fn(image, **settings)
