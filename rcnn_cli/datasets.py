"""Annotation readers and writers: PASCAL VOC XML folders, YOLO label trees, COCO instances
JSON, CSV; and the matching of annotations to the images a command was given.

Everything is loaded into one record type, :class:`ImageRecord`, with boxes in our
convention (float32 (N, 4) x1, y1, x2, y2, continuous pixels; see :mod:`rcnn_cli.boxes`).
Fix-ups happen here, at load: a box partly outside the image is clipped, an inverted box is
re-ordered, a box of zero area (after clipping) is dropped; each gets a warning naming the
file and the box. Nothing is ever written back to the user's annotation files.

Layouts (:func:`load_dataset`, :func:`match_annotations`):

* VOC: ``Annotations/`` + ``JPEGImages/`` (+ ``ImageSets/Main/<split>.txt``), ``annotations/``
  + ``images/``, a root holding one folder of XML files under any name, or any folder of XML
  files on its own (the images then come from the command line);
* YOLO: ``images/`` + ``labels/`` parallel trees (``labels/<rel stem>.txt``), class names
  from ``data.yaml`` (``names:``) or ``classes.txt``;
* COCO instances ``.json``; CSV ``filename,width,height,class,xmin,ymin,xmax,ymax``.

An annotation is matched to an image by its own file name (an XML or YOLO label file belongs
to the image with the same relative stem), then by the file name written inside it
(``<filename>``, COCO ``file_name``, the CSV ``filename``), then by that name's stem; when
stems repeat, the longest common trailing run of folders decides, and a tie is reported, not
guessed. A name inside an annotation that is absolute or leaves the dataset root is ignored
with a warning, and nothing outside the given images is ever opened through it.

The class list is sorted by name (stable across machines and file orders) unless the caller
gives one; COCO keeps its category order by id, YOLO its class ids.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rcnn_cli import boxes as bx
from rcnn_cli.formats import safe_filename
from rcnn_cli.images import (
    IMAGE_EXTENSIONS,
    ImageError,
    ImageItem,
    image_size,
    list_images,
    read_split,
)
from rcnn_cli.store import atomic_write_text

log = logging.getLogger("rcnn_cli.datasets")

#: How many names a summary warning lists ("... (a.xml, b.xml, ...)").
SHOW_NAMES = 5


class AnnotationError(ValueError):
    """An annotation source that cannot be used at all (one line, names the file)."""


@dataclass
class ImageRecord:
    """Ground truth of one image.

    Attributes:
        file_name: image path relative to the dataset's image root (posix separators); after
            :func:`match_annotations`, the image's identity ``ImageItem.rel``.
        height, width: image size in pixels (0 while unknown: taken from the image header
            when the record is matched to its image).
        boxes: float32 (G, 4) x1y1x2y2 (YOLO records before matching: normalised cx, cy, w,
            h, with ``normalized`` True).
        labels: int64 (G,) indices into the dataset's class list.
        difficult: bool (G,) VOC ``difficult`` flags (COCO ``iscrowd``; False elsewhere).
        image_id: the user's own image id (COCO ``images[].id``), None elsewhere; writers put
            it back in ``detections.json`` so that the user's ground-truth file scores it.
        ann_file: the record's own annotation file (VOC XML, YOLO ``.txt``) relative to its
            annotation folder, "" for COCO/CSV rows; its stem names the image.
        normalized: True only for YOLO records whose image size is not known yet.
    """

    file_name: str
    height: int
    width: int
    boxes: NDArray[np.float32] = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    difficult: NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, bool))
    image_id: int | str | None = None
    ann_file: str = ""
    normalized: bool = False

    @property
    def stem(self) -> str:
        return Path(self.file_name or self.ann_file).stem

    @property
    def display(self) -> str:
        """The name used in messages: the annotation file, else the image's file name."""
        return self.ann_file or self.file_name


@dataclass
class Dataset:
    """Records, the class list (index = label) and the folder the file names are relative to.

    ``category_ids`` (COCO only): the user's category id of each class index, for writers.
    ``paths``: image path of each record's ``file_name`` when the records were matched to
    given images (:func:`match_annotations`); else images are ``image_root / file_name``.
    """

    records: list[ImageRecord]
    classes: list[str]
    image_root: Path
    category_ids: list[int] | None = None
    paths: dict[str, Path] | None = None

    def by_name(self) -> dict[str, ImageRecord]:
        return {r.file_name: r for r in self.records}

    def image_path(self, rec: ImageRecord) -> Path:
        if self.paths and rec.file_name in self.paths:
            return self.paths[rec.file_name]
        return self.image_root / rec.file_name


# ------------------------------------------------------------------------------- names
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:(/|$)")


def safe_rel(name: str, where: str) -> str | None:
    """A file name read from an annotation as a clean relative posix path, or None.

    Backslashes count as separators (annotations written on Windows) and ``./`` parts are
    dropped. An absolute name (``/x``, ``C:/x``, ``\\\\server``) or one with a ``..`` part is
    ignored with a warning naming ``where``: such a name never reaches the file system.
    """
    n = (name or "").strip().replace("\\", "/")
    if not n:
        return None
    if n.startswith("/") or _WINDOWS_DRIVE.match(n) or ".." in n.split("/"):
        log.warning("%s: file name %r is absolute or leaves the dataset root; ignored",
                    where, name)
        return None
    parts = [p for p in n.split("/") if p not in ("", ".")]
    return "/".join(parts) or None


