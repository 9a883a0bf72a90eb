"""The backbones' names and feature taps, without torch.

What model validation, ``rcnn info`` and the settings checks need to know about a backbone
(its taps and their dimensions); :data:`rcnn_cli.features.BACKBONES` adds the torch side
(constructors, weights, strides) and is checked against this table by the tests.
"""
from __future__ import annotations

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
