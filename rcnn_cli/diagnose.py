"""Detector diagnosis (Hoiem, Chodpathumwan and Dai, "Diagnosing error in object detectors",
ECCV 2012), the analysis the R-CNN paper used to explain its errors.

* **False-positive types** of the top-ranked detections of each class: ``Loc`` (IoU in
  [0.1, 0.5) with an object of the same class, or a duplicate of one already matched), ``Sim``
  (IoU >= 0.1 with an object of a class listed as similar), ``Oth`` (IoU >= 0.1 with an object
  of any other class), ``BG`` (IoU < 0.1 with every object). The first that applies wins.
* **Misses**: objects that no detection of their class overlaps at IoU >= 0.5, as recall by
  object size (COCO's area ranges, share of the image area) and aspect ratio, and whether a
  proposal covered them (so the proposals, not the scoring, lost them).
* **Sensitivity**: AP at IoU 0.3 / 0.5 / 0.7, and AP if every false positive of one type
  were removed (how much better localisation, say, would buy).
* **Pictures**: a stacked-area plot of the FP types against the number of top detections,
  and contact sheets of the worst false positives and of the misses.

Inputs are those of :mod:`rcnn_cli.evaluate`: detections ``dict[name, Detections]`` (boxes
(N, 4) float32 x1y1x2y2, scores (N,), labels (N,)) and ground truth ``dict[name, GT]``
(boxes (G, 4), labels (G,), difficult (G,)), both keyed by the same image names. Detections
are matched as :func:`rcnn_cli.evaluate.voc_eval` matches them (rank by score, best IoU
object of the class, difficult objects ignore their detections), so a detection that is a
false positive there is one of the four types here. IoU is :func:`rcnn_cli.boxes.box_iou`.
"""
from __future__ import annotations

import io
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from rcnn_cli.boxes import area, as_boxes, box_iou, widths_heights
from rcnn_cli.formats import Detections, as_detections, match_image_names
from rcnn_cli.store import atomic_write_bytes
from rcnn_cli.voc import VOC_IOU_THRESH, _as_gt, _nanmean, voc_eval

log = logging.getLogger(__name__)

#: False-positive types, in the order that decides (Hoiem et al. 2012, section 2).
FP_TYPES = ("Loc", "Sim", "Oth", "BG")
#: Below this IoU with every object a false positive is background; at or above it with an
#: object of its own class (and below the match threshold) it is poor localisation (Hoiem).
OVERLAP_IOU = 0.1
#: Multiples of the number of objects at which the FP types are counted (Hoiem's plots run
#: to several times the number of objects; R-CNN's figure to 4x on a log axis).
FP_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)
#: COCO area ranges in pixels^2: small < 32^2 <= medium < 96^2 <= large (cocoapi).
COCO_AREA_EDGES = (0.0, 32.0 ** 2, 96.0 ** 2, math.inf)
COCO_AREA_NAMES = ("small", "medium", "large")
#: Share of the image area covered by the object's box.
AREA_SHARE_EDGES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, math.inf)
#: Aspect ratio width / height: tall ... wide.
ASPECT_EDGES = (0.0, 0.5, 0.8, 1.25, 2.0, math.inf)
#: IoU thresholds of the sensitivity table and of proposal coverage.
SENSITIVITY_IOUS = (0.3, 0.5, 0.7)
PROPOSAL_IOUS = (0.5, 0.7)


# ---------------------------------------------------------------- similar classes
def parse_similar(text: str | None, classes: Sequence[str]) -> list[frozenset[int]]:
    """Groups of similar classes from ``"a,b;c,d"`` (groups split by ``;``, names by ``,``).

    Returns one frozenset of class indices per group; ``[]`` for None or "". Raises
    ValueError naming ``--similar`` and the first unknown class name.
    """
    if not text or not text.strip():
        return []
    index = {c: i for i, c in enumerate(classes)}
    groups = []
    for part in text.split(";"):
        names = [n.strip() for n in part.split(",") if n.strip()]
        if not names:
            continue
        unknown = [n for n in names if n not in index]
        if unknown:
            raise ValueError(f"--similar: unknown class {unknown[0]!r} (classes: "
                             f"{', '.join(classes[:20])})")
        if len(names) < 2:
            raise ValueError(f"--similar: group {part.strip()!r} needs two or more classes")
        groups.append(frozenset(index[n] for n in names))
    return groups


