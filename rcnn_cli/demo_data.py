"""A small detection dataset built deterministically from photos bundled with scikit-image.

The photos (``astronaut``, ``chelsea``, ``coffee``, ``rocket``, ``brick``, ``grass``,
``gravel``, ``hubble_deep_field``, ...) are public domain or CC0 (see scikit-image's
``skimage/data/README.txt``). Objects are cut from four of them with a soft (feathered)
mask and composited at random positions, scales and mirror flips onto backgrounds cut from
the others. The ground truth box of each object is the extent of its mask where the opacity
is at least one half, so it is known exactly.

Written as a VOC folder: ``images/*.jpg``, ``annotations/*.xml``, ``train.txt``, ``test.txt``.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from rcnn_cli.datasets import ImageRecord, write_voc_xml
from rcnn_cli.store import atomic_write_bytes, atomic_write_text

#: (class name, skimage.data function, crop x1, y1, x2, y2 in the photo's own pixels)
OBJECTS = (
    ("face", "astronaut", 136, 8, 290, 190),
    ("cat", "chelsea", 40, 0, 410, 300),
    ("coffee", "coffee", 73, 60, 460, 387),
    ("rocket", "rocket", 297, 121, 342, 405),
)
BACKGROUNDS = ("brick", "grass", "gravel", "hubble_deep_field", "camera", "moon", "coins")
CLASSES = sorted(o[0] for o in OBJECTS)
IMAGE_SIZE = (240, 320)  # (height, width)


def _photo(name: str) -> NDArray[np.uint8]:
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)


def _soft_mask(h: int, w: int, feather: float) -> NDArray[np.float32]:
    """Opacity (h, w): 1 inside a rounded rectangle, falling smoothly to 0 at the edge."""
    yy = np.minimum(np.arange(h), np.arange(h)[::-1])[:, None] + 0.5
    xx = np.minimum(np.arange(w), np.arange(w)[::-1])[None, :] + 0.5
    d = np.minimum(yy, xx).astype(np.float32)  # distance to the nearest edge
    return np.clip(d / max(feather, 1e-3), 0, 1) ** 1.5


def _background(rng: np.random.Generator, bgs: dict) -> NDArray[np.uint8]:
    h, w = IMAGE_SIZE
    src = bgs[BACKGROUNDS[rng.integers(len(BACKGROUNDS))]]
    s = rng.uniform(1.0, 1.8) * max(h / src.shape[0], w / src.shape[1])
    size = (max(int(np.ceil(src.shape[1] * s)), w), max(int(np.ceil(src.shape[0] * s)), h))
    src = cv2.resize(src, size, interpolation=cv2.INTER_AREA)
    y = rng.integers(0, src.shape[0] - h + 1)
    x = rng.integers(0, src.shape[1] - w + 1)
    bg = src[y:y + h, x:x + w].astype(np.float32)
    tint = rng.uniform(0.6, 1.2, 3)  # grey textures get a random colour cast
    return np.clip(bg * tint, 0, 255).astype(np.uint8)


def make_image(rng: np.random.Generator, objs: list, bgs: dict
               ) -> tuple[NDArray[np.uint8], NDArray[np.float32], list[int]]:
    """One composite: (image (H, W, 3), boxes (G, 4), labels)."""
    h, w = IMAGE_SIZE
    canvas = _background(rng, bgs).astype(np.float32)
    boxes, labels = [], []
    for _ in range(rng.integers(1, 4)):
        for _attempt in range(20):
            k = int(rng.integers(len(objs)))
            name, patch = objs[k]
            side = rng.uniform(60, 150)
            s = side / max(patch.shape[:2])
            ph, pw = max(int(patch.shape[0] * s), 8), max(int(patch.shape[1] * s), 8)
            if ph >= h - 4 or pw >= w - 4:
                continue
            y0, x0 = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
            mask = _soft_mask(ph, pw, feather=0.08 * min(ph, pw) + 1)
            on = np.argwhere(mask >= 0.5)
            box = np.array([x0 + on[:, 1].min(), y0 + on[:, 0].min(),
                            x0 + on[:, 1].max() + 1, y0 + on[:, 0].max() + 1], np.float32)
            if boxes:
                from rcnn_cli.boxes import box_iou

                if box_iou(box[None], np.array(boxes)).max() > 0.05:
                    continue
            obj = cv2.resize(patch, (pw, ph), interpolation=cv2.INTER_AREA).astype(np.float32)
            if rng.random() < 0.5:
                obj, mask = obj[:, ::-1], mask[:, ::-1]
            obj = obj * rng.uniform(0.85, 1.15)
            a = mask[:, :, None]
            region = canvas[y0:y0 + ph, x0:x0 + pw]
            canvas[y0:y0 + ph, x0:x0 + pw] = a * obj + (1 - a) * region
            boxes.append(box)
            labels.append(CLASSES.index(name))
            break
    img = np.clip(canvas + rng.normal(0, 2.0, canvas.shape), 0, 255).astype(np.uint8)
    return img, np.array(boxes, np.float32).reshape(-1, 4), labels


def make_demo_dataset(out: str | Path, n_train: int = 32, n_test: int = 16,
                      seed: int = 0) -> Path:
    """Write the demo dataset as a VOC folder under ``out``; return its path.

    Deterministic: the same ``seed`` gives the same pixels and boxes on every machine.
    Existing files written by an earlier call are replaced (the folder is ours).
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    objs = [(name, _photo(fn)[y1:y2, x1:x2]) for name, fn, x1, y1, x2, y2 in OBJECTS]
    bgs = {b: _photo(b) for b in BACKGROUNDS}
    stems = {"train": [], "test": []}
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        stem = f"{split}_{i:03d}"
        img, boxes, labels = make_image(rng, objs, bgs)
        ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise RuntimeError(f"could not encode demo image {stem}")
        atomic_write_bytes(out / "images" / f"{stem}.jpg", buf.tobytes())
        rec = ImageRecord(f"{stem}.jpg", img.shape[0], img.shape[1], boxes,
                          np.array(labels, np.int64), np.zeros(len(labels), bool))
        write_voc_xml(out / "annotations" / f"{stem}.xml", rec, CLASSES, overwrite=True)
        stems[split].append(stem)
    for split, names in stems.items():
        atomic_write_text(out / f"{split}.txt", "\n".join(names) + "\n")
    return out
