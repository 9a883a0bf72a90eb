"""Fine-tune a backbone on detection windows (R-CNN ``finetuning/``, Fast R-CNN).

The ImageNet classifier is replaced by a new (K + 1)-way layer (index 0 = background, k + 1 =
class k) and the network is trained with SGD on labelled windows of the training images:

* every proposal and every ground-truth box of an image is a *window*; a window whose IoU
  with a ground truth is >= ``fg_iou`` (0.5) takes that ground truth's class, any other is
  background (R-CNN's ``window_data_layer``: fg_threshold = bg_threshold = 0.5). Windows that
  overlap only a VOC *difficult* object by >= ``fg_iou`` are ignored (neither class nor
  background). The label and IoU tables are computed once, before training;
* **warp** mode (R-CNN): a mini-batch is ``batch_size`` (128) windows, ``fg_per_batch`` (32)
  drawn uniformly from all foreground windows of all training images and the rest from all
  background windows (R-CNN sampled windows, not images, uniformly); each window is warped
  exactly as ``rcnn extract`` warps it (:func:`rcnn_cli.features.warp_crops_cpu` on the CPU,
  :func:`rcnn_cli.features.warp_crops_roi_align` on a GPU) and mirrored with probability 1/2;
* **shared** mode (Fast R-CNN): a mini-batch is ``images_per_batch`` (2) images, each
  mirrored with probability 1/2, resized as shared extraction resizes them, run once through
  the trunk; ``batch_size / images_per_batch`` RoIs per image (25 % foreground) go through
  the shared-mode head of :func:`rcnn_cli.features.shared_parts` (RoIAlign + the last conv
  blocks, or for mobilenet_v2's default shared tap ``grid`` the parameter-free
  :class:`rcnn_cli.features.GridHead` on the two trunk maps). One conv pass per image makes
  this the mode that is practical on a CPU;
* SGD with momentum 0.9, weight decay 5e-4, base lr 0.001, 10x on the new layer, biases at 2x
  lr and no weight decay (Caffe's ``blobs_lr: 1, 2`` / ``weight_decay: 1, 0`` in R-CNN's
  prototxts), lr x 0.1 every ``step_size`` iterations (default: once, at 2/3 of the run);
* **batch norm stays in eval mode** (frozen running statistics; its scale and shift are still
  learnt): with 2 images or 128 small crops per batch the batch statistics are noisy and
  differ from those seen at extraction, the usual practice when fine-tuning detection
  backbones (Detectron's frozen BN). AlexNet/VGG16 have no batch norm and keep their dropout.

Every ``val_every`` iterations the loss and the accuracies on foreground and on background
windows of a fixed, seeded set of windows of held-out training images are measured; the
weights with the lowest validation loss are the ones exported. A checkpoint (weights,
momentum buffers, iteration, losses; safetensors + JSON, no pickle) is written every
``checkpoint_every`` iterations and a killed run resumes from it. The random numbers of
iteration ``i`` come from generators seeded with ``(seed, i)``, so a resumed run draws exactly
what an uninterrupted one would (on a CPU the final weights are identical).

Outputs in ``out_dir``: ``backbone.safetensors`` (the whole torchvision model's state dict in
its own key names, the unused ImageNet classifier included: ``load_backbone(name,
weights=path)`` and ``rcnn extract --weights path`` load it), ``classifier.safetensors`` (the
(K + 1)-way layer: ``weight`` (K + 1, D), ``bias`` (K + 1,); see :func:`load_classifier`) and
``finetune.json`` (the recipe: settings, classes, source weights, iterations, validation
history, device, wall time), written last, so its presence means the run finished.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import nn
from tqdm import tqdm

from rcnn_cli import boxes as box_ops
from rcnn_cli.datasets import Dataset, ImageRecord
from rcnn_cli.features import (
    BACKBONES,
    CONTEXT_PADDING,
    SHARED_MAX,
    SHARED_SHORT,
    _check_backbone,
    _check_tap,
    default_tap,
    load_backbone,
    normalize_image,
    resolve_device,
    shared_parts,
    shared_resize,
    tap_network,
    warp_crops_cpu,
    warp_crops_roi_align,
    weights_id,
)
from rcnn_cli.images import read_image
from rcnn_cli.labels import FG_IOU, label_windows, window_labels  # noqa: F401 (re-exported)
from rcnn_cli.store import StaleStoreError, atomic_write_bytes, atomic_write_json, settings_key

log = logging.getLogger("rcnn_cli.finetune")

#: Bumped when the outputs of the same settings change (part of the settings key).
FINETUNE_FORMAT = 1
#: R-CNN mini-batch: 128 windows of which 32 (25 %) foreground (window_data_layer).
BATCH_SIZE = 128
FG_PER_BATCH = 32
#: Fast R-CNN: 2 images per mini-batch (64 RoIs each at batch 128).
IMAGES_PER_BATCH = 2
#: R-CNN pascal_finetune_solver.prototxt: base_lr, momentum, weight_decay, gamma.
BASE_LR = 0.001
MOMENTUM = 0.9
WEIGHT_DECAY = 0.0005
LR_GAMMA = 0.1
#: R-CNN's new fc8 layer learns 10x faster (blobs_lr 10 / 20); biases at 2x lr, no decay.
NEW_LAYER_LR_MULT = 10.0
BIAS_LR_MULT = 2.0
#: R-CNN initialised fc8_pascal with N(0, 0.01) weights and zero bias.
NEW_LAYER_INIT_STD = 0.01
#: Dropout in front of the new layer: torchvision's own classifier dropout where the tap does
#: not already end in one (MobileNetV2: 0.2; ResNets have none; AlexNet/VGG keep theirs).
HEAD_DROPOUT = {"mobilenet_v2": 0.2}
#: Validation windows per held-out image: up to 16 foreground, the rest background.
VAL_ROIS_PER_IMAGE = 64
VAL_FG_PER_IMAGE = 16
#: Proposals read per image (best first), as ``rcnn extract``.
MAX_PROPOSALS = 2000
#: Decoded, normalised training images kept in memory (LRU beyond this).
IMAGE_CACHE_MB = 2048

ProposalSource = Callable[[ImageRecord], NDArray[np.float32]] | Mapping[str, NDArray[np.float32]]


# --------------------------------------------------------------------------------------------
# Labels and sampling
# --------------------------------------------------------------------------------------------
def sample_rois(labels: ArrayLike, batch_size: int, fg_per_batch: int,
                rng: np.random.Generator) -> NDArray[np.int64]:
    """Indices of one mini-batch: up to ``fg_per_batch`` foreground (label > 0) and the rest
    background (label 0), each drawn uniformly without replacement.

    With fewer foreground windows than ``fg_per_batch`` all of them are taken and background
    fills the batch; with too few of both the batch is smaller (Fast R-CNN ``_sample_rois``).

    Returns:
        NDArray[B] int64, foreground first, B <= batch_size.
    """
    labels = np.asarray(labels)
    if not 0 <= fg_per_batch <= batch_size:
        raise ValueError(f"fg_per_batch must be in [0, batch_size={batch_size}], "
                         f"got {fg_per_batch}")
    fg = np.flatnonzero(labels > 0)
    bg = np.flatnonzero(labels == 0)
    n_fg = min(fg_per_batch, len(fg))
    n_bg = min(batch_size - n_fg, len(bg))
    pick_fg = rng.choice(fg, n_fg, replace=False) if n_fg else fg[:0]
    pick_bg = rng.choice(bg, n_bg, replace=False) if n_bg else bg[:0]
    return np.concatenate([pick_fg, pick_bg]).astype(np.int64)


@dataclass
class _Windows:
    """Labelled windows of one image (see :func:`label_windows`)."""

    boxes: NDArray[np.float32]
    labels: NDArray[np.int64]


def _proposal_lookup(proposals: ProposalSource) -> Callable[[ImageRecord], NDArray[np.float32]]:
    if callable(proposals):
        return proposals
    if isinstance(proposals, Mapping):
        return lambda rec: proposals[rec.file_name]
    raise TypeError("proposals must be a mapping file_name -> boxes (N, 4) or a callable "
                    f"ImageRecord -> boxes, got {type(proposals).__name__}")


def proposals_from_dir(folder: str | Path) -> Callable[[ImageRecord], NDArray[np.float32]]:
    """Proposals read from an ``rcnn propose`` output folder. A record's ``file_name`` finds
    the image whose identity (relative path with extension) it is, else the one image whose
    relative path or name matches it (:func:`rcnn_cli.evaluate.match_image_names`: the
    propose run may have been given the dataset root or its ``images/`` folder). The
    callable's ``key`` attribute is the folder's settings key (:func:`finetune` uses it as
    ``proposals_id``)."""
    from rcnn_cli.evaluate import match_image_names
    from rcnn_cli.store import open_upstream

    store = open_upstream(folder, "propose")
    matched: dict[str, str] = {}  # names that are not a file of the folder -> its image

    def exists(name: str) -> bool:
        try:
            return store.path_for(name).is_file()
        except ValueError:  # a name that would leave the folder: match it instead
            return False

    def prepare(names: Sequence[str]) -> None:
        """Match every name that is not a file of the folder in one pass (matching them one
        at a time re-indexes the folder per name: minutes on 10k images)."""
        missing = [n for n in (Path(x).as_posix() for x in names) if not exists(n)]
        if missing:
            matched.update(match_image_names(missing, store.done_rels()))

    def lookup(rec: ImageRecord) -> NDArray[np.float32]:
        name = Path(rec.file_name).as_posix()
        if not exists(name):
            if name not in matched:
                prepare([name])
            if name not in matched:
                raise KeyError(name)
            name = matched[name]
        return store.load(name)["boxes"]

    lookup.key = store.key  # type: ignore[attr-defined]
    lookup.prepare = prepare  # type: ignore[attr-defined]
    return lookup


def build_windows(records: Sequence[ImageRecord], proposals: ProposalSource,
                  fg_iou: float = FG_IOU, max_proposals: int = MAX_PROPOSALS) -> list[_Windows]:
    """The label tables of every image, computed once before training."""
    lookup = _proposal_lookup(proposals)
    if hasattr(lookup, "prepare"):
        lookup.prepare([r.file_name for r in records])
    out = []
    for rec in records:
        try:
            props = lookup(rec)
        except KeyError:
            raise ValueError(f"proposals: no boxes for image {rec.file_name!r} "
                             "(run `rcnn propose` on it)") from None
        props = box_ops.as_boxes(props)[:max_proposals]
        w, lab, _ = label_windows(rec.boxes, rec.labels, props, fg_iou, rec.difficult)
        out.append(_Windows(w, lab))
    return out


# --------------------------------------------------------------------------------------------
# The network being trained
# --------------------------------------------------------------------------------------------
def _freeze_bn(module: nn.Module) -> None:
    """Batch-norm layers to eval mode: running statistics frozen (see the module docstring)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class _DetNet(nn.Module):
    """The torchvision model cut at ``tap`` (warp) or split in trunk + SharedHead (shared),
    plus the new (K + 1)-way classifier. ``model`` keeps the whole torchvision model (its
    state dict is what is saved)."""

    def __init__(self, backbone: str, model: nn.Module, tap: str, mode: str, context: float,
                 num_classes: int, seed: int) -> None:
        super().__init__()
        self.model = model
        if mode == "warp":
            self.net = tap_network(backbone, model, tap)
            self.trained = nn.ModuleList([self.net])
        else:
            self.trunk, self.head = shared_parts(backbone, model, tap, context)
            self.trained = nn.ModuleList([self.trunk, self.head])
        dim = BACKBONES[backbone].taps[tap]
        with torch.random.fork_rng(devices=[]):  # nn.Linear's default init draws globally
            self.classifier = nn.Sequential(nn.Dropout(HEAD_DROPOUT.get(backbone, 0.0)),
                                            nn.Linear(dim, num_classes + 1))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.classifier[1].weight.normal_(0.0, NEW_LAYER_INIT_STD, generator=g)
            self.classifier[1].bias.zero_()

    def train(self, mode: bool = True) -> _DetNet:
        super().train(mode)
        _freeze_bn(self)
        return self


