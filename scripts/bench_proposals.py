"""Benchmark our selective search against OpenCV's on a PASCAL VOC folder.

One process, one thread (OpenCV, numba, torch and BLAS all limited to one), the same resized
images for both methods, one-time JIT compilation excluded (a warm-up image runs first), the
methods timed alternately image by image so background load hits both alike.
Prints ONE JSON line on stdout: per method seconds/image, recall@0.5, recall@0.7, AR, ABO,
MABO, boxes/image, plus the speed ratio. Progress goes to stderr.

    python scripts/bench_proposals.py [--data /work/shared/data/raccoon] [--split test.txt]
        [--limit N] [--quality] [--plot recall.png]
        [--methods ours_fast,opencv_fast,ours_quality,sliding]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rcnn_cli import boxes as box_ops
from rcnn_cli.proposals import (
    opencv_selective_search,
    plot_recall_curve,
    proposal_recall,
    selective_search,
    sliding_windows,
)


def read_voc_folder(root: Path, split: str | None, limit: int | None):
    """[(image path, gt boxes (G, 4) ours, labels (G,))] of a VOC folder, split order."""
    ann_dir = root / "annotations" if (root / "annotations").is_dir() else root / "Annotations"
    img_dir = root / "images" if (root / "images").is_dir() else root / "JPEGImages"
    if split and (root / split).is_file():
        stems = [s.strip() for s in (root / split).read_text().split() if s.strip()]
    else:
        stems = sorted(p.stem for p in ann_dir.glob("*.xml"))
    classes: dict[str, int] = {}
    items = []
    for stem in stems[:limit] if limit else stems:
        tree = ET.parse(ann_dir / f"{stem}.xml").getroot()
        fname = tree.findtext("filename") or f"{stem}.jpg"
        path = img_dir / fname if (img_dir / fname).is_file() else img_dir / f"{stem}.jpg"
        raw, labels = [], []
        for obj in tree.iter("object"):
            bb = obj.find("bndbox")
            raw.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
            labels.append(classes.setdefault(obj.findtext("name"), len(classes)))
        items.append((path, box_ops.from_voc(np.array(raw, np.float32).reshape(-1, 4)),
                      np.array(labels, np.int64)))
    return items, sorted(classes, key=classes.get)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/raccoon"))
    ap.add_argument("--split", default="test.txt", help="stems file in --data ('' = all)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-side", type=int, default=500)
    ap.add_argument("--top-k", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality", action="store_true", help="also run our 'quality' strategy")
    ap.add_argument("--no-opencv", action="store_true", help="skip OpenCV (ours only)")
    ap.add_argument("--plot", type=Path, default=None, help="write a recall curve PNG")
    ap.add_argument("--methods", default=None,
                    help="comma-separated subset of ours_fast, opencv_fast, ours_quality, "
                         "sliding (overrides --quality / --no-opencv)")
    args = ap.parse_args()

    cv2.setNumThreads(1)
    try:
        import numba
        import torch
        numba.set_num_threads(1)
        torch.set_num_threads(1)
    except (ImportError, ValueError):
        pass

    items, classes = read_voc_folder(args.data, args.split or None, args.limit)
    images = [cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
              for p, _, _ in items]
    common = {"max_side": args.max_side, "top_k": args.top_k, "seed": args.seed}
    methods = {"ours_fast": lambda im: selective_search(im, "fast", **common)}
    if not args.no_opencv:
        methods["opencv_fast"] = lambda im: opencv_selective_search(im, "fast", **common)
    if args.quality:
        methods["ours_quality"] = lambda im: selective_search(im, "quality", **common)
    if args.methods:
        every = {"ours_fast": lambda im: selective_search(im, "fast", **common),
                 "opencv_fast": lambda im: opencv_selective_search(im, "fast", **common),
                 "ours_quality": lambda im: selective_search(im, "quality", **common),
                 # the CLI's defaults (six scales x three aspect ratios, stride 1/4)
                 "sliding": lambda im: sliding_windows(im.shape[:2], top_k=args.top_k)}
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(names) - set(every))
        if unknown:
            ap.error(f"--methods: unknown {unknown}; choose from {sorted(every)}")
        methods = {m: every[m] for m in names}

    # warm-up: numba compilation / cache load and OpenCV's first call are not timed
    for fn in methods.values():
        fn(images[0])

    seconds = {m: 0.0 for m in methods}
    props = {m: [] for m in methods}
    for i, im in enumerate(images):
        for m, fn in methods.items():  # alternate methods per image: shared background load
            t = time.perf_counter()
            b, _ = fn(im)
            seconds[m] += time.perf_counter() - t
            props[m].append(b)
        print(f"\r{i + 1}/{len(images)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    gts = [g for _, g, _ in items]
    labels = [lab for _, _, lab in items]
    result = {"data": str(args.data), "split": args.split, "images": len(images),
              "max_side": args.max_side, "top_k": args.top_k, "threads": 1}
    curves = {}
    for m in methods:
        r = proposal_recall(props[m], gts, labels=labels, class_names=classes)
        result[m] = {"s_per_image": round(seconds[m] / len(images), 4),
                     **{k: round(r[k], 4) for k in
                        ("recall@0.5", "recall@0.7", "ar", "abo", "mabo", "boxes_per_image")}}
        curves[m] = (r["curve"]["num_boxes"], r["curve"]["recall@0.5"])
    if "opencv_fast" in methods and "ours_fast" in methods:
        result["speedup_fast"] = round(seconds["opencv_fast"] / seconds["ours_fast"], 2)
    if args.plot:
        plot_recall_curve(curves, args.plot)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
