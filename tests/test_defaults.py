"""One source of defaults: every library default that has a setting in
``rcnn_cli/default.toml`` equals it (issue 15: model.py and head.py had drifted: fc width
1024 vs 512, 4000 vs 2000 iterations, score threshold 0.0 vs -2.0)."""
from __future__ import annotations

import dataclasses
import inspect

import pytest

from rcnn_cli import (
    bbox_regression,
    detect,
    diagnose,
    evaluate,
    features,
    finetune,
    head,
    labels,
    localize,
    model,
    proposals,
    svm,
)
from rcnn_cli import config as C

FINETUNE_KEYS = [f.name for f in dataclasses.fields(finetune.FinetuneSettings)
                 if f.name in C.defaults()["finetune"]]

#: (callable or class, parameter, "section.key")
TABLE = [
    *[(finetune.FinetuneSettings, k, f"finetune.{k}") for k in FINETUNE_KEYS],
    *[(finetune.FinetuneSettings, k, f"extract.{k}")
      for k in ("backbone", "weights", "tap", "mode", "padding", "max_proposals")],
    (finetune.finetune, "device", "common.device"),
    (finetune.build_windows, "fg_iou", "finetune.fg_iou"),
    (finetune.build_windows, "max_proposals", "extract.max_proposals"),
    (labels.label_windows, "fg_iou", "finetune.fg_iou"),
    (labels.window_labels, "fg_iou", "finetune.fg_iou"),
    (head.train_head, "hidden", "train_svm.head_hidden"),
    (head.train_head, "iterations", "train_svm.head_iterations"),
    (head.train_head, "lr", "train_svm.head_lr"),
    (head.train_head, "bg_per_image", "train_svm.head_bg_per_image"),
    (head.train_head, "seed", "train_svm.seed"),
    (head.train_head, "fg_iou", "finetune.fg_iou"),
    (head.collect_windows, "bg_per_image", "train_svm.head_bg_per_image"),
    (head.collect_windows, "seed", "train_svm.seed"),
    (model.Model, "nms_iou", "detect.nms_iou"),
    (model.Model, "score_threshold", "detect.score_thresh"),
    (model.Model, "max_detections", "detect.max_per_image"),
    *[(detect.DetectSettings, k, f"detect.{k}")
      for k in ("nms_iou", "score_thresh", "max_per_image", "bbox_regression", "vis_thresh",
                "nms", "box_vote_iou")],
    *[(svm.train_svms, k, f"train_svm.{k}")
      for k in ("pos_weight", "bias_mult", "neg_overlap", "hard_thresh", "evict_thresh",
                "retrain_limit", "solver", "seed")],
    (svm.train_svms, "c", "train_svm.C"),
    *[(svm.fit_svm, k, f"train_svm.{k}") for k in ("pos_weight", "bias_mult", "solver")],
    (svm.fit_svm, "c", "train_svm.C"),
    (svm.feat_scale_from_norms, "target", "train_svm.feat_norm"),
    (bbox_regression.train_bbox_regressors, "min_overlap", "train_svm.bbox_min_overlap"),
    (bbox_regression.train_bbox_regressors, "lam", "train_svm.bbox_lambda"),
    (evaluate.voc_eval, "iou_thresh", "evaluate.iou"),
    (evaluate.evaluate_detections, "iou_thresh", "evaluate.iou"),
    (diagnose.classify_detections, "iou_thresh", "evaluate.iou"),
    (diagnose.find_misses, "iou_thresh", "evaluate.iou"),
    (proposals.propose, "method", "propose.method"),
    *[(proposals.selective_search, k, f"propose.{k}")
      for k in ("strategy", "max_side", "min_size", "top_k", "seed")],
    (proposals.opencv_selective_search, "mode", "propose.strategy"),
    *[(proposals.opencv_selective_search, k, f"propose.{k}")
      for k in ("max_side", "min_size", "top_k", "seed")],
    (proposals.sliding_windows, "scales", "propose.sliding_scales"),
    (proposals.sliding_windows, "aspect_ratios", "propose.sliding_ratios"),
    (proposals.sliding_windows, "stride_frac", "propose.sliding_stride"),
    (proposals.sliding_windows, "min_size", "propose.min_size"),
    (proposals.sliding_windows, "top_k", "propose.top_k"),
    (features.FeatureExtractor, "backbone", "extract.backbone"),
    (features.FeatureExtractor, "mode", "extract.mode"),
    (features.FeatureExtractor, "device", "common.device"),
    (features.FeatureExtractor, "padding", "extract.padding"),
    (features.FeatureExtractor, "batch_size", "extract.batch_size"),
    (features.warp_crops_cpu, "padding", "extract.padding"),
    (features.warp_crops_roi_align, "padding", "extract.padding"),
    *[(localize.train_localizer, k, f"localize.{k}")
      for k in ("backbone", "attach", "loss", "finetune", "iterations", "seed", "hidden", "lr",
                "batch_size")],
    (localize.train_localizer, "device", "common.device"),
    (localize.Backbone, "name", "extract.backbone"),
    (localize.Backbone, "device", "common.device"),
    (localize.Localizer.build, "device", "common.device"),
    (localize.Localizer.predict, "device", "common.device"),
    (localize.predict_folder, "device", "common.device"),
    (localize.predict_folder, "formats", "localize.formats"),
]

