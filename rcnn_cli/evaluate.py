"""Evaluate detections: PASCAL VOC AP (2007 11-point and 2010+ all-point) and COCO AP.

Also the readers and writers of the detect stage's result files, so that ``detect`` writes
exactly what ``evaluate`` reads:

* ``detections.csv``: header ``image,class,score,x1,y1,x2,y2``; ``image`` is the path relative
  to the images folder, ``class`` the class *name*, boxes ours (continuous x1y1x2y2).
* ``detections.json`` (COCO results: ``image_id, category_id, bbox`` xywh, ``score``) with
  ``images.json`` (COCO images list, every image even without detections) and
  ``categories.json`` (``id = class index + 1``, ``name``).
* VOC devkit ``comp4_det_test_<class>.txt`` and YOLO ``labels/<image>.txt`` (writers only).

Detections are passed around as ``dict[file_name, Detections]``; ground truth as
``dict[file_name, GT]`` where GT is anything with ``boxes, labels, difficult`` attributes
(e.g. ``datasets.ImageRecord``) or a tuple ``(boxes, labels, difficult)``.

Decisions, stated once here:

* IoU is the plain continuous IoU of :func:`rcnn_cli.boxes.box_iou`, *without* the devkit's
  "+1" pixel terms. Our boxes map a VOC box ``xmin..xmax`` (1-based, inclusive) to
  ``x1 = xmin - 1, x2 = xmax``, so ``x2 - x1 == xmax - xmin + 1``: on integer VOC boxes the
  continuous IoU equals the devkit's +1 IoU exactly, and no +1 is needed anywhere.
* A class with no (non-difficult) ground truth has AP ``nan`` (the devkit divides by zero
  too); the mAPs average the classes whose AP is defined. ``nan`` is written as ``null`` in
  JSON.
* COCO: VOC "difficult" objects become ``iscrowd = 1``, the only ignore flag COCOeval honours
  (it overwrites a dataset's own ``ignore`` with ``iscrowd``); mmdetection's VOC-to-COCO
  converter does the same. Crowd regions are matched by intersection over *detection* area
  and may absorb several detections, so this is a slightly more lenient ignore than VOC's.
  COCO's ``-1`` ("no ground truth in this area range") is reported as ``nan``. With no
  detections at all every COCO metric is 0.
* Detection image names are matched to ground-truth file names by relative path (POSIX
  separators, leading ``./`` dropped) and, failing that, by relative path without extension,
  then by file stem when the folders agree as far as both go, each only when that names
  exactly one ground-truth image (``a/img.jpg`` and ``b/img.jpg`` stay two images); see
  :func:`match_image_names`.
* Only images on both sides are scored: the images the detector processed (``images.json``;
  for a bare ``detections.csv``, the images named in it) that are annotated. The others are
  listed in ``metrics.json`` and in one warning, never counted as misses.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from rcnn_cli.boxes import as_boxes, from_xywh, to_xywh

# the result files, their Detections and the name matching live in rcnn_cli.formats, the VOC
# scoring core in rcnn_cli.voc (both re-exported here)
from rcnn_cli.formats import (  # noqa: F401  (re-exports)
    CSV_HEADER,
    VOC_DET_PREFIX,
    Detections,
    _coco_results,
    _norm_name,
    as_detections,
    match_image_names,
    safe_filename,
    voc_image_id,
    write_coco_results,
    write_detections_csv,
    write_voc_results,
    write_yolo_results,
    yolo_label_names,
)
from rcnn_cli.store import atomic_write_bytes, open_upstream
from rcnn_cli.voc import VOC_IOU_THRESH, _as_gt, _nanmean, voc_ap, voc_eval  # noqa: F401

log = logging.getLogger(__name__)

#: Keys of ``COCOeval.stats`` in order (pycocotools ``summarize``).
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


# ---------------------------------------------------------------- COCO
def _coco_gt_dict(gts: Mapping[str, Any], classes: Sequence[str],
                  image_sizes: Mapping[str, tuple[int, int]] | None) -> tuple[dict, dict[str, int]]:
    """In-memory COCO ground truth (image ids 1..N in ``gts`` order, category id = index + 1)
    and the file_name -> image id map."""
    ids = {k: i + 1 for i, k in enumerate(gts)}
    images, anns = [], []
    for k, g in gts.items():
        h, w = (image_sizes or {}).get(k, (0, 0))
        images.append({"id": ids[k], "file_name": k, "height": int(h), "width": int(w)})
        b, lab, d = _as_gt(g)
        for box, xywh, c, diff in zip(b, to_xywh(b), lab, d):
            anns.append({"id": len(anns) + 1, "image_id": ids[k], "category_id": int(c) + 1,
                         "bbox": [float(v) for v in xywh],
                         "area": float(xywh[2] * xywh[3]), "iscrowd": int(diff)})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(classes)]
    return {"images": images, "annotations": anns, "categories": cats}, ids


def coco_eval(dets: Mapping[str, Any], gts: Mapping[str, Any], classes: Sequence[str],
              image_sizes: Mapping[str, tuple[int, int]] | None = None) -> dict[str, float]:
    """COCO box AP with faster-coco-eval, ground truth built in memory.

    Args:
        dets: image file_name -> detections; keys must be in ``gts``.
        gts: image file_name -> ground truth; difficult objects become ``iscrowd = 1``.
        classes: class names, index = label.
        image_sizes: file_name -> (height, width), only copied into the images list.

    Returns:
        {"AP" (IoU .50:.95), "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
        "ARs", "ARm", "ARl"} as floats; ``nan`` where COCO reports -1 (no ground truth), all
        0 when there are no detections at all. COCO keeps the 100 best detections per image.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    dets = {k: as_detections(v) for k, v in dets.items()}
    unknown = [k for k in dets if k not in gts]
    if unknown:
        raise ValueError(f"dets: {len(unknown)} image(s) without ground truth, e.g. {unknown[0]!r}")
    gt_dict, ids = _coco_gt_dict(gts, classes, image_sizes)
    results = _coco_results(dets, ids)
    if not results:  # nothing detected: AP and AR are 0 (older faster-coco-eval crash here)
        return {k: 0.0 for k in COCO_KEYS}
    coco_gt = COCO(gt_dict, print_function=log.debug)
    coco_dt = coco_gt.loadRes(results)
    ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=log.debug)
    ev.run()
    stats = np.asarray(ev.stats, np.float64)[: len(COCO_KEYS)]
    return {k: (math.nan if v < 0 else float(v)) for k, v in zip(COCO_KEYS, stats)}


