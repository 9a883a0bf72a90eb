"""Every choice of every option of every subcommand, through the CLI, on two tiny images.

The upstream artifacts (proposals, features, a model, detections) are built once per module
and reused; each test runs one flag value and checks that its outputs exist and make sense.
Backbones are random-init resnet18 and every size is small, so the module stays fast.
Also here: the error cases that need a model bundle (validated before any work).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rcnn_cli.boxes import box_iou
from rcnn_cli.cli import cli
from tests.conftest import cli_in_fresh_python, rectangles_image

CLASSES = ["red", "blue", "yellow"]
FAST = """
[propose]
top_k = 12
max_side = 160
[extract]
max_proposals = 12
batch_size = 32
[finetune]
batch_size = 8
fg_per_batch = 2
images_per_batch = 2
val_fraction = 0.0
[train_svm]
head_hidden = 16
head_iterations = 5
head_bg_per_image = 16
retrain_limit = 50
"""


def run(*args: str, code: int = 0):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == code, r.output + repr(r.exception)
    return r


def two_images(root: Path) -> tuple[Path, Path, Path]:
    """root/imgs/{a,b}.png (three flat rectangles each), their CSV ground truth
    (imgs/ann.csv) and the FAST config; returns (images folder, annotations, config)."""
    from rcnn_cli.datasets import Dataset, ImageRecord, write_csv

    img = root / "imgs"
    img.mkdir()
    records = []
    for i, name in enumerate(["a.png", "b.png"]):
        im, boxes = rectangles_image(seed=i)
        Image.fromarray(im).save(img / name)
        records.append(ImageRecord(name, im.shape[0], im.shape[1], boxes,
                                   np.arange(3, dtype=np.int64), np.zeros(3, bool)))
    ann = img / "ann.csv"  # file names in a CSV are relative to its folder
    write_csv(ann, Dataset(records, CLASSES, img))
    cfg = root / "fast.toml"
    cfg.write_text(FAST)
    return img, ann, cfg


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Two images + CSV ground truth, and one run of propose, extract, train-svm, detect."""
    root = tmp_path_factory.mktemp("matrix")
    img, ann, cfg = two_images(root)
    c = {"root": root, "img": img, "ann": ann, "cfg": cfg}
    c["props"], c["feats"] = root / "props", root / "feats"
    c["model"], c["det"] = root / "model", root / "det"
    run("propose", img, "-o", c["props"], "--config", cfg)
    run("extract", img, "--proposals", c["props"], "--annotations", ann, "-o", c["feats"],
        "--backbone", "resnet18", "--weights", "random", "--config", cfg)
    run("train-svm", "--features", c["feats"], "-o", c["model"], "--config", cfg)
    run("detect", img, "--model", c["model"], "-o", c["det"], "--config", cfg)
    return c


def _boxes_ok(b: np.ndarray, h: int = 120, w: int = 160) -> bool:
    return (b.ndim == 2 and b.shape[1] == 4 and b.dtype == np.float32
            and (b[:, 2:] > b[:, :2]).all() and (b >= 0).all()
            and (b[:, [0, 2]] <= w).all() and (b[:, [1, 3]] <= h).all())


# ---------------------------------------------------------------- propose
@pytest.mark.parametrize("method,strategy", [
    ("selective_search", "single"), ("selective_search", "fast"),
    ("selective_search", "quality"), ("opencv", "single"), ("opencv", "fast"),
    ("opencv", "quality"), ("sliding", None)])
def test_propose_methods_and_strategies(chain, tmp_path, method, strategy):
    args = ["propose", chain["img"], "-o", tmp_path, "--method", method, "--top-k", 12,
            "--config", chain["cfg"]]
    run(*args, *(["--strategy", strategy] if strategy else []))
    for name in ("a.png", "b.png"):
        z = np.load(tmp_path / f"{name}.npz")
        assert _boxes_ok(z["boxes"]) and 0 < len(z["boxes"]) <= 12
        assert (np.diff(z["scores"]) <= 0).all()  # best first
    settings = json.loads((tmp_path / "manifest.json").read_text())["settings"]
    assert settings["method"] == method
    if strategy:  # the strategy reaches the back-end (OpenCV calls it mode)
        assert settings["mode" if method == "opencv" else "strategy"] == strategy


@pytest.mark.parametrize("flag,value", [("--strategy", "quality"), ("--max-side", "64"),
                                        ("--seed", "3")])
