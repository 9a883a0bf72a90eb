"""Folder-level drivers of the per-image stages (propose, extract).

Each driver checks its folders, resolves its stage store (settings key) and hands it, with
a plain per-image function, to :func:`rcnn_cli.runner.run_stage_into` (claim the folder,
write the resolved config, resume, shard, map). The per-image functions are top-level and
take only picklable arguments, so a process pool or a cluster executor can run them
unchanged.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rcnn_cli import config as cfgmod
from rcnn_cli.compact import compact_rows, keep_settings
from rcnn_cli.images import ImageItem, list_images, read_image
from rcnn_cli.runner import Report, run_stage_into
from rcnn_cli.store import (
    StageStore,
    check_output_folder,
    check_stage_folder,
    file_identity,
    open_upstream,
)

log = logging.getLogger("rcnn_cli.stages")

#: 2: files keyed by the relative path with extension (``OUT/sub/img.jpg.npz``) and
#: carrying their identity entries (see :mod:`rcnn_cli.store`)
PROPOSE_FORMAT = 2
EXTRACT_FORMAT = 2


def execution(cfg: Mapping[str, Any], device_type: str = "cpu") -> dict[str, Any]:
    """run_stage_into's executor arguments from the [common] section (one local process drives
    a GPU: its workers would compete for it)."""
    c = cfg["common"]
    workers = c["workers"] if device_type == "cpu" or c["executor"] != "local" else 1
    return {"workers": workers, "executor": c["executor"], "address": c["address"] or None,
            "shard": c["shard"] or None}


# ------------------------------------------------------------------ propose
def proposal_settings(p: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of the [propose] section that determine the boxes (cache key): the
    ``method`` and exactly the keyword arguments its back-end takes (see
    :data:`rcnn_cli.proposals.METHODS`)."""
    method = p["method"]
    s: dict[str, Any] = {"method": method, "min_size": p["min_size"], "top_k": p["top_k"]}
    if method == "selective_search":
        s.update(strategy=p["strategy"], max_side=p["max_side"], seed=p["seed"])
    elif method == "opencv":  # OpenCV's switchTo... strategies carry the same three names
        s.update(mode=p["strategy"], max_side=p["max_side"], seed=p["seed"])
    else:  # sliding windows: geometry only (no resizing, no random ranking)
        s.update(scales=list(p["sliding_scales"]), aspect_ratios=list(p["sliding_ratios"]),
                 stride_frac=p["sliding_stride"])
    return s


#: [propose] keys that only some methods read (all read method, min_size, top_k)
METHOD_KEYS = {"selective_search": ("strategy", "max_side", "seed"),
               "opencv": ("strategy", "max_side", "seed"),
               "sliding": ("sliding_scales", "sliding_ratios", "sliding_stride")}


def unused_propose_keys(method: str, keys: Iterable[str]) -> list[str]:
    """The ``keys`` of [propose] (in order) that ``method`` does not read: given explicitly
    they would do nothing (the CLI and the API warn)."""
    own = {k for ks in METHOD_KEYS.values() for k in ks}
    return [k for k in keys if k in own and k not in METHOD_KEYS[method]]


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
    source = file_identity(item.path)  # before reading: a file replaced meanwhile is redone
    img = read_image(item.path)
    t1 = time.perf_counter()
    boxes, scores = compute_proposals(img, store.settings)
    store.save(item.rel, {"boxes": boxes.astype(np.float32),
                          "scores": scores.astype(np.float32),
                          "image_size": np.array(img.shape[:2], np.int64)}, source=source)
    return {"times": {"decode": t1 - t0, "propose": time.perf_counter() - t1},
            "n": len(boxes)}


#: What a local pool's workers import, by stage: the pool's forkserver imports it once, beside
#: this process's own start-up (:func:`rcnn_cli.executors.start_local_pool`).
POOL_PRELOAD = {
    "propose": ("rcnn_cli.stages", "rcnn_cli.proposals._warm"),
    "extract": ("rcnn_cli.stages", "rcnn_cli.features", "rcnn_cli._gridpool"),
    "detect": ("rcnn_cli.detect", "rcnn_cli.features", "rcnn_cli._gridpool",
               "rcnn_cli.proposals._warm"),
}