# ---------------------------------------------------------------- top level
def _unpack_ground_truth(dataset_or_gts: Any, classes: Sequence[str] | None):
    """(gts dict, image sizes dict, classes) from a Dataset or a dict of ground truths."""
    if hasattr(dataset_or_gts, "records"):
        recs = dataset_or_gts.records
        gts = {r.file_name: r for r in recs}
        sizes = {r.file_name: (r.height, r.width) for r in recs}
        classes = list(classes if classes is not None else dataset_or_gts.classes)
    elif isinstance(dataset_or_gts, Mapping):
        gts = dict(dataset_or_gts)
        sizes = {k: (g.height, g.width) for k, g in gts.items()
                 if hasattr(g, "height") and hasattr(g, "width")}
        if classes is None:
            raise ValueError("classes is required when dataset_or_gts is a dict")
        classes = list(classes)
    else:
        raise TypeError(f"dataset_or_gts must be a Dataset or a dict, got {type(dataset_or_gts)}")
    return gts, sizes, classes


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


def _first(names: Sequence[str], n: int = 5) -> str:
    """``'a', 'b', ... (k more)`` for a log line."""
    more = f" ... ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(repr(x) for x in names[:n]) + more


def _attach(gts: Mapping[str, Any], items: Mapping[str, Any], what: str, kind: str
            ) -> tuple[dict[str, Any], dict[str, Any], list[str], list[str]]:
    """Pair per-image records (detections, proposals) with ground-truth images by name.

    Returns (records by ground-truth name, the ground truth of those images in ``gts``
    order, annotated images without a record, record images without annotation); the two
    lists go into one warning line (counts and the first five names). Raises ValueError
    when no record matches an annotated image (one example of each side).
    """
    name_map = match_image_names(items.keys(), gts.keys())
    if not name_map:
        i0, g0 = next(iter(items), None), next(iter(gts), None)
        raise ValueError(f"no {kind} image matches an annotated image ({len(items)} {kind}, "
                         f"e.g. {i0!r}; {len(gts)} annotated, e.g. {g0!r})")
    matched = {name_map[k]: v for k, v in items.items() if k in name_map}
    scored = {k: g for k, g in gts.items() if k in matched}
    no_record = [k for k in gts if k not in matched]
    no_annotation = [k for k in items if k not in name_map]
    parts = []
    if no_record:
        parts.append(f"{len(no_record)} annotated image(s) have no {what} and are not scored "
                     f"(first: {_first(no_record)})")
    if no_annotation:
        parts.append(f"{len(no_annotation)} {kind} image(s) have no annotation and are "
                     f"ignored (first: {_first(no_annotation)})")
    if parts:
        log.warning("scoring %d image(s): %s", len(scored), "; ".join(parts))
    return matched, scored, no_record, no_annotation


