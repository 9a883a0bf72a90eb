"""detect: post-processing against a reference NMS, and the whole chain end to end."""
import csv
import json
import os
import re
import shutil
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rcnn_cli.cli import cli
from rcnn_cli.detect import DetectSettings, detect_from_features, detect_image, postprocess
from rcnn_cli.model import load_model

#: R-CNN's plain post-processing (greedy NMS, no box voting)
HARD = {"nms": "hard", "box_vote_iou": 0.0}


def _plain_nms(boxes, scores, thresh):
    """Reference: greedy NMS in plain Python (suppress IoU > thresh)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        ok = True
        for j in keep:
            x1, y1 = max(boxes[i][0], boxes[j][0]), max(boxes[i][1], boxes[j][1])
            x2, y2 = min(boxes[i][2], boxes[j][2]), min(boxes[i][3], boxes[j][3])
            inter = max(0, x2 - x1) * max(0, y2 - y1)
            a = (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1])
            b = (boxes[j][2] - boxes[j][0]) * (boxes[j][3] - boxes[j][1])
            if inter / (a + b - inter) > thresh:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_postprocess_nms_either_side_of_threshold():
    # box 1 overlaps box 0 with IoU just above 0.3, box 2 just below
    b0 = [0, 0, 100, 100]
    b1 = [0, 0, 100, 47]     # IoU 0.47... > 0.3
    b2 = [0, 0, 100, 29.9]   # IoU 0.299 < 0.3
    boxes = np.array([b0, b1, b2], np.float32)[:, None, :]  # (N, K=1, 4)
    scores = np.array([[0.9], [0.8], [0.7]], np.float32)
    b, s, _ = postprocess(boxes, scores, (200, 200), DetectSettings(nms_iou=0.3, **HARD))
    ref = _plain_nms(boxes[:, 0].tolist(), scores[:, 0].tolist(), 0.3)
    assert ref == [0, 2]
    np.testing.assert_array_equal(b, boxes[ref, 0])
    np.testing.assert_array_equal(s, np.float32([0.9, 0.7]))


def test_soft_nms_decays_overlaps_and_keeps_classes_apart():
    from rcnn_cli.boxes import box_iou
    from rcnn_cli.detect import SOFT_NMS_SIGMA, soft_nms

    b = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [1, 0, 11, 10]], np.float32)
    s = np.array([1.0, 0.5, -1.0, 0.8], np.float32)
    lab = np.array([0, 0, 0, 1])
    idx, sc = soft_nms(b, s, lab, score_thresh=-2.0)
    iou = float(box_iou(b[:1], b[1:2])[0, 0])
    want = {0: 1.0, 3: 0.8, 1: -2.0 + 2.5 * np.exp(-iou ** 2 / SOFT_NMS_SIGMA),
            2: -1.0}  # box 2 does not overlap box 0 (IoU 0): unchanged; class 1 untouched
    assert sorted(idx.tolist()) == [0, 1, 2, 3]
    for i, v in zip(idx, sc):
        assert v == pytest.approx(want[int(i)], abs=1e-5)
    assert (np.diff(sc) <= 0).all()  # best first
    # through postprocess: hard NMS at 0.3 drops box 1, soft-NMS keeps it, ranked last
    one = (b[:3, None, :], s[:3, None], (100, 100))
    _, hs, _ = postprocess(*one, DetectSettings(0.3, -2.0, 10, **HARD))
    _, ss, _ = postprocess(*one, DetectSettings(0.3, -2.0, 10, nms="soft", box_vote_iou=0.0))
    assert len(hs) == 2 and len(ss) == 3 and ss[-1] < -1.0


def test_box_voting_is_the_score_weighted_mean():
    from rcnn_cli.detect import box_voting

    cand = np.array([[0, 0, 10, 10], [2, 0, 12, 10], [40, 40, 50, 50]], np.float32)
    sc = np.array([1.0, 0.0, 5.0], np.float32)
    lab = np.array([0, 0, 0])
    out = box_voting(cand[:1], np.array([0]), cand, sc, lab, 0.5)
    w = np.exp([1.0, 0.0])
    np.testing.assert_allclose(out[0], (w[0] * cand[0] + w[1] * cand[1]) / w.sum(), rtol=1e-6)
    # another class never votes
    out2 = box_voting(cand[:1], np.array([0]), cand, sc, np.array([0, 1, 0]), 0.5)
    np.testing.assert_allclose(out2[0], cand[0])


def test_postprocess_per_class_threshold_clip_and_cap():
    rng = np.random.default_rng(0)
    n, k = 50, 3
    xy = rng.uniform(-20, 150, (n, k, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (n, k, 2))], 2).astype(np.float32)
    scores = rng.normal(0, 1, (n, k)).astype(np.float32)
    st = DetectSettings(nms_iou=0.5, score_thresh=0.0, max_per_image=1000, **HARD)
    b, s, lab = postprocess(boxes, scores, (120, 160), st)
    assert (s > 0).all() and np.all(np.diff(s) <= 0)
    assert b[:, 0].min() >= 0 and b[:, 2].max() <= 160 and b[:, 3].max() <= 120
    for c in range(k):  # the same as the reference NMS run per class on clipped boxes
        cb = np.clip(boxes[:, c], 0, [160, 120, 160, 120])
        m = (scores[:, c] > 0) & (cb[:, 2] - cb[:, 0] > 0.01) & (cb[:, 3] - cb[:, 1] > 0.01)
        ref = _plain_nms(cb[m].tolist(), scores[m, c].tolist(), 0.5)
        np.testing.assert_allclose(np.sort(s[lab == c]), np.sort(scores[m, c][ref]))
    _, s2, _ = postprocess(boxes, scores, (120, 160), DetectSettings(0.5, 0.0, 3, **HARD))
    assert len(s2) == 3 and np.array_equal(s2, s[:3])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny synthetic dataset through propose -> extract -> train-svm (ImageNet weights
    when installed, which `make test` does; else skipped)."""
    from torchvision.models import MobileNet_V2_Weights

    from rcnn_cli.weights import WeightsError, require_cached_weights

    try:
        require_cached_weights(MobileNet_V2_Weights.IMAGENET1K_V1.url)
    except WeightsError:
        pytest.skip("ImageNet mobilenet_v2 weights not installed (make setup)")
    from rcnn_cli.demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("chain")
    data = make_demo_dataset(root / "data", n_train=8, n_test=4, seed=1)
    r = CliRunner()
    args = ["--top-k", "300"]
    res = r.invoke(cli, ["propose", str(data / "images"), "-o", str(root / "props"), *args])
    assert res.exit_code == 0, res.output
    res = r.invoke(cli, ["extract", str(data / "images"), "--proposals", str(root / "props"),
                         "--annotations", str(data), "--split", str(data / "train.txt"),
                         "-o", str(root / "feats"), "--keep", "all"])  # scored from the store
    assert res.exit_code == 0, res.output
    # the default fc head (mobilenet_v2 grid features), smaller and shorter than the default
    (root / "head.toml").write_text("[train_svm]\nhead_hidden = 64\nhead_iterations = 300\n")
    res = r.invoke(cli, ["train-svm", "--features", str(root / "feats"), "-o",
                         str(root / "model"), "--config", str(root / "head.toml")])
    assert res.exit_code == 0, res.output
    assert "fc head: " in res.output and "trained 4/4 classes" in res.output
    return root, data


