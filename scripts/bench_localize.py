"""`rcnn localize` on a VOC folder: images with exactly one object, train.txt -> test.txt.

For each configuration (``--attach conv`` and ``fc``, L2 loss, frozen ImageNet backbone) it
trains on the one-object images of train.txt, predicts the one-object images of test.txt and
reports classification accuracy, localisation accuracy (right class and IoU >= 0.5, the
ImageNet CLS-LOC rule), mean IoU, the mean-box baseline (every test image gets the mean
normalised training box), training seconds and seconds per image of prediction (decoded
image in, box out; one image at a time). Prints a Markdown table and one JSON line.

With ``--rcnn-detections DIR`` (the output folder of ``rcnn detect`` on test.txt) it also
scores R-CNN's top-scoring detection per image on the same one-object test images.

usage: python scripts/bench_localize.py [--data DIR] [--iterations N] [--seeds 0,1]
       [--rcnn-detections DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from rcnn_cli import boxes as bx
from rcnn_cli import localize as L
from rcnn_cli.datasets import Dataset, load_dataset
from rcnn_cli.images import read_image

ROOT = Path(__file__).resolve().parents[1]


def one_object(ds: Dataset) -> Dataset:
    return Dataset([r for r in ds.records if len(r.boxes) == 1], ds.classes, ds.image_root)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "raccoon"))
    ap.add_argument("--iterations", type=int, default=L.ITERATIONS)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--attach", default="conv,fc")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rcnn-detections", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    full_tr, full_te = load_dataset(data, "train"), load_dataset(data, "test")
    tr, te = one_object(full_tr), one_object(full_te)
    images = {r.file_name: read_image(te.image_root / r.file_name) for r in te.records}
    mb = L.training_targets(tr).boxes.mean(0)
    base = [float(bx.box_iou(bx.scale(mb, r.height, r.width), r.boxes).max())
            for r in te.records]
    rows = []
    for attach in args.attach.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            t0 = time.perf_counter()
            loc = L.train_localizer(tr, attach=attach, iterations=args.iterations, seed=seed)
            t_train = time.perf_counter() - t0
            loc.predict([next(iter(images.values()))])  # build + warm up
            preds, t = {}, time.perf_counter()
            for name, im in images.items():
                preds[name] = loc.predict([im])[0]
            spi = (time.perf_counter() - t) / len(images)
            m = L.localization_metrics(te, preds)
            rows.append({"attach": attach, "seed": seed, "train_images": len(tr.records),
                         "test_images": len(te.records),
                         "classification_accuracy": m["classification_accuracy"],
                         "localization_accuracy": m["localization_accuracy"],
                         "mean_iou": m["mean_iou"], "train_seconds": round(t_train, 1),
                         "seconds_per_image": round(spi, 4),
                         "train_stats": loc.training_stats})
    if args.rcnn_detections:
        from rcnn_cli.evaluate import read_detections

        dets, _ = read_detections(args.rcnn_detections, te.classes)
        m = L.localization_metrics(te, dets)
        rows.append({"attach": "R-CNN top detection", "seed": "-",
                     "classification_accuracy": m["classification_accuracy"],
                     "localization_accuracy": m["localization_accuracy"],
                     "mean_iou": m["mean_iou"], "train_seconds": math.nan,
                     "seconds_per_image": math.nan})
    print(f"one-object images: train {len(tr.records)} of {len(full_tr.records)}, "
          f"test {len(te.records)} of {len(full_te.records)}; mean-box baseline: "
          f"loc. acc. {np.mean(np.array(base) >= 0.5):.3f}, mean IoU {np.mean(base):.3f}")
    print("| method | loc. accuracy (IoU>=0.5) | mean IoU | cls. accuracy | train s | s / image |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        name = (r["attach"] if r["seed"] == "-" else
                f"localize --attach {r['attach']} (seed {r['seed']})")
        print(f"| {name} | "
              f"{r['localization_accuracy']:.3f} | {r['mean_iou']:.3f} | "
              f"{r['classification_accuracy']:.3f} | {r['train_seconds']:.0f} | "
              f"{r['seconds_per_image']:.3f} |")
    print(json.dumps({"baseline_mean_iou": float(np.mean(base)),
                      "baseline_loc_acc": float(np.mean(np.array(base) >= 0.5)),
                      "rows": rows}))


if __name__ == "__main__":
    main()
