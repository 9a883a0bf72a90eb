"""Selective search object proposals (Uijlings et al., IJCV 2013), as R-CNN used them.

Recipe (each step a numba core in ``_felzenszwalb`` / ``_grouping``):

1. resize so the longer side is ``max_side`` (up or down, like R-CNN's
   ``selective_search_boxes.m``, which resizes every image to a canonical size "since
   proposals aren't scale invariant"); ``max_side=None`` keeps the image as it is;
2. per colour space: convert, Gaussian derivative texture bins (computed once);
3. per scale k: Felzenszwalb-Huttenlocher segmentation (sigma 0.8, min size k) in that
   colour space; region sizes, boxes, colour and texture histograms, adjacency (shared by
   the similarity sets);
4. per similarity set: hierarchical grouping; every region ever formed yields its box;
5. ranking as the paper and its reference code (``Image2HierarchicalGrouping.m``): the box
   merged at hierarchy level i (1 = the whole image, n - 1 = the first merge of n initial
   regions) gets ``RND * i``; the n initial regions, taken once per segmentation, all get
   ``RND * n``. RND is uniform in [0, 1) from ``numpy.random.default_rng([seed, s])`` for
   segmentation s (colour space, then k), drawn for the initial regions and then for each
   similarity set in order. Ascending order, duplicates removed (first kept), boxes
   narrower or shorter than ``min_size`` original pixels dropped, ``top_k`` kept.

The output depends only on the image and the arguments: no global RNG, no threads.
"""
from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

from .. import boxes as box_ops
from ..config import default
from ._felzenszwalb import FH_SIGMA, _fh_graph, _fh_segment, _smooth, scratch_array
from ._grouping import adjacency, hierarchical_grouping, region_features, texture_bins

#: Strategies of Uijlings et al. section 5.2 / table 5 (colour spaces, scales k, similarity
#: sets: C colour, T texture, S size, F fill). Groupings run in this nested order, and the
#: index s of a segmentation (colour space, then k) seeds the RND of its boxes.
STRATEGIES: dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]] = {
    "single": (("hsv",), (100,), ("CTSF",)),
    "fast": (("hsv", "lab"), (50, 100), ("CTSF", "TSF")),
    "quality": (("hsv", "lab", "rgi", "h", "i"), (50, 100, 150, 300),
                ("CTSF", "TSF", "F", "S")),
}
#: Uijlings et al. section 3.2: texture from Gaussian derivatives with sigma = 1.
TEXTURE_SIGMA = 1.0
# Defaults: [propose] of rcnn_cli/default.toml, the one place they are written.
#: R-CNN resizes images to 500 pixels before selective search (``rcnn_exp_cache...``).
DEFAULT_MAX_SIDE: int = default("propose.max_side")
#: Boxes narrower or shorter than this (original pixels) are dropped (the reference
#: ``FilterBoxesWidth(boxes, 20)`` in ``demoPascal2007.m``).
DEFAULT_MIN_SIZE: int = default("propose.min_size")
DEFAULT_TOP_K: int = default("propose.top_k")
DEFAULT_STRATEGY: str = default("propose.strategy")
DEFAULT_SEED: int = default("propose.seed")


