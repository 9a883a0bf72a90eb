"""The public Python API: a few lines for a detection, the same recipe as the CLI.

::

    from rcnn_cli import Detector, propose

    det = Detector("runs/model", device="cpu")   # loads and validates the bundle once
    result = det("photo.jpg")                    # or an (H, W, 3) uint8 RGB array, or a PIL image
    result.boxes, result.scores, result.labels, result.class_names
    results = det.predict(["a.jpg", "b.jpg"])
    boxes, scores = propose("photo.jpg", method="selective_search", strategy="fast")

:class:`Detector` runs :func:`rcnn_cli.detect.detect_image` (or, with ``dense=True``,
:func:`rcnn_cli.dense.detect_dense`), the per-image code of ``rcnn detect``, with the
post-processing settings ``rcnn detect`` would use: the model bundle's thresholds, then the
keyword overrides, the rest from ``default.toml``. :func:`propose` runs the proposal code of
``rcnn propose`` with the ``[propose]`` defaults of ``default.toml``. Boxes are float32
(N, 4) x1 y1 x2 y2 in original pixels, best first.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from numpy.typing import NDArray

from rcnn_cli import config as cfgmod

if TYPE_CHECKING:
    import PIL.Image

__all__ = ["DETECT_KEYS", "DetectionResult", "Detector", "ImageLike", "as_rgb_array", "propose"]

#: What :class:`Detector` and :func:`propose` accept as an image: a path, a PIL image or a
#: uint8 (H, W, 3) RGB array.
ImageLike = Union[str, Path, NDArray[np.uint8], "PIL.Image.Image"]

#: The ``[detect]`` settings a :class:`Detector` takes as keyword overrides (checked with
#: :data:`rcnn_cli.config.RULES`, like ``rcnn detect``'s flags).
DETECT_KEYS = ("score_thresh", "nms", "nms_iou", "box_vote_iou", "max_per_image",
               "bbox_regression")


@dataclass
class DetectionResult:
    """Detections of one image.

    Attributes:
        boxes (NDArray[M, 4] float32): x1 y1 x2 y2 in original pixels, best first.
        scores (NDArray[M] float32): SVM margins (higher is better).
        labels (NDArray[M] int64): indices into ``classes``.
        classes: the model's class names, in order.
        image_size: (height, width) of the image.
        times: seconds per step (proposals, features, scoring).
    """

    boxes: NDArray[np.float32]
    scores: NDArray[np.float32]
    labels: NDArray[np.int64]
    classes: list[str]
    image_size: tuple[int, int]
    times: dict[str, float] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        """The class name of each detection (M names, in the order of ``boxes``)."""
        return [self.classes[int(i)] for i in self.labels]

    def __len__(self) -> int:
        return len(self.scores)


def as_rgb_array(image: ImageLike, name: str = "image") -> NDArray[np.uint8]:
    """``image`` as uint8 (H, W, 3) RGB: a path is decoded as ``rcnn detect`` does
    (:func:`rcnn_cli.images.read_image`: grayscale, palette, alpha, 16-bit), a PIL image
    converted the same way, an array checked.

    Raises:
        ImageError: a path that cannot be decoded (names the file).
        ValueError: an array of another shape or dtype (names ``name`` and the shape).
    """
    from PIL import Image

    from rcnn_cli import images

    if isinstance(image, (str, Path)):
        return images.read_image(image)
    if isinstance(image, Image.Image):
        return images._to_rgb(image)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a path, a PIL image or a numpy array, got "
                        f"{type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name} must be a uint8 (H, W, 3) RGB array, got {image.dtype} "
                         f"{image.shape}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"{name} is empty: shape {image.shape}")
    return np.ascontiguousarray(image)


def _settings(section: str, values: Mapping[str, Any], allowed: Iterable[str] | None = None
              ) -> dict[str, dict[str, Any]]:
    """Defaults updated by ``values`` for ``section``, checked like a config file's (unknown
    key, wrong type or a value outside :data:`rcnn_cli.config.RULES`: ConfigError)."""
    if allowed is not None:
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise cfgmod.ConfigError(f"unknown setting(s) {unknown}; accepted: "
                                     f"{', '.join(allowed)}")
    return cfgmod.merge(cfgmod.defaults(), {section: dict(values)}, where="keyword argument")


class Detector:
    """A loaded model bundle that detects objects in images (what ``rcnn detect`` runs per
    image).

    Args:
        model_dir: bundle folder written by ``rcnn train-svm``.
        device: ``"auto"`` (cuda when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dense: score dense sliding windows instead of proposals (``rcnn detect --dense``).
        **overrides: ``[detect]`` settings (:data:`DETECT_KEYS`: ``score_thresh``, ``nms``,
            ``nms_iou``, ``box_vote_iou``, ``max_per_image``, ``bbox_regression``); the
            bundle's stored thresholds apply otherwise, as in ``rcnn detect``.

    Raises:
        ModelError: a missing or inconsistent bundle (one line naming the file).
        ConfigError: an unknown override or a value outside its allowed range.
        WeightsError: the backbone weights the model was trained with are not available.

    Example::

        det = Detector("runs/model", device="cpu", score_thresh=0.0)
        for r in det.predict(["a.jpg", "b.jpg"]):
            print(r.class_names, r.boxes)
    """

    def __init__(self, model_dir: str | Path, device: str = "auto", dense: bool = False,
                 **overrides: Any) -> None:
        from rcnn_cli import detect as det
        from rcnn_cli.features import FeatureExtractor
        from rcnn_cli.model import load_model

        cfg = _settings("detect", overrides, DETECT_KEYS)
        cfg = cfgmod.merge(cfg, {"common": {"device": device}}, where="device")
        self.model_dir = Path(model_dir)
        self.model = load_model(self.model_dir)
        # the bundle's thresholds unless overridden: the same rule as `rcnn detect`'s flags
        explicit = {k: cfg["detect"][k] for k in overrides}
        self.settings = det.model_detect_settings(self.model, cfg, explicit)
        self.extractor = FeatureExtractor(**det.model_extractor_kwargs(
            self.model, self.model_dir, device))
        self.dense = bool(dense)
        if self.dense:
            from rcnn_cli.dense import check_dense

            check_dense(self.extractor)

    @property
    def classes(self) -> list[str]:
        """The model's class names (``result.labels`` index them)."""
        return list(self.model.classes)

    @property
    def device(self) -> str:
        """Where the CNN runs (``"auto"`` resolved), e.g. ``"cpu"``."""
        return str(self.extractor.device)

    def __call__(self, image: ImageLike, proposals: Any = None) -> DetectionResult:
        """Detections of one image: a path, a PIL image or a uint8 (H, W, 3) RGB array.

        ``proposals``: (N, 4) boxes x1, y1, x2, y2 in the image's pixels to score instead of
        computing the model's (e.g. :func:`propose`'s, or precomputed ones: ``rcnn detect
        --proposals``), all of them (``rcnn detect --proposals`` keeps a propose folder's
        first ``max_proposals``, the model's ``[extract]`` setting); not with ``dense``.
        """
        from rcnn_cli.boxes import as_boxes
        from rcnn_cli.detect import detect_image

        if proposals is not None and self.dense:
            raise ValueError("proposals: dense windows replace the proposals")
        props = None if proposals is None else as_boxes(proposals)
        img = as_rgb_array(image)
        if self.dense:
            from rcnn_cli.dense import detect_dense

            out = detect_dense(img, self.model, self.extractor, self.settings)
        else:
            out = detect_image(img, self.model, self.extractor, self.settings, props)
        return DetectionResult(out["boxes"], out["scores"], out["labels"], self.classes,
                               (int(img.shape[0]), int(img.shape[1])), dict(out.get("times", {})))

    def predict(self, images: Iterable[ImageLike]) -> list[DetectionResult]:
        """Detections of each image of ``images`` (a list of results, in order)."""
        return [self(im) for im in images]

    def __repr__(self) -> str:
        return (f"Detector({str(self.model_dir)!r}, classes={self.classes}, "
                f"device={self.device!r})")


def propose(image: ImageLike, **settings: Any
            ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Candidate boxes of one image, as ``rcnn propose`` computes them.

    Args:
        image: a path, a PIL image or a uint8 (H, W, 3) RGB array.
        **settings: ``[propose]`` settings of ``default.toml`` (``method``, ``strategy``,
            ``max_side``, ``min_size``, ``top_k``, ``seed``, ``sliding_scales``,
            ``sliding_ratios``, ``sliding_stride``); the rest keep their defaults.

    Returns:
        (boxes (NDArray[N, 4] float32), scores (NDArray[N] float32)): x1 y1 x2 y2 in original
        pixels, best first.

    Raises:
        ConfigError: an unknown setting or a value outside its allowed range.
    """
    from rcnn_cli.stages import compute_proposals, proposal_settings, unused_propose_keys

    cfg = _settings("propose", settings, cfgmod.defaults()["propose"])
    unused = unused_propose_keys(cfg["propose"]["method"], settings)
    if unused:
        logging.getLogger("rcnn_cli.api").warning("%s: not read by method %r; ignored",
                                                  ", ".join(unused), cfg["propose"]["method"])
    boxes, scores = compute_proposals(as_rgb_array(image), proposal_settings(cfg["propose"]))
    return boxes.astype(np.float32), scores.astype(np.float32)
