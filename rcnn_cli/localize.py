"""Classification + localisation by regression (``rcnn localize``): the approach R-CNN grew out of.

Before region proposals, a network that had to say *what* the main object of an image is and
*where* it is read the whole image once and answered with two heads on top of one backbone:

* a **softmax classifier** over the classes;
* a **box regressor** with 4 outputs, the object's box normalised to the image
  (x1 / w, y1 / h, x2 / w, y2 / h), trained with an L2 (Euclidean) loss, or optionally
  smooth-L1 (Fast R-CNN).

The regressor attaches in one of two places (``attach``):

* ``"conv"`` (VGG / OverFeat localisation): its own layers (fc -> ReLU -> 4 outputs) read the
  pooled convolutional features directly, next to the classifier's fc layers;
* ``"fc"`` (DeepPose): a linear layer on the classifier's last shared fc layer, so both tasks
  share fc6 / fc7.

Recipe:

* the whole image is resized (anisotropically) to ``input_size`` x ``input_size`` (the
  backbone's input size, 224 for mobilenet_v2), so a box normalised to the image is also a
  box normalised to the network input; the last conv map is average-pooled to ``GRID`` x
  ``GRID`` cells (the *where* must survive pooling) and flattened: ``D = C * GRID**2``;
* backbone frozen, features computed once per image (and its mirror image) and cached in
  memory, so a CPU trains the heads in a minute; ``finetune=True`` also trains the last
  backbone blocks (:data:`FINETUNE_BLOCKS`; batch norm statistics stay frozen) on cached
  maps of the frozen part;
* an image with several objects uses the largest one (by area; logged once with the count);
* inputs standardised per dimension and regression targets per coordinate (mean and
  standard deviation of the training set, stored in the bundle: Fast R-CNN normalises its
  box targets the same way), so one learning rate fits both heads and predicting 0 is the
  mean box;
* SGD with momentum 0.9, weight decay 5e-4, dropout 0.5 after fc6 / fc7, lr x 0.1 at 2/3
  of the run (R-CNN's fine-tuning schedule), gradient norm clipped at :data:`GRAD_CLIP`
  (K-part targets diverged without it); every random draw comes from a seeded
  ``torch.Generator``, never the global RNG.

**K-part regression** (DeepPose's idea for articulated objects): with ``parts=K`` the
dataset's K classes are the parts of one object, ordered by class name, and the regressor
outputs K boxes per image in that fixed order (4 K outputs, no classifier). Training images
must show every part (an image missing one is skipped, with a count in the log); several
boxes of one part: the largest. Mirror images are not used, since mirroring swaps left and
right parts and the data do not say which parts mirror which.

The trained model is a bundle folder, ``localize.json`` + ``localize.npz`` (float32 arrays,
no pickle), written atomically and validated on load (format version, shapes, sha256) like
:mod:`rcnn_cli.model`. :func:`localization_metrics` scores predictions by the ImageNet
CLS-LOC rule; :func:`parts_metrics` scores K-part predictions.

All boxes are float32 (N, 4) x1y1x2y2 in original-image pixels (see :mod:`rcnn_cli.boxes`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from rcnn_cli import __version__
from rcnn_cli import boxes as bx
from rcnn_cli.config import default
from rcnn_cli.features import BACKBONES, load_backbone, resolve_device, weights_id
from rcnn_cli.store import (
    atomic_write_bytes,
    atomic_write_text,
    class_names_problem,
    npz_bytes,
    read_bundle,
)

log = logging.getLogger("rcnn_cli.localize")

FORMAT_VERSION = 1
JSON_NAME = "localize.json"
ARRAYS_NAME = "localize.npz"
ATTACH = ("conv", "fc")
LOSSES = ("l2", "smooth_l1")

# Hyperparameters (R-CNN's fine-tuning recipe for the SGD settings; the rest measured on
# raccoon, see README "Classification + localisation").
GRID = 4                 # last conv map average-pooled to GRID x GRID cells
# [localize] in default.toml: fc6 / fc7 width, SGD iterations, images per mini-batch, learning
# rate of the new layers (R-CNN: 10 x the base rate 0.001 for fresh layers)
HIDDEN: int = default("localize.hidden")
ITERATIONS: int = default("localize.iterations")
BATCH_SIZE: int = default("localize.batch_size")
LR: float = default("localize.lr")
FINETUNE_LR_MULT = 0.1   # backbone blocks learn at LR x 0.1 (R-CNN's base rate 0.001)
MOMENTUM = 0.9           # R-CNN
WEIGHT_DECAY = 0.0005    # R-CNN
DROPOUT = 0.5            # after fc6 and fc7 (AlexNet / R-CNN)
LR_STEP_AT = 2 / 3       # lr x 0.1 once, at this fraction of the run
STD_FLOOR = 1e-3         # x the mean deviation, added to per-dimension deviations
CLS_INIT_STD = 0.01      # Fast R-CNN: cls_score ~ N(0, 0.01)
REG_INIT_STD = 0.001     # Fast R-CNN: bbox_pred ~ N(0, 0.001)
GRAD_CLIP = 10.0         # gradient norm clip (a safeguard against early divergence)
SMOOTH_L1_BETA = 1.0     # Fast R-CNN smooth L1 (sigma = 1) on standardised targets
#: Standardised inputs are scaled by 1 / GRID, so their squared norm is the channel count C
#: whatever the grid (a step of LR on D = C * GRID**2 unit-variance inputs diverges).
INPUT_SCALE = 1.0 / GRID
EXTRACT_BATCH = 16       # images per backbone forward pass
#: Backbone blocks trained by ``finetune=True`` (the last ones of :func:`conv_blocks`):
#: mobilenet_v2 the last inverted residual + the 1x1 conv to 1280; resnet layer4;
#: vgg16 conv5_1..pool5; alexnet conv4..pool5.
FINETUNE_BLOCKS = {"mobilenet_v2": 2, "resnet18": 1, "resnet50": 1, "vgg16": 7, "alexnet": 5}
#: Channels of the last conv map of each backbone.
CONV_CHANNELS = {"mobilenet_v2": 1280, "resnet18": 512, "resnet50": 2048, "vgg16": 512,
                 "alexnet": 256}
HEAD_ARRAYS = ("feat_mean", "feat_std", "fc6_w", "fc6_b", "fc7_w", "fc7_b", "reg_w", "reg_b",
               "target_mean", "target_std")
TAIL_PREFIX = "tail."


class LocalizeError(ValueError):
    """A localisation bundle or training set that cannot be used (names the file / reason)."""


# --------------------------------------------------------------------------------------------
# Backbone: frozen part, trainable tail, pooling
# --------------------------------------------------------------------------------------------
def conv_blocks(name: str, model: nn.Module) -> nn.Sequential:
    """The backbone's convolutional part as a sequence of blocks: image -> last conv map."""
    if name not in CONV_CHANNELS:
        raise ValueError(f"backbone must be one of {sorted(CONV_CHANNELS)}, got {name!r}")
    if name.startswith("resnet"):
        m = model
        return nn.Sequential(nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool), m.layer1,
                             m.layer2, m.layer3, m.layer4)
    return nn.Sequential(*model.features.children())


