"""Writers of the detect stage's result files (read back by :mod:`rcnn_cli.evaluate`).

Every file names an image by its identity: the path relative to the input folder, POSIX
separators, extension included (``a/img.jpg``, ``a/img.png`` and ``b/img.jpg`` are three
images). Names that come from files (class names, image paths) never become paths outside
the output folder: :func:`safe_filename` percent-encodes them.

* ``detections.csv``: ``image,class,score,x1,y1,x2,y2``; ``image`` = identity, ``class`` =
  class name (the csv module quotes commas, quotes and newlines).
* COCO ``detections.json`` + ``images.json`` (``file_name`` = identity) + ``categories.json``.
* VOC devkit ``comp4_det_test_<class>.txt``: ``<class>`` through :func:`safe_filename`;
  lines ``image_id score xmin ymin xmax ymax`` with ``image_id`` = :func:`voc_image_id`.
* YOLO ``<image>.txt``: see :func:`yolo_label_names`.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from rcnn_cli.boxes import to_voc, to_yolo
from rcnn_cli.store import atomic_write_bytes, check_rel

log = logging.getLogger("rcnn_cli.formats")

#: characters :func:`safe_filename` always encodes (path separators, Windows-reserved ones,
#: the escape character itself)
_UNSAFE_IN_NAMES = set('/\\%:*?"<>|')


def _pct(ch: str) -> str:
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8"))


def safe_filename(name: str) -> str:
    """A file-name component for ``name`` (a class name, ...) that cannot leave its folder.

    Deterministic and reversible (``urllib.parse.unquote`` gives ``name`` back): ``%``, path
    separators (``/``, ``\\``), Windows-reserved ``: * ? " < > |``, control characters and
    NUL are percent-encoded as UTF-8 bytes (``a/b`` -> ``a%2Fb``); a name that is empty or
    only dots (``.``, ``..``) has every character encoded (``..`` -> ``%2E%2E``), and a
    leading dot is encoded (no hidden files: ``.x`` -> ``%2Ex``). Other
    characters, spaces and non-ASCII letters included, are kept.
    """
    out = "".join(_pct(c) if c in _UNSAFE_IN_NAMES or ord(c) < 32 or ord(c) == 127 else c
                  for c in str(name))
    if out.strip(".") == "":
        out = "".join(_pct(c) for c in out) or "%00"  # "" -> "%00" (NUL never is a name)
    elif out.startswith("."):  # no hidden files: ".x" -> "%2Ex"
        out = _pct(".") + out[1:]
    return out


def voc_image_id(rel: str) -> str:
    """The image id of a VOC devkit result line: the identity (relative path with
    extension) with ``%``, whitespace and control characters percent-encoded (UTF-8), so an
    id is one whitespace-free token (``my dir/img 1.jpg`` -> ``my%20dir/img%201.jpg``;
    ``urllib.parse.unquote`` reverses it)."""
    return "".join(_pct(c) if c == "%" or c.isspace() or ord(c) < 32 or ord(c) == 127 else c
                   for c in _norm(rel))


def _norm(name: str) -> str:
    from rcnn_cli.evaluate import _norm_name

    return _norm_name(name)


def write_detections_csv(path: str | Path, dets: Mapping[str, Any],
                         classes: Sequence[str]) -> Path:
    """Write ``detections.csv`` (header ``image,class,score,x1,y1,x2,y2``; class by name)."""
    from rcnn_cli.evaluate import CSV_HEADER, as_detections

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    for k, det in dets.items():
        det = as_detections(det)
        for b, s, c in zip(det.boxes, det.scores, det.labels):
            w.writerow([k, classes[c], *(np.format_float_positional(v, unique=True, trim="0")
                                         for v in (s, *b))])
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


def _image_list(image_sizes: Mapping[str, tuple[int, int]],
                image_ids: Mapping[str, int] | None = None) -> list[dict]:
    given = dict(image_ids or {})
    nxt = max([v for v in given.values() if isinstance(v, int)], default=0) + 1
    out = []
    for k, hw in image_sizes.items():
        if k not in given:
            given[k], nxt = nxt, nxt + 1
        out.append({"id": given[k], "file_name": k, "height": int(hw[0]), "width": int(hw[1])})
    return out


def write_coco_results(out_dir: str | Path, dets: Mapping[str, Any],
                       image_sizes: Mapping[str, tuple[int, int]],
                       classes: Sequence[str], image_ids: Mapping[str, int] | None = None,
                       category_ids: Sequence[int] | None = None) -> list[Path]:
    """Write ``detections.json``, ``images.json`` and ``categories.json`` into ``out_dir``.

    ``image_sizes`` (file_name -> (height, width)) lists every image, in order; every image
    appears in ``images.json`` even without detections (``file_name`` = the key, the identity
    with extension). Ids are the user's where given (``image_ids``: file_name -> COCO image
    id; ``category_ids``: the COCO category id of each class index, so the user's own
    instances file scores ``detections.json``), else 1..N and class index + 1 (images
    without a given id are numbered after the largest given one). Returns the three paths.
    """
    from rcnn_cli.evaluate import _coco_results, as_detections

    unknown = [k for k in dets if k not in image_sizes]
    if unknown:
        raise ValueError(f"dets: image {unknown[0]!r} is not in image_sizes")
    if category_ids is not None and len(category_ids) != len(classes):
        raise ValueError(f"category_ids: {len(category_ids)} ids for {len(classes)} classes")
    images = _image_list(image_sizes, image_ids)
    ids = {im["file_name"]: im["id"] for im in images}
    results = _coco_results({k: as_detections(v) for k, v in dets.items()}, ids, category_ids)
    cat_ids = category_ids if category_ids is not None else range(1, len(classes) + 1)
    cats = [{"id": int(i), "name": n, "supercategory": "none"}
            for i, n in zip(cat_ids, classes)]
    out = Path(out_dir)
    paths = [out / "detections.json", out / "images.json", out / "categories.json"]
    for p, obj in zip(paths, (results, images, cats)):
        atomic_write_bytes(p, json.dumps(obj).encode())
    return paths


def write_voc_results(out_dir: str | Path, dets: Mapping[str, Any], classes: Sequence[str],
                      prefix: str | None = None) -> list[Path]:
    """Write VOCdevkit result files ``<prefix><class>.txt``, one per class (empty if none).

    The class name goes through :func:`safe_filename` (``a/b`` -> ``comp4_det_test_a%2Fb.txt``),
    so no class name writes outside ``out_dir``. Lines are ``image_id score xmin ymin xmax
    ymax``: ``image_id`` is :func:`voc_image_id` of the image's identity (relative path with
    extension, whitespace percent-encoded: ``a/img.jpg`` and ``b/img.jpg`` stay two ids), the
    box in VOC 1-based inclusive pixels via :func:`rcnn_cli.boxes.to_voc` (rounded to
    integers).
    """
    from rcnn_cli.evaluate import VOC_DET_PREFIX, as_detections

    prefix = VOC_DET_PREFIX if prefix is None else prefix
    lines: dict[int, list[str]] = {c: [] for c in range(len(classes))}
    for k, det in dets.items():
        det = as_detections(det)
        image_id = voc_image_id(k)
        for b, s, c in zip(to_voc(det.boxes), det.scores, det.labels):
            lines[int(c)].append(f"{image_id} {float(s):.6f} {b[0]} {b[1]} {b[2]} {b[3]}\n")
    paths = []
    for c, name in enumerate(classes):
        p = Path(out_dir) / f"{prefix}{safe_filename(name)}.txt"
        atomic_write_bytes(p, "".join(lines[c]).encode())
        paths.append(p)
    return paths


def yolo_label_names(rels: Sequence[str]) -> dict[str, str]:
    """Label file of each image for YOLO outputs: ``<relative path without extension>.txt``
    (what YOLO tools pair with ``<stem>.jpg``), except for images whose label name another
    image would also get (``img.jpg`` and ``img.png`` in one folder): those all get
    ``<relative path with extension>.txt`` (``img.jpg.txt``, ``img.png.txt``), with one
    warning. Deterministic for a given set of images; never two images in one file.
    """
    rels = [_norm(r) for r in rels]
    for r in rels:
        check_rel(r)
    names = {r: PurePosixPath(r).with_suffix(".txt").as_posix() for r in rels}
    full: set[str] = set()
    while True:
        owners: dict[str, list[str]] = {}
        for r, n in names.items():
            owners.setdefault(n, []).append(r)
        clash = [r for rs in owners.values() if len(rs) > 1 for r in rs if r not in full]
        if not clash:
            break
        for r in clash:
            full.add(r)
            names[r] = f"{r}.txt"
    if full:
        shown = ", ".join(sorted(full)[:5])
        log.warning("yolo: %d image(s) share a name without extension with another image "
                    "(%s); their label files keep the extension (<image>.<ext>.txt)",
                    len(full), shown)
    return names


def write_yolo_results(out_dir: str | Path, dets: Mapping[str, Any],
                       image_sizes: Mapping[str, tuple[int, int]]) -> list[Path]:
    """Write one YOLO txt per image of ``image_sizes`` under ``out_dir``, named by
    :func:`yolo_label_names` (``sub/img.jpg`` -> ``sub/img.txt``; ``img.jpg`` next to
    ``img.png`` -> ``img.jpg.txt`` and ``img.png.txt``).

    Lines are ``class cx cy w h score`` with cx, cy, w, h normalised by the image size
    (:func:`rcnn_cli.boxes.to_yolo`); an image without detections gets an empty file.
    """
    from rcnn_cli.evaluate import Detections, as_detections

    unknown = [k for k in dets if k not in image_sizes]
    if unknown:
        raise ValueError(f"dets: image {unknown[0]!r} is not in image_sizes")
    names = yolo_label_names(list(image_sizes))
    paths = []
    for k, hw in image_sizes.items():
        det = as_detections(dets[k]) if k in dets else Detections.empty()
        rows = [f"{int(c)} {v[0]:.6f} {v[1]:.6f} {v[2]:.6f} {v[3]:.6f} {float(s):.6f}\n"
                for v, s, c in zip(to_yolo(det.boxes, tuple(hw)), det.scores, det.labels)]
        p = Path(out_dir) / names[_norm(k)]
        atomic_write_bytes(p, "".join(rows).encode())
        paths.append(p)
    return paths
