import io
import logging
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from rcnn_cli.images import ImageError, InputError, list_images, read_image, read_split


def _save(img: Image.Image, path, fmt=None, **kw):
    img.save(path, format=fmt, **kw)
    return path


@pytest.fixture
def corpus(tmp_path):
    """The bad-image corpus of the foundation issue, made here."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    _save(Image.fromarray(rgb), d / "rgb.jpg", quality=95)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image\n")
    g16 = (np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 27).astype(np.uint16)
    _save(Image.fromarray(g16), d / "sub" / "gray16.png")
    rgba = np.dstack([rgb, np.full((40, 60), 255, np.uint8)])
    rgba[:, :30, 3] = 0
    _save(Image.fromarray(rgba), d / "rgba.png")
    _save(Image.fromarray(rgb[:, :, 0]), d / "gray.png")
    _save(Image.fromarray(rgb).convert("P"), d / "palette.png")
    _save(Image.fromarray(rgb).convert("CMYK"), d / "cmyk.jpg")
    (d / "notes.txt").write_text("ignored")
    return d, rgb


def test_decode_variants(corpus):
    d, rgb = corpus
    a = read_image(d / "rgb.jpg")
    assert a.shape == (40, 60, 3) and a.dtype == np.uint8
    g = read_image(d / "gray.png")
    assert g.shape == (40, 60, 3)
    np.testing.assert_array_equal(g[:, :, 0], rgb[:, :, 0])
    np.testing.assert_array_equal(g[:, :, 0], g[:, :, 2])
    r = read_image(d / "rgba.png")
    np.testing.assert_array_equal(r[:, :30], 127)  # transparent -> grey background
    np.testing.assert_array_equal(r[:, 30:], rgb[:, 30:])
    s = read_image(d / "sub" / "gray16.png")
    expected = ((np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16) >> 8).astype(np.uint8)
    np.testing.assert_array_equal(s[:, :, 1], expected)
    assert read_image(d / "palette.png").shape == (40, 60, 3)
    assert read_image(d / "cmyk.jpg").shape == (40, 60, 3)


def test_truncated_jpeg_decodes_with_warning(corpus):
    d, _ = corpus
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        img = read_image(d / "truncated.jpg")
    assert img.shape == (40, 60, 3)
    assert any("truncated" in str(x.message) for x in w)


@pytest.mark.parametrize("name,reason", [("zero.jpg", "empty file"),
                                         ("text.jpg", "not a decodable image")])
def test_bad_files_raise_named_error(corpus, name, reason):
    d, _ = corpus
    with pytest.raises(ImageError) as e:
        read_image(d / name)
    assert name in str(e.value) and reason in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file():
    with pytest.raises(ImageError, match="cannot read"):
        read_image("/nonexistent/x.jpg")


def test_list_images_recursive_sorted_and_split(corpus, tmp_path):
    d, _ = corpus
    items = list_images(d)
    rels = [i.rel for i in items]
    assert rels == sorted(rels)
    assert "notes.txt" not in rels and "sub/gray16.png" in rels
    assert items[rels.index("sub/gray16.png")].stem_rel == "sub/gray16"
    split = tmp_path / "split.txt"
    split.write_text("rgb\n# comment\n\ngray16\n")
    assert read_split(split) == ["rgb", "gray16"]
    assert [i.rel for i in list_images(d, split=split)] == ["rgb.jpg", "sub/gray16.png"]


def test_list_file_input(corpus, tmp_path):
    d, _ = corpus
    lst = d / "list.txt"
    lst.write_text("rgb.jpg\ngray.png\n")
    assert [i.path.name for i in list_images(lst)] == ["rgb.jpg", "gray.png"]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "nope")


# ------------------------------------------------------------------ identity (issue 12)
def test_identity_keeps_the_extension(tmp_path):
    d = tmp_path / "imgs"
    (d / "a").mkdir(parents=True)
    (d / "b").mkdir()
    for rel in ("a/img.jpg", "a/img.png", "b/img.jpg"):
        _save(Image.new("RGB", (4, 4)), d / rel)
    assert [i.rel for i in list_images(d)] == ["a/img.jpg", "a/img.png", "b/img.jpg"]


def test_two_inputs_with_one_identity_are_refused(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        _save(Image.new("RGB", (4, 4)), tmp_path / sub / "img.jpg")
    with pytest.raises(InputError, match="common parent folder"):
        list_images([tmp_path / "x", tmp_path / "y"])
    # the same image given twice is one image
    assert len(list_images([tmp_path / "x", tmp_path / "x" / "img.jpg"])) == 1


def test_list_file_entries_never_leave_the_root(tmp_path):
    (tmp_path / "lists").mkdir()
    _save(Image.new("RGB", (4, 4)), tmp_path / "up.jpg")
    lst = tmp_path / "lists" / "l.txt"
    lst.write_text(f"../up.jpg\n{tmp_path / 'up.jpg'}\n")
    items = list_images(lst)
    assert len(items) == 1  # one file, listed twice
    assert ".." not in items[0].rel.split("/") and not items[0].rel.startswith("/")


def test_excluded_output_folder_is_not_walked(tmp_path):
    _save(Image.new("RGB", (4, 4)), tmp_path / "a.jpg")
    (tmp_path / "out" / "vis").mkdir(parents=True)
    _save(Image.new("RGB", (4, 4)), tmp_path / "out" / "vis" / "a.jpg.jpg")
    assert [i.rel for i in list_images(tmp_path, exclude=[tmp_path / "out"])] == ["a.jpg"]


def test_symlink_loops_and_dangling_links_are_named_once(tmp_path, caplog):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    _save(Image.new("RGB", (4, 4)), d / "sub" / "ok.jpg")
    os.symlink(d, d / "sub" / "loop")          # a folder link back to an ancestor
    os.symlink(d / "nope.jpg", d / "gone.jpg")  # dangling
    os.symlink(d / "self.jpg", d / "self.jpg")  # a link to itself (ELOOP)
    os.symlink(d / "sub" / "ok.jpg", d / "alias.jpg")  # a good file link
    with caplog.at_level(logging.WARNING, logger="rcnn_cli.images"):
        items = list_images(d)
    assert [i.rel for i in items] == ["alias.jpg", "sub/ok.jpg"]
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 3, msgs
    assert sum("sub/loop: symlink loop" in m for m in msgs) == 1
    assert sum("gone.jpg: dangling symlink" in m for m in msgs) == 1
    assert sum("self.jpg: symlink loop" in m for m in msgs) == 1
