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
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from rcnn_cli.bbox_regression import train_bbox_regressors
from rcnn_cli.head import train_head
from rcnn_cli.model import Model, save_model
from rcnn_cli.store import ForeignFolderError, check_output_folder, claim_folder, open_upstream
from rcnn_cli.svm import estimate_feat_scale, train_svms

log = logging.getLogger("rcnn_cli.train")

BUNDLE_WEIGHTS = "backbone.safetensors"
#: what train-svm writes into a bundle folder (never over a file it did not write)
BUNDLE_FILES = ("model.json", "model.npz", BUNDLE_WEIGHTS, "config.toml")
#: Feature taps that get the fc head under ``head = "auto"``: conv-map features with no fc
#: layers of their own (raccoon AP50: 0.755 -> 0.858 frozen, 0.811 -> 0.873 fine-tuned; README).
AUTO_HEAD_TAPS = ("grid",)
#: Extract folders up to this size are held in memory while training (read once, not once
#: per pass); larger ones are streamed from disk on every pass, so memory stays bounded.
MEMORY_CACHE_BYTES = 3 << 30


def use_head(head: str, tap: str) -> bool:
    """Whether ``train-svm`` fine-tunes an fc head: ``head`` is auto | fc | none."""
    if head not in ("auto", "fc", "none"):
        raise ValueError(f"train_svm.head must be auto, fc or none, got {head!r}")
    return head == "fc" or (head == "auto" and tap in AUTO_HEAD_TAPS)


def records_factory(features_dir: str | Path, images: Collection[str] | None = None):
    """A factory of fresh iterators over the extract records of a folder (sorted order),
    restricted to the image ids in ``images`` when given.

    Only records that carry the folder's key under their own name are read (a file copied
    over another image's is skipped with a warning).
    """
    store = open_upstream(features_dir, "extract")
    rels = store.done_rels()
    if images is not None:
        wanted = set(images)
        missing = sorted(wanted.difference(rels))
        if missing:
            raise ValueError(f"images: {len(missing)} not finished in {features_dir}, "
                             f"e.g. {missing[0]!r}")
        rels = [r for r in rels if r in wanted]
    if not rels:
        raise FileNotFoundError(f"{features_dir}: no finished images (run `rcnn extract`)")

    size = sum(store.path_for(r).stat().st_size for r in rels)
    if size <= MEMORY_CACHE_BYTES:
        # Training reads the records 4-5 times (head windows, SVM passes, feature norm,
        # regression): read each file once (`rcnn train-svm` on raccoon's 160 images: 1.5 GB).
        records = [store.load(rel) for rel in rels]

        def factory():
            return iter(records)
    else:
        def factory():
            for rel in rels:
                yield store.load(rel)

    factory.rels = rels  # type: ignore[attr-defined]
    return factory, store, len(rels)


def check_bundle_folder(out: str | Path, features_dir: str | Path, overwrite: bool) -> None:
    """Before any training: refuse a bundle folder that is, lies in or holds the features
    folder; an existing bundle unless ``overwrite``; a folder holding files rcnn did not
    write unless ``overwrite`` (and even then none of :data:`BUNDLE_FILES` may exist).

    Raises:
        ForeignFolderError: (a FileExistsError) naming the folder.
    """
    check_output_folder(out, [features_dir], overwrite=False, what="-o, --features")
    ours = (Path(out) / "model.json").is_file()
    if ours and not overwrite:
        raise ForeignFolderError(f"{out}: a model bundle exists; pass --overwrite to "
                                 "replace it")
    claim_folder(out, ours, BUNDLE_FILES, overwrite)


def train_model(features_dir: str | Path, out: str | Path, cfg: Mapping[str, Any],
                classes: Sequence[str] | None = None, overwrite: bool = False,
                images: Collection[str] | None = None) -> Model:
    """Train SVMs (+ regressors) on an extract folder and save the bundle to ``out``.

    Args:
        features_dir: output folder of `rcnn extract` run with ``--annotations``.
        out: bundle folder (refused if it holds a bundle, unless ``overwrite``).
        cfg: resolved config ([train_svm], [detect] defaults are recorded in the bundle).
        classes: restrict training to these class names (others stay untrained).
        images: train on these image ids of the folder only (cross-validation folds).
    """
    t = cfg["train_svm"]
    check_bundle_folder(out, features_dir, overwrite)
    factory, store, n_images = records_factory(features_dir, images)
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
    keep = dict(store.settings.get("keep") or {"keep": "all"})  # rcnn_cli.compact
    if keep["keep"] != "all":
        log.info("compact features: ground truth, windows at IoU >= %g and %d background "
                 "windows per image", keep["near_iou"], keep["background"])
    feat = store.settings["features"]
    head_res = None
    if use_head(t["head"], feat["tap"]):
        from rcnn_cli.features import resolve_device

        head_res = train_head(factory, len(all_classes), hidden=t["head_hidden"],
                              iterations=t["head_iterations"], lr=t["head_lr"],
                              bg_per_image=t["head_bg_per_image"], seed=t["seed"],
                              device=resolve_device(cfg["common"]["device"]), progress=True)
    svm = train_svms(factory, len(all_classes), todo, c=t["C"], pos_weight=t["pos_weight"],
                     bias_mult=t["bias_mult"], neg_overlap=t["neg_overlap"],
                     hard_thresh=t["hard_thresh"], evict_thresh=t["evict_thresh"],
                     retrain_limit=t["retrain_limit"], solver=t["solver"], seed=t["seed"],
                     class_names=all_classes, feat_scale=None,
                     transform=None if head_res is None else head_res.head.fc7)
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
                        "features_keep": keep,
                        "features_records": store.content_id(factory.rels),
                        "svm": [s.__dict__ for s in svm.stats],
                        "head": None if head_res is None else head_res.stats},
        head=None if head_res is None else head_res.head, reg_feat_scale=float(reg_scale))
    save_model(out, model, overwrite=overwrite)
    if weights_file is not None:
        shutil.copyfile(weights_file, Path(out) / BUNDLE_WEIGHTS)
    return model


def is_trained(features_dir: str | Path, out: str | Path, cfg: Mapping[str, Any]) -> bool:
    """True if ``out`` holds a bundle trained on exactly these features (same settings key
    and the same per-image records: an image re-extracted since makes it False) with these
    settings (so a rerun of a pipeline can skip training)."""
    from rcnn_cli.model import ModelError, load_model

    try:
        stats = load_model(out).training_stats
        store = open_upstream(features_dir, "extract")
    except (ModelError, FileNotFoundError):
        return False
    return (stats.get("features_key") == store.key
            and stats.get("features_records") == store.content_id()
            and stats.get("train_svm") == dict(cfg["train_svm"]))


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
