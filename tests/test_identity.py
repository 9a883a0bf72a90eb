"""One identity per image, nothing stale, nothing foreign (issue 12), through the CLI."""
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rcnn_cli.cli import cli
from tests.conftest import rectangles_image

PROPOSE = ["--top-k", "20", "--max-side", "64"]


def _images(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    for name, (h, w) in sizes.items():
        img, _ = rectangles_image(h, w, seed=len(name))
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / name)
    return folder


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _touch_newer(path, img_size):
    """Replace an image by another one (other size), with a new mtime."""
    img, _ = rectangles_image(*img_size, seed=9)
    Image.fromarray(img).save(path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_jpg_and_png_of_one_stem_get_their_own_proposals(tmp_path):
    imgs = _images(tmp_path / "imgs", {"img.jpg": (60, 80), "img.png": (90, 50),
                                       "a/img.jpg": (70, 70)})
    out = tmp_path / "props"
    r = _run("propose", imgs, "-o", out, *PROPOSE)
    assert r.exit_code == 0, r.output
    sizes = {p.relative_to(out).as_posix(): tuple(np.load(p)["image_size"])
             for p in out.rglob("*.npz")}
    assert sizes == {"img.jpg.npz": (60, 80), "img.png.npz": (90, 50),
                     "a/img.jpg.npz": (70, 70)}


def test_replaced_image_and_swapped_record_are_recomputed(tmp_path):
    imgs = _images(tmp_path / "imgs", {"a.jpg": (60, 80), "b.jpg": (80, 60)})
    out = tmp_path / "props"
    assert _run("propose", imgs, "-o", out, *PROPOSE).exit_code == 0
    r = _run("propose", imgs, "-o", out, *PROPOSE)
    assert "0 done, 2 already done" in r.output
    # a replaced image is proposed again, with its new size
    _touch_newer(imgs / "a.jpg", (50, 50))
    r = _run("propose", imgs, "-o", out, *PROPOSE)
    assert r.exit_code == 0 and "1 done, 1 already done" in r.output, r.output
    assert tuple(np.load(out / "a.jpg.npz")["image_size"]) == (50, 50)
    # another image's record copied over b's is not "already done"
    shutil.copyfile(out / "a.jpg.npz", out / "b.jpg.npz")
    r = _run("propose", imgs, "-o", out, *PROPOSE)
    assert r.exit_code == 0 and "1 done, 1 already done" in r.output, r.output
    assert tuple(np.load(out / "b.jpg.npz")["image_size"]) == (80, 60)


def test_extract_refuses_stale_proposals_and_redoes_changed_images(tmp_path):
    imgs = _images(tmp_path / "imgs", {"a.jpg": (60, 80), "b.jpg": (80, 60)})
    props, feats = tmp_path / "props", tmp_path / "feats"
    assert _run("propose", imgs, "-o", props, *PROPOSE).exit_code == 0
    ext = ["extract", imgs, "--proposals", props, "-o", feats, "--weights", "random"]
    r = _run(*ext)
    assert r.exit_code == 0, r.output
    # proposals swapped: b's record is a's file -> b fails with a clear line
    saved = (props / "b.jpg.npz").read_bytes()
    shutil.copyfile(props / "a.jpg.npz", props / "b.jpg.npz")
    os.remove(feats / "b.jpg.npz")
    r = _run(*ext)
    assert r.exit_code == 1 and "b.jpg: no proposals" in r.output, r.output
    (props / "b.jpg.npz").write_bytes(saved)
    # the image changed after propose: its proposals are stale, extract says so
    _touch_newer(imgs / "a.jpg", (50, 50))
    r = _run(*ext)
    assert r.exit_code == 1 and "a.jpg: proposals made from an older version" in r.output
    # propose again: a is re-extracted (not "already done"); b was done by the last run
    assert _run("propose", imgs, "-o", props, *PROPOSE).exit_code == 0
    r = _run(*ext)
    assert r.exit_code == 0 and "1 done, 1 already done" in r.output, r.output
    assert tuple(np.load(feats / "a.jpg.npz")["image_size"]) == (50, 50)
    r = _run(*ext)
    assert "0 done, 2 already done" in r.output
    # proposals recomputed after extract (same image): the features are redone
    os.remove(props / "b.jpg.npz")
    assert _run("propose", imgs, "-o", props, *PROPOSE).exit_code == 0
    os.utime(imgs / "b.jpg")  # same pixels, new mtime -> new proposal record id
    assert _run("propose", imgs, "-o", props, *PROPOSE).exit_code == 0
    r = _run(*ext)
    assert r.exit_code == 0 and "1 done, 1 already done" in r.output, r.output


@pytest.mark.parametrize("where", ["input", "inside", "foreign"])
def test_output_folder_that_is_an_input_or_foreign_is_refused(tmp_path, where):
    imgs = _images(tmp_path / "imgs", {"a.jpg": (60, 80)})
    out = {"input": imgs, "inside": imgs / "out", "foreign": tmp_path / "mine"}[where]
    if where == "foreign":
        out.mkdir()
        (out / "thesis.tex").write_text("precious")
    r = _run("propose", imgs, "-o", out, *PROPOSE)
    assert r.exit_code == 2, r.output
    assert ("did not write" if where == "foreign" else "input") in r.output
    assert not (out / "manifest.json").exists()
    r = _run("propose", imgs, "-o", out, *PROPOSE, "--overwrite")
    assert r.exit_code == 0, r.output
    assert "1 done" in r.output  # the tool does not read its own outputs back
    if where == "foreign":
        assert (out / "thesis.tex").read_text() == "precious"


def test_user_file_under_an_output_name_is_never_replaced(tmp_path):
    imgs = _images(tmp_path / "imgs", {"a.jpg": (60, 80)})
    out = tmp_path / "props"
    out.mkdir()
    np.savez(out / "a.jpg.npz", mine=np.arange(3))
    r = _run("propose", imgs, "-o", out, *PROPOSE, "--overwrite")
    assert r.exit_code == 1 and "not written by rcnn" in r.output, r.output
    assert list(np.load(out / "a.jpg.npz")) == ["mine"]


def test_two_input_folders_with_one_identity_exit_2(tmp_path):
    _images(tmp_path / "x", {"img.jpg": (60, 80)})
    _images(tmp_path / "y", {"img.jpg": (60, 80)})
    r = _run("propose", tmp_path / "x", tmp_path / "y", "-o", tmp_path / "o", *PROPOSE)
    assert r.exit_code == 2 and "common parent folder" in r.output, r.output
    assert "Traceback" not in r.output


def test_detect_and_train_refuse_foreign_output_folders_before_work(tmp_path):
    imgs = _images(tmp_path / "imgs", {"a.jpg": (60, 80)})
    (tmp_path / "model").mkdir()
    out = tmp_path / "det"
    out.mkdir()
    (out / "detections.csv").write_text("my own results\n")
    det = ["detect", imgs, "--model", tmp_path / "model", "-o", out]
    r = _run(*det)
    assert r.exit_code == 2 and "did not write" in r.output, r.output
    r = _run(*det, "--overwrite")
    assert r.exit_code == 2 and "detections.csv: exists and was not written" in r.output
    assert (out / "detections.csv").read_text() == "my own results\n"
    r = _run("detect", imgs, "--model", tmp_path / "model", "-o", imgs / "det")
    assert r.exit_code == 2 and "is inside the input" in r.output, r.output
    # train-svm: a folder holding someone else's files, and the features folder itself
    (tmp_path / "feats").mkdir()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.npz").write_bytes(b"not ours")
    r = _run("train-svm", "--features", tmp_path / "feats", "-o", bundle)
    assert r.exit_code == 2 and "did not write" in r.output, r.output
    r = _run("train-svm", "--features", tmp_path / "feats", "-o", bundle, "--overwrite")
    assert r.exit_code == 2 and "model.npz: exists and was not written" in r.output
    assert (bundle / "model.npz").read_bytes() == b"not ours"
    r = _run("train-svm", "--features", tmp_path / "feats", "-o", tmp_path / "feats")
    assert r.exit_code == 2 and "is the input" in r.output, r.output
