"""CPU inference kernel of the ``grid`` tap's box pooling (:class:`rcnn_cli.features.GridHead`).

:func:`rcnn_cli.features.roi_area_pool` averages a feature map, read as piecewise constant,
over each of ``g x g`` equal parts of each box, with dense separable weights and matrix
products (differentiable, any device). For 2000 boxes those products are ~2 GMAC per image on
mobilenet_v2's two maps although each box touches only its own cells: 0.09 s of the ~0.13 s
that the head took per image on one core. Here each part's integral is read from a summed-area
table instead (Crow 1984; Viola-Jones' integral image). The integral of a piecewise-constant
map is bilinear inside each map cell, so its value at a fractional point is the bilinear
interpolation of the table at the four surrounding lattice points, and a part's sum is four
such values: the same quantity, exact up to rounding, in O(C) per part instead of O(C * H * W)
per box. Tables and sums are float64, so the result agrees with the matrix products to float32
rounding (tested against :func:`roi_area_pool`).

Neither torchvision (``roi_align`` samples points, ``roi_pool`` takes maxima) nor OpenCV
(``cv2.integral`` reads integer corners only) computes this, hence the hand-written numba
kernel. It is used only for inference on CPU; training (fine-tuning backpropagates through
the head) and GPUs keep :func:`roi_area_pool`.
"""
from __future__ import annotations

import numpy as np
from numba import float32, float64, int64, njit, void

from rcnn_cli._numba_blas import defer_blas_check

defer_blas_check()  # before numba's first compile or cache load: see that module

#: (table, x edges, y edges, output, first output column)
_SIGNATURE = void(float64[:, :, ::1], float32[:, ::1], float32[:, ::1], float32[:, ::1], int64)


@njit(float64[:, :, ::1](float32[:, :, :]), cache=True, nogil=True)
def summed_area_table(fmap_hwc):
    """(H + 1, W + 1, C) float64 table of an (H, W, C) map: entry (y, x) is the sum of the map
    over rows < y and columns < x (zero first row and column)."""
    h, w, c = fmap_hwc.shape
    table = np.zeros((h + 1, w + 1, c), np.float64)
    for y in range(h):
        for x in range(w):
            up, left, diag, cur = table[y, x + 1], table[y + 1, x], table[y, x], table[y + 1, x + 1]
            for k in range(c):
                cur[k] = (left[k] - diag[k]) + up[k] + fmap_hwc[y, x, k]
    return table


@njit(_SIGNATURE, cache=True, nogil=True)
def pool_parts(table, xs, ys, out, col0):
    """Write the mean of the map over each box's ``g x g`` parts into ``out``.

    Args:
        table: :func:`summed_area_table` of the (H, W, C) map.
        xs, ys: (N, g + 1) float32 part edges of each box in map units (``lo + (hi - lo) *
            k / g``, as :func:`rcnn_cli.features._cell_weights` computes them).
        out: (N, D) float32; part (y, x) of box n, channel c, goes to column
            ``col0 + c * g * g + y * g + x`` (``roi_area_pool(...).flatten(1)``'s order).
        col0: first column.

    As in :func:`rcnn_cli.features.roi_area_pool`: the map outside [0, W] x [0, H] counts as
    zero, a part's mean divides its integral by its extent in each axis clamped to >= 1e-3,
    a box whose edges decrease (hi < lo) has zero parts, and a box with a NaN edge has NaN
    parts.
    """
    h, w, c = table.shape[0] - 1, table.shape[1] - 1, table.shape[2]
    rows = table.reshape((h + 1) * (w + 1), c)
    g = xs.shape[1] - 1
    corner = np.empty(((g + 1) * (g + 1), c), np.float64)
    part = np.empty(c, np.float64)
    ix = np.empty(g + 1, np.int64)
    fx = np.empty(g + 1, np.float64)
    iy = np.empty(g + 1, np.int64)
    fy = np.empty(g + 1, np.float64)
    for n in range(xs.shape[0]):
        o = out[n]
        bad = False
        for p in range(g + 1):
            bad |= np.isnan(xs[n, p]) or np.isnan(ys[n, p])
        if bad:  # a NaN edge (a NaN or overflowing box): NaN features, as the products give
            for p in range(g * g):
                for k in range(c):
                    o[col0 + p + k * g * g] = np.nan
            continue
        for axis in range(2):  # lattice cell and fraction of each (clamped, monotone) edge
            e, size = (xs, w) if axis == 0 else (ys, h)
            idx, frac = (ix, fx) if axis == 0 else (iy, fy)
            prev = 0.0
            for p in range(g + 1):
                v = min(max(np.float64(e[n, p]), 0.0), np.float64(size))
                if p > 0 and v < prev:  # decreasing edges: zero-width parts
                    v = prev
                prev = v
                i = max(min(int(np.floor(v)), size - 1), 0)  # in the table, whatever v is
                idx[p] = i
                frac[p] = v - i
        for p in range(g + 1):  # the integral at each lattice point of the box's parts
            r, b = iy[p] * (w + 1), fy[p]
            for q in range(g + 1):
                i, a = ix[q], fx[q]
                w00, w01 = (1.0 - b) * (1.0 - a), (1.0 - b) * a
                w10, w11 = b * (1.0 - a), b * a
                r00, r01 = rows[r + i], rows[r + i + 1]
                r10, r11 = rows[r + w + 1 + i], rows[r + w + 2 + i]
                cp = corner[p * (g + 1) + q]
                for k in range(c):
                    cp[k] = w00 * r00[k] + w01 * r01[k] + w10 * r10[k] + w11 * r11[k]
        for p in range(g):  # each part: four lattice integrals, over its extent
            ly = max(np.float64(ys[n, p + 1] - ys[n, p]), np.float64(np.float32(1e-3)))
            for q in range(g):
                lx = max(np.float64(xs[n, q + 1] - xs[n, q]), np.float64(np.float32(1e-3)))
                inv = 1.0 / (lx * ly)
                c11, c01 = corner[(p + 1) * (g + 1) + q + 1], corner[p * (g + 1) + q + 1]
                c10, c00 = corner[(p + 1) * (g + 1) + q], corner[p * (g + 1) + q]
                for k in range(c):
                    part[k] = (c11[k] - c01[k] - c10[k] + c00[k]) * inv
                base = col0 + p * g + q
                for k in range(c):
                    o[base + k * g * g] = part[k]
