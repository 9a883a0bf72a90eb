"""The public Python API (rcnn_cli.Detector, rcnn_cli.propose): the same results as the CLI.

A tiny model (two synthetic images, random-init resnet18) is built once through the CLI;
Detector on a path, an array and a PIL image must give exactly what `rcnn detect` wrote.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_cli_matrix import run, two_images

ROOT = Path(__file__).resolve().parents[1]

#: the tiny model is built once per process: keep these modules on one xdist worker
pytestmark = pytest.mark.xdist_group("api_chain")


_CHAIN: dict = {}


def tiny_chain(tmp_path_factory) -> dict:
    """Two images, propose -> extract -> train-svm -> detect through the CLI (built once per
    session; tests/test_runrecord.py reads the same folders)."""
    if _CHAIN:
        return _CHAIN
    root = tmp_path_factory.mktemp("api")
    img, ann, cfg = two_images(root)
    c = {"root": root, "img": img, "ann": ann, "cfg": cfg, "props": root / "props",
         "feats": root / "feats", "model": root / "model", "det": root / "det"}
    run("propose", img, "-o", c["props"], "--config", cfg)
    run("extract", img, "--proposals", c["props"], "--annotations", ann, "-o", c["feats"],
        "--backbone", "resnet18", "--weights", "random", "--config", cfg)
    run("train-svm", "--features", c["feats"], "-o", c["model"], "--config", cfg)
    run("detect", img, "--model", c["model"], "-o", c["det"], "--config", cfg,
        "--device", "cpu")
    _CHAIN.update(c)
    return c


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    return tiny_chain(tmp_path_factory)


def test_import_rcnn_cli_does_not_import_torch():
    code = ("import sys, rcnn_cli; from rcnn_cli import Detector, propose; "
            "print(sorted(m for m in ('torch', 'torchvision', 'numpy', 'cv2') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert "torch" not in out.stdout and "cv2" not in out.stdout, out.stdout
    import rcnn_cli

    assert {"Detector", "propose", "DetectionResult", "ModelError"} <= set(dir(rcnn_cli))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        rcnn_cli.Nope  # noqa: B018


def test_detector_gives_what_rcnn_detect_writes(chain):
    from rcnn_cli import Detector

    det = Detector(chain["model"], device="cpu")
    assert sorted(det.classes) == ["blue", "red", "yellow"] and det.device == "cpu"
    a, b = chain["img"] / "a.png", chain["img"] / "b.png"
    array = np.asarray(Image.open(a).convert("RGB"))
    got = [("a.png", det(a)), ("a.png", det(array)), ("a.png", det(Image.open(a))),
           *zip(["a.png", "b.png"], det.predict([str(a), b]))]
    for name, r in got:
        want = np.load(chain["det"] / "per_image" / f"{name}.npz")
        np.testing.assert_array_equal(r.boxes, want["boxes"])
        np.testing.assert_array_equal(r.scores, want["scores"])
        np.testing.assert_array_equal(r.labels, want["labels"])
        assert r.boxes.dtype == np.float32 and r.boxes.shape == (len(r), 4) and len(r)
        assert r.image_size == (120, 160)
        assert r.class_names == [det.classes[i] for i in r.labels]


def test_detector_scores_given_proposals(chain):
    """det(image, proposals=...) scores those boxes (rcnn detect --proposals): the propose
    folder's boxes give rcnn detect's result; three boxes give detections from them only."""
    from rcnn_cli import Detector, propose

    det = Detector(chain["model"], device="cpu", box_vote_iou=0, bbox_regression=False)
    a = chain["img"] / "a.png"
    boxes, _ = propose(a, top_k=12, max_side=160)
    full = Detector(chain["model"], device="cpu")(a, proposals=boxes)
    want = np.load(chain["det"] / "per_image" / "a.png.npz")
    np.testing.assert_array_equal(full.boxes, want["boxes"])
    np.testing.assert_array_equal(full.scores, want["scores"])
    r = det(a, proposals=boxes[:3].tolist())
    assert len(r) and all(np.abs(boxes[:3] - b).max(1).min() < 1e-4 for b in r.boxes)
    with pytest.raises(ValueError, match="must have shape"):
        det(a, proposals=np.zeros((2, 3), np.float32))


def test_detector_overrides_match_the_cli_flags(chain, tmp_path):
    from rcnn_cli import Detector

    run("detect", chain["img"], "--model", chain["model"], "-o", tmp_path, "--config",
        chain["cfg"], "--device", "cpu", "--nms", "hard", "--box-vote-iou", "0",
        "--max-per-image", "2", "--score-thresh", "-5")
    det = Detector(chain["model"], device="cpu", nms="hard", box_vote_iou=0,
                   max_per_image=2, score_thresh=-5)
    r = det(chain["img"] / "a.png")
    want = np.load(tmp_path / "per_image" / "a.png.npz")
    assert len(r) == 2
    np.testing.assert_array_equal(r.boxes, want["boxes"])
    np.testing.assert_array_equal(r.scores, want["scores"])


def test_detector_nms_iou_with_soft_nms_is_warned(chain, caplog):
    from rcnn_cli import Detector

    with caplog.at_level("WARNING", logger="rcnn_cli"):
        Detector(chain["model"], device="cpu", nms_iou=0.6)
    assert sum("nms_iou" in m and "hard" in m for m in caplog.messages) == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="rcnn_cli"):
        Detector(chain["model"], device="cpu", nms_iou=0.6, nms="hard")
    assert not any("nms_iou" in m for m in caplog.messages)


@pytest.mark.parametrize("kwargs, message", [
    ({"nms_iou": 1.5}, r"detect.nms_iou must be in \[0.0, 1.0\]"),
    ({"nms": "medium"}, "detect.nms must be one of hard, soft"),
    ({"max_per_image": 0}, "detect.max_per_image must be >= 1"),
    ({"conf": 0.5}, r"unknown setting\(s\) \['conf'\]"),
    ({"device": "tpu"}, "common.device must be auto, cpu, cuda"),
])
def test_detector_refuses_bad_settings_in_one_line(chain, kwargs, message):
    from rcnn_cli import Detector
    from rcnn_cli.config import ConfigError

    with pytest.raises(ConfigError, match=message) as e:
        Detector(chain["model"], **kwargs)
    assert "\n" not in str(e.value)


def test_detector_dense_needs_a_grid_model(chain):
    from rcnn_cli import ConfigError, Detector

    with pytest.raises(ConfigError, match="needs a model with extract mode 'shared' and tap "
                                          "'grid'.*resnet18"):
        Detector(chain["model"], device="cpu", dense=True)


def test_detector_refuses_a_bad_bundle_naming_the_file(chain, tmp_path):
    import shutil

    from rcnn_cli import Detector, ModelError

    with pytest.raises(ModelError, match=r"model.json: missing file \(not a model bundle\)"):
        Detector(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(chain["model"], bad)
    (bad / "model.npz").write_bytes(b"not an npz")
    with pytest.raises(ModelError, match="model.npz: contents do not match") as e:
        Detector(bad, device="cpu")
    assert "\n" not in str(e.value)


def test_detector_refuses_bad_images_naming_them(chain, tmp_path):
    from rcnn_cli import Detector
    from rcnn_cli.images import ImageError

    det = Detector(chain["model"], device="cpu")
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\) RGB array, got float32 \(4, 4\)"):
        det(np.zeros((4, 4), np.float32))
    with pytest.raises(TypeError, match="path, a PIL image or a numpy array, got int"):
        det(3)
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="x.jpg"):
        det(tmp_path / "x.jpg")


def test_propose_gives_what_rcnn_propose_writes(chain):
    from rcnn_cli import propose
    from rcnn_cli.config import ConfigError

    path = chain["img"] / "a.png"
    want = np.load(chain["props"] / "a.png.npz")
    boxes, scores = propose(path, top_k=12, max_side=160)  # the FAST config's [propose]
    np.testing.assert_array_equal(boxes, want["boxes"])
    np.testing.assert_array_equal(scores, want["scores"])
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    b2, _ = propose(np.asarray(Image.open(path).convert("RGB")), method="selective_search",
                    strategy="fast", top_k=12, max_side=160)
    np.testing.assert_array_equal(b2, boxes)
    with pytest.raises(ConfigError, match="propose.strategy must be one of"):
        propose(path, strategy="slow")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['nms'\]"):
        propose(path, nms="hard")


def test_propose_settings_the_method_does_not_read_are_warned(caplog):
    """As `rcnn propose --method sliding --strategy ...`: one warning naming the setting."""
    from rcnn_cli import propose

    img = np.zeros((40, 60, 3), np.uint8)
    with caplog.at_level("WARNING", logger="rcnn_cli"):
        propose(img, method="sliding", strategy="quality", seed=2, top_k=5)
    assert len(caplog.messages) == 1 and "strategy, seed" in caplog.messages[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="rcnn_cli"):
        propose(img, method="selective_search", sliding_stride=0.5, top_k=5)
    assert len(caplog.messages) == 1 and "sliding_stride" in caplog.messages[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="rcnn_cli"):
        propose(img, method="sliding", sliding_stride=0.5, top_k=5)
    assert not caplog.messages


def _readme_snippet() -> str:
    """The first ```python block of the README's "Python API" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_python_api_snippet_runs(chain):
    code = _readme_snippet()
    assert "from rcnn_cli import Detector, propose" in code
    code = code.replace('"runs/model"', repr(str(chain["model"])))
    ns = {"image": chain["img"] / "a.png",
          "img1": np.asarray(Image.open(chain["img"] / "a.png").convert("RGB")),
          "img2": str(chain["img"] / "b.png")}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - our own README
    want = np.load(chain["det"] / "per_image" / "a.png.npz")
    np.testing.assert_array_equal(ns["result"].boxes, want["boxes"])
    assert ns["boxes"].shape[1] == 4 and len(ns["boxes"]) == len(ns["scores"])
