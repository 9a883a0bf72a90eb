"""Tests of rcnn_cli.proposals: selective search, its cores, OpenCV's, sliding windows, metrics."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rcnn_cli import boxes as box_ops
from rcnn_cli.proposals import (
    STRATEGIES,
    felzenszwalb,
    opencv_selective_search,
    plot_recall_curve,
    proposal_recall,
    propose,
    selective_search,
    sliding_windows,
)
from rcnn_cli.proposals._grouping import adjacency, hierarchical_grouping, region_features

# ---------------------------------------------------------------- synthetic images
BG = (30, 110, 40)
RECTS = [  # (x1, y1, x2, y2) continuous pixels, colour
    ((20, 30, 70, 90), (230, 40, 40)),
    ((100, 20, 150, 60), (40, 60, 220)),
    ((90, 80, 140, 110), (240, 240, 60)),
]


def rect_image(h: int = 120, w: int = 160, rects=RECTS) -> np.ndarray:
    """Flat coloured rectangles on a flat background, uint8 (h, w, 3)."""
    im = np.empty((h, w, 3), np.uint8)
    im[:] = BG
    for (x1, y1, x2, y2), colour in rects:
        im[y1:y2, x1:x2] = colour
    return im


def textured_image(h: int = 90, w: int = 120, seed: int = 3) -> np.ndarray:
    """Blobs and smooth noise: a small image with many segments."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    im = np.zeros((h, w, 3), np.float64)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 30)
        im[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    im += rng.normal(0, 12, im.shape)
    return np.clip(im, 0, 255).astype(np.uint8)


def found(proposals: np.ndarray, box, tol: float) -> bool:
    """Is there a proposal whose every coordinate is within ``tol`` of ``box``?"""
    return bool((np.abs(proposals - np.asarray(box, np.float32)).max(axis=1) <= tol).any())


def check_properties(b: np.ndarray, s: np.ndarray, size, min_size: int, top_k: int | None):
    h, w = size
    assert b.dtype == np.float32 and s.dtype == np.float32
    assert b.ndim == 2 and b.shape[1] == 4 and s.shape == (len(b),)
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert (b[:, 2] - b[:, 0] >= min_size).all() and (b[:, 3] - b[:, 1] >= min_size).all()
    assert len(np.unique(b, axis=0)) == len(b)
    assert (np.diff(s) <= 0).all()
    if top_k:
        assert len(b) <= top_k


# ---------------------------------------------------------------- Felzenszwalb
def test_felzenszwalb_four_quadrants_give_four_segments():
    img = np.zeros((20, 21, 3), np.uint8)
    img[:10, 10:] = 50
    img[10:, :10] = 100
    img[10:, 10:] = 150
    labels, n = felzenszwalb(img, scale=100, sigma=0, min_size=1)
    assert n == 4 and labels.shape == (20, 21) and labels.dtype == np.int32
    for quad in (labels[:10, :10], labels[:10, 10:], labels[10:, :10], labels[10:, 10:]):
        assert len(np.unique(quad)) == 1
    assert len({labels[0, 0], labels[0, 20], labels[19, 0], labels[19, 20]}) == 4
    assert labels[0, 0] == 0  # numbered in raster order


def test_felzenszwalb_min_size_absorbs_small_segments_and_scale_merges():
    img = np.zeros((30, 30), np.uint8)
    img[5:8, 5:8] = 200  # a 9-pixel speck
    _, n_small = felzenszwalb(img, scale=1, sigma=0, min_size=1)
    _, n_absorbed = felzenszwalb(img, scale=1, sigma=0, min_size=10)
    assert n_small == 2 and n_absorbed == 1
    # a low-contrast step joins at a large scale k and stays apart at a small one
    step = np.zeros((20, 40), np.uint8)
    step[:, 20:] = 6
    assert felzenszwalb(step, scale=1, sigma=0, min_size=1)[1] == 2
    assert felzenszwalb(step, scale=5000, sigma=0, min_size=1)[1] == 1  # 5000/400 > 6


def _textbook_fh(code, weight, h, w, k, min_size):
    """Felzenszwalb-Huttenlocher's segment-graph on sorted edges, as their reference code
    writes it: union-find with ranks and full path compression, then the min-size pass;
    labels numbered in raster order of each component's first pixel."""
    from rcnn_cli.proposals._felzenszwalb import _DIR_SHIFT, _PIX_MASK
    parent, rank, size = list(range(h * w)), [0] * (h * w), [1] * (h * w)
    thresh = [k] * (h * w)

    def find(x):
        r = x
        while parent[r] != r:
            r = parent[r]
        while parent[x] != r:
            parent[x], x = r, parent[x]
        return r

    def join(a, b):
        if rank[a] < rank[b]:
            a, b = b, a
        parent[b] = a
        rank[a] += rank[a] == rank[b]
        size[a] += size[b]
        return a

    off = (1, w, w + 1, 1 - w)
    ends = [(int(c) & _PIX_MASK, (int(c) & _PIX_MASK) + off[int(c) >> _DIR_SHIFT]) for c in code]
    for (pa, pb), wt in zip(ends, weight.tolist()):
        a, b = find(pa), find(pb)
        if a != b and wt <= thresh[a] and wt <= thresh[b]:
            a = join(a, b)
            thresh[a] = float(np.float32(wt + k / size[a]))
    for pa, pb in ends:
        a, b = find(pa), find(pb)
        if a != b and (size[a] < min_size or size[b] < min_size):
            join(a, b)
    first: dict[int, int] = {}
    return np.array([first.setdefault(find(p), len(first)) for p in range(h * w)]
                    ).reshape(h, w), len(first)


@pytest.mark.parametrize("k, min_size", [(50, 50), (100, 100), (8, 1), (300, 300)])
def test_fh_segment_equals_the_textbook_union_find(k, min_size):
    # the quick-find core joins exactly what the reference's union-find joins, edge by edge
    from rcnn_cli.proposals._felzenszwalb import FH_SIGMA, _fh_graph, _fh_segment, _smooth
    for img in (textured_image(37, 53, seed=5), textured_image(64, 41, seed=9),
                rect_image(40, 60)):
        h, w = img.shape[:2]
        code, weight = _fh_graph(_smooth(img, FH_SIGMA))
        labels, n = _fh_segment(code, weight, h, w, float(k), min_size)
        ref, n_ref = _textbook_fh(code, weight, h, w, np.float32(k), min_size)
        assert n == n_ref and n > 1
        np.testing.assert_array_equal(labels, ref)


def test_fh_component_sizes_stay_exact_beyond_float32(monkeypatch):
    # from 2^24 pixels (an image over 16.7 MP with max_side 0) a float32 size would stop
    # counting: 2^24 + 1 rounds to 2^24. There the per-root records are float64, with the
    # thresholds still rounded to float32, so the labels are the same as with float32 records
    import rcnn_cli.proposals._felzenszwalb as F
    assert np.float32(1 << 24) + np.float32(1) == np.float32(1 << 24)
    root, rec = np.arange(2, dtype=np.int32), np.array([[50, 1 << 24], [50, 1]], np.float64)
    nxt = root.copy()
    assert F._absorb(root, nxt, rec, 1, 0) == 0  # the larger one is kept, either order
    assert rec[0, 1] == (1 << 24) + 1 and root.tolist() == [0, 0] and nxt.tolist() == [1, 0]
    img = textured_image(37, 53, seed=5)
    code, weight = F._fh_graph(F._smooth(img, F.FH_SIGMA))
    small = F._fh_segment(code, weight, 37, 53, 50.0, 50)
    monkeypatch.setattr(F, "_F32_EXACT", 100)  # this image takes the float64 path
    wide = F._fh_segment(code, weight, 37, 53, 50.0, 50)
    assert small[1] == wide[1] > 1
    np.testing.assert_array_equal(small[0], wide[0])


@pytest.mark.parametrize("c", [1, 3, 4])
def test_fh_graph_equals_the_edges_written_in_numpy(c):
    # 3 channels take a fused one-pass loop, the others a channel-by-channel one: both give
    # the edges of the reference's four directions, float32 squares summed in float64,
    # stably sorted by the weight's 1/16 bucket
    from rcnn_cli.proposals._felzenszwalb import _DIR_SHIFT, _DIRECTIONS, _fh_graph
    img = np.random.default_rng(c).uniform(0, 255, (23, 31, c)).astype(np.float32)
    h, w = img.shape[:2]
    codes, weights = [], []
    for d, (dy, dx) in enumerate(_DIRECTIONS):
        ys = np.arange(1 if dy < 0 else 0, h - 1 if dy > 0 else h)
        xs = np.arange(w - 1 if dx > 0 else w)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        sq = np.zeros(yy.shape)
        for ch in range(c):
            diff = img[yy, xx, ch] - img[yy + dy, xx + dx, ch]  # float32
            sq += diff * diff  # a float32 square, summed in float64
        weights.append(np.sqrt(sq).astype(np.float32).ravel())
        codes.append(((d << _DIR_SHIFT) | (yy * w + xx)).astype(np.int32).ravel())
    code, weight = np.concatenate(codes), np.concatenate(weights)
    order = np.argsort((weight * np.float32(16)).astype(np.int32), kind="stable")
    got_code, got_weight = _fh_graph(img)
    np.testing.assert_array_equal(got_code, code[order])
    np.testing.assert_array_equal(got_weight, weight[order])


def test_fh_graph_reuses_its_threads_scratch_and_threads_do_not_share_it(monkeypatch):
    # one thread's graphs come from the same scratch memory (no fresh pages per call), up to
    # _SCRATCH_BYTES; each thread has its own, so selective search in threads (its kernels
    # release the GIL) gives the boxes it gives alone
    import threading

    import rcnn_cli.proposals._felzenszwalb as F

    F._scratch.__dict__.clear()  # whatever earlier tests left in this thread
    a = F._smooth(textured_image(40, 50, seed=1), F.FH_SIGMA)
    b = F._smooth(textured_image(30, 40, seed=2), F.FH_SIGMA)
    first = [x.copy() for x in F._fh_graph(a)]
    code_b, _ = F._fh_graph(b)
    again = F._fh_graph(a)
    assert np.shares_memory(code_b, again[0])  # the same scratch, smaller image first
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    monkeypatch.setattr(F, "_SCRATCH_BYTES", 0)  # a graph larger than the bound: not kept
    F._scratch.__dict__.clear()
    big = F._smooth(textured_image(60, 70, seed=3), F.FH_SIGMA)
    assert not np.shares_memory(F._fh_graph(big)[0], F._fh_graph(big)[0])
    monkeypatch.undo()
    images = [textured_image(70 + 9 * i, 90, seed=i) for i in range(4)]
    alone = [selective_search(im, max_side=None) for im in images]
    together: dict[int, tuple] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(
        i, selective_search(images[i], max_side=None))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        np.testing.assert_array_equal(together[i][0], alone[i][0])


def test_scratch_smoothing_and_texture_equal_fresh_arrays_and_reuse_their_memory():
    # selective search smooths and bins texture in this thread's scratch memory (no fresh
    # pages per image): the same values as fresh arrays, and one buffer per name
    import rcnn_cli.proposals._felzenszwalb as F
    from rcnn_cli.proposals.selective_search import _texture

    a, b = textured_image(40, 50, seed=1), textured_image(40, 50, seed=2)
    first = F._smooth(a, F.FH_SIGMA, reuse=True)
    np.testing.assert_array_equal(first, F._smooth(a, F.FH_SIGMA))
    again = F._smooth(b, F.FH_SIGMA, reuse=True)
    assert np.shares_memory(first, again)
    np.testing.assert_array_equal(again, F._smooth(b, F.FH_SIGMA))
    cols = _texture(a, reuse=True)
    np.testing.assert_array_equal(cols, _texture(a))
    assert np.shares_memory(cols, _texture(b, reuse=True))
    assert not np.shares_memory(_texture(a), _texture(a))
    x = F.scratch_array("test", (3, 4), np.float64)
    assert x.shape == (3, 4) and x.dtype == np.float64 and x.flags.c_contiguous
    assert np.shares_memory(x, F.scratch_array("test", (2,), np.int32))
    assert not np.shares_memory(x, F.scratch_array("other", (2,), np.int32))


def test_felzenszwalb_float_images_keep_the_weight_order():
    # a float image in [0, 1]: the edge sort buckets weights at 1/16 of a 0..255 level, so
    # unscaled every weight here fell in bucket 0 and the edges ran in raster order; a row's
    # left run then swallowed the step. Scaled to 0..255 (k with it), the halves stay apart
    rng = np.random.default_rng(0)
    img = np.zeros((20, 20))
    img[:, 10:] = 0.03
    img += rng.uniform(0, 1e-4, img.shape)
    labels, n = felzenszwalb(img, scale=1.0, sigma=0, min_size=1)
    assert n == 2 and (labels[:, :10] == 0).all() and (labels[:, 10:] == 1).all()


def test_felzenszwalb_scales_any_range_like_uint8():
    # FH is unchanged when the image and k scale together: a float or uint16 copy of a
    # uint8 image (spanning 0..255) with k scaled alike gives the uint8 image's labels
    u8 = textured_image(40, 50, seed=4)
    u8[0, 0] = (0, 0, 0)
    u8[0, 1] = (255, 255, 255)
    want = felzenszwalb(u8, scale=255, sigma=0.8, min_size=20)
    got = felzenszwalb(u8 / 255.0, scale=1.0, sigma=0.8, min_size=20)
    np.testing.assert_array_equal(got[0], want[0])
    wide = felzenszwalb(u8.astype(np.uint16) * 257, scale=255 * 257, sigma=0.8, min_size=20)
    np.testing.assert_array_equal(wide[0], want[0])
    huge = np.zeros((8, 8))
    huge[:, 4:] = 1e30  # no overflow to inf, no bucket array sized by the range
    assert felzenszwalb(huge, scale=1e29, sigma=0, min_size=1)[1] == 2


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_felzenszwalb_rejects_non_finite_images(value):
    img = np.zeros((6, 6), np.float32)
    img[2, 3] = value
    with pytest.raises(ValueError, match="finite"):
        felzenszwalb(img)


def test_scratch_memory_per_thread_stays_under_its_bound(monkeypatch):
    # the named buffers together, not each, stay under _SCRATCH_BYTES: a large image
    # allocates what does not fit per call and gives the same boxes
    import rcnn_cli.proposals._felzenszwalb as F

    img = textured_image(120, 160, seed=6)
    want = selective_search(img, max_side=None)
    monkeypatch.setattr(F, "_SCRATCH_BYTES", 1 << 20)
    F._scratch.__dict__.clear()
    got = selective_search(img, max_side=None)
    assert sum(b.nbytes for b in F._scratch.pool.values()) <= 1 << 20
    assert F._scratch.pool  # the small buffers are still kept
    np.testing.assert_array_equal(got[0], want[0])
    F._scratch.__dict__.clear()


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 3, 4, 5), np.uint8), r"image.*\(2, 3, 4, 5\)"),
    (np.zeros((0, 5), np.uint8), r"image.*\(0, 5\)"),
    (np.zeros((4, 4), np.complex64), r"image.*complex64"),
])
def test_felzenszwalb_rejects_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        felzenszwalb(bad)