def _similar_to(c: int, groups: Sequence[frozenset[int]]) -> set[int]:
    return set().union(*(g for g in groups if c in g)) - {c} if groups else set()


# ---------------------------------------------------------------- FP types
@dataclass
class RankedDetections:
    """The detections of one class in rank order, each with its type.

    Attributes:
        images: (K,) image names.
        index: (K,) int, index of the detection within its image's Detections.
        scores: (K,) float32, descending.
        types: (K,) str: ``"TP"``, one of :data:`FP_TYPES`, or ``"ignored"`` (matched a
            difficult object).
        iou: (K,) float32, best IoU with an object of the same class (0 if none).
        nearest: (K,) int, index in the image's ground truth of the object (any class) with
            the highest IoU, -1 when the detection overlaps no object.
        npos: number of non-difficult objects of the class.
    """

    images: list[str]
    index: NDArray[np.int64]
    scores: NDArray[np.float32]
    types: NDArray[np.str_]
    iou: NDArray[np.float32]
    nearest: NDArray[np.int64]
    npos: int

    def ranked_fp_types(self) -> NDArray[np.str_]:
        """Types of the detections that count (TP or FP), rank order, ignored ones left out."""
        return self.types[self.types != "ignored"]


def classify_detections(dets: Mapping[str, Any], gts: Mapping[str, Any], num_classes: int,
                        similar: Sequence[frozenset[int]] = (),
                        iou_thresh: float = VOC_IOU_THRESH) -> dict[int, RankedDetections]:
    """Type every detection: TP, Loc, Sim, Oth, BG (or ignored), per class.

    Args:
        dets: image name -> detections; every key must be in ``gts``.
        gts: image name -> ground truth (boxes, labels, difficult).
        num_classes: C; labels are 0..C-1.
        similar: groups of similar class indices (:func:`parse_similar`).
        iou_thresh: match threshold (VOC 0.5).

    Returns:
        {class index: :class:`RankedDetections`}. Matching follows ``voc_eval``: rank by
        score (stable), take the object of the class with the highest IoU; at IoU >=
        ``iou_thresh`` a difficult object makes the detection ``ignored``, an unclaimed one
        makes it TP, a claimed one Loc (duplicate). Otherwise: Loc if that IoU >=
        :data:`OVERLAP_IOU`, else Sim / Oth if it overlaps an object of a similar / any other
        class at IoU >= :data:`OVERLAP_IOU`, else BG.
    """
    dets = {k: as_detections(v) for k, v in dets.items()}
    gts = {k: _as_gt(v) for k, v in gts.items()}
    unknown = [k for k in dets if k not in gts]
    if unknown:
        raise ValueError(f"dets: {len(unknown)} image(s) without ground truth, e.g. {unknown[0]!r}")
    ious = {k: box_iou(d.boxes, gts[k][0]) for k, d in dets.items()}  # (N, G) per image
    out: dict[int, RankedDetections] = {}
    for c in range(num_classes):
        sim = _similar_to(c, similar)
        names, idx = [], []
        for k, d in dets.items():
            for i in np.flatnonzero(d.labels == c):
                names.append(k)
                idx.append(int(i))
        scores = np.array([dets[k].scores[i] for k, i in zip(names, idx)], np.float32)
        order = np.argsort(-scores.astype(np.float64), kind="stable")
        claimed = {k: np.zeros(len(g[0]), bool) for k, g in gts.items()}
        types, best, nearest = [], [], []
        for r in order:
            k, i = names[r], idx[r]
            _, lab, diff = gts[k]
            row = ious[k][i]
            same = lab == c
            j = int(np.flatnonzero(same)[np.argmax(row[same])]) if same.any() else -1
            iou = float(row[j]) if j >= 0 else 0.0
            nearest.append(int(np.argmax(row)) if row.size and row.max() > 0 else -1)
            best.append(iou)
            if iou >= iou_thresh:
                if diff[j]:
                    types.append("ignored")
                elif not claimed[k][j]:
                    claimed[k][j] = True
                    types.append("TP")
                else:
                    types.append("Loc")  # duplicate of a matched object
            elif iou >= OVERLAP_IOU:
                types.append("Loc")
            else:
                other = row[~same] if row.size else row
                other_lab = lab[~same]
                on_sim = other[np.isin(other_lab, list(sim))] if sim else other[:0]
                if on_sim.size and on_sim.max() >= OVERLAP_IOU:
                    types.append("Sim")
                elif other.size and other.max() >= OVERLAP_IOU:
                    types.append("Oth")
                else:
                    types.append("BG")
        npos = int(sum(((g[1] == c) & ~g[2]).sum() for g in gts.values()))
        out[c] = RankedDetections([names[r] for r in order], np.array(idx, np.int64)[order]
                                  if idx else np.zeros(0, np.int64), scores[order],
                                  np.array(types, dtype="<U7"), np.array(best, np.float32),
                                  np.array(nearest, np.int64), npos)
    return out


