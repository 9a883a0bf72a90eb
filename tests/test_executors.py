"""Cluster executors: a real local Dask cluster (and Ray, when installed) must give the same
stage outputs as the local executor, report failures like it, resume and shard."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcnn_cli import config, executors
from rcnn_cli.images import ImageItem
from rcnn_cli.runner import run_stage
from rcnn_cli.stages import propose_folder

N_IMAGES = 4
# One xdist worker runs the whole module (with `-n 2 --dist loadgroup`): its clusters and the
# local reference are built once, not once per xdist worker.
pytestmark = pytest.mark.xdist_group("executors")
needs_dask = pytest.mark.skipif(importlib.util.find_spec("distributed") is None,
                                reason="needs the dask extra: pip install 'rcnn_cli[dask]'")


def synthetic_folder(root: Path, n: int = N_IMAGES, seed: int = 0) -> Path:
    """``n`` small PNGs (64-120 px) of flat rectangles on a flat background, plus noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(64, 121, 2))
        img = np.full((h, w, 3), (40, 90, 40), np.uint8)
        for _ in range(3):
            x1, y1 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            x2, y2 = x1 + int(rng.integers(12, 40)), y1 + int(rng.integers(12, 40))
            img[y1:y2, x1:x2] = rng.integers(0, 256, 3)
        img += rng.integers(0, 6, img.shape, dtype=np.uint8)
        Image.fromarray(img).save(root / f"img{i}.png")
    return root


def cfg_for(executor: str = "local", workers: int = 1, address: str = "", shard: str = ""):
    return config.load(overrides={"common": {"executor": executor, "workers": workers,
                                             "address": address, "shard": shard}})


def bytes_without_zip_times(path: Path) -> bytes:
    """The file's bytes with the zip members' modification times zeroed: ``np.savez`` stamps
    each member with the write time, everything else must match byte for byte."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        infos, pos = z.infolist(), z.start_dir
    for info in infos:
        data[info.header_offset + 10:info.header_offset + 14] = bytes(4)  # local header
    for _ in infos:
        assert data[pos:pos + 4] == b"PK\x01\x02"
        data[pos + 12:pos + 16] = bytes(4)  # central directory entry
        n, m, k = struct.unpack("<HHH", data[pos + 28:pos + 34])
        pos += 46 + n + m + k
    return bytes(data)


def assert_same_outputs(a: Path, b: Path) -> None:
    files = sorted(p.name for p in a.glob("*.npz"))
    assert files and files == sorted(p.name for p in b.glob("*.npz"))
    for name in files:
        za, zb = np.load(a / name), np.load(b / name)
        assert za.files == zb.files
        for k in za.files:
            assert za[k].dtype == zb[k].dtype
            np.testing.assert_array_equal(za[k], zb[k], err_msg=f"{name}:{k}")
        assert bytes_without_zip_times(a / name) == bytes_without_zip_times(b / name), name


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return synthetic_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def local_out(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "props"
    report = propose_folder([images], out, cfg_for("local"))
    assert report.done == N_IMAGES and not report.failures
    return out


@pytest.fixture(scope="module")
def dask_address():
    """One real local Dask cluster (2 one-thread worker processes) for the module."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


def flaky(item: ImageItem, marks: str, fail_times: int, how: str = "raise") -> dict:
    """Fail the first ``fail_times`` attempts at ``item`` (attempts counted as files in
    ``marks``): raise a two-line ValueError, or kill the worker process (``how="exit"``)."""
    n = len(list(Path(marks).glob(f"{item.stem_rel}.*")))
    Path(marks, f"{item.stem_rel}.{n}").touch()
    if n < fail_times:
        if how == "exit":
            os._exit(1)
        raise ValueError(f"attempt {n} failed\nsecond line")
    return {"times": {"work": 0.001}, "attempt": n}


def fake_items(root: Path, names: list[str]) -> list[ImageItem]:
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        (root / n).touch()
    return [ImageItem(root / n, n) for n in names]


