"""`rcnn localize`: classification + localisation by regression (issue 14, part 1).

Random-init backbones on tiny synthetic images: one flat coloured rectangle per image (class
= colour), or one bright rectangle split into four quadrant parts q0..q3.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rcnn_cli import boxes as bx
from rcnn_cli import localize as L
from rcnn_cli.cli import cli
from rcnn_cli.datasets import Dataset, ImageRecord, load_dataset
from rcnn_cli.images import read_image

COLORS = {"blue": (40, 60, 240), "red": (240, 50, 40)}
TINY = ["--weights", "random", "--input-size", "32", "--iterations", "2"]


def make_data(root: Path, n: int, seed: int, parts: bool = False, h: int = 64, w: int = 80):
    """Write n images + ann.csv; return (csv path, image folder)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = ["filename,width,height,class,xmin,ymin,xmax,ymax"]
    for i in range(n):
        img = rng.integers(0, 40, (h, w, 3)).astype(np.uint8)
        bw, bh = rng.integers(w // 4, w * 3 // 4), rng.integers(h // 4, h * 3 // 4)
        x1, y1 = rng.integers(0, w - bw), rng.integers(0, h - bh)
        x2, y2 = x1 + bw, y1 + bh
        name = f"im{i:03d}.png"
        if parts:
            img[y1:y2, x1:x2] = 230
            xm, ym = (x1 + x2) // 2, (y1 + y2) // 2
            quads = [(x1, y1, xm, ym), (xm, y1, x2, ym), (x1, ym, xm, y2), (xm, ym, x2, y2)]
            lines += [f"{name},{w},{h},q{q},{a},{b},{c},{d}" for q, (a, b, c, d) in
                      enumerate(quads)]
        else:
            cls = ["blue", "red"][i % 2]
            img[y1:y2, x1:x2] = COLORS[cls]
            lines.append(f"{name},{w},{h},{cls},{x1},{y1},{x2},{y2}")
        Image.fromarray(img).save(root / "images" / name)
    (root / "ann.csv").write_text("\n".join(lines) + "\n")
    return root / "ann.csv", root / "images"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loc")
    return make_data(root, 6, 0)


@pytest.fixture(scope="module")
def parts_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    return make_data(root, 6, 1, parts=True)


def _invoke(args):
    res = CliRunner().invoke(cli, args)
    return res


def _train(data, out, *extra):
    ann, images = data
    return _invoke(["localize", "train", "--annotations", str(ann), "--images", str(images),
                    "-o", str(out), *TINY, *extra])


def _predict(data, model, out, *extra):
    images = data[1]
    return _invoke(["localize", "predict", str(images), "--model", str(model), "-o", str(out),
                    *extra])


@pytest.fixture(scope="module")
def tiny_model(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "model"
    res = _train(data, out)
    assert res.exit_code == 0, res.output
    return out


# ------------------------------------------------------------------ learning
def _mean_box_baseline(train_ds, test_ds):
    mb = L.training_targets(train_ds).boxes.mean(0)
    return float(np.mean([bx.box_iou(bx.scale(mb, r.height, r.width), r.boxes).max()
                          for r in test_ds.records]))


def test_learns_box_and_class(tmp_path):
    """One coloured rectangle per image: the box beats the mean box, the class is learnt."""
    tr = load_dataset(make_data(tmp_path / "tr", 40, 0)[0], image_root=tmp_path / "tr" / "images")
    te = load_dataset(make_data(tmp_path / "te", 20, 1)[0], image_root=tmp_path / "te" / "images")
    loc = L.train_localizer(tr, weights="random", input_size=96, iterations=150, hidden=64)
    assert loc.training_stats["final_loss"] < loc.training_stats["first_loss"]
    preds = {r.file_name: loc.predict([read_image(te.image_root / r.file_name)])[0]
             for r in te.records}
    m = L.localization_metrics(te, preds)
    base = _mean_box_baseline(tr, te)
    assert m["mean_iou"] > base + 0.05, (m, base)
    assert m["classification_accuracy"] >= 0.8, m
    assert m["localization_accuracy"] > 0.3, m


def test_learns_parts_in_order(tmp_path):
    """Quadrant parts q0..q3: four boxes in class-name order, better than the mean boxes."""
    tr = load_dataset(make_data(tmp_path / "tr", 40, 2, parts=True)[0],
                      image_root=tmp_path / "tr" / "images")
    te = load_dataset(make_data(tmp_path / "te", 20, 3, parts=True)[0],
                      image_root=tmp_path / "te" / "images")
    loc = L.train_localizer(tr, parts=4, weights="random", input_size=96, iterations=150,
                            hidden=64)
    preds = {r.file_name: loc.predict([read_image(te.image_root / r.file_name)])[0]
             for r in te.records}
    b, _, lab = next(iter(preds.values()))
    assert b.shape == (4, 4) and lab.tolist() == [0, 1, 2, 3]
    centres = np.stack([(p[0][:, :2] + p[0][:, 2:]) / 2 for p in preds.values()])  # (N, 4, 2)
    assert (centres[:, 0, 0] <= centres[:, 1, 0]).mean() >= 0.9  # q0 left of q1
    assert (centres[:, 0, 1] <= centres[:, 2, 1]).mean() >= 0.9  # q0 above q2
    m = L.parts_metrics(te, preds)
    mb = L.training_targets(tr, 4).boxes.mean(0)
    base = np.mean([bx.box_iou(bx.scale(mb[c:c + 1], r.height, r.width),
                               r.boxes[r.labels == c]).max()
                    for r in te.records for c in range(4)])
    assert m["mean_iou"] > base + 0.02, (m, base)


# ------------------------------------------------------------------ bundle
def test_bundle_round_trip(tiny_model, data):
    loc = L.load_localizer(tiny_model)
    meta = json.loads((tiny_model / L.JSON_NAME).read_text())
    assert meta["kind"] == "localize" and meta["classes"] == ["blue", "red"]
    assert meta["extractor"]["weights"] == "random" and meta["extractor"]["input_size"] == 32
    again = tiny_model.parent / "again"
    L.save_localizer(again, loc)
    loc2 = L.load_localizer(again)
    assert loc2.arrays.keys() == loc.arrays.keys()
    for k in loc.arrays:
        np.testing.assert_array_equal(loc.arrays[k], loc2.arrays[k])
    img = read_image(next(Path(data[1]).glob("*.png")))
    (b1, s1, l1), = loc.predict([img])
    (b2, _, l2), = loc2.predict([img])
    np.testing.assert_array_equal(b1, b2)
    assert b1.shape == (1, 4) and l1 == l2 and 0 < s1[0] <= 1
    with pytest.raises(FileExistsError):
        L.save_localizer(again, loc)


def _rewrite_npz(d: Path, arrays, fix_sha=True):
    import hashlib

    from rcnn_cli.store import npz_bytes

    data = npz_bytes(arrays)
    (d / L.ARRAYS_NAME).write_bytes(data)
    if fix_sha:
        meta = json.loads((d / L.JSON_NAME).read_text())
        meta["arrays"]["sha256"] = hashlib.sha256(data).hexdigest()
        meta["arrays"]["shapes"] = {k: list(np.shape(v)) for k, v in arrays.items()}
        (d / L.JSON_NAME).write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", ["truncated", "missing_npz", "version", "shape", "nan",
                                    "missing_array", "object_array", "attach", "dim"])
