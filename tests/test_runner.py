import functools
import os
import time
from pathlib import Path

import numpy as np
import pytest

from rcnn_cli.images import ImageError, ImageItem
from rcnn_cli.runner import Report, run_stage, run_stage_into, shard_items
from rcnn_cli.store import StageStore, StaleStoreError, file_identity, read_manifest


def _work(item: ImageItem) -> dict:
    name = item.path.name
    if name.startswith("bad"):
        raise ImageError(item.path, "not a decodable image")
    if name.startswith("boom"):
        raise ZeroDivisionError("division by zero")
    if name.startswith("die"):
        os._exit(3)  # a worker killed mid-image (e.g. out of memory)
    if name.startswith("slow"):
        time.sleep(1.0)  # still running when another image kills the pool
    return {"times": {"work": 1.0}}


def _items(*names):
    return [ImageItem(Path(n), n) for n in names]


def test_failures_are_reported_and_the_batch_goes_on():
    rep = run_stage(_work, _items("a.jpg", "bad.jpg", "boom.jpg", "b.jpg"))
    assert rep.done == 2 and rep.failed == 2 and rep.exit_code == 1
    reasons = dict(rep.failures)
    assert reasons["bad.jpg"] == "not a decodable image"
    assert reasons["boom.jpg"] == "ZeroDivisionError: division by zero"
    assert rep.stage_seconds == {"work": 2.0}
    assert "4 images: 2 done, 0 already done (resumed), 2 failed" in rep.summary()


def test_resume_skips_done_items():
    rep = run_stage(_work, _items("a.jpg", "b.jpg"), is_done=lambda it: it.rel == "a.jpg")
    assert rep.done == 1 and rep.skipped == 1 and rep.exit_code == 0


def test_dead_worker_is_a_failure_not_a_crash():
    rep = run_stage(_work, _items("a.jpg", "die.jpg", "b.jpg"), workers=2)
    assert ("die.jpg", ) == tuple(p for p, _ in rep.failures if p == "die.jpg")
    assert "worker process died" in dict(rep.failures)["die.jpg"]
    assert rep.exit_code == 1


def _use(item: ImageItem, prepared=None) -> dict:
    assert prepared is not None and prepared["rel"] == item.rel
    if item.rel.startswith("late"):
        raise ZeroDivisionError("in the model's process")
    return {"times": {"use": 1.0}}


def _prep(item: ImageItem) -> dict:
    if item.path.parent.name == "marks":  # one file per call: how often it was prepared
        (item.path.parent / f"{item.rel}.{os.getpid()}.{time.monotonic_ns()}").touch()
    if item.rel.startswith("dielate"):
        time.sleep(0.3)  # dies after the images before it have finished
    _work(item)
    return {"rel": item.rel, "times": {"prep": 1.0}}


def test_pipeline_reports_each_failure_and_survives_a_dead_worker():
    """run_stage(prepare=...): ``prepare`` on a pool feeding ``fn`` here (detect on a GPU).
    A worker killed mid-image breaks the whole pool: the images in flight go to a new pool,
    only the killer fails, the rest of the batch goes on, in order."""
    names = ["a.jpg", "bad.jpg", "b.jpg", "die.jpg", "c.jpg", "late.jpg", *[f"{i}.jpg" for i in range(6)]]
    rep = run_stage(_use, _items(*names), workers=2, prepare=_prep)
    reasons = dict(rep.failures)
    assert set(reasons) == {"bad.jpg", "die.jpg", "late.jpg"}, reasons
    assert "worker process died" in reasons["die.jpg"]
    assert reasons["bad.jpg"] == "not a decodable image"
    assert reasons["late.jpg"] == "ZeroDivisionError: in the model's process"
    assert rep.done == 9 and rep.stage_seconds == {"prep": 9.0, "use": 9.0}


def test_pipeline_isolates_the_image_that_kills_workers():
    """Regression (a flaky failure under load): after a pool broke, every image in flight was
    resubmitted at once, so the killer broke the new pool too and an innocent image in
    flight beside it was reported as a dead worker. Now the images in flight run one at a
    time after a break: only the killer fails."""
    names = ["a.jpg", "slow1.jpg", "die.jpg", "slow2.jpg", "b.jpg", "c.jpg"]
    rep = run_stage(_use, _items(*names), workers=2, prepare=_prep)
    reasons = dict(rep.failures)
    assert set(reasons) == {"die.jpg"}, reasons
    assert "worker process died" in reasons["die.jpg"]
    assert rep.done == 5