def selective_search(image: NDArray[np.uint8], strategy: str = DEFAULT_STRATEGY,
                     max_side: int | None = DEFAULT_MAX_SIDE, min_size: int = DEFAULT_MIN_SIZE,
                     top_k: int | None = DEFAULT_TOP_K, seed: int = DEFAULT_SEED
                     ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Selective search proposals of one image.

    Args:
        image (NDArray[H, W, 3] uint8): RGB image; (H, W) grey, (H, W, 1) and (H, W, 4)
            (alpha ignored) are accepted too.
        strategy: ``"single"``, ``"fast"`` (R-CNN's choice) or ``"quality"``; see
            :data:`STRATEGIES`.
        max_side: the image is resized so its longer side is this many pixels (up or down)
            before segmentation; ``None`` or 0 keeps the original size.
        min_size: boxes narrower or shorter than this, in original pixels, are dropped.
        top_k: at most this many boxes are returned; ``None`` or 0 returns all.
        seed: seeds the pseudo-random ranking (with the grouping index).

    Returns:
        (boxes (NDArray[N, 4] float32), scores (NDArray[N] float32)): x1, y1, x2, y2 in
        continuous pixels of the original image, clipped to it, unique, best first;
        ``scores = -RND * level``, non-increasing. A region covering pixel columns
        ``xmin..xmax`` gives ``x1 = xmin, x2 = xmax + 1`` (then scaled back).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    prepared = prepare_input(image, max_side, min_size, top_k)
    if prepared is None:
        return _empty()
    (h, w), small = prepared
    sh, sw = small.shape[:2]

    spaces, scales, sims = STRATEGIES[strategy]
    all_boxes, all_priority = [], []
    seg = 0
    for space in spaces:
        # per colour space: the converted image, its FH graph and its texture bins
        cimg = convert_colour(small, space)
        # sorted edges, shared by every k; both in this thread's scratch memory
        graph = _fh_graph(_smooth(cimg, FH_SIGMA, reuse=True))
        need_t = any("T" in s for s in sims)
        tbins = _texture(cimg, reuse=True) if need_t else np.zeros((1, 1), np.uint8)
        need_c = any("C" in s for s in sims)
        for k in scales:
            # per scale: FH segments (min size k), region features, adjacency
            labels, n = _fh_segment(*graph, sh, sw, float(k), int(k))
            sizes, rboxes, colour, texture = region_features(labels, n, cimg, tbins,
                                                             need_c, need_t)
            pairs = adjacency(labels, n)
            rng = np.random.default_rng([seed, seg])
            # the initial regions, once per segmentation, at level n (reference code)
            all_boxes.append(rboxes)
            all_priority.append(rng.random(n) * n)
            for sim in sims:
                # per similarity set: the merged regions; the root is level 1
                hb = hierarchical_grouping(sizes, rboxes, colour, texture, pairs,
                                           "C" in sim, "T" in sim, "S" in sim, "F" in sim)[n:]
                levels = np.arange(len(hb), 0, -1, dtype=np.float64)
                all_boxes.append(hb)
                all_priority.append(rng.random(len(hb)) * levels)
            seg += 1
    ibox = np.concatenate(all_boxes)
    priority = np.concatenate(all_priority)
    # rank ascending (stable: ties keep grouping order), remove duplicates keeping the first
    order = np.argsort(priority, kind="stable")
    ibox, priority = ibox[order], priority[order]
    keep = np.sort(_first_unique(ibox, max(sh, sw)))
    ibox, priority = ibox[keep], priority[keep]
    # back to continuous original pixels, drop small boxes, cap
    out = _to_original(ibox, (sh, sw), (h, w))
    return _finish(out, (-priority).astype(np.float32), min_size, top_k)


# ---------------------------------------------------------------- shared helpers
def as_rgb(image: NDArray) -> NDArray[np.uint8]:
    """Check ``image`` and return it as C-contiguous uint8 (H, W, 3) RGB.

    Accepts (H, W) and (H, W, 1) grey (replicated) and (H, W, 4) (alpha dropped).
    Raises ValueError naming the argument, its shape or dtype otherwise.
    """
    if not isinstance(image, np.ndarray):
        # ValueError, not TypeError: every bad image is one kind of error for the CLI
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")  # noqa: TRY004
    if image.dtype != np.uint8:
        raise ValueError(f"image must have dtype uint8, got {image.dtype} "
                         f"(shape {image.shape})")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise ValueError("image must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) "
                         f"with H, W >= 1, got {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def resize_max_side(rgb: NDArray[np.uint8], max_side: int | None) -> NDArray[np.uint8]:
    """Resize (H, W, 3) so the longer side is ``max_side`` (area filter down, linear up)."""
    h, w = rgb.shape[:2]
    if not max_side or max(h, w) == max_side:
        return rgb
    s = max_side / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return cv2.resize(rgb, (nw, nh), interpolation=interp)


def convert_colour(rgb: NDArray[np.uint8], space: str) -> NDArray[np.uint8]:
    """RGB uint8 (H, W, 3) -> uint8 (H, W, C) in ``space`` (Uijlings et al. table 1).

    ``hsv`` (OpenCV full-range hue 0..255), ``lab`` (OpenCV 8-bit Lab), ``rgi``
    (normalised r, g and intensity), ``h`` (hue), ``i`` (intensity), ``rgb``.
    """
    if space == "rgb":
        return rgb
    if space == "hsv":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)
    if space == "lab":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)
    if space == "h":
        return np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)[:, :, :1])
    if space == "i":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:, :, None]
    if space == "rgi":
        f = rgb.astype(np.float32)
        total = f.sum(axis=2)
        safe = np.where(total > 0, total, 1.0)
        r = np.where(total > 0, f[:, :, 0] / safe, 1 / 3)
        g = np.where(total > 0, f[:, :, 1] / safe, 1 / 3)
        out = np.stack([r * 255, g * 255, total / 3], axis=2)
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    raise ValueError(f"unknown colour space {space!r}")


