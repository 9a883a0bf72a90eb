"""Tests of rcnn_cli.evaluate against a plain re-implementation of the VOCdevkit rules."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from rcnn_cli.boxes import from_voc
from rcnn_cli.evaluate import (
    COCO_KEYS,
    Detections,
    coco_eval,
    evaluate_detections,
    evaluate_folder,
    evaluate_proposals,
    match_image_names,
    read_detections,
    voc_ap,
    voc_eval,
    write_coco_results,
    write_detections_csv,
    write_voc_results,
    write_yolo_results,
)


# ---------------------------------------------------------------- reference (VOCdevkit, loops)
def ref_voc_class(dets, gts, c, thresh=0.5):
    """VOCevaldet.m for class c, in VOC 1-based integer boxes with the devkit's +1 IoU.

    dets: {img: [(score, label, [xmin, ymin, xmax, ymax]), ...]};
    gts: {img: [(label, [xmin, ymin, xmax, ymax], difficult), ...]}.
    Returns (ap07, ap, npos, tp list, fp list).
    """
    npos = 0
    recs = {}
    for img, objs in gts.items():
        R = [(box, diff) for (lab, box, diff) in objs if lab == c]
        npos += sum(1 for _, d in R if not d)
        recs[img] = {"R": R, "det": [False] * len(R)}
    flat = [(s, img, box) for img in dets for (s, lab, box) in dets[img] if lab == c]
    flat = sorted(flat, key=lambda t: -t[0])  # Python's sort is stable, like MATLAB's
    tp, fp = [], []
    for _, img, bb in flat:
        ovmax, jmax = -math.inf, -1
        for j, (gt, _) in enumerate(recs[img]["R"]):
            iw = min(bb[2], gt[2]) - max(bb[0], gt[0]) + 1
            ih = min(bb[3], gt[3]) - max(bb[1], gt[1]) + 1
            if iw > 0 and ih > 0:
                ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                      + (gt[2] - gt[0] + 1) * (gt[3] - gt[1] + 1) - iw * ih)
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax >= thresh:
            if recs[img]["R"][jmax][1]:
                tp.append(0), fp.append(0)
            elif not recs[img]["det"][jmax]:
                tp.append(1), fp.append(0)
                recs[img]["det"][jmax] = True
            else:
                tp.append(0), fp.append(1)
        else:
            tp.append(0), fp.append(1)
    if npos == 0:
        return math.nan, math.nan, 0, tp, fp
    rec, prec, ctp, cfp = [], [], 0, 0
    for t, f in zip(tp, fp):
        ctp, cfp = ctp + t, cfp + f
        rec.append(ctp / npos)
        prec.append(ctp / (ctp + cfp) if ctp + cfp else 0.0)
    return ref_ap07(rec, prec), ref_ap(rec, prec), npos, tp, fp


def ref_ap07(rec, prec):
    ap = 0.0
    for k in range(11):
        ps = [p for r, p in zip(rec, prec) if r >= k / 10]
        ap += (max(ps) if ps else 0.0) / 11
    return ap


def ref_ap(rec, prec):
    mrec = [0.0] + list(rec) + [1.0]
    mpre = [0.0] + list(prec) + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    ap = 0.0
    for i in range(1, len(mrec)):
        if mrec[i] != mrec[i - 1]:
            ap += (mrec[i] - mrec[i - 1]) * mpre[i]
    return ap


def to_ours(dets, gts):
    """VOC-integer reference inputs -> (dets, gts) dicts of arrays in our continuous boxes."""
    d = {img: (from_voc(np.array([b for _, _, b in v], np.float32).reshape(-1, 4)),
               [s for s, _, _ in v], [lab for _, lab, _ in v]) for img, v in dets.items()}
    g = {img: (from_voc(np.array([b for _, b, _ in v], np.float32).reshape(-1, 4)),
               [lab for lab, _, _ in v], [diff for _, _, diff in v]) for img, v in gts.items()}
    return d, g


def check_against_ref(dets, gts, num_classes):
    ours = voc_eval(*to_ours(dets, gts), num_classes)
    for c in range(num_classes):
        ap07, ap, npos, tp, fp = ref_voc_class(dets, gts, c)
        r = ours[c]
        assert r["npos"] == npos
        assert r["tp"].tolist() == tp and r["fp"].tolist() == fp
        for got, want in ((r["ap07"], ap07), (r["ap"], ap)):
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12)
    return ours


# ---------------------------------------------------------------- VOC hand-made cases
GT = {"a.jpg": [(0, [1, 1, 10, 10], False), (1, [21, 21, 40, 40], False)],
      "b.jpg": [(0, [5, 5, 50, 50], False)]}


def test_perfect_detector_has_ap_one():
    dets = {"a.jpg": [(0.9, 0, [1, 1, 10, 10]), (0.8, 1, [21, 21, 40, 40])],
            "b.jpg": [(0.7, 0, [5, 5, 50, 50])]}
    r = check_against_ref(dets, GT, 2)
    for c in (0, 1):
        assert r[c]["ap07"] == pytest.approx(1.0) and r[c]["ap"] == pytest.approx(1.0)


def test_duplicates_are_false_positives():
    dets = {"a.jpg": [(0.9, 0, [1, 1, 10, 10]), (0.8, 0, [1, 1, 10, 10]), (0.85, 0, [2, 1, 10, 10])],
            "b.jpg": [(0.7, 0, [5, 5, 50, 50])]}
    r = check_against_ref(dets, GT, 2)[0]
    assert r["tp"].tolist() == [1, 0, 0, 1] and r["fp"].tolist() == [0, 1, 1, 0]
    assert r["npos"] == 2
    # rec .5 .5 .5 1, prec 1 .5 .333 .5 -> all-point AP = .5 * 1 + .5 * .5
    assert r["ap"] == pytest.approx(0.75)


def test_detection_on_difficult_object_is_ignored():
    gts = {"a.jpg": [(0, [1, 1, 10, 10], False), (0, [31, 31, 60, 60], True)]}
    dets = {"a.jpg": [(0.95, 0, [31, 31, 60, 60]), (0.9, 0, [31, 31, 60, 60]),
                      (0.5, 0, [1, 1, 10, 10])]}
    r = check_against_ref(dets, gts, 1)[0]
    assert r["npos"] == 1  # the difficult object is not counted
    assert r["tp"].tolist() == [0, 0, 1] and r["fp"].tolist() == [0, 0, 0]
    assert r["ap"] == pytest.approx(1.0) and r["ap07"] == pytest.approx(1.0)


@pytest.mark.parametrize("ymax, is_tp", [(20, True), (19, True), (21, False), (20.1, False)])
def test_iou_threshold_is_inclusive(ymax, is_tp):
    # GT ours [0, 0, 10, 10] (area 100); det ours [0, 0, 10, ymax]: IoU = 100 / (10 * ymax)
    gts = {"a.jpg": (np.array([[0, 0, 10, 10]]), [0], [False])}
    dets = {"a.jpg": (np.array([[0, 0, 10, ymax]]), [1.0], [0])}
    r = voc_eval(dets, gts, 1)[0]
    assert r["tp"].tolist() == [int(is_tp)] and r["fp"].tolist() == [int(not is_tp)]


def test_continuous_iou_equals_devkit_plus_one_iou_on_voc_boxes():
    # VOC det 1..10 x 1..20 vs GT 1..10 x 1..10: devkit IoU 100 / 200 = 0.5 exactly -> TP
    gts = {"a.jpg": [(0, [1, 1, 10, 10], False)]}
    dets = {"a.jpg": [(1.0, 0, [1, 1, 10, 20])]}
    r = check_against_ref(dets, gts, 1)[0]
    assert r["tp"].tolist() == [1]


def test_class_without_ground_truth_is_nan_and_left_out_of_map():
    # b.jpg was processed and has no detections: its object counts as a miss
    dets = {"a.jpg": [(0.9, 0, [1, 1, 10, 10]), (0.8, 2, [1, 1, 10, 10])], "b.jpg": []}
    r = check_against_ref(dets, GT, 3)
    assert r[2]["npos"] == 0 and math.isnan(r[2]["ap"]) and math.isnan(r[2]["ap07"])
    m, _ = evaluate_detections(to_ours(dets, GT)[1], to_ours(dets, GT)[0], ["x", "y", "z"])
    assert m["per_class"]["z"]["ap_voc"] is not None and math.isnan(m["per_class"]["z"]["ap_voc"])
    assert m["mAP_voc"] == pytest.approx((r[0]["ap"] + r[1]["ap"]) / 2)


def test_no_detections_at_all():
    r = voc_eval({}, to_ours({}, GT)[1], 2)
    assert r[0]["npos"] == 2 and r[0]["ap"] == 0.0 and r[0]["ap07"] == 0.0
    assert len(r[0]["recall"]) == 0


def test_voc_ap_hand_computed_11_point():
    # npos 10; ranked: TP TP FP TP -> rec .1 .2 .2 .3, prec 1 1 2/3 3/4.
    rec = np.array([1, 2, 2, 3]) / 10
    prec = np.array([1, 1, 2 / 3, 3 / 4])
    # 11-point: t = 0, .1, .2 -> 1; t = .3 -> .75 (recall exactly .3 counts); t >= .4 -> 0
    assert voc_ap(rec, prec, True) == pytest.approx(3.75 / 11, abs=1e-15)
    # all-point: .1 * 1 + .1 * 1 + .1 * .75
    assert voc_ap(rec, prec, False) == pytest.approx(0.275, abs=1e-15)
    # the same curve through voc_eval
    gts = {"a.jpg": [(0, [1 + 20 * i, 1, 10 + 20 * i, 10], False) for i in range(10)]}
    dets = {"a.jpg": [(0.9, 0, [1, 1, 10, 10]), (0.8, 0, [21, 1, 30, 10]),
                      (0.7, 0, [500, 500, 510, 510]), (0.6, 0, [41, 1, 50, 10])]}
    r = check_against_ref(dets, gts, 1)[0]
    assert r["ap07"] == pytest.approx(3.75 / 11) and r["ap"] == pytest.approx(0.275)


def test_voc_ap_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="recall and precision"):
        voc_ap(np.zeros(3), np.zeros(2), False)


def test_voc_eval_rejects_unknown_image():
    with pytest.raises(ValueError, match="without ground truth"):
        voc_eval({"zzz.jpg": (np.zeros((0, 4)), [], [])}, to_ours({}, GT)[1], 2)


def test_detections_validate_lengths():
    with pytest.raises(ValueError, match="same length"):
        Detections(np.zeros((2, 4)), [1.0], [0, 0])
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        Detections(np.zeros((2, 3)), [1.0, 2.0], [0, 0])


@pytest.mark.parametrize("seed", range(40))
def test_random_cases_match_reference(seed):
    rng = np.random.default_rng(seed)
    num_classes = 3
    gts, dets = {}, {}
    for i in range(rng.integers(1, 5)):
        img = f"img{i}.jpg"
        objs = []
        for _ in range(rng.integers(0, 5)):
            x, y = rng.integers(1, 80, size=2)
            w, h = rng.integers(5, 40, size=2)
            objs.append((int(rng.integers(num_classes)), [x, y, x + w, y + h], bool(rng.random() < 0.2)))
        gts[img] = objs
        ds = []
        for lab, box, _ in objs:  # jittered copies, some duplicates, some wrong class
            for _ in range(rng.integers(0, 3)):
                j = rng.integers(-6, 7, size=4)
                b = [box[0] + j[0], box[1] + j[1], max(box[2] + j[2], box[0] + j[0] + 1),
                     max(box[3] + j[3], box[1] + j[1] + 1)]
                lab2 = lab if rng.random() < 0.8 else int(rng.integers(num_classes))
                ds.append((round(float(rng.random()), 1), lab2, [int(v) for v in b]))  # ties
        for _ in range(rng.integers(0, 3)):  # background false positives
            x, y = rng.integers(1, 100, size=2)
            ds.append((float(rng.random()), int(rng.integers(num_classes)), [x, y, x + 10, y + 10]))
        if ds or rng.random() < 0.5:
            dets[img] = ds
    check_against_ref(dets, gts, num_classes)


# ---------------------------------------------------------------- COCO
def coco_case():
    gts = {"a.jpg": (np.array([[0, 0, 20, 20], [30, 30, 130, 150]], np.float32), [0, 1], [False, False]),
           "b.jpg": (np.array([[10, 10, 60, 70]], np.float32), [0], [False])}
    dets = {k: (b, np.linspace(0.9, 0.5, len(b)), lab) for k, (b, lab, _) in gts.items()}
    return dets, gts


def test_coco_perfect_detections_give_ap_one():
    dets, gts = coco_case()
    m = coco_eval(dets, gts, ["cat", "dog"], {"a.jpg": (200, 200), "b.jpg": (100, 100)})
    assert set(m) == set(COCO_KEYS)
    for k in ("AP", "AP50", "AP75", "AR100"):
        assert m[k] == pytest.approx(1.0)


def test_coco_empty_results_are_zero():
    _, gts = coco_case()
    m = coco_eval({}, gts, ["cat", "dog"])
    assert m == {k: 0.0 for k in COCO_KEYS}
    m = coco_eval({"a.jpg": Detections.empty()}, gts, ["cat", "dog"])
    assert m["AP"] == 0.0


def test_coco_false_positive_lowers_ap_and_difficult_is_ignored():
    dets, gts = coco_case()
    worse = dict(dets)
    worse["b.jpg"] = (np.array([[10, 10, 60, 70], [0, 0, 5, 5]]), [0.1, 0.95], [0, 0])
    assert coco_eval(worse, gts, ["cat", "dog"])["AP"] < 0.99
    # difficult (-> iscrowd) objects cost nothing: the extra detection lands on one, and
    # another one is never detected (with iscrowd 0 it would be a miss)
    gts_d = dict(gts)
    gts_d["b.jpg"] = (np.array([[10, 10, 60, 70], [0, 0, 5, 5], [80, 80, 95, 95]]), [0, 0, 0],
                      [False, True, True])
    assert coco_eval(worse, gts_d, ["cat", "dog"])["AP"] == pytest.approx(1.0)


# ---------------------------------------------------------------- evaluate_detections
@dataclass
class Rec:  # stand-in for datasets.ImageRecord
    file_name: str
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


@dataclass
class DS:  # stand-in for datasets.Dataset
    records: list
    classes: list
    image_root: Path = field(default_factory=lambda: Path("."))


def make_dataset():
    _, gts = coco_case()
    recs = [Rec(k, 200, 200, b, np.asarray(lab), np.asarray(d)) for k, (b, lab, d) in gts.items()]
    return DS(recs, ["cat", "dog"])


def test_evaluate_detections_writes_metrics_and_plots(tmp_path):
    dets, _ = coco_case()
    dets = {"JPEGImages/a.jpg": dets["a.jpg"], "b.jpg": dets["b.jpg"], "other.jpg": dets["b.jpg"]}
    m, files = evaluate_detections(make_dataset(), dets, out_dir=tmp_path / "ev")
    assert m["mAP_voc"] == pytest.approx(1.0) and m["mAP_voc07"] == pytest.approx(1.0)
    assert m["coco"]["AP"] == pytest.approx(1.0)
    assert m["unmatched_images"] == ["other.jpg"] and m["num_detections"] == 3
    names = sorted(p.name for p in files)
    assert names == ["metrics.json", "pr_00_cat.png", "pr_01_dog.png"]
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["per_class"]["dog"]["npos"] == 1 and saved["coco"]["APl"] == pytest.approx(1.0)
    for p in files[1:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == names  # no temp files left


def test_evaluate_detections_nan_becomes_null_and_no_plot(tmp_path):
    dets, _ = coco_case()
    ds = make_dataset()
    ds.classes = ["cat", "dog", "bird"]
    _, files = evaluate_detections(ds, dets, out_dir=tmp_path, plot=False)
    assert [p.name for p in files] == ["metrics.json"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["per_class"]["bird"]["ap_voc"] is None and saved["mAP_voc"] == pytest.approx(1.0)


def test_evaluate_detections_rejects_label_out_of_range():
    dets, _ = coco_case()
    dets["a.jpg"] = (dets["a.jpg"][0], dets["a.jpg"][1], [0, 5])
    with pytest.raises(ValueError, match="label 5"):
        evaluate_detections(make_dataset(), dets)


def test_match_image_names_path_then_unique_stem():
    gt = ["a.jpg", "sub/b.jpg", "x/c.jpg", "y/c.jpg"]
    got = match_image_names(["./a.jpg", "JPEGImages/b.png", "c.jpg", "sub\\b.jpg", "zz.jpg"], gt)
    assert got == {"./a.jpg": "a.jpg", "sub\\b.jpg": "sub/b.jpg"}  # b's stem already taken
    got = match_image_names(["JPEGImages/b.png", "c.jpg", "x/c"], gt)
    # 'c' alone is ambiguous; JPEGImages/b is not sub/b (another folder, another image)
    assert got == {"x/c": "x/c.jpg"}
    assert match_image_names(["JPEGImages/a.png"], gt) == {"JPEGImages/a.png": "a.jpg"}
    assert match_image_names(["./a.jpg", "a.jpg"], gt) == {"./a.jpg": "a.jpg"}


# ---------------------------------------------------------------- writers and readers
def sample_dets():
    return {"a.jpg": Detections(np.array([[0.5, 1.25, 10.1, 20.3], [3, 4, 30, 40]], np.float32),
                                np.array([0.93, -0.5], np.float32), [1, 0]),
            "sub/b.jpg": Detections(np.array([[2, 3, 7, 9]], np.float32), [0.7], [1])}


def test_csv_round_trip(tmp_path):
    dets = sample_dets()
    write_detections_csv(tmp_path / "detections.csv", dets, ["cat", "dog"])
    with open(tmp_path / "detections.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "class", "score", "x1", "y1", "x2", "y2"]
    assert rows[1][:3] == ["a.jpg", "dog", "0.93"] and rows[3][:2] == ["sub/b.jpg", "dog"]
    back, classes = read_detections(tmp_path, ["cat", "dog"])
    assert classes == ["cat", "dog"] and list(back) == list(dets)
    for k in dets:  # exact float32 round trip
        np.testing.assert_array_equal(back[k].boxes, dets[k].boxes)
        np.testing.assert_array_equal(back[k].scores, dets[k].scores)
        np.testing.assert_array_equal(back[k].labels, dets[k].labels)
    back, classes = read_detections(tmp_path / "detections.csv")  # names in order of appearance
    assert classes == ["dog", "cat"] and back["a.jpg"].labels.tolist() == [0, 1]


def test_csv_unknown_class_and_missing_files(tmp_path):
    write_detections_csv(tmp_path / "detections.csv", sample_dets(), ["cat", "dog"])
    with pytest.raises(ValueError, match="unknown class 'dog'"):
        read_detections(tmp_path, ["cat"])
    with pytest.raises(FileNotFoundError):
        read_detections(tmp_path / "empty")


def test_coco_results_round_trip(tmp_path):
    dets = sample_dets()
    sizes = {"a.jpg": (50, 60), "sub/b.jpg": (20, 30), "c.jpg": (10, 10)}
    paths = write_coco_results(tmp_path, dets, sizes, ["cat", "dog"])
    assert [p.name for p in paths] == ["detections.json", "images.json", "categories.json"]
    images = json.loads((tmp_path / "images.json").read_text())
    assert images == [{"id": 1, "file_name": "a.jpg", "height": 50, "width": 60},
                      {"id": 2, "file_name": "sub/b.jpg", "height": 20, "width": 30},
                      {"id": 3, "file_name": "c.jpg", "height": 10, "width": 10}]
    cats = json.loads((tmp_path / "categories.json").read_text())
    assert [(c["id"], c["name"]) for c in cats] == [(1, "cat"), (2, "dog")]
    res = json.loads((tmp_path / "detections.json").read_text())
    assert len(res) == 3 and set(res[0]) == {"image_id", "category_id", "bbox", "score"}
    assert res[0]["image_id"] == 1 and res[0]["category_id"] == 2
    assert res[0]["bbox"] == pytest.approx([0.5, 1.25, 9.6, 19.05], abs=1e-5)  # xywh
    assert res[2]["image_id"] == 2 and res[2]["score"] == pytest.approx(0.7)
    back, classes = read_detections(tmp_path)
    assert classes == ["cat", "dog"] and list(back) == ["a.jpg", "sub/b.jpg", "c.jpg"]
    assert len(back["c.jpg"]) == 0  # images without detections survive
    for k in dets:
        np.testing.assert_allclose(back[k].boxes, dets[k].boxes, atol=1e-4)
        np.testing.assert_allclose(back[k].scores, dets[k].scores, atol=1e-6)
        np.testing.assert_array_equal(back[k].labels, dets[k].labels)
    # categories inside images.json, classes given in another order
    (tmp_path / "images.json").write_text(json.dumps({"images": images, "categories": cats}))
    (tmp_path / "categories.json").unlink()
    back, classes = read_detections(tmp_path / "detections.json", ["dog", "cat"])
    assert back["a.jpg"].labels.tolist() == [0, 1]


def test_coco_results_reject_unknown_image(tmp_path):
    with pytest.raises(ValueError, match="not in image_sizes"):
        write_coco_results(tmp_path, sample_dets(), {"a.jpg": (5, 5)}, ["cat", "dog"])


def test_voc_devkit_writer(tmp_path):
    paths = write_voc_results(tmp_path, sample_dets(), ["cat", "dog"])
    assert [p.name for p in paths] == ["comp4_det_test_cat.txt", "comp4_det_test_dog.txt"]
    dog = (tmp_path / "comp4_det_test_dog.txt").read_text().splitlines()
    # ours [0.5, 1.25, 10.1, 20.3] -> VOC 1-based inclusive, rounded: 1 2 10 20
    assert dog[0].split() == ["a.jpg", "0.930000", "1", "2", "10", "20"]
    assert dog[1].split()[0] == "sub/b.jpg" and len(dog) == 2  # ids: paths with extension
    cat = (tmp_path / "comp4_det_test_cat.txt").read_text().split()
    assert cat == ["a.jpg", "-0.500000", "4", "5", "30", "40"]


def test_yolo_writer(tmp_path):
    sizes = {"a.jpg": (50, 60), "sub/b.jpg": (20, 30), "c.jpg": (10, 10)}
    paths = write_yolo_results(tmp_path, sample_dets(), sizes)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["a.txt", "sub/b.txt", "c.txt"]
    b = [float(v) for v in (tmp_path / "sub" / "b.txt").read_text().split()]
    # box [2, 3, 7, 9] in a 30 x 20 image: cx 4.5 / 30, cy 6 / 20, w 5 / 30, h 6 / 20
    assert b == pytest.approx([1, 0.15, 0.3, 5 / 30, 0.3, 0.7], abs=1e-6)
    assert (tmp_path / "c.txt").read_text() == ""


# ---------------------------------------------------------------- proposals and folders
def test_evaluate_proposals_hand_computed():
    gts = {"a.jpg": (np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]]), [0, 1, 1],
                     [False, False, True]),
           "b.jpg": (np.array([[0, 0, 10, 10]]), [0], [False])}
    # best IoUs: 100 / 200 = 0.5 and 400 / 520 = 0.769; b.jpg was proposed, nothing found -> 0
    props = {"a": np.array([[0, 0, 10, 20], [20, 20, 40, 46], [100, 100, 110, 110]]),
             "b": np.zeros((0, 4))}
    m = evaluate_proposals(gts, props, ["cat", "dog"])
    assert m["num_objects"] == 3 and m["missing_images"] == []
    assert m["recall@0.5"] == pytest.approx(2 / 3) and m["recall@0.7"] == pytest.approx(1 / 3)
    # IoU thresholds .5 .55 ... .95: 2 objects at .5, 1 at .55 - .75, none above
    assert m["average_recall"] == pytest.approx((2 + 5 * 1) / 3 / 10)
    assert m["ABO"] == pytest.approx({"cat": 0.25, "dog": 400 / 520})
    assert m["MABO"] == pytest.approx((0.25 + 400 / 520) / 2)
    assert m["mean_proposals"] == 1.5
    # b.jpg never proposed: not scored (listed), instead of a miss
    del props["b"]
    m = evaluate_proposals(gts, props, ["cat", "dog"])
    assert m["num_objects"] == 2 and m["missing_images"] == ["b.jpg"]
    assert m["recall@0.5"] == pytest.approx(1.0) and m["ABO"]["cat"] == pytest.approx(0.5)


def test_evaluate_proposals_recall_by_size():
    """Proposal recall per COCO size (small < 32^2 <= medium < 96^2 <= large), so a user can
    see whether propose's max_side / min_size lose the small objects; in the summary too."""
    gts = {"a.jpg": (np.array([[0, 0, 20, 20], [30, 30, 50, 50], [0, 100, 50, 150],
                               [100, 0, 300, 200]]), [0, 0, 0, 0], [False] * 4)}
    # the two small ones: one found at IoU 1, one at 200 / 400 = 0.5; medium: none; large: 1.0
    props = {"a": np.array([[0, 0, 20, 20], [30, 30, 50, 40], [100, 0, 300, 200]])}
    m = evaluate_proposals(gts, props, ["cat"])
    s = m["by_size"]
    assert [s[k]["objects"] for k in ("small", "medium", "large")] == [2, 1, 1]
    assert s["small"]["recall@0.5"] == 1.0 and s["small"]["recall@0.7"] == 0.5
    assert s["small"]["ABO"] == pytest.approx(0.75)
    assert s["medium"]["recall@0.5"] == 0.0 and s["large"]["recall@0.7"] == 1.0
    assert "recall@0.7 by size (small/medium/large) 0.50/0.00/1.00" in m["summary"]


