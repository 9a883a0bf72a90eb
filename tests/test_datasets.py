import json
import logging

import numpy as np
import pytest
from PIL import Image

from rcnn_cli import datasets as ds
from rcnn_cli.datasets import AnnotationError, Dataset, ImageRecord
from rcnn_cli.images import list_images


def _voc_folder(tmp_path):
    root = tmp_path / "voc"
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    for stem in ("a", "b"):
        Image.new("RGB", (100, 80)).save(root / "images" / f"{stem}.jpg")
    recs = [ImageRecord("a.jpg", 80, 100, np.array([[0, 0, 10, 20], [50, 40, 100, 80]],
                                                   np.float32), np.array([0, 1]),
                        np.array([False, True])),
            ImageRecord("b.jpg", 80, 100)]
    for r in recs:
        ds.write_voc_xml(root / "annotations" / f"{r.stem}.xml", r, ["cat", "dog"])
    (root / "train.txt").write_text("a\n")
    return root, recs


def test_voc_roundtrip(tmp_path):
    root, recs = _voc_folder(tmp_path)
    d = ds.load_dataset(root)
    assert d.classes == ["cat", "dog"]
    assert [r.file_name for r in d.records] == ["a.jpg", "b.jpg"]
    np.testing.assert_array_equal(d.records[0].boxes, recs[0].boxes)
    np.testing.assert_array_equal(d.records[0].labels, [0, 1])
    np.testing.assert_array_equal(d.records[0].difficult, [False, True])
    assert d.records[1].boxes.shape == (0, 4)
    assert d.image_path(d.records[0]).is_file()
    # the split by name finds train.txt
    assert [r.file_name for r in ds.load_dataset(root, split="train").records] == ["a.jpg"]


def test_voc_bad_boxes_fixed_with_warnings(tmp_path, caplog):
    root, _ = _voc_folder(tmp_path)
    (root / "annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>100</width><height>80</height>"
        "</size>"
        "<object><name>cat</name><bndbox><xmin>90</xmin><ymin>1</ymin><xmax>150</xmax>"
        "<ymax>10</ymax></bndbox></object>"
        "<object><name>cat</name><bndbox><xmin>30</xmin><ymin>30</ymin><xmax>10</xmax>"
        "<ymax>40</ymax></bndbox></object>"
        "<object><name>cat</name><bndbox><xmin>200</xmin><ymin>1</ymin><xmax>300</xmax>"
        "<ymax>10</ymax></bndbox></object></annotation>")
    (root / "annotations" / "broken.xml").write_text("<annotation><oops")
    (root / "annotations" / "noimage.xml").write_text(
        "<annotation><filename>zzz.jpg</filename></annotation>")
    with caplog.at_level(logging.WARNING):
        d = ds.load_dataset(root)
    a = d.by_name()["a.jpg"]
    np.testing.assert_array_equal(a.boxes, [[89, 0, 100, 10], [10, 29, 29, 40]])
    text = caplog.text
    assert "clipped" in text and "inverted" in text and "zero area" in text
    assert "invalid XML" in text and "not found" in text
    assert "a.xml" in text


def test_coco_roundtrip(tmp_path):
    recs = [ImageRecord("x/a.jpg", 50, 60, np.array([[1, 2, 11, 22]], np.float32),
                        np.array([1]), np.array([False])),
            ImageRecord("b.jpg", 30, 40)]
    d = Dataset(recs, ["cat", "dog"], tmp_path)
    js = ds.coco_instances(d)
    assert js["annotations"][0]["bbox"] == [1.0, 2.0, 10.0, 20.0]
    assert js["annotations"][0]["category_id"] == 2
    p = tmp_path / "inst.json"
    p.write_text(json.dumps(js))
    back = ds.load_dataset(p)
    assert back.classes == ["cat", "dog"]
    np.testing.assert_array_equal(back.by_name()["x/a.jpg"].boxes, recs[0].boxes)
    np.testing.assert_array_equal(back.by_name()["x/a.jpg"].labels, [1])
    assert back.by_name()["b.jpg"].boxes.shape == (0, 4)


