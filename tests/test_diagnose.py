"""Tests of rcnn_cli.diagnose on hand-made cases whose error types are known."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from rcnn_cli.diagnose import (
    classify_detections,
    diagnose,
    find_misses,
    fp_type_curve,
    fp_type_table,
    miss_analysis,
    parse_similar,
    recall_by_bins,
    sensitivity,
)
from rcnn_cli.evaluate import Detections

CLASSES = ["cat", "dog", "fox"]
CAT_A = [10, 10, 50, 50]        # 40 x 40 = 1600 px^2: COCO medium
CAT_TINY = [5, 180, 15, 190]    # 10 x 10 = 100 px^2: COCO small, never detected
DOG = [100, 100, 170, 140]
FOX = [120, 10, 190, 60]


def gts():
    return {"a.png": (np.array([CAT_A, CAT_TINY, DOG, FOX], np.float32), [0, 0, 1, 2],
                      [False] * 4)}


def dets():
    """Cat detections, best first, each with the type it must get."""
    rows = [
        (0.95, [10, 10, 50, 22], "Loc"),   # IoU 480 / 1600 = 0.3 with CAT_A
        (0.90, CAT_A, "TP"),
        (0.80, [12, 12, 50, 50], "Loc"),   # IoU 0.90 with CAT_A, already matched: duplicate
        (0.60, DOG, "Oth"),                # on the dog
        (0.50, FOX, "Sim"),                # on the fox, listed as similar to cat
        (0.40, [60, 150, 90, 175], "BG"),  # on nothing
    ]
    d = Detections(np.array([r[1] for r in rows], np.float32), [r[0] for r in rows], [0] * 6)
    return {"a.png": d}, [r[2] for r in rows]


def test_each_false_positive_gets_its_type():
    d, want = dets()
    ranked = classify_detections(d, gts(), 3, parse_similar("cat,fox", CLASSES))
    r = ranked[0]
    assert r.types.tolist() == want and r.npos == 2
    assert r.iou[0] == pytest.approx(0.3) and r.iou[2] == pytest.approx(38 * 38 / 1600)
    assert r.nearest.tolist() == [0, 0, 0, 2, 3, -1]  # the BG box overlaps nothing
    # without --similar the fox confusion is just another class
    plain = classify_detections(d, gts(), 3)[0]
    assert plain.types.tolist()[4] == "Oth"
    assert len(ranked[1].types) == 0 and ranked[1].npos == 1


def test_difficult_object_ignores_its_detection():
    g = {"a.png": (np.array([CAT_A], np.float32), [0], [True])}
    d = {"a.png": Detections(np.array([CAT_A, [100, 100, 120, 120]], np.float32), [0.9, 0.5],
                             [0, 0])}
    r = classify_detections(d, g, 1)[0]
    assert r.types.tolist() == ["ignored", "BG"] and r.npos == 0
    assert r.ranked_fp_types().tolist() == ["BG"]


def test_parse_similar_checks_names():
    assert parse_similar("cat, fox ; dog,fox", CLASSES) == [frozenset({0, 2}), frozenset({1, 2})]
    assert parse_similar(None, CLASSES) == [] and parse_similar(" ", CLASSES) == []
    with pytest.raises(ValueError, match="--similar: unknown class 'cow'"):
        parse_similar("cat,cow", CLASSES)
    with pytest.raises(ValueError, match="two or more"):
        parse_similar("cat", CLASSES)


def test_fp_type_table_counts_top_n_per_multiple_of_objects():
    d, _ = dets()
    table = fp_type_table(classify_detections(d, gts(), 3, parse_similar("cat,fox", CLASSES)),
                          CLASSES)
    cat = table["per_class"]["cat"]
    assert cat["1x"] == {"N": 2, "TP": 1, "Loc": 1, "Sim": 0, "Oth": 0, "BG": 0}
    assert cat["all"] == {"N": 6, "TP": 1, "Loc": 2, "Sim": 1, "Oth": 1, "BG": 1}
    assert cat["2x"]["N"] == 4 and cat["4x"]["N"] == 6  # capped at the detections there are
    assert table["overall"]["all"]["Loc"] == 2 and table["per_class"]["dog"]["all"]["N"] == 0


def test_fp_type_curve_fractions_sum_to_one():
    d, _ = dets()
    c = fp_type_curve(classify_detections(d, gts(), 3, parse_similar("cat,fox", CLASSES)))
    total = c["Loc"] + c["Sim"] + c["Oth"] + c["BG"]
    np.testing.assert_allclose(total[c["num_fp"] > 0], 1.0)
    assert c["num_detections"][-1] == 6 and c["num_fp"][-1] == 5
    assert c["BG"][-1] == pytest.approx(1 / 5) and c["Loc"][-1] == pytest.approx(2 / 5)


def test_tiny_missed_object_counts_as_small():
    d, _ = dets()
    misses = find_misses(d, gts())
    assert [m["found"] for m in misses] == [True, False, False, False]
    m = miss_analysis(misses, CLASSES, image_sizes={"a.png": (200, 200)})
    assert m["missed"] == 3 and m["objects"] == 4
    assert m["by_coco_size"]["small"] == {"objects": 1, "missed": 1, "recall": 0.0}
    assert m["by_coco_size"]["medium"]["objects"] == 3
    assert m["by_coco_size"]["medium"]["recall"] == pytest.approx(1 / 3)
    assert m["by_area_share"]["<1%"]["missed"] == 1  # 100 / 40000 = 0.25 %
    assert m["per_class"]["cat"] == {"objects": 2, "missed": 1}
    assert sum(b["objects"] for b in m["by_aspect"].values()) == 4


def test_proposal_coverage_of_misses():
    d, _ = dets()
    misses = find_misses(d, gts())
    props = {"a": np.array([CAT_TINY, [100, 100, 170, 160]], np.float32)}  # dog IoU 2800/4200
    m = miss_analysis(misses, CLASSES, proposals=props)
    assert m["proposals"] == {"covered@0.5": 2, "covered@0.7": 1, "missed_objects": 3,
                              "images_without_proposals": []}
    assert [round(x.get("proposal_iou", -1), 3) for x in misses] == [-1, 1.0, 0.667, 0.0]


def test_recall_by_bins_edges_are_left_closed():
    r = recall_by_bins([0.5, 1.0, 1.5, 3.0], [True, False, True, True], (0, 1, 2, np.inf),
                       ["a", "b", "c"])
    assert r["a"] == {"objects": 1, "missed": 0, "recall": 1.0}
    assert r["b"] == {"objects": 2, "missed": 1, "recall": 0.5}
    assert r["c"]["objects"] == 1


def test_sensitivity_without_loc_is_at_least_ap():
    d, _ = dets()
    g = gts()
    ranked = classify_detections(d, g, 3)
    s = sensitivity(d, g, 3, ranked)
    # cat: Loc (0.95) above the TP: precision 1/2 at recall 1/2 -> AP 0.25; dog and fox 0
    assert s["ap_at_iou"]["0.5"]["ap"] == pytest.approx(0.25 / 3)
    assert s["ap_without"]["Loc"]["ap"] == pytest.approx(0.5 / 3)
    for t in ("Loc", "Sim", "Oth", "BG"):
        assert s["ap_without"][t]["ap"] >= s["ap_at_iou"]["0.5"]["ap"] - 1e-12
    # at IoU 0.3 the 0.3 box matches CAT_A first, the real box becomes a duplicate
    assert s["ap_at_iou"]["0.3"]["ap"] == pytest.approx(0.5 / 3)
    assert s["ap_at_iou"]["0.7"]["ap"] <= s["ap_at_iou"]["0.3"]["ap"]


def _write_image(path):
    from rcnn_cli.visualize import save_image

    img = np.full((200, 200, 3), 90, np.uint8)
    img[10:50, 10:50] = (200, 120, 40)
    save_image(path, img)


def test_diagnose_writes_plot_and_sheets(tmp_path):
    _write_image(tmp_path / "images" / "a.png")
    d, _ = dets()
    res = diagnose(d, gts(), CLASSES, out_dir=tmp_path / "ev", similar="cat,fox",
                   image_sizes={"a.png": (200, 200)}, images_dir=tmp_path / "images")
    # top 1x #objects per class: cat's best two (Loc, TP), none of dog and fox
    assert res["summary"].startswith("FP@4: Loc 100% Sim 0% Oth 0% BG 0%")
    assert "missed 3 of 4 (1 small, 2 medium, 0 large)" in res["summary"]
    names = sorted(p.rsplit("/", 1)[-1] for p in res["files"])
    assert names == ["diagnosis_fp.png", "diagnosis_fp_types.png", "diagnosis_misses.png"]
    for p in res["files"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from rcnn_cli.images import read_image

    sheet = read_image(tmp_path / "ev" / "diagnosis_fp.png")
    assert sheet.shape[1] == 5 * 160 and sheet.shape[0] == 24 + 186  # 5 FPs: one row
    json.dumps(res)  # JSON-ready (no arrays)


def test_diagnose_without_images_skips_sheets(tmp_path, caplog):
    d, _ = dets()
    with caplog.at_level("INFO", logger="rcnn_cli"):
        res = diagnose(d, gts(), CLASSES, out_dir=tmp_path)
    assert [p.rsplit("/", 1)[-1] for p in res["files"]] == ["diagnosis_fp_types.png"]
    assert any("no --images" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- CLI
def _voc_and_detections(tmp_path):
    from rcnn_cli.datasets import ImageRecord, write_voc_xml
    from rcnn_cli.evaluate import write_coco_results

    voc = tmp_path / "voc"
    _write_image(voc / "images" / "a.png")
    b, lab, diff = gts()["a.png"]
    write_voc_xml(voc / "annotations" / "a.xml",
                  ImageRecord("a.png", 200, 200, b, np.asarray(lab), np.asarray(diff)), CLASSES)
    d, _ = dets()
    write_coco_results(tmp_path / "det", d, {"a.png": (200, 200)}, CLASSES)
    return voc


def test_cli_evaluate_diagnose(tmp_path):
    from rcnn_cli.cli import cli
    from rcnn_cli.store import StageStore

    voc = _voc_and_detections(tmp_path)
    store = StageStore.create(tmp_path / "props", "propose", {"method": "test"})
    store.save("a", {"boxes": np.array([CAT_TINY], np.float32), "scores": np.ones(1, np.float32)})
    r = CliRunner().invoke(cli, [
        "evaluate", "--annotations", str(voc), "--detections", str(tmp_path / "det"),
        "--diagnose", "--similar", "cat,fox", "--images", str(voc / "images"),
        "--proposals", str(tmp_path / "props"), "-o", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    assert "FP@4: Loc 100% Sim 0% Oth 0% BG 0%; missed 3 of 4" in r.stdout
    assert "a proposal covered 1 of the 3 misses at IoU 0.5" in r.stdout
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    diag = m["diagnosis"]
    assert diag["fp_types"]["per_class"]["cat"]["all"]["Sim"] == 1
    assert diag["similar"] == [["cat", "fox"]]
    assert diag["misses"]["missed_objects"][0] == {
        "image": "a.png", "class": "cat", "box": CAT_TINY, "best_iou": 0.0, "proposal_iou": 1.0}
    assert diag["sensitivity"]["ap_without"]["Loc"]["ap"] >= m["mAP_voc"]
    for name in ("diagnosis_fp_types.png", "diagnosis_fp.png", "diagnosis_misses.png"):
        assert (tmp_path / "ev" / name).stat().st_size > 1000


@pytest.mark.parametrize("args, msg", [
    (["--diagnose"], "--diagnose needs --detections"),
    (["--detections", "DET", "--similar", "cat,fox"], "go with --diagnose"),
    (["--detections", "DET", "--diagnose", "--similar", "cat,cow"], "unknown class 'cow'"),
])
def test_cli_diagnose_usage_errors(tmp_path, args, msg):
    from rcnn_cli.cli import cli

    voc = _voc_and_detections(tmp_path)
    args = [str(tmp_path / "det") if a == "DET" else a for a in args]
    r = CliRunner().invoke(cli, ["evaluate", "--annotations", str(voc), *args])
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output


def test_unreadable_images_are_one_warning_per_sheet(tmp_path, caplog):
    d, _ = dets()
    (tmp_path / "empty").mkdir()
    with caplog.at_level("WARNING", logger="rcnn_cli"):
        res = diagnose(d, gts(), CLASSES, out_dir=tmp_path, images_dir=tmp_path / "empty")
    warns = [r.getMessage() for r in caplog.records if "not readable" in r.getMessage()]
    assert len(warns) == 2 and "a.png" in warns[0]  # one per sheet, not one per tile
    assert len(res["files"]) == 3  # the sheets are still written (without tiles)


@pytest.mark.parametrize("seed", range(5))
def test_types_agree_with_voc_eval_on_random_cases(seed):
    # TP / FP / ignored of classify_detections are exactly voc_eval's tp / fp
    from rcnn_cli.evaluate import voc_eval

    rng = np.random.default_rng(seed)
    g, d = {}, {}
    for k in range(6):
        xy = rng.uniform(0, 80, (4, 2))
        gb = np.concatenate([xy, xy + rng.uniform(10, 40, (4, 2))], 1).astype(np.float32)
        g[f"{k}.png"] = (gb, rng.integers(0, 3, 4), rng.random(4) < 0.2)
        jitter = gb[rng.integers(0, 4, 7)] + rng.normal(0, 6, (7, 4)).astype(np.float32)
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
        d[f"{k}.png"] = Detections(jitter, rng.random(7), rng.integers(0, 3, 7))
    ref = voc_eval(d, g, 3)
    for c, r in classify_detections(d, g, 3).items():
        t = r.types
        np.testing.assert_array_equal(r.scores, ref[c]["scores"])
        np.testing.assert_array_equal(t == "TP", ref[c]["tp"] == 1)
        np.testing.assert_array_equal(np.isin(t, ["Loc", "Sim", "Oth", "BG"]), ref[c]["fp"] == 1)