def test_felzenszwalb_rejects_bad_scale():
    with pytest.raises(ValueError, match="scale"):
        felzenszwalb(np.zeros((4, 4), np.uint8), scale=0)


# ---------------------------------------------------------------- grouping core
def _orientation_bins(cols: np.ndarray, c: int) -> np.ndarray:
    """texture_bins' paired columns (C * 4, H * W) -> the bin of each pixel, channel and
    orientation (H * W, C, 8): of each opposite pair o, o + 4 one is 0."""
    v = cols.astype(np.int64) - (np.arange(c * 4) * 20)[:, None]
    assert ((v >= 0) & (v < 20)).all()
    pos = np.where(v < 10, v, 0).reshape(c, 4, -1)
    neg = np.where(v >= 10, v - 10, 0).reshape(c, 4, -1)
    return np.concatenate([pos, neg], axis=1).transpose(2, 0, 1)


def test_texture_bins_of_a_vertical_step_edge():
    from rcnn_cli.proposals.selective_search import _texture

    img = np.zeros((20, 20, 1), np.uint8)
    img[:, 10:] = 200  # dark -> bright from left to right: d/dx > 0, d/dy = 0
    cols = _texture(img)  # paired columns (ch * 4 + o) * 20 + b, planar
    assert cols.shape == (4, 400) and cols.dtype == np.uint8
    tb = _orientation_bins(cols, 1).reshape(20, 20, 1, 8)  # bin per pixel, channel, orientation
    assert tb[:, :, 0, 0].max() == 9 and (tb[:, 8:12, 0, 0] > 0).all()  # 0 degrees fires
    assert (tb[:, :6, 0, 0] == 0).all() and (tb[:, 14:, 0, 0] == 0).all()  # flat: nothing
    for o in (2, 4, 6):  # 90, 180, 270 degrees: no response
        assert (tb[:, :, 0, o] == 0).all(), o
    assert tb[:, :, 0, 1].max() > 0 and tb[:, :, 0, 7].max() > 0  # +-45 degrees see it too
    assert (tb[:, :, 0, 3] == 0).all() and (tb[:, :, 0, 5] == 0).all()