def fp_type_counts(types: Sequence[str], n: int) -> dict[str, int]:
    """Counts of TP and of each FP type among the first ``n`` of ranked ``types``
    (ignored detections already left out, see :meth:`RankedDetections.ranked_fp_types`)."""
    top = np.asarray(types)[: max(int(n), 0)]
    return {"N": len(top), "TP": int((top == "TP").sum()),
            **{t: int((top == t).sum()) for t in FP_TYPES}}


def fp_type_table(ranked: Mapping[int, RankedDetections], classes: Sequence[str],
                  multiples: Sequence[float] = FP_MULTIPLES) -> dict[str, Any]:
    """FP-type counts per class and overall at ``N = multiple x #objects`` (and over all).

    Per class, N is ``round(m * npos)`` of that class's top detections; overall sums the
    classes (Hoiem's per-class normalisation, so a class with many detections does not
    swamp the others). Returns {"per_class": {name: {"<m>x": counts, "all": counts}},
    "overall": {...}}; counts as :func:`fp_type_counts`.
    """
    keys = [f"{m:g}x" for m in multiples] + ["all"]
    per_class, overall = {}, {k: dict.fromkeys(("N", "TP", *FP_TYPES), 0) for k in keys}
    for c, r in ranked.items():
        t = r.ranked_fp_types()
        row = {f"{m:g}x": fp_type_counts(t, round(m * r.npos)) for m in multiples}
        row["all"] = fp_type_counts(t, len(t))
        per_class[classes[c]] = row
        for k in keys:
            for f, v in row[k].items():
                overall[k][f] += v
    return {"per_class": per_class, "overall": overall}


def fp_type_curve(ranked: Mapping[int, RankedDetections], max_multiple: float = 4.0,
                  steps: int = 200) -> dict[str, NDArray[np.float64]]:
    """Fraction of each FP type among the false positives of the top detections.

    For ``m`` on a grid in (0, ``max_multiple``], each class contributes its top
    ``round(m * npos)`` detections. Returns {"multiple" (S,), "num_detections" (S,) total
    top detections, "num_fp" (S,), and one (S,) fraction array per FP type (0 where there is
    no false positive yet)}.
    """
    grid = np.linspace(max_multiple / steps, max_multiple, steps)
    num, fp = np.zeros(steps), np.zeros(steps)
    counts = {t: np.zeros(steps) for t in FP_TYPES}
    for r in ranked.values():
        t = r.ranked_fp_types()
        cum = {f: np.concatenate([[0], np.cumsum(t == f)]) for f in FP_TYPES}
        n = np.minimum(np.round(grid * r.npos).astype(int), len(t))
        num += n
        for f in FP_TYPES:
            counts[f] += cum[f][n]
            fp += cum[f][n]
    out = {"multiple": grid, "num_detections": num, "num_fp": fp}
    for f in FP_TYPES:
        out[f] = np.divide(counts[f], fp, out=np.zeros(steps), where=fp > 0)
    return out