def test_propose_selective_search_flags_with_sliding_are_warned(chain, tmp_path, flag, value):
    """Sliding windows take no strategy, resizing or seed: a flag that would do nothing
    gets one warning line naming it (was silent), and the boxes are made as without it."""
    r = run("propose", chain["img"], "-o", tmp_path / "out", "--method", "sliding", flag,
            value, "--top-k", 12)
    lines = [x for x in r.output.splitlines() if flag in x]
    assert len(lines) == 1 and "sliding" in lines[0], r.output
    run("propose", chain["img"], "-o", tmp_path / "ref", "--method", "sliding", "--top-k", 12)
    for name in ("a.png.npz", "b.png.npz"):
        np.testing.assert_array_equal(np.load(tmp_path / "out" / name)["boxes"],
                                      np.load(tmp_path / "ref" / name)["boxes"])
    r = run("propose", chain["img"], "-o", tmp_path / "ss", "--method", "opencv", flag,
            value, "--top-k", 12)
    assert flag not in r.output


# ---------------------------------------------------------------- extract
@pytest.mark.parametrize("mode,dtype", [("auto", "float16"), ("warp", "float16"),
                                        ("shared", "float16"), ("shared", "float32")])
def test_extract_modes_and_dtypes(chain, tmp_path, mode, dtype):
    run("extract", chain["img"], "--proposals", chain["props"], "--annotations", chain["ann"],
        "-o", tmp_path, "--backbone", "resnet18", "--weights", "random", "--mode", mode,
        "--dtype", dtype, "--config", chain["cfg"])
    for name in ("a.png", "b.png"):
        z = np.load(tmp_path / f"{name}.npz")
        assert z["features"].dtype == np.dtype(dtype) and z["features"].shape[1] == 512
        assert len(z["features"]) == len(z["boxes"]) and np.isfinite(z["features"]).all()
        assert sorted(z["gt_label"][:3]) == [0, 1, 2] and (z["gt_label"][3:] == -1).all()
    settings = json.loads((tmp_path / "manifest.json").read_text())["settings"]
    assert settings["extractor"]["mode"] == ("shared" if mode == "auto" else mode)


def test_extract_shared_scale_reaches_features_and_detect(chain, tmp_path):
    """extract.shared_scale (small objects: a larger shared pass) changes the features, is
    recorded in the stage and the model, and detect extracts at the same scale; the default
    leaves the extractor settings (and so existing cache keys) as they were."""
    cfg = tmp_path / "s.toml"
    cfg.write_text(chain["cfg"].read_text().replace("[extract]\n",
                                                    "[extract]\nshared_scale = [64, 96]\n"))
    feats, model, det = tmp_path / "f", tmp_path / "m", tmp_path / "d"
    run("extract", chain["img"], "--proposals", chain["props"], "--annotations", chain["ann"],
        "-o", feats, "--backbone", "resnet18", "--weights", "random", "--config", cfg)
    s = json.loads((feats / "manifest.json").read_text())["settings"]
    assert s["features"]["shared_scale"] == [64, 96] and s["extractor"]["shared_scale"] == [64, 96]
    base = json.loads((chain["feats"] / "manifest.json").read_text())["settings"]
    assert "shared_scale" not in base["extractor"]
    a, b = np.load(feats / "a.png.npz"), np.load(chain["feats"] / "a.png.npz")
    assert np.array_equal(a["boxes"], b["boxes"]) and not np.allclose(a["features"], b["features"])
    run("train-svm", "--features", feats, "-o", model, "--config", cfg)
    run("detect", chain["img"], "--model", model, "-o", det, "--config", cfg)
    from rcnn_cli.detect import model_extractor_kwargs
    from rcnn_cli.model import load_model
    assert model_extractor_kwargs(load_model(model), model, "cpu")["shared_scale"] == [64, 96]
    cfg.write_text("[extract]\nshared_scale = [480]\n")
    r = run("extract", chain["img"], "--proposals", chain["props"], "-o", tmp_path / "bad",
            "--config", cfg, code=2)
    assert "extract.shared_scale" in r.output and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("keep", ["all", "train"])
