import os

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
    s = st.StageStore(tmp_path / "out", "propose", {"k": 1})
    assert not s.is_done("sub/a")
    s.save("sub/a", {"boxes": np.ones((2, 4), np.float32)})
    assert s.is_done("sub/a") and s.done_stems() == ["sub/a"]
    np.testing.assert_array_equal(s.load("sub/a")["boxes"], np.ones((2, 4)))
    assert "_key" not in s.load("sub/a")
    # same settings: resumes
    s2 = st.StageStore(tmp_path / "out", "propose", {"k": 1})
    assert s2.is_done("sub/a")
    # other settings: refused, or recomputed with overwrite
    with pytest.raises(st.StaleStoreError, match="other settings"):
        st.StageStore(tmp_path / "out", "propose", {"k": 2})
    with pytest.raises(st.StaleStoreError, match="another stage"):
        st.StageStore(tmp_path / "out", "extract", {"k": 1})
    s3 = st.StageStore(tmp_path / "out", "propose", {"k": 2}, overwrite=True)
    assert not s3.is_done("sub/a")
    up = st.open_upstream(tmp_path / "out", "propose")
    assert up.key == s3.key and up.settings == {"k": 2}
    with pytest.raises(FileNotFoundError):
        st.open_upstream(tmp_path / "out", "extract")


def test_half_written_file_is_not_trusted(tmp_path):
    s = st.StageStore(tmp_path, "propose", {})
    s.save("a", {"x": np.arange(1000)})
    p = s.path_for("a")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])  # what a crash in a non-atomic writer would leave
    assert not s.is_done("a")
    p.write_bytes(b"")
    assert not s.is_done("a")
    np.savez(p, x=np.arange(3))  # a file without our key
    assert not s.is_done("a")


def test_killed_writer_leaves_no_trusted_file(tmp_path, monkeypatch):
    s = st.StageStore(tmp_path, "propose", {})

    def boom(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        s.save("a", {"x": np.arange(3)})
    monkeypatch.undo()
    assert not s.is_done("a")
    assert not any(p.suffix == ".tmp" for p in tmp_path.iterdir())