def test_broken_bundle_refused(tiny_model, tmp_path, damage):
    import shutil

    d = tmp_path / "b"
    shutil.copytree(tiny_model, d)
    arrays = dict(np.load(d / L.ARRAYS_NAME))
    meta = json.loads((d / L.JSON_NAME).read_text())
    if damage == "truncated":
        raw = (d / L.ARRAYS_NAME).read_bytes()
        (d / L.ARRAYS_NAME).write_bytes(raw[:len(raw) // 2])
    elif damage == "missing_npz":
        (d / L.ARRAYS_NAME).unlink()
    elif damage == "version":
        meta["format_version"] = 99
        (d / L.JSON_NAME).write_text(json.dumps(meta))
    elif damage == "shape":
        arrays["fc7_w"] = arrays["fc7_w"][:-1]
        _rewrite_npz(d, arrays)
    elif damage == "nan":
        arrays["reg_b"] = arrays["reg_b"].copy()
        arrays["reg_b"][0] = np.nan
        _rewrite_npz(d, arrays)
    elif damage == "missing_array":
        del arrays["cls_w"]
        _rewrite_npz(d, arrays)
    elif damage == "object_array":
        arrays["reg_b"] = np.array([{"a": 1}], dtype=object)
        import hashlib
        import io
        import zipfile

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for k, v in arrays.items():
                with zf.open(f"{k}.npy", "w") as f:
                    np.lib.format.write_array(f, v, allow_pickle=True)
        (d / L.ARRAYS_NAME).write_bytes(buf.getvalue())
        meta["arrays"]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
        (d / L.JSON_NAME).write_text(json.dumps(meta))
    elif damage == "attach":
        meta["attach"] = "conv"  # conv needs reg6_* arrays
        (d / L.JSON_NAME).write_text(json.dumps(meta))
    elif damage == "dim":
        meta["extractor"]["dim"] = 7
        (d / L.JSON_NAME).write_text(json.dumps(meta))
    with pytest.raises(L.LocalizeError) as e:
        L.load_localizer(d)
    assert str(d) in str(e.value)
    # the CLI: one line, exit 1, no traceback
    res = _predict(("x", d.parent), d, tmp_path / "out")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert str(d) in res.output


# ------------------------------------------------------------------ CLI matrix
@pytest.mark.parametrize("attach", ["conv", "fc"])
@pytest.mark.parametrize("loss", ["l2", "smooth_l1"])
def test_cli_train_predict(data, tmp_path, attach, loss):
    res = _train(data, tmp_path / "m", "--attach", attach, "--loss", loss)
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "m" / L.JSON_NAME).read_text())
    assert meta["attach"] == attach and meta["loss"] == loss
    assert ("reg6_w" in meta["arrays"]["shapes"]) == (attach == "conv")
    out = tmp_path / "out"
    res = _predict(data, tmp_path / "m", out, "--annotations", str(data[0]))
    assert res.exit_code == 0, res.output
    rows = (out / "detections.csv").read_text().splitlines()
    assert rows[0] == "image,class,score,x1,y1,x2,y2" and len(rows) == 1 + 6
    assert {r.split(",")[0] for r in rows[1:]} == {f"im{i:03d}.png" for i in range(6)}
    coco = json.loads((out / "detections.json").read_text())
    assert len(coco) == 6 and len(json.loads((out / "images.json").read_text())) == 6
    assert [c["name"] for c in json.loads((out / "categories.json").read_text())] == \
        ["blue", "red"]
    marker = json.loads((out / "localize.json").read_text())
    assert marker["kind"] == "localize" and marker["images"] == 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 6 and 0 <= metrics["mean_iou"] <= 1
    # `rcnn evaluate` recognises a localize output and reports the same CLS-LOC scores
    ev = CliRunner().invoke(cli, ["evaluate", "--annotations", str(data[0]), "--detections",
                                  str(out), "-o", str(tmp_path / "ev")])
    assert ev.exit_code == 0, ev.output
    loc = json.loads((tmp_path / "ev" / "metrics.json").read_text())["localization"]
    assert loc["mean_iou"] == pytest.approx(metrics["mean_iou"])
    assert loc["localization_accuracy"] == pytest.approx(metrics["localization_accuracy"])
    assert "loc. acc." in ev.output