def _texture_reference(gx, gy, bound):
    """texture_bins written plainly in numpy (every orientation's maximum computed, the
    quantile from the whole fine histogram): the scales (C, 4, 2) of each orientation pair's
    positive and negative part, the bins per pixel, channel and orientation (H * W, C, 8),
    and for each pair and sign whether the quantile's bin lay two bins below the largest
    response's."""
    from rcnn_cli.proposals._grouping import _QUANTILE_BINS as nb
    c = gx.shape[0]
    fx, fy = gx.reshape(c, -1), gy.reshape(c, -1)
    npx = fx.shape[1]
    cs = np.array([1.0, 0.70710678, 0.0, -0.70710678], np.float32)
    sn = np.array([0.0, 0.70710678, 1.0, 0.70710678], np.float32)
    fine = np.float32((nb - 1) / bound)
    scales = np.zeros((c, 4, 2), np.float32)
    bins = np.zeros((npx, c, 8), np.int64)
    far = []
    for ch in range(c):
        for o in range(4):
            d = cs[o] * fx[ch] + sn[o] * fy[ch]  # float32 throughout, as the kernel
            parts = (np.maximum(d, 0), np.maximum(-d, 0))
            for k, part in enumerate(parts):
                top = float(part.max())
                if top > 0:
                    b = np.minimum((part * fine).astype(np.int32), nb - 1)
                    i = int(np.argmax(np.cumsum(np.bincount(b, minlength=nb)) >= 0.99 * npx))
                    far.append(0 < i < b.max() - 1)
                    if i > 0:
                        top = min((i + 1) / float(fine), top)
                    scales[ch, o, k] = np.float32(10 / top)
                bins[:, ch, o + 4 * k] = np.minimum((part * scales[ch, o, k]).astype(np.int32), 9)
    return scales, bins, far


