"""The trained model bundle: a folder holding ``model.json`` and ``model.npz``.

``model.json`` (human-readable)::

    format_version, package_version, classes (in order), backbone, weights_source
    (e.g. {"kind": "imagenet", "filename": ..., "sha256": ...} or {"kind": "path", "path":
    ...}), feature_tap, extract_settings, proposal_settings, feature_scaling {feat_scale,
    reg_feat_scale, target_mean_norm}, head {in_dim, hidden} or null, detection {nms_iou,
    score_threshold, max_detections}, training_stats, arrays {file, sha256, shapes}

``model.npz`` (no pickle; read with ``allow_pickle=False``): ``svm_weights`` (K, S) float32,
``svm_biases`` (K,) float32, ``svm_trained`` (K,) bool and, when box regression was
trained, ``regressors`` (K, 4, D+1) float32 and ``regressor_trained`` (K,) bool. With a
fine-tuned fc head (:mod:`rcnn_cli.head`) also ``head_mean``, ``head_std`` (D,),
``head_fc6_w`` (H, D), ``head_fc6_b``, ``head_fc7_w`` (H, H), ``head_fc7_b``, ``head_cls_w``
(K + 1, H), ``head_cls_b``: the SVMs then read the head's fc7 (S = H) and the regressors the
extracted features (D); without a head S = D. ``feature_scaling`` holds ``feat_scale`` (SVM
inputs) and ``reg_feat_scale`` (regressor inputs).

Both files are written to temporary names in the folder and moved into place with
``os.replace``, arrays first; ``model.json`` records the arrays' sha256, so a bundle left
half-written by a crash is refused at load instead of silently mixing two models.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from rcnn_cli import __version__
from rcnn_cli import config as cfgmod
from rcnn_cli.bbox_regression import predict_deltas
from rcnn_cli.head import ARRAY_NAMES as HEAD_ARRAYS
from rcnn_cli.head import Head
from rcnn_cli.store import (
    atomic_write_bytes,
    atomic_write_text,
    class_names_problem,
    npz_bytes,
    read_bundle,
)
from rcnn_cli.svm import FEAT_NORM_TARGET, score

FORMAT_VERSION = 1
JSON_NAME = "model.json"
ARRAYS_NAME = "model.npz"
# Detection defaults of a bundle: [detect] of rcnn_cli/default.toml (the one place).
NMS_IOU: float = cfgmod.default("detect.nms_iou")  # rcnn_test.m: per-class NMS at IoU 0.3
SCORE_THRESHOLD: float = cfgmod.default("detect.score_thresh")  # SVM margin units
MAX_DETECTIONS: int = cfgmod.default("detect.max_per_image")  # per image, all classes


class ModelError(ValueError):
    """A model bundle that cannot be used; the message names the file and the problem."""


@dataclass
class Model:
    """Everything ``detect`` needs. Arrays act on raw features: the SVMs on ``head.fc7`` of
    them when there is a head (scaled by ``feat_scale``), the regressors on them directly
    (scaled by ``reg_feat_scale``)."""

    classes: list[str]
    svm_weights: NDArray[np.float32]  # (K, S): S = head width, or D without a head
    svm_biases: NDArray[np.float32]  # (K,)
    feat_scale: float
    svm_trained: NDArray[np.bool_]  # (K,)
    regressors: NDArray[np.float32] | None = None  # (K, 4, D+1), last column the bias
    regressor_trained: NDArray[np.bool_] | None = None  # (K,)
    backbone: str = ""
    weights_source: dict[str, Any] = field(default_factory=dict)
    feature_tap: str = ""
    extract_settings: dict[str, Any] = field(default_factory=dict)
    proposal_settings: dict[str, Any] = field(default_factory=dict)
    nms_iou: float = NMS_IOU
    score_threshold: float = SCORE_THRESHOLD
    max_detections: int = MAX_DETECTIONS
    training_stats: dict[str, Any] = field(default_factory=dict)
    package_version: str = __version__
    head: Head | None = None
    reg_feat_scale: float | None = None  # None: feat_scale (no head)
    source: str = field(default="", compare=False)  # model.json it was loaded from (messages)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def dim(self) -> int:
        """D, the dimension of the extracted features the model reads."""
        return self.head.in_dim if self.head is not None else int(np.shape(self.svm_weights)[1])

    def extractor_settings(self) -> dict[str, Any]:
        """The FeatureExtractor arguments the features were extracted with (what detect
        rebuilds); :class:`ModelError` if the bundle lacks them."""
        kw = self.extract_settings.get("extractor")
        if not isinstance(kw, dict):
            raise ModelError(f"{self.source or JSON_NAME}: extract_settings has no 'extractor' "
                             "entry (the backbone settings detect needs); train the model again "
                             "with `rcnn train-svm`")
        return dict(kw)

    @property
    def regression_scale(self) -> float:
        return float(self.feat_scale if self.reg_feat_scale is None else self.reg_feat_scale)

    def svm_features(self, features: ArrayLike) -> NDArray[np.float32]:
        """What the SVMs read: the head's fc7 of raw features (N, D), or the features."""
        if self.head is None:
            return np.asarray(features, np.float32)
        return self.head.fc7(features)

    def score(self, features: ArrayLike) -> NDArray[np.float32]:
        """SVM scores (N, K) of raw features (N, D)."""
        return score(self.svm_features(features), self.svm_weights, self.svm_biases,
                     self.feat_scale)

    def deltas(self, features: ArrayLike) -> NDArray[np.float32]:
        """Per-class regression deltas (N, K, 4) of raw features (N, D)."""
        return predict_deltas(features, self.regressors, self.regression_scale)

    def top_projection(self, top: int) -> TopProjection | None:
        """The model's linear first step on raw features, ready to be applied to a map before
        its box means are taken (:class:`TopProjection`); None without a head. ``top``: how
        many leading feature dimensions are box means of one map (the ``grid`` tap: the top
        map's channels)."""
        if self.head is None:
            return None
        arrays = (self.head.mean, self.head.std, self.head.fc6_w, self.head.fc6_b,
                  self.regressors)
        parts = (arrays, float(self.regression_scale), int(top))
        cached = self.__dict__.get("_projection")
        if cached is None or cached[0][1:] != parts[1:] or not all(
                a is b for a, b in zip(cached[0][0], arrays)):
            cached = (parts, TopProjection.of(self.head, self.regressors,
                                              self.regression_scale, top))
            self.__dict__["_projection"] = cached
        return cached[1]

    def scores_and_deltas(self, first: Any) -> tuple[NDArray[np.float32],
                                                     NDArray[np.float32] | None]:
        """SVM scores (N, K) and regression deltas (N, K, 4) (None without regressors) from
        :meth:`TopProjection.finish`'s output, the first step's (N, R) float32 tensor
        (consumed): what :meth:`score` and :meth:`deltas` give for the same features."""
        h = self.head.out_dim
        deltas = None
        if self.regressors is not None:
            deltas = first[:, h:].numpy().reshape(len(first), self.num_classes, 4).copy()
        fc7 = self.head.fc7_of_fc6(first[:, :h])
        return score(fc7, self.svm_weights, self.svm_biases, self.feat_scale), deltas

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"svm_weights": self.svm_weights, "svm_biases": self.svm_biases,
               "svm_trained": self.svm_trained}
        if self.regressors is not None:
            out["regressors"] = self.regressors
            out["regressor_trained"] = (self.regressor_trained if self.regressor_trained
                                        is not None else np.ones(self.num_classes, bool))
        if self.head is not None:
            out.update(self.head.arrays())
        return {k: np.asarray(v) for k, v in out.items()}

    def to_json(self) -> dict[str, Any]:
        """The ``model.json`` content, without the ``arrays`` entry."""
        return _jsonable({
            "format_version": FORMAT_VERSION,
            "package_version": self.package_version,
            "classes": list(self.classes),
            "backbone": self.backbone,
            "weights_source": self.weights_source,
            "feature_tap": self.feature_tap,
            "extract_settings": self.extract_settings,
            "proposal_settings": self.proposal_settings,
            "feature_scaling": {"feat_scale": float(self.feat_scale),
                                "reg_feat_scale": self.regression_scale,
                                "target_mean_norm": FEAT_NORM_TARGET},
            "head": None if self.head is None else {"in_dim": self.head.in_dim,
                                                    "hidden": self.head.out_dim},
            "detection": {"nms_iou": float(self.nms_iou),
                          "score_threshold": float(self.score_threshold),
                          "max_detections": int(self.max_detections)},
            "training_stats": self.training_stats,
        })