def test_extract_keep_choices(chain, tmp_path, keep):
    """--keep all stores every window; --keep train the ground truth, every window near it
    (IoU >= keep_near_iou) and keep_background others: those rows of the full store, with the
    same features."""
    cfg = tmp_path / "keep.toml"
    cfg.write_text(chain["cfg"].read_text().replace(  # tiny images: most windows are near
        "[extract]\n", "[extract]\nkeep_near_iou = 0.5\nkeep_background = 1\n"))
    full, out = tmp_path / "full", tmp_path / "out"
    common = [chain["img"], "--proposals", chain["props"], "--annotations", chain["ann"],
              "--backbone", "resnet18", "--weights", "random", "--config", cfg]
    run("extract", *common, "-o", full, "--keep", "all")
    run("extract", *common, "-o", out, "--keep", keep)
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert settings.get("keep", {"keep": "all"})["keep"] == keep
    for name in ("a.png", "b.png"):
        f, z = np.load(full / f"{name}.npz"), np.load(out / f"{name}.npz")
        if keep == "all":
            assert "kept_rows" not in z.files and len(z["boxes"]) == len(f["boxes"])
            continue
        idx = z["kept_rows"]
        assert int(z["num_windows"]) == len(f["boxes"]) and len(idx) < len(f["boxes"])
        assert np.array_equal(z["boxes"], f["boxes"][idx])
        assert np.array_equal(z["gt_label"], f["gt_label"][idx])
        np.testing.assert_allclose(z["features"].astype(np.float32),
                                   f["features"][idx].astype(np.float32), atol=1e-2)
        near = np.flatnonzero(box_iou(f["boxes"], f["gt_boxes"]).max(1) >= 0.5)
        assert set(near.tolist()) <= set(idx.tolist())  # every GT and near window
        assert len(idx) - len(near) <= 1  # and one background window
    run("train-svm", "--features", out, "-o", tmp_path / "model", "--config", cfg)
    stats = json.loads((tmp_path / "model" / "model.json").read_text())["training_stats"]
    assert stats["features_keep"]["keep"] == keep


def test_extract_keep_near_iou_default_is_resolved_by_dataset_size(chain, tmp_path):
    """keep_near_iou = 0 (default): a 2-image dataset stores every window at IoU >= 0.1 and
    says so in the store's settings (its key) and in the run record."""
    out = tmp_path / "f"
    run("extract", chain["img"], "--proposals", chain["props"], "--annotations", chain["ann"],
        "-o", out, "--backbone", "resnet18", "--weights", "random", "--config", chain["cfg"])
    keep = json.loads((out / "manifest.json").read_text())["settings"]["keep"]
    assert keep["keep"] == "train" and keep["near_iou"] == 0.1
    record = json.loads((out / "run.json").read_text())["runs"]["extract"]
    assert record["resolved"]["keep"] == keep
    for name in ("a.png", "b.png"):
        z = np.load(out / f"{name}.npz")
        props = np.load(chain["props"] / f"{name}.npz")["boxes"]
        windows = np.concatenate([z["gt_boxes"], props])  # the full list: ground truth first
        assert int(z["num_windows"]) == len(windows)
        near = np.flatnonzero(box_iou(windows, z["gt_boxes"]).max(1) >= 0.1)
        assert set(near.tolist()) <= set(z["kept_rows"].tolist())
        assert np.array_equal(z["boxes"], windows[z["kept_rows"]])


def test_extract_keep_near_iou_is_resolved_before_the_shards(chain, tmp_path, monkeypatch):
    """Every shard resolves keep_near_iou = 0 from the whole annotated set, not its slice:
    with the threshold at 1 image, both 1-image shards of the 2 images store at IoU 0.3."""
    from rcnn_cli import compact

    monkeypatch.setattr(compact, "AUTO_MAX_IMAGES", 1)
    out = tmp_path / "f"
    for shard in ("0/2", "1/2"):
        run("extract", chain["img"], "--proposals", chain["props"], "--annotations",
            chain["ann"], "-o", out, "--backbone", "resnet18", "--weights", "random",
            "--config", chain["cfg"], "--shard", shard)
        keep = json.loads((out / "manifest.json").read_text())["settings"]["keep"]
        assert keep["near_iou"] == 0.3, shard
    assert sorted(p.name for p in out.glob("*.npz")) == ["a.png.npz", "b.png.npz"]


