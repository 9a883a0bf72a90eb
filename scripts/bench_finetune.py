"""AP50 of the full R-CNN chain on raccoon with and without fine-tuning, all else equal.

Trains on ``train.txt``, scores on ``test.txt``, through the ``rcnn`` commands (subprocess):

    propose (train + test, once)
    [finetune on train]                         (only the fine-tuned variant)
    extract train                               (--weights FT/backbone.safetensors for "ft")
    train-svm -> detect test -> evaluate        (the same settings for both variants;
                                                 detect recomputes the test proposals)

and prints one JSON line: ``{"ap50_base": ..., "ap50_ft": ..., "seconds": {...}, ...}`` (AP50 =
VOC all-point AP at IoU 0.5; the 11-point VOC07 value is given too). A command that is not
implemented yet is reported in ``"not_ready"`` and its variant's AP is null. ``rcnn finetune``
falls back to :func:`rcnn_cli.finetune.finetune` in-process while the command is a stub.

The command lines of every stage are in :func:`commands`, in one place, to adjust if a flag
is renamed. On a CPU the whole chain is slow (selective search ~2-4 s per image, warp
extraction of 2000 boxes per image is minutes per image): use ``--mode shared`` there
(``auto`` picks it) or ``--limit`` for a smoke run. Usage::

    python scripts/bench_finetune.py --data /work/shared/data/raccoon --work runs/bench_ft \\
        --iterations 2000 --device cuda --workers 16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

RCNN = [sys.executable, "-m", "rcnn_cli"]


def commands(a: argparse.Namespace, w: Path, variant: str) -> dict[str, list[str]]:
    """The command line of each stage of one variant ("base" or "ft")."""
    data, images, v = a.data, str(a.data / "images"), w / variant
    common = ["--device", a.device, "--workers", str(a.workers)]
    weights = ["--weights", str(w / "ft" / "backbone.safetensors")] if variant == "ft" else []
    extract = [*RCNN, "extract", images, "--proposals", str(w / "props"), "--annotations",
               str(data), "--backbone", a.backbone, "--mode", a.extract_mode, *weights, *common]
    return {
        "finetune": [*RCNN, "finetune", "--annotations", str(data), "--proposals",
                     str(w / "props"), "--split", str(w / "train.txt"), "-o", str(w / "ft"),
                     "--backbone", a.backbone, "--mode", a.mode, "--iterations",
                     str(a.iterations), *common],
        "extract_train": [*extract, "--split", str(w / "train.txt"), "-o", str(v / "feats_train")],
        "train_svm": [*RCNN, "train-svm", "--features", str(v / "feats_train"), "-o",
                      str(v / "model"), *common],
        "detect": [*RCNN, "detect", images, "--split", str(w / "test.txt"), "--model",
                   str(v / "model"), "-o", str(v / "det"), *common],  # recomputes proposals
        "evaluate": [*RCNN, "evaluate", "--annotations", str(data), "--detections",
                     str(v / "det"), "--split", str(w / "test.txt"), "-o", str(v / "eval"),
                     "--overwrite"],
    }


class NotReady(RuntimeError):
    """A command that is still a stub (``rcnn X`` exits 2 with "not implemented")."""


def run(cmd: list[str], log: Path) -> tuple[float, str]:
    """Run one command (stderr to ``log``); returns (seconds, stdout)."""
    t = time.perf_counter()
    with open(log, "a") as err:
        err.write("$ " + " ".join(cmd) + "\n")
        err.flush()
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        err.write(p.stderr)
    if p.returncode != 0:
        stub = ("not implemented", "NotImplementedError", "No such option", "No such command")
        if any(s in p.stderr for s in stub):
            raise NotReady(p.stderr.strip().splitlines()[-1])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({p.returncode}): "
                           f"{p.stderr.strip()[-500:]}")
    return time.perf_counter() - t, p.stdout


def finetune_in_process(a: argparse.Namespace, w: Path) -> float:
    """Library fallback for ``rcnn finetune`` (same settings)."""
    from rcnn_cli.datasets import load_dataset
    from rcnn_cli.finetune import FinetuneSettings, finetune, proposals_from_dir

    t = time.perf_counter()
    train = load_dataset(a.data, split=w / "train.txt")
    finetune(train, proposals_from_dir(w / "props"), w / "ft",
             FinetuneSettings(backbone=a.backbone, mode=a.mode, iterations=a.iterations),
             device=a.device, progress=False)
    return time.perf_counter() - t


def ap50(v: Path, stdout: str) -> dict:
    """AP50 from ``v/eval/metrics.json`` (or the JSON evaluate printed)."""
    p = v / "eval" / "metrics.json"
    m = json.loads(p.read_text()) if p.is_file() else json.loads(stdout.strip().splitlines()[-1])
    return {"ap50": m.get("mAP_voc"), "ap50_voc07": m.get("mAP_voc07")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/raccoon"))
    ap.add_argument("--work", type=Path, default=Path("runs/bench_finetune"))
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--mode", default="auto", choices=["auto", "warp", "shared"],
                    help="fine-tuning mode (auto: warp on cuda, shared on cpu)")
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--limit", type=int, default=None, help="first N train/test images")
    a = ap.parse_args()
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    if a.mode == "auto":
        a.mode = "warp" if cuda else "shared"
    a.extract_mode = a.mode  # features as the net was fine-tuned (warp on GPU, shared on CPU)
    w = a.work
    w.mkdir(parents=True, exist_ok=True)
    log = w / "bench.log"
    stems = {s: (a.data / f"{s}.txt").read_text().split()[:a.limit] for s in ("train", "test")}
    for s, st in {**stems, "all": stems["train"] + stems["test"]}.items():
        (w / f"{s}.txt").write_text("\n".join(st) + "\n")

    row: dict = {"data": str(a.data), "train_images": len(stems["train"]),
                 "test_images": len(stems["test"]), "backbone": a.backbone, "mode": a.mode,
                 "iterations": a.iterations, "device": "cuda" if cuda else "cpu",
                 "seconds": {}, "not_ready": [], "log": str(log)}
    secs = row["seconds"]
    secs["propose"], _ = run([*RCNN, "propose", str(a.data / "images"), "-o", str(w / "props"),
                              "--split", str(w / "all.txt"), "--workers", str(a.workers), "-q"],
                             log)
    for variant in ("base", "ft"):
        cmds = commands(a, w, variant)
        row[f"ap50_{variant}"] = None
        try:
            if variant == "ft":
                try:
                    secs["finetune"], _ = run(cmds["finetune"], log)
                except NotReady:
                    row["not_ready"].append("finetune (ran the library function instead)")
                    secs["finetune"] = finetune_in_process(a, w)
            out = ""
            for stage in ("extract_train", "train_svm", "detect", "evaluate"):
                secs[f"{variant}_{stage}"], out = run(cmds[stage], log)
            m = ap50(w / variant, out)
            row[f"ap50_{variant}"], row[f"ap50_voc07_{variant}"] = m["ap50"], m["ap50_voc07"]
        except NotReady as e:
            row["not_ready"].append(f"{variant}: {e}")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