@dataclass(frozen=True)
class TopProjection:
    """A model's linear first step (the head's fc6 before its ReLU, then the box regressors:
    R = H + 4K outputs) split for features ``x = [t | m]`` whose first T dimensions ``t`` are
    means of one map over each box.

    A box mean is linear in the map, so ``L_t (t - c_t)`` is the box mean of the map
    ``L_t (map - c_t)``, with R channels instead of T: for the ``grid`` tap (T = 1280 of
    D = 2816) that replaces T-channel box means and a (N x T) @ (T x R) product by one
    (cells x T) @ (T x R) product over the map's cells (300 instead of 2000 rows) and R-channel
    box means (detect on one thread: ~40 ms less per image). Where a box reaches outside the
    map its mean counts the outside as zero, so the centred map's mean differs from the
    centred mean by ``c_t (1 - coverage)``: :meth:`finish` adds ``L_t c_t (coverage - 1)``,
    coverage being the box mean of a map of ones. Inputs stay centred before any product
    (the head's standard deviations divide its weights: centring after would cancel in
    float32), so the result equals the unsplit product to float rounding (tested).
    """

    top_w: Any       # (R, T) float32 tensor: applied to the centred top map
    top_centre: Any  # (T,) float32 tensor: the head's mean of those dimensions
    top_shift: Any   # (R,) float32 tensor: top_w @ top_centre (the coverage correction)
    rest_w: Any      # (D - T, R) float32 tensor
    rest_centre: NDArray[np.float32]  # (D - T,)
    bias: Any        # (R,) float32 tensor

    @classmethod
    def of(cls, head: Head, regressors: NDArray[np.float32] | None, reg_scale: float,
           top: int) -> TopProjection:
        import torch

        mean = np.asarray(head.mean, np.float64)
        w = np.asarray(head.fc6_w, np.float64) / np.asarray(head.std, np.float64)
        b = np.asarray(head.fc6_b, np.float64)
        if regressors is not None:  # raw x: L x + b = L (x - mean) + (b + L mean)
            r = np.asarray(regressors, np.float64)
            lr = r[:, :, :-1].reshape(-1, r.shape[2] - 1) * reg_scale
            w = np.concatenate([w, lr])
            b = np.concatenate([b, r[:, :, -1].reshape(-1) + lr @ mean])
        if not 0 < top < w.shape[1]:
            raise ValueError(f"top must lie in (0, {w.shape[1]}), got {top}")
        t = torch.from_numpy

        def f32(a):
            return np.ascontiguousarray(a, np.float32)

        return cls(top_w=t(f32(w[:, :top])), top_centre=t(f32(mean[:top])),
                   top_shift=t(f32(w[:, :top] @ mean[:top])),
                   rest_w=t(f32(w[:, top:].T)), rest_centre=f32(mean[top:]), bias=t(f32(b)))

    @property
    def width(self) -> int:
        """R, the number of outputs."""
        return int(self.top_w.shape[0])

    def finish(self, pooled: Any, coverage: Any, rest: NDArray[np.float32]) -> Any:
        """The first step's outputs (N, R) float32 tensor from the box means of the
        projected map (N, R) tensor, the boxes' coverage (N,) tensor (box means of ones)
        and the remaining raw features ``rest`` (N, D - T)."""
        import torch

        x = torch.from_numpy(np.subtract(rest, self.rest_centre, dtype=np.float32))
        with torch.inference_mode():
            out = torch.addmm(self.bias, x, self.rest_w)
            out += pooled
            out.addr_(coverage - 1.0, self.top_shift)
        return out