def test_end_to_end_finds_planted_objects(chain):
    root, data = chain
    r = CliRunner()
    out = root / "det"
    res = r.invoke(cli, ["detect", str(data / "images"), "--split", str(data / "test.txt"),
                         "--model", str(root / "model"), "-o", str(out), "--save-vis",
                         "--formats", "csv,coco,voc,yolo"])
    assert res.exit_code == 0, res.output
    with open(out / "detections.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "class", "score", "x1", "y1", "x2", "y2"]
    images = json.loads((out / "images.json").read_text())
    assert sorted(i["file_name"] for i in images) == [f"test_{i:03d}.jpg" for i in range(8, 12)]
    dets = json.loads((out / "detections.json").read_text())
    assert {"image_id", "category_id", "bbox", "score"} <= set(dets[0])
    assert len(list((out / "vis").glob("*.jpg"))) == 4
    assert (out / "voc").is_dir() and (out / "yolo").is_dir()
    res = r.invoke(cli, ["evaluate", "--annotations", str(data), "--split",
                         str(data / "test.txt"), "--detections", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["mAP_voc07"] >= 0.7, m["per_class"]
    assert load_model(root / "model").head is not None  # the default path: SVMs on fc7
    # resume: a second run finds every image done
    res = r.invoke(cli, ["detect", str(data / "images"), "--split", str(data / "test.txt"),
                         "--model", str(root / "model"), "-o", str(out)])
    assert res.exit_code == 0 and "4 already done" in res.output


def test_detect_broken_image_goes_on_and_exits_1(chain, tmp_path):
    root, data = chain
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(data / "images" / "test_008.jpg", imgs / "good.jpg")
    (imgs / "broken.jpg").write_text("not an image")
    res = CliRunner().invoke(cli, ["detect", str(imgs), "--model", str(root / "model"),
                                   "-o", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert "broken.jpg" in res.output and "1 failed" in res.output
    images = json.loads((tmp_path / "out" / "images.json").read_text())
    assert [i["file_name"] for i in images] == ["good.jpg"]


def test_bad_model_is_a_clear_error(tmp_path):
    (tmp_path / "img.jpg").write_bytes(b"")
    (tmp_path / "model").mkdir()
    res = CliRunner().invoke(cli, ["detect", str(tmp_path / "img.jpg"), "--model",
                                   str(tmp_path / "model"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "model.json" in res.output


def test_model_thresholds_apply_unless_overridden():
    from types import SimpleNamespace

    from rcnn_cli import config
    from rcnn_cli.detect import model_detect_settings

    model = SimpleNamespace(nms_iou=0.45, score_threshold=-0.5, max_detections=7)
    cfg = config.load()
    s = model_detect_settings(model, cfg, overrides={})
    assert (s.nms_iou, s.score_thresh, s.max_per_image) == (0.45, -0.5, 7)
    s = model_detect_settings(model, cfg, overrides={"nms_iou": 0.6, "bbox_regression": False})
    assert (s.nms_iou, s.score_thresh, s.bbox_regression) == (0.6, -0.5, False)
    s = model_detect_settings(model, cfg, overrides=None)  # library callers: the config wins
    assert (s.nms_iou, s.score_thresh) == (cfg["detect"]["nms_iou"], cfg["detect"]["score_thresh"])


def test_is_trained_knows_its_features_and_settings(chain):
    from rcnn_cli import config
    from rcnn_cli.train import is_trained

    root, _ = chain
    cfg = config.load(root / "head.toml")  # the settings the chain trained with
    assert is_trained(root / "feats", root / "model", cfg)
    assert not is_trained(root / "feats", root / "model", config.load())  # head defaults
    cfg["train_svm"]["C"] = 0.01
    assert not is_trained(root / "feats", root / "model", cfg)
    assert not is_trained(root / "feats", root / "nope", config.load())


def test_train_on_a_subset_and_score_cached_features(chain, tmp_path):
    """train_model(images=...) trains on those images only (cross-validation folds), and
    detect_from_features on cached extract features gives what detect_image gives."""
    from rcnn_cli import config
    from rcnn_cli.detect import DetectSettings, detect_from_features, detect_image
    from rcnn_cli.features import FeatureExtractor
    from rcnn_cli.images import read_image
    from rcnn_cli.store import open_upstream
    from rcnn_cli.train import train_model

    root, data = chain
    cfg = config.load(root / "head.toml")
    cfg["train_svm"]["head"] = "none"
    store = open_upstream(root / "feats", "extract")
    ids = store.done_rels()
    model = train_model(root / "feats", tmp_path / "m", cfg, images=ids[:5])
    assert model.training_stats["images"] == 5
    with pytest.raises(ValueError, match="not finished"):
        train_model(root / "feats", tmp_path / "m2", cfg, images=["nope"])
    # cached proposal features score exactly like a fresh detect of the same image
    rec = store.load(ids[0])
    props = rec["gt_label"] < 0
    st = DetectSettings(score_thresh=-1e9)
    cached = detect_from_features(rec["boxes"][props], rec["features"][props].astype(np.float32),
                                  model, tuple(rec["image_size"]), st)
    ext = FeatureExtractor(**{k: v for k, v in store.settings["extractor"].items()})
    img = read_image(data / "images" / ids[0])
    fresh = detect_image(img, model, ext, st)
    assert len(cached["scores"]) > 0
    np.testing.assert_allclose(cached["scores"][:5], fresh["scores"][:5], atol=2e-2)


def test_is_trained_sees_a_re_extracted_image(chain, tmp_path):
    """Same settings key, but one image's record recomputed since training: not trained."""
    from rcnn_cli import config
    from rcnn_cli.store import open_upstream
    from rcnn_cli.train import is_trained

    root, _ = chain
    cfg = config.load(root / "head.toml")
    feats = tmp_path / "feats"
    shutil.copytree(root / "feats", feats)
    assert is_trained(feats, root / "model", cfg)
    store = open_upstream(feats, "extract")
    rel = store.done_rels()[0]
    store.save(rel, store.load(rel), source=np.array([1, 2]))  # as if its image changed
    assert not is_trained(feats, root / "model", cfg)


def test_detect_keeps_one_identity_per_image(chain, tmp_path):
    """img.jpg and img.png in one folder, and sub/img.jpg: three images in every output;
    a replaced image is detected again."""
    root, data = chain
    src = sorted((data / "images").glob("test_*.jpg"))
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    shutil.copyfile(src[0], imgs / "img.jpg")
    Image.open(src[1]).resize((100, 70)).save(imgs / "img.png")
    shutil.copyfile(src[2], imgs / "sub" / "img.jpg")
    out = tmp_path / "det"
    args = ["detect", str(imgs), "--model", str(root / "model"), "-o", str(out), "--save-vis",
            "--formats", "csv,coco,voc,yolo"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    images = {i["file_name"]: (i["height"], i["width"])
              for i in json.loads((out / "images.json").read_text())}
    h0, w0 = Image.open(src[0]).size[::-1]
    assert images == {"img.jpg": (h0, w0), "img.png": (70, 100),
                      "sub/img.jpg": Image.open(src[2]).size[::-1]}
    per_image = sorted(p.relative_to(out / "per_image").as_posix()
                       for p in (out / "per_image").rglob("*.npz"))
    assert per_image == ["img.jpg.npz", "img.png.npz", "sub/img.jpg.npz"]
    vis = sorted(p.relative_to(out / "vis").as_posix() for p in (out / "vis").rglob("*.jpg"))
    assert vis == ["img.jpg.jpg", "img.png.jpg", "sub/img.jpg.jpg"]
    yolo = sorted(p.relative_to(out / "yolo").as_posix() for p in (out / "yolo").rglob("*.txt"))
    assert yolo == ["img.jpg.txt", "img.png.txt", "sub/img.txt"]
    ids = {ln.split()[0] for p in (out / "voc").glob("*.txt") for ln in p.read_text().splitlines()}
    assert ids <= set(images) and len(ids) >= 2
    # the png replaced by another picture: detected again, with its new size
    Image.open(src[3]).resize((90, 60)).save(imgs / "img.png")
    st = os.stat(imgs / "img.png")
    os.utime(imgs / "img.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "1 done, 2 already done" in res.output, res.output
    images = {i["file_name"]: (i["height"], i["width"])
              for i in json.loads((out / "images.json").read_text())}
    assert images["img.png"] == (60, 90)


def test_gpu_pipeline_gives_the_same_detections(chain, tmp_path, monkeypatch):
    """`rcnn detect --device cuda --workers N`: N processes decode and propose, the model's
    process scores (executors.map_prepared). Forced on here on the CPU: same detections as
    the one-process run, a broken image still one failure among the others."""
    import rcnn_cli.detect as D

    root, data = chain
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for stem in (data / "test.txt").read_text().split():
        shutil.copy(data / "images" / f"{stem}.jpg", imgs / f"{stem}.jpg")
    (imgs / "broken.jpg").write_text("not an image")
    r = CliRunner()
    base = ["detect", str(imgs), "--model", str(root / "model")]
    res = r.invoke(cli, [*base, "-o", str(tmp_path / "one")])
    assert res.exit_code == 1 and "1 failed" in res.output
    calls = []
    monkeypatch.setattr(D, "_feeds_gpu", lambda dev, cfg, dense: calls.append(dev) or True)
    res = r.invoke(cli, [*base, "-o", str(tmp_path / "pipe"), "--workers", "2", "-v"])
    assert calls == ["cpu"]
    assert res.exit_code == 1, res.output
    assert "broken.jpg" in res.output and "4 done" in res.output and "1 failed" in res.output
    assert "2 processes make proposals" in res.output
    one = (tmp_path / "one" / "detections.csv").read_text()
    assert one.count("\n") > 4 and (tmp_path / "pipe" / "detections.csv").read_text() == one


def test_detect_with_precomputed_proposals(chain, tmp_path, caplog):
    """`rcnn detect --proposals P`: the boxes of an `rcnn propose` folder (made with the
    model's settings) give the same detections as computing them; an image the folder has
    no boxes for fails alone; other settings warn; --dense excludes it."""
    root, data = chain
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for stem in (data / "test.txt").read_text().split():
        shutil.copy(data / "images" / f"{stem}.jpg", imgs / f"{stem}.jpg")
    r = CliRunner()
    base = ["detect", str(imgs), "--model", str(root / "model")]
    res = r.invoke(cli, [*base, "-o", str(tmp_path / "own")])
    assert res.exit_code == 0, res.output
    props = tmp_path / "props"
    res = r.invoke(cli, ["propose", str(imgs), "-o", str(props), "--top-k", "300"])
    assert res.exit_code == 0, res.output
    res = r.invoke(cli, [*base, "-o", str(tmp_path / "pre"), "--proposals", str(props), "-v"])
    assert res.exit_code == 0, res.output
    assert "may be worse" not in res.output
    own = (tmp_path / "own" / "detections.csv").read_text()
    assert own.count("\n") > 4 and (tmp_path / "pre" / "detections.csv").read_text() == own
    record = json.loads((tmp_path / "pre" / "run.json").read_text())["runs"]["detect"]
    assert any(str(props) in str(i) for i in record["inputs"])
    # resumed: nothing redone; two processes: the same detections
    res = r.invoke(cli, [*base, "-o", str(tmp_path / "pre"), "--proposals", str(props)])
    assert res.exit_code == 0 and "4 already done" in res.output, res.output
    res = r.invoke(cli, [*base, "-o", str(tmp_path / "pre_w2"), "--proposals", str(props),
                         "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "pre_w2" / "detections.csv").read_text() == own
    # an image changed after `rcnn propose`: its boxes are stale, it alone fails
    first = imgs / f"{(data / 'test.txt').read_text().split()[0]}.jpg"
    st = os.stat(first)
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    res = r.invoke(cli, [*base, "-o", str(tmp_path / "pre_old"), "--proposals", str(props)])
    assert res.exit_code == 1 and first.name in res.output and "older version" in res.output
    assert "3 done" in res.output
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))
    # an image added after `rcnn propose`: it alone fails, named, with the reason
    shutil.copy(imgs / f"{(data / 'test.txt').read_text().split()[0]}.jpg", imgs / "new.jpg")
    res = r.invoke(cli, [*base, "-o", str(tmp_path / "pre2"), "--proposals", str(props)])
    assert res.exit_code == 1 and "new.jpg" in res.output and "no proposals" in res.output
    assert "4 done" in res.output
    # shards are cut from all the images, then filtered: they split the 5 images whatever the
    # proposals folder holds, and only new.jpg's shard reports it
    reported, done = [], 0
    for i in range(2):
        res = r.invoke(cli, [*base, "-o", str(tmp_path / "sh"), "--proposals", str(props),
                             "--shard", f"{i}/2"])
        reported.append("new.jpg" in res.output)
        done += int(re.search(r"(\d+) done", res.output).group(1))
    assert sorted(reported) == [False, True] and done == 4
    (imgs / "new.jpg").unlink()
    # boxes made with other settings: used, with a warning naming both
    other = tmp_path / "props_other"
    res = r.invoke(cli, ["propose", str(imgs), "-o", str(other), "--top-k", "100"])
    assert res.exit_code == 0, res.output
    res = r.invoke(cli, [*base, "-o", str(tmp_path / "pre3"), "--proposals", str(other)])
    assert res.exit_code == 0 and "may be worse" in res.output, res.output
    assert (tmp_path / "pre3" / "detections.csv").read_text() != own  # its boxes were used
    res = r.invoke(cli, [*base, "-o", str(tmp_path / "pre4"), "--proposals", str(props),
                         "--dense"])
    assert res.exit_code == 2 and "--dense or --proposals" in res.output
    assert not (tmp_path / "pre4").exists()


def _grid_model(ext, feats, k: int = 2, hidden: int = 16, regress: bool = True, seed: int = 0):
    """A model with an fc head on ``ext``'s grid features, standardised by the statistics of
    ``feats`` as training does (the floor 1e-3 where a dimension barely varies: folding the
    mean after the division would cancel there)."""
    from rcnn_cli.head import Head
    from rcnn_cli.model import Model

    rng = np.random.default_rng(seed)
    d = ext.dim
    std = (feats.std(0) + 1e-3).astype(np.float32)
    std[::97] = 1e-3
    head = Head(mean=feats.mean(0).astype(np.float32), std=std,
                fc6_w=rng.normal(0, 0.02, (hidden, d)).astype(np.float32),
                fc6_b=rng.normal(0, 0.1, hidden).astype(np.float32),
                fc7_w=rng.normal(0, 0.3, (hidden, hidden)).astype(np.float32),
                fc7_b=rng.normal(0, 0.1, hidden).astype(np.float32),
                cls_w=np.zeros((k + 1, hidden), np.float32), cls_b=np.zeros(k + 1, np.float32))
    return Model(classes=[f"c{i}" for i in range(k)],
                 svm_weights=rng.normal(size=(k, hidden)).astype(np.float32),
                 svm_biases=rng.normal(size=k).astype(np.float32), feat_scale=0.37,
                 svm_trained=np.ones(k, bool), head=head, reg_feat_scale=0.05,
                 regressors=rng.normal(0, 0.01, (k, 4, d + 1)).astype(np.float32)
                 if regress else None)


@pytest.mark.parametrize("regress", [True, False])
def test_top_projection_gives_the_unprojected_scores_and_boxes(regress, monkeypatch):
    """detect_image moves the model's first linear step (fc6 before its ReLU, and the box
    regressors) before the grid tap's top-map box means: the scores and deltas of the plain
    path (features, then fc6) to float rounding, boxes reaching past the map's edge (where
    the box mean counts the outside as zero) and degenerate boxes included. The trunk's maps
    are ReLU6-like synthetic ones (a random-weight trunk's top map is ~1e-9: it would not
    test the top part), smaller than the image / stride, so edge boxes are partly outside."""
    import torch

    from rcnn_cli.features import FeatureExtractor

    ext = FeatureExtractor("mobilenet_v2", weights="random", device="cpu", mode="shared")
    assert ext.top_channels == 1280
    gen = torch.Generator().manual_seed(0)
    maps = (torch.rand(1, 96, 9, 12, generator=gen) * 6,
            torch.rand(1, 1280, 4, 6, generator=gen) * torch.rand(1280, 1, 1, generator=gen) * 6)
    monkeypatch.setattr(ext, "shared_maps", lambda image: (maps, (1.0, 1.0)))
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (150, 203, 3), dtype=np.uint8)
    xy = rng.uniform(0, 180, (60, 2))
    wh = rng.uniform(1, 120, (60, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    boxes = np.concatenate([boxes, [[0, 0, 203, 150], [190, 140, 203, 150], [50, 50, 50, 80]]]
                           ).astype(np.float32)
    feats = ext.extract(img, boxes)
    model = _grid_model(ext, feats, regress=regress)
    proj = model.top_projection(ext.top_channels)
    pooled, cover, rest = ext.extract_projected(img, boxes, proj.top_w, proj.top_centre)
    assert float(cover.min()) < 0.9 and float(cover.max()) == pytest.approx(1.0)  # edges
    assert float(proj.top_shift.abs().max()) > 1.0  # the top map's mean matters
    scores, deltas = model.scores_and_deltas(proj.finish(pooled, cover, rest))
    want = model.score(feats)
    np.testing.assert_allclose(scores, want, atol=2e-4 * np.abs(want).max())
    if regress:
        want_d = model.deltas(feats)
        np.testing.assert_allclose(deltas, want_d, atol=2e-4 * np.abs(want_d).max())
    else:
        assert deltas is None
    settings = DetectSettings(nms_iou=0.3, score_thresh=-50.0, max_per_image=100)
    a = detect_from_features(boxes, feats, model, img.shape[:2], settings)
    calls = []
    projected = ext.extract_projected
    monkeypatch.setattr(ext, "extract_projected", lambda *a, **k: calls.append(1) or
                        projected(*a, **k))
    b = detect_image(img, model, ext, settings, boxes)
    assert calls == [1]  # detect_image took the projected path
    # no proposals (an image under min_size): no detections, not an error
    none = detect_image(img, model, ext, settings, np.zeros((0, 4), np.float32))
    assert len(none["boxes"]) == len(none["scores"]) == 0 and calls == [1, 1]
    assert len(a["scores"]) == len(b["scores"]) > 0
    np.testing.assert_allclose(b["scores"], a["scores"], atol=1e-3)
    np.testing.assert_allclose(b["boxes"], a["boxes"], atol=1e-2)
    # no boxes: empty outputs of the right widths
    p0, c0, r0 = ext.extract_projected(img, np.zeros((0, 4), np.float32), proj.top_w,
                                       proj.top_centre)
    assert p0.shape == (0, proj.width) and c0.shape == (0,) and r0.shape == (0, ext.dim - 1280)


def test_top_projection_is_cached_per_weights_and_refused_where_it_cannot_apply():
    from rcnn_cli.features import FeatureExtractor

    ext = FeatureExtractor("mobilenet_v2", weights="random", device="cpu", mode="shared")
    feats = np.random.default_rng(0).uniform(0, 1, (10, ext.dim)).astype(np.float32)
    model = _grid_model(ext, feats)
    first = model.top_projection(1280)
    assert model.top_projection(1280) is first
    model.head.fc6_w = model.head.fc6_w * 2  # new weights: a new projection
    again = model.top_projection(1280)
    assert again is not first
    np.testing.assert_allclose(again.top_w.numpy()[:16], 2 * first.top_w.numpy()[:16],
                               rtol=1e-6)
    model.head = None
    assert model.top_projection(1280) is None
    with pytest.raises(ValueError, match="top must lie"):
        _grid_model(ext, feats).top_projection(ext.dim)
    with pytest.raises(ValueError, match=r"weights \(R, 1280\)"):
        ext.extract_projected(np.zeros((8, 8, 3), np.uint8), np.float32([[0, 0, 4, 4]]),
                              first.top_w[:, :10], first.top_centre)
    warp = FeatureExtractor("mobilenet_v2", weights="random", device="cpu", mode="warp")
    assert warp.top_channels is None
    with pytest.raises(ValueError, match="grid tap"):
        warp.extract_projected(np.zeros((8, 8, 3), np.uint8), np.float32([[0, 0, 4, 4]]),
                               first.top_w, first.top_centre)


def test_pool_driver_proposes_while_its_workers_start_and_never_imports_torch(chain, tmp_path):
    """`rcnn detect --workers 2` on a CPU: the driver keys the store without torch
    (stages.cpu_feature_settings) and makes proposals for the images after the pool's first
    ones while the pool's processes import torch; the detections are the one-process run's,
    and that run's folder resumes under the other worker count (the same key), both ways."""
    from tests.conftest import cli_in_fresh_python

    root, data = chain
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, stem in enumerate((data / "test.txt").read_text().split() * 2):
        shutil.copy(data / "images" / f"{stem}.jpg", imgs / f"{i}_{stem}.jpg")
    base = ["detect", str(imgs), "--model", str(root / "model"), "--device", "cpu"]
    _, [(code, output)], after = cli_in_fresh_python(
        [*base, "-o", tmp_path / "two", "--workers", "2", "-v"], timeout=600)
    assert code == 0, output
    assert "torch" not in after  # the pool's processes ran the CNN
    m = re.search(r"this process prepared (\d+) of 8 images", output)
    assert m and int(m.group(1)) >= 1, output
    r = CliRunner()
    res = r.invoke(cli, [*base, "-o", str(tmp_path / "one")])
    assert res.exit_code == 0, res.output
    one = (tmp_path / "one" / "detections.csv").read_text()
    assert one.count("\n") > 8 and (tmp_path / "two" / "detections.csv").read_text() == one
    res = r.invoke(cli, [*base, "-o", str(tmp_path / "two")])
    assert res.exit_code == 0 and "8 already done" in res.output, res.output
    res = r.invoke(cli, [*base, "-o", str(tmp_path / "one"), "--workers", "2"])
    assert res.exit_code == 0 and "8 already done" in res.output, res.output


def test_torch_free_feature_settings_are_the_extractors(tmp_path, monkeypatch):
    """stages.cpu_feature_settings (the detect driver's key without torch) equals
    FeatureExtractor(...).settings() for every backbone's modes and taps on the CPU, and is
    None where it cannot tell or the extractor would fail (then the driver loads it)."""
    import rcnn_cli.cpus as C
    from rcnn_cli.backbones import FACTS, TAPS
    from rcnn_cli.features import BACKBONES, FeatureExtractor
    from rcnn_cli.stages import cpu_feature_settings

    for name, spec in BACKBONES.items():  # the file names are torchvision's / ours
        assert FACTS[name][5] == os.path.basename(spec.weights.url)
    wfile = tmp_path / "w.safetensors"
    wfile.write_bytes(b"not read by the key")
    cases = [dict(backbone="mobilenet_v2", weights="random", device="cpu"),
             dict(backbone="mobilenet_v2", weights="random", device="cpu", mode="warp",
                  padding=8, seed=2),
             dict(backbone="mobilenet_v2", weights="random", device="cpu", mode="shared",
                  tap="pool", shared_scale=[600, 1000], batch_size=32),
             dict(backbone="efficientnet_lite0", weights="random", device="cpu", tap="grid"),
             dict(backbone="resnet18", weights="random", device="cpu", mode="shared")]
    for kw in cases:
        assert cpu_feature_settings(kw) == FeatureExtractor(**kw).settings(), kw
    assert set(TAPS) == set(FACTS)
    # a weights file: its content hash, as the extractor's (which would then read it)
    key = cpu_feature_settings(dict(backbone="mobilenet_v2", weights=str(wfile), device="cpu"))
    assert key["weights"].startswith("file:w.safetensors:")
    # where it cannot tell, or where loading would fail: None
    monkeypatch.setattr(C, "cuda_possible", lambda: True)
    assert cpu_feature_settings(dict(backbone="mobilenet_v2", weights="random")) is None
    monkeypatch.setattr(C, "cuda_possible", lambda: False)
    assert cpu_feature_settings(dict(backbone="mobilenet_v2", weights="random",
                                     device="auto")) is not None
    for bad in (dict(backbone="nope", device="cpu"),
                dict(backbone="mobilenet_v2", device="cuda", weights="random"),
                dict(backbone="mobilenet_v2", device="cpu", weights="random", tap="fc7"),
                dict(backbone="mobilenet_v2", device="cpu", weights="random", mode="warp",
                     tap="grid"),
                dict(backbone="mobilenet_v2", device="cpu", weights=str(tmp_path / "no.pt")),
                dict(backbone="mobilenet_v2", device="cpu", weights="random", amp=True)):
        assert cpu_feature_settings(bad) is None, bad
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))  # ImageNet file missing
    assert cpu_feature_settings(dict(backbone="mobilenet_v2", device="cpu")) is None


def test_pool_server_preloads_the_detector_its_workers_use(chain, monkeypatch):
    """rcnn_cli._pool_detector (imported by the pool's server) loads the bundle and builds
    the extractor named in its environment into the caches a worker's detect_one reads, under
    the same keys, so a worker forked from it builds nothing; without the variable, or with
    a bundle that does not load, it does nothing and never raises."""
    import json

    import rcnn_cli._pool_detector as P
    import rcnn_cli.detect as D
    import rcnn_cli.stages as S

    root, _ = chain
    model_dir = str(root / "model")
    kwargs = D.model_extractor_kwargs(D._get_model(model_dir), model_dir, "cpu")
    monkeypatch.setattr(D, "_MODELS", {})
    monkeypatch.setattr(S, "_EXTRACTORS", {})
    monkeypatch.setenv(P.ENV, json.dumps({"model_dir": model_dir, "extractor_kwargs": kwargs},
                                         default=str))
    assert P.preload() is True
    assert P.ENV not in os.environ  # the server's own workers do not see it
    model, ext = D._MODELS[model_dir], next(iter(S._EXTRACTORS.values()))
    built = []
    monkeypatch.setattr("rcnn_cli.features.FeatureExtractor.__init__",
                        lambda *a, **k: built.append(1))
    assert D._get_model(model_dir) is model and S.get_extractor(kwargs) is ext and not built
    assert P.preload() is False  # nothing named
    monkeypatch.setenv(P.ENV, json.dumps({"model_dir": str(root / "nope"),
                                          "extractor_kwargs": kwargs}))
    assert P.preload() is False
    monkeypatch.setenv(P.ENV, "{not json")
    assert P.preload() is False


def test_detect_one_rechecks_the_drivers_proposals_and_its_key(chain, tmp_path, monkeypatch):
    """A worker given the driver's proposals for a file that changed since uses its own; a
    store keyed by other feature settings than the worker's extractor is refused (a key
    computed without torch that drifted from the extractor's must not mix results)."""
    import rcnn_cli.detect as D
    from rcnn_cli.images import ImageItem
    from rcnn_cli.store import StageStore

    root, data = chain
    stem = (data / "test.txt").read_text().split()[0]
    img = tmp_path / f"{stem}.jpg"
    shutil.copy(data / "images" / f"{stem}.jpg", img)
    item = ImageItem(img, img.name)
    model = load_model(root / "model")
    kw = D.model_extractor_kwargs(model, root / "model", "cpu")
    ext = D.get_extractor(kw)
    settings = DetectSettings()
    key = {"features": ext.settings()}

    times = []

    def run(name, prepared=None, features=None):
        store = StageStore(tmp_path / name, "detect", {"features": features or key["features"]})
        times.append(D.detect_one(item, store, str(root / "model"), kw, settings, None,
                                  prepared=prepared)["times"])
        return store.load(item.rel)

    plain = run("plain")
    # a slow model load is the "load" stage's, not the image's decode (it was counted in
    # decode: 0.04 s / image of the 40-image run was the two workers' backbone loads)
    real_get = D._get_model
    monkeypatch.setattr(D, "_get_model", lambda d: time.sleep(0.3) or real_get(d))
    run("slow_load")
    assert times[-1]["load"] >= 0.3 > times[-1]["decode"], times[-1]
    monkeypatch.setattr(D, "_get_model", real_get)
    stale = {"source": np.array([1, 2], np.int64), "proposals": np.zeros((0, 4), np.float32),
             "times": {"decode": 0.0, "proposals": 0.0}}  # made from another file
    again = run("stale", prepared=stale)
    assert len(plain["scores"]) > 0
    np.testing.assert_array_equal(again["scores"], plain["scores"])
    fresh = D.propose_for_detect(item, model.proposal_settings,
                                 model.extract_settings.get("max_proposals"))
    assert "image" not in fresh
    np.testing.assert_array_equal(run("fresh", prepared=fresh)["scores"], plain["scores"])
    with pytest.raises(RuntimeError, match="keyed by features"):
        run("other", features={**key["features"], "padding": 99.0})


def test_cuda_possible_and_the_run_records_device_without_torch(tmp_path, monkeypatch):
    """No GPU device file (NVIDIA, WSL2's /dev/dxg, ROCm's /dev/kfd): no CUDA, and a run
    record's device resolves without torch; any of them: ask torch."""
    import rcnn_cli.cpus as C
    import rcnn_cli.runrecord as R

    dev = tmp_path / "dev"
    dev.mkdir()
    monkeypatch.setattr(C, "GPU_DEVICE_FILES", (str(tmp_path / "proc_nvidia"),
                                                str(dev / "dxg"), str(dev / "kfd")))
    assert C.cuda_possible(dev) is False
    for name in ("dxg", "kfd"):
        (dev / name).touch()
        assert C.cuda_possible(dev) is True
        (dev / name).unlink()
    (dev / "nvidia0").touch()
    assert C.cuda_possible(dev) is True
    asked = []
    import rcnn_cli.features as F

    monkeypatch.setattr(F, "resolve_device", lambda d: asked.append(d) or "cpu")
    monkeypatch.setattr(C, "cuda_possible", lambda: False)
    assert R.resolved_device("auto") == "cpu" and R.resolved_device("cpu") == "cpu"
    assert asked == []
    monkeypatch.setattr(C, "cuda_possible", lambda: True)
    assert R.resolved_device("auto") == "cpu" and asked == ["auto"]
