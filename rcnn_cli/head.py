"""R-CNN's fc6 / fc7 for conv-map features: a small MLP fine-tuned on cached region features.

R-CNN's SVMs read ``fc7``: two fully connected layers that fine-tuning adapts to detection
(R-CNN, Table 2: fine-tuning helps fc6/fc7 far more than pool5, and pool5 alone is
weaker). A conv backbone such as mobilenet_v2 has no such layers: its shared-mode ``grid``
features are a pool5 analogue. This module adds them: ``fc6`` (D -> H), ReLU, ``fc7`` (H -> H),
ReLU, with dropout, and a (K + 1)-way softmax layer on top, trained with R-CNN's fine-tuning
recipe on the features ``rcnn extract`` cached (so on a CPU it costs a minute, not the hours
of fine-tuning the convolutions). ``rcnn train-svm`` then trains the per-class SVMs on the
``fc7`` activations, exactly as R-CNN trains them on its fine-tuned fc7, and the box regressors
on the input features (R-CNN regresses from pool5).

Recipe (R-CNN ``finetuning/``, the rules :mod:`rcnn_cli.finetune` follows):

* windows: every cached row of every training image (ground-truth rows and proposals);
  a row with IoU >= ``fg_iou`` (0.5) with a ground truth takes its class, any other is
  background; rows reaching 0.5 only with VOC *difficult* objects are ignored;
* to bound memory on large datasets all foreground rows and at most ``bg_per_image`` random
  background rows per image are kept (float16), seeded;
* mini-batches of 128 windows, 32 foreground, drawn uniformly over all windows;
* SGD, momentum 0.9, weight decay 5e-4, lr x 0.1 once at 2/3 of the run; inputs standardised
  per dimension (mean and standard deviation of the kept windows, stored with the weights).

The weights are plain float32 arrays (stored in the model bundle's ``model.npz``).
"""
from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from rcnn_cli.boxes import as_boxes
from rcnn_cli.config import default
from rcnn_cli.labels import FG_IOU, window_labels

if TYPE_CHECKING:  # torch is imported where it runs: loading a model needs numpy only
    import torch

log = logging.getLogger("rcnn_cli.head")

# Width, iterations, learning rate, background windows and seed: [train_svm] head_* and
# seed of rcnn_cli/default.toml (the one place of defaults); the rest R-CNN's recipe.
HIDDEN: int = default("train_svm.head_hidden")          # fc6 / fc7 width
ITERATIONS: int = default("train_svm.head_iterations")  # SGD iterations
BATCH_SIZE = 128         # windows per mini-batch (R-CNN)
FG_PER_BATCH = 32        # foreground windows per mini-batch (R-CNN)
LR: float = default("train_svm.head_lr")  # base lr (fresh layers: R-CNN's 0.001 x 10)
MOMENTUM = 0.9
WEIGHT_DECAY = 0.0005
DROPOUT = 0.5            # after fc6 and fc7 (R-CNN / AlexNet)
INPUT_DROPOUT = 0.2      # on the input features (mobilenet_v2's classifier dropout)
BG_PER_IMAGE: int = default("train_svm.head_bg_per_image")  # per image (memory bound)
SEED: int = default("train_svm.seed")
# Windows held in memory over the whole dataset (a uniform seeded sample beyond these, so
# memory does not grow with the images): 64k + 192k windows x 2816 x 2 bytes = 1.5 GB.
MAX_FG_WINDOWS = 65536
MAX_BG_WINDOWS = 196608
BLOCK_ROWS = 16384      # per-image rows are merged into blocks this large (big arrays are
                        # mmapped and go back to the system when freed; small ones fragment)
STD_FLOOR = 1e-3         # added to per-dimension standard deviations

ARRAY_NAMES = ("mean", "std", "fc6_w", "fc6_b", "fc7_w", "fc7_b", "cls_w", "cls_b")
RecordsFactory = Callable[[], Iterable[Mapping[str, Any]]]


