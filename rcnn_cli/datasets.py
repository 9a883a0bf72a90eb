"""Annotation readers and writers: PASCAL VOC XML folders, COCO instances JSON, CSV.

Everything is loaded into one record type, :class:`ImageRecord`, with boxes in our
convention (float32 (N, 4) x1, y1, x2, y2, continuous pixels; see :mod:`rcnn_cli.boxes`).
Fix-ups happen here, at load: a box partly outside the image is clipped, an inverted box is
re-ordered, a box of zero area (after clipping) is dropped; each gets a warning naming the
file and the box. Nothing is ever written back to the user's annotation files.

The class list is sorted by name (stable across machines and file orders) unless the caller
gives one; COCO keeps its category order by id.
"""
from __future__ import annotations

import csv
import json
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from rcnn_cli import boxes as bx
from rcnn_cli.images import IMAGE_EXTENSIONS, image_size, read_split
from rcnn_cli.store import atomic_write_text

log = logging.getLogger("rcnn_cli.datasets")


class AnnotationError(ValueError):
    """An annotation source that cannot be used at all (one line, names the file)."""


@dataclass
class ImageRecord:
    """Ground truth of one image.

    Attributes:
        file_name: image path relative to the dataset's image root (posix separators).
        height, width: image size in pixels.
        boxes: float32 (G, 4) x1y1x2y2.
        labels: int64 (G,) indices into the dataset's class list.
        difficult: bool (G,) VOC ``difficult`` flags (False elsewhere).
    """

    file_name: str
    height: int
    width: int
    boxes: NDArray[np.float32] = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    difficult: NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def stem(self) -> str:
        return Path(self.file_name).stem


@dataclass
class Dataset:
    """Records, the class list (index = label) and the folder the file names are relative to."""

    records: list[ImageRecord]
    classes: list[str]
    image_root: Path

    def by_name(self) -> dict[str, ImageRecord]:
        return {r.file_name: r for r in self.records}

    def image_path(self, rec: ImageRecord) -> Path:
        return self.image_root / rec.file_name


# ------------------------------------------------------------------------------- fix-ups
def sanitize_boxes(raw: NDArray, size: tuple[int, int], where: str) -> tuple[NDArray, NDArray]:
    """Clip, re-order and drop bad boxes; return (boxes (G, 4), keep mask over the input)."""
    b = bx.as_boxes(raw).copy()
    h, w = size
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
        c = [min(max(x1, 0), w), min(max(y1, 0), h), min(max(x2, 0), w), min(max(y2, 0), h)]
        if c != [x1, y1, x2, y2] and w > 0 and h > 0:
            log.warning("%s: box %d %s lies partly outside the %dx%d image; clipped",
                        where, i, [round(v, 1) for v in (x1, y1, x2, y2)], w, h)
        b[i] = c
        if c[2] - c[0] <= 0 or c[3] - c[1] <= 0:
            log.warning("%s: box %d has zero area after clipping; dropped", where, i)
            keep[i] = False
    return b[keep], keep


def _make_record(file_name, size, raw_boxes, names, difficult, class_index, where):
    boxes, keep = sanitize_boxes(np.asarray(raw_boxes, np.float32).reshape(-1, 4), size, where)
    names = [n for n, k in zip(names, keep) if k]
    diff = np.asarray(difficult, bool).reshape(-1)[keep]
    labels = np.array([class_index[n] for n in names], np.int64)
    return ImageRecord(file_name, size[0], size[1], boxes, labels, diff)


# ------------------------------------------------------------------------------- VOC
def _voc_dirs(root: Path) -> tuple[Path, Path]:
    for ann, img in (("Annotations", "JPEGImages"), ("annotations", "images")):
        if (root / ann).is_dir():
            return root / ann, (root / img if (root / img).is_dir() else root)
    if any(root.glob("*.xml")):
        return root, root
    raise AnnotationError(f"{root}: no VOC annotations found (expected annotations/*.xml "
                          "or Annotations/*.xml)")


def find_split_file(root: Path, split: str) -> Path | None:
    """``train``/``test`` split file of a VOC folder (root/<s>.txt or ImageSets/Main/<s>.txt)."""
    for p in (root / f"{split}.txt", root / "ImageSets" / "Main" / f"{split}.txt"):
        if p.is_file():
            return p
    return None


