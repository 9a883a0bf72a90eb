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

The code follows the run: :class:`FinetuneSettings` (defaults from ``default.toml``; the CLI
builds them with :meth:`FinetuneSettings.from_config`) are checked and resolved once
(``_plan``), the label tables and image cache are built (``_TrainingData``), ``_Trainer``
samples mini-batches, runs the SGD loop, validates and checkpoints, and :func:`export`
writes the outputs. Window labels live in :mod:`rcnn_cli.labels`; shared-mode inputs are
prepared by :func:`rcnn_cli.features.shared_input`, as extraction prepares them.
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
from rcnn_cli.config import default
from rcnn_cli.datasets import Dataset, ImageRecord
from rcnn_cli.features import (
    BACKBONES,
    SHARED_MAX,
    SHARED_SHORT,
    _check_backbone,
    _check_tap,
    default_tap,
    load_backbone,
    normalize_image,
    resolve_device,
    shared_input,
    shared_parts,
    tap_network,
    varying_shapes,
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
# Mini-batch (R-CNN window_data_layer: 128 windows, 32 foreground; Fast R-CNN: 2 images)
# and SGD settings (R-CNN pascal_finetune_solver.prototxt: base_lr 0.001, momentum 0.9,
# weight_decay 0.0005; the new fc8 layer at 10x lr) are :class:`FinetuneSettings`, whose
# defaults rcnn_cli/default.toml holds.
#: R-CNN pascal_finetune_solver.prototxt: gamma of the step policy.
LR_GAMMA = 0.1
#: R-CNN's biases learn at 2x lr (blobs_lr 1, 2), with no weight decay.
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
MAX_PROPOSALS: int = default("extract.max_proposals")
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


def proposals_from_dir(folder: str | Path,
                       image_path: Callable[[ImageRecord], Path] | None = None
                       ) -> Callable[[ImageRecord], NDArray[np.float32]]:
    """Proposals read from an ``rcnn propose`` output folder. A record's ``file_name`` finds
    the image whose identity (relative path with extension) it is, else the one image whose
    relative path or name matches it (:func:`rcnn_cli.evaluate.match_image_names`: the
    propose run may have been given the dataset root or its ``images/`` folder). The
    callable's ``key`` attribute is the folder's settings key (:func:`finetune` uses it as
    ``proposals_id``).

    With ``image_path`` (e.g. ``Dataset.image_path``) each record's proposals must have been
    computed from the image as it is now (size and mtime, the check `rcnn extract` makes);
    a changed image raises ValueError naming it (rerun `rcnn propose`).
    """
    from rcnn_cli.formats import match_image_names
    from rcnn_cli.store import file_identity, open_upstream

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
        if image_path is not None:  # the image changed since propose: its boxes are stale
            try:
                source = file_identity(image_path(rec))
            except OSError:
                source = None  # a missing image is reported where it is read
            if source is not None and store.record_id(name, source=source) is None:
                raise ValueError(f"{folder}: the proposals of {rec.file_name!r} were computed "
                                 "from an earlier version of the image (size or time "
                                 "changed): rerun `rcnn propose` on it")
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

    def clear(self) -> None:
        """Remove the checkpoint files (and the folder, when that leaves it empty)."""
        for p in list(self.folder.glob("*.safetensors")) + [self.folder / "state.json"]:
            p.unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


# --------------------------------------------------------------------------------------------
# The settings
# --------------------------------------------------------------------------------------------
_SETTINGS_FROM_FINETUNE = ("iterations", "batch_size", "fg_per_batch", "images_per_batch",
                           "fg_iou", "lr", "new_layer_lr_mult", "momentum", "weight_decay",
                           "step_size", "val_fraction", "seed")


@dataclass(frozen=True)
class FinetuneSettings:
    """What a fine-tuning run learns with (with the data and proposals: its settings key).

    Defaults are those of ``rcnn_cli/default.toml`` ([extract] backbone, weights, tap, mode,
    padding, max_proposals and the [finetune] section), read from it;
    :meth:`from_config` builds the settings from a resolved config, as the CLI does.

    Attributes:
        backbone, weights, tap, padding: as :class:`rcnn_cli.features.FeatureExtractor`;
            ``weights`` ``""``/None = ImageNet; ``tap`` ``""``/None = the tap extraction
            uses in ``mode`` (:func:`rcnn_cli.features.default_tap`: ``grid`` for
            mobilenet_v2 in shared mode); the new layer sits on it.
        mode: ``"warp"`` (R-CNN crops), ``"shared"`` (one trunk pass per image + RoI head)
            or ``"auto"`` (warp on cuda, shared on a CPU).
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
        input_size: warp crop side (None: the backbone's input size, what extraction uses;
            smaller only for quick tests).
        shared_scale: shared mode (shorter side, longer-side cap), as extraction.
        max_proposals: proposals used per image, best first.
        val_every: iterations between validations (0 = about 10 per run).
        checkpoint_every: iterations between checkpoints (0 = at every validation).
    """

    backbone: str = default("extract.backbone")
    weights: str | Path | None = default("extract.weights")  # noqa: RUF009 (a str)
    tap: str | None = default("extract.tap")
    mode: str = default("extract.mode")
    iterations: int = default("finetune.iterations")
    batch_size: int = default("finetune.batch_size")
    fg_per_batch: int = default("finetune.fg_per_batch")
    images_per_batch: int = default("finetune.images_per_batch")
    fg_iou: float = default("finetune.fg_iou")
    lr: float = default("finetune.lr")
    new_layer_lr_mult: float = default("finetune.new_layer_lr_mult")
    momentum: float = default("finetune.momentum")
    weight_decay: float = default("finetune.weight_decay")
    step_size: int = default("finetune.step_size")
    val_fraction: float = default("finetune.val_fraction")
    seed: int = default("finetune.seed")
    padding: float = default("extract.padding")
    input_size: int | None = None
    shared_scale: tuple[int, int] = (SHARED_SHORT, SHARED_MAX)
    max_proposals: int = default("extract.max_proposals")
    val_every: int = 0
    checkpoint_every: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Mapping[str, Any]]) -> FinetuneSettings:
        """The settings of a resolved config (:func:`rcnn_cli.config.load`): its [extract]
        backbone, weights, tap, mode, padding, max_proposals and its [finetune] section."""
        e, f = cfg["extract"], cfg["finetune"]
        return cls(backbone=e["backbone"], weights=e["weights"], tap=e["tap"], mode=e["mode"],
                   padding=e["padding"], max_proposals=e["max_proposals"],
                   shared_scale=tuple(e.get("shared_scale", (SHARED_SHORT, SHARED_MAX))),
                   **{k: f[k] for k in _SETTINGS_FROM_FINETUNE})