@dataclass
class Head:
    """fc6/fc7 (+ softmax layer) weights as float32 arrays; acts on raw features (N, D)."""

    mean: NDArray[np.float32]   # (D,)
    std: NDArray[np.float32]    # (D,)
    fc6_w: NDArray[np.float32]  # (H, D)
    fc6_b: NDArray[np.float32]  # (H,)
    fc7_w: NDArray[np.float32]  # (H, H)
    fc7_b: NDArray[np.float32]  # (H,)
    cls_w: NDArray[np.float32]  # (K + 1, H); row 0 = background
    cls_b: NDArray[np.float32]  # (K + 1,)

    @property
    def in_dim(self) -> int:
        return int(self.fc6_w.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.fc7_w.shape[0])

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in ARRAY_NAMES:  # new weights: the tensors fc7 multiplies with are stale
            self.__dict__.pop("_folded", None)

    @functools.cached_property
    def _folded(self) -> tuple[torch.Tensor, ...]:
        """fc6 with the division by std folded in (W / std) and fc7, as float32 tensors."""
        import torch

        return tuple(torch.from_numpy(np.ascontiguousarray(a, np.float32))
                     for a in ((self.fc6_w / self.std).T, self.fc6_b, self.fc7_w.T,
                               self.fc7_b))

    def fc7(self, features: ArrayLike) -> NDArray[np.float32]:
        """fc7 activations (N, H) float32 (after ReLU) of raw features (N, D) (or (H,) of (D,)).

        ``relu(fc7(relu(fc6((x - mean) / std))))`` with the division folded into fc6 (the
        mean is subtracted first: folding it into the bias too cancels badly in float32 for
        dimensions of tiny std) and torch's matrix product: 1.3x less CPU time than
        standardising then multiplying in numpy (2000 x 2816 features, one thread, A/B in one
        process: 0.097 vs 0.127 s on a loaded machine). The largest part of detect's scoring.
        """
        import torch

        w6, b6, _, _ = self._folded
        x = np.asarray(features, np.float32)
        flat = x.ndim == 1
        x = torch.from_numpy(np.subtract(np.atleast_2d(x), self.mean, dtype=np.float32))
        with torch.inference_mode():
            out = self.fc7_of_fc6(torch.addmm(b6, x, w6))
        return out[0] if flat else out

    def fc7_of_fc6(self, fc6: torch.Tensor) -> NDArray[np.float32]:
        """fc7 activations (N, H) of fc6's outputs before their ReLU (a float32 (N, H) tensor,
        overwritten): the rest of :meth:`fc7`."""
        import torch

        _, _, w7, b7 = self._folded
        with torch.inference_mode():
            return torch.addmm(b7, fc6.relu_(), w7).relu_().numpy()

    def logits(self, features: ArrayLike) -> NDArray[np.float32]:
        """Softmax-layer inputs (N, K + 1) of raw features; column 0 is background."""
        return self.fc7(features) @ self.cls_w.T + self.cls_b

    def arrays(self, prefix: str = "head_") -> dict[str, NDArray[np.float32]]:
        return {prefix + n: np.asarray(getattr(self, n), np.float32) for n in ARRAY_NAMES}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "head_") -> Head:
        return cls(**{n: np.asarray(arrays[prefix + n], np.float32) for n in ARRAY_NAMES})

    def check(self, num_classes: int | None = None) -> None:
        """Raise ValueError unless the shapes chain: (D,) (D,) (H, D) (H,) (H, H) (H,)
        (K + 1, H) (K + 1,)."""
        d, h = self.in_dim, self.out_dim
        k1 = self.cls_w.shape[0]
        want = {"mean": (d,), "std": (d,), "fc6_w": (h, d), "fc6_b": (h,), "fc7_w": (h, h),
                "fc7_b": (h,), "cls_w": (k1, h), "cls_b": (k1,)}
        for n, shape in want.items():
            if getattr(self, n).shape != shape:
                raise ValueError(f"head {n} has shape {getattr(self, n).shape}, expected {shape}")
        if num_classes is not None and k1 != num_classes + 1:
            raise ValueError(f"head has {k1 - 1} classes, the model {num_classes}")
        if not (self.std > 0).all():
            raise ValueError("head std must be positive")


@dataclass
class HeadResult:
    head: Head
    stats: dict[str, Any] = field(default_factory=dict)