def test_pipeline_keeps_the_work_a_dead_worker_did_not_lose(tmp_path):
    """Images whose preparation finished before the pool broke are not prepared again; the
    one being waited for (lost with the pool) is, once."""
    # (the version before this fix prepared a and b twice: every entry was resubmitted)
    marks = tmp_path / "marks"
    marks.mkdir()
    names = ["slow.jpg", "a.jpg", "b.jpg", "dielate.jpg", "c.jpg"]
    items = [ImageItem(marks / n, n) for n in names]
    rep = run_stage(_use, items, workers=2, prepare=_prep)
    assert [Path(p).name for p, _ in rep.failures] == ["dielate.jpg"] and rep.done == 4
    calls = {n: len(list(marks.glob(f"{n}.*"))) for n in names}
    assert calls["a.jpg"] == calls["b.jpg"] == calls["c.jpg"] == 1, calls
    # the killer: in flight at the break, then alone, then its one retry
    assert calls["slow.jpg"] == 2 and calls["dielate.jpg"] == 3, calls


def test_shards_partition_the_items():
    items = _items(*[f"{i}.jpg" for i in range(7)])
    parts = [shard_items(items, f"{i}/3") for i in range(3)]
    assert sorted((it for p in parts for it in p), key=lambda it: it.rel) == sorted(
        items, key=lambda it: it.rel)
    assert [it.rel for it in parts[1]] == ["1.jpg", "4.jpg"]
    assert shard_items(items, None) == items
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError):
            shard_items(items, bad)


def test_report_exit_code_clean():
    assert Report().exit_code == 0


# ------------------------------------------------------------------ the stage driver
def _save(item: ImageItem, store) -> dict:
    store.save(item.rel, {"x": np.arange(3)}, source=file_identity(item.path),
               upstream="up1" if item.rel != "c.png" else "")
    return {"times": {"work": 1.0}}


def _folder(tmp_path: Path, *names: str) -> list[ImageItem]:
    (tmp_path / "in").mkdir()
    for n in names:
        (tmp_path / "in" / n).write_bytes(b"x")
    return [ImageItem(tmp_path / "in" / n, n) for n in names]


def test_run_stage_into_claims_writes_settings_and_resumes(tmp_path):
    items = _folder(tmp_path, "a.png", "b.png")
    store = StageStore(tmp_path / "out", "propose", {"k": 1})
    calls = []
    fn = functools.partial(_save, store=store)
    rep = run_stage_into(store, fn, items, write_settings=lambda: calls.append(1))
    assert (rep.done, rep.skipped, calls) == (2, 0, [1])
    assert read_manifest(tmp_path / "out")["key"] == store.key
    rep = run_stage_into(store, fn, items, shard="1/2")
    assert (rep.done, rep.skipped) == (0, 1)  # one shard, already current
    os.utime(items[0].path, ns=(1, 1))  # the image changed: its record is not current
    rep = run_stage_into(store, fn, items, also_done=lambda it: it.rel != "b.png")
    assert (rep.done, rep.skipped) == (2, 0)


def test_run_stage_into_checks_upstream_ids(tmp_path):
    items = _folder(tmp_path, "a.png", "b.png")
    store = StageStore(tmp_path / "out", "extract", {})
    fn = functools.partial(_save, store=store)
    run_stage_into(store, fn, items)
    rep = run_stage_into(store, fn, items, upstream={"a.png": "up1", "b.png": "up2"})
    assert (rep.done, rep.skipped) == (1, 1)  # b's upstream record was recomputed


def test_run_stage_into_refuses_other_settings_before_any_write(tmp_path):
    items = _folder(tmp_path, "a.png")
    old = StageStore(tmp_path / "out", "propose", {"k": 1})
    run_stage_into(old, functools.partial(_save, store=old), items)
    new = StageStore(tmp_path / "out", "propose", {"k": 2})
    calls = []
    with pytest.raises(StaleStoreError, match="other settings"):
        run_stage_into(new, functools.partial(_save, store=new), items,
                       write_settings=lambda: calls.append(1))
    assert calls == [] and read_manifest(tmp_path / "out")["key"] == old.key
