import logging
import os
import shutil
import stat
import time

import numpy as np
import pytest

from rcnn_cli import store as st


def test_atomic_write_refuses_existing(tmp_path):
    p = tmp_path / "f.txt"
    st.atomic_write_text(p, "a", overwrite=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        st.atomic_write_text(p, "b", overwrite=False)
    st.atomic_write_text(p, "b")
    assert p.read_text() == "b"
    assert [x.name for x in tmp_path.iterdir()] == ["f.txt"]  # no temp files left


def test_key_changes_with_settings_and_upstream():
    k = st.settings_key("s", {"a": 1})
    assert k == st.settings_key("s", {"a": 1})
    assert k != st.settings_key("s", {"a": 2})
    assert k != st.settings_key("s", {"a": 1}, upstream_key="x")
    assert k != st.settings_key("s", {"a": 1}, format_version=2)


def test_store_resume_and_stale(tmp_path):
    s = st.StageStore.create(tmp_path / "out", "propose", {"k": 1})
    assert not s.is_done("sub/a.jpg")
    s.save("sub/a.jpg", {"boxes": np.ones((2, 4), np.float32)})
    assert s.is_done("sub/a.jpg") and s.done_rels() == ["sub/a.jpg"]
    assert s.path_for("sub/a.jpg") == tmp_path / "out" / "sub" / "a.jpg.npz"
    np.testing.assert_array_equal(s.load("sub/a.jpg")["boxes"], np.ones((2, 4)))
    assert not any(k.startswith("_") for k in s.load("sub/a.jpg"))
    # same settings: resumes
    s2 = st.StageStore.create(tmp_path / "out", "propose", {"k": 1})
    assert s2.is_done("sub/a.jpg")
    # other settings: refused, or recomputed with overwrite
    with pytest.raises(st.StaleStoreError, match="other settings"):
        st.StageStore.create(tmp_path / "out", "propose", {"k": 2})
    with pytest.raises(st.StaleStoreError, match="another stage"):
        st.StageStore.create(tmp_path / "out", "extract", {"k": 1})
    s3 = st.StageStore.create(tmp_path / "out", "propose", {"k": 2}, overwrite=True)
    assert not s3.is_done("sub/a.jpg")
    up = st.open_upstream(tmp_path / "out", "propose")
    assert up.key == s3.key and up.settings == {"k": 2}
    with pytest.raises(FileNotFoundError):
        st.open_upstream(tmp_path / "out", "extract")


def test_settings_parts_are_checked_before_the_rest_of_the_key(tmp_path):
    """check_settings_parts refuses, before heavy work, what claim() would refuse once the
    whole key is known: another stage, other values of the parts given, another upstream or
    format; the parts compare as JSON (tuples read back as lists)."""
    root = tmp_path / "out"
    st.check_settings_parts(root, "detect", {"model": "m1"})  # no folder: nothing to refuse
    st.StageStore.create(root, "detect", {"model": "m1", "post": {"iou": (0.3, 1)},
                                          "features": {"dim": 8}}, upstream_key="u1",
                         format_version=2)
    ok = {"model": "m1", "post": {"iou": [0.3, 1]}, "dense": None}
    st.check_settings_parts(root, "detect", ok, "u1", 2)
    for parts, up, fmt, what in (({**ok, "model": "m2"}, "u1", 2, r"\(model\)"),
                                 ({**ok, "post": {"iou": [0.5, 1]}}, "u1", 2, r"\(post\)"),
                                 ({**ok, "dense": {"stride": 8}}, "u1", 2, r"\(dense\)"),
                                 (ok, None, 2, r"\(upstream\)"), (ok, "u1", 1, r"\(format\)")):
        with pytest.raises(st.StaleStoreError, match="other settings " + what):
            st.check_settings_parts(root, "detect", parts, up, fmt)
        st.check_settings_parts(root, "detect", parts, up, fmt, overwrite=True)
    with pytest.raises(st.StaleStoreError, match="holds detect outputs, not propose"):
        st.check_settings_parts(root, "propose", {})


def test_half_written_file_is_not_trusted(tmp_path):
    s = st.StageStore.create(tmp_path, "propose", {})
    s.save("a.jpg", {"x": np.arange(1000)})
    p = s.path_for("a.jpg")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])  # what a crash in a non-atomic writer would leave
    assert not s.is_done("a.jpg")
    p.write_bytes(b"")
    assert not s.is_done("a.jpg")
    np.savez(p, x=np.arange(3))  # a file without our key
    assert not s.is_done("a.jpg")