def _derivatives(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Planar float32 x and y Gaussian derivatives of a uint8 (H, W, C) image, as _texture."""
    import cv2

    from rcnn_cli.proposals.selective_search import TEXTURE_SIGMA
    x = np.arange(-3, 4, dtype=np.float32)
    g = np.exp(-x * x / (2 * TEXTURE_SIGMA ** 2))
    g /= g.sum()
    dg = x / TEXTURE_SIGMA ** 2 * g
    c = img.shape[2]
    gx = np.empty((c, *img.shape[:2]), np.float32)
    gy = np.empty_like(gx)
    for i in range(c):
        ch = img[:, :, i].astype(np.float32)
        gx[i] = cv2.sepFilter2D(ch, cv2.CV_32F, dg, g, borderType=cv2.BORDER_REPLICATE)
        gy[i] = cv2.sepFilter2D(ch, cv2.CV_32F, g, dg, borderType=cv2.BORDER_REPLICATE)
    return gx, gy


@pytest.mark.parametrize("kind", ["textured", "step", "flat", "speck", "top_bin"])
def test_texture_bins_equal_the_plain_quantile_histogram(kind):
    # the kernel skips the maximum where the quantile lies two bins below the largest
    # response; either way its scales and bins are the plain algorithm's
    from rcnn_cli.proposals._grouping import _QUANTILE_BINS, _pair_scales, texture_bins
    rng = np.random.default_rng(5)
    bound = 300.0
    if kind == "top_bin":  # 3 % of the responses, all in the largest one's fine bin
        width = bound / (_QUANTILE_BINS - 1)
        gx = np.zeros((3, 60, 80), np.float32)
        hit = rng.random(gx.shape) < 0.03
        gx[hit] = (2 + rng.uniform(0.05, 0.95, hit.sum())) * width
        gy = np.zeros_like(gx)
    else:
        img = np.full((60, 80, 3), 90, np.uint8)
        if kind == "textured":
            img = textured_image(60, 80, seed=2)
        elif kind == "step":
            img[:, 25:] = (200, 30, 140)
        elif kind == "speck":  # responses at under 1 % of the pixels: the quantile is bin 0
            img[30, 40] = 255
        gx, gy = _derivatives(img)
    scales, bins, far = _texture_reference(gx, gy, bound)
    got = texture_bins(gx, gy, bound, np.empty(60 * 80, np.int32), np.empty((12, 60 * 80), np.uint8))
    np.testing.assert_array_equal(_orientation_bins(got, 3), bins)
    fine = np.float32((_QUANTILE_BINS - 1) / bound)
    fine_bin = np.empty(60 * 80, np.int32)
    counts = np.zeros((2, 2 * _QUANTILE_BINS), np.int32)
    cs = np.array([1.0, 0.70710678, 0.0, -0.70710678], np.float32)
    sn = np.array([0.0, 0.70710678, 1.0, 0.70710678], np.float32)
    for ch in range(3):
        for o in range(4):
            got = _pair_scales(gx[ch].ravel(), gy[ch].ravel(), cs[o], sn[o], fine,
                               fine_bin, counts)
            assert got == tuple(scales[ch, o]), (ch, o)
    if kind == "textured":
        assert far and all(far)  # the maximum skipped everywhere
    else:
        assert not all(far)  # the maximum needed somewhere


def test_region_texture_histograms_count_every_orientation():
    # one count per opposite pair and pixel gives the same histograms as counting each of the
    # 8 orientations' bins (column (ch * 8 + o) * 10 + bin), and the colour ones are plain
    from rcnn_cli.proposals.selective_search import _texture
    img = textured_image(50, 70, seed=11)
    labels, n = felzenszwalb(img, scale=30, min_size=10)
    cols = _texture(img)
    sizes, rboxes, colour, texture = region_features(labels, n, img, cols, True, True)
    tb = _orientation_bins(cols, 3)  # (H * W, 3, 8)
    lab = labels.ravel()
    want = np.zeros((n, 240))
    for ch in range(3):
        for o in range(8):
            np.add.at(want, (lab, (ch * 8 + o) * 10 + tb[:, ch, o]), 1)
    np.testing.assert_array_equal(texture, (want / (sizes[:, None] * 24)).astype(np.float32))
    want_c = np.zeros((n, 75))
    for ch in range(3):
        np.add.at(want_c, (lab, ch * 25 + img[:, :, ch].ravel().astype(int) * 25 // 256), 1)
    np.testing.assert_array_equal(colour, (want_c / (sizes[:, None] * 3)).astype(np.float32))
    assert sizes.tolist() == np.bincount(lab, minlength=n).tolist() and n > 10
    for r in (0, n // 2, n - 1):
        ys, xs = np.nonzero(labels == r)
        assert rboxes[r].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]


def test_grouping_merges_most_similar_pair_first():
    # three 10x10 regions in a row: A (0) and B (1) nearly the same red, C (2) blue
    labels = np.repeat(np.repeat(np.array([[0, 1, 2]], np.int32), 10, 0), 10, 1)
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, :10] = (200, 10, 10)
    img[:, 10:20] = (205, 10, 10)
    img[:, 20:] = (10, 10, 200)
    tb = np.repeat(np.arange(12, dtype=np.uint8)[:, None] * 20, 300, 1)  # every bin 0
    sizes, rboxes, colour, texture = region_features(labels, 3, img, tb, True, True)
    assert sizes.tolist() == [100, 100, 100]
    assert rboxes.tolist() == [[0, 0, 9, 9], [10, 0, 19, 9], [20, 0, 29, 9]]
    np.testing.assert_allclose(colour.sum(1), 1, rtol=1e-6)
    np.testing.assert_allclose(texture.sum(1), 1, rtol=1e-6)
    # every pixel lands in bin 0 of each of the 24 channel-orientation blocks
    np.testing.assert_allclose(texture[:, ::10], 1 / 24, rtol=1e-6)
    assert (np.delete(texture, np.s_[::10], axis=1) == 0).all()
    pairs = adjacency(labels, 3)
    assert pairs.tolist() == [[0, 1], [1, 2]]
    out = hierarchical_grouping(sizes, rboxes, colour, texture, pairs, True, False, False, False)
    # creation order: A, B, C, then A+B (colour-similar), then everything
    assert out.tolist() == [[0, 0, 9, 9], [10, 0, 19, 9], [20, 0, 29, 9],
                            [0, 0, 19, 9], [0, 0, 29, 9]]


def test_grouping_size_similarity_prefers_small_regions():
    # A (40 px) | B (10 px) | C (10 px): by size alone B+C merge first
    labels = np.zeros((10, 6), np.int32)
    labels[:, 4] = 1
    labels[:, 5] = 2
    img = np.zeros((10, 6, 3), np.uint8)
    tb = np.zeros((12, 60), np.uint8)  # unused: no texture similarity
    sizes, rboxes, colour, texture = region_features(labels, 3, img, tb, False, False)
    pairs = adjacency(labels, 3)
    out = hierarchical_grouping(sizes, rboxes, colour, texture, pairs, False, False, True, False)
    assert out[3].tolist() == [4, 0, 5, 9]
    assert out[4].tolist() == [0, 0, 5, 9]


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 200])
def test_adjacency_bit_matrix_equals_the_sorted_keys(monkeypatch, n):
    # up to _BITMAP_REGIONS regions the pairs come from an n x n bit matrix, beyond from a
    # sort of their keys: the same sorted pairs (word edges at 64 regions included)
    import rcnn_cli.proposals._grouping as G
    labels = np.random.default_rng(n).integers(0, n, (19, 23)).astype(np.int32)
    labels[0, :2] = (0, n - 1)  # the first and last region touch
    bits = G.adjacency(labels, n)
    monkeypatch.setattr(G, "_BITMAP_REGIONS", 0)
    keys = G.adjacency(labels, n)
    want = sorted({(min(a, b), max(a, b)) for a, b in
                   [*zip(labels[:, :-1].ravel(), labels[:, 1:].ravel()),
                    *zip(labels[:-1].ravel(), labels[1:].ravel())] if a != b})
    assert bits.dtype == keys.dtype == np.int64 and bits.shape == (len(want), 2)
    assert bits.tolist() == keys.tolist() == [list(p) for p in want]
    assert n == 1 or (0, n - 1) in want


def _plain_grouping(sizes, boxes, colour, texture, pairs, use):
    """Uijlings et al.'s grouping written plainly: merge the most similar adjacent pair (ties:
    smaller ids), new region = size-weighted mean histograms. Returns the boxes in creation
    order and how many neighbour pairs were ever formed (initial + after merges)."""
    n = len(sizes)
    size, box = list(sizes), [list(b) for b in boxes]
    ch, th = list(colour), list(texture)
    im_size = float(sum(sizes))
    nbrs = {r: set() for r in range(n)}
    for a, b in pairs.tolist():
        nbrs[a].add(b)
        nbrs[b].add(a)
    formed = len(pairs)

    def sim(a, b):
        s = 0.0
        if use[0]:
            s += np.minimum(ch[a], ch[b]).astype(np.float64).sum()
        if use[1]:
            s += np.minimum(th[a], th[b]).astype(np.float64).sum()
        if use[2]:
            s += 1.0 - (size[a] + size[b]) / im_size
        if use[3]:
            bw = max(box[a][2], box[b][2]) - min(box[a][0], box[b][0]) + 1
            bh = max(box[a][3], box[b][3]) - min(box[a][1], box[b][1]) + 1
            s += 1.0 - (bw * bh - size[a] - size[b]) / im_size
        return s

    while any(nbrs.values()):
        _, i, j = min((-sim(a, b), a, b) for a in nbrs for b in nbrs[a] if a < b)
        t = len(size)
        si, sj = size[i], size[j]
        size.append(si + sj)
        box.append([min(box[i][0], box[j][0]), min(box[i][1], box[j][1]),
                    max(box[i][2], box[j][2]), max(box[i][3], box[j][3])])
        wi, wj = si / (si + sj), sj / (si + sj)
        ch.append((wi * ch[i] + wj * ch[j]).astype(np.float32))
        th.append((wi * th[i] + wj * th[j]).astype(np.float32))
        nbrs[t] = (nbrs.pop(i) | nbrs.pop(j)) - {i, j}
        for x in nbrs[t]:
            nbrs[x] -= {i, j}
            nbrs[x].add(t)
        formed += len(nbrs[t])
    return np.array(box, np.int32), formed


@pytest.mark.parametrize("use", [(True, True, True, True), (False, True, True, True),
                                 (False, False, True, False), (False, False, False, True)])
def test_grouping_equals_the_plain_algorithm_and_grows_its_arrays(use):
    # the heap / linked-list core merges exactly what the plain algorithm merges, on a
    # segmentation with enough merges that its neighbour lists outgrow their first capacity
    # (4 P + 16 entries for P initial pairs): the merge loop's return to grow them runs too
    from rcnn_cli.proposals.selective_search import _texture
    img = textured_image(60, 80, seed=7)
    labels, n = felzenszwalb(img, scale=20, min_size=5)
    sizes, rboxes, colour, texture = region_features(labels, n, img, _texture(img), True, True)
    pairs = adjacency(labels, n)
    out = hierarchical_grouping(sizes, rboxes, colour, texture, pairs, *use)
    ref, formed = _plain_grouping(sizes, rboxes, colour, texture, pairs, use)
    assert 2 * formed > 4 * len(pairs) + 16
    assert len(out) == 2 * n - 1 and n > 40
    np.testing.assert_array_equal(out, ref)


# ---------------------------------------------------------------- selective search
@pytest.mark.parametrize("strategy", ["single", "fast"])
def test_selective_search_finds_flat_rectangles(strategy):
    im = rect_image()
    b, s = selective_search(im, strategy, max_side=None, top_k=None)
    for box, _ in RECTS:
        assert found(b, box, tol=1.0), box
    assert found(b, (0, 0, 160, 120), tol=0)  # the root region is the whole image
    check_properties(b, s, im.shape[:2], 20, None)


def test_selective_search_maps_resized_boxes_back():
    im = rect_image()
    # halved for segmentation (160 -> 80): within one resized pixel (2 px)
    b, _ = selective_search(im, "single", max_side=80, top_k=None)
    for box, _ in RECTS:
        assert found(b, box, tol=2.0), box
    np.testing.assert_array_equal(b % 2, 0)  # every resized pixel edge maps to an even one
    # doubled (upscaled) works too
    b2, _ = selective_search(im, "single", max_side=320, top_k=None)
    for box, _ in RECTS:
        assert found(b2, box, tol=1.0), box


def test_selective_search_properties_and_caps():
    im = textured_image()
    b, s = selective_search(im, "fast", max_side=120, min_size=10, top_k=None)
    check_properties(b, s, im.shape[:2], 10, None)
    assert len(b) > 50
    b2, s2 = selective_search(im, "fast", max_side=120, min_size=10, top_k=25)
    assert len(b2) == 25
    np.testing.assert_array_equal(b2, b[:25])
    np.testing.assert_array_equal(s2, s[:25])
    b3, _ = selective_search(im, "fast", max_side=120, min_size=30, top_k=None)
    np.testing.assert_array_equal(b3, b[box_ops.valid_mask(b, 30)])


def test_selective_search_quality_is_a_superset_in_spirit():
    im = textured_image()
    bf, _ = selective_search(im, "fast", max_side=120, min_size=5, top_k=None)
    bq, sq = selective_search(im, "quality", max_side=120, min_size=5, top_k=None)
    check_properties(bq, sq, im.shape[:2], 5, None)
    assert len(bq) > len(bf)
    assert len(STRATEGIES["quality"][0]) * len(STRATEGIES["quality"][1]) * 4 == 80


def test_selective_search_is_deterministic_and_seeded():
    im = textured_image()
    b1, s1 = selective_search(im, "fast", max_side=120, top_k=None, seed=0)
    b2, s2 = selective_search(im.copy(), "fast", max_side=120, top_k=None, seed=0)
    np.testing.assert_array_equal(b1, b2)
    np.testing.assert_array_equal(s1, s2)
    b3, _ = selective_search(im, "fast", max_side=120, top_k=None, seed=1)
    assert not np.array_equal(b1, b3)  # another ranking ...
    # ... of the same set of boxes
    assert {tuple(r) for r in b1.tolist()} == {tuple(r) for r in b3.tolist()}


def test_selective_search_grey_and_rgba_inputs():
    rgb = rect_image()
    grey = rgb.mean(axis=2).astype(np.uint8)
    ref = selective_search(np.repeat(grey[:, :, None], 3, axis=2), "single", max_side=None)
    for variant in (grey, grey[:, :, None]):
        out = selective_search(variant, "single", max_side=None)
        np.testing.assert_array_equal(out[0], ref[0])
        np.testing.assert_array_equal(out[1], ref[1])
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(selective_search(rgba, "single", max_side=None)[0],
                                  selective_search(rgb, "single", max_side=None)[0])
    # a greyscale photo still yields its flat rectangles
    for box, _ in RECTS:
        assert found(ref[0], box, tol=1.0), box


def test_selective_search_tiny_and_huge_images():
    b, s = selective_search(np.zeros((10, 12, 3), np.uint8))
    assert b.shape == (0, 4) and s.shape == (0,)
    b, s = selective_search(np.full((1, 1, 3), 9, np.uint8), min_size=0)
    np.testing.assert_array_equal(b, [[0, 0, 1, 1]])
    b, s = selective_search(textured_image(8, 6), "single", min_size=2, max_side=None)
    check_properties(b, s, (8, 6), 2, None)
    b, _ = selective_search(np.zeros((1, 300, 3), np.uint8), "single", min_size=0)
    assert len(b) >= 1 and (b[:, 3] <= 1).all()
    # 12 MP: segmentation runs at max_side, boxes come back in original pixels
    big = np.empty((3000, 4000, 3), np.uint8)
    big[:] = BG
    big[1000:2000, 500:1500] = (230, 40, 40)
    b, _ = selective_search(big, "single", max_side=200)
    assert found(b, (500, 1000, 1500, 2000), tol=20)  # one resized pixel is 20 px


@pytest.mark.parametrize("image, match", [
    (np.zeros((20, 20, 3), np.float32), r"image.*uint8.*float32"),
    (np.zeros((20, 20, 2), np.uint8), r"image.*\(20, 20, 2\)"),
    (np.zeros((2, 20, 20, 3), np.uint8), r"image.*\(2, 20, 20, 3\)"),
    (np.zeros((0, 20, 3), np.uint8), r"image.*\(0, 20, 3\)"),
    ([[1, 2], [3, 4]], r"image.*numpy array"),
])
def test_selective_search_rejects_bad_images(image, match):
    with pytest.raises(ValueError, match=match):
        selective_search(image)


@pytest.mark.parametrize("kwargs, match", [
    ({"strategy": "slow"}, "strategy"),
    ({"top_k": -1}, "top_k"),
    ({"max_side": -5}, "max_side"),
    ({"min_size": -1}, "min_size"),
])
def test_selective_search_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        selective_search(rect_image(), **kwargs)


# ---------------------------------------------------------------- OpenCV peer
def test_opencv_selective_search_is_reproducible():
    im = textured_image()
    b1, s1 = opencv_selective_search(im, "single", max_side=120, min_size=5, top_k=None, seed=3)
    b2, s2 = opencv_selective_search(im, "single", max_side=120, min_size=5, top_k=None, seed=3)
    np.testing.assert_array_equal(b1, b2)
    np.testing.assert_array_equal(s1, s2)
    check_properties(b1, s1, im.shape[:2], 5, None)
    b3, _ = opencv_selective_search(im, "single", max_side=120, min_size=5, top_k=None, seed=4)
    assert {tuple(r) for r in b1.tolist()} == {tuple(r) for r in b3.tolist()}
    assert not np.array_equal(b1, b3)
    b4, _ = opencv_selective_search(im, "single", max_side=120, min_size=5, top_k=7, seed=3)
    np.testing.assert_array_equal(b4, b1[:7])


def test_opencv_selective_search_finds_rectangles_and_checks_input():
    b, _ = opencv_selective_search(rect_image(), "single", max_side=None, top_k=None)
    for box, _ in RECTS:
        assert found(b, box, tol=1.0), box
    with pytest.raises(ValueError, match="mode"):
        opencv_selective_search(rect_image(), mode="fastest")
    with pytest.raises(ValueError, match=r"image.*\(5, 5, 5\)"):
        opencv_selective_search(np.zeros((5, 5, 5), np.uint8))


# ---------------------------------------------------------------- sliding windows
def test_sliding_windows_geometry():
    b, s = sliding_windows((100, 200), scales=(0.5,), aspect_ratios=(1.0,), stride_frac=0.5,
                           min_size=0, top_k=None)
    # 50 x 50 windows, stride 25: x in 0, 25, ..., 150 (7), y in 0, 25, 50 (3)
    assert len(b) == 21
    assert set(b[:, 0].tolist()) == {0, 25, 50, 75, 100, 125, 150}
    assert set(b[:, 1].tolist()) == {0, 25, 50}
    np.testing.assert_array_equal(b[:, 2:] - b[:, :2], np.full((21, 2), 50, np.float32))
    np.testing.assert_allclose(s, 0.125)
    # the border is covered: a window flush with the bottom-right corner exists
    assert found(b, (150, 50, 200, 100), tol=0)


def test_sliding_windows_aspect_clipping_order_and_caps():
    b, s = sliding_windows((100, 200), scales=(0.3, 1.0), aspect_ratios=(0.5, 2.0),
                           stride_frac=0.25, min_size=0, top_k=None)
    check_properties(b, s, (100, 200), 0, None)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    small = np.isclose(w * h, 900, atol=1)  # scale 0.3: 30 x 30 px area, two shapes
    assert small.any() and set(np.round(w[small] / h[small], 1).tolist()) == {0.5, 2.0}
    assert s[0] == s.max() and (w[0] * h[0]) > 900  # larger windows first
    b2, _ = sliding_windows((100, 200), scales=(0.3, 1.0), aspect_ratios=(0.5, 2.0),
                            min_size=25, top_k=5)
    assert len(b2) == 5 and (b2[:, 2:] - b2[:, :2] >= 25).all()
    with pytest.raises(ValueError, match="stride_frac"):
        sliding_windows((10, 10), stride_frac=0)
    with pytest.raises(ValueError, match="size"):
        sliding_windows((10,))


# ---------------------------------------------------------------- dispatcher
def test_propose_dispatches_and_rejects_unknown():
    im = rect_image()
    ref = selective_search(im, "single", max_side=None)
    got = propose(im, "selective_search", strategy="single", max_side=None)
    np.testing.assert_array_equal(got[0], ref[0])
    bs, _ = propose(im, "sliding", scales=(1.0,), aspect_ratios=(1.0,))
    # 120 x 120 windows over the 120 x 160 image, stride 30, the last flush right
    np.testing.assert_array_equal(bs, [[0, 0, 120, 120], [30, 0, 150, 120], [40, 0, 160, 120]])
    with pytest.raises(ValueError, match="method"):
        propose(im, "edge_boxes")
    with pytest.raises(ValueError, match="strategy_name"):
        propose(im, "selective_search", strategy_name="fast")


# ---------------------------------------------------------------- metrics
def test_proposal_recall_hand_computed():
    props = [np.array([[0, 0, 10, 10]]),
             np.array([[0, 0, 10, 6], [0, 0, 10, 8]]),
             np.array([[0, 0, 5, 5]])]
    gts = [np.array([[0, 0, 10, 10]]),
           np.array([[0, 0, 10, 10], [20, 20, 30, 30]]),
           np.zeros((0, 4))]
    labels = [np.array([0]), np.array([1, 0]), np.zeros(0, np.int64)]
    r = proposal_recall(props, gts, num_boxes=(1, 2), labels=labels, class_names=["a", "b"])
    # best overlaps with all proposals: 1.0, 0.8, 0.0
    assert r["num_images"] == 3 and r["num_gt"] == 3
    assert r["boxes_per_image"] == pytest.approx(4 / 3)
    assert r["recall@0.5"] == pytest.approx(2 / 3)
    assert r["recall@0.7"] == pytest.approx(2 / 3)
    assert r["ar"] == pytest.approx(17 / 30)  # 1.0 passes 10 thresholds, 0.8 passes 7
    assert r["abo"] == pytest.approx(0.6)
    assert r["mabo"] == pytest.approx((0.5 + 0.8) / 2)  # class a: 1.0, 0.0; class b: 0.8
    assert r["per_class"]["a"] == {"num_gt": 2, "abo": pytest.approx(0.5), "recall@0.5": 0.5}
    assert r["per_class"]["b"]["abo"] == pytest.approx(0.8)
    # first proposal only: 1.0, 0.6, 0.0
    assert r["curve"]["num_boxes"] == [1, 2]
    assert r["curve"]["recall@0.5"] == pytest.approx([2 / 3, 2 / 3])
    assert r["curve"]["recall@0.7"] == pytest.approx([1 / 3, 2 / 3])
    assert r["curve"]["abo"] == pytest.approx([1.6 / 3, 0.6])
    # without labels MABO is ABO
    assert proposal_recall(props, gts)["mabo"] == pytest.approx(0.6)


def test_proposal_recall_errors_and_empty():
    with pytest.raises(ValueError, match="same images"):
        proposal_recall([np.zeros((0, 4))], [])
    r = proposal_recall([np.zeros((0, 4))], [np.zeros((0, 4))])
    assert r["num_gt"] == 0 and np.isnan(r["recall@0.5"])
    r = proposal_recall([np.zeros((0, 4))], [np.array([[0, 0, 5, 5]])])
    assert r["recall@0.5"] == 0 and r["abo"] == 0


def test_plot_recall_curve_writes_png(tmp_path):
    path = tmp_path / "recall.png"
    plot_recall_curve({"ours": ([1, 10, 100], [0.2, 0.6, 0.9]),
                       "opencv": ([1, 10, 100], [0.1, 0.5, 0.8])}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- real photos
def _raccoon_dir() -> Path | None:
    here = Path(__file__).resolve().parents[1]
    for cand in (Path("/work/shared/data/raccoon"), here.parent / "shared" / "data" / "raccoon",
                 here / "../shared/data/raccoon"):
        if (cand / "annotations").is_dir() and (cand / "images").is_dir():
            return cand
    return None


_NUMBA_PROBE = """
import sys
import cv2
import numpy as np
import os
os.makedirs(sys.argv[1] + "/img", exist_ok=True)
cv2.imwrite(sys.argv[1] + "/img/a.png", np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8))
{run}
from numba import njit
import numba.np.arraymath as arraymath