def _param_groups(net: _DetNet, lr: float, new_mult: float, weight_decay: float) -> list[dict]:
    """SGD groups with Caffe's multipliers: (backbone weights, backbone biases and norm
    parameters, new weights, new biases)."""
    seen: set[int] = set()
    groups: dict[str, list] = {"w": [], "b": [], "new_w": [], "new_b": []}
    names: dict[str, list] = {k: [] for k in groups}

    def add(prefix: str, module: nn.Module, new: bool) -> None:
        for n, p in module.named_parameters(prefix=prefix):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            is_bias = p.ndim <= 1  # biases and batch-norm scale / shift
            key = ("new_" if new else "") + ("b" if is_bias else "w")
            groups[key].append(p)
            names[key].append(n)

    add("classifier", net.classifier, True)
    add("trained", net.trained, False)
    mult = {"w": (1.0, weight_decay), "b": (BIAS_LR_MULT, 0.0),
            "new_w": (new_mult, weight_decay), "new_b": (new_mult * BIAS_LR_MULT, 0.0)}
    return [{"params": groups[k], "names": names[k], "lr_mult": mult[k][0], "lr": lr * mult[k][0],
             "weight_decay": mult[k][1]} for k in groups if groups[k]]


def _lr_factor(iteration: int, step_size: int) -> float:
    """Step policy: ``gamma ** (iteration // step_size)``."""
    return LR_GAMMA ** (iteration // step_size)


# --------------------------------------------------------------------------------------------
# Images and batches
# --------------------------------------------------------------------------------------------
class _ImageCache:
    """Decoded, normalised images on the training device, least recently used evicted.

    CPU: NDArray (H, W, 3) float32 (what :func:`warp_crops_cpu` takes); GPU: Tensor (3, H, W).
    """

    def __init__(self, paths: Sequence[Path], device: torch.device, mean, std,
                 max_mb: float = IMAGE_CACHE_MB) -> None:
        self.paths, self.device, self.mean, self.std = list(paths), device, mean, std
        self.max_bytes = max_mb * 2 ** 20
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._bytes = 0

    def get(self, i: int):
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        img = read_image(self.paths[i])
        norm = normalize_image(img, self.mean, self.std)
        item: Any = norm
        if self.device.type != "cpu":
            item = torch.from_numpy(norm).permute(2, 0, 1).contiguous().to(self.device)
        nbytes = norm.nbytes
        self._cache[i] = item
        self._bytes += nbytes
        while self._bytes > self.max_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.nbytes if isinstance(old, np.ndarray) else old.numel() * 4
        return item


def _warp_crops(cache: _ImageCache, device: torch.device, img_idx: NDArray[np.int64],
                boxes: NDArray[np.float32], size: int, padding: float) -> torch.Tensor:
    """Warped crops (B, 3, S, S) of windows ``boxes`` of images ``img_idx``, batch order kept."""
    out = torch.empty((len(boxes), 3, size, size), device=device)
    for i in np.unique(img_idx):
        rows = np.flatnonzero(img_idx == i)
        img = cache.get(int(i))
        if device.type == "cpu":
            crops = warp_crops_cpu(img, boxes[rows], size, padding, normalized=img)
            out[torch.from_numpy(rows)] = torch.from_numpy(crops).permute(0, 3, 1, 2)
        else:
            tb = torch.from_numpy(boxes[rows]).to(device)
            out[torch.from_numpy(rows).to(device)] = warp_crops_roi_align(img, tb, size, padding)
    return out


def _shared_input(img, flip: bool, boxes: NDArray[np.float32], device: torch.device,
                  shared_scale: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One image for the trunk, as shared extraction prepares it (resize to
    ``shared_scale``), optionally mirrored; returns ((1, 3, h, w), boxes (N, 4) rescaled)."""
    t = torch.from_numpy(img).permute(2, 0, 1) if isinstance(img, np.ndarray) else img
    t = t[None]
    h, w = t.shape[-2:]
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
    scaled = torch.from_numpy(box_ops.scale(boxes, f_y, f_x)).to(device)
    return t.contiguous(memory_format=torch.channels_last), scaled


# --------------------------------------------------------------------------------------------
# Results, checkpoints, the classifier
# --------------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    """What :func:`finetune` wrote and measured.

    Attributes:
        weights_path: ``out_dir/backbone.safetensors`` (for ``load_backbone(weights=...)``).
        classifier_path: ``out_dir/classifier.safetensors``.
        recipe_path: ``out_dir/finetune.json``.
        best_val: validation metrics of the exported weights (None without validation).
        history: one dict per validation (iteration, lr, train_loss, val_loss, val_acc_fg,
            val_acc_bg, val_acc, seconds).
        train_losses: the loss of every iteration.
    """

    weights_path: Path
    classifier_path: Path
    recipe_path: Path
    best_val: dict[str, Any] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)


def _tensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
                   ) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _state(net: _DetNet) -> dict[str, torch.Tensor]:
    """Backbone (``model.<key>``) and classifier (``classifier.<key>``) tensors, copied."""
    out = {f"model.{k}": v.detach().clone() for k, v in net.model.state_dict().items()}
    out.update({f"classifier.{k}": v.detach().clone()
                for k, v in net.classifier.state_dict().items()})
    return out


def _load_state(net: _DetNet, tensors: Mapping[str, torch.Tensor]) -> None:
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    clf = {k[11:]: v for k, v in tensors.items() if k.startswith("classifier.")}
    net.model.load_state_dict(model)
    net.classifier.load_state_dict(clf)


def _classifier_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"weight": state["classifier.1.weight"].float(),
            "bias": state["classifier.1.bias"].float()}


@dataclass
class SoftmaxClassifier:
    """The fine-tuned (K + 1)-way layer as a detector's scorer (R-CNN's softmax alternative to
    the SVMs).

    Attributes:
        weight (NDArray[K+1, D] float32), bias (NDArray[K+1] float32): row 0 = background.
        classes: the K class names (row k + 1 is ``classes[k]``).
        features: the extraction settings the layer was trained on (backbone, tap, mode,
            padding, weights = the fine-tuned backbone file); pass as
            ``FeatureExtractor(**clf.features)``.
    """

    weight: NDArray[np.float32]
    bias: NDArray[np.float32]
    classes: list[str]
    features: dict[str, Any]

    def probabilities(self, features: ArrayLike) -> NDArray[np.float32]:
        """Softmax over (background, classes): features (N, D) -> (N, K + 1) float32."""
        x = np.asarray(features, np.float32)
        if x.ndim != 2 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"features must have shape (N, {self.weight.shape[1]}), "
                             f"got {x.shape}")
        z = x @ self.weight.T + self.bias
        z -= z.max(1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(1, keepdims=True)).astype(np.float32)

    def scores(self, features: ArrayLike) -> NDArray[np.float32]:
        """Class probabilities without background: (N, D) -> (N, K) float32."""
        return self.probabilities(features)[:, 1:]


def load_classifier(out_dir: str | Path) -> SoftmaxClassifier:
    """The softmax scorer of a :func:`finetune` output folder.

    Raises:
        FileNotFoundError: ``out_dir`` has no ``classifier.safetensors`` / ``finetune.json``.
    """
    out = Path(out_dir)
    path, recipe_path = out / "classifier.safetensors", out / "finetune.json"
    for p in (path, recipe_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found (is {out} a finetune output folder?)")
    t = _load_tensors(path)
    recipe = json.loads(recipe_path.read_text())
    s = recipe["settings"]
    feats = {"backbone": s["backbone"], "tap": s["tap"], "mode": s["mode"],
             "padding": s["padding"], "weights": str(out / "backbone.safetensors")}
    if s["mode"] == "shared":
        feats["shared_scale"] = tuple(s["shared_scale"])
    return SoftmaxClassifier(t["weight"].numpy(), t["bias"].numpy(), list(recipe["classes"]),
                             feats)


def _dataset_fingerprint(records: Sequence[ImageRecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(r.file_name.encode())
        h.update(np.ascontiguousarray(r.boxes, np.float32).tobytes())
        h.update(np.ascontiguousarray(r.labels, np.int64).tobytes())
    return h.hexdigest()[:16]


class _Checkpoints:
    """``ckpt_dir/state.json`` + ``state_<iteration>.safetensors`` (+ ``best_<it>``): the JSON
    is written after the tensors it names, so a kill at any point leaves a consistent pair."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = folder, key

    def load(self) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor] | None] | None:
        p = self.folder / "state.json"
        if not p.is_file():
            return None
        meta = json.loads(p.read_text())
        if meta.get("key") != self.key:
            raise StaleStoreError(
                f"{self.folder}: holds a checkpoint of other settings (key {meta.get('key')} "
                f"!= {self.key}); choose another output folder or pass overwrite=True "
                "(--overwrite) to start again")
        state = _load_tensors(self.folder / meta["state_file"])
        best = _load_tensors(self.folder / meta["best_file"]) if meta.get("best_file") else None
        return meta, state, best

    def save(self, meta: dict, state: Mapping[str, torch.Tensor],
             best: Mapping[str, torch.Tensor] | None, best_it: int | None) -> None:
        it = meta["iteration"]
        state_file = f"state_{it:07d}.safetensors"
        atomic_write_bytes(self.folder / state_file, _tensors_bytes(state))
        best_file = None
        if best is not None:
            best_file = f"best_{best_it:07d}.safetensors"
            if not (self.folder / best_file).is_file():
                atomic_write_bytes(self.folder / best_file, _tensors_bytes(best))
        atomic_write_json(self.folder / "state.json",
                          {**meta, "key": self.key, "state_file": state_file,
                           "best_file": best_file})
        for p in self.folder.glob("*.safetensors"):  # older states
            if p.name not in (state_file, best_file):
                p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