def attach_detections(gts: Mapping[str, Any], dets: Mapping[str, Any]
                      ) -> tuple[dict[str, Detections], dict[str, Any], list[str], list[str]]:
    """Pair detection records with ground-truth images; score only images both sides have.

    Args:
        gts: file_name -> ground truth (every annotated image, after any split).
        dets: image name -> detections, one entry per image the detector *processed* (with
            or without detections); names matched by :func:`match_image_names`.

    Returns:
        (dets by ground-truth name, the ground truth of those images (``gts`` order),
        annotated images without a detection record, detection images without annotation).
        Both lists are logged in one warning line (counts and the first five names).

    Raises:
        ValueError: no detection image matches any annotated image (one example of each).
    """
    matched, scored, no_record, no_annotation = _attach(gts, dets, "detection record",
                                                        "detected")
    return ({k: as_detections(v) for k, v in matched.items()}, scored, no_record,
            no_annotation)


def one_sided_classes(voc: Mapping[int, Mapping[str, Any]], classes: Sequence[str]
                      ) -> tuple[list[str], list[str], str]:
    """Classes present on one side only, from :func:`voc_eval` results.

    Returns (classes with ground truth but no detections: their AP is 0 and counts in the
    mAP; classes with detections but no (non-difficult) ground truth: their AP is undefined
    and left out of the mAP; the note saying so, "" if both are empty).
    """
    only_gt = [classes[c] for c, r in voc.items() if r["npos"] and not r["num_dets"]]
    only_det = [classes[c] for c, r in voc.items() if r["num_dets"] and not r["npos"]]
    parts = []
    if only_gt:
        parts.append(f"class(es) with ground truth but no detections: {_first(only_gt, 10)} "
                     f"(AP 0, counted in the mAP)")
    if only_det:
        parts.append(f"class(es) with detections but no ground truth in the scored images: "
                     f"{_first(only_det, 10)} (AP undefined, left out of the mAP)")
    return only_gt, only_det, "; ".join(parts)


