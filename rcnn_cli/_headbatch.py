"""Mini-batches of the fc head's SGD (:func:`rcnn_cli.head._sgd`): gather, standardise, drop out.

Each step of the head's SGD (2000 steps, the bulk of ``rcnn train-svm`` and of the demo)
gathers 128 float16 windows, converts them to float32, standardises them per dimension and
applies input dropout, then applies dropout after fc6 and fc7. Done with numpy masks and torch
element-wise passes this took ~3-4.5 ms of a 15-18 ms step on two cores: five passes over the
batch and 0.49 M numpy uniforms, where the rest of the step is fc6's matrix products (FLOP
bound). Here one kernel pass reads each row once and writes the standardised, masked float32
row, and the masks come from a counter-based hash instead of a sequential generator: element
``(r, j)`` of layer ``layer``'s (N, D) mask at step ``step`` keeps its value when bits
``16 * (j % 4)`` to ``16 * (j % 4) + 15`` of splitmix64's output (Steele, Lea and Flood 2014)
for ``key(seed, step, layer) + r * ceil(D / 4) + j // 4`` are at least ``round(p * 65536)``.
A mask thus depends on its coordinates only (not on the order or the thread drawing it), and
is the same Bernoulli(1 - p) keep mask scaled by 1 / (1 - p) as ``nn.Dropout`` draws (up to
p's rounding to 1/65536; the scale matches the rounded p, so the expected value is exact).

Neither numpy nor torch has a fused gather + standardise + Bernoulli mask on CPU, hence the
numba kernels (compiled once, cached on disk: ``make setup`` compiles them).
"""
from __future__ import annotations

import numpy as np
from numba import float32, int64, njit, uint16, uint64, void

from rcnn_cli._numba_blas import defer_blas_check

defer_blas_check()  # before numba's first compile or cache load: see that module

#: float32 value of every float16 bit pattern (numba has no CPU float16): exact conversion
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
_M1 = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's gamma and its finaliser's multipliers
_M2, _M3 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@njit(uint64(uint64), cache=True, nogil=True)
def _mix(z):
    """splitmix64's output for state ``z``: its step (+ golden gamma), then its finaliser
    (a bijection of 64-bit words with full avalanche)."""
    z = z + _M1
    z = (z ^ (z >> np.uint64(30))) * _M2
    z = (z ^ (z >> np.uint64(27))) * _M3
    return z ^ (z >> np.uint64(31))


@njit(uint64(int64, int64, int64), cache=True, nogil=True)
def stream_key(seed, step, layer):
    """First counter of the draws of (``seed``, ``step``, ``layer``): 64 random bits, so two
    streams' counters (~90 000 each for a 128 x 2816 batch) overlap with negligible
    probability."""
    return _mix(_mix(_mix(np.uint64(seed)) ^ np.uint64(step)) ^ np.uint64(layer))


@njit(cache=True, nogil=True)
def _dropped_row(key, r, thresh, scale, dst, src, to_f32, mean, inv_std):
    """Row ``r`` of stream ``key``'s keep mask, times the standardised float16 row ``src``
    unless ``src`` is None (then the mask itself): ``dst[j] = scale * value`` where the
    element's 16-bit draw is >= ``thresh``, else 0. The row's draws start at counter
    ``r * ceil(D / 4)``, four per splitmix64 output. (numba compiles the two uses apart and
    drops the ``src is None`` test from each.)"""
    d = dst.shape[0]
    blocks = (d + 3) // 4
    base = key + np.uint64(r * blocks)
    for b in range(blocks):
        z = _mix(base + np.uint64(b))
        for k in range(4):
            j = 4 * b + k
            if j < d:
                keep = np.int64((z >> np.uint64(16 * k)) & np.uint64(0xFFFF)) >= thresh
                if src is None:
                    dst[j] = scale if keep else np.float32(0.0)
                else:
                    v = (to_f32[src[j]] - mean[j]) * inv_std[j]
                    dst[j] = v * scale if keep else np.float32(0.0)