#: (module, CONSTANT, "section.key"): named constants that duplicate a setting
CONSTANTS = [
    (localize, "HIDDEN", "localize.hidden"),
    (localize, "ITERATIONS", "localize.iterations"),
    (localize, "LR", "localize.lr"),
    (localize, "BATCH_SIZE", "localize.batch_size"),
    (svm, "C", "train_svm.C"),
    (svm, "POS_LOSS_WEIGHT", "train_svm.pos_weight"),
    (svm, "BIAS_MULT", "train_svm.bias_mult"),
    (svm, "NEG_OVERLAP", "train_svm.neg_overlap"),
    (svm, "HARD_THRESH", "train_svm.hard_thresh"),
    (svm, "EVICT_THRESH", "train_svm.evict_thresh"),
    (svm, "RETRAIN_LIMIT", "train_svm.retrain_limit"),
    (svm, "FEAT_NORM_TARGET", "train_svm.feat_norm"),
]


def _default(obj, name):
    return inspect.signature(obj).parameters[name].default


@pytest.mark.parametrize("obj,name,key", TABLE,
                         ids=[f"{o.__qualname__}.{n}" for o, n, _ in TABLE])
def test_library_default_is_the_toml_value(obj, name, key):
    got, want = _default(obj, name), C.default(key)
    if isinstance(got, tuple):
        got = list(got)
    assert got == want and type(got) is type(want) or (
        isinstance(want, float) and isinstance(got, (int, float)) and got == want), \
        f"{obj.__qualname__}({name}={got!r}) but default.toml {key} = {want!r}"


@pytest.mark.parametrize("module,name,key", CONSTANTS,
                         ids=[f"{m.__name__.split('.')[-1]}.{n}" for m, n, _ in CONSTANTS])
def test_named_constant_is_the_toml_value(module, name, key):
    got, want = getattr(module, name), C.default(key)
    assert got == want and (type(got) is type(want) or isinstance(want, float)), \
        f"{module.__name__}.{name} = {got!r} but default.toml {key} = {want!r}"


def test_every_localize_setting_is_read():
    """Each [localize] key is a train_localizer / predict_folder default or a CLI-only
    value (weights, input_size, parts: None in the library, "" / 0 in TOML)."""
    lib = {n for o, n, k in TABLE if k.startswith("localize.")}
    assert set(C.defaults()["localize"]) == lib | {"weights", "input_size", "parts"}


def test_every_finetune_setting_has_a_settings_field():
    assert set(FINETUNE_KEYS) == set(C.defaults()["finetune"])


def test_finetune_settings_from_config_take_every_value():
    cfg = C.load(None, {"finetune": {"iterations": 7, "lr": 0.5, "seed": 3},
                        "extract": {"mode": "shared", "tap": "pool", "padding": 8}})
    s = finetune.FinetuneSettings.from_config(cfg)
    assert (s.iterations, s.lr, s.seed, s.mode, s.tap, s.padding) == (7, 0.5, 3, "shared",
                                                                       "pool", 8)
    assert s == finetune.FinetuneSettings(iterations=7, lr=0.5, seed=3, mode="shared",
                                          tap="pool", padding=8)


def test_default_reads_the_packaged_toml():
    assert C.default("train_svm.head_hidden") == C.defaults()["train_svm"]["head_hidden"]
    with pytest.raises(KeyError):
        C.default("train_svm.no_such_key")