def _check_args(dataset: Dataset, mode: str, iterations: int, batch_size: int,
                fg_per_batch: int, images_per_batch: int, fg_iou: float, lr: float,
                val_fraction: float, step_size: int, padding: float, input_size: int) -> None:
    if not isinstance(dataset, Dataset) or not dataset.records:
        raise ValueError("dataset must be a Dataset with at least one image")
    if mode not in ("warp", "shared"):
        raise ValueError(f"mode must be 'warp' or 'shared', got {mode!r}")
    checks = [("iterations", iterations >= 1, iterations),
              ("batch_size", batch_size >= 1, batch_size),
              ("fg_per_batch", 0 <= fg_per_batch <= batch_size, fg_per_batch),
              ("images_per_batch", 1 <= images_per_batch <= batch_size, images_per_batch),
              ("fg_iou", 0 < fg_iou <= 1, fg_iou), ("lr", lr > 0, lr),
              ("val_fraction", 0 <= val_fraction < 1, val_fraction),
              ("step_size", step_size >= 0, step_size),
              ("padding", 0 <= 2 * padding < input_size, padding)]
    for name, ok, value in checks:
        if not ok:
            raise ValueError(f"{name} out of range: {value!r}")


def _split_val(n: int, val_fraction: float, seed: int) -> tuple[NDArray, NDArray]:
    """Seeded (train, val) image indices; at least one of each when validating."""
    order = np.random.default_rng([seed, 1]).permutation(n)
    n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(val_fraction * n)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def finetune(dataset: Dataset, proposals: ProposalSource, out_dir: str | Path,
             backbone: str = "mobilenet_v2", weights: str | Path | None = None,
             tap: str | None = None, mode: str = "warp", device: str = "auto",
             iterations: int = 2000, batch_size: int = BATCH_SIZE,
             fg_per_batch: int = FG_PER_BATCH, images_per_batch: int = IMAGES_PER_BATCH,
             fg_iou: float = FG_IOU, lr: float = BASE_LR,
             new_layer_lr_mult: float = NEW_LAYER_LR_MULT, momentum: float = MOMENTUM,
             weight_decay: float = WEIGHT_DECAY, step_size: int = 0,
             val_fraction: float = 0.1, seed: int = 0, padding: float = CONTEXT_PADDING,
             input_size: int | None = None,
             shared_scale: tuple[int, int] = (SHARED_SHORT, SHARED_MAX),
             max_proposals: int = MAX_PROPOSALS, val_every: int = 0,
             checkpoint_every: int = 0, checkpoint_dir: str | Path | None = None,
             resume: bool = True, overwrite: bool = False, progress: bool = True,
             proposals_id: str | None = None, time_limit: float | None = None
             ) -> FinetuneResult:
    """Fine-tune ``backbone`` on the windows of ``dataset`` (see the module docstring).

    Args:
        dataset: training images with ground truth (a held-out ``val_fraction`` of them
            validates).
        proposals: file_name -> boxes (N, 4) float32 (best first), or a callable
            ImageRecord -> boxes; :func:`proposals_from_dir` reads an ``rcnn propose`` folder.
        out_dir: output folder (created).
        backbone, weights, tap, padding: as :class:`rcnn_cli.features.FeatureExtractor`; the
            new layer sits on ``tap`` (default: the tap extraction uses in ``mode``,
            :func:`rcnn_cli.features.default_tap`: ``grid`` for mobilenet_v2 in shared mode).
        mode: ``"warp"`` (R-CNN crops) or ``"shared"`` (one trunk pass per image + RoI head).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``; on cuda the forward runs in bf16 autocast.
        iterations: SGD iterations (mini-batches).
        batch_size, fg_per_batch: windows per mini-batch and foreground among them.
        images_per_batch: shared mode: images per mini-batch.
        fg_iou: IoU with a ground truth at which a window takes its class.
        lr, new_layer_lr_mult, momentum, weight_decay: SGD (R-CNN values by default).
        step_size: lr x 0.1 every this many iterations; 0 = once, at 2/3 of ``iterations``.
        val_fraction: training images held out for validation (0 = none; the last weights
            are exported).
        seed: seeds the split, the sampling, the flips, dropout and the new layer's init
            (the global RNGs are left untouched).
        input_size: warp crop side (default: the backbone's input size, what extraction uses;
            smaller only for quick tests).
        shared_scale: shared mode (shorter side, longer-side cap), as extraction.
        max_proposals: proposals used per image, best first.
        val_every: iterations between validations (0 = about 10 per run).
        checkpoint_every: iterations between checkpoints (0 = at every validation).
        checkpoint_dir: where checkpoints go (default ``out_dir/checkpoint``).
        resume: continue from the checkpoint of an interrupted run with the same settings
            (and return at once if the run had finished); False starts again.
        overwrite: accept an ``out_dir`` holding a run with other settings (it is replaced).
        progress: a tqdm bar on stderr.
        proposals_id: an id of the proposals, part of the settings key so that other
            proposals do not resume this run (default: ``proposals.key`` if it has one, as
            :func:`proposals_from_dir` sets).
        time_limit: stop after this many seconds of training (validate, export, and mark the
            recipe ``"stopped": "time_limit"``; the lr schedule stays that of
            ``iterations``). A run stopped so counts as finished for ``resume``.

    Returns:
        :class:`FinetuneResult`.

    Raises:
        ValueError: a bad argument, or no foreground window in the training images.
        StaleStoreError: ``out_dir`` holds a run with other settings and not ``overwrite``.
    """
    t_start = time.perf_counter()
    spec = _check_backbone(backbone)
    tap = _check_tap(backbone, default_tap(backbone, mode) if tap is None else tap)
    input_size = spec.input_size if input_size is None else int(input_size)
    _check_args(dataset, mode, iterations, batch_size, fg_per_batch, images_per_batch, fg_iou,
                lr, val_fraction, step_size, padding, input_size)
    dev = resolve_device(device)
    amp = dev.type == "cuda"
    if proposals_id is None:
        proposals_id = getattr(proposals, "key", None)
    out = Path(out_dir)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out / "checkpoint"
    step = step_size or max(1, math.ceil(iterations * 2 / 3))
    val_every = val_every or max(1, iterations // 10)
    checkpoint_every = checkpoint_every or val_every
    settings = {
        "backbone": backbone, "tap": tap, "mode": mode, "weights": weights_id(weights, backbone,
                                                                              seed),
        "padding": float(padding), "input_size": input_size,
        "shared_scale": [int(shared_scale[0]), int(shared_scale[1])],
        "iterations": iterations, "batch_size": batch_size, "fg_per_batch": fg_per_batch,
        "images_per_batch": images_per_batch, "fg_iou": fg_iou, "lr": lr,
        "new_layer_lr_mult": new_layer_lr_mult, "bias_lr_mult": BIAS_LR_MULT,
        "momentum": momentum, "weight_decay": weight_decay, "step_size": step,
        "lr_gamma": LR_GAMMA, "val_fraction": val_fraction, "val_every": val_every,
        "seed": seed, "max_proposals": max_proposals, "frozen_batchnorm": True,
        "head_dropout": HEAD_DROPOUT.get(backbone, 0.0), "proposals_id": proposals_id,
    }
    classes = list(dataset.classes)
    key = settings_key("finetune", {**settings, "classes": classes,
                                    "dataset": _dataset_fingerprint(dataset.records)},
                       format_version=FINETUNE_FORMAT)
    paths = (out / "backbone.safetensors", out / "classifier.safetensors", out / "finetune.json")

    # 0. a finished or foreign run in out_dir
    if paths[2].is_file():
        old = json.loads(paths[2].read_text())
        if old.get("key") != key and not overwrite:
            raise StaleStoreError(
                f"{out}: holds a fine-tuning run with other settings; choose another output "
                "folder or pass overwrite=True (--overwrite) to replace it")
        if old.get("key") == key and resume:
            log.info("finetune: %s already finished (%d iterations)", out,
                     old["iterations_done"])
            return FinetuneResult(*paths, old.get("best_val"), old.get("history", []),
                                  old.get("train_losses", []))
    ckpts = _Checkpoints(ckpt_dir, key)
    if overwrite or not resume:
        for p in ckpt_dir.glob("*"):
            if p.name == "state.json" or p.suffix == ".safetensors":
                p.unlink()

    # 1. label tables, once; the held-out split
    tr_idx, va_idx = _split_val(len(dataset.records), val_fraction, seed)
    windows = build_windows(dataset.records, proposals, fg_iou, max_proposals)
    n_fg = sum(int((windows[i].labels > 0).sum()) for i in tr_idx)
    if n_fg == 0:
        raise ValueError("no foreground window (IoU >= fg_iou with a ground truth) in the "
                         "training images: check the annotations")
    log.info("finetune: %d train / %d val images, %d foreground and %d background training "
             "windows", len(tr_idx), len(va_idx), n_fg,
             sum(int((windows[i].labels == 0).sum()) for i in tr_idx))
    cache = _ImageCache([dataset.image_path(r) for r in dataset.records], dev, spec.mean,
                        spec.std)

    # 2. the network: torchvision model + new (K + 1)-way layer; SGD with Caffe multipliers
    model = load_backbone(backbone, weights, seed)
    context = input_size / (input_size - 2 * padding)
    net = _DetNet(backbone, model, tap, mode, context, len(classes), seed).to(dev)
    if amp:
        net = net.to(memory_format=torch.channels_last)
    groups = _param_groups(net, lr, new_layer_lr_mult, weight_decay)
    opt = torch.optim.SGD([{k: v for k, v in g.items() if k != "names"} for g in groups],
                          lr=lr, momentum=momentum)
    named = {n: p for g in groups for n, p in zip(g["names"], g["params"])}

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def forward_warp(img_idx, boxes, flips) -> torch.Tensor:
        crops = _warp_crops(cache, dev, img_idx, boxes, input_size, padding)
        if flips.any():
            f = torch.from_numpy(np.flatnonzero(flips)).to(dev)
            crops[f] = crops[f].flip(-1)
        if amp:
            crops = crops.contiguous(memory_format=torch.channels_last)
        with autocast():
            return net.classifier(net.net(crops).float()).float()

    def forward_shared(img_list, box_list, flips) -> torch.Tensor:
        feats = []
        for i, b, fl in zip(img_list, box_list, flips):
            t, tb = _shared_input(cache.get(int(i)), bool(fl), b, dev, tuple(shared_scale))
            with autocast():  # one trunk pass per image, then its RoIs through the head
                feats.append(net.head(net.trunk(t), [tb]).float())
        with autocast():
            return net.classifier(torch.cat(feats)).float()

    # pooled windows of the training images, for warp sampling
    pool_img = np.concatenate([np.full(len(windows[i].labels), i, np.int64) for i in tr_idx])
    pool_box = np.concatenate([windows[i].boxes for i in tr_idx])
    pool_lab = np.concatenate([windows[i].labels for i in tr_idx])

    def train_batch(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if mode == "warp":
            pick = sample_rois(pool_lab, batch_size, fg_per_batch, rng)
            flips = rng.random(len(pick)) < 0.5
            return forward_warp(pool_img[pick], pool_box[pick], flips), \
                torch.from_numpy(pool_lab[pick])
        imgs = rng.choice(tr_idx, min(images_per_batch, len(tr_idx)), replace=False)
        per = batch_size // len(imgs)
        fg_per = round(per * fg_per_batch / batch_size)
        picks = [sample_rois(windows[i].labels, per, fg_per, rng) for i in imgs]
        flips = rng.random(len(imgs)) < 0.5
        logits = forward_shared(imgs, [windows[i].boxes[p] for i, p in zip(imgs, picks)], flips)
        return logits, torch.from_numpy(np.concatenate(
            [windows[i].labels[p] for i, p in zip(imgs, picks)]))

    # fixed validation windows
    vrng = np.random.default_rng([seed, 2])
    val = [(i, sample_rois(windows[i].labels, VAL_ROIS_PER_IMAGE, VAL_FG_PER_IMAGE, vrng))
           for i in va_idx]
    val = [(i, p) for i, p in val if len(p)]

    @torch.no_grad()
    def validate() -> dict[str, float]:
        net.eval()
        logits, labels = [], []
        if mode == "warp":
            img = np.concatenate([np.full(len(p), i, np.int64) for i, p in val])
            bx = np.concatenate([windows[i].boxes[p] for i, p in val])
            for s in range(0, len(img), batch_size):
                sl = slice(s, s + batch_size)
                logits.append(forward_warp(img[sl], bx[sl], np.zeros(len(img[sl]), bool)))
        else:
            for i, p in val:
                logits.append(forward_shared([i], [windows[i].boxes[p]], [False]))
        labels = torch.from_numpy(np.concatenate([windows[i].labels[p] for i, p in val]))
        z = torch.cat(logits).cpu()
        net.train()
        pred = z.argmax(1)
        fg, bg = labels > 0, labels == 0
        return {"val_loss": float(nn.functional.cross_entropy(z, labels)),
                "val_acc": float((pred == labels).float().mean()),
                # None (null in JSON) when the held-out windows have no such label
                "val_acc_fg": float((pred[fg] == labels[fg]).float().mean()) if fg.any()
                else None,
                "val_acc_bg": float((pred[bg] == labels[bg]).float().mean()) if bg.any()
                else None}

    # 3. resume
    start, losses, history = 0, [], []
    best_state, best_val, best_it, wall = None, None, None, 0.0
    loaded = ckpts.load() if resume else None
    if loaded is not None:
        meta, state, best_state = loaded
        _load_state(net, state)
        for n, p in named.items():
            if f"momentum.{n}" in state:
                opt.state[p]["momentum_buffer"] = state[f"momentum.{n}"].to(dev)
        start, losses, history = meta["iteration"], meta["train_losses"], meta["history"]
        best_val, best_it, wall = meta["best_val"], meta["best_iteration"], meta["wall_seconds"]
        log.info("finetune: resumed from iteration %d (%s)", start, ckpt_dir)

    def checkpoint(it: int) -> None:
        state = _state(net)
        state.update({f"momentum.{n}": opt.state[p]["momentum_buffer"]
                      for n, p in named.items() if "momentum_buffer" in opt.state.get(p, {})})
        ckpts.save({"iteration": it, "train_losses": losses, "history": history,
                    "best_val": best_val, "best_iteration": best_it,
                    "wall_seconds": wall + time.perf_counter() - t_run,
                    "rng": f"numpy default_rng([{seed}, i]) and torch seed {seed} * 1000003 + i "
                           "at iteration i"}, state, best_state, best_it)

    # 4. train
    net.train()
    cuda_devs = [dev.index if dev.index is not None else torch.cuda.current_device()] \
        if dev.type == "cuda" else []
    stopped = None
    t_run = time.perf_counter()
    bar = tqdm(total=iterations, initial=start, desc="finetune", unit="it", file=sys.stderr,
               disable=not progress or not sys.stderr.isatty(), dynamic_ncols=True)
    for it in range(start, iterations):
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"] * _lr_factor(it, step)
        rng = np.random.default_rng([seed, it])
        with torch.random.fork_rng(devices=cuda_devs):
            torch.manual_seed(seed * 1000003 + it)  # dropout
            loss = _sgd_step(train_batch, rng, opt, dev)
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr * _lr_factor(it, step):.1e}")
        done = it + 1
        if time_limit is not None and time.perf_counter() - t_run > time_limit:
            stopped = "time_limit"
        if val and (done % val_every == 0 or done == iterations or stopped):
            v = validate()
            since = losses[-(done - (history[-1]["iteration"] if history else 0)):]
            rec = {"iteration": done, "lr": lr * _lr_factor(it, step),
                   "train_loss": float(np.mean(since)), **v,
                   "seconds": wall + time.perf_counter() - t_run}
            history.append(rec)
            log.info("finetune: it %d train loss %.4f val loss %.4f acc fg %s bg %s", done,
                     rec["train_loss"], v["val_loss"], _fmt(v["val_acc_fg"]),
                     _fmt(v["val_acc_bg"]))
            if best_val is None or v["val_loss"] < best_val["val_loss"]:
                best_val, best_it, best_state = rec, done, _state(net)
        if stopped:
            log.warning("finetune: time limit of %.0f s reached after %d of %d iterations",
                        time_limit, done, iterations)
            break
        if done % checkpoint_every == 0 and done < iterations:
            checkpoint(done)
    bar.close()
    wall += time.perf_counter() - t_run

    # 5. export the best (or, without validation, the last) weights, then the recipe
    final = best_state if best_state is not None else _state(net)
    backbone_state = {k[6:]: v for k, v in final.items() if k.startswith("model.")}
    meta = {"backbone": backbone, "tap": tap, "classes": json.dumps(classes)}
    atomic_write_bytes(paths[0], _tensors_bytes(backbone_state, {"backbone": backbone}))
    atomic_write_bytes(paths[1], _tensors_bytes(_classifier_tensors(final), meta))
    done_its = len(losses)
    recipe = {
        "key": key, "format_version": FINETUNE_FORMAT, "settings": settings,
        "classes": classes, "num_outputs": len(classes) + 1, "background_index": 0,
        "source_weights": settings["weights"], "device": str(dev),
        "dtype": "bfloat16" if amp else "float32",
        "iterations_done": done_its, "stopped": stopped,
        "exported_iteration": best_it or done_its,
        "best_val": best_val, "history": history, "train_losses": losses,
        "train_images": len(tr_idx), "val_images": len(va_idx),
        "train_windows_fg": n_fg,
        "train_windows_bg": int(sum((windows[i].labels == 0).sum() for i in tr_idx)),
        "wall_seconds": wall, "seconds_per_iteration": wall / max(1, done_its),
        "total_seconds": time.perf_counter() - t_start,
        "files": {"backbone": paths[0].name, "classifier": paths[1].name},
    }
    atomic_write_json(paths[2], recipe)
    for p in list(ckpt_dir.glob("*.safetensors")) + [ckpt_dir / "state.json"]:
        p.unlink(missing_ok=True)  # finished: finetune.json now marks the run as done
    if ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):
        ckpt_dir.rmdir()
    return FinetuneResult(*paths, best_val, history, losses)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _sgd_step(train_batch: Callable[[np.random.Generator], tuple[torch.Tensor, torch.Tensor]],
              rng: np.random.Generator, opt: torch.optim.Optimizer, dev: torch.device) -> float:
    """One SGD iteration: a mini-batch, the softmax loss, backward, step; returns the loss."""
    logits, labels = train_batch(rng)
    loss = nn.functional.cross_entropy(logits, labels.to(dev))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())
