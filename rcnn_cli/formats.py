"""Writers of the detect stage's result files (read back by :mod:`rcnn_cli.evaluate`), the
:class:`Detections` they hold, and the matching of image names read from files to
ground-truth file names (:func:`match_image_names`).

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rcnn_cli.boxes import as_boxes, to_voc, to_xywh, to_yolo
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
                   for c in _norm_name(rel))


# ---------------------------------------------------------------- the detections files hold
CSV_HEADER = ("image", "class", "score", "x1", "y1", "x2", "y2")
VOC_DET_PREFIX = "comp4_det_test_"


@dataclass
class Detections:
    """Detections of one image: boxes (N, 4) float32 x1y1x2y2, scores (N,) float32,
    labels (N,) int64 class index."""

    boxes: NDArray[np.float32]
    scores: NDArray[np.float32]
    labels: NDArray[np.int64]

    def __post_init__(self) -> None:
        self.boxes = as_boxes(self.boxes)
        self.scores = np.asarray(self.scores, np.float32).reshape(-1)
        self.labels = np.asarray(self.labels, np.int64).reshape(-1)
        n = len(self.boxes)
        if len(self.scores) != n or len(self.labels) != n:
            raise ValueError(
                f"Detections: boxes {self.boxes.shape}, scores {self.scores.shape} and labels "
                f"{self.labels.shape} must have the same length")

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


def as_detections(x: Any) -> Detections:
    """``Detections`` from a Detections, an object with ``boxes/scores/labels`` attributes,
    or a tuple ``(boxes, scores, labels)``."""
    if isinstance(x, Detections):
        return x
    if all(hasattr(x, a) for a in ("boxes", "scores", "labels")):
        return Detections(x.boxes, x.scores, x.labels)
    if isinstance(x, (tuple, list)) and len(x) == 3:
        return Detections(*x)
    raise TypeError(f"detections must be Detections or (boxes, scores, labels), got {type(x)}")


def _f32(v: float) -> float:
    """Shortest decimal that reads back as the same float32 (compact JSON/CSV, exact)."""
    return float(np.format_float_positional(np.float32(v), unique=True, trim="0"))


def _coco_results(dets: Mapping[str, Detections], ids: Mapping[str, int],
                  cat_ids: Sequence[int] | None = None) -> list[dict]:
    """COCO results list (image_id, category_id = ``cat_ids[label]`` or label + 1, bbox xywh,
    score)."""
    out = []
    for k, det in dets.items():
        for xywh, s, c in zip(to_xywh(det.boxes), det.scores, det.labels):
            cid = int(c) + 1 if cat_ids is None else cat_ids[int(c)]
            out.append({"image_id": ids[k], "category_id": cid,
                        "bbox": [_f32(v) for v in xywh], "score": _f32(s)})
    return out


# ---------------------------------------------------------------- name matching
def _norm_name(name: str) -> str:
    return PurePosixPath(str(name).replace("\\", "/")).as_posix().removeprefix("./")


def match_image_names(det_names: Iterable[str], gt_names: Iterable[str]) -> dict[str, str]:
    """Map detection image names to ground-truth file names.

    1. By relative path (POSIX separators, leading ``./`` dropped).
    2. By relative path without extension (``sub/a`` or ``sub/a.png`` finds ``sub/a.jpg``).
    3. By file stem, when one path (without extension) ends with the other's folders: a
       detection ``JPEGImages/000005.jpg`` finds ``000005.jpg``, ``data/sub/y.png`` finds
       ``sub/y.jpg``, but ``a/img.jpg`` never finds ``b/img.jpg``.

    Steps 2 and 3 apply only when exactly one ground-truth image fits, it is not taken yet,
    and no other detection name fits that same image in that step (``a/img.jpg`` and ``b/img.jpg``
    never merge into one ``img.jpg``). Each ground-truth name is used once. Names that match
    nothing are left out.
    """
    gt_names = list(gt_names)
    by_path = {_norm_name(g): g for g in gt_names}
    gt_parts = {g: PurePosixPath(_norm_name(g)).with_suffix("").parts for g in gt_names}
    by_stem: dict[str, list[str]] = {}
    for g, parts in gt_parts.items():
        by_stem.setdefault(parts[-1] if parts else "", []).append(g)
    out: dict[str, str] = {}
    rest = []
    taken: set[str] = set()
    for d in det_names:
        g = by_path.get(_norm_name(d))
        if g is None:
            rest.append(d)
        elif g not in taken:  # "./a.jpg" and "a.jpg": the first one wins
            out[d] = g
            taken.add(g)

    def same(p: tuple[str, ...], q: tuple[str, ...]) -> bool:
        return p == q

    def suffix(p: tuple[str, ...], q: tuple[str, ...]) -> bool:
        n = min(len(p), len(q))
        return n > 0 and p[-n:] == q[-n:]

    for fits in (same, suffix):
        wanted: dict[str, list[str]] = {}  # ground-truth name -> detection names fitting it
        for d in rest:
            p = PurePosixPath(_norm_name(d)).with_suffix("").parts
            cand = [g for g in by_stem.get(p[-1] if p else "", []) if fits(p, gt_parts[g])]
            if len(cand) == 1 and cand[0] not in taken:
                wanted.setdefault(cand[0], []).append(d)
        for g, ds in wanted.items():
            if len(ds) == 1:
                out[ds[0]] = g
                taken.add(g)
        rest = [d for d in rest if d not in out]
    return out


# ---------------------------------------------------------------- writers
def write_detections_csv(path: str | Path, dets: Mapping[str, Any],
                         classes: Sequence[str]) -> Path:
    """Write ``detections.csv`` (header ``image,class,score,x1,y1,x2,y2``; class by name)."""
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
    rels = [_norm_name(r) for r in rels]
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
    unknown = [k for k in dets if k not in image_sizes]
    if unknown:
        raise ValueError(f"dets: image {unknown[0]!r} is not in image_sizes")
    names = yolo_label_names(list(image_sizes))
    paths = []
    for k, hw in image_sizes.items():
        det = as_detections(dets[k]) if k in dets else Detections.empty()
        rows = [f"{int(c)} {v[0]:.6f} {v[1]:.6f} {v[2]:.6f} {v[3]:.6f} {float(s):.6f}\n"
                for v, s, c in zip(to_yolo(det.boxes, tuple(hw)), det.scores, det.labels)]
        p = Path(out_dir) / names[_norm_name(k)]
        atomic_write_bytes(p, "".join(rows).encode())
        paths.append(p)
    return paths