def make_voc_folder(root):
    from rcnn_cli.datasets import ImageRecord, write_voc_xml
    from rcnn_cli.visualize import save_image

    _, gts = coco_case()
    for k, (b, lab, d) in gts.items():
        save_image(root / "images" / k.replace(".jpg", ".png"), np.zeros((200, 200, 3), np.uint8))
        rec = ImageRecord(k.replace(".jpg", ".png"), 200, 200, b, np.asarray(lab), np.asarray(d))
        write_voc_xml(root / "annotations" / f"{k[0]}.xml", rec, ["cat", "dog"])
    return gts


@pytest.mark.parametrize("fmt", ["csv", "coco"])
def test_evaluate_folder_on_detections(tmp_path, fmt):
    gts = make_voc_folder(tmp_path / "voc")
    dets = {k.replace(".jpg", ".png"): v for k, v in coco_case()[0].items()}
    det_dir = tmp_path / "det"
    if fmt == "csv":
        write_detections_csv(det_dir / "detections.csv", dets, ["cat", "dog"])
    else:
        write_coco_results(det_dir, dets, {k: (200, 200) for k in dets}, ["cat", "dog"])
    m, path = evaluate_folder(tmp_path / "voc", det_dir, None, None, None, {"evaluate": {"iou": 0.5}})
    assert path == det_dir / "metrics.json" and path.is_file()
    assert m["mAP_voc07"] == pytest.approx(1.0) and m["coco"]["AP"] == pytest.approx(1.0)
    assert m["num_images"] == len(gts) and "mAP VOC07 1.0000" in m["summary"]
    assert (det_dir / "pr_00_cat.png").is_file()


