"""Imported by a local pool's forkserver for ``rcnn detect`` on the CPU
(:func:`rcnn_cli.stages.start_pool`): load the model bundle and build its feature extractor
once, so that every worker forked from the server starts with them.

Each worker otherwise loads the bundle and builds the backbone itself when its first image
arrives (torchvision's constructor, the ImageNet weights' hash and load, batch-norm folding,
fused convolutions): ~0.8 s of CPU per fresh worker here, on the cores that the images need.
The driver names the bundle and the extractor's arguments in
:data:`rcnn_cli.stages.POOL_DETECTOR_ENV`, for the server only; the worker's
:func:`rcnn_cli.detect._get_model` and :func:`rcnn_cli.stages.get_extractor` then find them
in their per-process caches, under the same keys. The server builds on the CPU only (the
driver asks for it where no CUDA device can be there: forking a process that has started
CUDA is not safe), with one thread (:mod:`rcnn_cli._forkserver_limit`). A failure here
must not stop the server: it is logged and the workers build their own, as before.
"""
from __future__ import annotations

import json
import logging
import os

from rcnn_cli.stages import POOL_DETECTOR_ENV as ENV
from rcnn_cli.stages import get_extractor

log = logging.getLogger("rcnn_cli.detect")


def preload() -> bool:
    """Load the bundle and build the extractor that the variable ``ENV`` names; False
    (logged) if there is none or it failed."""
    spec = os.environ.pop(ENV, None)
    if not spec:
        return False
    try:
        from rcnn_cli.detect import _get_model

        spec = json.loads(spec)
        _get_model(spec["model_dir"])
        get_extractor(spec["extractor_kwargs"])
        return True
    except Exception as e:  # noqa: BLE001 - the server must start whatever happened
        log.debug("the pool's server could not preload the detector: %s", e)
        return False


#: Whether the server has the detector (its workers then build nothing).
PRELOADED = preload()
