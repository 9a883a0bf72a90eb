"""Tests of rcnn_cli.model: bundle round trip, overwrite guard, and refusals."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from rcnn_cli import __version__
from rcnn_cli.bbox_regression import apply_regression
from rcnn_cli.detect import DetectSettings, detect_from_features
from rcnn_cli.model import Model, ModelError, load_model, save_model
from rcnn_cli.svm import score


def _model(seed: int = 0, k: int = 3, d: int = 6, regress: bool = True) -> Model:
    rng = np.random.default_rng(seed)
    return Model(
        classes=["cat", "dog", "raccoon"][:k],
        svm_weights=rng.normal(size=(k, d)).astype(np.float32),
        svm_biases=rng.normal(size=k).astype(np.float32),
        feat_scale=0.123456789,
        svm_trained=np.array([True, False, True][:k]),
        regressors=rng.normal(0, 0.01, (k, 4, d + 1)).astype(np.float32) if regress else None,
        regressor_trained=np.array([True, True, False][:k]) if regress else None,
        backbone="resnet18",
        weights_source={"kind": "imagenet", "filename": "r18.pth", "sha256": "ab" * 32},
        feature_tap="avgpool",
        extract_settings={"mode": "warp", "size": (224, 224), "dim": d, "ctx": np.float32(16)},
        proposal_settings={"method": "selective_search", "mode": "fast"},
        training_stats={"svm": [{"objective": 0.07, "retrains": 3}]},
    )


def test_round_trip_is_bit_exact_and_json_equal(tmp_path):
    m = _model()
    save_model(tmp_path / "a", m)
    back = load_model(tmp_path / "a")
    for name, arr in m.arrays().items():
        got = back.arrays()[name]
        assert got.dtype == arr.dtype and np.array_equal(got, arr), name
    assert back.classes == m.classes and back.feat_scale == m.feat_scale
    assert back.extract_settings == {"mode": "warp", "size": [224, 224], "dim": 6, "ctx": 16.0}
    assert back.package_version == __version__
    save_model(tmp_path / "b", back)
    assert (tmp_path / "a/model.json").read_text() == (tmp_path / "b/model.json").read_text()
    meta = json.loads((tmp_path / "a/model.json").read_text())
    assert meta["format_version"] == 1 and meta["detection"]["nms_iou"] == 0.3
    assert meta["arrays"]["shapes"]["regressors"] == [3, 4, 7]
    assert not list((tmp_path / "a").glob("*.tmp"))  # temp files moved into place


def test_model_without_regressors_round_trips(tmp_path):
    save_model(tmp_path, _model(regress=False))
    back = load_model(tmp_path)
    assert back.regressors is None and back.regressor_trained is None
    x, boxes = np.ones((2, 6), np.float32), np.float32([[0, 0, 5, 5], [1, 1, 4, 4]])
    out = detect_from_features(boxes, x, back, (10, 10), _ALL)
    assert sorted(map(tuple, out["boxes"].tolist())) == sorted(  # classes 0 and 2 trained
        map(tuple, np.concatenate([boxes, boxes]).tolist()))


#: post-processing that keeps every box (nothing thresholded, suppressed or voted)
_ALL = DetectSettings(nms_iou=1.0, score_thresh=-1e9, max_per_image=1000, nms="hard",
                      box_vote_iou=0.0)


def test_detect_recipe_scores_and_refines_with_the_stage_functions():
    # the one recipe (detect.detect_from_features): SVM scores of the features, each class's
    # regressor applied to the proposals and clipped; an untrained class never fires
    m = _model(seed=1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 6)).astype(np.float32)
    boxes = np.float32([[10, 10, 40, 50], [20, 5, 60, 30], [0, 0, 99, 99], [50, 50, 90, 95],
                        [5, 60, 30, 99]])
    out = detect_from_features(boxes, x, m, (100, 100), _ALL)
    s = score(x, m.svm_weights, m.svm_biases, m.feat_scale)
    assert sorted(out["labels"].tolist()) == [0] * 5 + [2] * 5  # class 1 untrained
    for k in (0, 2):
        got = out["labels"] == k
        order = np.argsort(-s[:, k], kind="stable")
        np.testing.assert_allclose(out["scores"][got], s[order, k], rtol=1e-6)
        np.testing.assert_allclose(out["boxes"][got], apply_regression(
            boxes, x, k, m.regressors, m.feat_scale, (100, 100))[order], atol=1e-4)


def test_existing_bundle_is_not_overwritten(tmp_path):
    save_model(tmp_path, _model(seed=0))
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_model(tmp_path, _model(seed=1))
    assert np.array_equal(load_model(tmp_path).svm_weights, _model(seed=0).svm_weights)
    save_model(tmp_path, _model(seed=1), overwrite=True)
    assert np.array_equal(load_model(tmp_path).svm_weights, _model(seed=1).svm_weights)


def _rewrite(path, **arrays):
    """Replace model.npz by ``arrays`` and fix the recorded sha256 (a consistent tamper)."""
    with np.load(path / "model.npz") as z:
        content = {k: z[k] for k in z.files}
    content.update(arrays)
    np.savez(path / "model.npz", **content)
    meta = json.loads((path / "model.json").read_text())
    meta["arrays"]["sha256"] = hashlib.sha256((path / "model.npz").read_bytes()).hexdigest()
    (path / "model.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("arrays, message", [
    ({"svm_biases": np.zeros(4, np.float32)}, r"svm_biases has shape \(4,\), expected \(3,\)"),
    ({"svm_weights": np.zeros((2, 6), np.float32)}, r"expected \(3, D\) for 3 classes"),
    ({"regressors": np.zeros((3, 4, 6), np.float32)},
     r"regressors has shape \(3, 4, 6\), expected \(3, 4, 7\)"),
    ({"svm_weights": np.zeros((3, 6), np.float64)}, "svm_weights must be float32"),
    ({"svm_trained": np.ones(3, np.float32)}, "svm_trained must be bool"),
])
def test_wrong_shapes_and_dtypes_are_refused(tmp_path, arrays, message):
    save_model(tmp_path, _model())
    _rewrite(tmp_path, **arrays)
    with pytest.raises(ModelError, match=message) as e:
        load_model(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "model.npz")) and "\n" not in str(e.value)


def test_inconsistent_model_is_refused_at_save(tmp_path):
    m = _model()
    m.extract_settings["dim"] = 4096
    with pytest.raises(ModelError, match="extract_settings.dim is 4096 but the model reads "
                                         "D=6"):
        save_model(tmp_path, m)
    m = _model()
    m.classes = ["a", "a", "b"]
    with pytest.raises(ModelError, match="duplicate class names"):
        save_model(tmp_path, m)
    assert not (tmp_path / "model.json").exists()


def test_wrong_version_missing_files_and_tampering_are_refused(tmp_path):
    with pytest.raises(ModelError, match=r"model.json: missing file \(not a model bundle\)"):
        load_model(tmp_path / "nowhere")
    save_model(tmp_path, _model())
    meta = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ModelError, match="model.json: format_version 99 is not supported"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({**meta, "classes": ["a", "b"]}))
    with pytest.raises(ModelError, match=r"expected \(2, D\) for 2 classes"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({k: v for k, v in meta.items()
                                                      if k != "backbone"}))
    with pytest.raises(ModelError, match="missing key 'backbone'"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="unreadable JSON"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with open(tmp_path / "model.npz", "ab") as f:  # contents changed behind model.json's back
        f.write(b"x")
    with pytest.raises(ModelError, match="do not match the sha256"):
        load_model(tmp_path)
    (tmp_path / "model.npz").unlink()
    with pytest.raises(ModelError, match=r"model.npz: missing file"):
        load_model(tmp_path)


def test_pickled_arrays_are_refused(tmp_path):
    save_model(tmp_path, _model())
    _rewrite(tmp_path, svm_biases=np.array([{"a": 1}, None, 3], dtype=object))
    with pytest.raises(ModelError, match="unreadable arrays"):
        load_model(tmp_path)