def test_killed_writer_leaves_no_trusted_file(tmp_path, monkeypatch):
    s = st.StageStore.create(tmp_path, "propose", {})

    def boom(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        s.save("a.jpg", {"x": np.arange(3)})
    monkeypatch.undo()
    assert not s.is_done("a.jpg")
    assert not any(p.suffix == ".tmp" for p in tmp_path.iterdir())


# ------------------------------------------------------------------ identity (issue 12)
def test_jpg_and_png_of_one_stem_are_two_records(tmp_path):
    s = st.StageStore.create(tmp_path / "out", "propose", {})
    s.save("img.jpg", {"x": np.array([1])})
    s.save("img.png", {"x": np.array([2])})
    assert s.done_rels() == ["img.jpg", "img.png"]
    assert s.load("img.jpg")["x"][0] == 1 and s.load("img.png")["x"][0] == 2


@pytest.mark.parametrize("rel", ["../x.jpg", "/etc/x.jpg", "a/../../x.jpg", "", "a//b.jpg"])
def test_identity_never_leaves_the_folder(tmp_path, rel):
    s = st.StageStore.create(tmp_path / "out", "propose", {})
    with pytest.raises(ValueError, match="not a relative image path"):
        s.save(rel, {"x": np.arange(3)})


def test_record_knows_its_source_and_upstream(tmp_path):
    s = st.StageStore.create(tmp_path / "out", "extract", {})
    src = np.array([10, 123], np.int64)
    s.save("a.jpg", {"x": np.arange(3)}, source=src, upstream="up1")
    assert s.is_done("a.jpg", source=src, upstream="up1")
    assert not s.is_done("a.jpg", source=np.array([10, 124]), upstream="up1")  # image touched
    assert not s.is_done("a.jpg", source=src, upstream="up2")  # upstream recomputed
    rid = s.record_id("a.jpg", source=src)
    assert rid is not None and s.record_id("a.jpg", source=np.array([11, 123])) is None
    s.save("a.jpg", {"x": np.arange(3)}, source=np.array([11, 5]), upstream="up1")
    assert s.record_id("a.jpg") != rid  # a recomputed record has a new id


def test_a_record_copied_over_another_is_not_trusted(tmp_path, caplog):
    s = st.StageStore.create(tmp_path / "out", "propose", {})
    s.save("a.jpg", {"x": np.array([1])})
    s.save("b.jpg", {"x": np.array([2])})
    shutil.copyfile(s.path_for("a.jpg"), s.path_for("b.jpg"))
    assert s.is_done("a.jpg") and not s.is_done("b.jpg")
    with pytest.raises(st.StaleRecordError, match="'a.jpg', not 'b.jpg'"):
        s.load("b.jpg")
    with caplog.at_level(logging.WARNING):
        assert s.done_rels() == ["a.jpg"]
    assert "b.jpg.npz: holds the record of 'a.jpg'" in caplog.text


def test_foreign_folder_is_refused_and_its_files_kept(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(st.ForeignFolderError, match="notes.txt.*--overwrite"):
        st.StageStore.create(out, "propose", {})
    s = st.StageStore.create(out, "propose", {}, overwrite=True)  # written next to them
    assert (out / "notes.txt").read_text() == "my notes" and (out / "manifest.json").is_file()
    # a user's file under a name rcnn would write is never replaced
    np.savez(out / "c.jpg.npz", x=np.arange(3))
    with pytest.raises(st.ForeignFileError, match="not written by rcnn"):
        s.save("c.jpg", {"x": np.arange(3)})
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.toml").write_text("# mine")
    with pytest.raises(st.ForeignFolderError, match="config.toml: exists and was not written"):
        st.StageStore.create(other, "propose", {}, overwrite=True)
    assert (other / "config.toml").read_text() == "# mine"


def test_os_clutter_is_not_a_user_file(tmp_path):
    """A folder holding only .DS_Store / Thumbs.db / desktop.ini (written by file browsers)
    is as good as empty (issue 15); a real file next to them is still refused, named."""
    out = tmp_path / "out"
    out.mkdir()
    for name in (".DS_Store", "Thumbs.db", "desktop.ini"):
        (out / name).write_bytes(b"\0clutter")
    st.claim_folder(out, False, ("a.npz",), overwrite=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(st.ForeignFolderError, match=r"\(notes.txt; no manifest"):
        st.claim_folder(out, False, ("a.npz",), overwrite=False)


def test_output_inside_or_around_an_input_is_refused(tmp_path):
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    for out, what in ((imgs, "is the input"), (imgs / "out", "is inside the input"),
                      (tmp_path, "contains the input")):
        with pytest.raises(st.ForeignFolderError, match=what):
            st.check_output_folder(out, [imgs])
        st.check_output_folder(out, [imgs], overwrite=True)  # allowed, with a warning
    st.check_output_folder(tmp_path / "elsewhere", [imgs])
    with pytest.raises(st.ForeignFolderError, match="contains the input"):
        st.check_output_folder(tmp_path, [imgs / "x.jpg"])


def test_killed_run_temp_files_are_removed_on_resume(tmp_path):
    s = st.StageStore.create(tmp_path / "out", "propose", {})
    s.save("a.jpg", {"x": np.arange(3)})
    old = tmp_path / "out" / ".b.jpg.npz.abc123.tmp"
    new = tmp_path / "out" / ".c.jpg.npz.def456.tmp"
    (tmp_path / "out" / "sub").mkdir()
    deep = tmp_path / "out" / "sub" / ".d.jpg.npz.x.tmp"
    for p in (old, new, deep):
        p.write_bytes(b"partial")
    t = time.time() - 2 * st.STALE_TMP_SECONDS
    os.utime(old, (t, t))
    os.utime(deep, (t, t))
    st.StageStore.create(tmp_path / "out", "propose", {})  # resume
    assert not old.exists() and not deep.exists()
    assert new.exists()  # may be another shard's file being written right now


def test_files_are_written_with_the_users_umask(tmp_path, monkeypatch):
    for mask in (0o022, 0o077, 0o002):
        monkeypatch.setattr(st, "_UMASK", mask)
        p = tmp_path / f"f{mask:o}.txt"
        st.atomic_write_text(p, "x")
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask


def test_umask_is_the_process_umask(tmp_path, monkeypatch):
    monkeypatch.setattr(st, "_UMASK", None)
    old = os.umask(0o027)
    try:
        st.atomic_write_text(tmp_path / "g.txt", "x")
    finally:
        os.umask(old)
        monkeypatch.setattr(st, "_UMASK", None)
    assert stat.S_IMODE((tmp_path / "g.txt").stat().st_mode) == 0o640


# ------------------------------------------------------------------ making vs claiming
def test_making_a_store_touches_no_file(tmp_path):
    out = tmp_path / "out"
    s = st.StageStore(out, "propose", {"k": 1})
    assert not out.exists() and s.key == st.settings_key("propose", {"k": 1})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    st.StageStore(mine, "propose", {})  # a foreign folder: refused only when claimed
    with pytest.raises(st.ForeignFolderError):
        st.StageStore(mine, "propose", {}).claim()
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert s.claim() is s and (out / st.MANIFEST).is_file()


def test_open_upstream_takes_the_key_the_manifest_records(tmp_path):
    s = st.StageStore.create(tmp_path / "out", "propose", {"k": 1}, format_version=3)
    up = st.StageStore.open_upstream(tmp_path / "out", "propose")
    assert (up.key, up.settings, up.format_version) == (s.key, {"k": 1}, 3)
    m = st.read_manifest(tmp_path / "out")
    st.atomic_write_json(tmp_path / "out" / st.MANIFEST, {**m, "key": "recorded"})
    assert st.StageStore.open_upstream(tmp_path / "out", "propose").key == "recorded"
