"""rcnn_cli.train: the records of an extract folder are read once, and training on them
in memory gives the model that streaming them from disk gives."""
from __future__ import annotations

import numpy as np
import pytest

from rcnn_cli import config, train
from rcnn_cli.store import StageStore
from tests.test_cli_matrix import run, two_images


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    img, ann, cfg = two_images(root)
    run("propose", img, "-o", root / "props", "--config", cfg)
    run("extract", img, "--proposals", root / "props", "--annotations", ann, "-o",
        root / "feats", "--backbone", "resnet18", "--weights", "random", "--config", cfg)
    return root / "feats", cfg


def _count_loads(monkeypatch) -> list[str]:
    loads: list[str] = []
    load = StageStore.load

    def counted(self, rel):
        loads.append(rel)
        return load(self, rel)

    monkeypatch.setattr(StageStore, "load", counted)
    return loads


def test_in_memory_and_streamed_records_train_the_same_model(feats, tmp_path, monkeypatch):
    features, cfg_file = feats
    cfg = config.load(cfg_file)
    cfg["train_svm"]["head"] = "fc"  # all passes: head windows, SVM passes, norms, regression
    loads = _count_loads(monkeypatch)
    mem = train.train_model(features, tmp_path / "mem", cfg)
    assert sorted(loads) == ["a.png", "b.png"]  # each record read once
    loads.clear()
    monkeypatch.setattr(train, "MEMORY_CACHE_BYTES", 0)
    disk = train.train_model(features, tmp_path / "disk", cfg)
    assert len(loads) > 2 * 4  # streamed: read again on every pass
    np.testing.assert_array_equal(mem.svm_weights, disk.svm_weights)
    np.testing.assert_array_equal(mem.svm_biases, disk.svm_biases)
    np.testing.assert_array_equal(mem.regressors, disk.regressors)
    for name, a in mem.head.arrays().items():
        np.testing.assert_array_equal(a, disk.head.arrays()[name], err_msg=name)