#: Class names become file names only through this one escaping (VOC result files, ...).
safe_name = safe_filename


def _check_class_names(classes: list[str], where: str) -> None:
    for c in classes:
        if safe_name(c) != c:
            log.warning("%s: class name %r contains path characters; files named after it "
                        "use %r", where, c, safe_name(c))


# ------------------------------------------------------------------------------- fix-ups
def sanitize_boxes(raw: NDArray, size: tuple[int, int] | None,
                   where: str) -> tuple[NDArray, NDArray]:
    """Clip, re-order and drop bad boxes; return (boxes (G, 4), keep mask over the input).

    ``size`` (h, w), or None while the image size is unknown (then nothing is clipped; the
    record is sanitized again with the size when it is matched to its image).
    """
    b = bx.as_boxes(raw).copy()
    keep = np.ones(len(b), bool)
    for i, box in enumerate(b):
        x1, y1, x2, y2 = (float(v) for v in box)
        if not np.all(np.isfinite(box)):
            log.warning("%s: box %d %s is not finite; dropped", where, i, box.tolist())
            keep[i] = False
            continue
        if x2 < x1 or y2 < y1:
            log.warning("%s: box %d %s is inverted; corners swapped", where, i, box.tolist())
            x1, x2 = min(x1, x2), max(x1, x2)
            y1, y2 = min(y1, y2), max(y1, y2)
        c = [x1, y1, x2, y2]
        if size is not None:
            h, w = size
            c = [min(max(x1, 0), w), min(max(y1, 0), h), min(max(x2, 0), w),
                 min(max(y2, 0), h)]
        if c != [x1, y1, x2, y2] and size is not None and w > 0 and h > 0:
            log.warning("%s: box %d %s lies partly outside the %dx%d image; clipped",
                        where, i, [round(v, 1) for v in (x1, y1, x2, y2)], w, h)
        b[i] = c
        if c[2] - c[0] <= 0 or c[3] - c[1] <= 0:
            log.warning("%s: box %d has zero area after clipping; dropped", where, i)
            keep[i] = False
    return b[keep], keep


def _known(size: tuple[int, int]) -> tuple[int, int] | None:
    return size if size[0] > 0 and size[1] > 0 else None


def _make_record(file_name, size, raw_boxes, names, difficult, class_index, where,
                 **extra) -> ImageRecord:
    """A record of the objects whose class is in ``class_index`` (boxes sanitized)."""
    raw = np.asarray(raw_boxes, np.float32).reshape(-1, 4)
    inc = np.array([n in class_index for n in names], bool).reshape(-1)
    boxes, keep = sanitize_boxes(raw[inc], _known(size), where)
    names = [n for n, k in zip([n for n in names if n in class_index], keep) if k]
    diff = np.asarray(difficult, bool).reshape(-1)[inc][keep]
    labels = np.array([class_index[n] for n in names], np.int64)
    return ImageRecord(file_name, size[0], size[1], boxes, labels, diff, **extra)


def _in_split(keys, wanted: set[str] | None) -> bool:
    """True if a name (or its stem, or relative stem) of ``keys`` is listed in the split."""
    if wanted is None:
        return True
    for k in keys:
        if not k:
            continue
        p = PurePosixPath(k)
        if k in wanted or p.stem in wanted or p.with_suffix("").as_posix() in wanted:
            return True
    return False


# ------------------------------------------------------------------------------- layouts
def _has(folder: Path, pattern: str) -> bool:
    return folder.is_dir() and next(folder.rglob(pattern), None) is not None


