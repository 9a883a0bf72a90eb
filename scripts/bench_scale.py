"""Disk and memory of a compact training store at 10 000 images (`rcnn extract --keep train`).

Builds a replicated dataset of ``--images`` training images from a full extract store of a
real dataset (``--full``: the output of ``rcnn extract --keep all --annotations``, e.g.
raccoon's 160 training images): copy ``i`` is source image ``i mod n`` under the identity
``copies/<i>/<name>``, its boxes mirrored left-right on odd copies. Each copy's record goes
through the library's writer exactly as ``rcnn extract --keep train`` writes it
(:func:`rcnn_cli.compact.compact_record`, the same row selection, seeded by the copy's own
identity, then :meth:`rcnn_cli.store.StageStore.save`), so the store's size is that of a real
compact store of that many images.

What is simulated: the CNN. The features of a copy are the source image's features (the
shared-mode CNN costs 0.3 s/image unloaded and several seconds on 2 loaded cores, 10 000
images would take hours); mirrored copies keep the unmirrored features, so the copies are
harder to separate than real flipped images. Then ``rcnn train-svm`` (default settings, fc
head for mobilenet_v2 ``grid``) runs on the store in a child process, whose peak RSS
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``) and wall time are reported.

Prints one JSON line: images, disk bytes per image (compact and full), peak RSS of
train-svm, seconds per image of writing and of training. Targets (issue 16): peak RSS
<= 4 GB, disk <= 1 MB/image.

    python scripts/bench_scale.py --full runs/feats --images 10000 --work /tmp/bench_scale
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rcnn_cli import config
from rcnn_cli.compact import compact_record, keep_settings
from rcnn_cli.stages import EXTRACT_FORMAT
from rcnn_cli.store import StageStore, open_upstream


def mirror(boxes: np.ndarray, width: int) -> np.ndarray:
    """Boxes (N, 4) x1y1x2y2 mirrored left-right in an image ``width`` pixels wide."""
    out = boxes.copy()
    out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return out


def store_size(out: Path, n_images: int) -> dict:
    """Sizes of an existing replicated store (``--reuse``)."""
    sizes = [p.stat().st_size for p in (out / "copies").rglob("*.npz")]
    if len(sizes) != n_images:
        raise SystemExit(f"{out}: holds {len(sizes)} images, not {n_images}")
    keep = json.loads((out / "manifest.json").read_text())["settings"]["keep"]
    return {"write_s_per_image": None, "disk_bytes_per_image": sum(sizes) // n_images,
            "full_bytes_per_image": None, "keep": keep}


def build_store(full_dir: Path, out: Path, n_images: int, extract: dict) -> dict:
    """Write ``n_images`` replicated compact records into ``out``; sizes and seconds."""
    full = open_upstream(full_dir, "extract")
    rels = full.done_rels()
    if not rels or not full.settings.get("classes"):
        raise SystemExit(f"{full_dir}: no records, or extracted without --annotations")
    if "keep" in full.settings:
        raise SystemExit(f"{full_dir}: a compact store; --full needs `--keep all`")
    keep = keep_settings(extract, annotated=True, images=n_images)
    store = StageStore.create(out, "extract", {**full.settings, "keep": keep},
                              upstream_key=full.upstream_key, format_version=EXTRACT_FORMAT,
                              overwrite=True)
    cache: dict[str, dict] = {}
    full_bytes = disk = 0
    t0 = time.perf_counter()
    for i in range(n_images):
        rel = rels[i % len(rels)]
        if rel not in cache:
            cache.clear()  # one source record in memory
            cache[rel] = full.load(rel)
        rec = dict(cache[rel])
        full_bytes += full.path_for(rel).stat().st_size
        if (i // len(rels)) % 2:
            w = int(rec["image_size"][1])
            rec["boxes"], rec["gt_boxes"] = mirror(rec["boxes"], w), mirror(rec["gt_boxes"], w)
        copy = f"copies/{i:06d}/{rel}"
        disk += store.save(copy, compact_record(rec, keep, copy)).stat().st_size
    return {"write_s_per_image": round((time.perf_counter() - t0) / n_images, 4),
            "disk_bytes_per_image": disk // n_images,
            "full_bytes_per_image": full_bytes // n_images, "keep": keep}


def train(features: Path, model: Path) -> dict:
    """`rcnn train-svm` in a child process: its peak RSS and wall time."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = r0.ru_maxrss
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rcnn_cli", "train-svm", "--features", str(features),
                    "-o", str(model), "--overwrite", "--device", "cpu"], check=True,
                   cwd=ROOT)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = r1.ru_maxrss  # KiB on Linux
    if peak <= before:
        print("warning: the child's peak RSS may be masked by an earlier child", file=sys.stderr)
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    return {"train_svm_s": round(seconds, 1), "train_svm_cpu_s": round(cpu, 1),
            "train_svm_peak_rss_bytes": peak * 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", required=True, type=Path,
                    help="extract folder made with --keep all --annotations (the sources)")
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/rcnn_bench_scale"))
    ap.add_argument("--keep-work", action="store_true", help="do not delete the store")
    ap.add_argument("--reuse", action="store_true",
                    help="train on the store a --keep-work run left in --work")
    ap.add_argument("--keep-near-iou", type=float, default=None,
                    help="[extract] keep_near_iou (default: the config's, 0 = by the size)")
    a = ap.parse_args()
    cfg = config.load(overrides={"extract": {"keep_near_iou": a.keep_near_iou}})
    feats, model = a.work / "feats", a.work / "model"
    res = (store_size(feats, a.images) if a.reuse
           else build_store(a.full, feats, a.images, cfg["extract"]))
    res.update(train(feats, model))
    stats = json.loads((model / "model.json").read_text())["training_stats"]
    gb = 1 << 30
    print(json.dumps({
        "images": a.images, "disk_bytes_per_image": res["disk_bytes_per_image"],
        "full_store_bytes_per_image": res["full_bytes_per_image"],
        "disk_total_gb": round(res["disk_bytes_per_image"] * a.images / gb, 2),
        "train_svm_peak_rss_gb": round(res["train_svm_peak_rss_bytes"] / gb, 2),
        "train_svm_s_per_image": round(res["train_svm_s"] / a.images, 4),
        "train_svm_s": res["train_svm_s"], "train_svm_cpu_s": res["train_svm_cpu_s"],
        "write_s_per_image": res["write_s_per_image"],
        "head_windows": (stats.get("head") or {}).get("windows"), "keep": res["keep"],
        "targets": {"disk_bytes_per_image": 1 << 20, "train_svm_peak_rss_gb": 4}}))
    if not (a.keep_work or a.reuse):
        shutil.rmtree(feats, ignore_errors=True)


if __name__ == "__main__":
    main()