@dataclass
class _Plan:
    """A run's settings resolved and checked: what ``auto`` / 0 / None became, the settings
    recorded in ``finetune.json`` and the key that identifies the run."""

    s: FinetuneSettings
    device: torch.device
    mode: str
    tap: str
    input_size: int
    step: int
    val_every: int
    checkpoint_every: int
    classes: list[str]
    record: dict[str, Any]
    key: str

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda"


def _check_args(dataset: Dataset, mode: str, iterations: int, batch_size: int,
                fg_per_batch: int, images_per_batch: int, fg_iou: float, lr: float,
                val_fraction: float, step_size: int, padding: float, input_size: int) -> None:
    if not isinstance(dataset, Dataset) or not dataset.records:
        raise ValueError("dataset must be a Dataset with at least one image")
    if mode not in ("warp", "shared"):
        raise ValueError(f"mode must be 'auto', 'warp' or 'shared', got {mode!r}")
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


def _plan(s: FinetuneSettings, dataset: Dataset, device: str,
          proposals_id: str | None) -> _Plan:
    """Check ``s`` and resolve it on ``device`` (ValueError naming a bad setting)."""
    spec = _check_backbone(s.backbone)
    dev = resolve_device(device)
    mode = s.mode
    if mode == "auto":
        mode = "warp" if dev.type == "cuda" else "shared"
        log.info("finetune: mode auto -> %s", mode)
    tap = _check_tap(s.backbone, s.tap or (default_tap(s.backbone, mode)
                                          if mode in ("warp", "shared") else None))
    input_size = spec.input_size if s.input_size is None else int(s.input_size)
    _check_args(dataset, mode, s.iterations, s.batch_size, s.fg_per_batch,
                s.images_per_batch, s.fg_iou, s.lr, s.val_fraction, s.step_size, s.padding,
                input_size)
    step = s.step_size or max(1, math.ceil(s.iterations * 2 / 3))
    val_every = s.val_every or max(1, s.iterations // 10)
    record = {
        "backbone": s.backbone, "tap": tap, "mode": mode,
        "weights": weights_id(s.weights or None, s.backbone, s.seed),
        "padding": float(s.padding), "input_size": input_size,
        "shared_scale": [int(s.shared_scale[0]), int(s.shared_scale[1])],
        "iterations": s.iterations, "batch_size": s.batch_size,
        "fg_per_batch": s.fg_per_batch, "images_per_batch": s.images_per_batch,
        "fg_iou": s.fg_iou, "lr": s.lr, "new_layer_lr_mult": s.new_layer_lr_mult,
        "bias_lr_mult": BIAS_LR_MULT, "momentum": s.momentum,
        "weight_decay": s.weight_decay, "step_size": step, "lr_gamma": LR_GAMMA,
        "val_fraction": s.val_fraction, "val_every": val_every, "seed": s.seed,
        "max_proposals": s.max_proposals, "frozen_batchnorm": True,
        "head_dropout": HEAD_DROPOUT.get(s.backbone, 0.0), "proposals_id": proposals_id,
    }
    classes = list(dataset.classes)
    key = settings_key("finetune", {**record, "classes": classes,
                                    "dataset": _dataset_fingerprint(dataset.records)},
                       format_version=FINETUNE_FORMAT)
    return _Plan(s, dev, mode, tap, input_size, step, val_every,
                 s.checkpoint_every or val_every, classes, record, key)


# --------------------------------------------------------------------------------------------
# The trainer: data, SGD loop, validation
# --------------------------------------------------------------------------------------------
def _split_val(n: int, val_fraction: float, seed: int) -> tuple[NDArray, NDArray]:
    """Seeded (train, val) image indices; at least one of each when validating."""
    order = np.random.default_rng([seed, 1]).permutation(n)
    n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(val_fraction * n)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@dataclass
class _TrainingData:
    """The label tables (once, before training), the held-out split, the pooled training
    windows (warp sampling), the fixed validation windows and the image cache."""

    windows: list[_Windows]
    train: NDArray[np.int64]
    val_images: NDArray[np.int64]
    val: list[tuple[int, NDArray[np.int64]]]
    pool_img: NDArray[np.int64]
    pool_box: NDArray[np.float32]
    pool_lab: NDArray[np.int64]
    cache: _ImageCache

    @classmethod
    def build(cls, dataset: Dataset, proposals: ProposalSource, plan: _Plan) -> _TrainingData:
        """Label every image's windows, split, pool; ValueError without a foreground window."""
        s = plan.s
        tr_idx, va_idx = _split_val(len(dataset.records), s.val_fraction, s.seed)
        windows = build_windows(dataset.records, proposals, s.fg_iou, s.max_proposals)
        n_fg = sum(int((windows[i].labels > 0).sum()) for i in tr_idx)
        if n_fg == 0:
            raise ValueError("no foreground window (IoU >= fg_iou with a ground truth) in the "
                             "training images: check the annotations")
        log.info("finetune: %d train / %d val images, %d foreground and %d background "
                 "training windows", len(tr_idx), len(va_idx), n_fg,
                 sum(int((windows[i].labels == 0).sum()) for i in tr_idx))
        spec = BACKBONES[s.backbone]
        cache = _ImageCache([dataset.image_path(r) for r in dataset.records], plan.device,
                            spec.mean, spec.std)
        vrng = np.random.default_rng([s.seed, 2])
        val = [(i, sample_rois(windows[i].labels, VAL_ROIS_PER_IMAGE, VAL_FG_PER_IMAGE, vrng))
               for i in va_idx]
        return cls(windows, tr_idx, va_idx, [(i, p) for i, p in val if len(p)],
                   np.concatenate([np.full(len(windows[i].labels), i, np.int64)
                                   for i in tr_idx]),
                   np.concatenate([windows[i].boxes for i in tr_idx]),
                   np.concatenate([windows[i].labels for i in tr_idx]), cache)

    def count(self, fg: bool) -> int:
        """Foreground (or background) windows of the training images."""
        return int(((self.pool_lab > 0) if fg else (self.pool_lab == 0)).sum())


class _Trainer:
    """The network being trained, its optimiser and the state of the run (losses,
    validation history, best weights, wall time), which checkpoints save and restore."""

    def __init__(self, plan: _Plan, data: _TrainingData) -> None:
        s, dev = plan.s, plan.device
        self.plan, self.data, self.dev = plan, data, dev
        # the torchvision model + the new (K + 1)-way layer; SGD with Caffe multipliers
        model = load_backbone(s.backbone, s.weights or None, s.seed)
        context = plan.input_size / (plan.input_size - 2 * s.padding)
        net = _DetNet(s.backbone, model, plan.tap, plan.mode, context, len(plan.classes),
                      s.seed).to(dev)
        if plan.amp:
            net = net.to(memory_format=torch.channels_last)
        groups = _param_groups(net, s.lr, s.new_layer_lr_mult, s.weight_decay)
        self.net = net
        self.opt = torch.optim.SGD([{k: v for k, v in g.items() if k != "names"}
                                    for g in groups], lr=s.lr, momentum=s.momentum)
        self.named = {n: p for g in groups for n, p in zip(g["names"], g["params"])}
        self.start, self.losses, self.history = 0, [], []
        self.best_state, self.best_val, self.best_it = None, None, None
        self.wall, self.stopped, self._t_run = 0.0, None, time.perf_counter()

    # ---------------------------------------------------------------- forward passes
    def _autocast(self) -> contextlib.AbstractContextManager:
        return (torch.autocast("cuda", dtype=torch.bfloat16) if self.plan.amp
                else contextlib.nullcontext())

    def forward_warp(self, img_idx: NDArray[np.int64], boxes: NDArray[np.float32],
                     flips: NDArray[np.bool_]) -> torch.Tensor:
        """Logits (B, K + 1) of warped windows of images ``img_idx``, some mirrored."""
        p = self.plan
        crops = _warp_crops(self.data.cache, self.dev, img_idx, boxes, p.input_size,
                            p.s.padding)
        if flips.any():
            f = torch.from_numpy(np.flatnonzero(flips)).to(self.dev)
            crops[f] = crops[f].flip(-1)
        if p.amp:
            crops = crops.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return self.net.classifier(self.net.net(crops).float()).float()

    def forward_shared(self, img_list: Sequence[int], box_list: Sequence[NDArray[np.float32]],
                       flips: Sequence[bool]) -> torch.Tensor:
        """Logits of the RoIs ``box_list[j]`` of images ``img_list[j]``: one trunk pass per
        image, prepared as shared extraction prepares it (:func:`shared_input`)."""
        feats = []
        for i, b, fl in zip(img_list, box_list, flips):
            img = self.data.cache.get(int(i))
            chw = torch.from_numpy(img).permute(2, 0, 1) if isinstance(img, np.ndarray) else img
            t, tb, _ = shared_input(chw, b, tuple(self.plan.s.shared_scale), bool(fl))
            tb = torch.from_numpy(tb).to(self.dev)
            with self._autocast():  # one trunk pass per image, then its RoIs through the head
                feats.append(self.net.head(self.net.trunk(t), [tb]).float())
        with self._autocast():
            return self.net.classifier(torch.cat(feats)).float()

    # ---------------------------------------------------------------- data sampling
    def train_batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One mini-batch's (logits, labels): windows sampled uniformly over all training
        images (warp), or ``images_per_batch`` images and their RoIs (shared)."""
        s, d = self.plan.s, self.data
        if self.plan.mode == "warp":
            pick = sample_rois(d.pool_lab, s.batch_size, s.fg_per_batch, rng)
            flips = rng.random(len(pick)) < 0.5
            return (self.forward_warp(d.pool_img[pick], d.pool_box[pick], flips),
                    torch.from_numpy(d.pool_lab[pick]))
        imgs = rng.choice(d.train, min(s.images_per_batch, len(d.train)), replace=False)
        per = s.batch_size // len(imgs)
        fg_per = round(per * s.fg_per_batch / s.batch_size)
        picks = [sample_rois(d.windows[i].labels, per, fg_per, rng) for i in imgs]
        flips = rng.random(len(imgs)) < 0.5
        logits = self.forward_shared(imgs, [d.windows[i].boxes[p] for i, p in zip(imgs, picks)],
                                     flips)
        return logits, torch.from_numpy(np.concatenate(
            [d.windows[i].labels[p] for i, p in zip(imgs, picks)]))

    # ---------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict[str, float | None]:
        """Loss and accuracies (all, foreground, background) on the fixed held-out windows."""
        d, net = self.data, self.net
        net.eval()
        logits = []
        if self.plan.mode == "warp":
            img = np.concatenate([np.full(len(p), i, np.int64) for i, p in d.val])
            bx = np.concatenate([d.windows[i].boxes[p] for i, p in d.val])
            bs = self.plan.s.batch_size
            for s in range(0, len(img), bs):
                sl = slice(s, s + bs)
                logits.append(self.forward_warp(img[sl], bx[sl], np.zeros(len(img[sl]), bool)))
        else:
            with varying_shapes(self.dev, self.plan.s.backbone):  # images of every size
                for i, p in d.val:
                    logits.append(self.forward_shared([i], [d.windows[i].boxes[p]], [False]))
        labels = torch.from_numpy(np.concatenate([d.windows[i].labels[p] for i, p in d.val]))
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

    def _record_validation(self, it: int, done: int) -> None:
        v = self.validate()
        lr = self.plan.s.lr * _lr_factor(it, self.plan.step)
        since = self.losses[-(done - (self.history[-1]["iteration"] if self.history else 0)):]
        rec = {"iteration": done, "lr": lr, "train_loss": float(np.mean(since)), **v,
               "seconds": self.wall + time.perf_counter() - self._t_run}
        self.history.append(rec)
        log.info("finetune: it %d train loss %.4f val loss %.4f acc fg %s bg %s", done,
                 rec["train_loss"], v["val_loss"], _fmt(v["val_acc_fg"]),
                 _fmt(v["val_acc_bg"]))
        if self.best_val is None or v["val_loss"] < self.best_val["val_loss"]:
            self.best_val, self.best_it, self.best_state = rec, done, _state(self.net)

    # ---------------------------------------------------------------- checkpoints
    def resume(self, ckpts: _Checkpoints) -> None:
        """Continue from the checkpoint in ``ckpts``, if there is one."""
        loaded = ckpts.load()
        if loaded is None:
            return
        meta, state, self.best_state = loaded
        _load_state(self.net, state)
        for n, p in self.named.items():
            if f"momentum.{n}" in state:
                self.opt.state[p]["momentum_buffer"] = state[f"momentum.{n}"].to(self.dev)
        self.start, self.losses, self.history = (meta["iteration"], meta["train_losses"],
                                                 meta["history"])
        self.best_val, self.best_it = meta["best_val"], meta["best_iteration"]
        self.wall = meta["wall_seconds"]
        log.info("finetune: resumed from iteration %d (%s)", self.start, ckpts.folder)

    def checkpoint(self, ckpts: _Checkpoints, it: int) -> None:
        state = _state(self.net)
        state.update({f"momentum.{n}": self.opt.state[p]["momentum_buffer"]
                      for n, p in self.named.items()
                      if "momentum_buffer" in self.opt.state.get(p, {})})
        seed = self.plan.s.seed
        ckpts.save({"iteration": it, "train_losses": self.losses, "history": self.history,
                    "best_val": self.best_val, "best_iteration": self.best_it,
                    "wall_seconds": self.wall + time.perf_counter() - self._t_run,
                    "rng": f"numpy default_rng([{seed}, i]) and torch seed {seed} * 1000003 "
                           "+ i at iteration i"}, state, self.best_state, self.best_it)

    # ---------------------------------------------------------------- the SGD loop
    def train(self, ckpts: _Checkpoints, progress: bool, time_limit: float | None) -> None:
        """SGD from ``self.start`` to the last iteration (or ``time_limit`` seconds):
        validation every ``val_every``, a checkpoint every ``checkpoint_every`` iterations."""
        p, s = self.plan, self.plan.s
        self.net.train()
        cuda_devs = [self.dev.index if self.dev.index is not None
                     else torch.cuda.current_device()] if self.dev.type == "cuda" else []
        self._t_run = time.perf_counter()
        bar = tqdm(total=s.iterations, initial=self.start, desc="finetune", unit="it",
                   file=sys.stderr, disable=not progress or not sys.stderr.isatty(),
                   dynamic_ncols=True)
        for it in range(self.start, s.iterations):
            for g in self.opt.param_groups:
                g["lr"] = s.lr * g["lr_mult"] * _lr_factor(it, p.step)
            rng = np.random.default_rng([s.seed, it])
            with torch.random.fork_rng(devices=cuda_devs):
                torch.manual_seed(s.seed * 1000003 + it)  # dropout
                with (varying_shapes(self.dev, s.backbone) if p.mode == "shared"
                      else contextlib.nullcontext()):  # images of every size: no cuDNN
                    loss = _sgd_step(self.train_batch, rng, self.opt, self.dev)
            self.losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{s.lr * _lr_factor(it, p.step):.1e}")
            done = it + 1
            if time_limit is not None and time.perf_counter() - self._t_run > time_limit:
                self.stopped = "time_limit"
            if self.data.val and (done % p.val_every == 0 or done == s.iterations
                                  or self.stopped):
                self._record_validation(it, done)
            if self.stopped:
                log.warning("finetune: time limit of %.0f s reached after %d of %d iterations",
                            time_limit, done, s.iterations)
                break
            if done % p.checkpoint_every == 0 and done < s.iterations:
                self.checkpoint(ckpts, done)
        bar.close()
        self.wall += time.perf_counter() - self._t_run


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------
def _output_paths(out: Path) -> tuple[Path, Path, Path]:
    return out / "backbone.safetensors", out / "classifier.safetensors", out / "finetune.json"


def _finished_run(out: Path, key: str, resume: bool, overwrite: bool) -> FinetuneResult | None:
    """The result of the run ``out`` holds when it is this run and finished (and ``resume``);
    StaleStoreError when it holds another run and not ``overwrite``."""
    paths = _output_paths(out)
    if not paths[2].is_file():
        return None
    old = json.loads(paths[2].read_text())
    if old.get("key") != key and not overwrite:
        raise StaleStoreError(
            f"{out}: holds a fine-tuning run with other settings; choose another output "
            "folder or pass overwrite=True (--overwrite) to replace it")
    if old.get("key") == key and resume:
        log.info("finetune: %s already finished (%d iterations)", out, old["iterations_done"])
        return FinetuneResult(*paths, old.get("best_val"), old.get("history", []),
                              old.get("train_losses", []))
    return None


def export(out: Path, trainer: _Trainer, ckpts: _Checkpoints, t_start: float
           ) -> FinetuneResult:
    """Write the best (or, without validation, the last) weights: ``backbone.safetensors``
    and ``classifier.safetensors``, then ``finetune.json`` (the recipe), each atomically and
    the recipe last, so its presence means the run finished; then drop the checkpoints."""
    plan, t, d = trainer.plan, trainer, trainer.data
    paths = _output_paths(out)
    final = t.best_state if t.best_state is not None else _state(t.net)
    backbone_state = {k[6:]: v for k, v in final.items() if k.startswith("model.")}
    meta = {"backbone": plan.s.backbone, "tap": plan.tap, "classes": json.dumps(plan.classes)}
    atomic_write_bytes(paths[0], _tensors_bytes(backbone_state, {"backbone": plan.s.backbone}))
    atomic_write_bytes(paths[1], _tensors_bytes(_classifier_tensors(final), meta))
    done_its = len(t.losses)
    recipe = {
        "key": plan.key, "format_version": FINETUNE_FORMAT, "settings": plan.record,
        "classes": plan.classes, "num_outputs": len(plan.classes) + 1,
        "background_index": 0, "source_weights": plan.record["weights"],
        "device": str(plan.device), "dtype": "bfloat16" if plan.amp else "float32",
        "iterations_done": done_its, "stopped": t.stopped,
        "exported_iteration": t.best_it or done_its,
        "best_val": t.best_val, "history": t.history, "train_losses": t.losses,
        "train_images": len(d.train), "val_images": len(d.val_images),
        "train_windows_fg": d.count(fg=True), "train_windows_bg": d.count(fg=False),
        "wall_seconds": t.wall, "seconds_per_iteration": t.wall / max(1, done_its),
        "total_seconds": time.perf_counter() - t_start,
        "files": {"backbone": paths[0].name, "classifier": paths[1].name},
    }
    atomic_write_json(paths[2], recipe)
    ckpts.clear()  # finished: finetune.json now marks the run as done
    return FinetuneResult(*paths, t.best_val, t.history, t.losses)


def finetune(dataset: Dataset, proposals: ProposalSource, out_dir: str | Path,
             settings: FinetuneSettings | None = None, *, device: str = default("common.device"),
             checkpoint_dir: str | Path | None = None, resume: bool = True,
             overwrite: bool = False, progress: bool = True, proposals_id: str | None = None,
             time_limit: float | None = None) -> FinetuneResult:
    """Fine-tune a backbone on the windows of ``dataset`` (see the module docstring).

    Args:
        dataset: training images with ground truth (a held-out ``val_fraction`` of them
            validates).
        proposals: file_name -> boxes (N, 4) float32 (best first), or a callable
            ImageRecord -> boxes; :func:`proposals_from_dir` reads an ``rcnn propose`` folder.
        out_dir: output folder (created).
        settings: :class:`FinetuneSettings` (None: the defaults).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``; on cuda the forward runs in bf16 autocast.
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
        ValueError: a bad setting, or no foreground window in the training images.
        StaleStoreError: ``out_dir`` holds a run with other settings and not ``overwrite``.
    """
    t_start = time.perf_counter()
    if proposals_id is None:
        proposals_id = getattr(proposals, "key", None)
    plan = _plan(settings if settings is not None else FinetuneSettings(), dataset, device,
                 proposals_id)
    out = Path(out_dir)
    done = _finished_run(out, plan.key, resume, overwrite)
    if done is not None:
        return done
    ckpts = _Checkpoints(Path(checkpoint_dir) if checkpoint_dir is not None
                         else out / "checkpoint", plan.key)
    if overwrite or not resume:
        ckpts.clear()
    trainer = _Trainer(plan, _TrainingData.build(dataset, proposals, plan))
    if resume:
        trainer.resume(ckpts)
    trainer.train(ckpts, progress, time_limit)
    return export(out, trainer, ckpts, t_start)


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