def _make_net(dim: int, hidden: int, num_classes: int, dropout: float,
              input_dropout: float) -> torch.nn.Module:
    """The head as a torch module: ``fc`` (dropout, fc6, ReLU, dropout, fc7, ReLU, dropout)
    then ``cls``; built here so that importing this module does not import torch."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Sequential(nn.Dropout(input_dropout), nn.Linear(dim, hidden),
                                    nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden),
                                    nn.ReLU(), nn.Dropout(dropout))
            self.cls = nn.Linear(hidden, num_classes + 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.cls(self.fc(x))

    return Net()


def collect_windows(records_factory: RecordsFactory, num_classes: int, fg_iou: float = FG_IOU,
                    bg_per_image: int = BG_PER_IMAGE, seed: int = SEED,
                    max_fg: int = MAX_FG_WINDOWS, max_bg: int = MAX_BG_WINDOWS
                    ) -> tuple[NDArray[np.float16], NDArray[np.int64], int]:
    """Labelled training windows of all records: (features (M, D) float16, labels (M,) with
    0 = background and k + 1 = class k, number of images). Every foreground row is kept and
    at most ``bg_per_image`` background rows per image (seeded choice); ignored rows never.
    Beyond ``max_fg`` foreground or ``max_bg`` background windows in all, a uniform seeded
    sample of that many is kept (memory bounded by these, not by the number of images)."""
    rng = np.random.default_rng(seed)
    prio_rng = np.random.default_rng([seed, 1])  # bounded sample (own stream: see _bottom_k)
    feats, labels, prio, n, total = [], [], [], 0, 0
    start = pending = 0  # first entry not merged into a block, and its rows
    for n, rec in enumerate(records_factory(), 1):
        boxes = as_boxes(rec["boxes"])
        f = np.asarray(rec["features"])
        if f.ndim != 2 or len(f) != len(boxes):
            raise ValueError(f"record {n - 1}: features {f.shape} and boxes {boxes.shape} "
                             "must have the same rows")
        lab, _ = window_labels(boxes, rec["gt_boxes"], rec["gt_labels"], fg_iou,
                               rec.get("gt_difficult"))
        if lab.size and lab.max() > num_classes:
            raise ValueError(f"record {n - 1}: class index {lab.max() - 1} >= {num_classes}")
        fg = np.flatnonzero(lab > 0)
        bg = np.flatnonzero(lab == 0)
        if len(bg) > bg_per_image:
            bg = np.sort(rng.choice(bg, bg_per_image, replace=False))
        keep = np.concatenate([fg, bg])
        feats.append(f[keep].astype(np.float16))
        labels.append(lab[keep])
        prio.append(prio_rng.random(len(keep)))
        total += len(keep)
        pending += len(keep)
        if pending >= BLOCK_ROWS:
            for lst in (feats, labels, prio):
                lst[start:] = [np.concatenate(lst[start:])]
            start, pending = len(feats), 0
        if total > 1.25 * (max_fg + max_bg):
            total = _bottom_k(feats, labels, prio, max_fg, max_bg)
    if not feats:
        raise ValueError("no training records")
    y = np.concatenate(labels)
    if (y > 0).sum() > max_fg or (y == 0).sum() > max_bg:
        total = _bottom_k(feats, labels, prio, max_fg, max_bg)
    x = np.empty((total, feats[0].shape[1]), np.float16)  # filled chunk by chunk, freeing
    i = 0
    for j, c in enumerate(feats):
        x[i:i + len(c)], feats[j], i = c, None, i + len(c)
    return x, np.concatenate(labels), n


def _bottom_k(feats: list, labels: list, prio: list, max_fg: int, max_bg: int) -> int:
    """Keep, in place, the ``max_fg`` foreground and ``max_bg`` background windows of
    lowest priority (uniform draws: a uniform sample without replacement of every window
    seen so far); return the rows left. Under both bounds nothing changes."""
    y, p = np.concatenate(labels), np.concatenate(prio)
    keep = np.zeros(len(y), bool)
    for idx, k in ((np.flatnonzero(y > 0), max_fg), (np.flatnonzero(y == 0), max_bg)):
        keep[idx if len(idx) <= k else idx[np.argpartition(p[idx], k)[:k]]] = True
    i = 0
    for j in range(len(feats)):
        m = keep[i:i + len(labels[j])]
        i += len(labels[j])
        feats[j], labels[j], prio[j] = feats[j][m], labels[j][m], prio[j][m]
    return int(keep.sum())


def _mean_std(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and (unbiased) standard deviation of float16 rows, in float64
    chunks (no float32 copy of the whole matrix; 4096 x 2816 x 8 bytes = 92 MB a chunk)."""
    import torch

    s = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    s2 = torch.zeros_like(s)
    for i in range(0, len(x), chunk):
        c = x[i:i + chunk].double()
        s += c.sum(0)
        s2 += (c * c).sum(0)
    n = len(x)
    mean = s / n
    var = (s2 - n * mean * mean) / max(n - 1, 1)
    return mean.float(), var.clamp(min=0).sqrt().float()