# ---------------------------------------------------------------- save / load
def save_model(directory: str | Path, model: Model, overwrite: bool = False) -> Path:
    """Write ``model`` as a bundle folder; return the folder.

    Raises ``FileExistsError`` if a bundle is already there and ``overwrite`` is False, and
    :class:`ModelError` if the model is inconsistent (same checks as :func:`load_model`).
    """
    d = Path(directory)
    arrays = model.arrays()
    meta = model.to_json()
    _validate(meta, arrays, d / JSON_NAME)
    if not overwrite and bundle_exists(d):
        raise FileExistsError(f"{d}: holds a model bundle (use --overwrite to replace it)")
    d.mkdir(parents=True, exist_ok=True)
    data = npz_bytes(arrays)
    atomic_write_bytes(d / ARRAYS_NAME, data)
    digest = hashlib.sha256(data).hexdigest()
    meta["arrays"] = {"file": ARRAYS_NAME, "sha256": digest,
                      "shapes": {k: list(v.shape) for k, v in arrays.items()}}
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_text(d / JSON_NAME, text)
    return d


def bundle_exists(directory: str | Path) -> bool:
    """True if ``directory`` holds (part of) a model bundle."""
    d = Path(directory)
    return (d / JSON_NAME).exists() or (d / ARRAYS_NAME).exists()


