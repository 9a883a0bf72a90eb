"""Dense sliding windows (rcnn_cli.dense): the dense features of every window are the region
features of its box, the geometry and peak picking give known answers, and `rcnn detect
--dense` works end to end on two tiny images with a random-init mobilenet_v2 ``grid`` model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rcnn_cli.config import ConfigError
from rcnn_cli.dense import (
    check_dense,
    dense_windows,
    detect_dense,
    local_maxima,
    window_grid,
    window_positions,
)
from rcnn_cli.detect import DetectSettings
from rcnn_cli.features import FeatureExtractor
from tests.conftest import rectangles_image
from tests.test_cli_matrix import CLASSES, run, two_images


@pytest.fixture(scope="module")
def grid_extractor():
    return FeatureExtractor("mobilenet_v2", mode="shared", weights="random", device="cpu")


# ---------------------------------------------------------------- the key invariant
def test_dense_features_are_the_region_features_of_the_windows(grid_extractor):
    """Every window's dense feature equals FeatureExtractor.extract of the window's box (an
    image whose resize factors differ in x and y, so any mix-up of the two shows)."""
    img, _ = rectangles_image(h=120, w=170)
    windows, feats, shapes = dense_windows(img, grid_extractor, scales=(0.15, 0.4, 1.0),
                                           ratios=(0.5, 1.0, 2.0))
    assert len(windows) == len(feats) == sum(ny * nx for ny, nx in shapes) > 100
    assert feats.shape[1] == grid_extractor.dim
    assert (windows >= 0).all() and (windows[:, 2] <= 170 + 1e-3).all() \
        and (windows[:, 3] <= 120 + 1e-3).all() and (windows[:, 2:] > windows[:, :2]).all()
    ref = grid_extractor.extract(img, windows)
    scale = np.abs(ref).max()
    assert scale > 0
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-5 * scale)
    # the check has teeth: boxes moved by 4 pixels give other features
    moved = grid_extractor.extract(img, windows + np.float32([4, 0, 4, 0]))
    assert np.abs(feats - moved).max() > 100 * 1e-5 * scale


def test_dense_needs_shared_grid_features():
    ext = FeatureExtractor("mobilenet_v2", tap="pool", mode="shared", weights="random",
                           device="cpu")
    img, _ = rectangles_image()
    with pytest.raises(ConfigError, match="tap 'grid'.*tap 'pool'") as e:
        dense_windows(img, ext)
    assert e.value.key == "detect.dense"
    with pytest.raises(ValueError, match="mode 'shared'"):
        check_dense(FeatureExtractor("resnet18", mode="warp", weights="random", device="cpu"))


# ---------------------------------------------------------------- geometry, peaks
def test_window_positions_step_by_stride_and_end_flush():
    assert window_positions(100, 40, 32).tolist() == [0, 32, 60]
    assert window_positions(100, 36, 32).tolist() == [0, 32, 64]  # 64 is flush already
    assert window_positions(100, 100, 32).tolist() == [0]
    assert window_positions(100, 150, 32).tolist() == [0]


def test_window_grid_shape_and_aspect():
    xs, ys = window_grid((100, 200), 50, 4.0, 32)  # 100 wide, 25 high
    assert np.allclose(xs[:, 1] - xs[:, 0], 100) and np.allclose(ys[:, 1] - ys[:, 0], 25)
    assert xs[-1, 1] == 200 and ys[-1, 1] == 100
    xs, ys = window_grid((100, 200), 100, 4.0, 32)  # 200 x 50 fits exactly in width
    assert xs.tolist() == [[0, 200]] and len(ys) == 3


def test_local_maxima_known_answer():
    s = np.array([[0, 1, 0, 0], [0, 0, 0, 3], [2, 0, 0, 0]], np.float32)[..., None]
    s = np.concatenate([s, -s], 2)  # class 1: the negated map
    m = local_maxima(s)
    assert np.argwhere(m[..., 0]).tolist() == [[0, 1], [1, 3], [2, 0]]
    # -s: every 0 is a peak (ties all count), the negative cells are not
    assert (m[..., 1] == (s[..., 1] == 0)).all()


# ---------------------------------------------------------------- detect --dense
@pytest.fixture(scope="module")
def grid_chain(tmp_path_factory):
    """Two tiny images, CSV ground truth and a random-init mobilenet_v2 ``grid`` model."""
    root = tmp_path_factory.mktemp("dense")
    img, ann, cfg = two_images(root)
    c = {"root": root, "img": img, "ann": ann, "cfg": cfg, "model": root / "model"}
    run("propose", img, "-o", root / "props", "--config", cfg)
    run("extract", img, "--proposals", root / "props", "--annotations", ann, "-o",
        root / "feats", "--backbone", "mobilenet_v2", "--weights", "random", "--mode",
        "shared", "--config", cfg)
    run("train-svm", "--features", root / "feats", "-o", c["model"], "--config", cfg)
    meta = json.loads((c["model"] / "model.json").read_text())
    assert meta["extract_settings"]["extractor"]["tap"] == "grid"
    return c


def _boxes_ok(b: np.ndarray, h: int = 120, w: int = 160) -> bool:
    return (b.ndim == 2 and b.shape[1] == 4 and (b[:, 2:] > b[:, :2]).all() and (b >= 0).all()
            and (b[:, [0, 2]] <= w).all() and (b[:, [1, 3]] <= h).all())


def test_detect_dense_cli(grid_chain, tmp_path):
    out = tmp_path / "dense"
    run("detect", grid_chain["img"], "--model", grid_chain["model"], "-o", out, "--dense",
        "--score-thresh", "-100", "--config", grid_chain["cfg"])
    rows = [ln.split(",") for ln in (out / "detections.csv").read_text().splitlines()[1:]]
    assert {r[0] for r in rows} == {"a.png", "b.png"}
    assert {r[1] for r in rows} <= set(CLASSES)
    for name in ("a.png", "b.png"):
        z = np.load(out / "per_image" / f"{name}.npz")
        assert len(z["boxes"]) > 0 and _boxes_ok(z["boxes"])
        assert z["boxes"].dtype == np.float32 and (np.diff(z["scores"]) <= 0).all()
    key = json.loads((out / "per_image" / "manifest.json").read_text())["settings"]
    assert key["dense"]["stride"] == 32
    # the proposals path into the same folder is refused: the two never mix
    r = run("detect", grid_chain["img"], "--model", grid_chain["model"], "-o", out,
            "--config", grid_chain["cfg"], code=2)
    assert "--overwrite" in r.output


def test_detector_dense_gives_what_rcnn_detect_dense_writes(grid_chain, tmp_path):
    from rcnn_cli import Detector

    run("detect", grid_chain["img"], "--model", grid_chain["model"], "-o", tmp_path, "--dense",
        "--score-thresh", "-100", "--config", grid_chain["cfg"], "--device", "cpu")
    r = Detector(grid_chain["model"], device="cpu", dense=True, score_thresh=-100)(
        grid_chain["img"] / "a.png")
    want = np.load(tmp_path / "per_image" / "a.png.npz")
    assert len(r) > 0
    np.testing.assert_array_equal(r.boxes, want["boxes"])
    np.testing.assert_array_equal(r.scores, want["scores"])


def test_detect_dense_library_matches_settings(grid_chain):
    """detect_dense returns detect_image's dict; the cap and threshold of the settings hold."""
    from rcnn_cli.detect import _get_model, get_extractor, model_extractor_kwargs

    model = _get_model(str(grid_chain["model"]))
    ext = get_extractor(model_extractor_kwargs(model, grid_chain["model"], "cpu"))
    img, _ = rectangles_image(seed=0)
    out = detect_dense(img, model, ext, DetectSettings(score_thresh=-100, max_per_image=5))
    assert set(out) == {"boxes", "scores", "labels", "times"}
    assert 0 < len(out["boxes"]) <= 5 and _boxes_ok(out["boxes"])
    assert out["labels"].dtype == np.int64 and (out["labels"] < len(CLASSES)).all()
    high = detect_dense(img, model, ext, DetectSettings(score_thresh=float(out["scores"][0])))
    assert len(high["boxes"]) == 0  # strictly above the threshold, as detect_image
