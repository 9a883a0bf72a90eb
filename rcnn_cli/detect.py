"""Detection: proposals -> features -> SVM scores -> box regression -> per-class NMS.

:func:`detect_image` is the recipe for one image (read it top to bottom, like torchvision's
``roi_heads.postprocess_detections``); :func:`detect_folder` streams it over folders,
writing each image's result as it comes (``OUT/per_image/<image path>.npz``, e.g.
``per_image/sub/img.jpg.npz``, resumable), then the standard outputs: ``detections.csv``,
COCO ``detections.json`` + ``images.json`` + ``categories.json``, and optionally VOC-devkit /
YOLO text files (:mod:`rcnn_cli.formats`) and pictures (``vis/<image path>.jpg``).
Every output names an image by its path relative to the input folder, extension included.
"""
from __future__ import annotations

import functools
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torchvision.ops import batched_nms

from rcnn_cli import boxes as bx
from rcnn_cli import config as cfgmod
from rcnn_cli.images import ImageItem, list_images, read_image
from rcnn_cli.runner import Report, run_stage
from rcnn_cli.stages import compute_proposals, execution, get_extractor, is_current
from rcnn_cli.store import (
    StageStore,
    atomic_write_json,
    check_output_folder,
    claim_folder,
    file_identity,
    read_manifest,
)

log = logging.getLogger("rcnn_cli.detect")

#: 2: per-image files keyed by the relative path with extension, with identity entries
DETECT_FORMAT = 2
#: what detect writes at the top of its output folder (never over a file it did not write)
OUTPUT_FILES = ("per_image", "vis", "voc", "yolo", "detections.csv", "detections.json",
                "images.json", "categories.json", "summary.json", "config.toml")
#: the files each output format writes into the output folder
FORMAT_FILES = {"csv": ("detections.csv",),
                "coco": ("detections.json", "images.json", "categories.json"),
                "voc": ("voc",), "yolo": ("yolo",)}
#: boxes thinner than this (pixels) after regression and clipping are dropped
MIN_BOX_SIDE = 1e-2


#: Soft-NMS (Bodla et al., ICCV 2017): Gaussian decay width of the overlapping scores.
SOFT_NMS_SIGMA = 0.5
#: Soft-NMS: boxes whose decayed score is less than this above the threshold are dropped.
SOFT_NMS_FLOOR = 1e-3


@dataclass
class DetectSettings:
    """Post-processing thresholds (defaults live in the model bundle, flags override)."""

    # defaults: [detect] of rcnn_cli/default.toml, the one place they are written
    nms_iou: float = cfgmod.default("detect.nms_iou")  # per-class NMS overlap
    score_thresh: float = cfgmod.default("detect.score_thresh")  # SVM margin units
    max_per_image: int = cfgmod.default("detect.max_per_image")
    bbox_regression: bool = cfgmod.default("detect.bbox_regression")
    vis_thresh: float = cfgmod.default("detect.vis_thresh")  # pictures: detections above this
    nms: str = cfgmod.default("detect.nms")  # soft (Gaussian soft-NMS) | hard (greedy NMS)
    box_vote_iou: float = cfgmod.default("detect.box_vote_iou")  # box voting IoU (0 = off)


def postprocess(boxes: NDArray[np.float32], scores: NDArray[np.float32],
                image_size: tuple[int, int], settings: DetectSettings
                ) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.int64]]:
    """Per-class boxes (N, K, 4) and scores (N, K) -> final (boxes (M, 4), scores, labels).

    Steps: clip to the image, drop scores <= threshold, drop degenerate boxes, per-class NMS
    (torchvision ``batched_nms``; or soft-NMS), optional box voting, keep the
    ``max_per_image`` best.
    """
    n, k = scores.shape
    labels = np.broadcast_to(np.arange(k), (n, k))
    b = bx.clip(boxes.reshape(-1, 4), image_size)
    s, lab = scores.reshape(-1), labels.reshape(-1)
    # remove low scoring boxes
    keep = s > settings.score_thresh
    # remove boxes collapsed by clipping
    keep &= bx.valid_mask(b, MIN_BOX_SIDE)
    b, s, lab = b[keep], s[keep].astype(np.float32), lab[keep]
    # non-maximum suppression, independently per class
    if settings.nms == "soft":
        idx, s_out = soft_nms(b, s, lab, settings.score_thresh, limit=settings.max_per_image)
    else:
        idx = batched_nms(torch.from_numpy(b), torch.from_numpy(s),
                          torch.from_numpy(lab.astype(np.int64)), settings.nms_iou).numpy()
        s_out = s[idx]
    # keep only the best detections
    idx, s_out = idx[: settings.max_per_image], s_out[: settings.max_per_image]
    kept = b[idx]
    # box voting: each kept box becomes the score-weighted mean of its class's boxes around it
    if settings.box_vote_iou > 0 and len(idx):
        kept = box_voting(kept, lab[idx], b, s, lab, settings.box_vote_iou)
    return kept, s_out.astype(np.float32), lab[idx].astype(np.int64)


