"""`rcnn train-svm`: from an extract folder to a model bundle.

Streams the extract stage's per-image files (one image's features in memory at a time),
optionally fine-tunes R-CNN's fc6/fc7 on them first (:mod:`rcnn_cli.head`: for conv-map
features such as mobilenet_v2's shared ``grid``, which have no fc layers), trains the
per-class SVMs with hard-negative mining (:mod:`rcnn_cli.svm`) on the fc7 activations (or on
the features themselves without a head), the box regressors on the features
(:mod:`rcnn_cli.bbox_regression`, R-CNN regresses from pool5), and saves a bundle
(:mod:`rcnn_cli.model`)
that records everything `rcnn detect` needs to reproduce the features: proposal settings,
backbone, tap, mode and weights. Fine-tuned weights are copied into the bundle, so it can be
moved to another machine.
"""
from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rcnn_cli.bbox_regression import train_bbox_regressors
from rcnn_cli.head import train_head
from rcnn_cli.model import Model, bundle_exists, save_model
from rcnn_cli.store import open_upstream
from rcnn_cli.svm import estimate_feat_scale, train_svms

log = logging.getLogger("rcnn_cli.train")

BUNDLE_WEIGHTS = "backbone.safetensors"
#: Feature taps that get the fc head under ``head = "auto"``: conv-map features with no fc
#: layers of their own (raccoon AP50: 0.755 -> 0.858 frozen, 0.811 -> 0.873 fine-tuned; README).
AUTO_HEAD_TAPS = ("grid",)


def use_head(head: str, tap: str) -> bool:
    """Whether ``train-svm`` fine-tunes an fc head: ``head`` is auto | fc | none."""
    if head not in ("auto", "fc", "none"):
        raise ValueError(f"train_svm.head must be auto, fc or none, got {head!r}")
    return head == "fc" or (head == "auto" and tap in AUTO_HEAD_TAPS)


def records_factory(features_dir: str | Path):
    """A factory of fresh iterators over the extract records of a folder (sorted order)."""
    store = open_upstream(features_dir, "extract")
    stems = store.done_stems()
    if not stems:
        raise FileNotFoundError(f"{features_dir}: no finished images (run `rcnn extract`)")

    def factory():
        for s in stems:
            yield store.load(s)

    return factory, store, len(stems)


def train_model(features_dir: str | Path, out: str | Path, cfg: Mapping[str, Any],
                classes: Sequence[str] | None = None, overwrite: bool = False) -> Model:
    """Train SVMs (+ regressors) on an extract folder and save the bundle to ``out``.

    Args:
        features_dir: output folder of `rcnn extract` run with ``--annotations``.
        out: bundle folder (refused if it holds a bundle, unless ``overwrite``).
        cfg: resolved config ([train_svm], [detect] defaults are recorded in the bundle).
        classes: restrict training to these class names (others stay untrained).
    """
    t = cfg["train_svm"]
    if not overwrite and bundle_exists(out):  # refuse before training, not after
        raise FileExistsError(f"{out}: holds a model bundle (use --overwrite to replace it)")
    factory, store, n_images = records_factory(features_dir)
    all_classes = list(store.settings.get("classes") or [])
    if not all_classes:
        raise ValueError(f"{features_dir}: features were extracted without --annotations; "
                         "training needs ground truth")
    todo = None
    if classes:
        unknown = [c for c in classes if c not in all_classes]
        if unknown:
            raise ValueError(f"--classes: unknown class(es) {unknown}; the features know "
                             f"{all_classes}")
        todo = [all_classes.index(c) for c in classes]
    log.info("training %d class(es) on %d images", len(todo or all_classes), n_images)
    feat = store.settings["features"]
    head_res = None
    svm_factory = factory
    if use_head(t["head"], feat["tap"]):
        from rcnn_cli.features import resolve_device

        head_res = train_head(factory, len(all_classes), hidden=t["head_hidden"],
                              iterations=t["head_iterations"], lr=t["head_lr"],
                              bg_per_image=t["head_bg_per_image"], seed=t["seed"],
                              device=resolve_device(cfg["common"]["device"]), progress=True)
        fc7 = head_res.head.fc7

        def svm_factory():
            return ({**r, "features": fc7(r["features"])} for r in factory())

    svm = train_svms(svm_factory, len(all_classes), todo, c=t["C"], pos_weight=t["pos_weight"],
                     bias_mult=t["bias_mult"], neg_overlap=t["neg_overlap"],
                     hard_thresh=t["hard_thresh"], evict_thresh=t["evict_thresh"],
                     retrain_limit=t["retrain_limit"], solver=t["solver"], seed=t["seed"],
                     class_names=all_classes,
                     feat_scale=None)
    reg = None
    reg_scale = svm.feat_scale if head_res is None else estimate_feat_scale(factory, t["seed"])
    if t["bbox_regression"]:
        reg = train_bbox_regressors(factory, len(all_classes), reg_scale, todo,
                                    min_overlap=t["bbox_min_overlap"], lam=t["bbox_lambda"],
                                    class_names=all_classes)
    extractor, weights_file = _bundle_extractor(store.settings["extractor"])
    d = cfg["detect"]
    model = Model(
        classes=all_classes, svm_weights=svm.weights, svm_biases=svm.biases,
        feat_scale=float(svm.feat_scale), svm_trained=svm.trained,
        regressors=None if reg is None else reg.regressors,
        regressor_trained=None if reg is None else reg.trained,
        backbone=feat["backbone"], weights_source={"id": feat["weights"],
                                                   "file": extractor.get("weights")},
        feature_tap=feat["tap"],
        extract_settings={**feat, "extractor": extractor,
                          "max_proposals": store.settings.get("max_proposals", 2000)},
        proposal_settings=dict(store.settings["proposals"]),
        nms_iou=d["nms_iou"], score_threshold=d["score_thresh"],
        max_detections=d["max_per_image"],
        training_stats={"images": n_images, "train_svm": dict(t), "features_key": store.key,
                        "svm": [s.__dict__ for s in svm.stats],
                        "head": None if head_res is None else head_res.stats},
        head=None if head_res is None else head_res.head, reg_feat_scale=float(reg_scale))
    save_model(out, model, overwrite=overwrite)
    if weights_file is not None:
        shutil.copyfile(weights_file, Path(out) / BUNDLE_WEIGHTS)
    return model


def is_trained(features_dir: str | Path, out: str | Path, cfg: Mapping[str, Any]) -> bool:
    """True if ``out`` holds a bundle trained on exactly these features with these settings
    (so a rerun of a pipeline can skip training)."""
    from rcnn_cli.model import ModelError, load_model

    try:
        stats = load_model(out).training_stats
        key = open_upstream(features_dir, "extract").key
    except (ModelError, FileNotFoundError):
        return False
    return stats.get("features_key") == key and stats.get("train_svm") == dict(cfg["train_svm"])


def _bundle_extractor(extractor: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """FeatureExtractor kwargs to store in the bundle, and the weights file to copy into it
    (a local weights file travels with the bundle under a bundle-relative name)."""
    kw = dict(extractor)
    w = kw.get("weights")
    if w and w != "random":
        if not Path(w).is_file():
            raise FileNotFoundError(f"{w}: the weights the features were extracted with are gone")
        kw["weights"] = BUNDLE_WEIGHTS
        return kw, w
    return kw, None