def test_evaluate_folder_on_proposals(tmp_path):
    from rcnn_cli.store import StageStore

    make_voc_folder(tmp_path / "voc")
    store = StageStore.create(tmp_path / "props", "propose", {"method": "test"})
    store.save("a", {"boxes": np.array([[0, 0, 20, 20], [30, 30, 130, 150]], np.float32),
                     "scores": np.ones(2, np.float32)})
    _, path = evaluate_folder(tmp_path / "voc", None, tmp_path / "props", None, tmp_path / "o", {})
    assert path == tmp_path / "o" / "metrics.json"
    saved = json.loads(path.read_text())
    # b.png was never proposed: left out (listed), a's two objects are both covered
    assert saved["recall@0.5"] == pytest.approx(1.0) and saved["missing_images"] == ["b.png"]
    with pytest.raises(ValueError, match="exactly one"):
        evaluate_folder(tmp_path / "voc", None, None, None, None, {})


# ---------------------------------------------------------------- evaluate tells the truth
def _voc_with_extra_image(root):
    """make_voc_folder plus an annotated image c.png that detect never saw."""
    from rcnn_cli.datasets import ImageRecord, write_voc_xml
    from rcnn_cli.visualize import save_image

    gts = make_voc_folder(root)
    save_image(root / "images" / "c.png", np.zeros((200, 200, 3), np.uint8))
    write_voc_xml(root / "annotations" / "c.xml",
                  ImageRecord("c.png", 200, 200, np.array([[5, 5, 50, 50]], np.float32),
                              np.array([0]), np.array([False])), ["cat", "dog"])
    return gts