def test_coco_unknown_image_warns(tmp_path, caplog):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "a"}],
                             "annotations": [{"image_id": 7, "category_id": 1,
                                              "bbox": [0, 0, 1, 1]}]}))
    with caplog.at_level(logging.WARNING):
        d = ds.load_dataset(p)
    assert d.records == [] and "unknown image id 7" in caplog.text


def test_csv_roundtrip_and_missing_column(tmp_path):
    recs = [ImageRecord("a.jpg", 50, 60, np.array([[1, 2, 11, 22], [0, 0, 5, 5]], np.float32),
                        np.array([0, 1]), np.array([False, False])),
            ImageRecord("b.jpg", 30, 40)]
    d = Dataset(recs, ["cat", "dog"], tmp_path)
    p = tmp_path / "ann.csv"
    ds.write_csv(p, d)
    back = ds.load_dataset(p)
    assert back.classes == ["cat", "dog"]
    np.testing.assert_array_equal(back.records[0].boxes, recs[0].boxes)
    assert [r.file_name for r in back.records] == ["a.jpg", "b.jpg"]
    with pytest.raises(FileExistsError):
        ds.write_csv(p, d)  # never overwrite without asking
    bad = tmp_path / "bad.csv"
    bad.write_text("filename,class\n")
    with pytest.raises(AnnotationError, match="lacks column"):
        ds.load_dataset(bad)


