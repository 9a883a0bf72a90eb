"""run.json: every command leaves a record of its run in its output folder."""
from __future__ import annotations

import json
import tomllib
from datetime import datetime

import numpy as np
import pytest
from PIL import Image

from rcnn_cli.runrecord import MARK, RUN_JSON
from tests.test_api import tiny_chain
from tests.test_cli_matrix import run

#: the tiny model is built once per process: keep these modules on one xdist worker
pytestmark = pytest.mark.xdist_group("api_chain")

KEYS = {"command", "argv", "cwd", "inputs", "model", "resolved", "settings", "versions",
        "started", "finished", "seconds", "counts"}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return tiny_chain(tmp_path_factory)


def record(folder, command: str) -> dict:
    data = json.loads((folder / RUN_JSON).read_text())
    assert data[MARK] == 1
    r = data["runs"][command]
    assert KEYS <= set(r), KEYS - set(r)
    assert r["command"] == command and isinstance(r["argv"], list)
    assert set(r["versions"]) == {"rcnn_cli", "torch", "torchvision", "numpy", "python"}
    assert r["versions"]["numpy"] == np.__version__
    t0, t1 = datetime.fromisoformat(r["started"]), datetime.fromisoformat(r["finished"])
    assert t0.utcoffset().total_seconds() == 0 and t0 <= t1  # UTC
    return r


def test_propose_extract_train_detect_records(chain):
    r = record(chain["props"], "propose")
    assert r["counts"] == {"images": 2, "done": 2, "skipped": 0, "failed": 0}
    assert r["resolved"]["proposals"]["method"] == "selective_search"
    assert r["inputs"] == [str(chain["img"])] and r["settings"]["propose"]["top_k"] == 12
    r = record(chain["feats"], "extract")
    assert r["resolved"]["device"] == "cpu" and r["counts"]["done"] == 2
    assert r["resolved"]["features"]["mode"] == "shared"  # auto on a CPU
    assert r["resolved"]["features"]["tap"] and r["resolved"]["features"]["backbone"] == "resnet18"
    assert str(chain["props"]) in r["inputs"] and str(chain["ann"]) in r["inputs"]
    r = record(chain["model"], "train-svm")
    assert r["resolved"]["head"] in ("fc", "none") and r["resolved"]["mode"] == "shared"
    assert r["counts"]["images"] == 2 and r["counts"]["classes"] == 3
    r = record(chain["det"], "detect")
    assert r["model"] == str(chain["model"]) and r["counts"]["done"] == 2
    assert r["resolved"]["device"] == "cpu" and r["resolved"]["post"]["nms"] == "soft"
    assert r["resolved"]["features"]["mode"] == "shared"


def test_rerun_replaces_our_record_and_evaluate_adds_its_own(chain, tmp_path):
    det = tmp_path / "det"
    run("detect", chain["img"], "--model", chain["model"], "-o", det, "--config", chain["cfg"],
        "--device", "cpu")
    first = record(det, "detect")
    run("detect", chain["img"], "--model", chain["model"], "-o", det, "--config", chain["cfg"],
        "--device", "cpu")  # resumed: everything already done
    again = record(det, "detect")
    assert again["counts"] == {"images": 2, "done": 0, "skipped": 2, "failed": 0}
    assert again["started"] >= first["started"]
    run("evaluate", "--annotations", chain["ann"], "--detections", det)
    r = record(det, "evaluate")  # into the detections folder, next to detect's record
    assert r["counts"]["images"] == 2 and r["resolved"]["scored"] == "detections"
    record(det, "detect")
    run("evaluate", "--annotations", chain["ann"], "--proposals", chain["props"], "-o",
        tmp_path / "ev")
    assert record(tmp_path / "ev", "evaluate")["resolved"]["scored"] == "proposals"