def test_cli_finetune(data, tmp_path):
    res = _train(data, tmp_path / "m", "--finetune", "--iterations", "3")
    assert res.exit_code == 0, res.output
    loc = L.load_localizer(tmp_path / "m")
    tail = {k: v for k, v in loc.arrays.items() if k.startswith(L.TAIL_PREFIX)}
    assert tail and loc.extractor["finetune_blocks"] == L.FINETUNE_BLOCKS["mobilenet_v2"]
    # the fine-tuned blocks moved away from their (seeded random) start
    start = L.Backbone("mobilenet_v2", "random", 0, finetune=True, input_size=32)
    init = L._tail_arrays(start.tail)
    assert init.keys() == tail.keys()
    assert any(not np.array_equal(init[k], tail[k]) for k in tail if k.endswith("weight"))
    res = _predict(data, tmp_path / "m", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "out" / "detections.csv").read_text().splitlines()) == 7


def test_cli_parts(parts_data, tmp_path):
    res = _train(parts_data, tmp_path / "m", "--parts", "4")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    res = _predict(parts_data, tmp_path / "m", out, "--annotations", str(parts_data[0]))
    assert res.exit_code == 0, res.output
    rows = (out / "detections.csv").read_text().splitlines()[1:]
    assert len(rows) == 6 * 4
    assert [r.split(",")[1] for r in rows[:4]] == ["q0", "q1", "q2", "q3"]
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["parts"]) == {"q0", "q1", "q2", "q3"} and m["num_images"] == 6