def test_extract_store_is_recomputed_when_keep_changes(chain, tmp_path):
    common = [chain["img"], "--proposals", chain["props"], "--annotations", chain["ann"],
              "-o", tmp_path / "f", "--backbone", "resnet18", "--weights", "random"]
    cfgs = []
    for bg in (1, 2):
        c = tmp_path / f"bg{bg}.toml"
        c.write_text(chain["cfg"].read_text().replace("[extract]\n",
                                                      f"[extract]\nkeep_background = {bg}\n"))
        cfgs.append(c)
    run("extract", *common, "--keep", "train", "--config", cfgs[0])
    key = json.loads((tmp_path / "f" / "manifest.json").read_text())["key"]
    for args in (["--keep", "all", "--config", cfgs[0]], ["--keep", "train", "--config", cfgs[1]]):
        r = run("extract", *common, *args, code=2)  # refused, never mixed
        assert "other settings" in r.output
        r = run("extract", *common, *args, "--overwrite")
        assert "2 done, 0 already done" in r.output  # recomputed
        new = json.loads((tmp_path / "f" / "manifest.json").read_text())["key"]
        assert new != key
        key = new
    z = np.load(tmp_path / "f" / "a.png.npz")
    assert len(z["kept_rows"]) == len(z["boxes"]) and (z["gt_label"] >= 0).sum() == 3


# ---------------------------------------------------------------- finetune
@pytest.mark.parametrize("mode", ["warp", "shared", "auto"])  # auto = shared on a CPU
def test_finetune_modes(chain, tmp_path, mode):
    r = run("finetune", "--annotations", chain["ann"], "--proposals", chain["props"],
            "-o", tmp_path, "--backbone", "resnet18", "--weights", "random", "--mode", mode,
            "--iterations", 2, "--device", "cpu", "--config", chain["cfg"])
    assert (tmp_path / "backbone.safetensors").is_file()
    assert "0%|" not in r.output  # progress bars only on a terminal
    assert Path(r.stdout.strip().splitlines()[-1]) == tmp_path / "backbone.safetensors"
    recipe = json.loads((tmp_path / "finetune.json").read_text())
    assert recipe["settings"]["mode"] == ("shared" if mode == "auto" else mode)


def test_finetune_refuses_proposals_of_a_changed_image(chain, tmp_path):
    """An image edited after `rcnn propose`: finetune names it instead of training on the old
    image's boxes (extract's staleness check, issue 15)."""
    img = tmp_path / "imgs"
    shutil.copytree(chain["img"], img)
    run("propose", img, "-o", tmp_path / "props", "--config", chain["cfg"])
    im = np.array(Image.open(img / "b.png"))
    Image.fromarray(255 - im).save(img / "b.png")  # same name, new pixels
    r = run("finetune", "--annotations", img / "ann.csv", "--proposals", tmp_path / "props",
            "-o", tmp_path / "ft", "--backbone", "resnet18", "--weights", "random",
            "--iterations", 1, "--config", chain["cfg"], code=1)
    assert "b.png" in r.output and "rcnn propose" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- train-svm
@pytest.mark.parametrize("solver", ["liblinear", "torch"])
@pytest.mark.parametrize("head", ["auto", "fc", "none"])
def test_train_svm_solvers_and_heads(chain, tmp_path, solver, head):
    r = run("train-svm", "--features", chain["feats"], "-o", tmp_path, "--solver", solver,
            "--head", head, "--config", chain["cfg"])
    assert "it/s" not in r.output  # the head's progress bar only on a terminal
    meta = json.loads((tmp_path / "model.json").read_text())
    assert sorted(meta["classes"]) == sorted(CLASSES) and meta["training_stats"]["train_svm"]["solver"] == solver
    assert (meta["head"] is not None) == (head == "fc")  # resnet18 `pool`: auto = no head
    with np.load(tmp_path / "model.npz") as z:
        assert z["svm_weights"].shape[0] == 3 and "regressors" in z.files


def test_train_svm_without_bbox_regression(chain, tmp_path):
    run("train-svm", "--features", chain["feats"], "-o", tmp_path, "--no-bbox-regression",
        "--config", chain["cfg"])
    with np.load(tmp_path / "model.npz") as z:
        assert "regressors" not in z.files


# ---------------------------------------------------------------- detect
def _csv_rows(path: Path) -> list[list[str]]:
    return [ln.split(",") for ln in path.read_text().splitlines()[1:] if ln]


