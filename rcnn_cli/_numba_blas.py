"""numba's array-math module loaded without ``scipy.linalg``, in rcnn_cli's own processes.

The first numba function a process compiles or loads from numba's cache makes numba install
its NumPy implementations, and ``numba.np.arraymath`` checks at import whether a BLAS is
there by importing ``scipy.linalg.cython_blas``, which runs ``scipy.linalg``'s whole
``__init__`` (its decompositions, sparse matrices, the array-API layer): 0.26 s of CPU here,
paid by ``rcnn detect``'s driver and by its pool's server before selective search's first
image. numba uses the answer for one thing: whether ``np.correlate`` and ``np.convolve``
compute their inner products with BLAS or with a loop (numba/np/arraymath.py,
``_get_inner_prod``). rcnn_cli's kernels call neither; ``np.dot`` and ``np.linalg`` check for
BLAS again when a function using them compiles (``numba.np.linalg``), so they keep working.

:func:`defer_blas_check` imports ``numba.np.arraymath`` with that check answering "no BLAS",
then puts numba's own check back. It acts only where :data:`ENABLED` was set by rcnn_cli's
command line (:func:`rcnn_cli.cli.main`) or by a local pool's server
(:mod:`rcnn_cli._forkserver_limit`), not in a program that imports rcnn_cli as a library, and
only while neither module is loaded yet. Anything unexpected (another numba layout) leaves
numba to import the module its usual way.
"""
from __future__ import annotations

import sys

#: Set by the processes rcnn_cli owns: its command line and its pool's server.
ENABLED = False


def defer_blas_check() -> bool:
    """Import ``numba.np.arraymath`` without importing ``scipy.linalg``; True if it did."""
    if not ENABLED or "numba.np.arraymath" in sys.modules or "scipy.linalg" in sys.modules:
        return False
    try:
        import numba.np.linalg as nplinalg

        real = nplinalg.ensure_blas
    except Exception:  # noqa: BLE001 - numba imports the module its own way
        return False

    def _no_blas() -> None:
        raise ImportError("rcnn_cli: numba's BLAS check for np.correlate is skipped")

    nplinalg.ensure_blas = _no_blas
    try:
        from numba.np import arraymath

        arraymath.ensure_blas = real
    except Exception:  # noqa: BLE001
        sys.modules.pop("numba.np.arraymath", None)
        return False
    finally:
        nplinalg.ensure_blas = real
    return True
