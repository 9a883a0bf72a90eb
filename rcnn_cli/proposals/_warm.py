"""Imported by a local pool's forkserver (:func:`rcnn_cli.executors.start_local_pool`): load
selective search's numba machine code once, so that every worker forked from the server
starts with it.

numba compiles each function on its first call, or loads it from its on-disk cache: ~1.1 s
per process with a warm cache (profiled on 2 cores), and a full compile per process on a
fresh install. One tiny image through the "quality" strategy reaches every function the
other strategies use. A failure here must not stop the server (multiprocessing only
tolerates an ImportError in a preloaded module), so it is logged and the workers compile
on their first image as before.
"""
from __future__ import annotations

import logging

log = logging.getLogger("rcnn_cli.proposals")


def warm() -> bool:
    """Run selective search once on a small synthetic image; False (logged) if it failed."""
    try:
        import numpy as np

        from .selective_search import selective_search

        y, x = np.mgrid[0:48, 0:64]
        img = np.stack([x * 4, y * 5, (x + y) * 2], axis=2).astype(np.uint8)
        img[10:30, 20:40] = (200, 30, 60)
        selective_search(img, strategy="quality", max_side=None, min_size=4, top_k=None)
        return True
    except Exception as e:  # noqa: BLE001 - the server must start whatever happened
        log.debug("selective search warm-up failed: %s", e)
        return False


WARM = warm()
