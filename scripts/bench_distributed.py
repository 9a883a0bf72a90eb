"""Benchmark `rcnn propose` on the local executor vs Dask vs Ray, same folder, same workers.

Each executor proposes boxes for the same images (default: the first 20 raccoon images,
selective search "fast") into a fresh folder, timed end to end as a user's command is
("cold": the process pool / local cluster is started for the run, and its workers import
their libraries). Dask and Ray are also timed "warm": connected (``--address``) to a cluster
that is already running and whose workers have proposed boxes once, which is the steady
state of a real cluster. Every executor's outputs are checked against the local ones.
Prints ONE JSON line on stdout; logs go to stderr.

    python scripts/bench_distributed.py [--images /work/shared/data/raccoon/images]
        [--limit 20] [--workers 2] [--executors local,dask,ray] [--strategy fast]

Falls back to synthetic images when the folder is absent. An executor whose extra is not
installed is reported as skipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rcnn_cli import config
from rcnn_cli.executors import ExecutorError
from rcnn_cli.images import list_images
from rcnn_cli.stages import propose_folder
from rcnn_cli.store import load_npz

log = logging.getLogger("bench_distributed")
DEFAULT_IMAGES = Path("/work/shared/data/raccoon/images")


def synthetic_images(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` 300 x 400 images of flat rectangles on noise (when no real folder is present)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        img = rng.integers(0, 40, (300, 400, 3), dtype=np.uint8)
        for _ in range(6):
            x, y = int(rng.integers(0, 340)), int(rng.integers(0, 240))
            img[y:y + int(rng.integers(20, 120)), x:x + int(rng.integers(20, 160))] = \
                rng.integers(0, 256, 3)
        Image.fromarray(img).save(root / f"synthetic_{i:03d}.png")
    return root


def _warm() -> None:
    """Import the proposal code and compile/load its JIT kernels in this (worker) process."""
    from rcnn_cli.proposals import propose

    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    propose(img, method="selective_search", strategy="fast")


def run(images: Path, out: Path, executor: str, workers: int, strategy: str,
        address: str = "") -> dict:
    """Propose over ``images`` into ``out``; seconds, images/s, done, failed."""
    cfg = config.load(overrides={"common": {"executor": executor, "workers": workers,
                                            "address": address},
                                 "propose": {"strategy": strategy}})
    t0 = time.perf_counter()
    report = propose_folder([images], out, cfg)
    s = time.perf_counter() - t0
    return {"seconds": round(s, 2), "images_per_s": round(report.done / s, 3),
            "done": report.done, "failed": report.failed}


def same_as(a: Path, b: Path) -> bool:
    """True if both folders hold the same per-image arrays."""
    names = sorted(p.name for p in a.glob("*.npz"))
    if names != sorted(p.name for p in b.glob("*.npz")):
        return False
    for n in names:
        x, y = load_npz(a / n), load_npz(b / n)
        if x.keys() != y.keys() or any(not np.array_equal(x[k], y[k]) for k in x):
            return False
    return True


def warm_dask(images: Path, tmp: Path, workers: int, strategy: str) -> dict:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        client.run(_warm)
        return run(images, tmp / "dask_warm", "dask", workers, strategy,
                   address=cluster.scheduler_address)


def warm_ray(images: Path, tmp: Path, workers: int, strategy: str) -> dict:
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        ray.get([ray.remote(_warm).remote() for _ in range(workers)])
        return run(images, tmp / "ray_warm", "ray", workers, strategy)
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--limit", type=int, default=20, help="first N images (sorted)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--executors", default="local,dask,ray")
    ap.add_argument("--strategy", default="fast", help="selective search strategy")
    ap.add_argument("--no-warm", action="store_true", help="skip the warm-cluster runs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(name)s: %(message)s")
    for noisy in ("distributed", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    tmp = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    try:
        src = args.images
        if not src.is_dir():
            src = synthetic_images(tmp, args.limit)
        folder = tmp / "images"
        folder.mkdir(exist_ok=True)
        for it in list_images([src])[:args.limit]:
            shutil.copy(it.path, folder / Path(it.rel).name)
        n = len(list(folder.iterdir()))
        result: dict = {"images": n, "source": str(src if src == args.images else "synthetic"),
                        "workers": args.workers, "strategy": args.strategy,
                        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
        ref = None
        for ex in args.executors.split(","):
            out = tmp / f"out_{ex}"
            try:
                r = run(folder, out, ex, args.workers, args.strategy)
                if ex != "local" and not args.no_warm:
                    warm = (warm_dask if ex == "dask" else warm_ray)(folder, tmp, args.workers,
                                                                      args.strategy)
                    r["warm"] = warm
            except ExecutorError as e:
                r = {"skipped": str(e)}
            else:
                ref = ref or out
                r["same_as_first"] = same_as(ref, out)
            result[ex] = r
            log.info("%s: %s", ex, r)
        result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
        print(json.dumps(result))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