@pytest.mark.parametrize("formats", ["csv", "coco", "voc", "yolo", "csv,coco,voc,yolo"])
def test_detect_formats(chain, tmp_path, formats):
    run("detect", chain["img"], "--model", chain["model"], "-o", tmp_path, "--formats", formats,
        "--config", chain["cfg"])
    chosen = formats.split(",")
    assert (tmp_path / "detections.csv").is_file() == ("csv" in chosen)
    assert (tmp_path / "detections.json").is_file() == ("coco" in chosen)
    assert (tmp_path / "voc").is_dir() == ("voc" in chosen)
    assert (tmp_path / "yolo").is_dir() == ("yolo" in chosen)
    if "csv" in chosen:
        rows = _csv_rows(tmp_path / "detections.csv")
        assert {r[0] for r in rows} <= {"a.png", "b.png"} and {r[1] for r in rows} <= set(CLASSES)
    if "coco" in chosen:
        dets = json.loads((tmp_path / "detections.json").read_text())
        assert all(len(d["bbox"]) == 4 for d in dets)
    if "voc" in chosen:
        assert sorted(p.name for p in (tmp_path / "voc").iterdir()) and all(
            p.suffix == ".txt" for p in (tmp_path / "voc").iterdir())
    if "yolo" in chosen:
        for p in (tmp_path / "yolo").rglob("*.txt"):
            for ln in p.read_text().splitlines():
                v = [float(x) for x in ln.split()[1:5]]
                assert all(0 <= x <= 1 for x in v)


def _to_proposal(chain, row: list[str]) -> float:
    """Distance (pixels, max over coordinates) from a CSV detection to its nearest proposal."""
    props = np.load(chain["props"] / (row[0] + ".npz"))["boxes"]
    box = np.array([float(v) for v in row[3:7]], np.float32)
    return float(np.abs(props - box).max(1).min())


@pytest.mark.parametrize("flags", [["--save-vis", "--device", "auto"],
                                   ["--no-bbox-regression", "--box-vote-iou", "0",
                                    "--executor", "local"],
                                   ["--device", "cpu"], ["--nms", "hard"],
                                   ["--nms", "soft"], ["--box-vote-iou", "0"]])
def test_detect_flags(chain, tmp_path, flags):
    """The defaults are soft-NMS + box voting at 0.5 (chosen by CV); each flag value moves the
    output the way it should against the default run."""
    run("detect", chain["img"], "--model", chain["model"], "-o", tmp_path,
        "--config", chain["cfg"], *flags)
    rows = _csv_rows(tmp_path / "detections.csv")
    ref = _csv_rows(chain["det"] / "detections.csv")
    if "--save-vis" in flags:
        assert sorted(p.name for p in (tmp_path / "vis").iterdir())[:2] and all(
            Image.open(p).size == (160, 120) for p in (tmp_path / "vis").iterdir())
    if "--no-bbox-regression" in flags:  # every box is one of the image's proposals
        assert rows and max(_to_proposal(chain, r) for r in rows) < 0.01
        assert max(_to_proposal(chain, r) for r in ref) > 0.01  # regression moves boxes
    elif "hard" in flags:  # greedy NMS removes the overlaps soft-NMS keeps lower down
        assert 0 < len(rows) <= len(ref) and rows[0][:3] == ref[0][:3]
    elif "--box-vote-iou" in flags:  # same detections and scores, boxes not voted
        assert [r[:3] for r in rows] == [r[:3] for r in ref]
        assert any(r[3:] != q[3:] for r, q in zip(rows, ref))
    else:
        assert rows == ref


def test_detect_proposals_flag_reads_the_propose_folder(chain, tmp_path):
    """--proposals: the chain's own propose folder (the model's settings) gives the chain's
    detections; a folder whose boxes were changed gives detections from those boxes."""
    run("detect", chain["img"], "--model", chain["model"], "-o", tmp_path / "a",
        "--config", chain["cfg"], "--proposals", chain["props"])
    assert (tmp_path / "a" / "detections.csv").read_text() == \
        (chain["det"] / "detections.csv").read_text()
    # the same folder with only each image's first 3 boxes (rewritten by `rcnn propose`
    # at top_k 3): every detection now comes from one of those 3 windows
    fewer = tmp_path / "fewer.toml"
    fewer.write_text(chain["cfg"].read_text().replace("top_k = 12", "top_k = 3"))
    run("propose", chain["img"], "-o", tmp_path / "p3", "--config", fewer)
    r = run("detect", chain["img"], "--model", chain["model"], "-o", tmp_path / "b",
            "--config", chain["cfg"], "--proposals", tmp_path / "p3", "--no-bbox-regression",
            "--box-vote-iou", "0")
    assert "may be worse" in r.output
    rows = _csv_rows(tmp_path / "b" / "detections.csv")
    assert rows
    for row in rows:
        p3 = np.load(tmp_path / "p3" / (row[0] + ".npz"))["boxes"]
        assert len(p3) == 3
        box = np.array([float(v) for v in row[3:7]], np.float32)
        assert float(np.abs(p3 - box).max(1).min()) < 0.01


