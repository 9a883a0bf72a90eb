"""Fine-tuning: window labels, mini-batch sampling, training, outputs, resume.

Training tests use a tiny registered backbone (a few conv layers with batch norm, stride 16,
laid out like MobileNetV2's ``features`` so that warp and shared mode both apply) on
synthetic images: flat red / blue rectangles (the two classes) on a noisy grey background.
A random-init MobileNetV2 is used only where the real key names matter (its activations
vanish with frozen random batch norm, so it cannot learn in a few steps).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import rcnn_cli.finetune as ft
from rcnn_cli.datasets import Dataset, ImageRecord
from rcnn_cli.features import BACKBONES, BackboneSpec, FeatureExtractor, load_backbone
from rcnn_cli.store import StageStore, StaleStoreError

COLOURS = [(220, 40, 40), (40, 60, 220)]  # class 0 red, class 1 blue


class TinyNet(nn.Module):
    """Stride-16 trunk in ``features[:14]`` and a head in ``features[14:]`` (MobileNetV2's
    layout); a 10-way ``classifier`` that fine-tuning must leave in the saved state dict."""

    def __init__(self, weights=None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in [(3, 8), (8, 16), (16, 16), (16, 24)]:
            layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU()]
        layers += [nn.Identity(), nn.Identity()]  # 14 layers of stride 16
        layers += [nn.Conv2d(24, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(32, 10)
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
        nn.init.constant_(self.features[15].weight, 20.0)  # feature norms ~ MobileNetV2's


@pytest.fixture(autouse=True)
def tiny_backbone(monkeypatch):
    monkeypatch.setitem(BACKBONES, "tiny", BackboneSpec(TinyNet, None, 32, {"pool": 32}, "pool",
                                                        16, 4, "align"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_dataset(root: Path, n: int = 6, h: int = 64, w: int = 80, seed: int = 0
                 ) -> tuple[Dataset, dict[str, np.ndarray]]:
    """``n`` PNGs with one red and one blue rectangle each, and proposals: jittered copies of
    the ground truth plus random boxes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    records, props = [], {}
    for k in range(n):
        img = rng.integers(90, 140, (h, w, 3)).astype(np.uint8)
        boxes = []
        for c in range(2):  # one rectangle in each half (no overlap), sides alternate
            bw, bh = rng.integers(18, 30, 2)
            x1, y1 = rng.integers(0, w // 2 - bw) + (k + c) % 2 * w // 2, rng.integers(0, h - bh)
            img[y1:y1 + bh, x1:x1 + bw] = COLOURS[c]
            boxes.append([x1, y1, x1 + bw, y1 + bh])
        name = f"img{k}.png"
        cv2.imwrite(str(root / name), np.ascontiguousarray(img[:, :, ::-1]))
        b = np.array(boxes, np.float32)
        jit = np.repeat(b, 8, 0) + rng.normal(0, 2.5, (16, 4)).astype(np.float32)
        xy = rng.uniform(0, [w - 12, h - 12], (40, 2))
        rnd = np.concatenate([xy, np.minimum(xy + rng.uniform(8, 40, (40, 2)), [w, h])], 1)
        props[name] = np.concatenate([jit, rnd]).astype(np.float32)
        records.append(ImageRecord(name, h, w, b, np.array([0, 1], np.int64), np.zeros(2, bool)))
    return Dataset(records, ["red", "blue"], root), props


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ftdata"))


TINY = {"backbone": "tiny", "weights": "random", "device": "cpu", "batch_size": 16,
        "fg_per_batch": 4, "images_per_batch": 2, "padding": 4, "shared_scale": (64, 80),
        "lr": 0.003, "val_fraction": 0.2, "progress": False}


RUN_OPTIONS = ("device", "checkpoint_dir", "resume", "overwrite", "progress", "proposals_id",
               "time_limit")


def finetune(dataset, proposals, out, **kw):
    """ft.finetune with the keywords split into FinetuneSettings and run options."""
    run = {k: kw.pop(k) for k in RUN_OPTIONS if k in kw}
    return ft.finetune(dataset, proposals, out, ft.FinetuneSettings(**kw), **run)


def state_of(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------ labels and sampling
def test_label_windows_by_iou_half():
    gt = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    props = np.array([[0, 0, 10, 5],      # IoU 0.5 with gt 0 -> class 0 (label 1)
                      [0, 0, 10, 4.9],    # IoU 0.49 -> background
                      [50, 50, 60, 60],   # = gt 1 -> class 1 (label 2)
                      [20, 20, 30, 30],   # no overlap -> background
                      [5, 5, 5, 9]],      # zero area -> dropped
                     np.float32)
    w, lab, iou = ft.label_windows(gt, np.array([0, 1]), props)
    assert w.shape == (6, 4)
    np.testing.assert_array_equal(w[:2], gt)  # ground truth first
    np.testing.assert_array_equal(lab, [1, 2, 1, 0, 2, 0])
    np.testing.assert_allclose(iou, [1, 1, 0.5, 0.49, 1, 0], atol=1e-6)


def test_label_windows_difficult_and_empty():
    gt = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    props = np.array([[0, 0, 10, 10], [50, 50, 60, 58]], np.float32)
    w, lab, _ = ft.label_windows(gt, [0, 1], props, gt_difficult=[False, True])
    assert len(w) == 3  # the difficult box is no window
    np.testing.assert_array_equal(lab, [1, 1, -1])  # near the difficult object: ignored
    w, lab, _ = ft.label_windows(np.zeros((0, 4)), [], props)
    np.testing.assert_array_equal(lab, [0, 0])
    with pytest.raises(ValueError, match="gt_labels"):
        ft.label_windows(gt, [0], props)


def test_sample_rois_32_96_split_and_fewer_positives():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(100, np.int64), np.zeros(1000, np.int64), -np.ones(50, np.int64)]
    pick = ft.sample_rois(labels, 128, 32, rng)
    assert len(pick) == 128 and len(set(pick.tolist())) == 128
    assert (labels[pick[:32]] > 0).all() and (labels[pick[32:]] == 0).all()
    # only 10 positives: all of them, background fills the batch
    labels = np.r_[np.full(10, 3), np.zeros(1000, np.int64)]
    pick = ft.sample_rois(labels, 128, 32, rng)
    assert (labels[pick] > 0).sum() == 10 and len(pick) == 128
    # too few of both: a smaller batch
    pick = ft.sample_rois(np.array([1, 0, 0, -1]), 128, 32, rng)
    assert sorted(pick.tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="fg_per_batch"):
        ft.sample_rois(labels, 16, 32, rng)


def test_sampling_is_uniform_over_windows():
    labels = np.r_[np.ones(4, np.int64), np.zeros(4, np.int64)]
    rng = np.random.default_rng(1)
    counts = np.zeros(8)
    for _ in range(2000):
        counts[ft.sample_rois(labels, 4, 2, rng)] += 1
    np.testing.assert_allclose(counts / 2000, 0.5, atol=0.05)


# ------------------------------------------------------------------ training
@pytest.mark.parametrize("mode", ["warp", "shared"])
def test_finetune_lowers_loss_and_writes_outputs(data, tmp_path, mode):
    ds, props = data
    rng_before = torch.get_rng_state()
    res = finetune(ds, props, tmp_path / "ft", mode=mode, iterations=40, val_every=10,
                      input_size=32, **TINY)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    losses = res.train_losses
    assert len(losses) == 40 and np.isfinite(losses).all()
    # from ln 3 = 1.10 to well below 0.74, the loss of predicting the class frequencies
    # (1/4 foreground): the classes are told apart, not just the prior learnt
    assert np.mean(losses[:3]) > 0.9 and np.mean(losses[-8:]) < 0.6, losses
    assert [h["iteration"] for h in res.history] == [10, 20, 30, 40]
    assert res.best_val["val_loss"] == min(h["val_loss"] for h in res.history)
    assert max(h["val_acc_fg"] for h in res.history) > 0.2
    assert res.history[-1]["lr"] == pytest.approx(TINY["lr"] * 0.1)  # decayed at 2/3
    # the recipe
    recipe = json.loads(res.recipe_path.read_text())
    assert recipe["classes"] == ["red", "blue"] and recipe["iterations_done"] == 40
    assert recipe["settings"]["mode"] == mode and recipe["settings"]["frozen_batchnorm"]
    assert recipe["source_weights"] == "random:seed=0" and recipe["device"] == "cpu"
    assert recipe["exported_iteration"] == res.best_val["iteration"]
    assert not (tmp_path / "ft" / "checkpoint").exists()  # finished: checkpoints removed
    # the weights load as a backbone, with the torchvision model's own keys, and differ from
    # the random init; batch-norm statistics are frozen
    saved = state_of(res.weights_path)
    init = load_backbone("tiny", "random").state_dict()
    assert set(saved) == set(init)
    model = load_backbone("tiny", weights=res.weights_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])
    assert not torch.equal(saved["features.0.weight"], init["features.0.weight"])
    assert torch.equal(saved["features.1.running_mean"], init["features.1.running_mean"])
    torch.testing.assert_close(saved["classifier.weight"], init["classifier.weight"])
    # and the softmax scorer
    clf = ft.load_classifier(tmp_path / "ft")
    assert clf.weight.shape == (3, 32) and clf.classes == ["red", "blue"]
    ext = FeatureExtractor(**{**clf.features, "device": "cpu"})
    feats = ext.extract(cv2.imread(str(ds.image_path(ds.records[0])))[:, :, ::-1].copy(),
                        ds.records[0].boxes)
    p = clf.probabilities(feats)
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-5)
    assert clf.scores(feats).shape == (2, 2)
    with pytest.raises(ValueError, match="features must have shape"):
        clf.scores(np.zeros((1, 5)))