def evaluate_detections(dataset_or_gts: Any, dets: Mapping[str, Any],
                        classes: Sequence[str] | None = None, out_dir: str | Path | None = None,
                        plot: bool = True, iou_thresh: float = VOC_IOU_THRESH,
                        diagnosis: Mapping[str, Any] | None = None
                        ) -> tuple[dict[str, Any], list[Path]]:
    """VOC and COCO metrics of ``dets`` against a dataset, optionally written to ``out_dir``.

    Args:
        dataset_or_gts: a ``datasets.Dataset`` or a dict file_name -> ground truth.
        dets: image name -> detections, one entry for every image the detector processed
            (an image without detections has an empty entry); names are matched by
            :func:`match_image_names`. Only images on both sides are scored (see
            :func:`attach_detections`): annotated images without a detection record are not
            counted as misses, detections on images without annotation are dropped; both are
            listed in the metrics and in one warning.
        classes: class names; default the dataset's (required with a dict).
        out_dir: if given, ``metrics.json`` and, with ``plot``, one precision-recall PNG per
            class (``pr_<index>_<name>.png``) are written there, each atomically.
        iou_thresh: VOC matching IoU.
        diagnosis: if given, also run :func:`rcnn_cli.diagnose.diagnose` on the scored
            images with these keyword arguments (``similar``, ``proposals``, ``images_dir``);
            its result goes under ``metrics["diagnosis"]``, its pictures into ``out_dir``.

    Returns:
        (metrics, files written). metrics: {"num_images" (scored), "num_detections",
        "iou_thresh", "classes", "per_class": {name: {"ap_voc07", "ap_voc", "npos",
        "num_dets"}}, "mAP_voc07", "mAP_voc", "coco": {see :func:`coco_eval`},
        "unmatched_images" (detected, not annotated), "annotated_without_detection_record",
        "classes_only_in_ground_truth", "classes_only_in_detections", "class_note",
        "summary" (one line), with ``diagnosis`` also "diagnosis"}.

    Raises:
        ValueError: no detection image matches an annotated image, or a label is out of range.
    """
    gts, sizes, classes = _unpack_ground_truth(dataset_or_gts, classes)
    # 1. attach detections to ground-truth images; score only the images on both sides
    matched, gts, no_record, unmatched = attach_detections(gts, dets)
    bad = [int(c) for d in matched.values() for c in d.labels if not 0 <= c < len(classes)]
    if bad:
        raise ValueError(f"dets: label {bad[0]} out of range for {len(classes)} classes")
    # 2. VOC per class, then COCO over all classes
    voc = voc_eval(matched, gts, len(classes), iou_thresh)
    coco = coco_eval(matched, gts, classes, sizes)
    per_class = {n: {"ap_voc07": voc[c]["ap07"], "ap_voc": voc[c]["ap"], "npos": voc[c]["npos"],
                     "num_dets": voc[c]["num_dets"]} for c, n in enumerate(classes)}
    # 3. classes seen on one side only: one warning
    only_gt, only_det, note = one_sided_classes(voc, classes)
    if note:
        log.warning("%s", note)
    metrics = {
        "num_images": len(gts),
        "num_detections": int(sum(len(d) for d in matched.values())),
        "iou_thresh": iou_thresh,
        "classes": list(classes),
        "per_class": per_class,
        "mAP_voc07": _nanmean(voc[c]["ap07"] for c in voc),
        "mAP_voc": _nanmean(voc[c]["ap"] for c in voc),
        "coco": coco,
        "unmatched_images": unmatched,
        "annotated_without_detection_record": no_record,
        "classes_only_in_ground_truth": only_gt,
        "classes_only_in_detections": only_det,
        "class_note": note,
    }
    metrics["summary"] = (f"mAP VOC07 {metrics['mAP_voc07']:.4f}, VOC {metrics['mAP_voc']:.4f}, "
                          f"COCO AP {coco['AP']:.4f} AP50 {coco['AP50']:.4f} "
                          f"({len(gts)} images, {metrics['num_detections']} detections)")
    written: list[Path] = []
    # 4. where the errors come from (Hoiem et al.)
    if diagnosis is not None:
        from rcnn_cli.diagnose import diagnose

        metrics["diagnosis"] = diagnose(matched, gts, classes, out_dir=out_dir,
                                        image_sizes=sizes, **diagnosis)
        written.extend(Path(p) for p in metrics["diagnosis"]["files"])
    # 5. files
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.json"
        atomic_write_bytes(path, json.dumps(_nan_to_none(metrics), indent=2).encode())
        written.append(path)
        if plot:
            for c, name in enumerate(classes):
                written.append(plot_pr_curve(out / f"pr_{c:02d}_{safe_filename(name)}.png", name, voc[c]))
    return metrics, written


def plot_pr_curve(path: str | Path, name: str, result: Mapping[str, Any]) -> Path:
    """Write the precision-recall curve of one class (a :func:`voc_eval` entry) as a PNG."""
    from matplotlib.figure import Figure  # Figure + Agg: no pyplot global state, no display

    fig = Figure(figsize=(5, 4), dpi=100)
    ax = fig.add_subplot()
    rec, prec = result["recall"], result["precision"]
    if result["npos"] and len(rec):
        ax.plot(rec, prec, lw=1, alpha=0.6, label="precision")
        # the all-point AP is the area under this envelope (see voc_ap)
        mrec = np.concatenate([[0.0], rec, [1.0]])
        mpre = np.maximum.accumulate(np.concatenate([[0.0], prec, [0.0]])[::-1])[::-1]
        ax.step(mrec, mpre, where="pre", lw=1.5, label="interpolated")
        ax.legend(loc="lower left")
    elif not result["npos"]:
        ax.text(0.5, 0.5, "no ground truth", ha="center", va="center")
    ap, ap07 = result["ap"], result["ap07"]
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"{name}: AP {ap:.3f} (VOC07 {ap07:.3f}), {result['npos']} objects")
    ax.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---------------------------------------------------------------- readers
class DetectionsError(ValueError):
    """A detections file that cannot be read (one line naming the file, and the row)."""


def _index_of(names: Sequence[str]) -> dict[str, int]:
    return {n: i for i, n in enumerate(names)}


def _number(path: Path, row: int, key: str, value: str | None) -> float:
    """``float(value)`` or a :class:`DetectionsError` naming the file, the row and the column."""
    if value is None or value == "":
        raise DetectionsError(f"{path}:{row}: missing value for {key}")
    try:
        v = float(value)
    except ValueError:
        raise DetectionsError(f"{path}:{row}: {key} {value!r} is not a number") from None
    if not math.isfinite(v):
        raise DetectionsError(f"{path}:{row}: {key} {value!r} is not a finite number")
    return v


