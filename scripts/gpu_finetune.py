"""One prepared GPU run: R-CNN warp-mode fine-tuning of MobileNetV2 on raccoon, then a quick
softmax-scored detection AP50 on the test split.

Steps (each timed; one JSON line on stdout at the end, logs on stderr):

1. proposals for train + test images with ``rcnn propose`` (selective search "fast", the
   defaults) and ``--workers`` processes, into ``OUT/proposals`` (a propose-stage folder the
   rest of the chain can reuse: ``rcnn extract --proposals OUT/proposals``);
2. :func:`rcnn_cli.finetune.finetune` in warp mode on the train split (32 + 96 windows per
   batch, R-CNN's recipe) on cuda with bf16 autocast; weights in ``OUT/finetune``
   (``backbone.safetensors`` ~14 MB, ``classifier.safetensors``, ``finetune.json``);
   checkpoints go to ``--work`` (not brought back);
3. AP50 on the test split with the fine-tuned softmax as the scorer (no SVMs, no box
   regression: R-CNN's "fine-tuned softmax" row): per class NMS 0.3, at most 100 per image.

Budget: calibrated at ~170 s for 2000 iterations on an H100; proposals for 200 images take
~30 s on 16 cores. Usage (repository root, on the GPU machine)::

    python scripts/gpu_finetune.py --data /work/shared/data/raccoon --out "$OUT" \\
        --iterations 2000 --workers 16
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rcnn_cli.datasets import load_dataset
from rcnn_cli.evaluate import voc_eval
from rcnn_cli.features import FeatureExtractor
from rcnn_cli.finetune import FinetuneSettings, finetune, load_classifier, proposals_from_dir
from rcnn_cli.images import read_image

log = logging.getLogger("gpu_finetune")

#: R-CNN test-time NMS IoU and the usual per-image cap.
NMS_IOU = 0.3
MAX_PER_IMAGE = 100
SCORE_MIN = 1e-3


def splits(data: Path, out: Path, limit: int | None) -> dict[str, Path]:
    """train / test / all split files (the first ``limit`` stems of each, for dry runs)."""
    stems = {s: (data / f"{s}.txt").read_text().split()[:limit] for s in ("train", "test")}
    stems["all"] = stems["train"] + stems["test"]
    out.mkdir(parents=True, exist_ok=True)
    for name, st in stems.items():
        (out / f"{name}.txt").write_text("\n".join(st) + "\n")
    return {name: out / f"{name}.txt" for name in stems}


def propose(data: Path, out: Path, split: Path, workers: int) -> float:
    """``rcnn propose`` over the images of ``split`` into ``out``; returns seconds."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rcnn_cli", "propose", str(data / "images"), "-o",
                    str(out), "--split", str(split), "--workers", str(workers), "-q"],
                   check=True)
    return time.perf_counter() - t


def softmax_ap50(ft_dir: Path, data: Path, split: Path, props_dir: Path, device: str,
                 max_proposals: int = 2000) -> dict:
    """AP50 (VOC07 11-point and all-point) on ``split``, scored by the fine-tuned softmax."""
    from torchvision.ops import batched_nms

    test = load_dataset(data, split=split)
    clf = load_classifier(ft_dir)
    ext = FeatureExtractor(**{**clf.features, "device": device})
    lookup = proposals_from_dir(props_dir)
    dets = {}
    for rec in test.records:
        boxes = lookup(rec)[:max_proposals]
        scores = clf.scores(ext.extract(read_image(test.image_path(rec)), boxes))  # (N, K)
        n, k = scores.shape
        b = np.repeat(boxes, k, 0)
        s, lab = scores.reshape(-1), np.tile(np.arange(k), n)
        keep = s > SCORE_MIN
        b, s, lab = b[keep], s[keep], lab[keep]
        idx = batched_nms(torch.from_numpy(b), torch.from_numpy(s), torch.from_numpy(lab),
                          NMS_IOU).numpy()[:MAX_PER_IMAGE]
        dets[rec.file_name] = (b[idx], s[idx], lab[idx])
    from rcnn_cli.evaluate import as_detections

    voc = voc_eval({f: as_detections(d) for f, d in dets.items()}, test.by_name(),
                   len(test.classes), 0.5)
    return {"ap50_voc07": float(np.nanmean([voc[c]["ap07"] for c in voc])),
            "ap50_voc": float(np.nanmean([voc[c]["ap"] for c in voc])),
            "test_images": len(test.records)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/raccoon"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_ft")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu_finetune_work"),
                    help="checkpoints (not brought back)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--mode", default="warp", choices=["warp", "shared"])
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--fg-per-batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=300.0,
                    help="stop fine-tuning after this many seconds (keeps the run in budget)")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--eval-proposals", type=int, default=2000,
                    help="proposals scored per test image")
    ap.add_argument("--limit", type=int, default=None,
                    help="first N train and test images only (CPU dry runs)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    row: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "mode": args.mode, "iterations": args.iterations}

    props = args.out / "proposals"
    sp = splits(args.data, args.work, args.limit)
    row["propose_seconds"] = propose(args.data, props, sp["all"], args.workers)
    log.info("proposals: %.1f s", row["propose_seconds"])

    train = load_dataset(args.data, split=sp["train"])
    t = time.perf_counter()
    settings = FinetuneSettings(mode=args.mode, iterations=args.iterations,
                                batch_size=args.batch_size, fg_per_batch=args.fg_per_batch,
                                seed=args.seed)
    res = finetune(train, proposals_from_dir(props), args.out / "finetune", settings,
                   device=args.device, checkpoint_dir=args.work / "checkpoint", progress=False,
                   time_limit=args.time_limit)
    row["finetune_seconds"] = time.perf_counter() - t
    recipe = json.loads(res.recipe_path.read_text())
    row.update(seconds_per_iteration=recipe["seconds_per_iteration"], best_val=res.best_val,
               iterations_done=recipe["iterations_done"], stopped=recipe["stopped"],
               exported_iteration=recipe["exported_iteration"],
               train_loss_first50=float(np.mean(res.train_losses[:50])),
               train_loss_last50=float(np.mean(res.train_losses[-50:])),
               weights=str(res.weights_path))
    log.info("finetune: %.1f s", row["finetune_seconds"])
    if not args.skip_eval:
        t = time.perf_counter()
        try:
            row.update(softmax_ap50(args.out / "finetune", args.data, sp["test"], props,
                                    args.device, args.eval_proposals))
        except Exception as e:  # the weights are saved; report and go on
            log.exception("evaluation failed")
            row["eval_error"] = repr(e)
        row["eval_seconds"] = time.perf_counter() - t
    print(json.dumps(row))


if __name__ == "__main__":
    main()
