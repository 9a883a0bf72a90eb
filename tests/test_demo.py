import os

import numpy as np

from rcnn_cli.datasets import load_dataset
from rcnn_cli.demo import _split_files
from rcnn_cli.demo_data import CLASSES, make_demo_dataset


def test_demo_dataset_is_deterministic_and_valid(tmp_path):
    a = make_demo_dataset(tmp_path / "a", n_train=4, n_test=2, seed=3)
    b = make_demo_dataset(tmp_path / "b", n_train=4, n_test=2, seed=3)
    c = make_demo_dataset(tmp_path / "c", n_train=4, n_test=2, seed=4)
    files = sorted(p.name for p in (a / "images").iterdir())
    assert len(files) == 6
    for f in files:
        assert (a / "images" / f).read_bytes() == (b / "images" / f).read_bytes()
    assert any((a / "images" / f).read_bytes() != (c / "images" / f).read_bytes() for f in files)
    ds = load_dataset(a)
    assert len(CLASSES) >= 3 and set(ds.classes) <= set(CLASSES)
    assert (a / "train.txt").read_text().split() == [f"train_{i:03d}" for i in range(4)]
    for r in ds.records:
        assert 1 <= len(r.boxes) <= 3
        assert (r.boxes[:, :2] >= 0).all() and (r.boxes[:, 2] <= r.width).all()
        assert (r.boxes[:, 3] <= r.height).all()
        w, h = r.boxes[:, 2] - r.boxes[:, 0], r.boxes[:, 3] - r.boxes[:, 1]
        assert (np.maximum(w, h) >= 40).all()


def test_split_files_seeded_when_absent(tmp_path):
    d = make_demo_dataset(tmp_path / "d", n_train=8, n_test=2, seed=0)
    (d / "train.txt").unlink()
    (d / "test.txt").unlink()
    tr, te = _split_files(d, tmp_path / "s", seed=0)
    train, test = tr.read_text().split(), te.read_text().split()
    assert len(test) == 2 and len(train) == 8 and not set(train) & set(test)
    _tr2, te2 = _split_files(d, tmp_path / "s2", seed=0)
    assert te2.read_text() == te.read_text()


def test_demo_workers_follow_the_cpus(monkeypatch):
    from rcnn_cli import cpus as cpumod
    from rcnn_cli import demo

    monkeypatch.setattr(cpumod, "cpu_quota", lambda _root=None: None)
    for cpus, want in ((1, 1), (2, 2), (3, 3), (64, demo.DEMO_MAX_WORKERS)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)),
                            raising=False)
        assert demo.demo_workers() == want
    monkeypatch.setattr(cpumod, "cpu_quota", lambda _root=None: 2.0)  # docker --cpus 2
    assert demo.demo_workers() == 2


def test_demo_workers_flag_and_config_win(monkeypatch, tmp_path):
    """Selective search's processes: --workers, then a config file's [common] workers,
    then demo_workers()."""
    from click.testing import CliRunner

    from rcnn_cli import demo
    from rcnn_cli.cli import cli

    seen = []

    def fake_run_demo(out, cfg, **kw):
        seen.append(kw["propose_workers"] or cfg["common"]["workers"])
        raise SystemExit(0)

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    monkeypatch.setattr(demo, "demo_workers", lambda: 3)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[common]\nworkers = 1\n")
    for args in ([], ["--workers", "1"], ["--config", str(cfg)],
                 ["--config", str(cfg), "--workers", "4"]):
        res = CliRunner().invoke(cli, ["demo", "-o", str(tmp_path / "o"), *args])
        assert res.exit_code == 0, res.output
    assert seen == [3, 1, 1, 4]  # an explicit 1 wins too