def load_model(directory: str | Path) -> Model:
    """Read and validate a bundle folder; raise :class:`ModelError` on any problem."""
    d = Path(directory)
    jpath, apath = d / JSON_NAME, d / ARRAYS_NAME
    meta, arrays = read_bundle(d, JSON_NAME, ARRAYS_NAME, FORMAT_VERSION, ModelError,
                               "a model bundle")
    _validate(meta, arrays, apath, meta_path=jpath)
    det, fs = meta["detection"], meta["feature_scaling"]
    head = Head.from_arrays(arrays) if "head_fc6_w" in arrays else None
    return Model(
        classes=list(meta["classes"]), svm_weights=arrays["svm_weights"],
        svm_biases=arrays["svm_biases"], feat_scale=float(fs["feat_scale"]),
        svm_trained=arrays["svm_trained"], regressors=arrays.get("regressors"),
        regressor_trained=arrays.get("regressor_trained"), backbone=meta["backbone"],
        weights_source=meta["weights_source"], feature_tap=meta["feature_tap"],
        extract_settings=meta["extract_settings"], proposal_settings=meta["proposal_settings"],
        nms_iou=float(det["nms_iou"]), score_threshold=float(det["score_threshold"]),
        max_detections=int(det["max_detections"]), training_stats=meta["training_stats"],
        package_version=str(meta["package_version"]), head=head,
        reg_feat_scale=float(fs.get("reg_feat_scale", fs["feat_scale"])), source=str(jpath))


# ---------------------------------------------------------------- helpers
_REQUIRED = {"format_version": int, "package_version": str, "classes": list, "backbone": str,
             "weights_source": dict, "feature_tap": str, "extract_settings": dict,
             "proposal_settings": dict, "feature_scaling": dict, "detection": dict,
             "training_stats": dict}