def test_detect_proposals_flag_refuses_a_wrong_folder(chain, tmp_path):
    """--proposals naming a folder that is not `rcnn propose` output, or an -o inside it:
    one line naming the folder, before any work, and nothing written there."""
    r = run("detect", chain["img"], "--model", chain["model"], "-o", tmp_path / "a",
            "--config", chain["cfg"], "--proposals", chain["feats"], code=1)
    assert str(chain["feats"]) in r.output and "expected propose" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "a" / "per_image").exists()
    inside = chain["props"] / "det"
    r = run("detect", chain["img"], "--model", chain["model"], "-o", inside,
            "--config", chain["cfg"], "--proposals", chain["props"], code=2)
    assert "--proposals" in r.output and not inside.exists()


def test_missing_upstream_reasons_name_the_cause(chain, tmp_path):
    """The failure line of an image without up-to-date proposals says why: unreadable, not
    proposed, or proposed from an older version of it."""
    import os

    from rcnn_cli.images import ImageItem
    from rcnn_cli.stages import upstream_missing_reason
    from rcnn_cli.store import open_upstream

    up = open_upstream(chain["props"], "propose")
    gone = ImageItem(tmp_path / "gone.png", "gone.png")
    assert upstream_missing_reason(up, gone).startswith("cannot read the image")
    new = tmp_path / "new.png"
    shutil.copy(chain["img"] / "a.png", new)
    assert upstream_missing_reason(up, ImageItem(new, "new.png")) == f"no proposals in {up.root}"
    old = tmp_path / "a.png"
    shutil.copy(chain["img"] / "a.png", old)
    os.utime(old, ns=(0, 10**9))
    assert upstream_missing_reason(up, ImageItem(old, "a.png")).startswith(
        "proposals made from an older version of this image")


def test_detect_nms_iou_without_hard_nms_is_warned(chain, tmp_path):
    """--nms-iou is the IoU of greedy NMS: with soft-NMS (the default) it does nothing, and
    one line says so (issue 15); with --nms hard no such line."""
    r = run("detect", chain["img"], "--model", chain["model"], "-o", tmp_path / "soft",
            "--config", chain["cfg"], "--nms-iou", "0.6")
    lines = [x for x in r.output.splitlines() if "--nms-iou" in x]
    assert len(lines) == 1 and "--nms hard" in lines[0], r.output
    assert _csv_rows(tmp_path / "soft" / "detections.csv") == \
        _csv_rows(chain["det"] / "detections.csv")
    r = run("detect", chain["img"], "--model", chain["model"], "-o", tmp_path / "hard",
            "--config", chain["cfg"], "--nms-iou", "0.6", "--nms", "hard")
    assert "--nms-iou" not in r.output


def test_detect_rerun_draws_missing_pictures_and_drops_stale_formats(chain, tmp_path):
    # regressions from review: a rerun with --save-vis found every image "done" and drew
    # nothing; a rerun with fewer --formats left the old run's detections.json, which
    # evaluate then scored
    out = tmp_path / "det"
    shutil.copytree(chain["det"], out)
    assert not (out / "vis").exists() and (out / "detections.json").is_file()
    run("detect", chain["img"], "--model", chain["model"], "-o", out, "--config", chain["cfg"],
        "--save-vis", "--formats", "csv")
    assert sorted(p.name for p in (out / "vis").iterdir()) == ["a.png.jpg", "b.png.jpg"]
    assert not (out / "detections.json").exists() and not (out / "images.json").exists()
    assert (out / "detections.csv").is_file()


def test_detect_shards_cover_the_images_once(chain, tmp_path):
    for i in range(2):
        run("detect", chain["img"], "--model", chain["model"], "-o", tmp_path / str(i),
            "--shard", f"{i}/2", "--config", chain["cfg"])
    done = [sorted(p.name for p in (tmp_path / str(i) / "per_image").glob("*.npz"))
            for i in range(2)]
    assert len(done[0]) == len(done[1]) == 1 and set(done[0] + done[1]) == {"a.png.npz", "b.png.npz"}