@njit(cache=False)
def probe(a, b, m):
    return np.correlate(a, b), np.dot(a, b), np.linalg.inv(m) @ m

a, b, m = np.arange(5.0), np.linspace(1, 2, 5), np.array([[2.0, 1.0], [1.0, 3.0]])
c, d, e = probe(a, b, m)
assert np.allclose(c, np.correlate(a, b)) and np.isclose(d, a @ b) and np.allclose(e, np.eye(2))
print(arraymath._HAVE_BLAS, "scipy.linalg" in sys.modules)
"""


def _numba_probe(tmp_path, run: str) -> list[str]:
    """The lines the probe printed, in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", _NUMBA_PROBE.format(run=run), str(tmp_path)],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.splitlines()


def test_numba_starts_without_scipy_linalg_in_the_command_line(tmp_path):
    # `rcnn propose` runs selective search's kernels with numba's BLAS check skipped (0.26 s
    # of scipy.linalg's import per process); np.correlate, np.dot and np.linalg still work
    run = ("d = sys.argv[1]\n"
           "sys.argv = ['rcnn', 'propose', d + '/img', '-o', d + '/p', '-q']\n"
           "from rcnn_cli.cli import main\n"
           "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
           "assert os.path.isfile(d + '/p/a.png.npz')\n"
           "seen = 'scipy.linalg' in sys.modules\n"
           "print('before', seen)")
    lines = _numba_probe(tmp_path, run)
    assert "before False" in lines  # the whole command ran without scipy.linalg
    assert lines[-1] == "False True"  # no BLAS for np.correlate; np.linalg loaded it later


