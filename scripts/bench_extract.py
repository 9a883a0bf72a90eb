"""Benchmark feature extraction; prints one JSON line on stdout.

CPU (default): mobilenet_v2 shared mode, seconds per 500-px image with 2000 boxes, and
warp-mode crops/s on a subset (extrapolated to s/image).
``--device cuda``: warp-mode s/image vs the bare backbone forward on the same pre-made crops
(target: within 1.5x), shared-mode s/image, and crops/s of mobilenet_v2, alexnet and vgg16 in
fp32 and bf16. Per-image figures are steady state (each image seen once before); the
``*_first_call_s`` figures time the first call on each image's size (cuDNN's per-shape kernel
choice, which extraction avoids: see ``features.varying_shapes``).

Images: raccoon test images (../shared/data/raccoon or $RCNN_RACCOON) resized to a 500-px
longer side, else a synthetic image. Boxes: selective search (fast) when available, topped up
with seeded random boxes to ``--boxes``. MobileNetV2 uses ImageNet weights when installed
(``python -m rcnn_cli.weights``), else a random init (speed is the same).

    python scripts/bench_extract.py [--device cpu|cuda] [--images 2] [--boxes 2000]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rcnn_cli import features as F
from rcnn_cli.weights import WeightsError, require_cached_weights


def _images(n: int, side: int) -> tuple[list[np.ndarray], str]:
    for d in (os.environ.get("RCNN_RACCOON"), ROOT.parent / "shared" / "data" / "raccoon",
              ROOT / "shared" / "data" / "raccoon"):
        if d and Path(d, "test.txt").is_file():
            stems = Path(d, "test.txt").read_text().split()[:n]
            out = []
            for s in stems:
                bgr = cv2.imread(str(Path(d, "images", s + ".jpg")))
                if bgr is not None:
                    out.append(bgr[:, :, ::-1].copy())
            if out:
                return [_resize(im, side) for im in out], "raccoon"
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (24, 32, 3)).astype(np.float32)
    img = np.clip(cv2.resize(small, (side, side * 3 // 4), interpolation=cv2.INTER_CUBIC), 0, 255)
    return [img.astype(np.uint8)] * n, "synthetic"


def _resize(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    f = side / max(h, w)
    return cv2.resize(img, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)


def _boxes(img: np.ndarray, n: int, seed: int, use_ss: bool) -> tuple[np.ndarray, str]:
    h, w = img.shape[:2]
    boxes, src = np.zeros((0, 4), np.float32), "random"
    if use_ss:
        try:
            from rcnn_cli.proposals.selective_search import selective_search

            boxes, _ = selective_search(img, "fast", top_k=n)
            src = "selective_search"
        except ImportError:
            pass
    rng = np.random.default_rng(seed)
    k = n - len(boxes)
    if k > 0:
        xy = rng.uniform(0, [w - 20, h - 20], (k, 2))
        wh = rng.uniform(20, [w, h], (k, 2))
        extra = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)
        boxes = np.concatenate([boxes, extra]).astype(np.float32)
    return boxes[:n], src


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev: torch.device, repeat: int = 1) -> float:
    _sync(dev)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(dev)
    return (time.perf_counter() - t) / repeat


def _median_per_image(fe, images, boxes) -> float:
    """Median seconds of ``fe.extract`` over the images."""
    dev = fe.device
    return statistics.median(
        [_timed(lambda im=im, b=b: fe.extract(im, b), dev) for im, b in zip(images, boxes)])


def _first_and_steady(fe, images, boxes) -> tuple[float, float]:
    """(slowest first call on an image's size, median steady call): cuDNN's kernel choice
    per new input shape shows in the first figure only."""
    dev = fe.device
    first = [_timed(lambda im=im, b=b: fe.extract(im, b), dev) for im, b in zip(images, boxes)]
    return max(first), _median_per_image(fe, images, boxes)


def _mobilenet_weights() -> str | None:
    try:
        require_cached_weights(F.BACKBONES["mobilenet_v2"].weights.url)
        return None
    except WeightsError:
        return "random"


def bench_cpu(args, images, boxes) -> dict:
    dev = torch.device("cpu")
    w = _mobilenet_weights()
    out: dict = {"weights": "imagenet" if w is None else "random"}
    sh = F.FeatureExtractor("mobilenet_v2", mode="shared", weights=w, device="cpu")
    sh.extract(images[0], boxes[0][:100])  # warm-up
    out["shared_s_per_image"] = round(_median_per_image(sh, images, boxes), 4)
    # CPU seconds (all threads): a load-independent view when the machine is shared
    c0 = time.process_time()
    for im, b in zip(images, boxes):
        sh.extract(im, b)
    out["shared_cpu_s_per_image"] = round((time.process_time() - c0) / len(images), 4)
    out["load_avg_1min"] = round(os.getloadavg()[0], 2)
    out["shared_settings"] = sh.settings()
    if args.compare_taps:  # the C4 head (tap "pool"): better frozen AP, ~10x the cost
        c4 = F.FeatureExtractor("mobilenet_v2", mode="shared", tap="pool", weights=w,
                                device="cpu")
        c4.extract(images[0], boxes[0][:100])
        out["shared_pool_tap_s_per_image"] = round(_median_per_image(c4, images, boxes), 4)
    # breakdown on the first image: trunk vs RoI pooling + head
    im = images[0]
    with torch.inference_mode():
        h, w_ = im.shape[:2]
        f = F.shared_resize((h, w_), *sh.shared_scale)
        t = torch.nn.functional.interpolate(sh.image_tensor(im), scale_factor=f, mode="bilinear")
        t = t.contiguous(memory_format=torch.channels_last)
        out["shared_trunk_s"] = round(_timed(lambda: sh.trunk(t), dev, 3), 4)
    wp = F.FeatureExtractor("mobilenet_v2", mode="warp", weights=w, device="cpu")
    sub = boxes[0][: args.warp_subset]
    wp.extract(im, sub[:16])
    dt = _timed(lambda: wp.extract(im, sub), dev)
    out["warp_crops_per_s"] = round(len(sub) / dt, 1)
    out["warp_s_per_image_extrapolated"] = round(dt * args.boxes / len(sub), 2)
    dt_crop = _timed(lambda: F.warp_crops_cpu(im, sub, 224), dev, 3)
    out["warp_crop_only_crops_per_s"] = round(len(sub) / dt_crop, 1)
    return out


def bench_cuda(args, images, boxes) -> dict:
    dev = torch.device(args.device)
    w = _mobilenet_weights()
    out: dict = {"gpu": torch.cuda.get_device_name(dev), "weights": "imagenet" if w is None
                 else "random"}
    for amp in (True, False):
        tag = "bf16" if amp else "fp32"
        wp = F.FeatureExtractor("mobilenet_v2", mode="warp", weights=w, device=args.device,
                                amp=amp, batch_size=args.batch_size)
        wp.extract(images[0], boxes[0][:256])
        first_warp, t_warp = _first_and_steady(wp, images, boxes)
        # the bare backbone on the same crops, pre-made and already on the device
        crops = F.warp_crops_roi_align(wp.image_tensor(images[0]),
                                       torch.from_numpy(boxes[0]).to(dev), 224)
        crops = crops.contiguous(memory_format=torch.channels_last)

        def bare(wp=wp, crops=crops):
            with torch.inference_mode(), wp._autocast():
                for i in range(0, len(crops), wp.batch_size):
                    wp.net(crops[i:i + wp.batch_size])

        bare()
        t_bare = _timed(bare, dev, 2)
        out[f"warp_s_per_image_{tag}"] = round(t_warp, 4)
        out[f"warp_first_call_s_{tag}"] = round(first_warp, 4)
        out[f"bare_forward_s_{tag}"] = round(t_bare, 4)
        out[f"warp_over_bare_{tag}"] = round(t_warp / t_bare, 3)
        sh = F.FeatureExtractor("mobilenet_v2", mode="shared", weights=w, device=args.device,
                                amp=amp)
        sh.extract(images[0][:100, :100].copy(), boxes[0][:256] * 0.1)
        first_sh, t_sh = _first_and_steady(sh, images, boxes)
        out[f"shared_s_per_image_{tag}"] = round(t_sh, 4)
        out[f"shared_first_call_s_{tag}"] = round(first_sh, 4)
    rates = {}
    for name in ("mobilenet_v2", "alexnet", "vgg16"):
        for amp in (False, True):
            fe = F.FeatureExtractor(name, mode="warp", weights=w if name == "mobilenet_v2"
                                    else "random", device=args.device, amp=amp,
                                    batch_size=args.batch_size)
            b = boxes[0][: args.gpu_crops]
            fe.extract(images[0], b[:64])
            dt = _timed(lambda fe=fe, b=b: fe.extract(images[0], b), dev)
            rates[f"{name}_{'bf16' if amp else 'fp32'}"] = round(len(b) / dt, 1)
            del fe
            torch.cuda.empty_cache()
    out["warp_crops_per_s"] = rates
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--boxes", type=int, default=2000)
    p.add_argument("--side", type=int, default=500, help="longer side of the images")
    p.add_argument("--warp-subset", type=int, default=200)
    p.add_argument("--gpu-crops", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--random-boxes", action="store_true", help="skip selective search")
    p.add_argument("--compare-taps", action="store_true",
                   help="CPU: also time mobilenet_v2 shared mode with the C4 'pool' tap")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    images, src = _images(args.images, args.side)
    bx = [_boxes(im, args.boxes, i, not args.random_boxes) for i, im in enumerate(images)]
    boxes = [b for b, _ in bx]
    res = {"device": args.device, "images": len(images), "image_source": src,
           "image_sizes": [list(im.shape[:2]) for im in images], "boxes": args.boxes,
           "box_source": bx[0][1], "threads": torch.get_num_threads(),
           "torch": torch.__version__}
    if torch.device(args.device).type == "cuda":
        res.update(bench_cuda(args, images, boxes))
    else:
        res.update(bench_cpu(args, images, boxes))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