# ---------------------------------------------------------------- evaluate
def test_evaluate_detections_and_proposals(chain, tmp_path):
    run("evaluate", "--annotations", chain["ann"], "--detections", chain["det"],
        "-o", tmp_path / "d")
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert 0 <= m["mAP_voc07"] <= 1
    run("evaluate", "--annotations", chain["ann"], "--proposals", chain["props"],
        "-o", tmp_path / "p")
    m = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert json.dumps(m).count("recall") and "summary" in m


def test_evaluate_imports_no_torch(chain, tmp_path):
    """evaluate's IoU is numpy (boxes.box_iou): the command starts without torch or
    torchvision (their import was 4-5 s of its start-up), diagnosis and proposals included."""
    _, runs, after = cli_in_fresh_python(
        ["evaluate", "--annotations", chain["ann"], "--detections", chain["det"],
         "-o", tmp_path / "d", "--diagnose"],
        ["evaluate", "--annotations", chain["ann"], "--proposals", chain["props"],
         "-o", tmp_path / "p"])
    assert [c for c, _ in runs] == [0, 0] and not {"torch", "torchvision"} & set(after)
    assert all((tmp_path / d / "metrics.json").is_file() for d in "dp")


def test_detect_refuses_a_stale_output_folder_before_importing_torch(chain, tmp_path):
    """regression: `detect -o` of an earlier run with other post-processing settings was
    refused only once torch and the backbone had loaded (~4-7 s); now before either, and
    the folder is left as it was."""
    out = tmp_path / "det"
    shutil.copytree(chain["det"], out)
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    _, runs, after = cli_in_fresh_python(
        ["detect", chain["img"], "--model", chain["model"], "-o", out, "--config", chain["cfg"],
         "--nms", "hard", "--nms-iou", "0.5"])
    (code, output), = runs
    assert code == 2 and "other settings (post)" in output and "--overwrite" in output
    assert "Traceback" not in output and not {"torch", "torchvision"} & set(after)
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_evaluate_never_replaces_a_metrics_file_in_a_given_folder(chain, tmp_path):
    """regression: `evaluate -o DIR` replaced DIR/metrics.json (maybe the user's) silently."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.json").write_text("user's file")
    r = run("evaluate", "--annotations", chain["ann"], "--detections", chain["det"],
            "-o", out, code=2)
    assert "metrics.json" in r.output and "--overwrite" in r.output
    assert (out / "metrics.json").read_text() == "user's file"
    run("evaluate", "--annotations", chain["ann"], "--detections", chain["det"],
        "-o", out, "--overwrite")
    assert "mAP_voc07" in json.loads((out / "metrics.json").read_text())
    # the default place is detect's own folder: re-evaluating there needs no flag
    for _ in range(2):
        run("evaluate", "--annotations", chain["ann"], "--detections", chain["det"])


def test_detect_coco_ids_are_the_users(chain, tmp_path):
    """--coco-ids: detections.json carries the user's image and category ids, so the user's
    own instances file scores it (same AP as our own ids against the CSV ground truth)."""
    from rcnn_cli.datasets import load_dataset

    ds = load_dataset(chain["ann"])
    coco = {"images": [], "annotations": [],
            "categories": [{"id": 10 + 3 * i, "name": n} for i, n in enumerate(CLASSES[::-1])]}
    cid = {c["name"]: c["id"] for c in coco["categories"]}
    for n, r in enumerate(ds.records):
        coco["images"].append({"id": 100 + n, "file_name": r.file_name, "height": r.height,
                               "width": r.width})
        for b, lab in zip(r.boxes, r.labels):
            x1, y1, x2, y2 = (float(v) for v in b)
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": 100 + n,
                                        "category_id": cid[ds.classes[lab]], "iscrowd": 0,
                                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                                        "area": (x2 - x1) * (y2 - y1)})
    gt = tmp_path / "instances.json"
    gt.write_text(json.dumps(coco))
    out = tmp_path / "det"
    run("detect", chain["img"], "--model", chain["model"], "-o", out, "--config", chain["cfg"],
        "--coco-ids", gt)
    dets = json.loads((out / "detections.json").read_text())
    assert dets and {d["image_id"] for d in dets} <= {100, 101}
    assert {d["category_id"] for d in dets} <= set(cid.values())
    cats = json.loads((out / "categories.json").read_text())
    assert {c["name"]: c["id"] for c in cats} == cid
    ours = tmp_path / "ours"
    shutil.copytree(chain["det"], ours)
    for d in (out, ours):  # evaluate reads the COCO files
        (d / "detections.csv").unlink()
    run("evaluate", "--annotations", gt, "--detections", out, "-o", tmp_path / "e1")
    run("evaluate", "--annotations", chain["ann"], "--detections", ours, "-o", tmp_path / "e2")
    m1, m2 = (json.loads((tmp_path / e / "metrics.json").read_text()) for e in ("e1", "e2"))
    assert m1["mAP_voc"] == pytest.approx(m2["mAP_voc"])
    assert m1["coco"]["AP"] == pytest.approx(m2["coco"]["AP"])
    # a model class the file does not name: one line, before any work
    coco["categories"] = coco["categories"][:1]
    gt.write_text(json.dumps(coco))
    r = run("detect", chain["img"], "--model", chain["model"], "-o", tmp_path / "det2",
            "--coco-ids", gt, code=1)
    assert "no category named" in r.output and not (tmp_path / "det2" / "per_image").exists()
    # a file that is not COCO has no ids to give: one line, before any work
    r = run("detect", chain["img"], "--model", chain["model"], "-o", tmp_path / "det3",
            "--coco-ids", chain["ann"], code=1)
    assert "needs a COCO" in r.output and not (tmp_path / "det3" / "per_image").exists()


# ---------------------------------------------------------------- errors before any work
def _copy_model(chain, tmp_path, edit) -> Path:
    d = tmp_path / "m"
    shutil.copytree(chain["model"], d)
    meta = json.loads((d / "model.json").read_text())
    edit(meta)
    (d / "model.json").write_text(json.dumps(meta))
    return d


def _detect(chain, model, out, *flags, code):
    return run("detect", chain["img"], "--model", model, "-o", out, "--config", chain["cfg"],
               *flags, code=code)


def test_detect_dense_needs_a_grid_model(chain, tmp_path):
    """--dense densifies shared-mode mobilenet_v2 'grid' features only: the chain's resnet18
    model is refused with exit 2, naming the flag and the model's tap, before any work."""
    r = _detect(chain, chain["model"], tmp_path / "o", "--dense", code=2)
    assert "--dense" in r.output and "'grid'" in r.output and "resnet18" in r.output
    assert not (tmp_path / "o" / "per_image").exists()