# ------------------------------------------------------------------ Dask
def test_dask_matches_local_byte_for_byte(images, local_out, dask_address, tmp_path):
    out = tmp_path / "props"
    report = propose_folder([images], out, cfg_for("dask", workers=2, address=dask_address))
    assert (report.done, report.skipped, report.failures) == (N_IMAGES, 0, [])
    assert set(report.stage_seconds) == {"decode", "propose"}  # "times" survive the wrapper
    assert_same_outputs(local_out, out)


def test_cli_propose_on_a_dask_cluster(images, local_out, dask_address, tmp_path):
    from click.testing import CliRunner

    from rcnn_cli.cli import cli

    out = tmp_path / "props"
    r = CliRunner().invoke(cli, ["propose", str(images), "-o", str(out), "--executor", "dask",
                                 "--address", dask_address, "--shard", "1/2"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.glob("*.npz")) == ["img1.png.npz", "img3.png.npz"]
    assert "executor = \"dask\"" in (out / "config.toml").read_text()


@needs_dask
def test_dask_without_address_runs_its_own_cluster(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    caplog.set_level("INFO", logger="rcnn_cli.executors")
    marks = tmp_path / "marks"
    marks.mkdir()
    items = fake_items(tmp_path / "in", ["a.png", "b.png", "c.png"])
    fn = functools.partial(flaky, marks=str(marks), fail_times=0)
    got = list(executors.map_images_on("dask", fn, items, workers=2))
    assert sorted(it.rel for it, _, _ in got) == ["a.png", "b.png", "c.png"]
    assert all(err is None and res["worker"] for _, res, err in got)
    summary = [r.message for r in caplog.records if r.message.startswith("dask:")][-1]
    assert "3 images (0 failed) on" in summary and "images/s" in summary


def test_dask_corrupt_image_is_a_failure_not_a_crash(images, dask_address, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.png").write_bytes((images / "img0.png").read_bytes())
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 10)
    report = propose_folder([folder], tmp_path / "props", cfg_for("dask", 2, dask_address))
    assert report.done == 1 and report.exit_code == 1
    [(path, reason)] = report.failures
    assert path.endswith("bad.jpg") and "\n" not in reason and reason


def test_dask_shards_cover_all_images_and_resume(images, local_out, dask_address, tmp_path):
    out = tmp_path / "props"
    r0 = propose_folder([images], out, cfg_for("dask", 2, dask_address, shard="0/2"))
    assert (r0.done, r0.skipped) == (N_IMAGES // 2, 0)
    r1 = propose_folder([images], out, cfg_for("dask", 2, dask_address, shard="1/2"))
    assert (r1.done, r1.skipped) == (N_IMAGES - N_IMAGES // 2, 0)
    assert_same_outputs(local_out, out)
    # an interrupted run (one output missing) resumes: only that image is recomputed
    (out / "img1.png.npz").unlink()
    r2 = propose_folder([images], out, cfg_for("dask", 2, dask_address))
    assert (r2.done, r2.skipped, r2.failed) == (1, N_IMAGES - 1, 0)
    assert_same_outputs(local_out, out)
    # a mixed local rerun finds everything done
    r3 = propose_folder([images], out, cfg_for("local"))
    assert (r3.done, r3.skipped) == (0, N_IMAGES)


def test_dask_retries_are_bounded_and_failures_are_one_line(dask_address, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    items = fake_items(tmp_path / "in", ["ok.png", "twice.png", "always.png"])
    fails = {"ok.png": 0, "twice.png": executors.RETRIES, "always.png": 99}
    got = {}
    for it in items:  # one call per item: each has its own failure count
        fn = functools.partial(flaky, marks=str(marks), fail_times=fails[it.rel])
        [(item, result, err)] = executors.map_images_on("dask", fn, [it], workers=2,
                                                        address=dask_address)
        got[item.rel] = (result, err)
    assert got["ok.png"][1] is None and got["ok.png"][0]["attempt"] == 0
    assert ":" in got["ok.png"][0]["worker"] and got["ok.png"][0]["times"] == {"work": 0.001}
    assert got["twice.png"][1] is None and got["twice.png"][0]["attempt"] == executors.RETRIES
    assert got["always.png"] == (None, f"ValueError: attempt {executors.RETRIES} failed")
    assert len(list(marks.glob("always.*"))) == 1 + executors.RETRIES


def test_dask_lost_worker_is_retried_and_keeps_finished_outputs(dask_address, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    items = fake_items(tmp_path / "in", [f"{i}.png" for i in range(4)])
    fn = functools.partial(flaky, marks=str(marks), fail_times=0)
    killer = functools.partial(flaky, marks=str(marks), fail_times=1, how="exit")
    first = list(executors.map_images_on("dask", fn, items[:3], address=dask_address))
    assert all(err is None for _, _, err in first)
    [(_, result, err)] = executors.map_images_on("dask", killer, items[3:],
                                                    address=dask_address)
    assert err is None and result["attempt"] == 1  # its worker died; rerun elsewhere
    assert sorted(p.name for p in marks.iterdir()) == ["0.0", "1.0", "2.0", "3.0", "3.1"]


@needs_dask
def test_run_stage_with_nothing_to_do_starts_no_cluster(monkeypatch, tmp_path):
    items = fake_items(tmp_path, ["a.png"])
    monkeypatch.setattr(executors, "_DaskSession", None)  # would fail if used
    report = run_stage(lambda it: {}, items, is_done=lambda it: True, executor="dask")
    assert (report.done, report.skipped) == (0, 1)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("name,module", [("dask", "distributed"), ("ray", "ray")])
def test_missing_extra_names_the_extra(monkeypatch, tmp_path, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    items = fake_items(tmp_path, ["a.png"])
    with pytest.raises(executors.ExecutorError, match=rf"pip install 'rcnn_cli\[{name}\]'"):
        run_stage(lambda it: {}, items, executor=name)


def test_unknown_executor_is_refused(tmp_path):
    with pytest.raises(executors.ExecutorError, match="local, dask, ray; got 'spark'"):
        executors.map_images_on("spark", lambda it: {}, fake_items(tmp_path, ["a.png"]))


def test_workers_that_cannot_see_the_files_are_refused(dask_address, tmp_path):
    items = [ImageItem(tmp_path / "nowhere" / "a.png", "a.png")]
    with pytest.raises(executors.ExecutorError, match="shared by every worker"):
        executors.map_images_on("dask", lambda it: {}, items, address=dask_address)


def test_base_install_does_not_import_the_engines():
    code = ("import sys, rcnn_cli.cli, rcnn_cli.stages, rcnn_cli.executors; "
            "print(sorted({'distributed', 'dask', 'ray'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------ Ray
def test_ray_tasks_and_actors(images, local_out, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # One instance for both halves (a start costs ~15 s on 2 cores); map_images_on then
    # leaves it running. Without one, it starts and stops its own (bench_distributed.py).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        # CPU stage: stateless tasks
        out = tmp_path / "props"
        report = propose_folder([images], out, cfg_for("ray", workers=2))
        assert (report.done, report.failures) == (N_IMAGES, [])
        assert_same_outputs(local_out, out)
        assert ray.is_initialized()  # not ours to stop
        # a CNN stage (here a stand-in) runs on long-lived actors, with the same retries
        marks = tmp_path / "marks"
        marks.mkdir()
        items = fake_items(tmp_path / "in", ["a.png", "b.png", "c.png", "d.png"])
        fn = functools.partial(flaky, marks=str(marks), fail_times=1)
        got = {it.rel: (res, err) for it, res, err in
               executors.map_images_on("ray", fn, items, workers=2, holds_model=True)}
        assert all(err is None and res["attempt"] == 1 for res, err in got.values())
        assert len({res["worker"] for res, _ in got.values()}) <= 2  # two actors
        bad = functools.partial(flaky, marks=str(marks), fail_times=99)
        [(_, res, err)] = executors.map_images_on("ray", bad, items[:1], workers=1,
                                                  holds_model=True)
        assert res is None and err.startswith("ValueError: attempt ") and "\n" not in err
    finally:
        ray.shutdown()


# ------------------------------------------------------------------ worker threads
def test_thread_limit_reaches_libraries_already_loaded():
    # A worker has numpy (its BLAS) and torch loaded by the time it limits its threads: the
    # environment variables alone come too late for them.
    code = ("import numpy, torch; from threadpoolctl import threadpool_info; "
            "torch.set_num_threads(2); from rcnn_cli.executors import limit_threads; "
            "limit_threads(); "
            "print(max(p['num_threads'] for p in threadpool_info()), torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout
    assert out.split() == ["1", "1"]


# ------------------------------------------------------------------ the pool's forkserver
@pytest.mark.skipif(sys.platform == "win32", reason="no forkserver on Windows")
def test_local_pool_workers_start_with_the_preloaded_modules_and_frozen_gc(tmp_path):
    # A fresh interpreter (the forkserver is one per process): start it with a preload,
    # then a pool worker (no initializer here) must find the module imported (and numba's
    # code loaded by the warm-up) before running anything, the server's objects frozen and
    # its libraries on one thread.
    code = (
        "import os, sys, gc, multiprocessing as mp\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from rcnn_cli import executors\n"
        "def probe(_):\n"
        "    import cv2, rcnn_cli.proposals._warm as w\n"
        "    from threadpoolctl import threadpool_info\n"
        "    one = max(p['num_threads'] for p in threadpool_info()) == 1 == cv2.getNumThreads()\n"
        "    return ('rcnn_cli.proposals._warm' in sys.modules, w.WARM,\n"
        "            gc.get_freeze_count() > 0, one, os.environ.get('RCNN_CLI_PROBE'))\n"
        "if __name__ == '__main__':\n"
        "    assert 'rcnn_cli.proposals._warm' not in sys.modules\n"
        "    print(executors.start_local_pool(['rcnn_cli.proposals._warm'],\n"
        "                                     env={'RCNN_CLI_PROBE': 'server only'}))\n"
        "    with ProcessPoolExecutor(1, mp_context=mp.get_context('forkserver')) as p:\n"
        "        print(p.submit(probe, 0).result())\n"
        "    print('rcnn_cli.proposals._warm' in sys.modules, 'RCNN_CLI_PROBE' in os.environ)\n")
    script = tmp_path / "probe.py"  # a file: the workers import its probe from __main__
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         check=True, timeout=300, env=env).stdout.split("\n")
    # the driver never imports the preload itself; the worker has it, warmed, frozen, and
    # one-thread libraries from the server (which forked with no thread pool running); the
    # server's environment variable reached it and did not stay in the driver's
    assert out[:3] == ["True", "(True, True, True, True, 'server only')", "False False"]


def test_selective_search_warm_up_never_raises(monkeypatch):
    """The forkserver survives a failing warm-up (multiprocessing only forgives an
    ImportError in a preloaded module): it returns False and the workers compile later."""
    import rcnn_cli.proposals._warm as w

    ss = importlib.import_module("rcnn_cli.proposals.selective_search")

    assert w.warm() is True

    def boom(*a, **k):
        raise RuntimeError("no numba today")

    monkeypatch.setattr(ss, "selective_search", boom)
    assert w.warm() is False


def test_stages_start_the_pool_server_with_their_modules_after_checking_inputs(monkeypatch,
                                                                             tmp_path):
    """propose / extract / detect / demo with more than one local worker start the pool's
    forkserver once their inputs are checked and before the backbone (torch) loads,
    preloading what their workers import; one worker, a cluster executor or a bad input
    starts none, and sliding windows need no selective search."""
    from types import SimpleNamespace

    from click.testing import CliRunner

    from rcnn_cli import demo, detect, stages
    from rcnn_cli.cli import cli
    from rcnn_cli.stages import POOL_PRELOAD

    calls, envs = [], []
    monkeypatch.setattr(executors, "start_local_pool", lambda preload, env=None: calls.append(
        tuple(preload)) or envs.append(env) or True)

    def stop(*a, **k):
        raise SystemExit(0)

    # each stage stops where its heavy work would begin
    monkeypatch.setattr(stages, "run_stage_into", stop)
    monkeypatch.setattr(stages, "open_upstream", lambda *a: None)
    monkeypatch.setattr(stages, "get_extractor", stop)
    model = SimpleNamespace(classes=["a"], proposal_settings={"method": "selective_search"})
    monkeypatch.setattr(detect, "_get_model", lambda d: model)
    monkeypatch.setattr(detect, "model_detect_settings", lambda *a: detect.DetectSettings())
    monkeypatch.setattr(detect, "model_extractor_kwargs", lambda *a: {"tap": "grid"})
    monkeypatch.setattr(detect, "get_extractor", stop)
    # the pool driver's key without torch: none here, so the driver loads the backbone
    monkeypatch.setattr(detect, "cpu_feature_settings", lambda kw: None)
    monkeypatch.setattr(demo, "run_demo", stop)
    monkeypatch.setattr(demo, "demo_workers", lambda: 2)
    imgs = synthetic_folder(tmp_path / "imgs", n=1)
    out = str(tmp_path / "o")
    props = ["propose", str(imgs), "-o", out]
    for d in ("props", "model"):
        (tmp_path / d).mkdir()
    ext = ["extract", str(imgs), "--proposals", str(tmp_path / "props"), "-o", out]
    det = ["detect", str(imgs), "--model", str(tmp_path / "model"), "-o", out]
    warm = "rcnn_cli.proposals._warm"
    for args, expect in (
            ([*props, "--workers", "2"], POOL_PRELOAD["propose"]),
            ([*props, "--workers", "2", "--method", "sliding"],
             tuple(m for m in POOL_PRELOAD["propose"] if m != warm)),
            (props, None),
            ([*props, "--workers", "2", "--executor", "dask"], None),
            ([*ext, "--workers", "2"], POOL_PRELOAD["extract"]),
            ([*det, "--workers", "3"], POOL_PRELOAD["detect"]),
            (det, None),
            (["demo", "-o", out], POOL_PRELOAD["propose"]),  # one process per CPU: 2 here
            (["demo", "-o", out, "--workers", "1"], None)):
        calls.clear()
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, (args, res.output)
        assert calls == ([] if expect is None else [expect]), args
    # a model on sliding windows: its detect workers run no selective search to warm
    model.proposal_settings = {"method": "sliding"}
    calls.clear()
    assert CliRunner().invoke(cli, [*det, "--workers", "2"]).exit_code == 0
    assert calls == [tuple(m for m in POOL_PRELOAD["detect"] if m != warm)]
    # another tap, or dense windows: the grid head's summed-area kernel is not loaded
    grid = "rcnn_cli._gridpool"
    assert grid in POOL_PRELOAD["detect"] and grid in POOL_PRELOAD["extract"]
    monkeypatch.setattr(detect, "model_extractor_kwargs", lambda *a: {"tap": "pool"})
    calls.clear()
    assert CliRunner().invoke(cli, [*det, "--workers", "2"]).exit_code == 0
    assert calls == [tuple(m for m in POOL_PRELOAD["detect"] if m not in (warm, grid))]
    # a bundle without the resolved tap: preloaded where the default tap may be grid
    for kw, loaded in (({"tap": None, "backbone": "mobilenet_v2", "mode": "shared"}, True),
                       ({"tap": None, "backbone": "mobilenet_v2", "mode": "warp"}, False),
                       ({"tap": None, "backbone": "resnet18", "mode": "shared"}, False)):
        monkeypatch.setattr(detect, "model_extractor_kwargs", lambda *a, kw=kw: kw)
        calls.clear()
        assert CliRunner().invoke(cli, [*det, "--workers", "2"]).exit_code == 0
        assert (grid in calls[0]) == loaded, kw
    monkeypatch.setattr(detect, "model_extractor_kwargs", lambda *a: {"tap": "grid"})
    calls.clear()
    res = CliRunner().invoke(cli, [*det, "--workers", "2", "--dense"])
    assert res.exit_code == 0, res.output
    assert calls == [tuple(m for m in POOL_PRELOAD["detect"] if m not in (warm, grid))]
    # the driver keys the store without torch: the server also loads model and backbone
    # once for its workers, named in its environment only
    monkeypatch.setattr(detect, "cpu_feature_settings", lambda kw: {"k": 1})
    monkeypatch.setattr(detect, "StageStore", stop)
    model.proposal_settings = {"method": "selective_search"}
    calls.clear()
    envs.clear()
    assert CliRunner().invoke(cli, [*det, "--workers", "2"]).exit_code == 0
    assert calls == [(*POOL_PRELOAD["detect"], "rcnn_cli._pool_detector")]
    assert json.loads(envs[0]["RCNN_CLI_POOL_DETECTOR"]) == {
        "model_dir": str(tmp_path / "model"), "extractor_kwargs": {"tap": "grid"}}
    calls.clear()
    assert CliRunner().invoke(cli, [*det, "--workers", "2", "--dense"]).exit_code == 0
    assert "rcnn_cli._pool_detector" not in calls[0]  # dense windows: no driver's key
    # an input refused first: no server (the output folder is an input folder here)
    calls.clear()
    res = CliRunner().invoke(cli, ["propose", str(imgs), "-o", str(imgs), "--workers", "2"])
    assert res.exit_code != 0 and calls == []
    assert warm in POOL_PRELOAD["propose"] and warm in POOL_PRELOAD["detect"]
    assert "rcnn_cli.features" in POOL_PRELOAD["detect"]
    # extract on a GPU runs in one process (stages.execution): no server to start
    calls.clear()
    cuda = config.load(overrides={"common": {"workers": 4, "device": "cuda"}})
    stages.start_pool(cuda, "extract")
    stages.start_pool(cuda, "detect")  # detect's CPU processes feed the GPU one
    assert calls == [POOL_PRELOAD["detect"]]


def test_auto_workers_follow_the_cpus_the_memory_the_folder_and_the_work(monkeypatch):
    """Without --workers, propose and detect run selective search in one process per usable
    CPU (at most AUTO_MAX_WORKERS, one per image of the shard, one per AUTO_WORKER_BYTES of
    memory) on AUTO_MIN_IMAGES or more images; one process otherwise, and for work torch's
    threads already spread."""
    from rcnn_cli import cpus, stages

    cfg = config.load()
    assert cfg["common"]["workers"] == 1  # the library default is unchanged
    gib = stages.AUTO_WORKER_BYTES
    monkeypatch.setattr(cpus, "available_memory", lambda: 64 * gib)
    for cpu, n, per_image, want in ((2, 40, True, 2), (16, 40, True, stages.AUTO_MAX_WORKERS),
                                    (16, stages.AUTO_MIN_IMAGES - 1, True, 1),
                                    (4, stages.AUTO_MIN_IMAGES, True, 4), (16, 40, False, 1),
                                    (1, 40, True, 1)):
        monkeypatch.setattr(cpus, "available_cpus", lambda cpu=cpu: cpu)
        got = stages.with_auto_workers(cfg, [None] * n, per_image)
        assert got["common"]["workers"] == want, (cpu, n, per_image)
        assert cfg["common"]["workers"] == 1 and got["common"]["device"] == cfg["common"]["device"]
    monkeypatch.setattr(cpus, "available_cpus", lambda: 16)
    monkeypatch.setattr(cpus, "available_memory", lambda: 3 * gib + 1)  # a 3 GiB container
    assert stages.with_auto_workers(cfg, [None] * 40)["common"]["workers"] == 3
    monkeypatch.setattr(cpus, "available_memory", lambda: gib // 2)
    assert stages.with_auto_workers(cfg, [None] * 40)["common"]["workers"] == 1
    monkeypatch.setattr(cpus, "available_memory", lambda: 64 * gib)
    monkeypatch.setattr(stages, "AUTO_MAX_WORKERS", 64)
    monkeypatch.setattr(cpus, "available_cpus", lambda: 32)
    assert stages.with_auto_workers(cfg, [None] * 20)["common"]["workers"] == 20  # one per image
    shard = config.load(overrides={"common": {"shard": "0/4"}})  # its share: 10 of 40 images
    assert stages.with_auto_workers(shard, [None] * 40)["common"]["workers"] == 1
    assert stages.with_auto_workers(shard, [None] * 60)["common"]["workers"] == 15
    dask = config.load(overrides={"common": {"executor": "dask"}})
    assert stages.with_auto_workers(dask, [None] * 40)["common"]["workers"] == 1


def test_cli_chooses_workers_unless_the_user_did(monkeypatch, tmp_path):
    """rcnn propose / detect: the folder's size and the kind of work choose the processes
    unless --workers or a config file's [common] workers did; the choice is what the pool
    server, the stage and OUT/config.toml and OUT/run.json get."""
    import json
    import tomllib
    from types import SimpleNamespace

    from click.testing import CliRunner

    from rcnn_cli import cpus, dense, detect, stages
    from rcnn_cli.cli import cli
    from rcnn_cli.runner import Report

    monkeypatch.setattr(cpus, "available_cpus", lambda: 3)
    seen = []

    def fake_run(*a, **k):  # the stage: records its workers, writes OUT/config.toml
        seen.append(("stage", k["workers"]))
        k["write_settings"]()
        return Report(workers=k["workers"])  # as run_stage_into reports them

    for mod in (stages, detect):
        monkeypatch.setattr(mod, "start_pool", lambda cfg, *a, **k: seen.append(
            ("pool", cfg["common"]["workers"])))
        monkeypatch.setattr(mod, "run_stage_into", fake_run)
    model = SimpleNamespace(classes=["a"], proposal_settings={"method": "selective_search"},
                            extract_settings={})
    monkeypatch.setattr(detect, "_get_model", lambda d: model)
    monkeypatch.setattr(detect, "model_detect_settings", lambda *a: detect.DetectSettings())
    monkeypatch.setattr(detect, "model_extractor_kwargs", lambda *a: {"tap": "grid"})
    monkeypatch.setattr(detect, "get_extractor", lambda kw: SimpleNamespace(
        settings=lambda: {"f": 1}, device=SimpleNamespace(type="cpu")))
    monkeypatch.setattr(detect, "write_outputs", lambda *a, **k: [])
    monkeypatch.setattr(dense, "check_dense", lambda ext: None)
    monkeypatch.setattr(dense, "dense_settings", dict)
    monkeypatch.setattr(detect, "open_upstream", lambda *a: SimpleNamespace(
        settings=model.proposal_settings, key="k", root=tmp_path / "props"))
    monkeypatch.setattr(detect, "upstream_id", lambda *a: "id")
    many = synthetic_folder(tmp_path / "many", n=stages.AUTO_MIN_IMAGES)
    few = synthetic_folder(tmp_path / "few", n=stages.AUTO_MIN_IMAGES - 1)
    (tmp_path / "model").mkdir()
    (tmp_path / "props").mkdir()
    one = tmp_path / "one.toml"
    one.write_text("[common]\nworkers = 1\n")
    det = ["detect", "--model", str(tmp_path / "model")]
    cases = [(["propose", str(many)], 3), (["propose", str(few)], 1),
             (["propose", str(many), "--workers", "2"], 2),
             (["propose", str(many), "--config", str(one)], 1),
             (["propose", str(many), "--method", "sliding"], 1),
             (["propose", str(many), "--shard", "0/2"], 1),  # its share: 6 images
             ([*det, str(many)], 3), ([*det, str(few)], 1),
             ([*det, str(many), "--workers", "2"], 2), ([*det, str(many), "--config", str(one)], 1),
             ([*det, str(many), "--dense"], 1),
             ([*det, str(many), "--proposals", str(tmp_path / "props")], 1)]
    for i, (args, want) in enumerate(cases):
        seen.clear()
        out = tmp_path / f"o{i}"
        res = CliRunner().invoke(cli, [*args, "-o", str(out)])
        assert res.exit_code == 0, (args, res.output)
        assert seen == [("pool", want), ("stage", want)], (args, seen)
        assert tomllib.loads((out / "config.toml").read_text())["common"]["workers"] == want
        run = json.loads((out / "run.json").read_text())["runs"][args[0]]
        assert run["resolved"]["workers"] == want, args
    model.proposal_settings = {"method": "sliding"}
    seen.clear()
    assert CliRunner().invoke(cli, [*det, str(many), "-o", str(tmp_path / "s")]).exit_code == 0
    assert seen == [("pool", 1), ("stage", 1)]
    # a real run: the stage runs in the pool with the chosen processes
    monkeypatch.undo()
    monkeypatch.setattr(cpus, "available_cpus", lambda: 2)
    real_run, used = stages.run_stage_into, []
    monkeypatch.setattr(stages, "run_stage_into",
                        lambda *a, **k: used.append(k["workers"]) or real_run(*a, **k))
    real = tmp_path / "real"
    res = CliRunner().invoke(cli, ["propose", str(many), "-o", str(real), "--method",
                                   "selective_search", "--strategy", "single"])
    assert res.exit_code == 0, res.output
    assert used == [2] and len(list(real.glob("*.npz"))) == stages.AUTO_MIN_IMAGES
    assert tomllib.loads((real / "config.toml").read_text())["common"]["workers"] == 2
    run = json.loads((real / "run.json").read_text())["runs"]["propose"]
    assert run["resolved"]["workers"] == 2


def test_local_pool_driver_prepares_while_its_processes_start(tmp_path):
    """`driver_prepare`: the first images go to the starting pool as they are; the driver
    prepares the next ones until one of those is back, and they run as fn(item,
    prepared=...); every image comes back once; the preparation's times join the worker's
    (the worker's win on a clash); a preparation that fails is left to the worker."""
    from tests import _pool_helpers as H

    names = ["a.png", "bad.png", "c.png", "d.png", "e.png", "f.png", "g.png"]
    items = [ImageItem(tmp_path / n, n) for n in names]
    session = executors._LocalPoolSession(2)
    try:
        out = {it.rel: (res, err) for it, res, err, _, _ in
               session.map(executors._Task(H.work), items, H.prepare)}
    finally:
        session.close()
    assert sorted(out) == sorted(names) and all(err is None for _, err in out.values())
    # the pool starts on the first two (one of them cannot be prepared anyway)
    assert out["a.png"][0]["path"] == "worker" and out["bad.png"][0]["path"] == "worker"
    prepared = [n for n in names if out[n][0]["path"] == "prepared"]
    assert "c.png" in prepared  # prepared while the first two ran (0.4 s each)
    for n in prepared:
        assert out[n][0]["value"] == n.upper()
        assert out[n][0]["times"] == {"prep": 0.5, "work": 1.0}
    for n in set(names) - set(prepared):
        assert out[n][0]["times"] == {"work": 1.0}
    # a preparation that fails: the worker does the whole image
    session = executors._LocalPoolSession(2)
    try:
        items2 = [ImageItem(tmp_path / n, n) for n in ["a.png", "c.png", "bad2.png", "d.png"]]
        out2 = {it.rel: res for it, res, _, _, _ in
                session.map(executors._Task(H.work), items2, H.prepare)}
    finally:
        session.close()
    assert out2["bad2.png"]["path"] == "worker" and out2["d.png"]["path"] in ("worker",
                                                                            "prepared")
    # more images than the driver prepares before the first is back: after the first two,
    # a run of prepared images, then the rest go to the pool as they are
    names3 = [f"i{k:02d}.png" for k in range(30)]
    session = executors._LocalPoolSession(2)
    try:
        out3 = {it.rel: res for it, res, _, _, _ in
                session.map(executors._Task(H.work), [ImageItem(tmp_path / n, n)
                                                      for n in names3], H.prepare_slowly)}
    finally:
        session.close()
    paths = [out3[n]["path"] for n in names3]
    k = paths.index("worker", 2) if "worker" in paths[2:] else len(paths)
    assert paths[:2] == ["worker"] * 2 and k > 2
    assert paths[2:k] == ["prepared"] * (k - 2) and paths[k:] == ["worker"] * (len(paths) - k)