def soft_nms(boxes: NDArray[np.float32], scores: NDArray[np.float32], labels: NDArray,
             score_thresh: float, sigma: float = SOFT_NMS_SIGMA, limit: int | None = None
             ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Gaussian soft-NMS per class (Bodla et al. 2017), for SVM margins.

    Hand-written: torchvision has hard NMS only. Margins can be negative, so the decay
    ``exp(-IoU^2 / sigma)`` applies to the height above ``score_thresh``; a box keeps its
    place unless a better box of its class overlaps it. Neighbours of a crowd keep a lowered
    score instead of vanishing.

    Args:
        boxes (N, 4) float32, scores (N,), labels (N,): the candidates (already thresholded).
        limit: stop after this many boxes per class (the picked scores never increase, so
            these are the class's best ``limit`` boxes; the rest cannot make the cap).

    Returns:
        (indices into the input, best first; their decayed scores).
    """
    order_out, score_out = [], []
    for c in np.unique(labels):
        ids = np.flatnonzero(labels == c)
        h = scores[ids].astype(np.float64) - score_thresh  # > 0
        iou = bx.box_iou(boxes[ids], boxes[ids]).astype(np.float64)
        alive = np.ones(len(ids), bool)
        for _ in range(len(ids) if limit is None else min(limit, len(ids))):
            cand = np.flatnonzero(alive)
            if not len(cand):
                break
            i = cand[np.argmax(h[cand])]
            if h[i] <= SOFT_NMS_FLOOR:
                break
            alive[i] = False
            order_out.append(ids[i])
            score_out.append(h[i] + score_thresh)
            h[alive] *= np.exp(-(iou[i, alive] ** 2) / sigma)
    idx = np.asarray(order_out, np.int64)
    sc = np.asarray(score_out, np.float32)
    o = np.argsort(-sc, kind="stable")
    return idx[o], sc[o]


def box_voting(kept: NDArray[np.float32], kept_labels: NDArray, boxes: NDArray[np.float32],
               scores: NDArray[np.float32], labels: NDArray, iou_thresh: float
               ) -> NDArray[np.float32]:
    """Box voting (Gidaris & Komodakis, ICCV 2015): each kept box (M, 4) becomes the mean of
    the candidate boxes (N, 4) of its class that overlap it at IoU >= ``iou_thresh``, each
    weighted by ``exp(score)`` (SVM margins); returns the voted boxes (M, 4) float32."""
    out = kept.copy()
    iou = bx.box_iou(kept, boxes)
    for m in range(len(kept)):
        sel = (iou[m] >= iou_thresh) & (labels == kept_labels[m])
        if sel.any():
            w = np.exp(scores[sel].astype(np.float64) - scores[sel].max())
            out[m] = (w[:, None] * boxes[sel]).sum(0) / w.sum()
    return out.astype(np.float32)


def detect_image(image: NDArray[np.uint8], model, extractor,
                 settings: DetectSettings) -> dict[str, Any]:
    """Detections of one image (uint8 (H, W, 3) RGB) with a loaded model bundle.

    Returns a dict with ``boxes`` (M, 4) float32, ``scores`` (M,) float32, ``labels`` (M,)
    int64 and ``times`` (seconds per step).
    """
    size = image.shape[:2]
    t0 = time.perf_counter()
    # 1. proposals, with the settings the model was trained with
    props, _ = compute_proposals(image, model.proposal_settings)
    props = props[: model.extract_settings.get("max_proposals", len(props))]
    t1 = time.perf_counter()
    # 2. one feature vector per proposal
    feats = extractor.extract(image, props)
    t2 = time.perf_counter()
    # 3.-5. scores, box regression, post-processing
    out = detect_from_features(props, feats, model, size, settings)
    t3 = time.perf_counter()
    out["times"] = {"proposals": t1 - t0, "features": t2 - t1, "scoring": t3 - t2}
    return out


def detect_from_features(props: NDArray[np.float32], feats: NDArray, model,
                         image_size: tuple[int, int], settings: DetectSettings
                         ) -> dict[str, Any]:
    """Detections of one image from its proposals (N, 4) and their features (N, D).

    The scoring half of :func:`detect_image`; cross-validation scores cached extract
    features with it, so what it measures is what ``rcnn detect`` computes.
    Returns a dict with ``boxes`` (M, 4) float32, ``scores`` (M,) float32, ``labels`` (M,).
    """
    # 3. class scores from the per-class linear SVMs (on the fc head's fc7 when the model has
    #    one; untrained classes never fire)
    scores = model.score(feats)
    scores[:, ~model.svm_trained] = -np.inf
    # 4. per-class box regression (R-CNN applies it once), else the proposal itself
    if settings.bbox_regression and model.regressors is not None:
        deltas = model.deltas(feats)  # (N, K, 4)
        k = deltas.shape[1]
        boxes = bx.decode(np.repeat(props, k, axis=0), deltas.reshape(-1, 4)).reshape(-1, k, 4)
    else:
        boxes = np.repeat(props[:, None, :], scores.shape[1], axis=1)
    # 5. clip, threshold, per-class NMS, cap
    b, s, lab = postprocess(boxes, scores, image_size, settings)
    return {"boxes": b, "scores": s, "labels": lab}


# ------------------------------------------------------------------ folders
_MODELS: dict[str, Any] = {}


def _get_model(model_dir: str):
    from rcnn_cli.model import load_model

    if model_dir not in _MODELS:
        _MODELS.clear()
        _MODELS[model_dir] = load_model(model_dir)
    return _MODELS[model_dir]


def model_extractor_kwargs(model, model_dir: str | Path, device: str) -> dict[str, Any]:
    """FeatureExtractor arguments the model was trained with (weights inside the bundle are
    resolved against its folder, so a bundle can move between machines)."""
    kw = dict(model.extractor_settings(), device=device)
    w = kw.get("weights")
    if w and w != "random" and not Path(w).is_absolute():
        kw["weights"] = str(Path(model_dir) / w)
    return kw


def model_key(model_dir: str | Path) -> str:
    """Content hash of a bundle's files (detect caches are keyed by it)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(Path(model_dir).iterdir()):
        if p.is_file() and not p.name.startswith("."):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:32]


def detect_one(item: ImageItem, store: StageStore, model_dir: str,
               extractor_kwargs: Mapping[str, Any], settings: DetectSettings,
               vis_dir: str | None, dense: bool = False) -> dict:
    """Per-image work of `rcnn detect` (one process loads model and backbone once);
    ``dense``: score dense sliding windows (:func:`rcnn_cli.dense.detect_dense`) instead of
    the model's proposals."""
    t0 = time.perf_counter()
    source = file_identity(item.path)
    img = read_image(item.path)
    model = _get_model(model_dir)
    ext = get_extractor(extractor_kwargs)
    t_dec = time.perf_counter() - t0
    if dense:
        from rcnn_cli.dense import detect_dense

        out = detect_dense(img, model, ext, settings)
    else:
        out = detect_image(img, model, ext, settings)
    store.save(item.rel, {"boxes": out["boxes"], "scores": out["scores"],
                          "labels": out["labels"],
                          "image_size": np.array(img.shape[:2], np.int64)}, source=source)
    if vis_dir is not None:
        from rcnn_cli.visualize import draw_detections, save_image

        show = out["scores"] > settings.vis_thresh
        pic = draw_detections(img, out["boxes"][show], out["labels"][show], out["scores"][show],
                              model.classes)
        save_image(vis_path(vis_dir, item.rel), pic)
    return {"times": {"decode": t_dec, **out["times"]}}


def vis_path(vis_dir: str | Path, rel: str) -> Path:
    """Picture of image ``rel``: ``vis/<rel>.jpg`` (``img.png`` -> ``vis/img.png.jpg``), so
    ``img.jpg`` and ``img.png`` get two pictures."""
    from rcnn_cli.store import check_rel

    return Path(vis_dir) / f"{check_rel(rel)}.jpg"


def check_detect_folder(out: str | Path, inputs: list[str | Path], model_dir: str | Path,
                        overwrite: bool) -> None:
    """Refuse an output folder that is (inside) an input folder or the model bundle, or that
    holds files rcnn did not write (no ``per_image/manifest.json`` of a detect run) unless
    ``overwrite``; even then none of :data:`OUTPUT_FILES` may exist there.

    Raises:
        ForeignFolderError: naming the folder.
    """
    check_output_folder(out, [model_dir], overwrite=False, what="-o, --model")
    check_output_folder(out, inputs, overwrite)
    m = read_manifest(Path(out) / "per_image")
    claim_folder(out, m is not None and m.get("stage") == "detect", OUTPUT_FILES, overwrite)


def model_detect_settings(model, cfg: Mapping[str, Any],
                          overrides: Mapping[str, Any] | None = None) -> DetectSettings:
    """Post-processing settings: the model bundle's thresholds (NMS IoU, score threshold,
    detections per image), then ``overrides`` (what the user set in a config file or with
    flags); the rest from ``cfg["detect"]``. ``overrides=None`` means: take everything from
    ``cfg`` (library callers that resolved settings themselves)."""
    d = cfg["detect"]
    if overrides is None:
        base = {k: d[k] for k in ("nms_iou", "score_thresh", "max_per_image")}
    else:
        base = {"nms_iou": model.nms_iou, "score_thresh": model.score_threshold,
                "max_per_image": model.max_detections}
        base.update({k: v for k, v in overrides.items() if k in base})
    extra = dict(d) if overrides is None else {**d, **overrides}
    return DetectSettings(nms_iou=float(base["nms_iou"]), score_thresh=float(base["score_thresh"]),
                          max_per_image=int(base["max_per_image"]),
                          bbox_regression=bool(extra["bbox_regression"]),
                          vis_thresh=float(extra["vis_thresh"]), nms=str(extra["nms"]),
                          box_vote_iou=float(extra["box_vote_iou"]))


def detect_folder(inputs: list[str | Path], model_dir: str | Path, out: str | Path,
                  cfg: Mapping[str, Any], split: str | Path | None = None,
                  save_vis: bool = False, formats: list[str] | None = None,
                  overwrite: bool = False,
                  overrides: Mapping[str, Any] | None = None,
                  coco_ids: str | Path | None = None, dense: bool = False) -> Report:
    """Detect objects in folders of images with a model bundle; write all outputs to ``out``.

    Thresholds come from the model bundle unless ``overrides`` (the user's explicit
    [detect] settings) change them; see :func:`model_detect_settings`. Per-image results
    stream to ``out/per_image`` (a killed run resumes); the summary files are written at
    the end from those. ``coco_ids``: a COCO instances file whose ``image_id`` and
    ``category_id`` values ``detections.json`` uses (:func:`coco_ids_for`). ``dense``:
    score dense sliding windows instead of proposals (:mod:`rcnn_cli.dense`; the model must
    have shared-mode ``grid`` features, else :class:`ConfigError` before any work).
    """
    check_detect_folder(out, inputs, model_dir, overwrite)
    model = _get_model(str(model_dir))
    items = list_images(inputs, split=split, exclude=[out])
    ids = None if coco_ids is None else coco_ids_for(items, coco_ids, model.classes)
    d = cfg["detect"]
    settings = model_detect_settings(model, cfg, overrides)
    kwargs = model_extractor_kwargs(model, model_dir, cfg["common"]["device"])
    ext = get_extractor(kwargs)  # load once here: fails early on missing weights
    key = {"model": model_key(model_dir), "proposals": model.proposal_settings,
           "features": ext.settings(),
           "post": {k: v for k, v in settings.__dict__.items() if k != "vis_thresh"}}
    if dense:  # dense windows replace the proposals: their results never mix
        from rcnn_cli.dense import check_dense, dense_settings

        check_dense(ext)
        key["dense"] = dense_settings()
    store = StageStore(Path(out) / "per_image", "detect", key,
                       format_version=DETECT_FORMAT, overwrite=overwrite)
    cfgmod.write_resolved(out, cfg, ["common", "detect"])
    vis_dir = str(Path(out) / "vis") if save_vis else None
    fn = functools.partial(detect_one, store=store, model_dir=str(model_dir),
                           extractor_kwargs=kwargs, settings=settings, vis_dir=vis_dir,
                           dense=dense)
    # an image is done when its result is current (and its picture exists, with --save-vis)
    report = run_stage(fn, items, is_done=lambda it: is_current(store, it) and (
                           vis_dir is None or vis_path(vis_dir, it.rel).is_file()),
                       desc="detect", **execution(cfg, ext.device.type))
    write_outputs(out, store, items, model.classes, formats or d["formats"], coco_ids=ids)
    return report


def coco_ids_for(items: list[ImageItem], annotations: str | Path, classes: list[str]
                 ) -> tuple[dict[str, int], list[int]]:
    """The user's COCO ids for detect's outputs: (image rel -> image_id, the category_id of
    each model class), from a COCO instances file paired with ``items`` by file name.

    Raises:
        ValueError: the file is not COCO, or a model class has no category of that name.
    """
    from rcnn_cli.datasets import load_dataset, match_annotations

    full = load_dataset(annotations)
    if full.category_ids is None:
        raise ValueError(f"{annotations}: --coco-ids needs a COCO instances .json")
    by_name = dict(zip(full.classes, full.category_ids))
    missing = [c for c in classes if c not in by_name]
    if missing:
        raise ValueError(f"{annotations}: no category named {missing[0]!r} (the model's "
                         f"classes: {classes})")
    ds, _ = match_annotations(items, full)
    image_ids = {r.file_name: r.image_id for r in ds.records if r.image_id is not None}
    return image_ids, [int(by_name[c]) for c in classes]


def write_outputs(out: str | Path, store: StageStore, items: list[ImageItem],
                  classes: list[str], formats: list[str],
                  coco_ids: tuple[dict[str, int], list[int]] | None = None) -> list[Path]:
    """Summary files of a detect run from its per-image results (images that failed, or
    changed since they were detected, are left out)."""
    from rcnn_cli import evaluate as ev

    dets, sizes = {}, {}
    for it in items:
        if not is_current(store, it):
            continue
        r = store.load(it.rel)
        dets[it.rel] = ev.Detections(r["boxes"], r["scores"], r["labels"])
        sizes[it.rel] = tuple(int(v) for v in r["image_size"])
    out = Path(out)
    written = []
    unknown = set(formats) - {"csv", "coco", "voc", "yolo"}
    if unknown:
        raise ValueError(f"formats: unknown {sorted(unknown)} (choose csv, coco, voc, yolo)")
    # outputs of formats not asked for this time are an earlier run's: remove them, so that
    # evaluate never scores stale files next to fresh ones (the folder is ours: claim_folder)
    for fmt, names in FORMAT_FILES.items():
        if fmt not in formats:
            for name in names:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.is_file():
                    p.unlink()
    if "csv" in formats:
        written.append(ev.write_detections_csv(out / "detections.csv", dets, classes))
    if "coco" in formats:
        image_ids, cat_ids = coco_ids if coco_ids is not None else (None, None)
        written += ev.write_coco_results(out, dets, sizes, classes, image_ids, cat_ids)
    if "voc" in formats:
        written += ev.write_voc_results(out / "voc", dets, classes)
    if "yolo" in formats:
        written += ev.write_yolo_results(out / "yolo", dets, sizes)
    n = sum(len(d) for d in dets.values())
    atomic_write_json(out / "summary.json", {"images": len(dets), "detections": n,
                                             "classes": classes})
    return written