def test_cli_parts_must_match_classes(parts_data, data, tmp_path):
    res = _train(parts_data, tmp_path / "m", "--parts", "3")
    assert res.exit_code == 2 and "--parts" in res.output and "4 classes" in res.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet18", "resnet50",
                                      pytest.param("vgg16", marks=pytest.mark.slow),
                                      "alexnet"])
def test_cli_backbones(data, tmp_path, backbone):
    if backbone == "mobilenet_v2":
        pytest.skip("every other test runs it")
    size = "64" if backbone == "alexnet" else "32"  # alexnet's conv stack needs > 32 px
    res = _train(data, tmp_path / "m", "--backbone", backbone, "--input-size", size)
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "m" / L.JSON_NAME).read_text())
    assert meta["extractor"]["dim"] == L.CONV_CHANNELS[backbone] * L.GRID ** 2
    if backbone in ("resnet18", "alexnet"):  # predict builds the big ones a second time
        res = _predict(data, tmp_path / "m", tmp_path / "out")
        assert res.exit_code == 0, res.output


@pytest.mark.parametrize("fmt", ["csv", "coco", "voc", "yolo"])
def test_cli_formats(data, tiny_model, tmp_path, fmt):
    out = tmp_path / "out"
    res = _predict(data, tiny_model, out, "--formats", fmt)
    assert res.exit_code == 0, res.output
    expect = {"csv": out / "detections.csv", "coco": out / "detections.json",
              "voc": out / "voc" / "comp4_det_test_red.txt", "yolo": out / "yolo" / "im000.txt"}
    assert expect[fmt].is_file()
    assert (out / "detections.csv").exists() == (fmt == "csv")
    assert (out / "localize.json").is_file()


def test_cli_bad_format(data, tiny_model, tmp_path):
    res = _predict(data, tiny_model, tmp_path / "out", "--formats", "csv,png")
    assert res.exit_code == 2 and "--formats" in res.output
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_overwrite(data, tiny_model, tmp_path):
    res = _train(data, tiny_model)
    assert res.exit_code == 2 and "--overwrite" in res.output
    out = tmp_path / "out"
    assert _predict(data, tiny_model, out).exit_code == 0
    res = _predict(data, tiny_model, out)
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert _predict(data, tiny_model, out, "--overwrite").exit_code == 0


