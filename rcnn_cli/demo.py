"""`rcnn demo`: the whole chain on a dataset, by default one it builds itself.

propose -> extract -> train-svm -> detect -> evaluate, each through the same library
function its subcommand calls, in one output folder::

    OUT/data/        the dataset (built by rcnn_cli.demo_data unless --data is given)
    OUT/proposals/   OUT/features/   OUT/model/   OUT/detections/ (with vis/)   metrics.json
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rcnn_cli.cpus import available_cpus
from rcnn_cli.datasets import find_split_file, load_dataset

log = logging.getLogger("rcnn_cli.demo")


#: `rcnn demo` without --workers runs selective search in at most this many processes (its
#: 48 images gain little from more, and each process costs a start-up)
DEMO_MAX_WORKERS = 4


def demo_workers() -> int:
    """Selective-search processes `rcnn demo` uses when neither --workers nor a config file
    sets them: the CPUs this process may use (affinity and CPU quota:
    :func:`rcnn_cli.cpus.available_cpus`), at most :data:`DEMO_MAX_WORKERS` (every other
    command keeps the default of 1). Only proposing: on the demo's 32 training and 16
    test images, starting CNN worker processes (torch import, model load) cost more than they
    saved (extract 4.4 -> 9.3 s, detect 11.2 -> 12.9 s on 2 cores), while selective search
    on its 48 images went from 19.5 to 9.9-10.7 s."""
    return max(1, min(available_cpus(), DEMO_MAX_WORKERS))


def _split_files(data: Path, out: Path, seed: int) -> tuple[Path, Path]:
    """train/test split files of a VOC folder: its own when present, else a seeded 80/20."""
    tr, te = find_split_file(data, "train"), find_split_file(data, "test")
    if tr is not None and te is not None:
        return tr, te
    import numpy as np

    stems = [r.stem for r in load_dataset(data).records]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(stems))
    n_test = max(1, len(stems) // 5)
    test = sorted(stems[i] for i in order[:n_test])
    train = sorted(stems[i] for i in order[n_test:])
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text("\n".join(train) + "\n")
    (out / "test.txt").write_text("\n".join(test) + "\n")
    return out / "train.txt", out / "test.txt"


def run_demo(out: str | Path, cfg: Mapping[str, Any], data: str | Path | None = None,
             overwrite: bool = False, save_vis: bool = True,
             propose_workers: int | None = None) -> dict[str, Any]:
    """Run the whole chain; return a summary dict (mAP, paths, seconds per stage).
    ``propose_workers``: processes for selective search (None: ``cfg``'s workers).

    Raises:
        RuntimeError: a stage failed on some images (its report is in the message).
    """
    from rcnn_cli.detect import detect_folder
    from rcnn_cli.evaluate import evaluate_folder
    from rcnn_cli.stages import extract_folder, propose_folder
    from rcnn_cli.train import is_trained, train_model

    out = Path(out)
    times: dict[str, float] = {}
    t = time.perf_counter()
    if data is None:
        from rcnn_cli.demo_data import make_demo_dataset

        data = make_demo_dataset(out / "data")
    data = Path(data)
    times["dataset"] = time.perf_counter() - t
    train_split, test_split = _split_files(data, out / "splits", seed=0)
    ds = load_dataset(data)
    images = [str(ds.image_root)]

    def check(report, stage):
        if report.failures:
            raise RuntimeError(f"{stage}: {report.failed} image(s) failed, e.g. "
                               f"{report.failures[0][0]}: {report.failures[0][1]}")

    @contextlib.contextmanager
    def timed(stage):
        t0 = time.perf_counter()
        yield
        times[stage] = time.perf_counter() - t0

    with timed("propose"):
        pcfg = cfg if propose_workers is None else {
            **cfg, "common": {**cfg["common"], "workers": propose_workers}}
        check(propose_folder(images, out / "proposals", pcfg, overwrite=overwrite), "propose")
    with timed("extract"):
        check(extract_folder(images, out / "proposals", out / "features", cfg,
                             annotations=data, split=train_split, overwrite=overwrite),
              "extract")
    with timed("train_svm"):
        if not is_trained(out / "features", out / "model", cfg):  # a rerun resumes
            train_model(out / "features", out / "model", cfg, overwrite=True)
    with timed("detect"):
        # the test images' proposals were made with the training ones: not computed twice
        check(detect_folder(images, out / "model", out / "detections", cfg, split=test_split,
                            save_vis=save_vis, overwrite=True, proposals=out / "proposals"),
              "detect")
    with timed("evaluate"):
        metrics, mpath = evaluate_folder(data, out / "detections", None, test_split,
                                         out / "detections", cfg)
    vis = sorted((out / "detections" / "vis").rglob("*.jpg")) if save_vis else []
    return {"data": str(data), "metrics": str(mpath), "mAP_voc07": metrics["mAP_voc07"],
            "mAP_voc": metrics["mAP_voc"], "coco_AP": metrics["coco"].get("AP"),
            "summary": metrics["summary"], "pictures": [str(p) for p in vis],
            "seconds": {k: round(v, 1) for k, v in times.items()}}