def _png_dets():
    return {k.replace(".jpg", ".png"): v for k, v in coco_case()[0].items()}


@pytest.mark.parametrize("fmt", ["csv", "coco"])
def test_evaluate_folder_scores_only_processed_images(tmp_path, fmt, caplog):
    # issue 12: without --split, annotated images never detected counted as misses (mAP 0.36)
    _voc_with_extra_image(tmp_path / "voc")
    dets, det_dir = _png_dets(), tmp_path / "det"
    if fmt == "csv":
        write_detections_csv(det_dir / "detections.csv", dets, ["cat", "dog"])
    else:  # images.json lists every processed image, also z.png (no detections, no annotation)
        write_coco_results(det_dir, dets, {**{k: (200, 200) for k in dets}, "z.png": (9, 9)},
                           ["cat", "dog"])
    with caplog.at_level("WARNING", logger="rcnn_cli"):
        m, _ = evaluate_folder(tmp_path / "voc", det_dir, None, None, None, {})
    assert m["mAP_voc07"] == pytest.approx(1.0) and m["coco"]["AP"] == pytest.approx(1.0)
    assert m["num_images"] == 2
    assert m["annotated_without_detection_record"] == ["c.png"]
    warns = [r.getMessage() for r in caplog.records if "no detection record" in r.getMessage()]
    assert len(warns) == 1 and "1 annotated image(s)" in warns[0] and "c.png" in warns[0]
    if fmt == "coco":
        assert m["unmatched_images"] == ["z.png"]
        assert "1 detected image(s) have no annotation" in warns[0] and "z.png" in warns[0]