def _texture(cimg: NDArray[np.uint8], reuse: bool = False) -> NDArray[np.uint8]:
    """Texture histogram columns uint8 (C * 4, H * W) from Gaussian derivatives (sigma 1)
    of each channel: row ``j = ch * 4 + o`` holds ``j * 20 + b`` per pixel (paired
    orientations o and o + 4, see :func:`._grouping.texture_bins`).

    The derivatives are cv2 separable filters; binning (8 orientations, 10 bins, scaled by
    a high quantile of each orientation image) is :func:`._grouping.texture_bins`.
    ``reuse=True`` returns this thread's scratch memory (``scratch_array``), valid until
    the next such call; the derivatives are scratch either way.
    """
    radius = int(np.ceil(3 * TEXTURE_SIGMA))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    g = np.exp(-x * x / (2 * TEXTURE_SIGMA**2))
    g /= g.sum()
    # cv2 filters correlate (no kernel flip): this kernel gives +d/dx of the smoothed image
    dg = x / TEXTURE_SIGMA**2 * g
    h, w, c = cimg.shape
    # planar: texture_bins' loops vectorise
    gx = scratch_array("texture_gx", (c, h, w), np.float32)
    gy = scratch_array("texture_gy", (c, h, w), np.float32)
    for i in range(c):  # written in place (dst): 1.08x of this loop, the same values
        ch = cimg[:, :, i].astype(np.float32)
        cv2.sepFilter2D(ch, cv2.CV_32F, dg, g, dst=gx[i], borderType=cv2.BORDER_REPLICATE)
        cv2.sepFilter2D(ch, cv2.CV_32F, g, dg, dst=gy[i], borderType=cv2.BORDER_REPLICATE)
    # |cos gx + sin gy| <= sqrt(2) * 255 * sum|dg| for uint8 input
    bound = float(np.sqrt(2) * 255 * np.abs(dg).sum()) * 1.001
    out = (scratch_array("texture_bins", (c * 4, h * w), np.uint8) if reuse
           else np.empty((c * 4, h * w), np.uint8))
    return texture_bins(gx, gy, bound, scratch_array("texture_fine", (h * w,), np.int32), out)


def prepare_input(image: NDArray, max_side: int | None, min_size: int, top_k: int | None
                  ) -> tuple[tuple[int, int], NDArray[np.uint8]] | None:
    """Check settings, convert to RGB and resize: ((h, w) of the original, the resized RGB),
    or None for an image smaller than ``min_size`` (no box can be kept)."""
    _check_settings(max_side, min_size, top_k)
    rgb = as_rgb(image)
    h, w = rgb.shape[:2]
    if h < min_size or w < min_size:
        return None
    return (h, w), resize_max_side(rgb, max_side)


def _check_settings(max_side, min_size, top_k) -> None:
    """Raise ValueError on a negative size or cap."""
    if max_side is not None and (int(max_side) != max_side or max_side < 0):
        raise ValueError(f"max_side must be a non-negative integer or None, got {max_side!r}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size!r}")
    if top_k is not None and (int(top_k) != top_k or top_k < 0):
        raise ValueError(f"top_k must be a non-negative integer or None, got {top_k!r}")


def _first_unique(ibox: NDArray[np.int32], side: int) -> NDArray[np.intp]:
    """Index of the first occurrence of each distinct row of inclusive boxes (N, 4) whose
    coordinates lie in ``0..side - 1`` (one int64 key per box: faster than rows)."""
    if side > 1 << 15:
        return np.unique(ibox, axis=0, return_index=True)[1]
    k = ibox.astype(np.int64)
    key = ((k[:, 0] << 16 | k[:, 1]) << 16 | k[:, 2]) << 16 | k[:, 3]
    return np.unique(key, return_index=True)[1]


def _to_original(ibox: NDArray, small_size: tuple[int, int],
                 size: tuple[int, int]) -> NDArray[np.float32]:
    """Inclusive integer boxes (N, 4) of the resized image -> continuous original pixels."""
    (sh, sw), (h, w) = small_size, size
    b = ibox.astype(np.float32)
    b[:, 2:] += 1
    return box_ops.clip(box_ops.scale(b, h / sh, w / sw), (h, w))


def _finish(boxes: NDArray[np.float32], scores: NDArray[np.float32], min_size: float,
            top_k: int | None) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Drop boxes under ``min_size`` and keep the first ``top_k`` (already ranked)."""
    keep = box_ops.valid_mask(boxes, min_size)
    boxes, scores = boxes[keep], scores[keep]
    if top_k:
        boxes, scores = boxes[:top_k], scores[:top_k]
    return np.ascontiguousarray(boxes), np.ascontiguousarray(scores)


def _empty() -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