def _has_images(folder: Path | None) -> bool:
    return folder is not None and folder.is_dir() and any(
        p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*"))


def _has_yolo_labels(folder: Path) -> bool:
    return folder.is_dir() and any(p.name != "classes.txt" for p in folder.rglob("*.txt"))


def _image_dir_near(root: Path, ann_dir: Path) -> Path | None:
    """The images of an annotation folder: JPEGImages/ or images/ beside it, or itself."""
    for cand in (root / "JPEGImages", root / "images", ann_dir.parent / "JPEGImages",
                 ann_dir.parent / "images", root, ann_dir):
        if _has_images(cand):
            return cand
    return None


def _layout(path: Path) -> tuple[str, Path, Path | None]:
    """(kind, annotation folder or file, image folder or None) of an annotation source."""
    if path.is_file():
        kind = {".json": "coco", ".csv": "csv", ".yaml": "yolo", ".yml": "yolo"}.get(
            path.suffix.lower())
        if kind == "yolo" and not _has_yolo_labels(path.parent / "labels"):
            kind = None  # a data.yaml is only read next to its labels/ folder
        if kind is None:
            raise AnnotationError(f"{path}: unknown annotation format (expected a VOC or "
                                  "YOLO folder, .json (COCO), .csv or a YOLO data.yaml)")
        if kind == "yolo":
            return kind, path.parent / "labels", _image_dir_near(path.parent, path.parent)
        return kind, path, None
    for ann in ("Annotations", "annotations"):
        if _has(path / ann, "*.xml"):
            return "voc", path / ann, _image_dir_near(path, path / ann)
    if _has_yolo_labels(path / "labels") and not _has(path / "labels", "*.xml"):
        return "yolo", path / "labels", _image_dir_near(path, path / "labels")
    if any(path.glob("*.xml")):
        return "voc", path, _image_dir_near(path, path)
    if _has_yolo_labels(path) and not _has(path, "*.xml") and not _has_images(path):
        return "yolo", path, _image_dir_near(path.parent, path)
    subs = sorted(d for d in path.iterdir() if d.is_dir() and _has(d, "*.xml"))
    if len(subs) == 1 and _has_images(path):  # a dataset root: images/ + annots/ (any name)
        return "voc", subs[0], _image_dir_near(path, subs[0])
    if subs:  # a tree of XML files (annots/a/img.xml, annots/b/img.xml)
        return "voc", path, _image_dir_near(path, path)
    raise AnnotationError(
        f"{path}: no annotations found (expected XML files, annotations/ or Annotations/, "
        "labels/ with YOLO .txt files, a COCO .json or a .csv)")


def find_split_file(root: Path, split: str) -> Path | None:
    """``train``/``test`` split file of a VOC folder (root/<s>.txt or ImageSets/Main/<s>.txt)."""
    for p in (root / f"{split}.txt", root / "ImageSets" / "Main" / f"{split}.txt"):
        if p.is_file():
            return p
    return None


def _split_set(path: Path, split: str | Path | None) -> set[str] | None:
    if split is None:
        return None
    if not Path(split).exists() and path.is_dir():
        found = find_split_file(path, str(split))
        if found is None:
            raise AnnotationError(f"{path}: no split file {split}.txt")
        split = found
    return set(read_split(split))


# ------------------------------------------------------------------------------- VOC
def _parse_voc_xml(path: Path):
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise AnnotationError(f"{path}: invalid XML ({e})") from None
    fname = root.findtext("filename") or ""
    size = root.find("size")
    try:
        w = int(float(size.findtext("width", "0"))) if size is not None else 0
        h = int(float(size.findtext("height", "0"))) if size is not None else 0
    except ValueError:
        log.warning("%s: malformed <size>; the image's own size is used", path)
        w = h = 0
    objs = []
    for i, o in enumerate(root.findall("object")):
        name = (o.findtext("name") or "").strip()
        bb = o.find("bndbox")
        if not name or bb is None:
            log.warning("%s: object %d has no name or bndbox; dropped", path, i)
            continue
        try:
            vals = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            log.warning("%s: object %d has a malformed bndbox; dropped", path, i)
            continue
        diff = (o.findtext("difficult") or "0").strip() in ("1", "true", "True")
        objs.append((name, vals, diff))
    return fname, (h, w), objs


def _read_voc(ann_dir: Path, wanted: set[str] | None,
              classes: list[str] | None) -> Dataset:
    """Every XML under ``ann_dir`` as a record (file_name = its ``<filename>``, maybe "");
    images are not looked for here."""
    parsed, names = [], set()
    for x in sorted(ann_dir.rglob("*.xml")):
        try:
            fname, size, objs = _parse_voc_xml(x)
        except AnnotationError as e:
            log.warning("%s; skipped", e)
            continue
        # the class list comes from the whole folder, so that every split of a dataset
        # numbers its classes the same way
        names.update(n for n, _, _ in objs)
        rel = x.relative_to(ann_dir).as_posix()
        fname = safe_rel(fname, str(x)) or ""
        if _in_split((rel, fname), wanted):
            parsed.append((rel, fname, size, objs, x))
    classes = sorted(names) if classes is None else list(classes)
    _check_class_names(classes, str(ann_dir))
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for rel, fname, size, objs, x in parsed:
        raw = bx.from_voc(np.array([o[1] for o in objs], np.float32).reshape(-1, 4))
        records.append(_make_record(fname, size, raw, [o[0] for o in objs],
                                    [o[2] for o in objs], index, str(x), ann_file=rel))
    return Dataset(records, classes, ann_dir)


def read_voc(root: str | Path, split: str | Path | None = None,
             classes: list[str] | None = None) -> Dataset:
    """Read a PASCAL VOC folder (see :func:`load_dataset`)."""
    return load_dataset(root, split=split, classes=classes)


def write_voc_xml(path: str | Path, rec: ImageRecord, classes: list[str],
                  overwrite: bool = False) -> None:
    """Write one record as a VOC XML file (1-based integer boxes), atomically."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "filename").text = rec.file_name
    size = ET.SubElement(ann, "size")
    for k, v in (("width", rec.width), ("height", rec.height), ("depth", 3)):
        ET.SubElement(size, k).text = str(v)
    for b, lab, d in zip(bx.to_voc(rec.boxes), rec.labels, rec.difficult):
        o = ET.SubElement(ann, "object")
        ET.SubElement(o, "name").text = classes[int(lab)]
        ET.SubElement(o, "difficult").text = str(int(d))
        bb = ET.SubElement(o, "bndbox")
        for k, v in zip(("xmin", "ymin", "xmax", "ymax"), b):
            ET.SubElement(bb, k).text = str(int(v))
    ET.indent(ann)
    atomic_write_text(path, ET.tostring(ann, encoding="unicode") + "\n", overwrite=overwrite)


# ------------------------------------------------------------------------------- YOLO
def _scalar(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    return s


def _yaml_names(text: str) -> list[str] | None:
    """The ``names:`` of an ultralytics data.yaml, in class-id order (None if absent).

    PyYAML is not a dependency of rcnn_cli, so the four forms ultralytics writes are parsed
    here: ``names: [a, b]``, ``names: {0: a, 1: b}``, and the block forms ``- a`` / ``0: a``
    on indented lines below ``names:``. Quotes around a name are removed, ``#`` starts a
    comment.
    """
    lines = [ln.split(" #", 1)[0].rstrip() for ln in text.splitlines()]
    for i, ln in enumerate(lines):
        if not ln.startswith("names:"):
            continue
        rest = ln[len("names:"):].strip()
        if rest:
            inner = rest.strip("[]{} ")
            items = [_scalar(v) for v in inner.split(",") if v.strip()]
        else:
            items = []
            for sub in lines[i + 1:]:
                if sub and not sub[0].isspace():
                    break
                if sub.strip():
                    items.append(sub.strip())
            items = [_scalar(v[1:]) if v.startswith("-") else v for v in items]
        if items and all(":" in v and _scalar(v.split(":", 1)[0]).isdigit() for v in items):
            pairs = {int(_scalar(k)): _scalar(v) for k, v in (x.split(":", 1) for x in items)}
            return [pairs.get(k, str(k)) for k in range(max(pairs) + 1)]
        return items
    return None


def _yolo_classes(root: Path, labels: Path, yaml_file: Path | None) -> tuple[list[str], str]:
    """Class names (index = YOLO class id) and the file they came from."""
    cands = ([yaml_file] if yaml_file else []) + [root / "data.yaml", root / "dataset.yaml",
                                                   labels / "classes.txt", root / "classes.txt"]
    cands += sorted(p for p in root.glob("*.y*ml") if p not in cands)
    for p in cands:
        if not p.is_file():
            continue
        text = p.read_text(errors="replace")
        if p.suffix == ".txt":
            return [ln.strip() for ln in text.splitlines() if ln.strip()], str(p)
        try:
            import yaml  # optional: used when installed, else the simple forms by hand

            data = yaml.safe_load(text)
            names = data.get("names") if isinstance(data, dict) else None
            if isinstance(names, dict):
                names = [str(names.get(k, k)) for k in range(max(map(int, names)) + 1)]
        except ImportError:
            names = _yaml_names(text)
        except Exception as e:  # noqa: BLE001 - any YAML error is the user's file
            raise AnnotationError(f"{p}: cannot read YAML ({str(e).splitlines()[0]})") from None
        if names:
            return [str(n) for n in names], str(p)
    raise AnnotationError(f"{root}: YOLO labels need class names: data.yaml (names: [...]) "
                          "or classes.txt (one name per line)")


def _read_yolo(labels: Path, yaml_file: Path | None, wanted: set[str] | None,
               classes: list[str] | None) -> Dataset:
    """Every ``labels/**/*.txt`` as a record with normalised boxes (``normalized`` True)."""
    root = labels.parent
    names, names_file = _yolo_classes(root, labels, yaml_file)
    _check_class_names(names, names_file)
    classes = names if classes is None else list(classes)
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for t in sorted(labels.rglob("*.txt")):
        rel = t.relative_to(labels).as_posix()
        if t.name == "classes.txt" or not _in_split((rel,), wanted):
            continue
        vals, labs = [], []
        for ln, line in enumerate(t.read_text(errors="replace").splitlines(), 1):
            f = line.split()
            if not f:
                continue
            try:
                cls, v = int(f[0]), [float(x) for x in f[1:]]
            except ValueError:
                log.warning("%s:%d: not 'class cx cy w h'; line skipped", t, ln)
                continue
            if len(v) > 4 and len(v) % 2 == 0:  # a segment polygon: its bounding box
                xs, ys = v[0::2], v[1::2]
                v = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2,
                     max(xs) - min(xs), max(ys) - min(ys)]
            if len(v) != 4 or not np.all(np.isfinite(v)):
                log.warning("%s:%d: not 'class cx cy w h'; line skipped", t, ln)
                continue
            if not 0 <= cls < len(names):
                log.warning("%s:%d: class id %d not among the %d names of %s; line skipped",
                            t, ln, cls, len(names), names_file)
                continue
            if names[cls] in index:
                vals.append(v)
                labs.append(index[names[cls]])
        records.append(ImageRecord("", 0, 0, np.array(vals, np.float32).reshape(-1, 4),
                                   np.array(labs, np.int64), np.zeros(len(labs), bool),
                                   ann_file=rel, normalized=True))
    return Dataset(records, classes, root / "images")


def _resolve(rec: ImageRecord, item: ImageItem) -> ImageRecord:
    """``rec`` renamed to the image's identity, with its size and pixel boxes.

    Raises:
        ImageError: the size was needed and the image header cannot be read.
    """
    size = (rec.height, rec.width)
    known = _known(size)
    if known is None or rec.normalized:
        size = image_size(item.path)
    where = f"{item.path} ({rec.display})" if rec.display else str(item.path)
    boxes, labels, diff = rec.boxes, rec.labels, rec.difficult
    if rec.normalized:
        boxes = bx.from_yolo(boxes, size)
    if known is None or rec.normalized:
        boxes, keep = sanitize_boxes(boxes, size, where)
        labels, diff = labels[keep], diff[keep]
    return dataclasses.replace(rec, file_name=item.rel, height=int(size[0]),
                               width=int(size[1]), boxes=boxes, labels=labels,
                               difficult=diff, normalized=False)


# ------------------------------------------------------------------------------- COCO
def read_coco(path: str | Path, image_root: str | Path | None = None,
              split: str | Path | None = None) -> Dataset:
    """Read COCO instances JSON. ``iscrowd`` objects are kept as ``difficult`` (ignored in
    evaluation, like VOC's difficult). The user's image ids are kept on the records
    (``image_id``) and the category ids on the dataset (``category_ids``)."""
    path = Path(path)
    return _read_coco(path, set(read_split(split)) if split is not None else None,
                      Path(image_root) if image_root else path.parent)


def _read_coco(path: Path, wanted: set[str] | None, root: Path) -> Dataset:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{path}: cannot read COCO JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationError(f"{path}: not COCO instances JSON (no 'images' list)")
    cats = data.get("categories")
    if not cats or not isinstance(cats, list):
        raise AnnotationError(f"{path}: no 'categories' (COCO files must list their classes "
                              "as [{\"id\": 1, \"name\": \"cat\"}, ...])")
    try:
        cats = sorted(({"id": int(c["id"]), "name": str(c["name"])} for c in cats),
                      key=lambda c: c["id"])
    except (KeyError, TypeError, ValueError):
        raise AnnotationError(f"{path}: a category lacks an integer 'id' or a 'name'") from None
    classes = [c["name"] for c in cats]
    _check_class_names(classes, str(path))
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    class_index = {c: i for i, c in enumerate(classes)}
    anns: dict[Any, list] = {}
    for i, a in enumerate(data.get("annotations") or []):
        aid = a.get("id", f"#{i}") if isinstance(a, dict) else f"#{i}"
        try:
            box = [float(v) for v in a["bbox"]]
            if len(box) != 4:
                raise ValueError
            cat = int(a["category_id"])
            img = a["image_id"]
        except (KeyError, TypeError, ValueError):
            log.warning("%s: annotation %s lacks a bbox [x, y, w, h], category_id or "
                        "image_id; dropped", path, aid)
            continue
        if cat not in cat_index:
            log.warning("%s: annotation %s has category_id %s, not in 'categories'; dropped",
                        path, aid, cat)
            continue
        anns.setdefault(img, []).append((box, cat, bool(a.get("iscrowd", 0))))
    ids = set()
    records = []
    for i, im in enumerate(data["images"]):
        try:
            iid, fname = im["id"], str(im["file_name"])
        except (KeyError, TypeError):
            log.warning("%s: image entry %d lacks 'id' or 'file_name'; skipped", path, i)
            continue
        ids.add(iid)
        where = f"{path} image {iid}"
        fname = safe_rel(fname, where)
        if fname is None or not _in_split((fname,), wanted):
            continue
        try:
            size = (int(im.get("height") or 0), int(im.get("width") or 0))
        except (TypeError, ValueError):
            size = (0, 0)
        objs = anns.get(iid, [])
        raw = bx.from_xywh(np.array([o[0] for o in objs], np.float32).reshape(-1, 4))
        records.append(_make_record(fname, size, raw, [classes[cat_index[o[1]]] for o in objs],
                                    [o[2] for o in objs], class_index, where, image_id=iid))
    for a_img in anns:
        if a_img not in ids:
            log.warning("%s: annotations refer to unknown image id %s; dropped", path, a_img)
    records.sort(key=lambda r: r.file_name)
    return Dataset(records, classes, root, category_ids=[c["id"] for c in cats])


def coco_instances(ds: Dataset) -> dict:
    """The dataset as a COCO instances dict: the user's image and category ids where the
    dataset has them (``ImageRecord.image_id``, ``Dataset.category_ids``), else ids from 1;
    difficult -> iscrowd."""
    ids = [r.image_id for r in ds.records]
    if not all(isinstance(i, int) for i in ids) or len(set(ids)) != len(ids):
        ids = list(range(1, len(ds.records) + 1))
    cat_ids = ds.category_ids or list(range(1, len(ds.classes) + 1))
    images, anns = [], []
    for i, r in zip(ids, ds.records):
        images.append({"id": i, "file_name": r.file_name, "height": r.height, "width": r.width})
        for b, lab, d in zip(bx.to_xywh(r.boxes), r.labels, r.difficult):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat_ids[int(lab)],
                         "bbox": [float(v) for v in b], "area": float(b[2] * b[3]),
                         "iscrowd": int(bool(d))})
    cats = [{"id": cid, "name": c} for cid, c in zip(cat_ids, ds.classes)]
    return {"images": images, "annotations": anns, "categories": cats}


# ------------------------------------------------------------------------------- CSV
CSV_FIELDS = ("filename", "width", "height", "class", "xmin", "ymin", "xmax", "ymax")


def read_csv(path: str | Path, image_root: str | Path | None = None,
             split: str | Path | None = None, classes: list[str] | None = None) -> Dataset:
    """Read the CSV layout ``filename,width,height,class,xmin,ymin,xmax,ymax`` (one row per
    box; pixel coordinates as in our convention; a row with an empty class is an image
    without objects; empty width and height are read from the image). A row with missing or
    non-numeric fields is skipped with a warning naming the file and line."""
    path = Path(path)
    return _read_csv(path, set(read_split(split)) if split is not None else None,
                     Path(image_root) if image_root else path.parent, classes)


def _num(row: dict, keys, allow_empty: bool = False) -> list[float]:
    out = []
    for k in keys:
        v = (row.get(k) or "").strip()
        if not v and allow_empty:
            out.append(0.0)
            continue
        try:
            out.append(float(v))
        except ValueError:
            raise ValueError(f"{k} {v!r} is not a number") from None
    return out


def _read_csv(path: Path, wanted: set[str] | None, root: Path,
              classes: list[str] | None) -> Dataset:
    rows: dict[str, list] = {}
    sizes: dict[str, tuple[int, int]] = {}
    first_problem = ""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [k for k in CSV_FIELDS if k not in (reader.fieldnames or [])]
            if missing:
                raise AnnotationError(f"{path}: CSV lacks column(s) {', '.join(missing)}")
            for ln, row in enumerate(reader, 2):
                absent = [k for k in CSV_FIELDS if row.get(k) is None]
                try:
                    if absent:
                        raise ValueError(f"missing field(s) {', '.join(absent)}")
                    fn = safe_rel(row["filename"], f"{path}:{ln}")
                    if fn is None:
                        continue
                    w, h = _num(row, ("width", "height"), allow_empty=True)
                    box = _num(row, CSV_FIELDS[4:]) if row["class"].strip() else None
                except ValueError as e:
                    log.warning("%s:%d: %s; row skipped", path, ln, e)
                    first_problem = first_problem or f"line {ln}: {e}"
                    continue
                sizes[fn] = (int(h), int(w))
                rows.setdefault(fn, [])
                if box is not None:
                    rows[fn].append((row["class"].strip(), box))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise AnnotationError(f"{path}: cannot read CSV ({e})") from None
    if not rows and first_problem:
        raise AnnotationError(f"{path}: no usable row ({first_problem})")
    if classes is None:
        classes = sorted({c for objs in rows.values() for c, _ in objs})
    _check_class_names(list(classes), str(path))
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for fn in sorted(rows):
        if not _in_split((fn,), wanted):
            continue
        objs = rows[fn]
        raw = np.array([o[1] for o in objs], np.float32).reshape(-1, 4)
        records.append(_make_record(fn, sizes[fn], raw, [o[0] for o in objs],
                                    [False] * len(objs), index, f"{path} {fn}"))
    return Dataset(records, list(classes), root)


def write_csv(path: str | Path, ds: Dataset, overwrite: bool = False) -> None:
    """Write a dataset in the CSV layout (one row per box; an empty row per image without)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")  # quotes names holding commas or quotes
    w.writerow(CSV_FIELDS)
    for r in ds.records:
        if len(r.boxes) == 0:
            w.writerow([r.file_name, r.width, r.height, "", "", "", "", ""])
        for b, lab in zip(r.boxes, r.labels):
            w.writerow([r.file_name, r.width, r.height, ds.classes[int(lab)],
                        *(f"{float(v):g}" for v in b)])
    atomic_write_text(path, buf.getvalue(), overwrite=overwrite)


# ------------------------------------------------------------------------------- matching
@dataclass
class MatchReport:
    """What :func:`match_annotations` paired up; names are annotation files (or the COCO/CSV
    file names) and image identities (``ImageItem.rel``).

    Attributes:
        source: the annotations, as given.
        images, records: how many images and annotation records took part.
        matched: images that got an annotation.
        unmatched_records: annotations whose image is not among the images (including the
            ``ambiguous`` and ``taken`` ones).
        ambiguous: annotations that fit several images equally well (e.g. ``img.xml`` with
            ``a/img.jpg`` and ``b/img.jpg``).
        taken: annotations whose image already had one ("copy.xml (a.jpg: a.xml)").
        unannotated_images: images without any annotation.
        renamed: XML/label files given to the image of their own name although the name
            written inside them names another ("b.xml -> b.jpg (<filename> a.jpg)").
        by_filename: XML files given to the image their ``<filename>`` names, no image
            having their own name ("label_1.xml -> IMG_1.jpg (<filename> IMG_1.jpg)").
        unreadable: matched images whose size was needed and could not be read.
    """

    source: str
    images: int = 0
    records: int = 0
    matched: int = 0
    unmatched_records: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)
    taken: list[str] = field(default_factory=list)
    unannotated_images: list[str] = field(default_factory=list)
    renamed: list[str] = field(default_factory=list)
    by_filename: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: the counts, and the first :data:`SHOW_NAMES` names of each problem."""
        s = f"{self.source}: {self.matched} of {self.images} image(s) matched to annotations"
        if self.unmatched_records:
            s += (f"; {len(self.unmatched_records)} annotation(s) whose image is not found "
                  f"({_first(self.unmatched_records)})")
            for what, lst in (("fit several images", self.ambiguous),
                              ("name an image that has its own", self.taken),
                              ("name an unreadable image", self.unreadable)):
                if lst:
                    s += f", {len(lst)} of them {what} ({_first(lst)})"
        if self.unannotated_images:
            s += (f"; {len(self.unannotated_images)} image(s) without annotation "
                  f"({_first(self.unannotated_images)})")
        if self.renamed:
            s += (f"; {len(self.renamed)} annotation(s) used for the image of their own name "
                  f"although their <filename> names another ({_first(self.renamed)})")
        if self.by_filename:
            s += (f"; {len(self.by_filename)} annotation(s) matched by <filename> as no image "
                  f"has their own name ({_first(self.by_filename)})")
        return s

    @property
    def clean(self) -> bool:
        """True when every image and annotation paired up under one agreed name."""
        return not (self.unmatched_records or self.unannotated_images or self.renamed
                    or self.by_filename or self.unreadable)


def _first(names: list[str]) -> str:
    return ", ".join(names[:SHOW_NAMES]) + (", ..." if len(names) > SHOW_NAMES else "")


def _parts(name: str, stem: bool) -> tuple[str, ...]:
    """Path components of ``name``; without the extension (``stem``) or with it lower-cased
    (plain string work: this runs for every image and annotation)."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts:
        return ()
    last = parts[-1]
    dot = last.rfind(".")
    base, ext = (last[:dot], last[dot:]) if 0 < dot < len(last) - 1 else (last, "")
    parts[-1] = base if stem else base + ext.lower()
    return tuple(parts)


def _trailing(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


class _Index:
    """Images indexed by last path component, with and without extension."""

    def __init__(self, items: list[ImageItem]):
        self.keys = {s: [_parts(it.rel, s) for it in items] for s in (False, True)}
        self.by_last: dict[bool, dict[str, list[int]]] = {False: {}, True: {}}
        for s, keys in self.keys.items():
            for i, k in enumerate(keys):
                self.by_last[s].setdefault(k[-1], []).append(i)

    def best(self, name: str, stem: bool) -> tuple[int | None, bool]:
        """(index of the image ``name`` fits best or None, whether several fit equally):
        most trailing components in common, then the shortest image path."""
        key = _parts(name, stem)
        if not key:
            return None, False
        cands = self.by_last[stem].get(key[-1], [])
        scored = sorted(((_trailing(key, self.keys[stem][i]), -len(self.keys[stem][i]), i)
                         for i in cands), reverse=True)
        if not scored:
            return None, False
        if len(scored) > 1 and scored[0][:2] == scored[1][:2]:
            return None, True
        return scored[0][2], False


def _root_of(item: ImageItem) -> Path:
    p = item.path
    for _ in PurePosixPath(item.rel).parts:
        p = p.parent
    return p


def _pair(items: list[ImageItem], ds: Dataset, source: str) -> tuple[Dataset, MatchReport]:
    """Match ``ds.records`` to ``items`` (see :func:`match_annotations`)."""
    rep = MatchReport(source, images=len(items), records=len(ds.records))
    index = _Index(items)
    owner: dict[int, int] = {}  # image index -> record index
    assigned: dict[int, int] = {}  # record index -> image index
    ambiguous, taken = set(), {}
    # 1. the record's own file name (XML / label file), 2. the name written inside it,
    # 3. that name's stem (a.png written, a.jpg on disk)
    stages = ((lambda r: r.ann_file, True), (lambda r: r.file_name, False),
              (lambda r: r.file_name, True))
    for name_of, stem in stages:
        for ri, rec in enumerate(ds.records):
            if ri in assigned or not name_of(rec):
                continue
            ii, tie = index.best(name_of(rec), stem)
            if tie:
                ambiguous.add(ri)
            elif ii is not None and ii in owner:
                taken.setdefault(ri, f"{rec.display} ({items[ii].rel}: "
                                     f"{ds.records[owner[ii]].display})")
            elif ii is not None:
                owner[ii], assigned[ri] = ri, ii
    records, paths = [], {}
    for ii, ri in sorted(owner.items()):
        rec, item = ds.records[ri], items[ii]
        try:
            records.append(_resolve(rec, item))
        except ImageError as e:
            rep.unreadable.append(f"{rec.display} ({e.reason})")
            del assigned[ri]
            continue
        paths[item.rel] = item.path
        own, written, got = (_parts(n, True)[-1:] for n in (rec.ann_file, rec.file_name,
                                                             item.rel))
        if own and written and own != written:  # the two names disagree
            (rep.renamed if got == own else rep.by_filename).append(
                f"{rec.ann_file} -> {item.rel} (<filename> {rec.file_name})")
    rep.matched = len(records)
    rep.unmatched_records = [r.display for ri, r in enumerate(ds.records) if ri not in assigned]
    rep.ambiguous = [ds.records[ri].display for ri in sorted(ambiguous) if ri not in assigned]
    rep.taken = [v for ri, v in sorted(taken.items()) if ri not in assigned]
    rep.unannotated_images = [it.rel for ii, it in enumerate(items) if it.rel not in paths]
    roots = {_root_of(it) for it in items}
    root = roots.pop() if len(roots) == 1 else ds.image_root
    return Dataset(records, list(ds.classes), root, ds.category_ids, paths), rep


def match_annotations(items: list[ImageItem], annotations: str | Path | Dataset,
                      split: str | Path | None = None, classes: list[str] | None = None
                      ) -> tuple[Dataset, MatchReport]:
    """Pair annotations with the images a command was given, before any work is done.

    Each annotation goes to at most one image and each image gets at most one annotation,
    tried in this order (a later rule only for what an earlier one left):

    1. the annotation's own file (VOC XML, YOLO ``.txt``): the image with the same relative
       stem (``annots/a/img.xml`` -> ``a/img.jpg``); when stems repeat, the image sharing
       the most trailing folders, then the shortest path; a tie is reported, never guessed;
    2. the name written inside it (``<filename>``, COCO ``file_name``, CSV ``filename``),
       with its extension; 3. that name's stem (``a.png`` written, ``a.jpg`` given).

    So an XML whose ``<filename>`` is stale (copied or renamed files) belongs to the image
    named like the XML when there is one, and to its ``<filename>`` image otherwise (unless
    that image already has its own XML). Disagreements are listed in the report.
    Matched records are renamed to ``ImageItem.rel``, get their size from the image header
    when the annotation has none, and YOLO boxes are converted to pixels.

    Args:
        items: the images (``ImageItem.path``, ``ImageItem.rel``), e.g. from
            :func:`rcnn_cli.images.list_images`.
        annotations: anything :func:`load_dataset` reads, or a loaded :class:`Dataset`.
        split: optional split file (or VOC split name): only these images and annotations.
        classes: optional class list (default: the annotations' own).

    Returns:
        (dataset of the matched records in image order, keyed by ``ImageItem.rel``: use
        ``by_name()`` for the dict rel -> record and ``image_path(rec)`` for the image;
        the report). One summary warning is logged when anything did not pair up.

    Raises:
        AnnotationError: no annotation matches any image (the message shows an example name
            from each side), or the annotations cannot be read.
        FileNotFoundError: ``annotations`` does not exist.
    """
    if isinstance(annotations, Dataset):
        ds, source = annotations, str(annotations.image_root)
        wanted = _split_set(ds.image_root, split)
        if wanted is not None:
            ds = dataclasses.replace(ds, records=[r for r in ds.records if _in_split(
                (r.ann_file, r.file_name), wanted)])
    else:
        path = Path(annotations)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        source = str(path)
        wanted = _split_set(path, split)
        ds = _read(path, wanted, classes)[0]
    items = [it for it in items if _in_split((it.rel,), wanted)]
    out, rep = _pair(items, ds, source)
    if items and not out.records:
        if not ds.records:
            raise AnnotationError(f"{source}: no annotations to match to the {len(items)} "
                                  f"image(s) given (e.g. {items[0].rel})")
        r = ds.records[0]
        ex = r.display + (f" (<filename> {r.file_name})" if r.ann_file and r.file_name else "")
        raise AnnotationError(f"{source}: no annotation matches any of the {len(items)} "
                              f"image(s) given (annotations: e.g. {ex}; images: e.g. "
                              f"{items[0].rel})")
    if not rep.clean:
        log.warning("%s", rep.summary())
    else:
        log.info("%s", rep.summary())
    return out, rep


# ------------------------------------------------------------------------------- dispatch
def _read(path: Path, wanted: set[str] | None, classes: list[str] | None,
          image_root: str | Path | None = None) -> tuple[Dataset, str, Path | None]:
    """(records as the files give them, layout kind, image folder found beside them)."""
    kind, ann, img_dir = _layout(path)
    if kind == "voc":
        ds = _read_voc(ann, wanted, classes)
    elif kind == "yolo":
        if not ann.is_dir():
            raise AnnotationError(f"{path}: no labels/ folder beside it")
        ds = _read_yolo(ann, path if path.is_file() else None, wanted, classes)
    else:
        root = Path(image_root) if image_root else path.parent
        ds = (_read_coco(path, wanted, root) if kind == "coco"
              else _read_csv(path, wanted, root, classes))
    return ds, kind, img_dir


def _fill_sizes(ds: Dataset) -> Dataset:
    """Records without a size get it from ``image_root / file_name`` when that exists."""
    out = []
    for r in ds.records:
        p = ds.image_root / r.file_name
        if (_known((r.height, r.width)) is None or r.normalized) and p.is_file():
            try:
                r = _resolve(r, ImageItem(p, r.file_name))
            except ImageError as e:
                log.warning("%s: size unknown (%s)", p, e.reason)
        out.append(r)
    return dataclasses.replace(ds, records=out)


def load_dataset(path: str | Path, split: str | Path | None = None,
                 image_root: str | Path | None = None,
                 classes: list[str] | None = None) -> Dataset:
    """Load annotations: a VOC or YOLO folder (see the module docstring), a COCO ``.json``,
    a ``.csv`` or a YOLO ``data.yaml``.

    A VOC or YOLO folder is matched to the images beside it (``JPEGImages/``, ``images/``
    or the folder itself; ``image_root`` overrides) with :func:`match_annotations`, so
    records are named by the images' paths relative to that folder. A folder of XML files
    with no images near it keeps the names written in the files (enough for `evaluate`).

    ``split``: a file of stems, or the word ``train``/``test``/``val`` to use the VOC
    folder's own ``<split>.txt`` (or ``ImageSets/Main/<split>.txt``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    wanted = _split_set(path, split)
    ds, kind, img_dir = _read(path, wanted, classes, image_root)
    if kind in ("coco", "csv"):
        return _fill_sizes(ds)
    img_dir = Path(image_root) if image_root else img_dir
    if img_dir is None:
        if kind == "yolo":
            raise AnnotationError(f"{path}: no images/ folder beside the YOLO labels")
        log.info("%s: no images beside the annotations; records keep their <filename>", path)
        return dataclasses.replace(ds, records=[dataclasses.replace(
            r, file_name=r.file_name or PurePosixPath(r.ann_file).with_suffix("").as_posix())
            for r in ds.records])
    items = [it for it in list_images(img_dir) if _in_split((it.rel,), wanted)]
    out, rep = _pair(items, ds, str(path))
    if ds.records and not out.records:
        raise AnnotationError(f"{path}: no annotation matches an image in {img_dir}"
                              f" (annotations: e.g. {ds.records[0].display})")
    if rep.unmatched_records or rep.renamed or rep.by_filename or rep.unreadable:
        log.warning("%s", rep.summary())
    return dataclasses.replace(out, image_root=img_dir)