def test_evaluate_folder_split_still_restricts(tmp_path, caplog):
    _voc_with_extra_image(tmp_path / "voc")
    (tmp_path / "split.txt").write_text("a\n")
    write_detections_csv(tmp_path / "det" / "detections.csv", _png_dets(), ["cat", "dog"])
    with caplog.at_level("WARNING", logger="rcnn_cli"):
        m, _ = evaluate_folder(tmp_path / "voc", tmp_path / "det", None, tmp_path / "split.txt",
                               None, {})
    assert m["num_images"] == 1 and m["per_class"]["dog"]["npos"] == 1
    # b.png (detected) and c.png (annotated) are outside the split: left out without a word
    assert m["unmatched_images"] == [] and m["annotated_without_detection_record"] == []
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_evaluate_folder_zero_overlap_is_an_error(tmp_path):
    make_voc_folder(tmp_path / "voc")
    write_detections_csv(tmp_path / "det" / "detections.csv",
                         {"other/x.png": coco_case()[0]["a.jpg"]}, ["cat", "dog"])
    with pytest.raises(ValueError, match=r"no detected image.*'other/x.png'.*'a.png'"):
        evaluate_folder(tmp_path / "voc", tmp_path / "det", None, None, None, {})


def test_class_on_one_side_only_is_one_warning(tmp_path, caplog):
    make_voc_folder(tmp_path / "voc")
    dets = _png_dets()
    # the detector knows cat and bird, not dog: dog scores 0, bird has no ground truth
    dets = {"a.png": (dets["a.png"][0], dets["a.png"][1], [0, 1]), "b.png": dets["b.png"]}
    write_detections_csv(tmp_path / "det" / "detections.csv", dets, ["cat", "bird"])
    with caplog.at_level("WARNING", logger="rcnn_cli"):
        m, _ = evaluate_folder(tmp_path / "voc", tmp_path / "det", None, None, None, {})
    warns = [r.getMessage() for r in caplog.records if "class" in r.getMessage()]
    assert len(warns) == 1 and "'dog'" in warns[0] and "'bird'" in warns[0]
    assert m["per_class"]["dog"]["ap_voc"] == 0.0 and math.isnan(m["per_class"]["bird"]["ap_voc"])
    assert m["mAP_voc"] == pytest.approx(0.5)  # cat 1.0, dog 0.0, bird left out
    assert m["classes_only_in_ground_truth"] == ["dog"]
    assert m["classes_only_in_detections"] == ["bird"]
    assert "AP 0" in m["class_note"] and "left out" in m["class_note"]


