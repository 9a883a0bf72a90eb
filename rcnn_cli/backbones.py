"""The backbones' names and feature taps, without torch.

What model validation, ``rcnn info`` and the settings checks need to know about a backbone
(its taps and their dimensions); :data:`rcnn_cli.features.BACKBONES` adds the torch side
(constructors, weights, strides) and is checked against this table by the tests.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

#: The ``grid`` tap (shared mode only, see :class:`rcnn_cli.features.GridHead`): layout
#: cells from ``features[:cut]`` (the last stride-16 block: mobilenet_v2 96 channels,
#: efficientnet_lite0 112), GRID_CELLS x GRID_CELLS per padded box.
GRID_CUTS, GRID_CELLS = {"mobilenet_v2": 14, "efficientnet_lite0": 12}, 4
#: Channels of the block the ``grid`` tap cuts at.
_GRID_CHANNELS = {"mobilenet_v2": 96, "efficientnet_lite0": 112}
#: Channels of the top map whose box means lead the ``grid`` tap's vector.
GRID_TOP_CHANNELS = 1280

#: Backbone -> tap -> feature dimension.
TAPS: dict[str, dict[str, int]] = {
    "alexnet": {"pool5": 256 * 6 * 6, "fc6": 4096, "fc7": 4096},
    "vgg16": {"pool5": 512 * 7 * 7, "fc6": 4096, "fc7": 4096},
    "resnet18": {"pool": 512},
    "resnet50": {"pool": 2048},
    "mobilenet_v2": {"pool": 1280,
                     "grid": GRID_TOP_CHANNELS + _GRID_CHANNELS["mobilenet_v2"] * GRID_CELLS**2},
    "efficientnet_lite0": {"pool": 1280,
                           "grid": GRID_TOP_CHANNELS + _GRID_CHANNELS["efficientnet_lite0"] * GRID_CELLS**2},
}
#: Taps that exist only in shared mode.
SHARED_ONLY_TAPS = {(name, "grid") for name in GRID_CUTS}

#: Shared mode resizes each image so its shorter side is SHARED_SHORT (never the longer side
#: above SHARED_MAX): Fast R-CNN uses 600/1000; 480/800 is the CPU-friendly default here
#: (see scripts/bench_extract.py for the speed/quality numbers behind it).
SHARED_SHORT = 480
SHARED_MAX = 800

#: Bumped whenever the numbers produced for the same settings change beyond float rounding
#: (part of the cache key; e.g. folded batch norms and fused activations did not bump it).
FEATURES_VERSION = 1

#: Backbone -> (crop input size, stride of the shared-mode map, RoI grid side, RoI pooling,
#: default tap, ImageNet weights file): what :data:`rcnn_cli.features.BACKBONES` is built
#: from (R-CNN's crop is 227 for AlexNet; max pooling for nets with fc heads as SPP-net and
#: Fast R-CNN, RoIAlign averages for convolutional heads). The file names are torchvision's
#: ``Weights.IMAGENET1K_V1.url`` basenames (and rcnn_cli.weights' offline files; tested).
FACTS: dict[str, tuple[int, int, int, str, str, str]] = {
    "alexnet": (227, 16, 6, "max", "fc7", "alexnet-owt-7be5be79.pth"),
    "vgg16": (224, 16, 7, "max", "fc7", "vgg16-397923af.pth"),
    "resnet18": (224, 16, 14, "align", "pool", "resnet18-f37072fd.pth"),
    "resnet50": (224, 16, 14, "align", "pool", "resnet50-0676ba61.pth"),
    "mobilenet_v2": (224, 16, 7, "align", "pool", "mobilenet_v2-b0353104.pth"),
    "efficientnet_lite0": (224, 16, 7, "align", "pool", "efficientnet-lite0-57934424.pth"),
}


def resolved_tap(name: str, tap: str | None, mode: str) -> str:
    """``tap``, or the one used when none is given: the backbone's default, except
    mobilenet_v2 and efficientnet_lite0 in shared mode (``grid``)."""
    if tap:
        return tap
    return "grid" if name in GRID_CUTS and mode == "shared" else FACTS[name][4]


def feature_settings(backbone: str, tap: str, mode: str, weights_id: str, padding: float,
                     shared_scale: tuple[int, int], amp: bool,
                     facts: tuple[int, int, int, str, int] | None = None) -> dict[str, Any]:
    """The JSON-able settings that determine the features of a
    :class:`rcnn_cli.features.FeatureExtractor` (its ``settings()``, part of every feature
    and detection cache key), from its resolved arguments, without torch: ``rcnn detect``'s
    driver keys its store with them before (or without) loading the backbone. ``facts``:
    (input size, stride, RoI side, RoI pooling, dimension) of a backbone registered at run
    time; None: :data:`FACTS` and :data:`TAPS`."""
    if facts is None:
        facts = (*FACTS[backbone][:4], TAPS[backbone][tap])
    size, stride, roi, roi_mode, dim = facts
    s: dict[str, Any] = {
        "version": FEATURES_VERSION, "backbone": backbone, "tap": tap, "mode": mode,
        "weights": weights_id, "input_size": size, "padding": float(padding),
        "dim": dim, "dtype": "bfloat16" if amp else "float32",
    }
    if mode == "shared":
        s["shared_scale"] = [int(shared_scale[0]), int(shared_scale[1])]
        if tap == "grid":
            s.update(grid_cut=GRID_CUTS[backbone], grid_cells=GRID_CELLS)
        else:
            s.update(roi_size=roi, roi_mode=roi_mode, stride=stride)
    return s


def weights_id(weights: str | Path | None, name: str, seed: int) -> str:
    """A short string identifying the weights, for settings / cache keys (ImageNet: the file
    of :data:`FACTS`; :func:`rcnn_cli.features.weights_id` also knows backbones registered
    at run time)."""
    if weights is None:
        return "imagenet:" + FACTS[name][5]
    if str(weights) == "random":
        return f"random:seed={seed}"
    h = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]
    return f"file:{Path(weights).name}:{h}"
