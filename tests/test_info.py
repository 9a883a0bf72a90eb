"""`rcnn info MODEL_DIR`: a model bundle described in text and JSON."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import cli_in_fresh_python
from tests.test_api import tiny_chain
from tests.test_cli_matrix import run

#: the tiny model is built once per process: keep these modules on one xdist worker
pytestmark = pytest.mark.xdist_group("api_chain")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return tiny_chain(tmp_path_factory)


def test_info_json_describes_the_bundle(chain):
    from rcnn_cli.model import load_model

    m = load_model(chain["model"])
    info = json.loads(run("info", chain["model"], "--json").stdout)
    assert info["classes"] == m.classes == ["blue", "red", "yellow"]
    assert info["features"]["backbone"] == "resnet18" and info["features"]["mode"] == "shared"
    assert info["features"]["tap"] == m.feature_tap and info["features"]["dim"] == m.dim
    assert info["training"]["images"] == 2
    assert info["training"]["positives"] == {"blue": 2, "red": 2, "yellow": 2}  # one per image
    assert info["training"]["svm_trained"] == m.classes
    assert info["stored_thresholds"] == {"nms_iou": 0.3, "score_threshold": m.score_threshold,
                                         "max_detections": 100}
    # what `rcnn detect` applies without flags: the stored thresholds + default.toml's rest
    assert info["detect_defaults"]["nms"] == "soft"
    assert info["detect_defaults"]["score_thresh"] == m.score_threshold
    sizes = info["files"]
    assert sizes["model.npz"] == (chain["model"] / "model.npz").stat().st_size
    assert {"model.json", "model.npz", "run.json"} <= set(sizes)


def test_info_imports_no_torch(chain):
    """The bundle is read and validated with the torch-free backbone table
    (rcnn_cli/backbones.py): `rcnn info` took 5.7 s, 4.5 of them importing torch and
    torchvision for the list of taps."""
    _, [(code, output)], after = cli_in_fresh_python(["info", chain["model"], "--json"])
    assert code == 0 and json.loads(output)["features"]["backbone"] == "resnet18"
    assert not {"torch", "torchvision"} & set(after)


def test_info_text_has_one_line_per_topic(chain):
    out = run("info", chain["model"]).stdout
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert lines["classes"] == "3: blue, red, yellow"
    assert lines["features"].startswith("resnet18, tap ") and "mode shared" in lines["features"]
    assert "2 images; positives blue 2, red 2, yellow 2; SVMs trained 3/3" in lines["training"]
    assert "model.npz" in lines["files"] and "nms soft" in lines["detect"]


def test_info_on_a_bad_bundle_is_one_line(chain, tmp_path):
    r = run("info", tmp_path, code=1)
    assert "model.json: missing file (not a model bundle)" in r.output
    assert "Traceback" not in r.output
    bad = tmp_path / "bad"
    shutil.copytree(chain["model"], bad)
    (bad / "model.npz").write_bytes(b"x")
    r = run("info", bad, "--json", code=1)
    assert "model.npz: contents do not match" in r.output and r.stdout == ""