def plot_fp_types(path: str | Path, curve: Mapping[str, NDArray], title: str) -> Path:
    """Stacked-area plot of :func:`fp_type_curve` (Hoiem et al. fig. 2; R-CNN fig. 5) as PNG."""
    from matplotlib.figure import Figure  # Figure + Agg: no pyplot global state, no display

    fig = Figure(figsize=(4.2, 3.2), dpi=100)
    ax = fig.add_subplot()
    colors = ("#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd")
    keep = curve["num_fp"] > 0  # fractions start at the first false positive
    x = curve["num_detections"][keep]
    if len(x):
        ax.stackplot(x, *(curve[t][keep] for t in FP_TYPES), labels=FP_TYPES, colors=colors,
                     alpha=0.85)
        for m in (1, 2, 4):  # where the top detections reach m x the number of objects
            if curve["multiple"][0] <= m <= curve["multiple"][-1]:
                xm = float(np.interp(m, curve["multiple"], curve["num_detections"]))
                ax.axvline(xm, color="k", lw=0.6, ls=":")
                ax.text(xm, 1.01, f"{m}x", ha="center", va="bottom", fontsize=7)
        ax.set_xlim(x[0], max(x[-1], x[0] + 1))
        ax.legend(loc="lower right", fontsize=7, framealpha=0.8)
    else:
        ax.text(0.5, 0.5, "no false positives", ha="center", va="center")
    ax.set(ylim=(0, 1), xlabel="top detections (per class, up to 4x its objects)",
           ylabel="fraction of false positives")
    ax.set_title(title, fontsize=9, pad=12)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---------------------------------------------------------------- misses
def find_misses(dets: Mapping[str, Any], gts: Mapping[str, Any],
                iou_thresh: float = VOC_IOU_THRESH) -> list[dict[str, Any]]:
    """Every non-difficult object, with whether a detection of its class found it.

    An object is *found* when any detection of its class (at any score) overlaps it at IoU
    >= ``iou_thresh``; otherwise it is missed. Returns one dict per object, images in
    ``gts`` order: {"image", "index" (in the image's ground truth), "label", "box" (4,),
    "found" (bool), "best_iou" with a same-class detection, "nearest_det" (index of the
    detection of any class with the highest IoU, -1 if none overlaps), "nearest_iou"}.
    """
    out = []
    for k, g in gts.items():
        b, lab, diff = _as_gt(g)
        d = as_detections(dets[k]) if k in dets else Detections.empty()
        iou = box_iou(b, d.boxes)  # (G, N)
        for j in np.flatnonzero(~diff):
            same = iou[j][d.labels == lab[j]]
            best = float(same.max()) if same.size else 0.0
            near = int(np.argmax(iou[j])) if iou.shape[1] and iou[j].max() > 0 else -1
            out.append({"image": k, "index": int(j), "label": int(lab[j]), "box": b[j],
                        "found": best >= iou_thresh, "best_iou": best, "nearest_det": near,
                        "nearest_iou": float(iou[j][near]) if near >= 0 else 0.0})
    return out


def _bin_names(edges: Sequence[float], fmt: str) -> list[str]:
    names = []
    for lo, hi in itertools.pairwise(edges):
        names.append(f">={fmt.format(lo)}" if math.isinf(hi) else
                     f"<{fmt.format(hi)}" if lo == 0 else f"{fmt.format(lo)}-{fmt.format(hi)}")
    return names