def train_head(records_factory: RecordsFactory, num_classes: int, *, hidden: int = HIDDEN,
               iterations: int = ITERATIONS, batch_size: int = BATCH_SIZE,
               fg_per_batch: int = FG_PER_BATCH, lr: float = LR, momentum: float = MOMENTUM,
               weight_decay: float = WEIGHT_DECAY, dropout: float = DROPOUT,
               input_dropout: float = INPUT_DROPOUT, fg_iou: float = FG_IOU,
               bg_per_image: int = BG_PER_IMAGE, seed: int = SEED,
               device: str | torch.device = "cpu", progress: bool = False) -> HeadResult:
    """Train fc6/fc7 + a (K + 1)-way softmax layer on cached features (module docstring).

    Deterministic for a given seed, device and CPU thread count (its own generators; the
    global RNG is not touched). Returns the head and training statistics (window counts,
    losses, seconds).
    """
    import torch

    from rcnn_cli._headbatch import threshold

    if iterations < 1 or hidden < 1 or not 0 < fg_per_batch <= batch_size:
        raise ValueError(f"need iterations >= 1, hidden >= 1 and 0 < fg_per_batch <= "
                         f"batch_size, got {iterations}, {hidden}, {fg_per_batch}, {batch_size}")
    threshold(dropout), threshold(input_dropout)  # ValueError before any work
    t0 = time.perf_counter()
    x16, labels, n_images = collect_windows(records_factory, num_classes, fg_iou,
                                            bg_per_image, seed)
    fg, bg = np.flatnonzero(labels > 0), np.flatnonzero(labels == 0)
    if len(fg) == 0 or len(bg) == 0:
        raise ValueError(f"head training needs foreground and background windows, got "
                         f"{len(fg)} and {len(bg)}")
    dev = torch.device(device)
    y = torch.from_numpy(labels).to(dev)
    mean, std = _mean_std(torch.from_numpy(x16))
    std = std + STD_FLOOR
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _make_net(x16.shape[1], hidden, num_classes, dropout, input_dropout).to(dev)
    losses = _sgd(net, x16, y, mean, std, fg, bg, iterations=iterations, batch_size=batch_size,
                  fg_per_batch=fg_per_batch, lr=lr, momentum=momentum,
                  weight_decay=weight_decay, seed=seed, progress=progress)
    net.eval()

    def arr(t: torch.Tensor) -> NDArray[np.float32]:
        return t.detach().float().cpu().numpy().astype(np.float32)

    head = Head(mean=arr(mean), std=arr(std), fc6_w=arr(net.fc[1].weight),
                fc6_b=arr(net.fc[1].bias), fc7_w=arr(net.fc[4].weight),
                fc7_b=arr(net.fc[4].bias), cls_w=arr(net.cls.weight), cls_b=arr(net.cls.bias))
    tail = losses[-min(100, len(losses)):]
    stats = {"images": n_images, "windows": len(labels), "foreground": len(fg),
             "background": len(bg), "iterations": iterations,
             "first_loss": round(losses[0], 4), "final_loss": round(float(np.mean(tail)), 4),
             "seconds": round(time.perf_counter() - t0, 1), "device": str(dev),
             "threads": torch.get_num_threads() if dev.type == "cpu" else None}
    log.info("head: %d windows (%d fg) from %d images, loss %.3f -> %.3f in %.0f s",
             stats["windows"], stats["foreground"], n_images, stats["first_loss"],
             stats["final_loss"], stats["seconds"])
    return HeadResult(head, stats)