def test_a_users_run_json_is_never_replaced(chain, tmp_path):
    out = tmp_path / "det"
    out.mkdir()
    (out / RUN_JSON).write_text('{"mine": true}')
    r = run("detect", chain["img"], "--model", chain["model"], "-o", out, "--config",
            chain["cfg"], "--overwrite", code=2)
    assert "run.json: exists and was not written by rcnn" in r.output
    assert not (out / "per_image").exists()  # refused before any work
    assert (out / RUN_JSON).read_text() == '{"mine": true}'


def test_a_failed_image_is_counted(chain, tmp_path):
    img = tmp_path / "imgs"
    img.mkdir()
    Image.open(chain["img"] / "a.png").save(img / "a.png")
    (img / "bad.png").write_bytes(b"not a png")
    run("propose", img, "-o", tmp_path / "p", "--config", chain["cfg"], code=1)
    assert record(tmp_path / "p", "propose")["counts"] == {"images": 2, "done": 1,
                                                           "skipped": 0, "failed": 1}


def test_finetune_record(chain, tmp_path):
    run("finetune", "--annotations", chain["ann"], "--proposals", chain["props"], "-o",
        tmp_path, "--backbone", "resnet18", "--weights", "random", "--iterations", 1,
        "--device", "cpu", "--config", chain["cfg"])
    r = record(tmp_path, "finetune")
    assert r["resolved"] == {"device": "cpu", "mode": "shared", "backbone": "resnet18",
                             "tap": r["resolved"]["tap"]} and r["resolved"]["tap"]
    assert r["counts"] == {"images": 2} and r["settings"]["finetune"]["iterations"] == 1


def test_localize_records(chain, tmp_path):
    tiny = ["--weights", "random", "--input-size", "32", "--iterations", "2"]
    run("localize", "train", "--annotations", chain["ann"], "--images", chain["img"], "-o",
        tmp_path / "m", *tiny)
    r = record(tmp_path / "m", "localize train")
    assert r["counts"] == {"images": 2} and r["resolved"]["device"] in ("cpu", "cuda:0")
    run("localize", "predict", chain["img"], "--model", tmp_path / "m", "-o", tmp_path / "p",
        "--device", "cpu")
    r = record(tmp_path / "p", "localize predict")
    assert r["counts"]["done"] == 2 and r["model"] == str(tmp_path / "m")


def test_demo_record(chain, tmp_path):
    from rcnn_cli.datasets import load_dataset, write_voc_xml
    from rcnn_cli.demo import demo_workers

    ds = load_dataset(chain["ann"])
    voc = tmp_path / "voc"
    (voc / "images").mkdir(parents=True)
    (voc / "annotations").mkdir()
    for rec in ds.records:
        Image.open(chain["img"] / rec.file_name).save(voc / "images" / rec.file_name)
        write_voc_xml(voc / "annotations" / f"{rec.stem}.xml", rec, ds.classes)
    (voc / "train.txt").write_text("a\nb\n")
    (voc / "test.txt").write_text("a\nb\n")
    cfg = tmp_path / "demo.toml"
    text = chain["cfg"].read_text().replace("[extract]\n", '[extract]\nbackbone = "resnet18"\n'
                                            'weights = "random"\n')
    cfg.write_text(text)
    run("demo", "-o", tmp_path / "demo", "--data", voc, "--no-vis", "--config", cfg,
        "--device", "cpu")
    r = record(tmp_path / "demo", "demo")
    assert r["counts"] == {"test_images": 2} and r["resolved"]["device"] == "cpu"
    # without --workers the demo's selective search uses the machine's CPUs (at most 4)
    assert r["resolved"]["propose_workers"] == demo_workers()
    assert r["settings"]["common"]["workers"] == 1
    used = {stage: tomllib.loads((tmp_path / "demo" / stage / "config.toml").read_text())
            ["common"]["workers"] for stage in ("proposals", "features")}
    assert used == {"proposals": demo_workers(), "features": 1}
    assert r["resolved"]["features"]["backbone"] == "resnet18"
