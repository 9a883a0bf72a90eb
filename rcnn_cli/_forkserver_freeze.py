"""The last module a local pool's forkserver imports (:func:`rcnn_cli.executors.start_local_pool`):
it freezes the garbage collector's view of everything imported so far.

Python's documentation advises ``gc.freeze()`` in a parent that forks without exec: the
children's collections then skip those objects, so their memory pages stay shared instead of
being copied when a collection touches them. It also spares the server's own exit the scan
of torch's millions of objects (1-1.5 s with torch and torchvision loaded, measured here),
which a caller waiting for the end of the output pipe would otherwise wait for.
"""
import gc

gc.freeze()