def _sgd(net: torch.nn.Module, x16: NDArray[np.float16], y: torch.Tensor, mean: torch.Tensor,
         std: torch.Tensor, fg: np.ndarray, bg: np.ndarray, *, iterations: int, batch_size: int,
         fg_per_batch: int, lr: float, momentum: float, weight_decay: float, seed: int,
         progress: bool) -> list[float]:
    """R-CNN's SGD on windows ``x16`` (M, D) float16 (host memory) with labels ``y``; returns
    the losses.

    Each mini-batch draws ``fg_per_batch`` foreground rows (indices ``fg``) and the rest
    background (``bg``), with replacement; lr x 0.1 at 2/3 of the run. Dropout uses the same
    Bernoulli(1 - p) keep masks scaled by 1 / (1 - p) as ``nn.Dropout`` (p rounded to
    1/65536), drawn by the kernels
    of :mod:`rcnn_cli._headbatch`, which also gather, convert and standardise the batch on
    the host in the same pass (one kernel call per layer and step). Profiled per step: torch's
    CPU ``bernoulli_`` took 13 ms of ~30 for the 128 x 2816 input mask; numpy masks and
    torch's element-wise passes then 3-4.5 ms of 15-18; the kernels ~1 ms.

    On a CPU the steps use torch's intra-op threads as the process has them (all cores by
    default; ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` limits them): on two free cores
    two threads took 17.5 ms per step against 27-29 with one (fc6 and its gradient split well;
    train-svm on raccoon's 160 images 66.5 -> 54.6 s). The result is deterministic for a
    given thread count, and the count is in the training statistics. On a machine that other
    busy processes share, set ``OMP_NUM_THREADS=1``: there each parallel region waits for a
    descheduled thread (profiled at load 20: 95-110 ms per step with one thread, 550-600
    with two).
    """
    import torch
    from torch import nn

    from rcnn_cli import _headbatch as hb

    dev = y.device
    drop_in, drop = net.fc[0].p, net.fc[3].p
    fc6, fc7, cls = net.fc[1], net.fc[4], net.cls
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay, fused=True)  # one kernel: 2.5 ms/step, not 6
    step = max(1, (2 * iterations) // 3)
    rng = np.random.default_rng(seed + 1)
    n_fg = min(fg_per_batch, len(fg))
    hidden = fc6.out_features
    if x16.dtype != np.float16:
        raise TypeError(f"windows must be float16, got {x16.dtype}")
    bits = np.ascontiguousarray(x16).view(np.uint16)
    mean_, inv_std = (np.ascontiguousarray(t.float().cpu().numpy()) for t in (mean, 1 / std))
    batch = np.empty((batch_size, x16.shape[1]), np.float32)  # host buffers, reused
    masks = np.empty((2, batch_size, hidden), np.float32)

    hidden_dropout = hb.threshold(drop)[0] > 0

    def dropped(h: torch.Tensor, it: int, layer: int) -> torch.Tensor:
        if not hidden_dropout:
            return h
        return h * torch.from_numpy(hb.mask(drop, seed, it, layer, masks[layer - 1])).to(dev)

    losses: list[float] = []
    net.train()
    it_range = range(iterations)
    if progress:
        from tqdm import tqdm
        it_range = tqdm(it_range, desc="head", unit="it", leave=False, file=sys.stderr,
                        disable=not sys.stderr.isatty(), dynamic_ncols=True)
    for it in it_range:
        if it == step:
            for g in opt.param_groups:
                g["lr"] = lr * 0.1
        idx = np.concatenate([fg[rng.integers(len(fg), size=n_fg)],
                              bg[rng.integers(len(bg), size=batch_size - n_fg)]])
        h = torch.from_numpy(hb.gather_batch(bits, idx, mean_, inv_std, drop_in, seed, it,
                                             batch)).to(dev)
        h = dropped(torch.relu(fc6(h)), it, 1)
        h = dropped(torch.relu(fc7(h)), it, 2)
        loss = nn.functional.cross_entropy(cls(h), y[torch.from_numpy(idx).to(dev)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