def test_mobilenet_v2_weights_load_with_load_backbone(data, tmp_path):
    ds, props = data
    res = finetune(ds, props, tmp_path / "ft", mode="shared", iterations=2, input_size=32,
                      **{**TINY, "backbone": "mobilenet_v2", "shared_scale": (32, 40)})
    saved = state_of(res.weights_path)
    model = load_backbone("mobilenet_v2", weights=res.weights_path)  # strict: no missing keys
    assert set(saved) == set(model.state_dict())
    assert saved["classifier.1.weight"].shape == (1000, 1280)  # ImageNet layer kept as is
    # shared mode defaults to the tap shared extraction uses (mobilenet_v2: grid)
    assert json.loads(res.recipe_path.read_text())["settings"]["tap"] == "grid"
    grid_dim = BACKBONES["mobilenet_v2"].taps["grid"]
    assert state_of(res.classifier_path)["weight"].shape == (3, grid_dim)


def test_resume_after_kill_reaches_the_same_weights(data, tmp_path, monkeypatch):
    ds, props = data
    kw = dict(mode="warp", iterations=6, val_every=3, checkpoint_every=2, input_size=32,
              **TINY)
    ref = finetune(ds, props, tmp_path / "ref", **kw)

    real_step, calls = ft._sgd_step, []

    def killed_at_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(ft, "_sgd_step", killed_at_5)
    with pytest.raises(KeyboardInterrupt):
        finetune(ds, props, tmp_path / "run", **kw)
    meta = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert meta["iteration"] == 4 and len(meta["train_losses"]) == 4
    assert not (tmp_path / "run" / "finetune.json").exists()
    monkeypatch.setattr(ft, "_sgd_step", real_step)
    calls.clear()
    res = finetune(ds, props, tmp_path / "run", **kw)
    assert res.train_losses == ref.train_losses
    assert res.history == [{**h, "seconds": r["seconds"]}
                           for h, r in zip(ref.history, res.history)]
    a, b = state_of(ref.weights_path), state_of(res.weights_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(state_of(ref.classifier_path)["weight"],
                       state_of(res.classifier_path)["weight"])
    # a finished run is returned without training; other settings are refused
    monkeypatch.setattr(ft, "_sgd_step", lambda *a, **k: pytest.fail("trained again"))
    again = finetune(ds, props, tmp_path / "run", **kw)
    assert again.train_losses == res.train_losses
    with pytest.raises(StaleStoreError, match="other settings"):
        finetune(ds, props, tmp_path / "run", **{**kw, "lr": 0.01})


def test_no_validation_exports_last_weights(data, tmp_path):
    ds, props = data
    res = finetune(ds, props, tmp_path / "ft", mode="warp", iterations=3, input_size=32,
                      **{**TINY, "val_fraction": 0.0})
    recipe = json.loads(res.recipe_path.read_text())
    assert res.best_val is None and res.history == [] and recipe["exported_iteration"] == 3
    assert recipe["train_images"] == 6 and recipe["val_images"] == 0


def test_time_limit_stops_validates_and_exports(data, tmp_path):
    ds, props = data
    res = finetune(ds, props, tmp_path / "ft", mode="shared", iterations=50, input_size=32,
                      time_limit=0.0, **TINY)
    recipe = json.loads(res.recipe_path.read_text())
    assert recipe["stopped"] == "time_limit" and recipe["iterations_done"] == 1
    assert [h["iteration"] for h in res.history] == [1] and res.weights_path.is_file()


# ------------------------------------------------------------------ inputs
def test_bad_arguments(data, tmp_path):
    ds, props = data
    run = dict(TINY, iterations=1, input_size=32)
    with pytest.raises(ValueError, match="mode"):
        finetune(ds, props, tmp_path, **run, mode="crop")
    with pytest.raises(ValueError, match="fg_per_batch"):
        finetune(ds, props, tmp_path, **{**run, "fg_per_batch": 17})
    with pytest.raises(ValueError, match="val_fraction"):
        finetune(ds, props, tmp_path, **{**run, "val_fraction": 1.0})
    with pytest.raises(ValueError, match="backbone"):
        finetune(ds, props, tmp_path, **{**run, "backbone": "lenet"})
    with pytest.raises(ValueError, match="img0.png"):
        finetune(ds, {}, tmp_path, **run)
    with pytest.raises(TypeError, match="proposals"):
        finetune(ds, [1, 2], tmp_path, **run)
    far = {k: np.array([[0, 0, 2, 2]], np.float32) for k in props}
    no_gt = Dataset([ImageRecord(r.file_name, r.height, r.width) for r in ds.records],
                    ds.classes, ds.image_root)
    with pytest.raises(ValueError, match="no foreground window"):
        finetune(no_gt, far, tmp_path, **run)
    with pytest.raises(FileNotFoundError, match="classifier.safetensors"):
        ft.load_classifier(tmp_path / "nothing")


def test_stale_proposals_are_refused_naming_the_image(tmp_path):
    """An image changed (size or mtime) since `rcnn propose`: its proposals belong to the old
    image; with ``image_path`` the lookup says so, as extract does (issue 15)."""
    from rcnn_cli.store import file_identity

    ds, props = make_dataset(tmp_path / "imgs", n=2)
    store = StageStore.create(tmp_path / "props", "propose", {"method": "test"})
    for r in ds.records:
        store.save(r.file_name, {"boxes": props[r.file_name],
                                 "scores": np.zeros(len(props[r.file_name]), np.float32)},
                   source=file_identity(ds.image_path(r)))
    lookup = ft.proposals_from_dir(tmp_path / "props", image_path=ds.image_path)
    assert len(ft.build_windows(ds.records, lookup)) == 2  # current: used
    p = ds.image_path(ds.records[1])
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the image was edited
    with pytest.raises(ValueError, match=r"img1.png.*rcnn propose"):
        ft.build_windows(ds.records, lookup)


def test_proposals_from_a_propose_folder(data, tmp_path):
    ds, props = data
    store = StageStore.create(tmp_path / "props", "propose", {"method": "test"})
    for name, b in props.items():
        store.save(Path(name).stem, {"boxes": b, "scores": np.zeros(len(b), np.float32)})
    lookup = ft.proposals_from_dir(tmp_path / "props")
    np.testing.assert_array_equal(lookup(ds.records[1]), props["img1.png"])
    assert lookup.key == store.key  # becomes the run's proposals_id
    tables = ft.build_windows(ds.records[:2], lookup, max_proposals=5)
    assert [len(t.boxes) for t in tables] == [7, 7]  # 2 ground truth + 5 proposals