def test_bogus_format_is_refused_before_any_work(chain, tmp_path):
    r = _detect(chain, chain["model"], tmp_path / "o", "--formats", "csv,bogus", code=2)
    assert "--formats" in r.output and "bogus" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_detect_device_cuda_without_cuda_says_so(chain, tmp_path):
    r = _detect(chain, chain["model"], tmp_path / "o", "--device", "cuda", code=2)
    assert "--device" in r.output and "CUDA is not available" in r.output
    assert "--formats" not in r.output and not (tmp_path / "o" / "per_image").exists()


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m["extract_settings"]["extractor"].update(backbone="foo"), "foo"),
    (lambda m: m["extract_settings"].pop("extractor"), "extractor"),
    (lambda m: m["detection"].update(max_detections=-1), "detection.max_detections"),
    (lambda m: m["detection"].update(nms_iou=7.5), "detection.nms_iou"),
])
def test_bad_model_bundle_is_one_line_naming_the_file(chain, tmp_path, edit, needle):
    model = _copy_model(chain, tmp_path, edit)
    r = _detect(chain, model, tmp_path / "o", code=1)
    assert needle in r.output and "model.json" in r.output
    assert "--formats" not in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o" / "per_image").exists()


def test_detect_max_per_image_flag_and_config_ranges(chain, tmp_path):
    r = _detect(chain, chain["model"], tmp_path / "o", "--max-per-image", "-1", code=2)
    assert "--max-per-image" in r.output
    cfg = tmp_path / "c.toml"
    cfg.write_text("[detect]\nmax_per_image = -1\n")
    r = run("detect", chain["img"], "--model", chain["model"], "-o", tmp_path / "o",
            "--config", cfg, code=2)
    assert "detect.max_per_image" in r.output


def test_train_svm_into_existing_model_is_refused_before_training(chain, tmp_path,
                                                                  monkeypatch):
    from rcnn_cli import train

    def no_training(*a, **kw):
        raise AssertionError("trained before refusing")

    monkeypatch.setattr(train, "train_svms", no_training)
    monkeypatch.setattr(train, "train_head", no_training)
    model = tmp_path / "m"
    shutil.copytree(chain["model"], model)
    r = run("train-svm", "--features", chain["feats"], "-o", model, "--config", chain["cfg"],
            code=2)
    assert "--overwrite" in r.output and "overwrite=True" not in r.output