def test_coco_ground_truth_without_categories_is_an_error(tmp_path):
    gt = {"images": [{"id": 1, "file_name": "a.png", "height": 200, "width": 200}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20],
                           "area": 400, "iscrowd": 0}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    write_detections_csv(tmp_path / "det" / "detections.csv", _png_dets(), ["cat", "dog"])
    with pytest.raises(ValueError, match=r"gt.json.*categories"):
        evaluate_folder(tmp_path / "gt.json", tmp_path / "det", None, None, None, {})


@pytest.mark.parametrize("text, match", [
    ("image,class,score,x1,y1\na.png,cat,0.5,1,2\n", r"detections.csv: missing column\(s\) x2, y2"),
    ("image,class,score,x1,y1,x2,y2\na.png,cat,0.5,1,2,3,4\na.png,cat,high,1,2,3,4\n",
     r"detections.csv:3: score 'high' is not a number"),
    ("image,class,score,x1,y1,x2,y2\na.png,cat,0.5,1,2\n", r"detections.csv:2: missing value"),
])
def test_bad_detections_csv_is_one_line(tmp_path, text, match):
    (tmp_path / "detections.csv").write_text(text)
    with pytest.raises(ValueError, match=match):
        read_detections(tmp_path)


def test_cli_bad_detections_csv_exits_2_without_traceback(tmp_path):
    from click.testing import CliRunner

    from rcnn_cli.cli import cli

    make_voc_folder(tmp_path / "voc")
    (tmp_path / "det").mkdir()
    (tmp_path / "det" / "detections.csv").write_text(
        "image,class,score,x1,y1,x2,y2\na.png,cat,x,1,2,3,4\n")
    r = CliRunner().invoke(cli, ["evaluate", "--annotations", str(tmp_path / "voc"),
                                 "--detections", str(tmp_path / "det")])
    assert r.exit_code == 2 and "detections.csv:2" in r.output and "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_match_image_names_does_not_merge_folders():
    # same file name in two folders: two images, never one
    assert match_image_names(["a/img.jpg", "b/img.jpg"], ["a/img.jpg", "b/img.jpg"]) == {
        "a/img.jpg": "a/img.jpg", "b/img.jpg": "b/img.jpg"}
    assert match_image_names(["a/img.jpg", "b/img.jpg"], ["img.jpg"]) == {}  # ambiguous
    assert match_image_names(["a/img.jpg"], ["b/img.jpg"]) == {}  # other folder
    # stem-only and extra leading folders stay tolerated
    assert match_image_names(["img", "JPEGImages/x.jpg", "data/sub/y.png"],
                             ["img.jpg", "x.jpg", "sub/y.jpg"]) == {
        "img": "img.jpg", "JPEGImages/x.jpg": "x.jpg", "data/sub/y.png": "sub/y.jpg"}


