"""CPU seconds per image of each stage of `rcnn detect`, one thread; prints one JSON line.

What ``detect_image`` does for each image (decode, selective search, shared-mode features,
fc head + SVM scoring + box regression + soft-NMS), timed with this thread's CPU clock
(``time.thread_time``), so other processes on a loaded machine do not inflate the figures
(``rcnn detect --workers 2`` runs two such processes: wall time per image is about half the
total, plus process start-up). With ``--baseline DIR`` the proposals and features of another
source tree (e.g. ``git archive <commit> | tar -x -C DIR``) run too, alternating image by
image with ours in the same process; scoring is shared code, so it is timed for both.

    python scripts/bench_detect_stages.py --model runs/model [--data ../shared/data/raccoon]
        [--split test.txt] [--limit 20] [--baseline /tmp/base]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rcnn_cli import features, proposals
from rcnn_cli.detect import DetectSettings, detect_image, model_extractor_kwargs
from rcnn_cli.images import read_image
from rcnn_cli.model import load_model

STAGES = ("decode", "proposals", "features", "scoring")


def _baseline(tree: Path, tmp: Path):
    """The proposals and features modules of another source tree, imported as ``rcnn_base``
    (they use relative imports only)."""
    shutil.copytree(tree / "rcnn_cli", tmp / "rcnn_base")
    sys.path.insert(0, str(tmp))
    return (importlib.import_module("rcnn_base.proposals"),
            importlib.import_module("rcnn_base.features"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/raccoon"))
    ap.add_argument("--split", default="test.txt")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--baseline", type=Path, default=None,
                    help="source tree whose proposals/features run alternately with ours")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    model = load_model(str(args.model))
    kw = model_extractor_kwargs(model, args.model, "cpu")
    settings = dict(model.proposal_settings)
    method = settings.pop("method")
    cap = model.extract_settings.get("max_proposals")
    variants = {"ours": (proposals, features)}
    tmp = Path(tempfile.mkdtemp(prefix="bench_detect_"))
    if args.baseline:
        variants["baseline"] = _baseline(args.baseline, tmp)
    runs = {v: (p.propose, f.FeatureExtractor(**kw)) for v, (p, f) in variants.items()}
    stems = (args.data / args.split).read_text().split()[: args.limit]
    paths = [args.data / "images" / f"{s}.jpg" for s in stems]

    def one(v: str, path: Path) -> list[float]:
        propose, ext = runs[v]
        clock = time.thread_time
        t0 = clock()
        img = read_image(path)
        t1 = clock()
        boxes, _ = propose(img, method, **settings)
        boxes = boxes[:cap]
        t2 = clock()
        # features and scoring as rcnn detect runs them (with the first linear step moved
        # before the box means where model and extractor allow it; a baseline extractor
        # without that path scores its features)
        times = detect_image(img, model, ext, DetectSettings(), boxes, clock=clock)["times"]
        return [t1 - t0, t2 - t1, times["features"], times["scoring"]]

    for v in runs:  # warm-up: numba caches, first torch calls
        one(v, paths[0])
    total = {v: [0.0] * len(STAGES) for v in runs}
    for i, p in enumerate(paths):
        for v in runs:  # alternate image by image: shared background load
            total[v] = [a + b for a, b in zip(total[v], one(v, p))]
        print(f"\r{i + 1}/{len(paths)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    shutil.rmtree(tmp, ignore_errors=True)
    n = len(paths)
    result = {"images": n, "threads": 1, "clock": "thread CPU seconds per image"}
    for v, t in total.items():
        result[v] = {**{s: round(x / n, 4) for s, x in zip(STAGES, t)},
                     "total": round(sum(t) / n, 4)}
    if "baseline" in total:
        result["speedup"] = {s: round(b / o, 3) for s, b, o in
                             zip((*STAGES, "total"), (*total["baseline"], sum(total["baseline"])),
                                 (*total["ours"], sum(total["ours"])))}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
