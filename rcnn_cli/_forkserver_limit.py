"""The first module a local pool's forkserver imports (:func:`rcnn_cli.executors.start_local_pool`):
one thread for every numeric library, before any of them loads.

Every worker forked from the server limits itself the same way (:func:`limit_threads`), and
a server that has started no thread pool (OpenBLAS, OpenCV) forks children that cannot
inherit a lock some other thread held at the fork (measured: 2-4 threads in the server after
the preload without this, 1 with it).
"""
import os

# Before numpy loads (importing the executors module loads it): OpenBLAS starts its threads
# at load time. limit_threads then sets every variable it knows and limits what is loaded.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

from rcnn_cli.executors import limit_threads

limit_threads()