def read_detections_csv(path: str | Path, classes: Sequence[str] | None = None
                        ) -> tuple[dict[str, Detections], list[str]]:
    """Read ``detections.csv`` (columns ``image,class,score,x1,y1,x2,y2`` in any order; other
    columns are ignored). Without ``classes``, classes are the names in order of first
    appearance. Returns (dets by image, classes).

    Raises:
        DetectionsError: a missing column, or a row with a missing or non-numeric value or
            an unknown class (the message names the file and the row).
    """
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [k for k in CSV_HEADER if k not in (reader.fieldnames or ())]
            if missing:
                raise DetectionsError(f"{path}: missing column(s) {', '.join(missing)} (the "
                                      f"header must hold {','.join(CSV_HEADER)})")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise DetectionsError(f"{path}: not a readable CSV file ({e})") from None
    for n, r in enumerate(rows, start=2):
        for k in ("image", "class"):
            if not r.get(k):
                raise DetectionsError(f"{path}:{n}: missing value for {k}")
    names = list(classes) if classes is not None else list(dict.fromkeys(r["class"] for r in rows))
    index = _index_of(names)
    per_image: dict[str, list] = {}
    for n, r in enumerate(rows, start=2):
        if r["class"] not in index:
            raise DetectionsError(f"{path}:{n}: unknown class {r['class']!r}")
        box = [_number(path, n, k, r[k]) for k in ("x1", "y1", "x2", "y2")]
        per_image.setdefault(r["image"], []).append(
            (box, _number(path, n, "score", r["score"]), index[r["class"]]))
    dets = {k: Detections(np.array([v[0] for v in rows_], np.float32).reshape(-1, 4),
                          [v[1] for v in rows_], [v[2] for v in rows_])
            for k, rows_ in per_image.items()}
    return dets, names


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DetectionsError(f"{path}: not a readable JSON file ({e})") from None


