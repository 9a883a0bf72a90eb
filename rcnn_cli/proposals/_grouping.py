"""Numba cores of selective search's hierarchical grouping (Uijlings et al., IJCV 2013).

Private: :mod:`rcnn_cli.proposals.selective_search` checks inputs and calls these.

Per colour space (shared by every scale ``k`` and similarity set):
    ``texture_bins`` turns Gaussian derivatives into, for each pixel and channel, the
    histogram bins of its response in the 8 orientations (one column per opposite pair).
Per segmentation (shared by the similarity sets):
    ``region_features`` gives sizes, boxes, L1-normalised colour and texture histograms;
    ``adjacency`` gives the pairs of 4-connected regions.
Per grouping:
    ``hierarchical_grouping`` merges the most similar adjacent pair (a 4-ary heap on -similarity with lazy
    deletion; merged regions get new ids) until one region is left, and returns the box of
    every region ever formed, in creation order.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .._numba_blas import defer_blas_check

defer_blas_check()  # before numba's first compile or cache load: see that module

#: Uijlings et al. section 3.2: 25 colour bins per channel, 10 texture bins per orientation
#: per channel, 8 orientations of Gaussian derivatives with sigma = 1.
COLOUR_BINS = 25
TEXTURE_BINS = 10
ORIENTATIONS = 8
#: Ours, not the paper's: each orientation image is scaled by this quantile of its responses
#: rather than by its maximum, so one very strong edge does not push every other response into
#: bin 0 (ABO on the 200 raccoon photos: 0.8456 with the maximum, 0.8497 with the 0.99
#: quantile). The quantile is read from a histogram of ``_QUANTILE_BINS`` bins.
TEXTURE_QUANTILE = 0.99
_QUANTILE_BINS = 4096


#: No NaN, infinity or signed zero reaches these kernels' float code; telling LLVM so lets it
#: use vector min / max (no reassociation, no fused multiply-add: results are unchanged).
_FINITE = {"nnan", "ninf", "nsz"}


@njit(cache=True, nogil=True)
def texture_bins(gx, gy, bound, fine_bin, out):
    """Texture histogram column of each orientation, channel and pixel, into ``out``.

    Args:
        gx, gy: float32 (C, H, W) Gaussian derivatives of each channel in x and y.
        bound: an upper bound of every directional response (from the filter and the
            uint8 input range); it sets the range of the histogram that gives the quantile.
        fine_bin: int32 (H * W,) scratch.
        out: uint8 (C * 4, H * W), returned.

    Returns:
        uint8 (C * 4, H * W): row ``j = ch * 4 + o`` (o < 4) holds, for each pixel, the
        column ``j * 20 + b`` of the paired texture counts that ``region_features`` adds 1
        to: ``b = bin`` of orientation o where the directional derivative d is >= 0 (then
        orientation o + 4's bin is 0), ``b = 10 + bin`` of orientation o + 4 where d < 0
        (then o's bin is 0). For orientation o (o * 45 degrees) the response is the
        positive part of d (o < 4) or of -d (o >= 4), so one of each opposite pair is
        always 0: one count per pair and pixel gives both histograms (see
        :func:`region_features`), half the work of one count per orientation. Each
        orientation image is divided by its ``TEXTURE_QUANTILE`` quantile over the image
        (its maximum where that quantile is 0) and cut into 10 bins, the last one open.

    Planar (channel-major) arrays and one small kernel per loop let LLVM vectorise the
    arithmetic (2-2.5x faster than one pixel-major loop nest; the same bins).
    """
    c, h, w = gx.shape
    npx = h * w
    fx = gx.reshape(c, npx)
    fy = gy.reshape(c, npx)
    cs = np.array([1.0, 0.70710678, 0.0, -0.70710678], np.float32)
    sn = np.array([0.0, 0.70710678, 1.0, 0.70710678], np.float32)
    nb = _QUANTILE_BINS
    fine = np.float32((nb - 1) / bound)
    counts = np.zeros((2, 2 * nb), np.int32)
    for ch in range(c):
        for o in range(4):
            sp, sg = _pair_scales(fx[ch], fy[ch], cs[o], sn[o], fine, fine_bin, counts)
            j = ch * 4 + o
            _bin(fx[ch], fy[ch], cs[o], sn[o], sp, sg, np.uint8(j * 2 * TEXTURE_BINS), out[j])
    return out


@njit(cache=True, nogil=True)
def _pair_scales(gx, gy, co, so, fine, fine_bin, counts):
    """Scales (float32) of orientation o's and o + 4's responses, ``max(d, 0)`` and
    ``max(-d, 0)`` for ``d = co gx + so gy`` (1-D rows): ``TEXTURE_BINS`` over the
    ``TEXTURE_QUANTILE`` quantile (its maximum where the quantile is 0; 0 where the
    maximum is 0), the quantile read from a fine histogram of |d| (``fine`` bins per unit,
    the sign picking the half; zero responses count: the opposite orientation of each
    pixel is 0). ``fine_bin`` and ``counts`` (int32 (2, 2 * _QUANTILE_BINS)) are scratch.
    """
    nb = _QUANTILE_BINS
    npx = gx.shape[0]
    need = TEXTURE_QUANTILE * npx
    _fine_bins(gx, gy, co, so, fine, fine_bin)
    counts[:] = 0
    _count(fine_bin, counts)
    have_max = False
    vmax = np.zeros(2, np.float32)
    scale = np.zeros(2, np.float32)
    for half in range(2):
        row = counts[0, half * nb:(half + 1) * nb] + counts[1, half * nb:(half + 1) * nb]
        acc = npx - row.sum()  # the zeros of this orientation
        qbin = nb - 1
        for i in range(nb):
            acc += row[i]
            if acc >= need:
                qbin = i
                break
        last = nb - 1
        while last >= 0 and row[last] == 0:
            last -= 1
        if 0 < qbin < last - 1:
            # a response lies two bins above the quantile's: the maximum is above the
            # quantile bin's upper end (:func:`_maxima`), no need for it
            top = (qbin + 1) / fine
        else:
            if not have_max:
                vmax[0], vmax[1] = _maxima(gx, gy, co, so)
                have_max = True
            top = np.float64(vmax[half])
            if top <= 0:
                continue
            if qbin > 0:
                top = min((qbin + 1) / fine, top)
        scale[half] = TEXTURE_BINS / top
    return scale[0], scale[1]


@njit(cache=True, nogil=True, fastmath=_FINITE)
def _fine_bins(gx, gy, co, so, fine, fine_bin):
    """Fine histogram bin of the directional responses ``d = co gx + so gy`` of 1-D float32
    rows into ``fine_bin``: ``|d| * fine``, plus ``_QUANTILE_BINS`` where d < 0."""
    nb = _QUANTILE_BINS
    zero = np.float32(0.0)
    for p in range(gx.shape[0]):
        d = co * gx[p] + so * gy[p]
        i = np.int32(abs(d) * fine)
        fine_bin[p] = min(i, nb - 1) + (d < zero) * nb


@njit(cache=True, nogil=True, fastmath=_FINITE)
def _maxima(gx, gy, co, so):
    """(max(d, 0), max(-d, 0)) over the responses ``d = co gx + so gy`` of 1-D rows.

    :func:`texture_bins` needs them only where the quantile's bin is 0 or lies within one
    bin of the largest response's: otherwise ``(bin + 1) / fine`` is below the maximum
    (a bin ``b`` holds responses of at least ``b / fine``, up to float32 rounding of the
    product, far less than a bin), so this scalar pass (5x the bins' pass) is skipped.
    """
    zero = np.float32(0.0)
    vpos, vneg = zero, zero
    for p in range(gx.shape[0]):
        d = co * gx[p] + so * gy[p]
        vpos = max(vpos, d)
        vneg = min(vneg, d)
    return vpos, -vneg


@njit(cache=True, nogil=True)
def _count(values, counts):
    """Histogram of ``values`` into ``counts[0] + counts[1]`` (two copies, alternating, so
    runs of one value do not wait on each other's increments; unsigned indices, which numba
    does not wrap around)."""
    n = values.shape[0]
    v = values.view(np.uint32)
    one = np.int32(1)
    for p in range(0, n - 1, 2):
        up = np.uint64(p)
        counts[0, v[up]] += one
        counts[1, v[up + np.uint64(1)]] += one
    if n % 2:
        counts[0, v[np.uint64(n - 1)]] += one


@njit(cache=True, nogil=True, fastmath=_FINITE)
def _bin(gx, gy, co, so, scale_pos, scale_neg, base, out):
    """Paired histogram columns of the responses (1-D rows): ``base`` + the positive part's
    bin where the response is >= 0, else ``base`` + 10 + the negative part's bin."""
    zero = np.float32(0.0)
    for p in range(gx.shape[0]):
        d = co * gx[p] + so * gy[p]
        bp = min(np.int32(max(d, zero) * scale_pos), TEXTURE_BINS - 1)
        bn = min(np.int32(max(-d, zero) * scale_neg), TEXTURE_BINS - 1) + TEXTURE_BINS
        out[p] = np.uint8(bp if d >= zero else bn) + base


@njit(cache=True, nogil=True)
def region_features(labels, n, cimg, tbins, need_colour, need_texture):
    """Sizes, boxes and histograms of the ``n`` regions of ``labels``.

    Args:
        labels: int32 (H, W) region index per pixel in ``0..n-1``.
        cimg: uint8 (H, W, C) image in the colour space.
        tbins: uint8 (C * 4, H * W) paired texture columns from :func:`texture_bins`.
        need_colour, need_texture: skip a histogram no similarity uses (zeros instead).

    Returns:
        sizes int64 (n,); boxes int32 (n, 4) inclusive xmin, ymin, xmax, ymax;
        colour float32 (n, C*25) and texture float32 (n, C*80) histograms, each row
        L1-normalised over all its bins; texture column ``(ch * 8 + o) * 10 + bin``.
    """
    h, w, c = cimg.shape
    sizes = np.zeros(n, np.int64)
    boxes = np.empty((n, 4), np.int32)
    boxes[:, 0] = w
    boxes[:, 1] = h
    boxes[:, 2] = -1
    boxes[:, 3] = -1
    ncol = c * COLOUR_BINS if need_colour else 1
    ntex = c * ORIENTATIONS * TEXTURE_BINS if need_texture else 1
    # pixel counts in int32 (an integer add per pixel and bin, not a float one: 1.3x
    # faster), divided once per region at the end: the same float32 histograms
    ccount = np.zeros((n, ncol), np.int32)
    tcount = np.zeros((n, ntex), np.int32)
    # unsigned indices: numba wraps signed ones around, a test and an add each
    lab = labels.reshape(h * w).view(np.uint32)
    pix = cimg.reshape(h * w, c)
    cbin = np.empty((c, 256), np.uint64)  # colour histogram column of each channel value
    for ch in range(c):
        for v in range(256):
            cbin[ch, v] = ch * COLOUR_BINS + (v * COLOUR_BINS >> 8)
    for y in range(h):
        for x in range(w):
            p = np.uint64(y * w + x)
            r = lab[p]
            sizes[r] += 1
            boxes[r, 0] = min(boxes[r, 0], x)
            boxes[r, 1] = min(boxes[r, 1], y)
            boxes[r, 2] = max(boxes[r, 2], x)
            boxes[r, 3] = max(boxes[r, 3], y)
            if need_colour:
                for ch in range(c):
                    ccount[r, cbin[ch, pix[p, ch]]] += 1
    if need_texture:
        for p in range(h * w):
            up = np.uint64(p)
            r = lab[up]
            for j in range(tbins.shape[0]):
                tcount[r, tbins[np.uint64(j), up]] += 1
    colour = np.zeros((n, ncol), np.float32)
    texture = np.zeros((n, ntex), np.float32)
    for r in range(n):
        if need_colour:
            inv = 1.0 / (sizes[r] * c)
            for i in range(ncol):
                colour[r, i] = ccount[r, i] * inv
        if need_texture:
            inv = 1.0 / (sizes[r] * c * ORIENTATIONS)
            for j in range(c * 4):
                # paired counts (texture_bins) -> orientation o = j % 4 and o + 4 of channel
                # j // 4: each pixel counted in one of a pair is in bin 0 of the other
                src = j * 2 * TEXTURE_BINS
                pos = (j // 4 * ORIENTATIONS + j % 4) * TEXTURE_BINS
                neg = pos + 4 * TEXTURE_BINS
                npos = 0
                nneg = 0
                for b in range(TEXTURE_BINS):
                    npos += tcount[r, src + b]
                    nneg += tcount[r, src + TEXTURE_BINS + b]
                for b in range(TEXTURE_BINS):
                    texture[r, pos + b] = tcount[r, src + b] * inv
                    texture[r, neg + b] = tcount[r, src + TEXTURE_BINS + b] * inv
                texture[r, pos] = (tcount[r, src] + nneg) * inv
                texture[r, neg] = (tcount[r, src + TEXTURE_BINS] + npos) * inv
    return sizes, boxes, colour, texture


#: :func:`adjacency` marks touching pairs in an n x n bit matrix up to this many regions
#: (2 MB); more regions take a sort of the pairs' keys.
_BITMAP_REGIONS = 4096


def adjacency(labels, n):
    """Unique pairs (P, 2) int64 ``a < b`` of regions that touch (4-connectivity), sorted."""
    if n <= _BITMAP_REGIONS:
        return _adjacency_bitmap(labels, n)
    keys = np.unique(_adjacency_keys(labels, n))
    return np.stack([keys // n, keys % n], axis=1)


@njit(cache=True, nogil=True)
def _adjacency_bitmap(labels, n):
    """:func:`adjacency` through an n x n bit matrix: one bit set per touching pixel pair,
    then the set bits read out row by row (0.57 -> 0.33 ms for raccoon's ~420 regions; read
    out by ``np.unpackbits`` and ``np.nonzero`` instead, whose n^2 bytes cost more: 1.0 ms)."""
    h, w = labels.shape
    words = (n + 63) >> 6
    bits = np.zeros((n, words), np.uint64)
    one = np.uint64(1)
    for y in range(h):
        for x in range(w):
            a = labels[y, x]
            if x + 1 < w and labels[y, x + 1] != a:
                b = labels[y, x + 1]
                lo, hi = min(a, b), max(a, b)
                bits[lo, hi >> 6] |= one << np.uint64(hi & 63)
            if y + 1 < h and labels[y + 1, x] != a:
                b = labels[y + 1, x]
                lo, hi = min(a, b), max(a, b)
                bits[lo, hi >> 6] |= one << np.uint64(hi & 63)
    count = 0
    for a in range(n):
        for i in range(words):
            v = bits[a, i]
            while v:
                v &= v - one
                count += 1
    pairs = np.empty((count, 2), np.int64)
    p = 0
    for a in range(n):
        for i in range(words):
            v = bits[a, i]
            j = 0
            while v:
                if v & one:
                    pairs[p, 0] = a
                    pairs[p, 1] = i * 64 + j
                    p += 1
                v >>= one
                j += 1
    return pairs


@njit(cache=True, nogil=True)
def _adjacency_keys(labels, n):
    """Keys ``a * n + b`` (a < b) of touching regions, with repeats."""
    h, w = labels.shape
    keys = np.empty(2 * h * w, np.int64)
    m = 0
    last = -1
    for y in range(h):
        for x in range(w):
            a = labels[y, x]
            if x + 1 < w and labels[y, x + 1] != a:
                b = labels[y, x + 1]
                key = min(a, b) * np.int64(n) + max(a, b)
                if key != last:  # cheap skip of runs along a boundary
                    keys[m] = key
                    m += 1
                    last = key
            if y + 1 < h and labels[y + 1, x] != a:
                b = labels[y + 1, x]
                key = min(a, b) * np.int64(n) + max(a, b)
                if key != last:
                    keys[m] = key
                    m += 1
                    last = key
    return keys[:m]


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _intersection(hist, a, b):
    """Histogram intersection of rows ``a`` and ``b`` of float32 ``hist``, summed in float64.

    ``reassoc`` lets LLVM vectorise the sum without changing the result: a non-zero bin is
    (a float32 rounding of) a pixel count over ``region size * C`` (colour) or
    ``region size * C * 8`` (texture), so it is at least ~2^-23 while the image has under
    2^23 / (C * 8) pixels (350 000 for C = 3; ``max_side`` 500 gives at most 250 000); then
    every partial sum is a multiple of 2^-47 below 2, exact in float64, and the order of the
    additions does not matter. (Larger images may differ in the last bit.)
    """
    acc = 0.0
    for i in range(hist.shape[1]):
        x = hist[a, i]
        y = hist[b, i]
        acc += x if x < y else y  # noqa: FURB136 - a plain select: LLVM vectorises it
    return acc


@njit(cache=True, nogil=True)
def _similarity(a, b, size, box, colour, texture, use_c, use_t, use_s, use_f, im_size):
    """Uijlings et al. eq. (6): sum of the enabled similarities, each in [0, 1]."""
    s = 0.0
    if use_c:
        s += _intersection(colour, a, b)
    if use_t:
        s += _intersection(texture, a, b)
    if use_s:
        s += 1.0 - (size[a] + size[b]) / im_size
    if use_f:
        bw = max(box[a, 2], box[b, 2]) - min(box[a, 0], box[b, 0]) + 1
        bh = max(box[a, 3], box[b, 3]) - min(box[a, 1], box[b, 1]) + 1
        s += 1.0 - (bw * bh - size[a] - size[b]) / im_size
    return s


@njit(cache=True, nogil=True)
def _less(hk, hi, hj, a, b):
    """Heap order: smaller key first, then smaller ids (deterministic ties)."""
    if hk[a] != hk[b]:
        return hk[a] < hk[b]
    if hi[a] != hi[b]:
        return hi[a] < hi[b]
    return hj[a] < hj[b]


@njit(cache=True, nogil=True)
def _swap(hk, hi, hj, a, b):
    """Exchange heap items ``a`` and ``b`` (key and both region ids)."""
    hk[a], hk[b] = hk[b], hk[a]
    hi[a], hi[b] = hi[b], hi[a]
    hj[a], hj[b] = hj[b], hj[a]


@njit(cache=True, nogil=True)
def _sift_down(hk, hi, hj, pos, size):
    """Restore the min-heap below ``pos`` (arrays hk, hi, hj of the first ``size`` items).

    A 4-ary heap: item p's children are 4p + 1 .. 4p + 4 (half the levels of a binary heap;
    the grouping 1.07-1.09x faster, and 8 children 1.06x slower than 2). The items leave in
    the same order whatever the heap's shape: (key, i, j) orders them totally."""
    while True:
        c = 4 * pos + 1
        if c >= size:
            return
        best = c
        for d in range(c + 1, min(c + 4, size)):
            if _less(hk, hi, hj, d, best):
                best = d
        if not _less(hk, hi, hj, best, pos):
            return
        _swap(hk, hi, hj, best, pos)
        pos = best


@njit(cache=True, nogil=True)
def _sift_up(hk, hi, hj, pos):
    """Move item ``pos`` up the min-heap to its place."""
    while pos > 0:
        parent = (pos - 1) // 4
        if not _less(hk, hi, hj, pos, parent):
            return
        _swap(hk, hi, hj, parent, pos)
        pos = parent


@njit(cache=True, nogil=True)
def _grow(arr, used, need):
    """A copy of 1-D ``arr`` with room for at least ``need`` items (doubling), keeping its
    first ``used`` items."""
    cap = arr.shape[0]
    while cap < need:
        cap *= 2
    out = np.empty(cap, arr.dtype)
    out[:used] = arr[:used]
    return out


@njit(cache=True, nogil=True)
def hierarchical_grouping(sizes, boxes, colour, texture, pairs, use_c, use_t, use_s, use_f):
    """Greedy hierarchical grouping of ``n`` initial regions.

    Args:
        sizes, boxes, colour, texture: from :func:`region_features`.
        pairs: int64 (P, 2) adjacent region pairs from :func:`adjacency`.
        use_c, use_t, use_s, use_f: which similarities (colour, texture, size, fill) to sum.

    Returns:
        int32 (M, 4) inclusive xmin, ymin, xmax, ymax of the ``n`` initial regions followed by
        each merged region in the order it was formed (M = 2n - 1 for a connected image);
        the last row is the root. Ties in similarity go to the pair with smaller ids.

    The merges run in :func:`_merge_until_full`, which never reallocates: it returns when
    the next merge might not fit the neighbour lists or the heap, and they grow here. (An
    array reassigned inside the merge loop stopped LLVM from keeping its pointer and shape
    in registers: the loop ran 1.8-2x slower.)
    """
    n = sizes.shape[0]
    cap = 2 * n - 1
    im_size = float(sizes.sum())
    size = np.zeros(cap, np.int64)
    size[:n] = sizes
    box = np.empty((cap, 4), np.int32)
    box[:n] = boxes
    ch = np.zeros((cap if use_c else 1, colour.shape[1]), np.float32)
    if use_c:
        ch[:n] = colour
    th = np.zeros((cap if use_t else 1, texture.shape[1]), np.float32)
    if use_t:
        th[:n] = texture
    alive = np.zeros(cap, np.bool_)
    alive[:n] = True
    npairs = pairs.shape[0]
    if n <= 1 or npairs == 0:
        return box[:n]
    # neighbour lists as linked lists in one growable pool; deg counts each list's entries
    head = np.full(cap, -1, np.int64)
    deg = np.zeros(cap, np.int64)
    pval = np.empty(4 * npairs + 16, np.int64)
    pnext = np.empty(4 * npairs + 16, np.int64)
    # the heap of candidate merges: key -similarity, ids i < j; stale entries are skipped
    hk = np.empty(2 * npairs + 16, np.float64)
    hi = np.empty(2 * npairs + 16, np.int64)
    hj = np.empty(2 * npairs + 16, np.int64)
    pn = 0
    for p in range(npairs):
        a, b = pairs[p, 0], pairs[p, 1]
        pval[pn] = b
        pnext[pn] = head[a]
        head[a] = pn
        pval[pn + 1] = a
        pnext[pn + 1] = head[b]
        head[b] = pn + 1
        deg[a] += 1
        deg[b] += 1
        pn += 2
        hk[p] = -_similarity(a, b, size, box, ch, th, use_c, use_t, use_s, use_f, im_size)
        hi[p] = a
        hj[p] = b
    hn = npairs
    for pos in range((hn - 2) // 4, -1, -1):
        _sift_down(hk, hi, hj, pos, hn)
    stamp = np.full(cap, -1, np.int64)
    t = n
    while True:
        hn, pn, t, need = _merge_until_full(hk, hi, hj, hn, head, deg, pval, pnext, pn, stamp,
                                            alive, size, box, ch, th, use_c, use_t, use_s,
                                            use_f, im_size, t)
        if need == 0:
            return box[:t]
        # the next merge adds at most `need` neighbours: two list entries and one heap item each
        if pn + 2 * need > pval.shape[0]:
            pval = _grow(pval, pn, pn + 2 * need)
            pnext = _grow(pnext, pn, pn + 2 * need)
        if hn + need > hk.shape[0]:
            hk = _grow(hk, hn, hn + need)
            hi = _grow(hi, hn, hn + need)
            hj = _grow(hj, hn, hn + need)


@njit(cache=True, nogil=True)
def _merge_until_full(hk, hi, hj, hn, head, deg, pval, pnext, pn, stamp, alive, size, box, ch,
                      th, use_c, use_t, use_s, use_f, im_size, t):
    """Run :func:`hierarchical_grouping`'s merges from region id ``t`` on.

    Returns (hn, pn, t, need): the heap's and the list pool's new lengths, the next region
    id, and 0 when the grouping is done, else the most neighbours the next merge can add
    (``deg`` of its two regions) when that might not fit the arrays; nothing of that merge
    has been done then.
    """
    cap = size.shape[0]
    while hn > 0 and t < cap:
        i, j = hi[0], hj[0]
        if alive[i] and alive[j]:
            need = deg[i] + deg[j]
            if pn + 2 * need > pval.shape[0] or hn + need > hk.shape[0]:
                return hn, pn, t, need
        hn -= 1
        hk[0], hi[0], hj[0] = hk[hn], hi[hn], hj[hn]
        _sift_down(hk, hi, hj, 0, hn)
        if not (alive[i] and alive[j]):
            continue  # stale entry: one side was merged already
        # the merged region t: size, box, size-weighted mean histograms
        si, sj = size[i], size[j]
        size[t] = si + sj
        box[t, 0] = min(box[i, 0], box[j, 0])
        box[t, 1] = min(box[i, 1], box[j, 1])
        box[t, 2] = max(box[i, 2], box[j, 2])
        box[t, 3] = max(box[i, 3], box[j, 3])
        wi = si / (si + sj)
        wj = sj / (si + sj)
        if use_c:
            for k in range(ch.shape[1]):
                ch[t, k] = wi * ch[i, k] + wj * ch[j, k]
        if use_t:
            for k in range(th.shape[1]):
                th[t, k] = wi * th[i, k] + wj * th[j, k]
        alive[i] = False
        alive[j] = False
        alive[t] = True
        # neighbours of t: the live neighbours of i and j
        for side in range(2):
            e = head[i] if side == 0 else head[j]
            while e != -1:
                x = pval[e]
                e = pnext[e]
                if not alive[x] or stamp[x] == t:
                    continue
                stamp[x] = t
                pval[pn] = x
                pnext[pn] = head[t]
                head[t] = pn
                pval[pn + 1] = t
                pnext[pn + 1] = head[x]
                head[x] = pn + 1
                deg[t] += 1
                deg[x] += 1
                pn += 2
                hk[hn] = -_similarity(x, t, size, box, ch, th, use_c, use_t, use_s, use_f,
                                      im_size)
                hi[hn] = x
                hj[hn] = t
                _sift_up(hk, hi, hj, hn)
                hn += 1
        t += 1
    return hn, pn, t, 0
