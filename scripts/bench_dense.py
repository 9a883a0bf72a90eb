"""Selective search vs sliding windows vs dense (OverFeat) scoring, one trained model.

The same model bundle (trained with selective-search proposals on shared-mode mobilenet_v2
``grid`` features, as `rcnn train-svm` makes by default) detects the images of a VOC split
three ways, with the bundle's thresholds and post-processing:

* ``selective_search``: plain `rcnn detect` (the bundle's proposals + region features);
* ``sliding``: the same with `--method sliding` proposals (configs/default.toml
  [propose] sliding_*; the bundle's max_proposals cap applies) + region features;
* ``dense``: `rcnn detect --dense` (:mod:`rcnn_cli.dense`: every window position scored in
  one pass, local maxima of the score maps).

Reports AP50 (VOC07 11-point and all-point) and seconds per image (decoded image in,
detections out; one image at a time, after one warm-up image; the methods take turns
on each image so that a change of machine load hits them alike). Prints a Markdown table on
stderr and one JSON line on stdout. The bundle is only read.

usage: python scripts/bench_dense.py --model runs/model [--data DIR (default $RCNN_RACCOON)] [--split test]
       [--threads 2] [--limit N] [--methods selective_search,sliding,dense]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from rcnn_cli import config as cfgmod
from rcnn_cli.datasets import load_dataset
from rcnn_cli.dense import dense_settings, detect_dense
from rcnn_cli.detect import detect_image, model_detect_settings, model_extractor_kwargs
from rcnn_cli.evaluate import Detections, evaluate_detections
from rcnn_cli.features import FeatureExtractor
from rcnn_cli.images import read_image
from rcnn_cli.model import load_model
from rcnn_cli.stages import proposal_settings

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model bundle folder (read only)")
    ap.add_argument("--data", default=os.environ.get(
        "RCNN_RACCOON", str(ROOT.parent / "shared" / "data" / "raccoon")))
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="first N images only (0 = all)")
    ap.add_argument("--methods", default="selective_search,sliding,dense")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data, args.split)
    records = ds.records[: args.limit or None]
    model = load_model(args.model)
    cfg = cfgmod.defaults()
    settings = model_detect_settings(model, cfg, overrides={})
    ext = FeatureExtractor(**model_extractor_kwargs(model, args.model, "cpu"))
    sliding = dataclasses.replace(model, proposal_settings=proposal_settings(
        {**cfg["propose"], "method": "sliding"}))
    runs = {"selective_search": lambda im: detect_image(im, model, ext, settings),
            "sliding": lambda im: detect_image(im, sliding, ext, settings),
            "dense": lambda im: detect_dense(im, model, ext, settings)}
    images = {r.file_name: read_image(ds.image_root / r.file_name) for r in records}
    names = args.methods.split(",")
    first = next(iter(images.values()))
    for name in names:
        runs[name](first)  # warm-up
    # the methods take turns on each image, so a change of machine load hits all alike
    dets = {n: {} for n in names}
    secs = {n: 0.0 for n in names}
    steps = {n: {} for n in names}
    for rel, im in images.items():
        for name in names:
            t = time.perf_counter()
            out = runs[name](im)
            secs[name] += time.perf_counter() - t
            dets[name][rel] = Detections(out["boxes"], out["scores"], out["labels"])
            for k, v in out["times"].items():
                steps[name][k] = steps[name].get(k, 0.0) + v
    rows, n = [], len(images)
    for name in names:
        m, _ = evaluate_detections(ds, dets[name], plot=False)
        rows.append({"method": name, "images": n, "ap50_voc07": m["mAP_voc07"],
                     "ap50_voc": m["mAP_voc"], "detections": m["num_detections"],
                     "seconds_per_image": round(secs[name] / n, 3),
                     "step_seconds": {k: round(v / n, 3) for k, v in steps[name].items()}})
    print("| method | AP50 VOC07 | AP50 all-point | s / image |", file=sys.stderr)
    print("|---|---|---|---|", file=sys.stderr)
    for r in rows:
        print(f"| {r['method']} | {r['ap50_voc07']:.3f} | {r['ap50_voc']:.3f} | "
              f"{r['seconds_per_image']:.2f} |", file=sys.stderr)
    print(json.dumps({"model": str(args.model), "split": args.split, "threads": args.threads,
                      "sliding": sliding.proposal_settings, "dense": dense_settings(),
                      "rows": rows}))


if __name__ == "__main__":
    main()
