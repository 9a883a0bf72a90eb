import json
import logging

import numpy as np
import pytest
from PIL import Image

from rcnn_cli import datasets as ds
from rcnn_cli.datasets import AnnotationError, Dataset, ImageRecord


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