def test_cli_bad_image_rest_processed(data, tiny_model, tmp_path):
    import shutil

    imgs = tmp_path / "imgs"
    shutil.copytree(data[1], imgs)
    (imgs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    res = _predict((data[0], imgs), tiny_model, out, "--save-vis")
    assert res.exit_code == 1 and "broken.png" in res.output and "Traceback" not in res.output
    assert len((out / "detections.csv").read_text().splitlines()) == 7
    assert len(list((out / "vis").glob("*.jpg"))) == 6


def test_largest_object_used_and_logged(tmp_path, caplog):
    recs = [ImageRecord("a.png", 100, 100, np.array([[0, 0, 10, 10], [20, 20, 80, 90]],
                                                    np.float32), np.array([0, 1])),
            ImageRecord("b.png", 50, 100, np.array([[10, 10, 30, 20]], np.float32),
                        np.array([0])),
            ImageRecord("c.png", 50, 100)]
    ds = Dataset(recs, ["cat", "dog"], tmp_path)
    t = L.training_targets(ds)
    assert t.images == ["a.png", "b.png"] and t.labels.tolist() == [1, 0]
    np.testing.assert_allclose(t.boxes[:, 0], [[0.2, 0.2, 0.8, 0.9], [0.1, 0.2, 0.3, 0.4]])
    assert t.multi == 1 and t.skipped == {"c.png": "no objects"}
    for r in recs[:2]:
        Image.fromarray(np.zeros((r.height, r.width, 3), np.uint8)).save(tmp_path / r.file_name)
    with caplog.at_level(logging.INFO, logger="rcnn_cli.localize"):
        L.train_localizer(ds, weights="random", input_size=32, iterations=1, hidden=8)
    msgs = [r.getMessage() for r in caplog.records if "several" in r.getMessage()]
    assert msgs == [("localize: 1 of 2 training images hold several objects; each uses its "
                     "largest")]


# ------------------------------------------------------------------ metrics
def _ds():
    recs = [ImageRecord("a.jpg", 100, 100, np.array([[0, 0, 50, 50]], np.float32),
                        np.array([0])),
            ImageRecord("b.jpg", 100, 100, np.array([[0, 0, 50, 50], [50, 50, 100, 100]],
                                                    np.float32), np.array([0, 1])),
            ImageRecord("c.jpg", 100, 100, np.array([[10, 10, 60, 60]], np.float32),
                        np.array([1])),
            ImageRecord("d.jpg", 100, 100, np.array([[0, 0, 100, 100]], np.float32),
                        np.array([0])),
            ImageRecord("e.jpg", 100, 100)]  # no objects: not counted
    return Dataset(recs, ["cat", "dog"], Path("."))


def _p(box, label, score=1.0):
    return (np.array([box], np.float32), np.array([score], np.float32), np.array([label]))


def test_localization_metrics_hand_made():
    preds = {
        "a.jpg": _p([0, 0, 50, 50], 0),  # right class, IoU 1: correct
        "b.jpg": _p([50, 50, 100, 100], 0),  # class cat is there, but its box has IoU 0
        "c.jpg": _p([10, 10, 60, 35], 1),  # right class, IoU 0.5 exactly: correct
        # d.jpg missing: wrong, IoU 0
    }
    m = L.localization_metrics(_ds(), preds)
    assert m["num_images"] == 4 and m["missing_images"] == ["d.jpg"]
    assert m["classification_accuracy"] == pytest.approx(3 / 4)
    assert m["localization_accuracy"] == pytest.approx(2 / 4)
    # mean IoU is class-agnostic: b's box matches the dog box exactly
    assert m["mean_iou"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)


def test_localization_metrics_top_score_and_class_names():
    two = (np.array([[0, 0, 50, 50], [60, 60, 90, 90]], np.float32),
           np.array([0.2, 0.9], np.float32), np.array([0, 0]))
    m = L.localization_metrics(_ds(), {"a.jpg": two})
    assert m["mean_iou"] == 0 and m["localization_accuracy"] == 0  # the 0.9 box counts
    # prediction labels named by the model's class list (here reversed)
    m = L.localization_metrics(_ds(), {"a": _p([0, 0, 50, 50], 1)}, classes=["dog", "cat"])
    assert m["localization_accuracy"] == pytest.approx(1 / 4)  # "a" finds a.jpg by stem
    m = L.localization_metrics(_ds(), {"a.jpg": _p([0, 0, 50, 50], 0)}, classes=["cow"])
    assert m["classification_accuracy"] == 0


def test_parts_metrics_hand_made():
    ds = Dataset([ImageRecord("a.jpg", 100, 100,
                              np.array([[0, 0, 50, 50], [50, 0, 100, 50]], np.float32),
                              np.array([0, 1]))], ["q0", "q1"], Path("."))
    pred = (np.array([[0, 0, 50, 50], [50, 0, 100, 25]], np.float32), np.ones(2, np.float32),
            np.array([0, 1]))
    m = L.parts_metrics(ds, {"a.jpg": pred})
    assert m["parts"]["q0"]["mean_iou"] == pytest.approx(1.0)
    assert m["parts"]["q1"]["mean_iou"] == pytest.approx(0.5)
    assert m["mean_iou"] == pytest.approx(0.75) and m["correct_parts"] == 1.0


def test_decode_boxes_clips_and_orders():
    out = L.decode_boxes(np.array([[0.9, -0.2, 0.1, 1.5]], np.float32),
                         np.zeros(4, np.float32), np.ones(4, np.float32))
    np.testing.assert_allclose(out, [[[0.1, 0.0, 0.9, 1.0]]])


def test_bad_options_rejected():
    ds = _ds()
    with pytest.raises(ValueError, match="attach"):
        L.train_localizer(ds, attach="pool")
    with pytest.raises(ValueError, match="loss"):
        L.train_localizer(ds, loss="l1")
    with pytest.raises(L.LocalizeError, match="2 classes"):
        L.train_localizer(ds, parts=3)


def test_cli_weights_file(data, tmp_path):
    """--weights PATH: recorded with its hash; predict refuses a changed or missing file."""
    import torch
    import torchvision

    torch.manual_seed(0)
    w = tmp_path / "w.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), w)
    res = _invoke(["localize", "train", "--annotations", str(data[0]), "--images",
                   str(data[1]), "-o", str(tmp_path / "m"), "--weights", str(w),
                   "--input-size", "32", "--iterations", "2"])
    assert res.exit_code == 0, res.output
    assert _predict(data, tmp_path / "m", tmp_path / "o1").exit_code == 0
    torch.save({k: v + 1 if v.is_floating_point() else v
                for k, v in torch.load(w, weights_only=True).items()}, w)
    res = _predict(data, tmp_path / "m", tmp_path / "o2")
    assert res.exit_code == 1 and "differ" in res.output and "Traceback" not in res.output
    w.unlink()
    res = _predict(data, tmp_path / "m", tmp_path / "o3")
    assert res.exit_code == 1 and "w.pth" in res.output and "Traceback" not in res.output


def test_cli_no_images_is_an_error(data, tiny_model, tmp_path):
    split = tmp_path / "split.txt"
    split.write_text("nothing_here\n")
    res = _predict(data, tiny_model, tmp_path / "out", "--split", str(split))
    assert res.exit_code == 1 and "no images" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out" / "detections.csv").exists()


@pytest.mark.parametrize("args", [["localize"], ["localize", "train"],
                                  ["localize", "predict"]])
def test_localize_help_has_example(args):
    res = _invoke([*args, "--help"])
    assert res.exit_code == 0 and "Example:" in res.output


def test_predict_output_folder_rules_and_one_picture_per_image(data, tiny_model, tmp_path):
    """Regressions from review: predict wrote vis/<stem>.jpg (img.jpg and img.png shared one
    picture), took -o = the input folder (and read its own pictures back), and wrote over a
    user's file in vis/."""
    import shutil

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    src = min(Path(data[1]).glob("*.png"))
    shutil.copy(src, imgs / "a.png")
    Image.open(src).convert("RGB").save(imgs / "a.jpg")
    res = _invoke(["localize", "predict", str(imgs), "--model", str(tiny_model), "-o",
                   str(tmp_path / "out"), "--save-vis"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out" / "vis").iterdir()) == ["a.jpg.jpg",
                                                                           "a.png.jpg"]
    res = _invoke(["localize", "predict", str(imgs), "--model", str(tiny_model), "-o",
                   str(imgs)])
    assert res.exit_code == 2 and "input" in res.output
    user = tmp_path / "user"
    (user / "vis").mkdir(parents=True)
    (user / "vis" / "a.png.jpg").write_bytes(b"mine")
    res = _invoke(["localize", "predict", str(imgs), "--model", str(tiny_model), "-o",
                   str(user), "--save-vis", "--overwrite"])
    assert res.exit_code == 2 and (user / "vis" / "a.png.jpg").read_bytes() == b"mine"


def test_training_skips_records_without_a_size():
    from rcnn_cli.datasets import Dataset, ImageRecord

    ok = ImageRecord("a.jpg", 100, 200, np.array([[10, 10, 50, 60]], np.float32),
                     np.zeros(1, np.int64), np.zeros(1, bool))
    gone = ImageRecord("gone.jpg", 0, 0, np.array([[1, 1, 5, 5]], np.float32),
                       np.zeros(1, np.int64), np.zeros(1, bool))
    t = L.training_targets(Dataset([ok, gone], ["cat"], Path(".")))
    assert t.images == ["a.jpg"] and "gone.jpg" in t.skipped


# ------------------------------------------------------------------ settings (issue 15)
def test_cli_train_reads_the_localize_config_and_flags_override(data, tmp_path):
    """[localize] in --config sets train's values (one source of defaults); a flag wins."""
    ann, images = data
    cfg = tmp_path / "c.toml"
    cfg.write_text('[localize]\nweights = "random"\ninput_size = 32\niterations = 2\n'
                   'hidden = 8\nattach = "conv"\nloss = "smooth_l1"\nseed = 3\n'
                   'finetune = true\n')
    res = _invoke(["localize", "train", "--annotations", str(ann), "--images", str(images),
                   "-o", str(tmp_path / "m"), "--config", str(cfg), "--iterations", "3",
                   "--no-finetune"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "m" / L.JSON_NAME).read_text())
    assert (meta["hidden"], meta["attach"], meta["loss"]) == (8, "conv", "smooth_l1")
    assert meta["extractor"]["input_size"] == 32 and meta["extractor"]["seed"] == 3
    assert meta["training_stats"]["iterations"] == 3  # the flags over the file
    assert meta["extractor"]["finetune_blocks"] == 0
    run = json.loads((tmp_path / "m" / "run.json").read_text())["runs"]["localize train"]
    assert run["settings"]["localize"]["hidden"] == 8


def test_cli_localize_config_values_are_checked(data, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[localize]\nattach = "pool"\n')
    res = _train(data, tmp_path / "m", "--config", str(cfg))
    assert res.exit_code == 2 and "localize.attach" in res.output and "conv" in res.output
    assert not (tmp_path / "m").exists()


def test_cli_predict_reads_formats_from_the_localize_config(data, tiny_model, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[localize]\nformats = ["yolo"]\n')
    out = tmp_path / "out"
    res = _predict(data, tiny_model, out, "--config", str(cfg))
    assert res.exit_code == 0, res.output
    assert (out / "yolo" / "im000.txt").is_file() and not (out / "detections.csv").exists()
    res = _predict(data, tiny_model, tmp_path / "o2", "--config", str(cfg), "--formats", "csv")
    assert res.exit_code == 0 and (tmp_path / "o2" / "detections.csv").is_file()
