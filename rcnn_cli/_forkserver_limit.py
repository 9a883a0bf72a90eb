"""The first module a local pool's forkserver imports (:func:`rcnn_cli.executors.start_local_pool`):
one thread for every numeric library, before any of them loads.

Every worker forked from the server limits itself the same way (:func:`limit_threads`), and
a server that has started no thread pool (OpenBLAS, OpenCV) forks children that cannot
inherit a lock some other thread held at the fork (measured: 2-4 threads in the server after
the preload without this, 1 with it).
"""
import os

from rcnn_cli.cpus import THREAD_VARS  # imports no numeric library

# Before numpy loads (importing the executors module loads it): OpenBLAS starts its threads
# at load time. limit_threads then limits the libraries that are loaded.
for _var in THREAD_VARS:
    os.environ[_var] = "1"

from rcnn_cli import _numba_blas
from rcnn_cli.executors import limit_threads

limit_threads()
_numba_blas.ENABLED = True  # the server is ours: numba starts without scipy.linalg
