"""rcnn_cli: R-CNN-style object detection from the command line and from Python.

The Python API (imported on first use, so ``import rcnn_cli`` stays cheap: no torch)::

    from rcnn_cli import Detector, propose

    det = Detector("runs/model", device="cpu")   # loads and validates the bundle once
    result = det(image)      # (H, W, 3) uint8 RGB array, a PIL image or a path
    result.boxes, result.scores, result.labels, result.class_names
    det.predict([img1, img2])                    # a list of results
    boxes, scores = propose(image, method="selective_search", strategy="fast")

See :mod:`rcnn_cli.api`.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it (loaded lazily by :func:`__getattr__`)
_LAZY = {"Detector": "rcnn_cli.api", "DetectionResult": "rcnn_cli.api",
         "propose": "rcnn_cli.api", "ModelError": "rcnn_cli.model",
         "ConfigError": "rcnn_cli.config"}

__all__ = ["ConfigError", "DetectionResult", "Detector", "ModelError", "__version__", "propose"]


def __getattr__(name: str) -> Any:
    """Import the public API on first use (PEP 562)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rcnn_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