def _parse_voc_xml(path: Path):
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise AnnotationError(f"{path}: invalid XML ({e})") from None
    fname = root.findtext("filename") or ""
    size = root.find("size")
    w = int(float(size.findtext("width", "0"))) if size is not None else 0
    h = int(float(size.findtext("height", "0"))) if size is not None else 0
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


def read_voc(root: str | Path, split: str | Path | None = None,
             classes: list[str] | None = None) -> Dataset:
    """Read a PASCAL VOC folder (``annotations/`` + ``images/`` or the devkit layout).

    Images whose XML lacks a size get it from the image header. ``split`` restricts to the
    stems listed in a file.
    """
    root = Path(root)
    ann_dir, img_dir = _voc_dirs(root)
    xmls = sorted(ann_dir.glob("*.xml"))
    wanted = set(read_split(split)) if split is not None else None
    parsed, names = [], set()
    for x in xmls:
        try:
            fname, size, objs = _parse_voc_xml(x)
        except AnnotationError as e:
            if wanted is None or x.stem in wanted:
                log.warning("%s; skipped", e)
            continue
        # the class list comes from the whole folder, so that every split of a dataset
        # numbers its classes the same way
        names.update(n for n, _, _ in objs)
        if wanted is not None and x.stem not in wanted:
            continue
        img = _find_image(img_dir, fname, x.stem)
        if img is None:
            log.warning("%s: image %r not found in %s; skipped", x, fname or x.stem, img_dir)
            continue
        if size[0] <= 0 or size[1] <= 0:
            size = image_size(img)
        parsed.append((img.relative_to(img_dir).as_posix(), size, objs, x))
    if classes is None:
        classes = sorted(names)
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for rel, size, objs, x in parsed:
        objs = [o for o in objs if o[0] in index]
        raw = bx.from_voc(np.array([o[1] for o in objs], np.float32).reshape(-1, 4))
        records.append(_make_record(rel, size, raw, [o[0] for o in objs],
                                    [o[2] for o in objs], index, str(x)))
    return Dataset(records, list(classes), img_dir)


def _find_image(img_dir: Path, fname: str, stem: str) -> Path | None:
    if fname and (img_dir / fname).is_file():
        return img_dir / fname
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        p = img_dir / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


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