@njit(void(uint16[:, ::1], float32[::1], int64[::1], float32[::1], float32[::1], int64,
           float32, int64, int64, int64, float32[:, ::1]), cache=True, nogil=True)
def gather_standardised(x_bits, to_f32, rows, mean, inv_std, thresh, scale, seed, step, layer,
                        out):
    """``out[r] = (x[rows[r]] - mean) * inv_std``, dropped out: each element kept (times
    ``scale``) where :func:`dropout_mask` of the same stream keeps it (``thresh`` 0: no
    dropout), else 0.

    ``x_bits`` is the float16 matrix viewed as uint16 and ``to_f32`` :data:`F16_TO_F32`.
    """
    n, d = out.shape
    key = stream_key(seed, step, layer)
    for r in range(n):
        src = x_bits[rows[r]]
        if thresh <= 0:
            dst = out[r]
            for j in range(d):
                dst[j] = (to_f32[src[j]] - mean[j]) * inv_std[j]
        else:
            _dropped_row(key, r, thresh, scale, out[r], src, to_f32, mean, inv_std)


@njit(void(int64, float32, int64, int64, int64, float32[:, ::1]), cache=True, nogil=True)
def dropout_mask(thresh, scale, seed, step, layer, out):
    """Fill ``out`` (N, D) with a keep mask: ``scale`` where the element's 16-bit draw is >=
    ``thresh``, else 0 (row ``r``'s draws start at counter ``r * ceil(D / 4)``)."""
    key = stream_key(seed, step, layer)
    for r in range(out.shape[0]):
        _dropped_row(key, r, thresh, scale, out[r], None, None, None, None)


def threshold(p: float) -> tuple[int, np.float32]:
    """(16-bit threshold, keep scale) of dropout probability ``p`` in [0, 1): an element is
    kept with probability ``1 - thresh / 65536`` and scaled by its inverse."""
    thresh = round(float(p) * 65536) if 0 <= p < 1 else -1
    if not 0 <= thresh < 65536:
        raise ValueError(f"dropout probability must be in [0, 1 - 2**-17), got {p}")
    return thresh, np.float32(65536 / (65536 - thresh))


def _int64(seed: int) -> int:
    """``seed``'s 64 low bits as an int64 (the kernels' argument type; any Python int)."""
    return (int(seed) + 2**63) % 2**64 - 2**63


def gather_batch(x_bits: np.ndarray, rows: np.ndarray, mean: np.ndarray, inv_std: np.ndarray,
                 p: float, seed: int, step: int, out: np.ndarray) -> np.ndarray:
    """:func:`gather_standardised` (layer 0) with its arguments checked: ``out`` (N, D)
    float32 from ``x_bits`` (M, D) uint16 rows ``rows`` (N,) in [0, M), ``mean`` and
    ``inv_std`` (D,); ``p`` the input dropout probability. Returns ``out``."""
    n, d = out.shape
    if x_bits.ndim != 2 or x_bits.shape[1] != d or mean.shape != (d,) or inv_std.shape != (d,):
        raise ValueError(f"shapes do not fit: windows {x_bits.shape}, mean {mean.shape}, "
                         f"inv_std {inv_std.shape}, batch {out.shape}")
    if rows.shape != (n,) or (n and not 0 <= rows.min() <= rows.max() < len(x_bits)):
        raise ValueError(f"rows must be {n} indices in [0, {len(x_bits)})")
    thresh, scale = threshold(p)
    gather_standardised(x_bits, F16_TO_F32, rows, mean, inv_std, thresh, scale, _int64(seed),
                        step, 0, out)
    return out


def mask(p: float, seed: int, step: int, layer: int, out: np.ndarray) -> np.ndarray:
    """:func:`dropout_mask` of probability ``p`` into ``out`` (N, D) float32; returns it."""
    thresh, scale = threshold(p)
    dropout_mask(thresh, scale, _int64(seed), step, layer, out)
    return out