def test_numba_blas_check_is_untouched_for_library_users(tmp_path):
    # importing rcnn_cli as a library leaves numba's start-up as numba does it
    run = ("from rcnn_cli.proposals import selective_search\n"
           "selective_search(cv2.imread(sys.argv[1] + '/img/a.png'))")
    assert _numba_probe(tmp_path, run)[-1] == "True True"


@pytest.mark.slow
def test_selective_search_recall_on_real_photos():
    root = _raccoon_dir()
    if root is None:
        pytest.skip("raccoon data set not present")
    import xml.etree.ElementTree as ET

    import cv2

    props, gts = [], []
    for stem in ("raccoon-5", "raccoon-14"):
        im = cv2.imread(str(root / "images" / f"{stem}.jpg"), cv2.IMREAD_COLOR)
        if im is None:
            pytest.skip(f"{stem}.jpg not readable")
        xml = ET.parse(root / "annotations" / f"{stem}.xml").getroot()
        gt = [[float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
              for o in xml.iter("object")]
        b, s = selective_search(cv2.cvtColor(im, cv2.COLOR_BGR2RGB), "fast")
        check_properties(b, s, im.shape[:2], 20, 2000)
        props.append(b)
        gts.append(box_ops.from_voc(np.array(gt, np.float32)))
    r = proposal_recall(props, gts)
    assert r["recall@0.5"] == 1.0 and r["abo"] > 0.75