# ------------------------------------------------------------------------------- COCO
def read_coco(path: str | Path, image_root: str | Path | None = None,
              split: str | Path | None = None) -> Dataset:
    """Read COCO instances JSON. ``iscrowd`` objects are kept as ``difficult`` (ignored in
    evaluation, like VOC's difficult)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{path}: cannot read COCO JSON ({e})") from None
    cats = sorted(data.get("categories", []), key=lambda c: c["id"])
    classes = [c["name"] for c in cats]
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    anns: dict[int, list] = {}
    for a in data.get("annotations", []):
        anns.setdefault(a["image_id"], []).append(a)
    images = data.get("images", [])
    ids = {im["id"] for im in images}
    for a_img in anns:
        if a_img not in ids:
            log.warning("%s: annotations refer to unknown image id %s; dropped", path, a_img)
    wanted = set(read_split(split)) if split is not None else None
    records = []
    for im in sorted(images, key=lambda m: m["file_name"]):
        if wanted is not None and Path(im["file_name"]).stem not in wanted:
            continue
        objs = [a for a in anns.get(im["id"], []) if a.get("category_id") in cat_index]
        raw = bx.from_xywh(np.array([a["bbox"] for a in objs], np.float32).reshape(-1, 4))
        names = [classes[cat_index[a["category_id"]]] for a in objs]
        diff = [bool(a.get("iscrowd", 0)) for a in objs]
        records.append(_make_record(im["file_name"], (int(im["height"]), int(im["width"])), raw,
                                    names, diff, {c: i for i, c in enumerate(classes)},
                                    f"{path} image {im['file_name']}"))
    root = Path(image_root) if image_root else path.parent
    return Dataset(records, classes, root)


def coco_instances(ds: Dataset) -> dict:
    """The dataset as a COCO instances dict (ids start at 1; difficult -> iscrowd 0 + ignore)."""
    images, anns = [], []
    for i, r in enumerate(ds.records, 1):
        images.append({"id": i, "file_name": r.file_name, "height": r.height, "width": r.width})
        for b, lab, d in zip(bx.to_xywh(r.boxes), r.labels, r.difficult):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(lab) + 1,
                         "bbox": [float(v) for v in b], "area": float(b[2] * b[3]),
                         "iscrowd": int(bool(d))})
    cats = [{"id": i + 1, "name": c} for i, c in enumerate(ds.classes)]
    return {"images": images, "annotations": anns, "categories": cats}


# ------------------------------------------------------------------------------- CSV
CSV_FIELDS = ("filename", "width", "height", "class", "xmin", "ymin", "xmax", "ymax")


def read_csv(path: str | Path, image_root: str | Path | None = None,
             split: str | Path | None = None, classes: list[str] | None = None) -> Dataset:
    """Read the CSV layout ``filename,width,height,class,xmin,ymin,xmax,ymax`` (one row per
    box; pixel coordinates as in our convention; a row with an empty class is an image
    without objects)."""
    path = Path(path)
    rows: dict[str, list] = {}
    sizes: dict[str, tuple[int, int]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [k for k in CSV_FIELDS if k not in (reader.fieldnames or [])]
        if missing:
            raise AnnotationError(f"{path}: CSV lacks column(s) {', '.join(missing)}")
        for ln, row in enumerate(reader, 2):
            fn = row["filename"]
            try:
                sizes[fn] = (int(float(row["height"])), int(float(row["width"])))
                rows.setdefault(fn, [])
                if row["class"]:
                    rows[fn].append((row["class"], [float(row[k]) for k in CSV_FIELDS[4:]]))
            except ValueError:
                log.warning("%s:%d: malformed row; dropped", path, ln)
    wanted = set(read_split(split)) if split is not None else None
    if classes is None:
        classes = sorted({c for objs in rows.values() for c, _ in objs})
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for fn in sorted(rows):
        if wanted is not None and Path(fn).stem not in wanted:
            continue
        objs = [o for o in rows[fn] if o[0] in index]
        raw = np.array([o[1] for o in objs], np.float32).reshape(-1, 4)
        records.append(_make_record(fn, sizes[fn], raw, [o[0] for o in objs],
                                    [False] * len(objs), index, f"{path} {fn}"))
    return Dataset(records, list(classes), Path(image_root) if image_root else path.parent)


def write_csv(path: str | Path, ds: Dataset, overwrite: bool = False) -> None:
    """Write a dataset in the CSV layout (one row per box; an empty row per image without)."""
    lines = [",".join(CSV_FIELDS)]
    for r in ds.records:
        if len(r.boxes) == 0:
            lines.append(f"{r.file_name},{r.width},{r.height},,,,,")
        for b, lab in zip(r.boxes, r.labels):
            lines.append(f"{r.file_name},{r.width},{r.height},{ds.classes[int(lab)]},"
                         + ",".join(f"{float(v):g}" for v in b))
    atomic_write_text(path, "\n".join(lines) + "\n", overwrite=overwrite)


# ------------------------------------------------------------------------------- dispatch
def load_dataset(path: str | Path, split: str | Path | None = None,
                 image_root: str | Path | None = None,
                 classes: list[str] | None = None) -> Dataset:
    """Load annotations from a VOC folder, a COCO ``.json`` or a ``.csv`` file.

    ``split``: a file of stems, or the word ``train``/``test``/``val`` to use the VOC
    folder's own ``<split>.txt`` (or ``ImageSets/Main/<split>.txt``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if split is not None and not Path(split).exists() and path.is_dir():
        found = find_split_file(path, str(split))
        if found is None:
            raise AnnotationError(f"{path}: no split file {split}.txt")
        split = found
    if path.is_dir():
        return read_voc(path, split=split, classes=classes)
    if path.suffix.lower() == ".json":
        return read_coco(path, image_root=image_root, split=split)
    if path.suffix.lower() == ".csv":
        return read_csv(path, image_root=image_root, split=split, classes=classes)
    raise AnnotationError(f"{path}: unknown annotation format (expected a VOC folder, "
                          ".json (COCO) or .csv)")
