"""Draw detections on images (OpenCV) and save them atomically.

Images are ``uint8`` RGB ``(H, W, 3)`` as returned by ``rcnn_cli.images.read_image``; boxes are
ours (float32 (N, 4) continuous x1y1x2y2, see ``rcnn_cli.boxes``). A box ``x1..x2`` covers
pixel columns ``round(x1) .. round(x2) - 1``; that is where its outline is drawn.
"""
from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray

from rcnn_cli.boxes import as_boxes
from rcnn_cli.store import atomic_write_bytes

#: 20 well separated RGB colours (matplotlib "tab10", then its light variants); classes beyond
#: these get golden-ratio hues.
_PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)
#: Ground-truth outline: white inside a black border, visible on any background.
GT_COLOR = (255, 255, 255)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def class_color(label: int) -> tuple[int, int, int]:
    """RGB colour of class ``label`` (distinct for the first 20, then golden-ratio hues)."""
    if label < len(_PALETTE):
        return _PALETTE[label]
    h = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def line_thickness(height: int, width: int) -> int:
    """Outline thickness in pixels for an image of this size (0.4 % of its mean side, >= 1)."""
    return max(1, round(0.004 * (height + width) / 2))


def _check_image(image: ArrayLike) -> NDArray[np.uint8]:
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
    return img


def _pixel_rect(box: NDArray[np.float32], h: int, w: int) -> tuple[int, int, int, int] | None:
    """Inclusive pixel corners of a continuous box, clipped to the image; None if outside."""
    x1, y1 = max(round(float(box[0])), 0), max(round(float(box[1])), 0)
    x2, y2 = min(round(float(box[2])) - 1, w - 1), min(round(float(box[3])) - 1, h - 1)
    if x2 < x1 or y2 < y1:
        return None
    return x1, y1, x2, y2


def _draw_label(img: NDArray[np.uint8], text: str, x: int, y: int, color: tuple[int, int, int],
                lw: int) -> None:
    """Text on a filled box of ``color`` above (x, y), or below it when there is no room."""
    w = img.shape[1]
    scale, thick = lw / 3, max(lw - 1, 1)
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
    pad = max(1, lw // 2)
    top = y - th - base - 2 * pad
    if top < 0:  # no room above: put the label inside the box, under its top edge
        top = y
    x = min(max(x, 0), max(w - tw - 2 * pad, 0))
    bottom = top + th + base + 2 * pad
    cv2.rectangle(img, (x, top), (x + tw + 2 * pad, bottom), color, cv2.FILLED)
    # black on light colours, white on dark ones (ITU-R BT.601 luma)
    luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    ink = (0, 0, 0) if luma > 140 else (255, 255, 255)
    cv2.putText(img, text, (x + pad, bottom - base - pad), _FONT, scale, ink, thick, cv2.LINE_AA)


def draw_detections(image: ArrayLike, boxes: ArrayLike, labels: ArrayLike,
                    scores: ArrayLike | None, class_names: Sequence[str],
                    gt_boxes: ArrayLike | None = None) -> NDArray[np.uint8]:
    """Return a copy of ``image`` with detections (and optionally ground truth) drawn.

    Args:
        image: uint8 (H, W, 3) RGB.
        boxes: (N, 4) x1y1x2y2 continuous pixels.
        labels: (N,) int class indices into ``class_names``.
        scores: (N,) floats shown as ``"name 0.93"``, or None for names only.
        class_names: names, index = label.
        gt_boxes: (G, 4) ground truth, drawn first in white with a black border.

    Returns:
        uint8 (H, W, 3) RGB; each detection outlined in :func:`class_color` of its label with
        thickness :func:`line_thickness`, its label on a filled background of the same colour.
        Detections are drawn lowest score first so the best ends on top.
    """
    img = np.ascontiguousarray(_check_image(image)).copy()
    h, w = img.shape[:2]
    b = as_boxes(boxes)
    lab = np.asarray(labels, np.int64).reshape(-1)
    sc = None if scores is None else np.asarray(scores, np.float64).reshape(-1)
    if len(lab) != len(b) or (sc is not None and len(sc) != len(b)):
        raise ValueError(f"boxes {b.shape}, labels {lab.shape} and scores "
                         f"{None if sc is None else sc.shape} must have the same length")
    if len(lab) and (lab.min() < 0 or lab.max() >= len(class_names)):
        raise ValueError(f"labels must be in [0, {len(class_names)}), got {lab.min()}..{lab.max()}")
    lw = line_thickness(h, w)
    # 1. ground truth underneath
    for box in as_boxes(gt_boxes if gt_boxes is not None else np.zeros((0, 4))):
        r = _pixel_rect(box, h, w)
        if r is not None:
            cv2.rectangle(img, r[:2], r[2:], (0, 0, 0), lw + 2)
            cv2.rectangle(img, r[:2], r[2:], GT_COLOR, lw)
    # 2. detections, best last; outlines first, then all labels so no outline hides a label
    order = np.argsort(sc, kind="stable") if sc is not None else np.arange(len(b))
    rects = [(i, _pixel_rect(b[i], h, w)) for i in order]
    for i, r in rects:
        if r is not None:
            cv2.rectangle(img, r[:2], r[2:], class_color(int(lab[i])), lw)
    for i, r in rects:
        if r is not None:
            text = class_names[lab[i]] if sc is None else f"{class_names[lab[i]]} {sc[i]:.2f}"
            _draw_label(img, text, r[0], r[1], class_color(int(lab[i])), lw)
    return img


def save_image(path: str | Path, image: ArrayLike) -> Path:
    """Write an RGB uint8 (H, W, 3) or grayscale (H, W) image; format from the extension.

    Parent folders are created; the file is written to a temp name and ``os.replace``-d
    into place, so a reader never sees a partial image.
    """
    path = Path(path)
    img = np.asarray(image)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"image must be uint8 (H, W, 3) or (H, W), got {img.dtype} {img.shape}")
    if img.ndim == 3:
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR)
    try:
        ok, buf = cv2.imencode(path.suffix or ".png", img)
    except cv2.error:
        ok = False
    if not ok:
        raise ValueError(f"path: OpenCV cannot encode {path.suffix!r} images ({path})")
    atomic_write_bytes(path, buf.tobytes())
    return path
