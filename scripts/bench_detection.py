"""Detection quality and CPU speed on a VOC folder, against torchvision's Faster R-CNN.

Trains on train.txt and scores on test.txt (default ../shared/data/raccoon) with the
toolkit's CPU configuration (selective search fast + shared-mode features + fc head + SVMs
+ box regression), once with frozen ImageNet mobilenet_v2 features and, with ``--weights``,
once with fine-tuned weights (e.g. the warp-mode fine-tuning of scripts/gpu_bench.sh); each
with the fc head (``train_svm.head = auto``, the default) and without it (SVMs on the
features, R-CNN on pool5-like features). Reports AP50 (VOC07 11-point and all-point) and
COCO AP with and without box regression, seconds
per image per detect stage, and the peer's CPU inference time on the same test images in
the same run (torchvision Faster R-CNN, mobilenet_v2 ImageNet backbone, tutorial
configuration, default 800 px resize). Prints one JSON line.

usage: python scripts/bench_detection.py [--data DIR] [--weights FT.safetensors] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from rcnn_cli import config
from rcnn_cli.datasets import load_dataset
from rcnn_cli.detect import detect_folder
from rcnn_cli.evaluate import evaluate_folder
from rcnn_cli.images import read_image
from rcnn_cli.stages import extract_folder, propose_folder
from rcnn_cli.train import train_model

ROOT = Path(__file__).resolve().parents[1]


def peer_seconds_per_image(paths: list[Path], threads: int) -> float:
    """CPU inference time of torchvision's Faster R-CNN (peer_fasterrcnn.py's build())."""
    import torchvision
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.rpn import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    torch.set_num_threads(threads)
    mb = torchvision.models.mobilenet_v2(
        weights=torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1)
    backbone = mb.features
    backbone.out_channels = 1280
    anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    torch.manual_seed(0)
    model = FasterRCNN(backbone, num_classes=2, rpn_anchor_generator=anchors,
                       box_roi_pool=pool).eval()
    ims = [torch.from_numpy(read_image(p)).permute(2, 0, 1).float() / 255 for p in paths]
    with torch.inference_mode():
        model([ims[0]])  # warm-up
        t0 = time.perf_counter()
        for im in ims:
            model([im])
    return (time.perf_counter() - t0) / len(ims)


def run_variant(tag: str, data: Path, work: Path, cfg: dict, weights: str | None,
                heads: tuple[str, ...] = ("auto", "none")) -> dict:
    """Extract the training features once, then for each ``train_svm.head`` setting train a
    model and detect / evaluate on the test split with and without box regression."""
    cfg = json.loads(json.dumps(cfg))
    cfg["extract"]["weights"] = weights or ""
    images = [str(data / "images")]
    t0 = time.perf_counter()
    rep = extract_folder(images, work / "props", work / f"feats_{tag}", cfg, annotations=data,
                         split=data / "train.txt", overwrite=True)
    out: dict = {"extract_train_s_per_image": round((time.perf_counter() - t0)
                                                    / max(rep.done, 1), 3)}
    for head in heads:
        cfg["train_svm"]["head"] = head
        model_dir = work / f"model_{tag}_{head}"
        t0 = time.perf_counter()
        model = train_model(work / f"feats_{tag}", model_dir, cfg, overwrite=True)
        res: dict = {"train_svm_s": round(time.perf_counter() - t0, 1),
                     "fc_head": model.head is not None}
        for reg in (True, False):
            cfg["detect"]["bbox_regression"] = reg
            name = f"det_{tag}_{head}" + ("" if reg else "_noreg")
            shutil.rmtree(work / name, ignore_errors=True)
            rep = detect_folder(images, model_dir, work / name, cfg, split=data / "test.txt")
            m, _ = evaluate_folder(data, work / name, None, data / "test.txt", None, cfg)
            key = "bbox_reg" if reg else "no_bbox_reg"
            res[key] = {"ap50_voc07": round(m["mAP_voc07"], 4),
                        "ap50_allpoint": round(m["mAP_voc"], 4),
                        "coco_ap": round(m["coco"]["AP"], 4)}
            if reg:
                n = max(rep.done, 1)
                res["detect_s_per_image"] = {k: round(v / n, 3)
                                             for k, v in rep.stage_seconds.items()}
                res["detect_s_per_image"]["total"] = round(rep.seconds / n, 3)
        out[f"head_{head}"] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "raccoon"))
    ap.add_argument("--weights", help="fine-tuned backbone (safetensors) for the second run")
    ap.add_argument("--work", default="/tmp/rcnn_bench_detection")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data, work = Path(a.data), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = config.load(overrides={"common": {"workers": a.threads, "device": "cpu"},
                                 "extract": {"mode": "shared"}})
    t0 = time.perf_counter()
    rep = propose_folder([str(data / "images")], work / "props", cfg)
    res = {"data": str(data), "device": "cpu", "threads": a.threads,
           "torch": torch.__version__,
           "propose_s_per_image_2workers": round((time.perf_counter() - t0) / max(rep.done, 1), 3)
           if rep.done else None}
    res["frozen_shared"] = run_variant("frozen", data, work, cfg, None)
    if a.weights:
        res["finetuned_shared"] = run_variant("ft", data, work, cfg, a.weights)
    if not a.no_peer:
        test = load_dataset(data, split=data / "test.txt")
        paths = [test.image_path(r) for r in test.records]
        res["peer_fasterrcnn_cpu_s_per_image"] = round(peer_seconds_per_image(paths, a.threads), 3)
        res["ours_detect_s_per_image"] = (
            res["frozen_shared"]["head_auto"]["detect_s_per_image"]["total"])
        res["speed_ratio_peer_over_ours"] = round(
            res["peer_fasterrcnn_cpu_s_per_image"] / res["ours_detect_s_per_image"], 2)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