def test_evaluate_folder_proposals_scores_only_proposed_images(tmp_path, caplog):
    # the same truth for proposals: an annotated image never proposed is not a miss
    from rcnn_cli.store import StageStore

    _voc_with_extra_image(tmp_path / "voc")
    store = StageStore.create(tmp_path / "props", "propose", {"method": "test"})
    for stem, boxes in (("a", [[0, 0, 20, 20], [30, 30, 130, 150]]), ("b", [[10, 10, 60, 70]])):
        store.save(stem, {"boxes": np.array(boxes, np.float32), "scores": np.ones(len(boxes),
                                                                                   np.float32)})
    with caplog.at_level("WARNING", logger="rcnn_cli"):
        m, _ = evaluate_folder(tmp_path / "voc", None, tmp_path / "props", None, None, {})
    assert m["recall@0.5"] == pytest.approx(1.0) and m["num_images"] == 2
    assert m["missing_images"] == ["c.png"]
    warns = [r.getMessage() for r in caplog.records if "no proposals" in r.getMessage()]
    assert len(warns) == 1 and "1 annotated image(s)" in warns[0] and "'c.png'" in warns[0]


def test_match_image_names_is_linear_on_large_folders():
    # regression: a scan of the matched values per name made 20k images take ~6 s
    import time

    from rcnn_cli.evaluate import match_image_names

    names = [f"d{i % 50}/img{i}.jpg" for i in range(20000)]
    t0 = time.process_time()  # CPU time: other processes on the machine do not count
    m = match_image_names(names, names)
    assert len(m) == 20000 and time.process_time() - t0 < 2.0