def recall_by_bins(values: ArrayLike, found: ArrayLike, edges: Sequence[float],
                   names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Objects, misses and recall per bin ``edges[i] <= value < edges[i+1]``.

    Returns {name: {"objects", "missed", "recall" (nan for an empty bin)}}.
    """
    v, f = np.asarray(values, np.float64), np.asarray(found, bool)
    which = np.digitize(v, edges[1:-1], right=False)  # 0 .. len(names) - 1
    out = {}
    for i, name in enumerate(names):
        m = which == i
        n, k = int(m.sum()), int((f & m).sum())
        out[name] = {"objects": n, "missed": n - k, "recall": k / n if n else math.nan}
    return out


def miss_analysis(misses: Sequence[Mapping[str, Any]], classes: Sequence[str],
                  image_sizes: Mapping[str, tuple[int, int]] | None = None,
                  proposals: Mapping[str, ArrayLike] | None = None) -> dict[str, Any]:
    """Recall by size and aspect ratio, per class, and proposal coverage of the misses.

    Args:
        misses: :func:`find_misses` output.
        classes: class names.
        image_sizes: image name -> (height, width); without it no area-share bins.
        proposals: image name -> proposal boxes (N, 4) (names matched by
            :func:`rcnn_cli.evaluate.match_image_names`); each missed object gets its best
            proposal IoU, the counts of misses covered at :data:`PROPOSAL_IOUS` are returned.

    Returns:
        {"objects", "missed", "recall", "per_class": {name: {"objects", "missed"}},
        "by_coco_size", "by_area_share" (or None), "by_aspect" (width / height): bins as
        :func:`recall_by_bins`; with proposals also "proposals": {"covered@0.5",
        "covered@0.7", "missed_objects", "images_without_proposals"}}. Each miss dict gets
        "proposal_iou" when proposals are given.
    """
    boxes = as_boxes([m["box"] for m in misses]) if misses else np.zeros((0, 4), np.float32)
    found = np.array([m["found"] for m in misses], bool)
    areas = area(boxes)
    w, h = widths_heights(boxes)
    out: dict[str, Any] = {"objects": len(misses), "missed": int((~found).sum()),
                           "recall": float(found.mean()) if len(found) else math.nan}
    labels = np.array([m["label"] for m in misses], np.int64)
    out["per_class"] = {name: {"objects": int((labels == c).sum()),
                               "missed": int(((labels == c) & ~found).sum())}
                        for c, name in enumerate(classes)}
    out["by_coco_size"] = recall_by_bins(areas, found, COCO_AREA_EDGES, COCO_AREA_NAMES)
    if image_sizes is not None and all(m["image"] in image_sizes for m in misses):
        img_area = np.array([float(np.prod(image_sizes[m["image"]])) for m in misses])
        share = np.divide(areas, img_area, out=np.zeros(len(areas)), where=img_area > 0)
        out["by_area_share"] = recall_by_bins(share, found, AREA_SHARE_EDGES,
                                              _bin_names(AREA_SHARE_EDGES, "{:.0%}"))
    else:
        out["by_area_share"] = None
    aspect = np.divide(w, h, out=np.full(len(w), np.inf), where=h > 0)
    out["by_aspect"] = recall_by_bins(aspect, found, ASPECT_EDGES,
                                      _bin_names(ASPECT_EDGES, "{:g}"))
    if proposals is not None:
        missed = [m for m in misses if not m["found"]]
        name_map = match_image_names(proposals.keys(), {m["image"] for m in misses})
        props = {name_map[k]: as_boxes(v) for k, v in proposals.items() if k in name_map}
        for m in missed:
            p = props.get(m["image"], np.zeros((0, 4), np.float32))
            iou = box_iou(as_boxes(m["box"][None]), p)
            m["proposal_iou"] = float(iou.max()) if iou.size else 0.0
        out["proposals"] = {
            **{f"covered@{t:g}": sum(m["proposal_iou"] >= t for m in missed)
               for t in PROPOSAL_IOUS},
            "missed_objects": len(missed),
            "images_without_proposals": sorted({m["image"] for m in missed} - set(props))}
    return out


# ---------------------------------------------------------------- sensitivity
def sensitivity(dets: Mapping[str, Any], gts: Mapping[str, Any], num_classes: int,
                ranked: Mapping[int, RankedDetections],
                ious: Sequence[float] = SENSITIVITY_IOUS) -> dict[str, Any]:
    """mAP at other IoU thresholds, and mAP with each FP type removed.

    Returns {"ap_at_iou": {"0.3": {"ap", "ap07"}, ...}, "ap_without": {"Loc": {"ap",
    "ap07"}, "Sim", "Oth", "BG"}}: mean over classes with objects (all-point and VOC07
    11-point AP). ``ap_without[t]`` drops every detection of type ``t`` (typed at the VOC
    threshold by :func:`classify_detections`) and scores the rest; removing false positives
    never lowers AP, so it is >= the plain AP.
    """
    dets = {k: as_detections(v) for k, v in dets.items()}

    def m_ap(d: Mapping[str, Detections], t: float) -> dict[str, float]:
        r = voc_eval(d, gts, num_classes, t)
        return {"ap": _nanmean(v["ap"] for v in r.values()),
                "ap07": _nanmean(v["ap07"] for v in r.values())}

    out: dict[str, Any] = {"ap_at_iou": {f"{t:g}": m_ap(dets, t) for t in ious}}
    out["ap_without"] = {}
    for f in FP_TYPES:
        keep = {k: np.ones(len(d), bool) for k, d in dets.items()}
        for r in ranked.values():
            for k, i, t in zip(r.images, r.index, r.types):
                if t == f:
                    keep[k][i] = False
        pruned = {k: Detections(d.boxes[keep[k]], d.scores[keep[k]], d.labels[keep[k]])
                  for k, d in dets.items()}
        out["ap_without"][f] = m_ap(pruned, VOC_IOU_THRESH)
    return out


# ---------------------------------------------------------------- pictures
#: Contact sheets: tile side in pixels, tiles per row, at most this many tiles per sheet.
TILE = 160
SHEET_COLS = 6
SHEET_MAX = 24
_CAPTION_H = 26


def _crop_and_draw(image: NDArray[np.uint8], focus: NDArray[np.float32],
                   det: tuple[NDArray, int, float] | None, gt: NDArray | None,
                   classes: Sequence[str]) -> NDArray[np.uint8]:
    """Crop around ``focus`` (and the other box), draw the detection and the ground truth,
    and fit the crop into a TILE x TILE square."""
    import cv2

    from rcnn_cli.visualize import draw_detections

    h, w = image.shape[:2]
    boxes = [focus] + ([det[0]] if det is not None else []) + ([gt] if gt is not None else [])
    b = as_boxes(boxes)
    x1, y1 = b[:, 0].min(), b[:, 1].min()
    x2, y2 = b[:, 2].max(), b[:, 3].max()
    pad = max(0.25 * max(x2 - x1, y2 - y1), 16.0)
    cx1, cy1 = int(max(0, math.floor(x1 - pad))), int(max(0, math.floor(y1 - pad)))
    cx2, cy2 = int(min(w, math.ceil(x2 + pad))), int(min(h, math.ceil(y2 + pad)))
    crop = image[cy1:max(cy2, cy1 + 1), cx1:max(cx2, cx1 + 1)]
    # resize first, then draw: outlines and labels the same size on every tile
    ch, cw = crop.shape[:2]
    s = TILE / max(ch, cw)
    small = cv2.resize(crop, (max(1, round(cw * s)), max(1, round(ch * s))),
                       interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    shift = np.array([cx1, cy1, cx1, cy1], np.float32)
    dboxes = ((as_boxes([det[0]]) - shift) * s if det is not None
              else np.zeros((0, 4), np.float32))
    small = draw_detections(np.ascontiguousarray(small), dboxes,
                            [det[1]] if det is not None else [],
                            [det[2]] if det is not None else [], classes,
                            gt_boxes=(as_boxes([gt]) - shift) * s if gt is not None else None)
    tile = np.full((TILE, TILE, 3), 32, np.uint8)
    oy, ox = (TILE - small.shape[0]) // 2, (TILE - small.shape[1]) // 2
    tile[oy:oy + small.shape[0], ox:ox + small.shape[1]] = small
    return tile


def contact_sheet(path: str | Path, tiles: Sequence[tuple[NDArray[np.uint8], str, str]],
                  title: str, cols: int = SHEET_COLS) -> Path:
    """Tile ``(image TILE x TILE, caption line 1, caption line 2)`` into one PNG with a title."""
    import cv2

    from rcnn_cli.visualize import save_image

    cols = max(1, min(cols, len(tiles)))
    rows = max(1, math.ceil(len(tiles) / cols))
    cell_h = TILE + _CAPTION_H
    font = cv2.FONT_HERSHEY_SIMPLEX
    title_w = cv2.getTextSize(title, font, 0.5, 1)[0][0] + 8
    sheet = np.full((24 + rows * cell_h, max(cols * TILE, title_w), 3), 255, np.uint8)
    cv2.putText(sheet, title, (4, 17), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for n, (img, line1, line2) in enumerate(tiles):
        y, x = 24 + (n // cols) * cell_h, (n % cols) * TILE
        sheet[y:y + TILE, x:x + TILE] = img
        for k, text in enumerate((line1, line2)):
            text = text if len(text) <= 30 else "..." + text[-27:]
            cv2.putText(sheet, text, (x + 3, y + TILE + 10 + 11 * k), font, 0.33, (0, 0, 0), 1,
                        cv2.LINE_AA)
    return save_image(path, sheet)


class _Images:
    """Decoded images by name, read once, from ``root / name``; failures are collected for
    one warning (:meth:`report`)."""

    def __init__(self, root: Path):
        self.root, self.cache, self.failed = Path(root), {}, []

    def get(self, name: str) -> NDArray[np.uint8] | None:
        from rcnn_cli.images import ImageError, read_image

        if name not in self.cache:
            try:
                self.cache[name] = read_image(self.root / name)
            except (ImageError, OSError) as e:
                self.failed.append(f"{name} ({e})")
                self.cache[name] = None
        return self.cache[name]

    def report(self, what: str) -> None:
        if self.failed:
            log.warning("%s: %d image(s) not readable under %s and left out, e.g. %s", what,
                        len(self.failed), self.root, self.failed[0])


def fp_sheet(path: str | Path, ranked: Mapping[int, RankedDetections],
             dets: Mapping[str, Detections], gts: Mapping[str, Any], classes: Sequence[str],
             images_dir: str | Path, limit: int = SHEET_MAX) -> Path:
    """Contact sheet of the highest-scoring false positives (all classes): each crop shows
    the detection with its score, the nearest ground truth (white), the FP type and IoU."""
    fps = [(float(r.scores[n]), c, n) for c, r in ranked.items()
           for n in range(len(r.types)) if r.types[n] in FP_TYPES]
    fps.sort(key=lambda x: -x[0])
    images, tiles = _Images(Path(images_dir)), []
    for score, c, n in fps[:limit]:
        r = ranked[c]
        k, i = r.images[n], int(r.index[n])
        img = images.get(k)
        if img is None:
            continue
        box = as_detections(dets[k]).boxes[i]
        gb = _as_gt(gts[k])[0]
        gt = gb[r.nearest[n]] if r.nearest[n] >= 0 else None
        iou = float(box_iou(box[None], gt[None])[0, 0]) if gt is not None else 0.0
        kind = "Loc dup" if r.types[n] == "Loc" and r.iou[n] >= VOC_IOU_THRESH else r.types[n]
        tiles.append((_crop_and_draw(img, box, (box, c, score), gt, classes),
                      f"{kind} {classes[c]} IoU {iou:.2f}", k))
    images.report("diagnosis sheet of false positives")
    return contact_sheet(path, tiles, f"highest-scoring false positives ({len(tiles)} of "
                                      f"{len(fps)}): detection + score, nearest object white")


def miss_sheet(path: str | Path, misses: Sequence[Mapping[str, Any]],
               dets: Mapping[str, Detections], classes: Sequence[str],
               images_dir: str | Path, limit: int = SHEET_MAX) -> Path:
    """Contact sheet of missed objects (white) with the detection (any class) overlapping
    each most and its score; captions give the best IoU of a detection of the object's class
    ("det") and, with proposals, of a proposal ("prop")."""
    missed = [m for m in misses if not m["found"]]
    images, tiles = _Images(Path(images_dir)), []
    for m in missed[:limit]:
        img = images.get(m["image"])
        if img is None:
            continue
        d = as_detections(dets[m["image"]]) if m["image"] in dets else Detections.empty()
        j = m["nearest_det"]
        det = (d.boxes[j], int(d.labels[j]), float(d.scores[j])) if j >= 0 else None
        extra = f" prop {m['proposal_iou']:.2f}" if "proposal_iou" in m else ""
        tiles.append((_crop_and_draw(img, m["box"], det, m["box"], classes),
                      f"{classes[m['label']]} det {m['best_iou']:.2f}{extra}", m["image"]))
    images.report("diagnosis sheet of misses")
    return contact_sheet(path, tiles, f"missed objects ({len(tiles)} of {len(missed)}): "
                                      "object white, most overlapping detection + score")


# ---------------------------------------------------------------- all of it
def _pct(counts: Mapping[str, int]) -> str:
    fp = sum(counts[t] for t in FP_TYPES)
    return " ".join(f"{t} {100 * counts[t] / fp:.0f}%" if fp else f"{t} -" for t in FP_TYPES)


def diagnose(dets: Mapping[str, Any], gts: Mapping[str, Any], classes: Sequence[str],
             out_dir: str | Path | None = None, similar: str | None = None,
             image_sizes: Mapping[str, tuple[int, int]] | None = None,
             proposals: Mapping[str, ArrayLike] | None = None,
             images_dir: str | Path | None = None) -> dict[str, Any]:
    """The whole diagnosis of one detector on one set of images.

    Args:
        dets: image name -> detections, keys in ``gts`` (as
            :func:`rcnn_cli.evaluate.attach_detections` returns them).
        gts: image name -> ground truth of the scored images.
        classes: class names (index = label).
        out_dir: where the plot (``diagnosis_fp_types.png``) and, with ``images_dir``, the
            contact sheets (``diagnosis_fp.png``, ``diagnosis_misses.png``) go; None: no files.
        similar: groups of similar classes, ``"a,b;c,d"`` (:func:`parse_similar`).
        image_sizes: image name -> (height, width), for the area-share bins.
        proposals: image name -> proposal boxes, for the coverage of the misses.
        images_dir: folder the image names are relative to (for the contact sheets).

    Returns:
        {"fp_types": :func:`fp_type_table`, "misses": :func:`miss_analysis` plus
        "missed_objects" (image, class, box, best_iou[, proposal_iou] of each miss),
        "sensitivity": :func:`sensitivity`, "similar": groups by name, "files": [paths],
        "summary": one line, e.g. ``FP@44: Loc 41% Sim 0% Oth 0% BG 59%; missed 5 of 44
        (0 small, 1 medium, 4 large); AP50 0.87, 0.93 without Loc FPs``}.
    """
    groups = parse_similar(similar, classes)
    dets = {k: as_detections(v) for k, v in dets.items()}
    # 1. type every detection, count the types at multiples of the number of objects
    ranked = classify_detections(dets, gts, len(classes), groups)
    table = fp_type_table(ranked, classes)
    # 2. misses, by size and shape; proposal coverage
    misses = find_misses(dets, gts)
    miss = miss_analysis(misses, classes, image_sizes, proposals)
    # 3. sensitivity to the IoU threshold and to each FP type
    sens = sensitivity(dets, gts, len(classes), ranked)
    npos = sum(r.npos for r in ranked.values())
    at1 = table["overall"]["1x"]
    sizes = ", ".join(f"{v['missed']} {k}" for k, v in miss["by_coco_size"].items())
    line = (f"FP@{npos}: {_pct(at1)}; missed {miss['missed']} of {miss['objects']} ({sizes})")
    if "proposals" in miss:
        p = miss["proposals"]
        line += (f"; a proposal covered {p['covered@0.5']} of the {p['missed_objects']} "
                 f"misses at IoU 0.5, {p['covered@0.7']} at 0.7")
    line += (f"; AP50 {sens['ap_at_iou']['0.5']['ap']:.3f}, "
             f"{sens['ap_without']['Loc']['ap']:.3f} without Loc FPs")
    miss["missed_objects"] = [
        {"image": m["image"], "class": classes[m["label"]],
         "box": [round(float(v), 2) for v in m["box"]], "best_iou": round(m["best_iou"], 4),
         **({"proposal_iou": round(m["proposal_iou"], 4)} if "proposal_iou" in m else {})}
        for m in misses if not m["found"]]
    result = {"fp_types": table, "misses": miss, "sensitivity": sens,
              "similar": [sorted(classes[i] for i in g) for g in groups], "files": [],
              "summary": line}
    # 4. pictures
    if out_dir is not None:
        out = Path(out_dir)
        files = [plot_fp_types(out / "diagnosis_fp_types.png", fp_type_curve(ranked),
                               f"FP types of the top detections ({npos} objects)")]
        if images_dir is not None:
            files.append(fp_sheet(out / "diagnosis_fp.png", ranked, dets, gts, classes,
                                  images_dir))
            files.append(miss_sheet(out / "diagnosis_misses.png", misses, dets, classes,
                                    images_dir))
        else:
            log.info("diagnosis: no --images folder, so no contact sheets of false positives "
                     "and misses")
        result["files"] = [str(p) for p in files]
    return result
