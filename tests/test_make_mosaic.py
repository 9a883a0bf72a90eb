"""scripts/make_mosaic.py: tiles keep their boxes on their objects, splits stay apart."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from rcnn_cli.datasets import ImageRecord, load_dataset, write_voc_xml

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("make_mosaic", ROOT / "scripts" / "make_mosaic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _voc(root: Path, n: int) -> None:
    """n photos 200x100, each with one white box at x 20..60, y 10..50; the last two (test.txt)
    on a lighter grey than the others (train.txt)."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i in range(n):
        im = np.full((100, 200, 3), 120 if i >= n - 2 else 60, np.uint8)
        im[10:50, 20:60] = 255
        Image.fromarray(im).save(root / "images" / f"p{i}.png")
        write_voc_xml(root / "annotations" / f"p{i}.xml", ImageRecord(
            f"p{i}.png", 100, 200, np.array([[20, 10, 60, 50]], np.float32),
            np.zeros(1, np.int64), np.zeros(1, bool)), ["thing"])
    (root / "train.txt").write_text("".join(f"p{i}\n" for i in range(n - 2)))
    (root / "test.txt").write_text(f"p{n - 2}\np{n - 1}\n")


def test_mosaic_boxes_follow_their_objects(tmp_path):
    _voc(tmp_path / "src", 6)
    out = tmp_path / "m"
    counts = _script().build(tmp_path / "src", out, 3, 2, [2], (200, 100), seed=0)
    assert counts == {"train": {"mosaics": 3, "objects": 12}, "test": {"mosaics": 2, "objects": 8}}
    ds = load_dataset(out)
    assert len(ds.records) == 5 and ds.classes == ["thing"]
    for r in ds.records:
        im = np.asarray(Image.open(ds.image_path(r)).convert("L"), np.float32)
        assert im.shape == (100, 200) and len(r.boxes) == 4
        # train mosaics only from train photos, test mosaics only from test photos
        assert abs(np.median(im) - (120 if r.file_name.startswith("test-") else 60)) < 3
        for x1, y1, x2, y2 in r.boxes.astype(int):  # each box is on its white square
            assert x2 - x1 == 20 and y2 - y1 == 20  # 40 px at half size
            assert im[y1 + 2:y2 - 2, x1 + 2:x2 - 2].mean() > 240
    assert (out / "train.txt").read_text().split() == ["train-2x2-000", "train-2x2-001",
                                                       "train-2x2-002"]
    assert all(n.startswith("test-") for n in (out / "test.txt").read_text().split())
