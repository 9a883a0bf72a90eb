"""The bench scripts' library calls keep up with the library (a refactor once broke
scripts/bench_scale.py's StageStore call unnoticed)."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from rcnn_cli import config
from rcnn_cli.cli import cli
from rcnn_cli.store import open_upstream

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bench_scale_builds_a_replicated_compact_store(tmp_path):
    from rcnn_cli.demo_data import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", n_train=3, n_test=1, seed=2)
    r = CliRunner()
    res = r.invoke(cli, ["propose", str(data / "images"), "-o", str(tmp_path / "props"),
                         "--top-k", "60", "--split", str(data / "train.txt")])
    assert res.exit_code == 0, res.output
    res = r.invoke(cli, ["extract", str(data / "images"), "--proposals", str(tmp_path / "props"),
                         "--annotations", str(data), "--split", str(data / "train.txt"),
                         "-o", str(tmp_path / "full"), "--keep", "all", "--weights", "random"])
    assert res.exit_code == 0, res.output
    bench = _script("bench_scale")
    out = tmp_path / "copies"
    res = bench.build_store(tmp_path / "full", out, 7, config.load()["extract"])
    assert res["disk_bytes_per_image"] > 0 and res["keep"]["keep"] == "train"
    assert res["keep"]["near_iou"] == 0.1  # keep_near_iou = 0 resolved for 7 images
    store = open_upstream(out, "extract")
    rels = store.done_rels()
    assert len(rels) == 7 and all(r.startswith("copies/") for r in rels)
    full = open_upstream(tmp_path / "full", "extract")
    src = full.done_rels()[0]
    a, b = store.load(f"copies/000000/{src}"), store.load(f"copies/000003/{src}")
    w = int(a["image_size"][1])
    np.testing.assert_allclose(b["gt_boxes"][:, [2, 0]], w - a["gt_boxes"][:, [0, 2]])
    assert bench.store_size(out, 7)["disk_bytes_per_image"] == res["disk_bytes_per_image"]
