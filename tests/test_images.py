import io
import warnings

import numpy as np
import pytest
from PIL import Image

from rcnn_cli.images import ImageError, list_images, read_image, read_split


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