def _validate(meta: dict[str, Any], arrays: dict[str, np.ndarray], path: Path,
              meta_path: Path | None = None) -> None:
    """Raise ModelError naming ``path`` (``meta_path`` for a bad setting of model.json)
    unless metadata and arrays are consistent."""
    def fail(problem: str) -> None:
        raise ModelError(f"{path}: {problem}")

    def fail_meta(problem: str) -> None:
        raise ModelError(f"{meta_path or path}: {problem}")

    for key, typ in _REQUIRED.items():
        if key not in meta:
            fail(f"missing key {key!r}")
        if not isinstance(meta[key], typ):
            fail(f"{key!r} must be a {typ.__name__}, got {type(meta[key]).__name__}")
    classes = meta["classes"]
    problem = class_names_problem(classes)
    if problem:
        fail(problem)
    for key in ("feat_scale", "reg_feat_scale"):
        scale = meta["feature_scaling"].get(key, 1.0 if key == "reg_feat_scale" else None)
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            fail(f"feature_scaling.{key} must be a positive number, got {scale!r}")
    det = meta["detection"]
    for key, setting in _DETECTION_KEYS.items():
        value = det.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            fail_meta(f"detection.{key} must be a number, got {value!r}")
        problem = cfgmod.check_value(setting, value)  # the same rule as the config's
        if problem:
            fail_meta(f"detection.{key} {problem}, got {value!r}")
    if "extractor" in meta["extract_settings"]:
        _validate_extractor(meta["extract_settings"]["extractor"], fail_meta)
    k = len(classes)
    for name in ("svm_weights", "svm_biases", "svm_trained"):
        if name not in arrays:
            fail(f"missing array {name!r}")
    w = arrays["svm_weights"]
    if w.ndim != 2 or w.shape[0] != k:
        fail(f"svm_weights has shape {w.shape}, expected ({k}, D) for {k} classes")
    dim = in_dim = w.shape[1]
    expected = {"svm_biases": (k,), "svm_trained": (k,)}
    head_names = ["head_" + n for n in HEAD_ARRAYS]
    if any(n in arrays for n in head_names):
        missing = [n for n in head_names if n not in arrays]
        if missing:
            fail(f"missing array(s) {missing} of the fc head")
        try:
            head = Head.from_arrays(arrays)
            head.check(k)
        except ValueError as e:
            fail(str(e))
        if head.out_dim != dim:
            fail(f"svm_weights has D={dim} but the head's fc7 has {head.out_dim} outputs")
        in_dim = head.in_dim
    if "regressors" in arrays or "regressor_trained" in arrays:
        expected.update({"regressors": (k, 4, in_dim + 1), "regressor_trained": (k,)})
    for name, shape in expected.items():
        if name not in arrays:
            fail(f"missing array {name!r}")
        if arrays[name].shape != shape:
            fail(f"{name} has shape {arrays[name].shape}, expected {shape} "
                 f"({k} classes, D={in_dim} features)")
    for name, a in arrays.items():
        if name.endswith("trained"):
            if a.dtype != np.bool_:
                fail(f"{name} must be bool, got {a.dtype}")
        elif a.dtype != np.float32:
            fail(f"{name} must be float32, got {a.dtype}")
        elif not np.isfinite(a).all():
            fail(f"{name} holds NaN or infinite values")
    ext_dim = meta["extract_settings"].get("dim")
    if ext_dim is not None and ext_dim != in_dim:
        fail(f"extract_settings.dim is {ext_dim} but the model reads D={in_dim}")


#: model.json ``detection`` keys and the [detect] settings whose rules they follow
_DETECTION_KEYS = {"nms_iou": "detect.nms_iou", "score_threshold": "detect.score_thresh",
                   "max_detections": "detect.max_per_image"}


def _validate_extractor(kw: Any, fail) -> None:
    """``extract_settings.extractor``: the FeatureExtractor arguments detect rebuilds."""
    from rcnn_cli.backbones import SHARED_ONLY_TAPS, TAPS  # no torch: info, early checks

    if not isinstance(kw, dict):
        fail(f"extract_settings.extractor must be an object, got {type(kw).__name__}")
    backbone, tap, mode = kw.get("backbone"), kw.get("tap"), kw.get("mode")
    if backbone not in TAPS:
        fail(f"extract_settings.extractor.backbone {backbone!r} is not one of "
             f"{', '.join(sorted(TAPS))}")
    if tap is not None and tap not in TAPS[backbone]:
        fail(f"extract_settings.extractor.tap {tap!r} is not a tap of {backbone} "
             f"({', '.join(sorted(TAPS[backbone]))})")
    if mode not in ("warp", "shared") or (mode == "warp" and (backbone, tap) in SHARED_ONLY_TAPS):
        fail(f"extract_settings.extractor.mode {mode!r} must be warp or shared"
             + (f" (tap {tap!r} needs shared)" if mode == "warp" else ""))


def _jsonable(obj: Any) -> Any:
    """Plain-JSON copy of settings: numpy scalars/arrays, tuples and paths converted."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} {obj!r} in {JSON_NAME}")
