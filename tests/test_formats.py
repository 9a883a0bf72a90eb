"""Result-file writers: one identity per image, names from files never become paths."""
import logging
import os
from urllib.parse import unquote

import numpy as np
import pytest

from rcnn_cli import evaluate
from rcnn_cli.evaluate import Detections
from rcnn_cli.formats import (
    safe_filename,
    voc_image_id,
    write_coco_results,
    write_voc_results,
    write_yolo_results,
    yolo_label_names,
)


def _det(label=0, x=1.0):
    return Detections(np.array([[x, 2, x + 5, 8]], np.float32), [0.5], [label])


def test_writers_are_reexported_by_evaluate():
    assert evaluate.write_voc_results is write_voc_results
    assert evaluate.write_yolo_results is write_yolo_results


@pytest.mark.parametrize("name", ["../../x", "a/b", "a\\b", "..", ".", "", "x\0y", "%2F",
                                  "C:evil", "cat"])
def test_safe_filename_stays_in_its_folder_and_is_reversible(tmp_path, name):
    safe = safe_filename(name)
    assert "/" not in safe and "\\" not in safe and "\0" not in safe
    assert safe not in ("", ".", "..")
    assert (tmp_path / safe).parent == tmp_path
    assert unquote(safe) == name or (name == "" and safe == "%00")
    if name == "cat":
        assert safe == "cat"


def test_safe_filename_is_injective():
    names = ["a/b", "a%2Fb", "a_b", "a:b", "a%3Ab"]
    assert len({safe_filename(n) for n in names}) == len(names)


def test_voc_class_names_never_leave_the_output_folder(tmp_path):
    out = tmp_path / "out" / "voc"
    classes = ["../../escape", "a/b", "..", "dog"]
    dets = {"x.jpg": Detections(np.zeros((4, 4), np.float32) + [0, 0, 5, 5], [1, 2, 3, 4],
                                [0, 1, 2, 3])}
    paths = write_voc_results(out, dets, classes)
    assert len(set(paths)) == 4 and all(p.parent == out for p in paths)
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(tmp_path / "out")) == ["voc"]
    assert (out / "comp4_det_test_a%2Fb.txt").read_text().split()[:2] == ["x.jpg", "2.000000"]
    assert (out / "comp4_det_test_%2E%2E.txt").is_file()


def test_voc_image_ids_keep_folders_extensions_and_one_token(tmp_path):
    dets = {"a/img.jpg": _det(), "b/img.jpg": _det(), "a/img.png": _det(),
            "my dir/img 1.jpg": _det(), "100%.jpg": _det()}
    (p,) = write_voc_results(tmp_path, dets, ["cat"])
    lines = [ln.split() for ln in p.read_text().splitlines()]
    assert all(len(ln) == 6 for ln in lines)  # names with spaces do not break the format
    ids = [ln[0] for ln in lines]
    assert ids == ["a/img.jpg", "b/img.jpg", "a/img.png", "my%20dir/img%201.jpg", "100%25.jpg"]
    assert [unquote(i) for i in ids] == list(dets)
    assert voc_image_id("tab\there.jpg") == "tab%09here.jpg"


def test_yolo_label_files_never_shared(tmp_path, caplog):
    names = yolo_label_names(["a/img.jpg", "a/img.png", "b/img.jpg", "c.jpg",
                              "a/img.jpg.png"])
    # YOLO's <stem>.txt where unique; the extension is kept where stems clash, and again
    # for a name that the first round made clash ("a/img.jpg.png" -> "a/img.jpg.txt")
    assert names == {"a/img.jpg": "a/img.jpg.txt", "a/img.png": "a/img.png.txt",
                     "b/img.jpg": "b/img.txt", "c.jpg": "c.txt",
                     "a/img.jpg.png": "a/img.jpg.png.txt"}
    assert len(set(names.values())) == len(names)
    sizes = {"a/img.jpg": (10, 10), "a/img.png": (20, 20), "b/img.jpg": (10, 10)}
    with caplog.at_level(logging.WARNING):
        paths = write_yolo_results(tmp_path, {"a/img.png": _det(label=1)}, sizes)
    assert "share a name" in caplog.text
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "a/img.jpg.txt", "a/img.png.txt", "b/img.txt"]
    assert (tmp_path / "a" / "img.jpg.txt").read_text() == ""
    assert (tmp_path / "a" / "img.png.txt").read_text().split()[0] == "1"


def test_coco_file_names_are_identities(tmp_path):
    import json

    sizes = {"img.jpg": (10, 20), "img.png": (30, 40)}
    write_coco_results(tmp_path, {"img.png": _det()}, sizes, ["cat"])
    images = json.loads((tmp_path / "images.json").read_text())
    assert [(i["file_name"], i["height"]) for i in images] == [("img.jpg", 10), ("img.png", 30)]
    dets = json.loads((tmp_path / "detections.json").read_text())
    assert [d["image_id"] for d in dets] == [2]


# names that a hand-joined CSV line would split or mangle: the csv module quotes them
AWKWARD = [("a,b", 'dir,1/im "x".jpg'), ('say "hi"', "c'd, e.png"), ('",', 'q"q,.jpg')]


@pytest.mark.parametrize("cls,image", AWKWARD)
def test_detections_csv_round_trips_commas_and_quotes(tmp_path, cls, image):
    from rcnn_cli.formats import write_detections_csv

    classes = ["plain", cls]
    dets = {image: Detections(np.array([[1, 2, 30, 40.5], [3, 4, 5, 6]], np.float32),
                              [0.75, -1.25], [1, 0]),
            "other.jpg": _det(label=1)}
    path = write_detections_csv(tmp_path / "detections.csv", dets, classes)
    got, names = evaluate.read_detections_csv(path, classes)
    assert names == classes and sorted(got) == sorted(dets)
    for k, d in dets.items():
        np.testing.assert_array_equal(got[k].boxes, d.boxes)
        np.testing.assert_array_equal(got[k].scores, d.scores)
        np.testing.assert_array_equal(got[k].labels, d.labels)
    assert evaluate.read_detections_csv(path)[1] == [cls, "plain"]  # order of appearance


@pytest.mark.parametrize("cls,image", AWKWARD)
def test_dataset_csv_round_trips_commas_and_quotes(tmp_path, cls, image):
    from rcnn_cli.datasets import Dataset, ImageRecord, read_csv, write_csv

    records = [ImageRecord(image, 40, 60, np.array([[1, 2, 30, 35]], np.float32),
                           np.array([1], np.int64), np.zeros(1, bool)),
               ImageRecord("empty.png", 10, 20)]
    write_csv(tmp_path / "ann.csv", Dataset(records, ["plain", cls], tmp_path))
    ds = read_csv(tmp_path / "ann.csv", classes=["plain", cls])
    got = {r.file_name: r for r in ds.records}
    assert sorted(got) == sorted([image, "empty.png"])
    assert (got[image].height, got[image].width) == (40, 60)
    np.testing.assert_array_equal(got[image].boxes, records[0].boxes)
    assert ds.classes[got[image].labels[0]] == cls and len(got["empty.png"].boxes) == 0