def split_backbone(name: str, model: nn.Module, finetune: bool
                   ) -> tuple[nn.Sequential, nn.Sequential]:
    """(frozen part, trainable tail): the tail is the last :data:`FINETUNE_BLOCKS` blocks
    with ``finetune``, else empty (identity)."""
    blocks = list(conv_blocks(name, model).children())
    n = FINETUNE_BLOCKS[name] if finetune else 0
    return nn.Sequential(*blocks[:len(blocks) - n]), nn.Sequential(*blocks[len(blocks) - n:])


def resize_image(image: NDArray[np.uint8], size: int) -> NDArray[np.uint8]:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, anisotropic (area filter when shrinking)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {tuple(image.shape)}")
    h, w = image.shape[:2]
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


class Backbone:
    """The frozen backbone part (+ the tail's initial weights) used for one bundle.

    Args:
        name: a key of :data:`CONV_CHANNELS`.
        weights: ``None`` (ImageNet), ``"random"`` or a state-dict path (see
            :func:`rcnn_cli.features.load_backbone`).
        seed: seed of ``"random"`` weights.
        finetune: split off the trainable tail.
        input_size: side the whole image is resized to (default: the backbone's).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, name: str = default("extract.backbone"), weights: str | Path | None = None,
                 seed: int = 0, finetune: bool = False, input_size: int | None = None,
                 device: str = default("common.device")) -> None:
        if name not in CONV_CHANNELS:
            raise ValueError(f"backbone must be one of {sorted(CONV_CHANNELS)}, got {name!r}")
        spec = BACKBONES[name]
        self.name, self.seed, self.finetune = name, int(seed), bool(finetune)
        self.input_size = int(input_size or spec.input_size)
        if self.input_size < 32:
            raise ValueError(f"input_size must be >= 32, got {self.input_size}")
        # a weights file is recorded by absolute path (and its hash, in weights_id)
        self.weights = (None if weights is None else "random" if str(weights) == "random"
                        else str(Path(weights).resolve()))
        self.weights_id = weights_id(weights, name, seed)
        self.device = resolve_device(device)
        model = load_backbone(name, weights, seed)
        frozen, tail = split_backbone(name, model, finetune)
        # channels-last: ~2x faster convolutions on a CPU (as features.py's shared mode)
        self.frozen = frozen.to(self.device, memory_format=torch.channels_last).eval()
        self.tail = tail.eval()
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        self._mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1)

    @property
    def dim(self) -> int:
        """D, the length of the pooled feature vector."""
        return CONV_CHANNELS[self.name] * GRID * GRID

    def settings(self) -> dict[str, Any]:
        """What predict needs to rebuild the same features (stored in the bundle)."""
        return {"backbone": self.name, "weights": self.weights, "weights_id": self.weights_id,
                "seed": self.seed, "input_size": self.input_size, "grid": GRID,
                "finetune_blocks": FINETUNE_BLOCKS[self.name] if self.finetune else 0,
                "dim": self.dim}

    @torch.inference_mode()
    def frozen_maps(self, images: Sequence[NDArray[np.uint8]]) -> torch.Tensor:
        """Output of the frozen part for whole images (any sizes): (N, C', h, w) float32 cpu."""
        out = []
        for i in range(0, len(images), EXTRACT_BATCH):
            batch = np.stack([resize_image(im, self.input_size)
                              for im in images[i:i + EXTRACT_BATCH]])
            t = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float().div_(255)
            t = ((t - self._mean) / self._std).contiguous(memory_format=torch.channels_last)
            out.append(self.frozen(t).float().contiguous().cpu())
        return torch.cat(out)


def pool_features(maps: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) conv maps -> (N, C * GRID**2) cell averages (adaptive average pooling)."""
    return nn.functional.adaptive_avg_pool2d(maps, GRID).flatten(1)


# --------------------------------------------------------------------------------------------
# The heads
# --------------------------------------------------------------------------------------------
def _dropout(x: torch.Tensor, p: float, gen: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout drawing its mask from ``gen`` (None: no dropout, i.e. inference)."""
    if gen is None or p <= 0:
        return x
    keep = (torch.rand(x.shape, generator=gen) >= p).to(x.device)  # CPU generator
    return x * keep / (1 - p)


class Heads(nn.Module):
    """Standardise (x :data:`INPUT_SCALE`) -> fc6 -> ReLU -> fc7 -> ReLU -> classifier (K); box regressor (4 P) on fc7
    (``attach="fc"``) or on its own fc layer over the features (``attach="conv"``).

    ``forward`` returns (class logits (N, K) or None without a classifier, standardised box
    outputs (N, 4 P)).
    """

    def __init__(self, dim: int, hidden: int, num_classes: int, num_boxes: int, attach: str,
                 classifier: bool = True) -> None:
        super().__init__()
        if attach not in ATTACH:
            raise ValueError(f"attach must be one of {ATTACH}, got {attach!r}")
        self.attach = attach
        self.register_buffer("feat_mean", torch.zeros(dim))
        self.register_buffer("feat_std", torch.ones(dim))
        self.fc6, self.fc7 = nn.Linear(dim, hidden), nn.Linear(hidden, hidden)
        self.cls = nn.Linear(hidden, num_classes) if classifier else None
        self.reg6 = nn.Linear(dim, hidden) if attach == "conv" else None
        self.reg = nn.Linear(hidden, 4 * num_boxes)

    def init_weights(self, gen: torch.Generator) -> None:
        """Gaussian init from ``gen``: hidden fc layers N(0, 1 / E|input|^2) (unit-variance
        outputs), the output layers as Fast R-CNN; biases 0."""
        for layer in (self.fc6, self.fc7, self.reg6):
            if layer is not None:  # z has squared norm ~ in_features * INPUT_SCALE**2
                fan = layer.in_features * (INPUT_SCALE ** 2 if layer is not self.fc7 else 1)
                nn.init.normal_(layer.weight, 0.0, math.sqrt(1.0 / fan), generator=gen)
                nn.init.zeros_(layer.bias)
        if self.cls is not None:
            nn.init.normal_(self.cls.weight, 0.0, CLS_INIT_STD, generator=gen)
            nn.init.zeros_(self.cls.bias)
        nn.init.normal_(self.reg.weight, 0.0, REG_INIT_STD, generator=gen)
        nn.init.zeros_(self.reg.bias)

    def forward(self, feats: torch.Tensor, gen: torch.Generator | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        z = (feats - self.feat_mean) / self.feat_std * INPUT_SCALE
        h = _dropout(torch.relu(self.fc6(z)), DROPOUT, gen)
        h = _dropout(torch.relu(self.fc7(h)), DROPOUT, gen)
        logits = self.cls(h) if self.cls is not None else None
        if self.reg6 is not None:  # conv-attached: own layer on the features
            r = _dropout(torch.relu(self.reg6(z)), DROPOUT, gen)
            return logits, self.reg(r)
        return logits, self.reg(h)


def box_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-box loss (summed over the 4 coordinates) averaged over boxes and batch: ``l2`` =
    0.5 * squared error (Euclidean), ``smooth_l1`` = Fast R-CNN's (beta
    :data:`SMOOTH_L1_BETA`). ``pred`` and ``target`` are (N, 4 P)."""
    boxes = pred.numel() / 4
    if kind == "l2":
        return 0.5 * ((pred - target) ** 2).sum() / boxes
    if kind == "smooth_l1":
        return nn.functional.smooth_l1_loss(pred, target, beta=SMOOTH_L1_BETA,
                                            reduction="sum") / boxes
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


# --------------------------------------------------------------------------------------------
# The model bundle
# --------------------------------------------------------------------------------------------
@dataclass
class Localizer:
    """A trained localiser: settings plus float32 arrays (see the module docstring).

    ``arrays``: ``feat_mean``, ``feat_std`` (D,); ``fc6_w`` (H, D), ``fc6_b``; ``fc7_w``
    (H, H), ``fc7_b``; ``cls_w`` (K, H), ``cls_b`` (K,) unless ``parts``; ``reg6_w`` (H, D),
    ``reg6_b`` with ``attach="conv"``; ``reg_w`` (4 P, H), ``reg_b``; ``target_mean``,
    ``target_std`` (4 P,), P = K with parts else 1; and ``tail.<name>`` for each parameter
    and buffer of the fine-tuned backbone blocks.
    """

    classes: list[str]
    attach: str
    loss: str
    parts: bool
    extractor: dict[str, Any]
    hidden: int
    arrays: dict[str, NDArray[np.float32]]
    training_stats: dict[str, Any] = field(default_factory=dict)
    package_version: str = __version__
    _net: Any = field(default=None, repr=False, compare=False)

    @property
    def num_boxes(self) -> int:
        return len(self.classes) if self.parts else 1

    def to_json(self) -> dict[str, Any]:
        """The ``localize.json`` content, without the ``arrays`` entry."""
        return {"format_version": FORMAT_VERSION, "kind": "localize",
                "package_version": self.package_version, "classes": list(self.classes),
                "attach": self.attach, "loss": self.loss, "parts": bool(self.parts),
                "extractor": dict(self.extractor), "hidden": int(self.hidden),
                "training_stats": self.training_stats}

    # ---------------------------------------------------------------- inference
    def build(self, device: str = default("common.device")) -> tuple[Backbone, nn.Module, Heads]:
        """(backbone, tail with the trained weights, heads) ready for :meth:`predict`."""
        if self._net is not None and self._net[0].device == resolve_device(device):
            return self._net
        e = self.extractor
        backbone = Backbone(e["backbone"], e["weights"], e["seed"],
                            finetune=e["finetune_blocks"] > 0, input_size=e["input_size"],
                            device=device)
        if backbone.weights_id != e["weights_id"]:
            raise LocalizeError(f"{e['weights']}: backbone weights differ from those the "
                                f"model was trained with ({backbone.weights_id} != "
                                f"{e['weights_id']})")
        tail = backbone.tail
        if e["finetune_blocks"]:
            state = {k[len(TAIL_PREFIX):]: torch.from_numpy(np.array(v))
                     for k, v in self.arrays.items() if k.startswith(TAIL_PREFIX)}
            _load_tail(tail, state, "localize.npz")
        heads = _heads_from_arrays(self)
        self._net = (backbone, tail.to(backbone.device).eval(), heads.to(backbone.device).eval())
        return self._net

    @torch.inference_mode()
    def predict(self, images: Sequence[NDArray[np.uint8]], device: str = default("common.device")
                ) -> list[tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.int64]]]:
        """One class and one box (or K part boxes) per image.

        Args:
            images: (H, W, 3) uint8 RGB images of any sizes.
        Returns:
            per image ``(boxes (P, 4) float32 x1y1x2y2 pixels, scores (P,), labels (P,))``:
            P = 1 with the softmax probability of the predicted class as score, or P = K
            parts (label i = part i, score 1).
        """
        backbone, tail, heads = self.build(device)
        maps = backbone.frozen_maps(images).to(backbone.device)
        logits, reg = heads(pool_features(tail(maps)))
        norm = decode_boxes(reg.float().cpu().numpy(), self.arrays["target_mean"],
                            self.arrays["target_std"])
        out = []
        for i, im in enumerate(images):
            h, w = im.shape[:2]
            b = bx.scale(norm[i], h, w)
            if self.parts:
                k = len(self.classes)
                out.append((b, np.ones(k, np.float32), np.arange(k, dtype=np.int64)))
            else:
                p = torch.softmax(logits[i].float(), 0).cpu().numpy()
                c = int(p.argmax())
                out.append((b, np.array([p[c]], np.float32), np.array([c], np.int64)))
        return out


def decode_boxes(outputs: NDArray[np.float32], target_mean: NDArray[np.float32],
                 target_std: NDArray[np.float32]) -> NDArray[np.float32]:
    """Standardised regressor outputs (N, 4 P) -> normalised boxes (N, P, 4) in [0, 1],
    corners ordered (x1 <= x2, y1 <= y2)."""
    t = outputs * target_std + target_mean
    b = np.clip(t.reshape(len(t), -1, 4), 0.0, 1.0)
    lo, hi = np.minimum(b[..., :2], b[..., 2:]), np.maximum(b[..., :2], b[..., 2:])
    return np.concatenate([lo, hi], axis=-1).astype(np.float32)


def _heads_from_arrays(loc: Localizer) -> Heads:
    a = loc.arrays
    heads = Heads(int(a["fc6_w"].shape[1]), loc.hidden, len(loc.classes), loc.num_boxes,
                  loc.attach, classifier=not loc.parts)
    state = {"feat_mean": a["feat_mean"], "feat_std": a["feat_std"],
             "fc6.weight": a["fc6_w"], "fc6.bias": a["fc6_b"],
             "fc7.weight": a["fc7_w"], "fc7.bias": a["fc7_b"],
             "reg.weight": a["reg_w"], "reg.bias": a["reg_b"]}
    if not loc.parts:
        state.update({"cls.weight": a["cls_w"], "cls.bias": a["cls_b"]})
    if loc.attach == "conv":
        state.update({"reg6.weight": a["reg6_w"], "reg6.bias": a["reg6_b"]})
    heads.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return heads


def _heads_to_arrays(heads: Heads) -> dict[str, NDArray[np.float32]]:
    names = {"feat_mean": "feat_mean", "feat_std": "feat_std", "fc6.weight": "fc6_w",
             "fc6.bias": "fc6_b", "fc7.weight": "fc7_w", "fc7.bias": "fc7_b",
             "cls.weight": "cls_w", "cls.bias": "cls_b", "reg6.weight": "reg6_w",
             "reg6.bias": "reg6_b", "reg.weight": "reg_w", "reg.bias": "reg_b"}
    return {names[k]: v.detach().float().cpu().numpy() for k, v in heads.state_dict().items()}


def _tail_arrays(tail: nn.Module) -> dict[str, NDArray[np.float32]]:
    """Float parameters and buffers of the tail (batch norm's integer counters left out)."""
    return {TAIL_PREFIX + k: v.detach().float().cpu().numpy()
            for k, v in tail.state_dict().items() if v.is_floating_point()}


def _load_tail(tail: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Load fine-tuned tail weights; LocalizeError naming ``where`` on missing/extra/shape."""
    own = {k: v for k, v in tail.state_dict().items() if v.is_floating_point()}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise LocalizeError(f"{where}: fine-tuned backbone arrays do not fit the backbone "
                            f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise LocalizeError(f"{where}: array {TAIL_PREFIX}{k} has shape {tuple(v.shape)}, "
                                f"expected {tuple(own[k].shape)}")
    tail.load_state_dict(state, strict=False)


def expected_shapes(loc_json: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shapes of the head arrays implied by ``localize.json`` (tail arrays not included)."""
    k, h, d = len(loc_json["classes"]), int(loc_json["hidden"]), int(loc_json["extractor"]["dim"])
    p = k if loc_json["parts"] else 1
    s: dict[str, tuple[int, ...]] = {
        "feat_mean": (d,), "feat_std": (d,), "fc6_w": (h, d), "fc6_b": (h,), "fc7_w": (h, h),
        "fc7_b": (h,), "reg_w": (4 * p, h), "reg_b": (4 * p,), "target_mean": (4 * p,),
        "target_std": (4 * p,)}
    if not loc_json["parts"]:
        s.update(cls_w=(k, h), cls_b=(k,))
    if loc_json["attach"] == "conv":
        s.update(reg6_w=(h, d), reg6_b=(h,))
    return s


_REQUIRED = {"format_version": int, "kind": str, "package_version": str, "classes": list,
             "attach": str, "loss": str, "parts": bool, "extractor": dict, "hidden": int,
             "training_stats": dict}
_EXTRACTOR_KEYS = {"backbone": str, "weights": (str, type(None)), "weights_id": str,
                   "seed": int, "input_size": int, "grid": int, "finetune_blocks": int,
                   "dim": int}


def _validate(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], path: Path) -> None:
    """Raise LocalizeError naming ``path`` unless settings and arrays are consistent."""
    def fail(problem: str) -> None:
        raise LocalizeError(f"{path}: {problem}")

    for key, typ in _REQUIRED.items():
        if not isinstance(meta.get(key), typ):
            fail(f"{key!r} missing or not a {typ.__name__}")
    if meta["kind"] != "localize":
        fail(f"kind is {meta['kind']!r}, not 'localize'")
    problem = class_names_problem(meta["classes"])
    if problem:
        fail(problem)
    if meta["attach"] not in ATTACH:
        fail(f"attach must be one of {ATTACH}, got {meta['attach']!r}")
    if meta["loss"] not in LOSSES:
        fail(f"loss must be one of {LOSSES}, got {meta['loss']!r}")
    if meta["hidden"] < 1:
        fail(f"hidden must be >= 1, got {meta['hidden']}")
    e = meta["extractor"]
    for key, typ in _EXTRACTOR_KEYS.items():
        if not isinstance(e.get(key), typ) or isinstance(e.get(key), bool):
            fail(f"extractor.{key} missing or of the wrong type ({e.get(key)!r})")
    if e["backbone"] not in CONV_CHANNELS:
        fail(f"extractor.backbone {e['backbone']!r} is not one of {sorted(CONV_CHANNELS)}")
    if e["grid"] != GRID or e["dim"] != CONV_CHANNELS[e["backbone"]] * GRID * GRID:
        fail(f"extractor grid {e['grid']} / dim {e['dim']} do not fit {e['backbone']} "
             f"(this version pools to {GRID}x{GRID})")
    if e["finetune_blocks"] not in (0, FINETUNE_BLOCKS[e["backbone"]]):
        fail(f"extractor.finetune_blocks must be 0 or {FINETUNE_BLOCKS[e['backbone']]}")
    expected = expected_shapes(meta)
    tail = [n for n in arrays if n.startswith(TAIL_PREFIX)]
    extra = sorted(set(arrays) - set(expected) - set(tail))
    if extra:
        fail(f"unexpected array(s) {extra}")
    if bool(tail) != bool(e["finetune_blocks"]):
        fail("fine-tuned backbone arrays present without finetune_blocks (or missing)")
    for name, shape in expected.items():
        if name not in arrays:
            fail(f"missing array {name!r}")
        if tuple(arrays[name].shape) != shape:
            fail(f"{name} has shape {tuple(arrays[name].shape)}, expected {shape}")
    for name, a in arrays.items():
        if a.dtype != np.float32:
            fail(f"{name} must be float32, got {a.dtype}")
        if not np.isfinite(a).all():
            fail(f"{name} holds NaN or infinite values")
    for name in ("feat_std", "target_std"):
        if (arrays[name] <= 0).any():
            fail(f"{name} must be positive")


def save_localizer(directory: str | Path, loc: Localizer, overwrite: bool = False) -> Path:
    """Write ``loc`` as a bundle folder (arrays first, then the JSON naming their sha256).

    Raises:
        FileExistsError: a bundle is there and ``overwrite`` is False.
        LocalizeError: the localiser is inconsistent (same checks as :func:`load_localizer`).
    """
    d = Path(directory)
    arrays = {k: np.asarray(v, np.float32) for k, v in loc.arrays.items()}
    meta = loc.to_json()
    _validate(meta, arrays, d / JSON_NAME)
    if not overwrite and ((d / JSON_NAME).exists() or (d / ARRAYS_NAME).exists()):
        raise FileExistsError(f"{d}: a localize bundle exists; pass --overwrite to replace it")
    d.mkdir(parents=True, exist_ok=True)
    data = npz_bytes(arrays)
    atomic_write_bytes(d / ARRAYS_NAME, data)
    meta["arrays"] = {"file": ARRAYS_NAME, "sha256": hashlib.sha256(data).hexdigest(),
                      "shapes": {k: list(v.shape) for k, v in arrays.items()}}
    atomic_write_text(d / JSON_NAME, json.dumps(meta, indent=2) + "\n")
    return d


def load_localizer(directory: str | Path) -> Localizer:
    """Read and validate a bundle folder written by :func:`save_localizer`.

    Raises:
        LocalizeError: a file is missing, unreadable, of another format version, does not
            match its recorded sha256, or holds inconsistent settings/arrays.
    """
    d = Path(directory)
    apath = d / ARRAYS_NAME
    meta, arrays = read_bundle(d, JSON_NAME, ARRAYS_NAME, FORMAT_VERSION, LocalizeError,
                               "a `rcnn localize train` bundle")
    rec = meta["arrays"]
    shapes = rec.get("shapes", {})
    if {k: list(v.shape) for k, v in arrays.items()} != shapes:
        raise LocalizeError(f"{apath}: arrays or shapes differ from those in {JSON_NAME}")
    _validate(meta, arrays, apath)
    return Localizer(classes=list(meta["classes"]), attach=meta["attach"], loss=meta["loss"],
                     parts=meta["parts"], extractor=dict(meta["extractor"]),
                     hidden=meta["hidden"], arrays=arrays,
                     training_stats=meta["training_stats"],
                     package_version=str(meta["package_version"]))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
@dataclass
class TrainingSet:
    """Targets of the usable images: ``images`` (dataset file names), ``labels`` (N,) class
    of the chosen object (0 with parts), ``boxes`` (N, P, 4) normalised x1/w y1/h x2/w y2/h;
    ``multi`` images with several objects (largest used), ``skipped`` file name -> reason."""

    images: list[str]
    labels: NDArray[np.int64]
    boxes: NDArray[np.float32]
    multi: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def training_targets(dataset: Any, parts: int | None = None) -> TrainingSet:
    """One target per image of ``dataset``: its largest object (or, with ``parts=K``, the
    largest box of each of the K classes, in class order).

    Raises:
        LocalizeError: ``parts`` does not equal the number of classes, or no image is usable.
    """
    k = len(dataset.classes)
    if parts is not None and parts != k:
        raise LocalizeError(f"--parts {parts}: the annotations have {k} classes "
                            f"({', '.join(dataset.classes)}); parts are given as one class each")
    names, labels, boxes, multi, skipped = [], [], [], 0, {}
    for r in dataset.records:
        b = bx.as_boxes(r.boxes)
        if len(b) == 0:
            skipped[r.file_name] = "no objects"
            continue
        area = bx.area(b)
        if parts is None:
            i = int(np.argmax(area))
            multi += len(b) > 1
            chosen, lab = b[i:i + 1], int(r.labels[i])
        else:
            rows = []
            for c in range(k):
                idx = np.flatnonzero(np.asarray(r.labels) == c)
                if len(idx) == 0:
                    break
                rows.append(b[idx[np.argmax(area[idx])]])
            if len(rows) < k:
                skipped[r.file_name] = f"part {dataset.classes[len(rows)]!r} missing"
                continue
            multi += len(b) > k
            chosen, lab = np.stack(rows), 0
        if r.height <= 0 or r.width <= 0:
            skipped[r.file_name] = "image size unknown (image not found)"
            continue
        names.append(r.file_name)
        labels.append(lab)
        boxes.append(bx.scale(chosen, 1.0 / r.height, 1.0 / r.width))
    if not names:
        raise LocalizeError("no usable training image (every image lacks objects"
                            + (" or a part" if parts else "") + ")")
    return TrainingSet(names, np.array(labels, np.int64), np.stack(boxes).astype(np.float32),
                       multi, skipped)


def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and standard deviation (N, D) -> (D,), (D,); the floor is relative
    (:data:`STD_FLOOR` x the mean deviation), so features of any scale survive it."""
    std = x.std(0, unbiased=False)
    return x.mean(0), std + STD_FLOOR * std.mean() + 1e-12


def _check_train_args(attach: str, loss: str, iterations: int, batch_size: int, hidden: int,
                      lr: float) -> None:
    if attach not in ATTACH:
        raise ValueError(f"attach must be one of {ATTACH}, got {attach!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if iterations < 1 or batch_size < 1 or hidden < 1 or not lr > 0:
        raise ValueError("iterations, batch_size, hidden and lr must be positive")


@dataclass
class _Cached:
    """What training reads: the frozen part's outputs (or, without fine-tuning, the pooled
    features) of every image and its mirror, class labels, standardised box targets."""

    cache: torch.Tensor
    labels: torch.Tensor
    y_reg: torch.Tensor
    target_mean: torch.Tensor
    target_std: torch.Tensor
    num_boxes: int
    images: int


def _cache_images(dataset: Any, targets: TrainingSet, bb: Backbone,
                  read: Callable[[Path], NDArray[np.uint8]], flip: bool) -> _Cached:
    """Read every training image (an unreadable one is logged and skipped), run the frozen
    part once on it and, with ``flip``, on its mirror; standardise the box targets."""
    from rcnn_cli.images import ImageError

    images, keep = [], []
    for i, name in enumerate(targets.images):
        try:
            # resized at once: the network sees input_size² only, and thousands of
            # full-size photos (and their mirrors) would not fit in memory
            images.append(resize_image(read(Path(dataset.image_root) / name), bb.input_size))
            keep.append(i)
        except (ImageError, OSError) as e:
            log.error("%s", e)
            targets.skipped[name] = str(e)
    if not images:
        raise LocalizeError("no training image could be read")
    labels = torch.from_numpy(targets.labels[keep])
    tboxes = targets.boxes[keep]
    maps = [bb.frozen_maps(images)]
    if flip:
        maps.append(bb.frozen_maps([np.ascontiguousarray(im[:, ::-1]) for im in images]))
        tboxes = np.concatenate([tboxes, bx.hflip(tboxes.reshape(-1, 4), 1).reshape(
            tboxes.shape)])
        labels = torch.cat([labels, labels])
    num_boxes = tboxes.shape[1]
    targets_t = torch.from_numpy(tboxes.reshape(len(tboxes), 4 * num_boxes))
    tmean, tstd = _standardise(targets_t)
    return _Cached(torch.cat(maps), labels, (targets_t - tmean) / tstd, tmean, tstd,
                   num_boxes, len(keep))


def _build_heads(data: _Cached, bb: Backbone, hidden: int, num_classes: int, attach: str,
                 parts: int | None, finetune: bool, lr: float, gen: torch.Generator
                 ) -> tuple[Heads, nn.Module, torch.optim.Optimizer]:
    """Heads with seeded init and inputs standardised on the training features, the tail
    (trainable with ``finetune``) and their SGD optimiser. Without fine-tuning the pooled
    features replace ``data.cache`` (the tail is empty)."""
    dev = bb.device
    tail = bb.tail.to(dev).eval()  # batch norm statistics stay frozen while fine-tuning
    with torch.no_grad():
        feats0 = torch.cat([pool_features(tail(data.cache[i:i + 256].to(dev))).cpu()
                            for i in range(0, len(data.cache), 256)])
    heads = Heads(feats0.shape[1], hidden, num_classes, data.num_boxes, attach,
                  classifier=parts is None)
    heads.init_weights(gen)
    fmean, fstd = _standardise(feats0)
    heads.feat_mean.copy_(fmean)
    heads.feat_std.copy_(fstd)
    heads = heads.to(dev).train()
    if not finetune:
        data.cache = feats0  # the tail is empty: the pooled features are the cache
    groups = [{"params": list(heads.parameters()), "lr": lr}]
    if finetune:
        groups.append({"params": list(tail.parameters()), "lr": lr * FINETUNE_LR_MULT})
        for p in tail.parameters():
            p.requires_grad_(True)
    opt = torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    return heads, tail, opt


def _fit(data: _Cached, heads: Heads, tail: nn.Module, opt: torch.optim.Optimizer,
         finetune: bool, loss: str, iterations: int, batch_size: int, gen: torch.Generator,
         dev: torch.device) -> list[float]:
    """SGD over shuffled epochs (lr x 0.1 at :data:`LR_STEP_AT`); returns the losses."""
    params = [p for g in opt.param_groups for p in g["params"]]
    n = len(data.cache)
    order, pos, losses = torch.randperm(n, generator=gen), 0, []
    step_at = int(iterations * LR_STEP_AT)
    for it in range(iterations):
        if it == step_at:
            for g in opt.param_groups:
                g["lr"] *= 0.1
        if pos + min(batch_size, n) > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += len(idx)
        x = data.cache[idx].to(dev)
        feats = pool_features(tail(x)) if finetune else x
        logits, reg = heads(feats, gen)
        total = box_loss(reg, data.y_reg[idx].to(dev), loss)
        if logits is not None:
            total = total + nn.functional.cross_entropy(logits, data.labels[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        losses.append(float(total.detach()))
    heads.eval()
    for p in tail.parameters():
        p.requires_grad_(False)
    return losses


def train_localizer(dataset: Any, *, attach: str = default("localize.attach"),
                    loss: str = default("localize.loss"),
                    finetune: bool = default("localize.finetune"), parts: int | None = None,
                    iterations: int = ITERATIONS, seed: int = default("localize.seed"),
                    backbone: str = default("localize.backbone"),
                    weights: str | Path | None = None, input_size: int | None = None,
                    device: str = default("common.device"), hidden: int = HIDDEN,
                    lr: float = LR, batch_size: int = BATCH_SIZE,
                    read: Callable[[Path], NDArray[np.uint8]] | None = None) -> Localizer:
    """Train the classifier and the box regressor on a dataset (see the module docstring).

    Args:
        dataset: a :class:`rcnn_cli.datasets.Dataset` (records, classes, image_root).
        attach: ``"conv"`` or ``"fc"``: where the box regressor reads.
        loss: ``"l2"`` or ``"smooth_l1"``.
        finetune: also train the backbone's last :data:`FINETUNE_BLOCKS` blocks.
        parts: regress this many part boxes per image (= the number of classes).
        iterations, batch_size, lr, hidden: SGD settings and fc width.
        seed: seeds the random weights (``weights="random"``), the init, the batches and the
            dropout masks.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        read: image reader (default :func:`rcnn_cli.images.read_image`).

    Returns:
        The trained :class:`Localizer` (save it with :func:`save_localizer`).

    Raises:
        LocalizeError: unusable options or data (checked before any image is read).
        ValueError: bad option values.
    """
    from rcnn_cli.images import read_image

    _check_train_args(attach, loss, iterations, batch_size, hidden, lr)
    t0 = time.perf_counter()
    targets = training_targets(dataset, parts)
    if targets.multi:
        log.info("localize: %d of %d training images hold several %s; each uses its largest",
                 targets.multi, len(targets.images), "boxes of a part" if parts else "objects")
    if targets.skipped:
        first = ", ".join(f"{k} ({v})" for k, v in list(targets.skipped.items())[:3])
        log.warning("localize: %d image(s) skipped, e.g. %s", len(targets.skipped), first)
    bb = Backbone(backbone, weights, seed, finetune, input_size, device)
    flip = parts is None  # mirroring would swap left/right parts (see module docstring)

    # 1. cache the frozen part's output for every image (and its mirror)
    data = _cache_images(dataset, targets, bb, read or read_image, flip)
    t_extract = time.perf_counter() - t0
    # 2. heads (and tail) with seeded init; inputs standardised on the training features
    gen = torch.Generator().manual_seed(seed)
    heads, tail, opt = _build_heads(data, bb, hidden, len(dataset.classes), attach, parts,
                                    finetune, lr, gen)
    # 3. SGD over shuffled epochs
    losses = _fit(data, heads, tail, opt, finetune, loss, iterations, batch_size, gen,
                  bb.device)

    arrays = _heads_to_arrays(heads)
    arrays.update(target_mean=data.target_mean.numpy().astype(np.float32),
                  target_std=data.target_std.numpy().astype(np.float32))
    if finetune:
        arrays.update(_tail_arrays(tail))
    window = max(1, min(50, iterations // 10))
    stats = {"images": data.images, "mirrored": flip, "several_objects": targets.multi,
             "skipped": len(targets.skipped), "iterations": iterations,
             "batch_size": batch_size, "lr": lr, "seed": seed,
             "first_loss": float(np.mean(losses[:window])),
             "final_loss": float(np.mean(losses[-window:])),
             "seconds_features": round(t_extract, 3),
             "seconds": round(time.perf_counter() - t0, 3)}
    log.info("localize: %d images%s, loss %.3f -> %.3f in %.1f s", data.images,
             " (+ mirrored)" if flip else "", stats["first_loss"], stats["final_loss"],
             stats["seconds"])
    return Localizer(classes=list(dataset.classes), attach=attach, loss=loss,
                     parts=parts is not None, extractor=bb.settings(), hidden=hidden,
                     arrays=arrays, training_stats=stats)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
#: ImageNet CLS-LOC: a localisation is correct at IoU >= 0.5 with a box of the right class.
LOC_IOU = 0.5


def _per_image(predictions: Mapping[str, Any], dataset: Any,
               classes: Sequence[str] | None) -> tuple[dict[str, Any], dict[str, int]]:
    """Predictions keyed by dataset file name (names matched as in evaluate) and a map
    prediction label -> dataset label (-1 for a class the dataset does not know)."""
    from rcnn_cli.formats import as_detections, match_image_names

    names = match_image_names(predictions.keys(), [r.file_name for r in dataset.records])
    preds = {names[k]: as_detections(v) for k, v in predictions.items() if k in names}
    index = {c: i for i, c in enumerate(dataset.classes)}
    own = list(dataset.classes) if classes is None else list(classes)
    return preds, {i: index.get(c, -1) for i, c in enumerate(own)}


def localization_metrics(dataset: Any, predictions: Mapping[str, Any],
                         classes: Sequence[str] | None = None,
                         iou_thresh: float = LOC_IOU) -> dict[str, Any]:
    """Classification and localisation accuracy of one prediction per image (ImageNet
    CLS-LOC rule) and the mean IoU.

    The top-scoring detection of each image is its prediction. Over the images of
    ``dataset`` that hold at least one object:

    * ``classification_accuracy``: the predicted class is one of the image's classes;
    * ``localization_accuracy``: right class AND IoU >= ``iou_thresh`` with a ground-truth
      box of that class;
    * ``mean_iou``: mean of the predicted box's best IoU with any ground-truth box (class
      aside: the quality of the box alone).

    An image without a prediction counts as wrong with IoU 0 (listed in ``missing_images``).

    Args:
        dataset: a :class:`rcnn_cli.datasets.Dataset` (records, classes).
        predictions: image name -> detections (``Detections`` or ``(boxes, scores,
            labels)``); names are matched to the dataset's as ``rcnn evaluate`` does.
        classes: the names of the prediction labels (default: the dataset's classes).
    Returns:
        {"num_images", "classification_accuracy", "localization_accuracy", "mean_iou",
        "iou_thresh", "missing_images", "summary"}.
    """
    preds, to_ds = _per_image(predictions, dataset, classes)
    cls_ok, loc_ok, ious, missing = [], [], [], []
    for r in dataset.records:
        gt = bx.as_boxes(r.boxes)
        if len(gt) == 0:
            continue
        det = preds.get(r.file_name)
        if det is None or len(det) == 0:
            missing.append(r.file_name)
            cls_ok.append(False)
            loc_ok.append(False)
            ious.append(0.0)
            continue
        top = int(np.argmax(det.scores))
        c = to_ds.get(int(det.labels[top]), -1)
        iou = bx.box_iou(det.boxes[top:top + 1], gt)[0]
        same = np.asarray(r.labels) == c
        cls_ok.append(bool(same.any()))
        loc_ok.append(bool(same.any() and iou[same].max() >= iou_thresh))
        ious.append(float(iou.max()))
    n = len(ious)
    m = {"num_images": n,
         "classification_accuracy": float(np.mean(cls_ok)) if n else math.nan,
         "localization_accuracy": float(np.mean(loc_ok)) if n else math.nan,
         "mean_iou": float(np.mean(ious)) if n else math.nan,
         "iou_thresh": float(iou_thresh), "missing_images": missing}
    m["summary"] = (f"classification accuracy {m['classification_accuracy']:.4f}, "
                    f"localisation accuracy (IoU >= {iou_thresh:g}) "
                    f"{m['localization_accuracy']:.4f}, mean IoU {m['mean_iou']:.4f} "
                    f"({n} images)")
    return m


def parts_metrics(dataset: Any, predictions: Mapping[str, Any],
                  classes: Sequence[str] | None = None,
                  iou_thresh: float = LOC_IOU) -> dict[str, Any]:
    """Per-part scores of K-part predictions: for each part (class) the IoU of its predicted
    box (the top-scoring one of that class) with the largest ground-truth box of the part.

    Returns:
        {"num_images", "parts": {name: {"mean_iou", "correct"}}, "mean_iou",
        "correct_parts" (fraction of (image, part) pairs with IoU >= ``iou_thresh``: PCP),
        "summary"}. Parts absent from an image are not counted; a missing prediction
        counts IoU 0.
    """
    preds, to_ds = _per_image(predictions, dataset, classes)
    per: dict[int, list[float]] = {c: [] for c in range(len(dataset.classes))}
    n = 0
    for r in dataset.records:
        gt, lab = bx.as_boxes(r.boxes), np.asarray(r.labels)
        if len(gt) == 0:
            continue
        n += 1
        det = preds.get(r.file_name)
        dl = np.array([to_ds.get(int(v), -1) for v in det.labels]) if det else np.zeros(0)
        for c in np.unique(lab):
            g = gt[lab == c]
            g = g[np.argmax(bx.area(g))][None]
            mine = np.flatnonzero(dl == c)
            if len(mine) == 0:
                per[int(c)].append(0.0)
                continue
            best = mine[np.argmax(det.scores[mine])]
            per[int(c)].append(float(bx.box_iou(det.boxes[best:best + 1], g)[0, 0]))
    allv = [v for vals in per.values() for v in vals]
    parts = {dataset.classes[c]: {"mean_iou": float(np.mean(v)) if v else math.nan,
                                  "correct": float(np.mean(np.array(v) >= iou_thresh))
                                  if v else math.nan} for c, v in per.items()}
    m = {"num_images": n, "parts": parts,
         "mean_iou": float(np.mean(allv)) if allv else math.nan,
         "correct_parts": float(np.mean(np.array(allv) >= iou_thresh)) if allv else math.nan,
         "iou_thresh": float(iou_thresh)}
    m["summary"] = (f"parts: mean IoU {m['mean_iou']:.4f}, correct parts (IoU >= "
                    f"{iou_thresh:g}) {m['correct_parts']:.4f} ({n} images)")
    return m


# --------------------------------------------------------------------------------------------
# Predict a folder
# --------------------------------------------------------------------------------------------
#: Files a predict run writes into its output folder (besides vis/, voc/, yolo/).
OUTPUT_FILES = ("localize.json", "detections.csv", "detections.json", "images.json",
                "categories.json", "metrics.json")
FORMATS = ("csv", "coco", "voc", "yolo")


@dataclass
class PredictResult:
    """What :func:`predict_folder` did: the batch report, the predictions (image name ->
    (boxes, scores, labels)), image sizes, metrics (or None) and the files written."""

    report: Any
    predictions: dict[str, tuple]
    sizes: dict[str, tuple[int, int]]
    metrics: dict[str, Any] | None
    written: list[Path]


def _nan_to_none(x: Any) -> Any:
    """JSON-safe copy: NaN floats become null."""
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def check_formats(formats: Iterable[str]) -> list[str]:
    """Validated list of output formats (ValueError naming the unknown one)."""
    fmts = [f.strip() for f in formats if f.strip()]
    unknown = sorted(set(fmts) - set(FORMATS))
    if unknown or not fmts:
        raise ValueError(f"unknown format(s) {unknown} (choose from {', '.join(FORMATS)})")
    return fmts


def predict_folder(inputs: Sequence[str | Path], model_dir: str | Path, out: str | Path,
                   split: str | Path | None = None,
                   formats: Sequence[str] = tuple(default("localize.formats")),
                   annotations: str | Path | None = None, save_vis: bool = False,
                   device: str = default("common.device"), overwrite: bool = False
                   ) -> PredictResult:
    """One class and box per image of ``inputs`` (folders, files, list files), written as
    ``rcnn detect`` writes detections (``detections.csv``, COCO ``detections.json`` +
    ``images.json`` + ``categories.json``, optionally VOC / YOLO files and ``vis/``), plus
    ``localize.json`` (a marker naming the model, so evaluation can tell localisation
    outputs apart) and, with ``annotations``, ``metrics.json`` from
    :func:`localization_metrics` (or :func:`parts_metrics`).

    An unreadable image is reported in the returned report and the rest go on.

    Raises:
        LocalizeError: bad bundle. ValueError: bad ``formats``. FileExistsError: ``out``
        holds outputs and ``overwrite`` is False. FileNotFoundError: missing input.
    """
    from rcnn_cli import formats as fm
    from rcnn_cli.images import ImageError, list_images, read_image
    from rcnn_cli.runner import Report

    fmts = check_formats(formats)
    loc = load_localizer(model_dir)
    out = Path(out)
    # the same folder rules as `rcnn detect`: never the model or an input folder, never a
    # folder of someone else's files without --overwrite, never over a file we did not write
    from rcnn_cli.store import check_output_folder, claim_folder

    check_output_folder(out, [model_dir], overwrite=False, what="-o, --model")
    check_output_folder(out, list(inputs), overwrite)
    ours = (out / "localize.json").is_file() and (out / "images.json").is_file()
    clash = [n for n in OUTPUT_FILES + ("vis", "voc", "yolo") if (out / n).exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{out}: holds {clash[0]}; choose another folder or pass "
                              "--overwrite")
    claim_folder(out, ours, OUTPUT_FILES + ("vis", "voc", "yolo"), overwrite)
    ds = None
    if annotations is not None:
        from rcnn_cli.datasets import load_dataset

        ds = load_dataset(annotations, split)
    items = list_images(list(inputs), split=split, exclude=[out])
    if not items:
        raise LocalizeError(f"no images in {', '.join(map(str, inputs))}"
                            + (f" listed in {split}" if split else ""))
    loc.build(device)  # load the backbone once, before the loop: fails early on weights
    report, preds, sizes, t0 = Report(), {}, {}, time.perf_counter()
    for it in items:
        try:
            img = read_image(it.path)
        except (ImageError, OSError) as e:
            report.fail(str(it.path), getattr(e, "reason", str(e)))
            continue
        t = time.perf_counter()
        boxes, scores, labels = loc.predict([img], device)[0]
        report.add_times({"localize": time.perf_counter() - t})
        preds[it.rel] = (boxes, scores, labels)
        sizes[it.rel] = img.shape[:2]
        report.done += 1
        if save_vis:
            from rcnn_cli.detect import vis_path
            from rcnn_cli.visualize import draw_detections, save_image

            save_image(vis_path(out / "vis", it.rel),
                       draw_detections(img, boxes, labels, None if loc.parts else scores,
                                       loc.classes))
    report.seconds = time.perf_counter() - t0
    written: list[Path] = []
    if "csv" in fmts:
        written.append(fm.write_detections_csv(out / "detections.csv", preds, loc.classes))
    if "coco" in fmts:
        written += fm.write_coco_results(out, preds, sizes, loc.classes)
    if "voc" in fmts:
        written += fm.write_voc_results(out / "voc", preds, loc.classes)
    if "yolo" in fmts:
        written += fm.write_yolo_results(out / "yolo", preds, sizes)
    metrics = None
    if ds is not None:
        fn = parts_metrics if loc.parts else localization_metrics
        metrics = fn(ds, preds, classes=loc.classes)
        metrics["seconds_per_image"] = (report.stage_seconds.get("localize", 0.0)
                                        / max(report.done, 1))
        path = out / "metrics.json"
        atomic_write_text(path, json.dumps(_nan_to_none(metrics), indent=2) + "\n")
        written.append(path)
    marker = {"kind": "localize", "model": str(Path(model_dir).resolve()),
              "classes": loc.classes, "parts": loc.parts, "attach": loc.attach,
              "images": report.done, "failed": report.failed, "formats": fmts}
    atomic_write_text(out / "localize.json", json.dumps(marker, indent=2) + "\n")
    written.append(out / "localize.json")
    return PredictResult(report, preds, sizes, metrics, written)