def test_unknown_format(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("")
    with pytest.raises(AnnotationError, match="unknown annotation format"):
        ds.load_dataset(p)


def test_raccoon_loads(raccoon):
    d = ds.load_dataset(raccoon)
    assert d.classes == ["raccoon"] and len(d.records) == 200
    assert sum(len(r.boxes) for r in d.records) == 217
    tr = ds.load_dataset(raccoon, split=raccoon / "train.txt")
    assert len(tr.records) == 160


def test_split_keeps_the_whole_folders_class_list(tmp_path):
    root, _ = _voc_folder(tmp_path)
    (root / "only_b.txt").write_text("b\n")
    d = ds.load_dataset(root, split=root / "only_b.txt")
    assert [r.file_name for r in d.records] == ["b.jpg"]
    assert d.classes == ["cat", "dog"]


# ------------------------------------------------------------------ datasets as users have them
# (issue 12: layouts, matching annotations to the images given on the command line)
def _xml(path, filename, boxes=((11, 21, 30, 40),), name="cat", size=(100, 80)):
    """A VOC XML (1-based boxes); ``size`` (w, h) or None to leave the size out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    objs = "".join(f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for b in boxes)
    sz = (f"<size><width>{size[0]}</width><height>{size[1]}</height></size>"
          if size else "")
    path.write_text(f"<annotation><filename>{filename}</filename>{sz}{objs}</annotation>")


def _img(path, size=(100, 80)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size).save(path)


def test_any_xml_folder_matched_to_the_images_given(tmp_path, caplog):
    # issue 12: `rcnn extract images/ --annotations annots/` gave zero ground truth
    for s in ("a", "b"):
        _img(tmp_path / "images" / f"{s}.jpg")
        _xml(tmp_path / "annots" / f"{s}.xml", f"{s}.jpg", boxes=[(11, 21, 30 + (s == "b"), 40)])
    items = list_images(tmp_path / "images")
    with caplog.at_level(logging.WARNING):
        d, rep = ds.match_annotations(items, tmp_path / "annots")
    assert sorted(d.by_name()) == ["a.jpg", "b.jpg"] and rep.matched == 2
    np.testing.assert_array_equal(d.by_name()["b.jpg"].boxes, [[10, 20, 31, 40]])
    assert d.image_path(d.by_name()["a.jpg"]) == tmp_path / "images" / "a.jpg"
    assert caplog.text == ""  # nothing to say when everything pairs up
    # the dataset root holding images/ + annots/ (any name) works as --annotations too
    d2 = ds.load_dataset(tmp_path)
    assert [r.file_name for r in d2.records] == ["a.jpg", "b.jpg"]
    # and the images given as the dataset root (rel images/a.jpg) match by stem
    d3, _ = ds.match_annotations(list_images(tmp_path), tmp_path / "annots")
    assert sorted(d3.by_name()) == ["images/a.jpg", "images/b.jpg"]


def test_voc_devkit_layout(tmp_path):
    root = tmp_path / "VOC2007"
    for s in ("000005", "000007"):
        _img(root / "JPEGImages" / f"{s}.jpg")
        _xml(root / "Annotations" / f"{s}.xml", f"{s}.jpg")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "test.txt").write_text("000007\n")
    d = ds.load_dataset(root, split="test")
    assert [r.file_name for r in d.records] == ["000007.jpg"]
    assert d.image_path(d.records[0]) == root / "JPEGImages" / "000007.jpg"
    d, rep = ds.match_annotations(list_images(root / "JPEGImages"), root, split="test")
    assert list(d.by_name()) == ["000007.jpg"] and rep.unmatched_records == []


def test_repeated_stems_matched_by_relative_path(tmp_path):
    for sub, y in (("a", 21), ("b", 31)):
        _img(tmp_path / "images" / sub / "img.jpg")
        _xml(tmp_path / "annots" / sub / "img.xml", "img.jpg", boxes=[(11, y, 30, 40)])
    d, rep = ds.match_annotations(list_images(tmp_path / "images"), tmp_path / "annots")
    assert rep.matched == 2
    assert d.by_name()["a/img.jpg"].boxes[0, 1] == 20
    assert d.by_name()["b/img.jpg"].boxes[0, 1] == 30


def test_same_stem_other_extension_uses_filename(tmp_path):
    _img(tmp_path / "images" / "img.jpg")
    _img(tmp_path / "images" / "img.png")
    _xml(tmp_path / "annots" / "img.xml", "img.png")
    d, rep = ds.match_annotations(list_images(tmp_path / "images"), tmp_path / "annots")
    assert list(d.by_name()) == ["img.png"]
    assert rep.unannotated_images == ["img.jpg"]


def test_stale_filename_prefers_the_xmls_own_name(tmp_path, caplog):
    # b.xml was copied from a.xml and kept <filename>a.jpg</filename>
    for s in ("a", "b"):
        _img(tmp_path / "images" / f"{s}.jpg")
    _xml(tmp_path / "annots" / "a.xml", "a.jpg", boxes=[(11, 21, 30, 40)])
    _xml(tmp_path / "annots" / "b.xml", "a.jpg", boxes=[(51, 21, 90, 40)])
    with caplog.at_level(logging.WARNING):
        d, rep = ds.match_annotations(list_images(tmp_path / "images"), tmp_path / "annots")
    assert d.by_name()["a.jpg"].boxes[0, 0] == 10 and d.by_name()["b.jpg"].boxes[0, 0] == 50
    assert len(rep.renamed) == 1 and "b.xml" in caplog.text and "<filename>" in caplog.text
    assert len(caplog.records) == 1  # one summary line


def test_xml_named_otherwise_matched_by_filename(tmp_path, caplog):
    # the other direction: the XML's own name has no image, its <filename> has one
    _img(tmp_path / "images" / "IMG_0001.jpg")
    _img(tmp_path / "images" / "IMG_0002.jpg")
    _xml(tmp_path / "annots" / "label_1.xml", "IMG_0001.jpg")
    # and a <filename> already claimed by the image's own XML is not taken twice
    _xml(tmp_path / "annots" / "IMG_0002.xml", "IMG_0002.jpg", boxes=[(1, 1, 5, 5)])
    _xml(tmp_path / "annots" / "copy.xml", "IMG_0002.jpg", boxes=[(9, 9, 20, 20)])
    with caplog.at_level(logging.WARNING):
        d, rep = ds.match_annotations(list_images(tmp_path / "images"), tmp_path / "annots")
    assert sorted(d.by_name()) == ["IMG_0001.jpg", "IMG_0002.jpg"]
    np.testing.assert_array_equal(d.by_name()["IMG_0002.jpg"].boxes, [[0, 0, 5, 5]])
    assert rep.unmatched_records == ["copy.xml"] and "copy.xml" in caplog.text
    assert rep.taken == ["copy.xml (IMG_0002.jpg: IMG_0002.xml)"]
    assert rep.by_filename == ["label_1.xml -> IMG_0001.jpg (<filename> IMG_0001.jpg)"]
    assert "matched by <filename>" in caplog.text and len(caplog.records) == 1


def test_filename_without_extension_is_no_disagreement(tmp_path, caplog):
    _img(tmp_path / "images" / "a.jpg")
    _xml(tmp_path / "annots" / "a.xml", "a")  # some labelling tools write the bare stem
    with caplog.at_level(logging.WARNING):
        d, rep = ds.match_annotations(list_images(tmp_path / "images"), tmp_path / "annots")
    assert rep.clean and list(d.by_name()) == ["a.jpg"] and caplog.text == ""


def test_size_from_the_image_header_when_the_xml_has_none(tmp_path, caplog):
    _img(tmp_path / "images" / "a.jpg", size=(50, 40))
    _xml(tmp_path / "annots" / "a.xml", "a.jpg", boxes=[(11, 21, 90, 30), (0, 5, 10, 15)],
         size=None)
    with caplog.at_level(logging.WARNING):
        d, _ = ds.match_annotations(list_images(tmp_path / "images"), tmp_path / "annots")
    r = d.by_name()["a.jpg"]
    assert (r.height, r.width) == (40, 50)
    # clipped to the real size, once it is known, with the usual warning
    np.testing.assert_array_equal(r.boxes, [[10, 20, 50, 30], [0, 4, 10, 15]])
    assert "50x40 image; clipped" in caplog.text
    # a file name with a colon is a name, not a drive
    assert ds.safe_rel("a:b.jpg", "x") == "a:b.jpg" and ds.safe_rel("c:/a.jpg", "x") is None


def test_no_match_is_an_error_naming_both_sides(tmp_path):
    _img(tmp_path / "images" / "photo1.jpg")
    _xml(tmp_path / "annots" / "other.xml", "other.jpg")
    with pytest.raises(AnnotationError) as e:
        ds.match_annotations(list_images(tmp_path / "images"), tmp_path / "annots")
    msg = str(e.value)
    assert "\n" not in msg and "other" in msg and "photo1.jpg" in msg


def test_partial_match_one_summary_warning(tmp_path, caplog):
    for i in range(3):
        _img(tmp_path / "images" / f"im{i}.jpg")
    _xml(tmp_path / "annots" / "im0.xml", "im0.jpg")
    for i in range(7):
        _xml(tmp_path / "annots" / f"zz{i}.xml", f"zz{i}.jpg")
    with caplog.at_level(logging.WARNING):
        d, rep = ds.match_annotations(list_images(tmp_path / "images"), tmp_path / "annots")
    assert list(d.by_name()) == ["im0.jpg"]
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "7 annotation(s)" in msg and "zz4" in msg and "zz5" not in msg  # first five only
    assert "2 image(s) without annotation" in msg
    assert len(rep.unmatched_records) == 7 and rep.unannotated_images == ["im1.jpg", "im2.jpg"]


@pytest.mark.parametrize("bad", ["/etc/passwd", "../../x.jpg", "..\\..\\x.jpg", "C:/x/a.jpg"])
def test_unsafe_filename_is_ignored(tmp_path, caplog, bad):
    _img(tmp_path / "images" / "a.jpg")
    _xml(tmp_path / "annots" / "a.xml", bad)
    with caplog.at_level(logging.WARNING):
        d, _ = ds.match_annotations(list_images(tmp_path / "images"), tmp_path / "annots")
    assert list(d.by_name()) == ["a.jpg"]  # the XML's own name still matches
    assert "ignored" in caplog.text and "a.xml" in caplog.text
    # a COCO file_name outside the root: the image entry is dropped with a warning
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"images": [{"id": 1, "file_name": bad, "height": 8, "width": 8}],
                             "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert ds.load_dataset(p).records == []
    assert "ignored" in caplog.text


def _yolo(root, names_file):
    for rel in ("train/a.jpg", "val/b.png"):
        _img(root / "images" / rel, size=(100, 50))
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.2 0.4\n0 0.1 0.1 0.2 0.2\n")
    (root / "labels" / "val" / "b.txt").write_text("garbage line\n0 0.5 0.5 1.0 1.0\n")
    if names_file == "list":
        (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames: [cat, dog]\n")
    elif names_file == "dict":
        (root / "data.yaml").write_text("nc: 2\nnames:\n  0: cat\n  1: 'dog'\n")
    else:
        (root / "classes.txt").write_text("cat\ndog\n")


@pytest.mark.parametrize("names_file", ["list", "dict", "classes.txt", "list-no-pyyaml"])
def test_yolo_layout(tmp_path, caplog, monkeypatch, names_file):
    if names_file.endswith("-no-pyyaml"):  # PyYAML is optional: the hand parser takes over
        import sys

        monkeypatch.setitem(sys.modules, "yaml", None)
        names_file = names_file.split("-")[0]
    _yolo(tmp_path, names_file)
    with caplog.at_level(logging.WARNING):
        d = ds.load_dataset(tmp_path)
    assert d.classes == ["cat", "dog"]
    a = d.by_name()["train/a.jpg"]
    np.testing.assert_allclose(a.boxes, [[40, 15, 60, 35], [0, 0, 20, 10]], atol=1e-4)
    np.testing.assert_array_equal(a.labels, [1, 0])
    assert d.by_name()["val/b.png"].boxes.tolist() == [[0, 0, 100, 50]]
    assert "b.txt:1" in caplog.text  # the bad line named by file and line
    # the labels folder as --annotations, images given on the command line
    m, rep = ds.match_annotations(list_images(tmp_path / "images"), tmp_path / "labels")
    assert rep.matched == 2 and m.classes == ["cat", "dog"]


@pytest.mark.parametrize("text", ["names: [cat, 'dog', \"a b\"]\n",
                                  "names:\n  - cat\n  - dog # comment\n  - a b\n",
                                  "names: {0: cat, 1: dog, 2: a b}\n",
                                  "names:\n  0: cat\n  2: a b\n  1: dog\n"])
def test_yaml_names_hand_parser(text):
    # PyYAML is not a dependency: the simple names: forms are parsed by hand when it is absent
    assert ds._yaml_names(text) == ["cat", "dog", "a b"]


def test_coco_keeps_user_ids_and_reports_bad_entries(tmp_path, caplog):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({
        "images": [{"id": 42, "file_name": "a.jpg", "height": 80, "width": 100}],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [{"id": 1, "image_id": 42, "category_id": 7, "bbox": [1, 2, 3, 4]},
                        {"id": 99, "image_id": 42, "category_id": 3}]}))
    with caplog.at_level(logging.WARNING):
        d = ds.load_dataset(p)
    assert d.classes == ["cat", "dog"] and d.category_ids == [3, 7]
    r = d.records[0]
    assert r.image_id == 42 and r.labels.tolist() == [1]
    assert "c.json" in caplog.text and "annotation 99" in caplog.text and "bbox" in caplog.text
    js = ds.coco_instances(d)  # written back with the user's ids
    assert js["images"][0]["id"] == 42 and js["annotations"][0]["category_id"] == 7
    # matched to images, the ids survive
    _img(tmp_path / "a.jpg")
    m, _ = ds.match_annotations(list_images(tmp_path), p)
    assert m.by_name()["a.jpg"].image_id == 42 and m.category_ids == [3, 7]
    p.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(AnnotationError, match="c.json.*categories"):
        ds.load_dataset(p)


def test_csv_bad_rows_named_by_row_number(tmp_path, caplog):
    p = tmp_path / "ann.csv"
    p.write_text("filename,width,height,class,xmin,ymin,xmax,ymax\n"
                 "a.jpg,100,80,cat,1,2,11,22\n"
                 "a.jpg,100,80,cat,1,2\n"
                 "b.jpg,100,80,dog,x,2,11,22\n")
    with caplog.at_level(logging.WARNING):
        d = ds.load_dataset(p)
    assert [r.file_name for r in d.records] == ["a.jpg"]
    assert "ann.csv:3" in caplog.text and "ann.csv:4" in caplog.text
    p.write_text("filename,width,height,class,xmin,ymin,xmax,ymax\na.jpg,100\n")
    with pytest.raises(AnnotationError, match="ann.csv: no usable row"):
        ds.load_dataset(p)


def test_class_names_never_become_paths(tmp_path, caplog):
    assert ds.safe_name("cat") == "cat" and ds.safe_name("traffic light") == "traffic light"
    for bad in ("../../etc/x", "a/b", "a\\b", "..", ".", "", "/abs"):
        s = ds.safe_name(bad)
        assert "/" not in s and "\\" not in s and s not in (".", "..", "") and not s.startswith(".")
    assert ds.safe_name("a/b") != ds.safe_name("a_b")  # distinct names stay distinct
    _img(tmp_path / "images" / "a.jpg")
    _xml(tmp_path / "annots" / "a.xml", "a.jpg", name="../../evil")
    with caplog.at_level(logging.WARNING):
        d = ds.load_dataset(tmp_path)
    assert d.classes == ["../../evil"] and "path" in caplog.text


def _images_and_annots(tmp_path, n=2):
    """images/im<i>.jpg (three flat rectangles) + annots/im<i>.xml (the red one, "red")."""
    from tests.conftest import rectangles_image

    for i in range(n):
        img, boxes = rectangles_image(seed=i)
        _img(tmp_path / "images" / f"im{i}.jpg")
        Image.fromarray(img).save(tmp_path / "images" / f"im{i}.jpg")
        x1, y1, x2, y2 = boxes[0].astype(int)
        _xml(tmp_path / "annots" / f"im{i}.xml", f"im{i}.jpg", boxes=[(x1 + 1, y1 + 1, x2, y2)],
             name="red", size=(160, 120))
    return boxes[0]


class _FakeExtractor:
    """Stands in for the CNN: these tests are about which ground truth reaches the files."""

    mode, tap, device = "shared", "fake", type("D", (), {"type": "cpu"})()

    def settings(self):
        return {"fake": 1}

    def extract(self, img, boxes):
        return np.zeros((len(boxes), 3), np.float32)


def test_extract_with_an_xml_folder_writes_ground_truth(tmp_path, monkeypatch):
    # issue 12: `rcnn extract images/ --annotations annots/` wrote ZERO ground truth
    from click.testing import CliRunner

    from rcnn_cli import stages
    from rcnn_cli.cli import cli

    monkeypatch.setattr(stages, "get_extractor", lambda kwargs: _FakeExtractor())
    monkeypatch.setattr(stages, "compute_proposals", lambda img, s: (
        np.array([[0, 0, 50, 50], [10, 10, 90, 70]], np.float32), np.ones(2, np.float32)))
    red = _images_and_annots(tmp_path)
    r = CliRunner()
    res = r.invoke(cli, ["propose", str(tmp_path / "images"), "-o", str(tmp_path / "props"),
                         "--top-k", "20"])
    assert res.exit_code == 0, res.output
    res = r.invoke(cli, ["extract", str(tmp_path / "images"), "--proposals",
                         str(tmp_path / "props"), "--annotations", str(tmp_path / "annots"),
                         "-o", str(tmp_path / "feats")])
    assert res.exit_code == 0, res.output
    assert "not found" not in res.output
    for i in range(2):
        z = np.load(tmp_path / "feats" / f"im{i}.jpg.npz")
        np.testing.assert_array_equal(z["gt_boxes"], [red])
        assert z["gt_labels"].tolist() == [0] and (z["gt_label"] == 0).sum() == 1


def test_extract_without_any_match_fails_before_work(tmp_path, monkeypatch):
    from rcnn_cli import config as cfgmod
    from rcnn_cli import stages

    _images_and_annots(tmp_path)
    for x in list((tmp_path / "annots").glob("*.xml")):  # annotations of other photos
        x.rename(x.with_name("other_" + x.name))
        x.with_name("other_" + x.name).write_text(
            x.with_name("other_" + x.name).read_text().replace("<filename>im", "<filename>zz"))

    def boom(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(stages, "get_extractor", boom)
    monkeypatch.setattr(stages, "open_upstream", boom)
    with pytest.raises(AnnotationError, match="no annotation matches .*other_im0.xml.*im0.jpg"):
        stages.extract_folder([tmp_path / "images"], tmp_path / "props", tmp_path / "feats",
                              cfgmod.load(None, {}), annotations=tmp_path / "annots")
    assert not (tmp_path / "feats").exists()


@pytest.mark.parametrize("layout", ["voc_devkit", "annotations_images", "xml_folder", "yolo",
                                    "coco", "csv"])
def test_every_dataset_layout_through_rcnn_extract(tmp_path, monkeypatch, layout):
    """Each layout the README documents gives the same ground truth to `rcnn extract`."""
    import shutil

    from click.testing import CliRunner

    from rcnn_cli import boxes as bx
    from rcnn_cli import stages
    from rcnn_cli.cli import cli

    monkeypatch.setattr(stages, "get_extractor", lambda kwargs: _FakeExtractor())
    monkeypatch.setattr(stages, "compute_proposals", lambda img, s: (
        np.array([[0, 0, 50, 50]], np.float32), np.ones(1, np.float32)))
    red = _images_and_annots(tmp_path)  # images/im<i>.jpg + annots/im<i>.xml
    root, images = tmp_path, tmp_path / "images"
    if layout == "voc_devkit":
        root = tmp_path / "VOC"
        shutil.copytree(tmp_path / "annots", root / "Annotations")
        shutil.copytree(images, root / "JPEGImages")
        images, ann = root / "JPEGImages", root
    elif layout == "annotations_images":
        shutil.copytree(tmp_path / "annots", tmp_path / "annotations")
        shutil.rmtree(tmp_path / "annots")
        ann = tmp_path
    elif layout == "xml_folder":
        ann = tmp_path / "annots"
    else:
        shutil.rmtree(tmp_path / "annots")
        if layout == "yolo":
            (tmp_path / "labels").mkdir()
            v = bx.to_yolo(red[None], (120, 160))[0]
            for i in range(2):
                (tmp_path / "labels" / f"im{i}.txt").write_text(
                    "0 " + " ".join(f"{x:.8f}" for x in v) + "\n")
            (tmp_path / "classes.txt").write_text("red\n")
            ann = tmp_path
        elif layout == "coco":
            x1, y1, x2, y2 = (float(v) for v in red)
            coco = {"images": [{"id": 7 + i, "file_name": f"im{i}.jpg", "width": 160,
                                "height": 120} for i in range(2)],
                    "annotations": [{"id": i + 1, "image_id": 7 + i, "category_id": 3,
                                     "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0,
                                     "area": (x2 - x1) * (y2 - y1)} for i in range(2)],
                    "categories": [{"id": 3, "name": "red"}]}
            ann = tmp_path / "instances.json"
            ann.write_text(json.dumps(coco))
        else:
            ann = tmp_path / "boxes.csv"
            ann.write_text("filename,width,height,class,xmin,ymin,xmax,ymax\n" + "".join(
                f"im{i}.jpg,160,120,red,{','.join(str(float(v)) for v in red)}\n"
                for i in range(2)))
    r = CliRunner()
    res = r.invoke(cli, ["propose", str(images), "-o", str(tmp_path / "props")])
    assert res.exit_code == 0, res.output
    res = r.invoke(cli, ["extract", str(images), "--proposals", str(tmp_path / "props"),
                         "--annotations", str(ann), "-o", str(tmp_path / "feats")])
    assert res.exit_code == 0, res.output
    for i in range(2):
        z = np.load(tmp_path / "feats" / f"im{i}.jpg.npz")
        np.testing.assert_allclose(z["gt_boxes"], [red], atol=1e-3)
        assert z["gt_labels"].tolist() == [0]