#: The environment variable naming, for :mod:`rcnn_cli._pool_detector` in the pool's server,
#: the model bundle and extractor arguments of ``rcnn detect``: JSON ``{"model_dir": str,
#: "extractor_kwargs": {...}}``.
POOL_DETECTOR_ENV = "RCNN_CLI_POOL_DETECTOR"


def start_pool(cfg: Mapping[str, Any], stage: str, workers: int | None = None,
               selective_search: bool = True, grid_kernel: bool = True,
               detector: tuple[str, Mapping[str, Any]] | None = None) -> None:
    """Start the local pool's forkserver now when ``stage`` will run in one (local executor,
    more than ``1`` of ``workers``, default ``cfg``'s). Called once the inputs are checked
    and before this process imports torch, so that the server's imports overlap its own
    (``rcnn detect --workers 2`` on 40 images: 31.9 -> 24.4 s, with the warm-up and freeze
    of :func:`~rcnn_cli.executors.start_local_pool`). ``selective_search=False``: the workers
    run none (sliding windows, precomputed or dense boxes), so it is not warmed;
    ``grid_kernel=False``: their features need no summed-area kernel (another tap, dense
    windows), so :mod:`rcnn_cli._gridpool` is not loaded (0.9-1.3 s of numba's machinery
    where selective search is not warmed, 0.02 s where it is). ``detector``: (model folder,
    extractor arguments) of ``rcnn detect`` on the CPU, which the server loads and builds
    once for every worker (:mod:`rcnn_cli._pool_detector`); only where no CUDA device can be
    there (a server that started CUDA could not fork safely)."""
    # extract on a GPU runs in one process (:func:`execution`); detect's pool feeds the GPU
    device = "cuda" if stage == "extract" and cfg["common"]["device"].startswith("cuda") else "cpu"
    n = execution(cfg, device)["workers"] if workers is None else workers
    if cfg["common"]["executor"] != "local" or n <= 1:
        return
    from rcnn_cli.executors import start_local_pool

    preload = POOL_PRELOAD[stage]
    if not selective_search or (stage == "propose"
                                and cfg["propose"]["method"] != "selective_search"):
        preload = tuple(m for m in preload if m != "rcnn_cli.proposals._warm")
    if not grid_kernel:
        preload = tuple(m for m in preload if m != "rcnn_cli._gridpool")
    env = None
    if detector is not None:
        preload = (*preload, "rcnn_cli._pool_detector")
        spec = {"model_dir": detector[0], "extractor_kwargs": detector[1]}
        env = {POOL_DETECTOR_ENV: json.dumps(spec, default=str)}
    start_local_pool(preload, env)


#: `rcnn propose` and `rcnn detect` without ``--workers`` (nor ``[common] workers`` in a config
#: file) run each image's selective search in one process per usable CPU, at most this many,
#: and at most one per :data:`AUTO_WORKER_BYTES` of memory ...
AUTO_MAX_WORKERS = 8
#: ... (a CPU detect process holding torch and mobilenet_v2 peaked at 0.55-0.68 GB RSS on
#: raccoon; propose's processes need less, but the bound is kept simple)
AUTO_WORKER_BYTES = 1 << 30
#: ... for folders of at least this many images; fewer run in one process: a pool's start-up
#: (its server imports torch and numba, ~4.5 s) costs more than it saves (detect on 2 cores
#: saves ~0.25 s per image: 40 images 22.3 -> 15.3 s, break-even ~10 images).
AUTO_MIN_IMAGES = 12