def read_coco_results(out_dir: str | Path, classes: Sequence[str] | None = None
                      ) -> tuple[dict[str, Detections], list[str]]:
    """Read ``detections.json`` + ``images.json`` (+ ``categories.json``, or ``categories``
    inside an images.json that is a dict). Every listed image appears, possibly empty.
    Categories are mapped to ``classes`` by name; without ``classes``, classes are the
    category names by id. Returns (dets by file_name, classes).

    Raises:
        DetectionsError: unreadable JSON, a missing field, an unknown image or category id
            (one line naming the file).
    """
    out = Path(out_dir)
    images = _read_json(out / "images.json")
    cats = None
    try:
        if isinstance(images, dict):
            cats, images = images.get("categories"), images["images"]
        if cats is None and (out / "categories.json").exists():
            cats = _read_json(out / "categories.json")
        if cats is None:
            raise DetectionsError(f"{out}: no categories.json and no categories in images.json")
        cats = sorted(cats, key=lambda c: c["id"])
        names = list(classes) if classes is not None else [c["name"] for c in cats]
        id_to_name = {im["id"]: im["file_name"] for im in images}
    except (KeyError, TypeError) as e:
        raise DetectionsError(f"{out}: images.json or categories.json lacks field {e}") from None
    index = _index_of(names)
    missing = [c["name"] for c in cats if c["name"] not in index]
    if missing:
        raise DetectionsError(f"{out}: category {missing[0]!r} is not one of the classes")
    cat_to_label = {c["id"]: index[c["name"]] for c in cats}
    per_image: dict[str, list] = {name: [] for name in id_to_name.values()}
    path = out / "detections.json"
    for n, r in enumerate(_read_json(path)):
        try:
            if r["image_id"] not in id_to_name or r["category_id"] not in cat_to_label:
                raise DetectionsError(f"{path}: result {n}: unknown image_id {r['image_id']} or "
                                      f"category_id {r['category_id']}")
            box = [float(v) for v in r["bbox"]]
            score = float(r["score"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, DetectionsError):
                raise
            raise DetectionsError(f"{path}: result {n}: bad or missing field ({e})") from None
        if len(box) != 4 or not all(map(math.isfinite, [*box, score])):
            raise DetectionsError(f"{path}: result {n}: bbox must be 4 finite numbers and "
                                  f"score finite, got {r['bbox']!r} and {r['score']!r}")
        per_image[id_to_name[r["image_id"]]].append((box, score, cat_to_label[r["category_id"]]))
    dets = {k: Detections(from_xywh(np.array([v[0] for v in rs], np.float32).reshape(-1, 4)),
                          [v[1] for v in rs], [v[2] for v in rs])
            for k, rs in per_image.items()}
    return dets, names


def read_detections(out_dir: str | Path, classes: Sequence[str] | None = None
                    ) -> tuple[dict[str, Detections], list[str]]:
    """Read the detect stage's outputs from ``out_dir`` (or a ``.csv``/``detections.json`` path).

    COCO files (``detections.json`` + ``images.json``) are preferred when present, since
    they also list images without detections; otherwise ``detections.csv``. Class names are
    mapped to indices of ``classes`` (default: the names found in the files).
    Returns (dets by image name, classes).
    """
    p = Path(out_dir)
    if p.is_file():
        if p.suffix.lower() == ".csv":
            return read_detections_csv(p, classes)
        return read_coco_results(p.parent, classes)
    if (p / "detections.json").exists() and (p / "images.json").exists():
        return read_coco_results(p, classes)
    if (p / "detections.csv").exists():
        return read_detections_csv(p / "detections.csv", classes)
    raise FileNotFoundError(f"{p}: no detections.json + images.json or detections.csv")


# ---------------------------------------------------------------- proposals
#: IoU thresholds of average recall (Hosang et al., "What makes for effective detection
#: proposals?", TPAMI 2016: AR = mean recall over IoU 0.5:0.05:0.95).
def evaluate_proposals(dataset_or_gts: Any, proposals: Mapping[str, ArrayLike],
                       classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Recall and ABO of proposal boxes against ground truth (difficult objects left out).

    The numbers come from :func:`rcnn_cli.proposals.metrics.proposal_recall` (recall at IoU
    0.5/0.7, AR over 0.5:0.05:0.95, per-class ABO and MABO, and the recall-vs-#boxes curve);
    this function attaches proposals to ground-truth images by name.

    Args:
        dataset_or_gts: a ``datasets.Dataset`` or a dict file_name -> ground truth.
        proposals: image name -> boxes (N, 4) best first, one entry per image the proposal
            stage processed; names matched by :func:`match_image_names`. Only images on both
            sides are scored; annotated images without proposals are listed in
            ``missing_images`` and in one warning, not counted as misses.

    Returns:
        {"num_images" (scored), "num_objects", "mean_proposals" per image,
        "missing_images" (annotated, no proposals), "recall@0.5", "recall@0.7",
        "average_recall", "ABO" per class, "MABO", "curve", "summary"}.

    Raises:
        ValueError: no proposal image matches an annotated image.
    """
    from rcnn_cli.proposals.metrics import proposal_recall

    gts, _, classes = _unpack_ground_truth(dataset_or_gts, classes)
    props, gts, missing, _ = _attach(gts, proposals, "proposals", "proposal")
    props = {k: as_boxes(v) for k, v in props.items()}
    plist, glist, llist = [], [], []
    for k, g in gts.items():
        b, labels, d = _as_gt(g)
        plist.append(props[k])
        glist.append(b[~d])
        llist.append(labels[~d])
    r = proposal_recall(plist, glist, labels=llist, class_names=list(classes))
    abo = {name: float(r["per_class"].get(name, {}).get("abo", math.nan)) for name in classes}
    m = {"num_images": len(gts), "num_objects": int(r["num_gt"]),
         "mean_proposals": float(np.mean([len(v) for v in props.values()])) if props else 0.0,
         "missing_images": missing,
         "recall@0.5": float(r["recall@0.5"]), "recall@0.7": float(r["recall@0.7"]),
         "average_recall": float(r["ar"]), "ABO": abo, "MABO": _nanmean(abo.values()),
         "curve": r["curve"], "by_size": _proposal_recall_by_size(plist, glist)}
    m["summary"] = (f"recall@0.5 {m['recall@0.5']:.4f}, recall@0.7 {m['recall@0.7']:.4f}, "
                    f"AR {m['average_recall']:.4f}, MABO {m['MABO']:.4f} ({m['num_objects']} "
                    f"objects, {m['mean_proposals']:.0f} proposals per image); recall@0.7 by "
                    "size (small/medium/large) " + "/".join(
                        f"{v['recall@0.7']:.2f}" for v in m["by_size"].values()))
    return m


def _proposal_recall_by_size(props: Sequence[NDArray[np.float32]],
                             gts: Sequence[NDArray[np.float32]]) -> dict[str, dict[str, Any]]:
    """Recall at IoU 0.5 / 0.7 and ABO of proposals per COCO object size (small < 32^2 <=
    medium < 96^2 <= large pixels^2): does propose's max_side / min_size lose small objects?
    Returns {"small" | "medium" | "large": {"objects", "recall@0.5", "recall@0.7", "ABO"}}
    (nan for an empty bin)."""
    from rcnn_cli.boxes import area, box_iou
    from rcnn_cli.diagnose import COCO_AREA_EDGES, COCO_AREA_NAMES

    best = [box_iou(g, p).max(1) if len(p) else np.zeros(len(g), np.float32)
            for g, p in zip(gts, props) if len(g)]
    best_iou = np.concatenate(best) if best else np.zeros(0)
    areas = np.concatenate([area(g) for g in gts]) if gts else np.zeros(0)
    which = np.digitize(areas, COCO_AREA_EDGES[1:-1])
    out = {}
    for i, name in enumerate(COCO_AREA_NAMES):
        b = best_iou[which == i]
        n = len(b)
        out[name] = {"objects": n, "recall@0.5": float((b >= 0.5).mean()) if n else math.nan,
                     "recall@0.7": float((b >= 0.7).mean()) if n else math.nan,
                     "ABO": float(b.mean()) if n else math.nan}
    return out


def read_detections_for(classes: Sequence[str], detections: str | Path
                        ) -> tuple[dict[str, Detections], list[str]]:
    """Read detections and number their classes after ``classes`` (the ground truth's).

    Classes the detector has that the ground truth lacks are appended after ``classes``
    (their AP is then undefined and left out of the mAP, see :func:`one_sided_classes`)
    instead of failing the read. Returns (dets, the extended class list).
    """
    dets, det_classes = read_detections(detections)
    names = list(classes) + [c for c in det_classes if c not in classes]
    index = _index_of(names)
    lut = np.array([index[c] for c in det_classes] or [0], np.int64)
    return {k: Detections(d.boxes, d.scores, lut[d.labels]) for k, d in dets.items()}, names


def _split_filter(annotations: str | Path, split: str | Path | None, names: Iterable[str]
                  ) -> set[str] | None:
    """Names (detection or proposal images) outside ``split``, or None without a split.

    A name is inside when its relative path without extension, its stem or its relative path
    is listed (the rule of ``rcnn_cli.images.list_images``); ``split`` is a file or a VOC
    split name (``test``) resolved as ``datasets.load_dataset`` does.
    """
    from rcnn_cli.datasets import find_split_file
    from rcnn_cli.images import read_split

    if split is None:
        return None
    path = Path(split) if Path(split).exists() else find_split_file(Path(annotations), str(split))
    if path is None:
        return None
    wanted = set(read_split(path))
    outside = set()
    for n in names:
        p = PurePosixPath(_norm_name(n))
        if not {p.with_suffix("").as_posix(), p.stem, p.as_posix()} & wanted:
            outside.add(n)
    return outside


def _add_localization(metrics: dict[str, Any], ds: Any, dets: Mapping[str, Any],
                      classes: Sequence[str], detections_dir: str | Path, out: Path
                      ) -> dict[str, Any]:
    """Add the CLS-LOC scores of a `rcnn localize predict` output (one prediction per image:
    classification accuracy, localisation accuracy, mean IoU; per-part IoU for K-part
    models) to ``metrics`` and rewrite ``metrics.json``."""
    from rcnn_cli import localize as L

    marker = json.loads((Path(detections_dir) / "localize.json").read_text())
    names = match_image_names(dets.keys(), [r.file_name for r in ds.records])
    preds = {names[k]: v for k, v in dets.items() if k in names}
    fn = L.parts_metrics if marker.get("parts") else L.localization_metrics
    loc = fn(ds, preds, classes=list(classes))
    metrics = {**metrics, "localization": loc}
    if not marker.get("parts"):
        metrics["summary"] += (f"; localisation: cls. acc. {loc['classification_accuracy']:.3f},"
                               f" loc. acc. {loc['localization_accuracy']:.3f}, "
                               f"mean IoU {loc['mean_iou']:.3f}")
    atomic_write_bytes(out / "metrics.json", json.dumps(_nan_to_none(metrics), indent=2).encode())
    return metrics


def evaluate_folder(annotations: str | Path, detections_dir: str | Path | None,
                    proposals_dir: str | Path | None, split: str | Path | None,
                    out: str | Path | None, cfg: Mapping[str, Any], diagnose: bool = False,
                    similar: str | None = None, images_dir: str | Path | None = None
                    ) -> tuple[dict[str, Any], Path]:
    """Score the outputs of ``rcnn detect`` (or ``rcnn propose``) against annotations.

    Args:
        annotations: anything ``datasets.load_dataset`` reads.
        detections_dir: a detect output folder (see :func:`read_detections`); or
        proposals_dir: a propose output folder (per-image npz with ``boxes``); with
            ``diagnose`` it may come with ``detections_dir``: the diagnosis then says which
            missed objects a proposal covered.
        split: optional split file (or VOC split name) restricting the ground truth.
        out: where ``metrics.json`` (and the PR plots) go; default the evaluated folder.
        cfg: resolved config; uses ``cfg["evaluate"]["iou"]``.
        diagnose: also diagnose the detections (:func:`rcnn_cli.diagnose.diagnose`): FP
            types, misses, sensitivity, plot; contact sheets when ``images_dir`` is given.
        similar: groups of similar classes for the diagnosis, ``"a,b;c,d"``.
        images_dir: folder the image names are relative to (contact sheets).

    Detections are scored on the images the detector processed (``images.json``; for a
    bare ``detections.csv``, the images named in it) that are also annotated; see
    :func:`evaluate_detections` for the warnings. ``split`` restricts both sides: records
    of images outside it are left out without a warning. Proposals likewise.

    Returns:
        (metrics, path of metrics.json).

    Raises:
        rcnn_cli.datasets.AnnotationError: no classes in the annotations (a COCO file
            without ``categories``).
        DetectionsError: an unreadable detections file (names the file and row).
        ValueError: nothing to score (no image on both sides), a bad ``similar``.
    """
    from rcnn_cli.datasets import AnnotationError, load_dataset

    if diagnose and detections_dir is None:
        raise ValueError("the diagnosis needs detections_dir")
    if not diagnose and (detections_dir is None) == (proposals_dir is None):
        raise ValueError("give exactly one of detections_dir and proposals_dir")
    ds = load_dataset(annotations, split)
    if not ds.classes:
        hint = (" (a COCO file needs a non-empty `categories` list)"
                if Path(annotations).suffix.lower() == ".json" else "")
        raise AnnotationError(f"{annotations}: no object classes found{hint}")
    out = Path(out if out is not None else (detections_dir or proposals_dir))
    if detections_dir is not None:
        dets, classes = read_detections_for(ds.classes, detections_dir)
        outside = _split_filter(annotations, split, dets) or set()
        dets = {k: v for k, v in dets.items() if k not in outside}
        iou = float(cfg.get("evaluate", {}).get("iou", VOC_IOU_THRESH))
        diag = None
        if diagnose:
            from rcnn_cli.diagnose import parse_similar

            parse_similar(similar, classes)  # a bad --similar fails before any work
            diag = {"similar": similar, "images_dir": images_dir,
                    "proposals": read_proposals(proposals_dir) if proposals_dir else None}
        metrics, _ = evaluate_detections(ds, dets, classes=classes, out_dir=out, iou_thresh=iou,
                                         diagnosis=diag)
        if (Path(detections_dir) / "localize.json").is_file():  # `rcnn localize predict`
            metrics = _add_localization(metrics, ds, dets, classes, detections_dir, out)
        return metrics, out / "metrics.json"
    from rcnn_cli.proposals.metrics import plot_recall_curve

    props = read_proposals(proposals_dir)
    outside = _split_filter(annotations, split, props) or set()
    metrics = evaluate_proposals(ds, {k: v for k, v in props.items() if k not in outside})
    path = out / "metrics.json"
    atomic_write_bytes(path, json.dumps(_nan_to_none(metrics), indent=2).encode())
    c = metrics["curve"]
    plot_recall_curve({"recall@0.5": (c["num_boxes"], c["recall@0.5"]),
                       "recall@0.7": (c["num_boxes"], c["recall@0.7"]),
                       "AR": (c["num_boxes"], c["ar"])}, out / "recall_vs_boxes.png",
                      ylabel="recall")
    return metrics, path


def read_proposals(proposals_dir: str | Path) -> dict[str, NDArray[np.float32]]:
    """Boxes of every finished image of a propose output folder, keyed by its identity, the
    relative path with extension (matched to file names by :func:`match_image_names`)."""
    store = open_upstream(proposals_dir, "propose")
    return {rel: as_boxes(store.load(rel)["boxes"]) for rel in store.done_rels()}
