"""Folder-level drivers of the per-image stages (propose, extract).

Each driver resolves its stage store (settings key, resume), writes the resolved config into
the output folder, and maps a plain per-image function over the images with
:func:`rcnn_cli.runner.run_stage`. The per-image functions are top-level and take only
picklable arguments, so a process pool or a cluster executor can run them unchanged.
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rcnn_cli import config as cfgmod
from rcnn_cli.images import ImageItem, list_images, read_image
from rcnn_cli.runner import Report, run_stage
from rcnn_cli.store import StageStore, open_upstream

log = logging.getLogger("rcnn_cli.stages")

PROPOSE_FORMAT = 1
EXTRACT_FORMAT = 1


# ------------------------------------------------------------------ propose
def proposal_settings(p: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of the [propose] section that determine the boxes (cache key)."""
    s = {"method": p["method"], "max_side": p["max_side"], "min_size": p["min_size"],
         "top_k": p["top_k"], "seed": p["seed"]}
    if p["method"] in ("selective_search", "opencv"):
        s["strategy"] = p["strategy"]
    else:
        s.update(scales=list(p["sliding_scales"]), ratios=list(p["sliding_ratios"]),
                 stride=p["sliding_stride"])
    return s


def compute_proposals(image: np.ndarray, settings: Mapping[str, Any]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4) and scores (N,) of one image with :func:`proposal_settings` settings."""
    from rcnn_cli.proposals import propose

    s = dict(settings)
    method = s.pop("method")
    return propose(image, method=method, **s)


def propose_one(item: ImageItem, store: StageStore) -> dict:
    """Per-image work of `rcnn propose`: decode, propose, write the npz."""
    t0 = time.perf_counter()
    img = read_image(item.path)
    t1 = time.perf_counter()
    boxes, scores = compute_proposals(img, store.settings)
    store.save(item.stem_rel, {"boxes": boxes.astype(np.float32),
                               "scores": scores.astype(np.float32),
                               "image_size": np.array(img.shape[:2], np.int64)})
    return {"times": {"decode": t1 - t0, "propose": time.perf_counter() - t1},
            "n": len(boxes)}


def propose_folder(inputs: list[str | Path], out: str | Path, cfg: Mapping[str, Any],
                   split: str | Path | None = None, overwrite: bool = False) -> Report:
    """Run selective search (or the configured method) over folders of images into ``out``."""
    store = StageStore(out, "propose", proposal_settings(cfg["propose"]),
                       format_version=PROPOSE_FORMAT, overwrite=overwrite)
    cfgmod.write_resolved(out, cfg, ["common", "propose"])
    items = list_images(inputs, split=split)
    fn = functools.partial(propose_one, store=store)
    return run_stage(fn, items, is_done=lambda it: store.is_done(it.stem_rel),
                     workers=cfg["common"]["workers"], desc="propose")


# ------------------------------------------------------------------ extract
def extract_folder(inputs, proposals_dir, out, cfg, annotations=None, split=None,
                   overwrite=False) -> Report:  # filled in by the extract issue
    raise NotImplementedError