def with_auto_workers(cfg: Mapping[str, Any], items: list[ImageItem],
                      per_image_cpu: bool = True) -> dict[str, Any]:
    """``cfg`` with ``[common] workers`` chosen for a local stage over ``items`` (its shard's
    share counts) whose per-image work is ``per_image_cpu`` (one thread: selective search):
    one process per usable CPU (:func:`rcnn_cli.cpus.available_cpus`: affinity and CPU
    quota), at most :data:`AUTO_MAX_WORKERS`, one per image and one per
    :data:`AUTO_WORKER_BYTES` of memory (:func:`rcnn_cli.cpus.available_memory`: the cgroup
    limit too); 1 below :data:`AUTO_MIN_IMAGES` images, for work that torch's threads
    already spread (precomputed, sliding or dense boxes), and for other executors (their
    ``--workers`` sizes a cluster)."""
    from rcnn_cli.cpus import available_cpus, available_memory
    from rcnn_cli.runner import shard_items

    n, c = 1, cfg["common"]
    n_images = len(shard_items(items, c["shard"] or None))
    if c["executor"] == "local" and per_image_cpu and n_images >= AUTO_MIN_IMAGES:
        n = max(1, min(available_cpus(), AUTO_MAX_WORKERS, n_images,
                       available_memory() // AUTO_WORKER_BYTES))
    return {**cfg, "common": {**c, "workers": n}}


def propose_folder(inputs: list[str | Path], out: str | Path, cfg: Mapping[str, Any],
                   split: str | Path | None = None, overwrite: bool = False,
                   auto_workers: bool = False) -> Report:
    """Run selective search (or the configured method) over folders of images into ``out``.

    ``out`` must not be, lie inside or contain an input, nor hold files rcnn did not write,
    unless ``overwrite`` (see :func:`rcnn_cli.store.check_output_folder`). ``auto_workers``:
    choose ``cfg``'s workers from the folder (:func:`with_auto_workers`; the CLI's default);
    the report's ``workers`` says how many ran.
    """
    check_output_folder(out, inputs, overwrite)
    items = list_images(inputs, split=split, exclude=[out])
    if auto_workers:
        cfg = with_auto_workers(cfg, items, cfg["propose"]["method"] != "sliding")
    start_pool(cfg, "propose")
    store = StageStore(out, "propose", proposal_settings(cfg["propose"]),
                       format_version=PROPOSE_FORMAT)
    fn = functools.partial(propose_one, store=store)
    return run_stage_into(store, fn, items, overwrite=overwrite, desc="propose",
                          write_settings=functools.partial(cfgmod.write_resolved, out, cfg,
                                                           ["common", "propose"]),
                          **execution(cfg))


def with_upstream(items: list[ImageItem], up_ids: Mapping[str, str | None],
                  shard: str | None) -> tuple[list[ImageItem], list[ImageItem]]:
    """``shard``'s images that have an up-to-date upstream record, and those that have none
    (the caller runs the first list without a shard: it is cut here).

    The shard is cut from all the images first, so a shard holds the same images whatever the
    upstream folder holds, and each shard reports only its own missing images.
    """
    from rcnn_cli.runner import shard_items

    mine = shard_items(items, shard)
    return ([it for it in mine if up_ids[it.rel] is not None],
            [it for it in mine if up_ids[it.rel] is None])


def upstream_missing_reason(upstream: StageStore, item: ImageItem) -> str:
    """Why ``item`` has no up-to-date record in ``upstream`` (for the failure line)."""
    try:
        file_identity(item.path)
    except OSError as e:
        return f"cannot read the image ({e.strerror or e})"
    if upstream.record_id(item.rel) is not None:
        return f"proposals made from an older version of this image in {upstream.root}"
    return f"no proposals in {upstream.root}"


def upstream_id(upstream: StageStore, item: ImageItem) -> str | None:
    """Id of the upstream record of ``item`` if it was made from the image as it is now."""
    try:
        source = file_identity(item.path)
    except OSError:
        return None
    return upstream.record_id(item.rel, source=source)


# ------------------------------------------------------------------ extract
_EXTRACTORS: dict[str, Any] = {}


def extractor_kwargs(e: Mapping[str, Any], device: str) -> dict[str, Any]:
    """FeatureExtractor arguments from the [extract] section and the device."""
    w = e["weights"] or None
    if w and w != "random":
        w = str(Path(w).resolve())  # the key and the model bundle must not depend on the cwd
    kw = {"backbone": e["backbone"], "tap": e["tap"] or None, "weights": w, "mode": e["mode"], "device": device,
          "padding": e["padding"], "batch_size": e["batch_size"]}
    scale = [int(v) for v in e.get("shared_scale", ())]
    if scale and scale != cfgmod.default("extract.shared_scale"):  # default: keys stay as before
        kw["shared_scale"] = scale
    return kw


def get_extractor(kwargs: Mapping[str, Any]):
    """One FeatureExtractor per process and settings (workers load the backbone once)."""
    from rcnn_cli.features import FeatureExtractor

    key = json.dumps(kwargs, sort_keys=True, default=str)
    if key not in _EXTRACTORS:
        _EXTRACTORS.clear()
        _EXTRACTORS[key] = FeatureExtractor(**kwargs)
    return _EXTRACTORS[key]


#: FeatureExtractor arguments :func:`cpu_feature_settings` knows (others: load the backbone).
_TORCHLESS_KWARGS = {"backbone", "tap", "mode", "weights", "device", "padding", "shared_scale",
                     "batch_size", "seed"}


def cpu_feature_settings(kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    """``FeatureExtractor(**kwargs).settings()`` without importing torch, for an extractor that
    runs on the CPU: the key of ``rcnn detect``'s store when its driver leaves the backbone
    to the pool's processes. None when that cannot be told without torch or an argument is
    visibly wrong (a CUDA device may be there, unknown arguments or backbone, a bad tap or
    mode, ImageNet weights missing or corrupt, a weights file missing): then the driver
    loads the extractor, which says what is wrong. A weights file that exists but does not
    load fails each image in the workers instead."""
    from rcnn_cli.backbones import (
        FACTS,
        SHARED_MAX,
        SHARED_ONLY_TAPS,
        SHARED_SHORT,
        TAPS,
        feature_settings,
        resolved_tap,
        weights_id,
    )
    from rcnn_cli.cpus import cuda_possible

    if set(kwargs) - _TORCHLESS_KWARGS:
        return None
    device = kwargs.get("device", cfgmod.default("common.device"))
    if device != "cpu" and not (device == "auto" and not cuda_possible()):
        return None
    backbone = kwargs.get("backbone", cfgmod.default("extract.backbone"))
    mode = kwargs.get("mode", cfgmod.default("extract.mode"))
    mode = "shared" if mode == "auto" else mode
    if backbone not in FACTS or mode not in ("warp", "shared"):
        return None
    tap = resolved_tap(backbone, kwargs.get("tap"), mode)
    if tap not in TAPS[backbone] or (mode == "warp" and (backbone, tap) in SHARED_ONLY_TAPS):
        return None
    weights = kwargs.get("weights")
    if weights is None:
        from rcnn_cli.weights import WeightsError, require_cached_weights

        try:
            require_cached_weights(FACTS[backbone][5])
        except WeightsError:
            return None
    elif str(weights) != "random" and not Path(weights).is_file():
        return None
    scale = kwargs.get("shared_scale", (SHARED_SHORT, SHARED_MAX))
    return feature_settings(backbone, tap, mode, weights_id(weights, backbone,
                                                            kwargs.get("seed", 0)),
                            float(kwargs.get("padding", cfgmod.default("extract.padding"))),
                            (int(scale[0]), int(scale[1])), amp=False)


def dataset_fingerprint(records) -> str:
    """Hash of ground truth (file names, boxes, labels, difficult) for cache keys."""
    h = hashlib.sha256()
    for r in records:
        h.update(r.file_name.encode())
        for a in (r.boxes, r.labels, r.difficult):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def extract_one(item: ImageItem, store: StageStore, upstream: StageStore,
                kwargs: Mapping[str, Any], gt: Mapping[str, Any] | None,
                max_proposals: int, dtype: str, keep: Mapping[str, Any] | None = None) -> dict:
    """Per-image work of `rcnn extract`: decode, read proposals, add ground truth, keep the
    rows ``keep`` selects (:mod:`rcnn_cli.compact`; None: all), features."""
    t0 = time.perf_counter()
    source = file_identity(item.path)
    up_id = upstream.record_id(item.rel, source=source)
    if up_id is None:
        raise ValueError(f"no up-to-date proposals in {upstream.root} (image changed or not "
                         "proposed: rerun `rcnn propose`)")
    img = read_image(item.path)
    props = upstream.load(item.rel)["boxes"][:max_proposals]
    rec = gt.get(item.rel) if gt is not None else None
    if rec is not None:
        gtb, gtl, gtd = rec.boxes, rec.labels, rec.difficult
    else:
        gtb, gtl, gtd = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool)
    boxes = np.concatenate([gtb, props]).astype(np.float32)
    gt_label = np.concatenate([gtl.astype(np.int32), np.full(len(props), -1, np.int32)])
    kept = compact_rows(keep or {}, item.rel, boxes, gt_label, gtb)
    extra = {} if kept is None else {"kept_rows": kept.astype(np.int32),
                                     "num_windows": np.int64(len(boxes))}
    if kept is not None:
        boxes, gt_label = boxes[kept], gt_label[kept]
    t1 = time.perf_counter()
    feats = get_extractor(kwargs).extract(img, boxes)
    t2 = time.perf_counter()
    store.save(item.rel, {"boxes": boxes, "features": feats.astype(dtype),
                          "gt_label": gt_label, "gt_boxes": gtb.astype(np.float32),
                          "gt_labels": gtl.astype(np.int64), "gt_difficult": gtd,
                          "image_size": np.array(img.shape[:2], np.int64), **extra},
               source=source, upstream=up_id)
    return {"times": {"decode": t1 - t0, "features": t2 - t1}}


def extract_folder(inputs: list[str | Path], proposals_dir: str | Path, out: str | Path,
                   cfg: Mapping[str, Any], annotations: str | Path | None = None,
                   split: str | Path | None = None, overwrite: bool = False) -> Report:
    """Features of every proposal (and ground-truth box, with ``annotations``) per image."""
    from rcnn_cli.datasets import match_annotations

    e = cfg["extract"]
    check_output_folder(out, [proposals_dir], overwrite=False, what="-o, --proposals")
    check_output_folder(out, inputs, overwrite)
    check_stage_folder(out, overwrite)  # before loading the backbone
    items = list_images(inputs, split=split, exclude=[out])
    ds = None
    if annotations is not None:  # paired with these images up front: no match, no work
        ds, _ = match_annotations(items, annotations, split=split)
    upstream = open_upstream(proposals_dir, "propose")
    kwargs = extractor_kwargs(e, cfg["common"]["device"])
    start_pool(cfg, "extract")
    ext = get_extractor(kwargs)
    kwargs["mode"], kwargs["tap"] = ext.mode, ext.tap  # resolved: the key names what ran
    settings = {"features": ext.settings(), "dtype": e["dtype"],
                "max_proposals": e["max_proposals"], "proposals": dict(upstream.settings),
                "extractor": {k: v for k, v in kwargs.items()
                              if k not in ("device", "batch_size")}}
    gt = None
    if ds is not None:
        gt = ds.by_name()  # ImageItem.rel -> record
        settings.update(classes=ds.classes, annotations=dataset_fingerprint(ds.records))
    keep = keep_settings(e, annotated=ds is not None,
                         images=len(ds.records) if ds is not None else None)
    if keep["keep"] != "all":  # absent for "all": stores made before the option stay valid
        settings["keep"] = keep
    store = StageStore(out, "extract", settings, upstream_key=upstream.key,
                       format_version=EXTRACT_FORMAT)
    up_ids = {it.rel: upstream_id(upstream, it) for it in items}
    run = execution(cfg, ext.device.type)
    todo, missing = with_upstream(items, up_ids, run.pop("shard"))
    fn = functools.partial(extract_one, store=store, upstream=upstream, kwargs=kwargs, gt=gt,
                           max_proposals=e["max_proposals"], dtype=e["dtype"], keep=keep)
    report = run_stage_into(store, fn, todo,
                            overwrite=overwrite, upstream=up_ids, desc="extract", holds_model=True,
                            write_settings=functools.partial(cfgmod.write_resolved, out, cfg,
                                                             ["common", "extract"]),
                            **run)
    for it in missing:
        report.fail(str(it.path), f"{upstream_missing_reason(upstream, it)} (run `rcnn "
                    "propose` first)")
    return report
