"""Build a crowded / small-object detection set from a VOC folder: 2x2 and 3x3 mosaics.

Each mosaic tiles n x n photos of the source set into one canvas the size of one photo
(default 640 x 480), each photo shrunk to fit its cell with its aspect ratio kept (centred,
grey border), its boxes transformed the same way. A raccoon that fills its photo becomes one
of 4 (2x2, ~150-300 px) or 9 (3x3, ~100-200 px) objects of one class side by side, many
touching their neighbours across the cell borders: the "several objects of one class, smaller
than in training" case that the raccoon photos alone never show.

Train mosaics are drawn only from the source's ``train.txt`` photos and test mosaics only from
its ``test.txt`` photos, so no photo crosses the split. Seeded (``--seed``): the same command
gives the same files. Writes a VOC folder (``annotations/*.xml``, ``images/*.jpg``,
``train.txt``, ``test.txt``) and refuses a non-empty output folder.

usage: python scripts/make_mosaic.py [--data ../shared/data/raccoon] -o /tmp/unseen/mosaic
           [--train 80] [--test 20] [--grids 2,3] [--size 640x480] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rcnn_cli.datasets import ImageRecord, load_dataset, write_voc_xml

GREY = (124, 116, 104)  # ImageNet mean colour: the border adds no edges of its own


def mosaic(photos: list[tuple[Path, np.ndarray]], n: int, size: tuple[int, int]
           ) -> tuple[Image.Image, np.ndarray]:
    """Tile ``n * n`` photos (path, boxes (K, 5): x1y1x2y2 + class) on a ``size`` (w, h)
    canvas. Returns the image and the transformed boxes (M, 5), float32."""
    w, h = size
    canvas = Image.new("RGB", size, GREY)
    out = []
    for k, (path, boxes) in enumerate(photos):
        r, c = divmod(k, n)
        x0, y0 = c * w // n, r * h // n
        cw, ch = (c + 1) * w // n - x0, (r + 1) * h // n - y0
        with Image.open(path) as im:
            im = im.convert("RGB")
            f = min(cw / im.width, ch / im.height)
            tw, th = max(1, round(im.width * f)), max(1, round(im.height * f))
            ox, oy = x0 + (cw - tw) // 2, y0 + (ch - th) // 2
            canvas.paste(im.resize((tw, th), Image.BILINEAR), (ox, oy))
        b = boxes.astype(np.float64).copy()
        b[:, [0, 2]] = b[:, [0, 2]] * (tw / im.width) + ox
        b[:, [1, 3]] = b[:, [1, 3]] * (th / im.height) + oy
        out.append(b)
    return canvas, np.concatenate(out).astype(np.float32)


def build(data: Path, out: Path, n_train: int, n_test: int, grids: list[int],
          size: tuple[int, int], seed: int) -> dict:
    """Write the mosaic set; returns counts (mosaics, objects per split)."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True)
    (out / "annotations").mkdir()
    counts = {}
    for split, count in (("train", n_train), ("test", n_test)):
        ds = load_dataset(data, split=data / f"{split}.txt")
        pool = [(ds.image_path(r), np.column_stack([r.boxes, r.labels]))
                for r in ds.records if len(r.boxes)]
        names, objects = [], 0
        for i in range(count):
            n = grids[i % len(grids)]
            pick = rng.choice(len(pool), n * n, replace=len(pool) < n * n)
            img, boxes = mosaic([pool[j] for j in pick], n, size)
            name = f"{split}-{n}x{n}-{i:03d}"
            img.save(out / "images" / f"{name}.jpg", quality=92)
            write_voc_xml(out / "annotations" / f"{name}.xml", ImageRecord(
                f"{name}.jpg", size[1], size[0], boxes[:, :4], boxes[:, 4].astype(np.int64),
                np.zeros(len(boxes), bool)), ds.classes)
            names.append(name)
            objects += len(boxes)
        (out / f"{split}.txt").write_text("\n".join(names) + "\n")
        counts[split] = {"mosaics": count, "objects": objects}
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.environ.get(
        "RCNN_RACCOON", str(ROOT.parent / "shared" / "data" / "raccoon")))
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--train", type=int, default=80, help="train mosaics")
    ap.add_argument("--test", type=int, default=20, help="test mosaics")
    ap.add_argument("--grids", default="2,3", help="grid sizes, used in turn (2,3: 2x2 and 3x3)")
    ap.add_argument("--size", default="640x480", help="mosaic width x height, pixels")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        ap.error(f"-o: {out} is not empty (choose a new folder)")
    grids = [int(g) for g in a.grids.split(",")]
    if not grids or min(grids) < 1:
        ap.error("--grids: positive integers, e.g. 2,3")
    w, h = (int(v) for v in a.size.lower().split("x"))
    print(build(Path(a.data), out, a.train, a.test, grids, (w, h), a.seed))


if __name__ == "__main__":
    main()
