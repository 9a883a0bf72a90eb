import logging
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rcnn_cli import __version__
from rcnn_cli.cli import cli
from tests.conftest import cli_in_fresh_python

SUBCOMMANDS = ["propose", "extract", "finetune", "train-svm", "detect", "evaluate", "demo",
               "info"]


def test_help_lists_all_subcommands():
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in r.output


def test_version():
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help_with_example(name):
    r = CliRunner().invoke(cli, [name, "--help"])
    assert r.exit_code == 0 and "Example:" in r.output


def test_unknown_config_key_is_usage_error(tmp_path):
    (tmp_path / "img.png").write_bytes(b"")
    cfg = tmp_path / "c.toml"
    cfg.write_text("[propose]\nbogus = 1\n")
    r = CliRunner().invoke(cli, ["propose", str(tmp_path), "-o", str(tmp_path / "o"),
                                 "--config", str(cfg)])
    assert r.exit_code == 2 and "propose.bogus" in r.output


def test_missing_input_exits_2(tmp_path):
    r = CliRunner().invoke(cli, ["propose", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_bad_shard_is_usage_error(tmp_path):
    r = CliRunner().invoke(cli, ["propose", str(tmp_path), "-o", str(tmp_path / "o"),
                                 "--shard", "3/2"])
    assert r.exit_code == 2 and "0 <= i < n" in r.output


def test_propose_then_changed_setting_is_refused(tmp_path, rect_image):
    img = tmp_path / "imgs"
    img.mkdir()
    Image.fromarray(rect_image[0]).save(img / "a.png")
    (img / "bad.jpg").write_bytes(b"")
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["propose", str(img), "-o", str(out), "--top-k", "50"])
    assert r.exit_code == 1 and "bad.jpg" in r.output and "1 failed" in r.output
    z = np.load(out / "a.png.npz")
    assert z["boxes"].dtype == np.float32 and z["boxes"].shape[1] == 4
    assert 0 < len(z["boxes"]) <= 50 and len(z["scores"]) == len(z["boxes"])
    assert (out / "config.toml").is_file() and (out / "manifest.json").is_file()
    r = CliRunner().invoke(cli, ["propose", str(img / "a.png"), "-o", str(out), "--top-k", "50"])
    assert r.exit_code == 0 and "1 already done" in r.output
    r = CliRunner().invoke(cli, ["propose", str(img / "a.png"), "-o", str(out), "--top-k", "60"])
    assert r.exit_code == 2 and "other settings" in r.output
    r = CliRunner().invoke(cli, ["propose", str(img / "a.png"), "-o", str(out), "--top-k", "60",
                                 "--overwrite"])
    assert r.exit_code == 0 and "1 done" in r.output


def test_evaluate_missing_detections_is_a_file_error(tmp_path):
    from rcnn_cli.datasets import Dataset, ImageRecord, write_csv

    ann = tmp_path / "ann.csv"
    write_csv(ann, Dataset([ImageRecord("a.jpg", 10, 10, np.array([[0, 0, 5, 5]], np.float32),
                                        np.array([0]), np.array([False]))], ["x"], tmp_path))
    (tmp_path / "det").mkdir()
    r = CliRunner().invoke(cli, ["evaluate", "--annotations", str(ann), "--detections",
                                 str(tmp_path / "det")])
    assert r.exit_code == 1 and "detections.csv" in r.output


def test_output_folder_with_only_os_clutter_is_accepted(tmp_path, rect_image):
    img = tmp_path / "imgs"
    img.mkdir()
    Image.fromarray(rect_image[0]).save(img / "a.png")
    out = tmp_path / "o"
    out.mkdir()
    (out / ".DS_Store").write_bytes(b"\0")
    (out / "Thumbs.db").write_bytes(b"\0")
    r = CliRunner().invoke(cli, ["propose", str(img), "-o", str(out), "--method", "sliding",
                                 "--top-k", "5"])
    assert r.exit_code == 0, r.output
    assert (out / "a.png.npz").is_file() and (out / ".DS_Store").read_bytes() == b"\0"


@pytest.mark.parametrize("method", ["opencv", "sliding"])
def test_propose_other_methods_run_through_the_cli(tmp_path, rect_image, method):
    # regression: the CLI passed selective search's settings to every back-end, so both
    # methods failed on every image ("unknown setting(s) ['strategy']")
    img = tmp_path / "imgs"
    img.mkdir()
    Image.fromarray(rect_image[0]).save(img / "a.png")
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["propose", str(img), "-o", str(out), "--method", method,
                                 "--top-k", "30", "--max-side", "160"])
    assert r.exit_code == 0, r.output
    z = np.load(out / "a.png.npz")
    assert 0 < len(z["boxes"]) <= 30 and z["boxes"].dtype == np.float32
    assert (z["boxes"][:, 2:] > z["boxes"][:, :2]).all()
    assert (z["boxes"] >= 0).all() and (z["boxes"][:, [0, 2]] <= 160).all()


def test_proposal_settings_are_what_each_back_end_takes():
    import inspect

    from rcnn_cli import config as C
    from rcnn_cli.proposals import METHODS
    from rcnn_cli.stages import proposal_settings

    for method, fn in METHODS.items():
        p = dict(C.defaults()["propose"], method=method)
        s = proposal_settings(p)
        assert s.pop("method") == method
        accepted = set(inspect.signature(fn).parameters) - {"image", "size"}
        assert set(s) <= accepted, (method, set(s) - accepted)


# ---------------------------------------------------------------- one error path
def _one_line_error(r, *needles, code):
    """Exit ``code``, no traceback, and one error line naming each of ``needles``."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(
        r.exception, SystemExit), r.output
    lines = [ln for ln in r.output.splitlines() if "rror" in ln]
    assert any(all(n in ln for n in needles) for ln in lines), r.output


@pytest.fixture
def props(tmp_path, rect_image):
    """A folder with one tiny image and its proposals."""
    img = tmp_path / "imgs"
    img.mkdir()
    Image.fromarray(rect_image[0]).save(img / "a.png")
    r = CliRunner().invoke(cli, ["propose", str(img), "-o", str(tmp_path / "p"),
                                 "--top-k", "10", "--max-side", "120"])
    assert r.exit_code == 0, r.output
    return img, tmp_path / "p"


def _extract(img, props_dir, out, *extra):
    return CliRunner().invoke(cli, ["extract", str(img), "--proposals", str(props_dir),
                                    "-o", str(out), "--weights", "random",
                                    "--backbone", "resnet18", *extra])


def test_unknown_backbone_and_tap_name_the_flag(tmp_path, props):
    img, p = props
    r = _extract(img, p, tmp_path / "f", "--backbone", "foo")
    _one_line_error(r, "--backbone", "foo", code=2)
    r = _extract(img, p, tmp_path / "f", "--tap", "nope")
    _one_line_error(r, "--tap", "nope", code=2)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[extract]\ntap = 'nope'\n")
    r = _extract(img, p, tmp_path / "f", "--config", str(cfg))
    _one_line_error(r, "--config", "nope", code=2)  # from the file: the file is blamed


@pytest.mark.parametrize("content", [b"garbage\x00\x01", "pickle"])
def test_bad_weights_file_is_one_line_and_never_unpickled(tmp_path, props, content):
    import pickle

    img, p = props
    w = tmp_path / "w.pth"
    if content == "pickle":
        class Boom:  # unpickling this would run code; weights_only must refuse it
            def __reduce__(self):
                return (print, ("unpickled!",))
        w.write_bytes(pickle.dumps({"conv1.weight": Boom()}))
    else:
        w.write_bytes(content)
    r = CliRunner().invoke(cli, ["extract", str(img), "--proposals", str(p), "-o",
                                 str(tmp_path / "f"), "--weights", str(w), "--backbone",
                                 "resnet18"])
    _one_line_error(r, "--weights", "w.pth", code=2)
    assert "unpickled!" not in r.output


def test_non_utf8_config_is_one_line(tmp_path, props):
    img, _ = props
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(b"\xff\xfe\x00binary")
    r = CliRunner().invoke(cli, ["propose", str(img), "-o", str(tmp_path / "o"),
                                 "--config", str(cfg)])
    _one_line_error(r, "--config", "c.toml", code=2)


def test_bad_config_values_are_refused_before_any_work(tmp_path, props):
    img, _ = props
    cfg = tmp_path / "c.toml"
    cfg.write_text("[extract]\ndtype = 'int8'\n")
    r = CliRunner().invoke(cli, ["propose", str(img), "-o", str(tmp_path / "o"),
                                 "--config", str(cfg)])
    _one_line_error(r, "extract.dtype", "int8", code=2)
    assert not (tmp_path / "o").exists()


def test_read_only_output_folder_is_refused_up_front(tmp_path, props, monkeypatch):
    import os

    img, _ = props
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK and
                        str(p).startswith(str(ro)) else real(p, mode, **kw))
    r = CliRunner().invoke(cli, ["propose", str(img), "-o", str(ro / "out")])
    _one_line_error(r, "-o", "ro", code=2)
    assert not (ro / "out").exists()


def test_os_errors_mid_run_are_one_line_with_traceback_only_with_v(tmp_path, props,
                                                                      monkeypatch):
    from rcnn_cli import config as cfgmod

    img, _ = props

    def deny(folder, *a, **kw):
        raise PermissionError(13, "Permission denied", str(folder) + "/config.toml")

    monkeypatch.setattr(cfgmod, "write_resolved", deny)
    r = CliRunner().invoke(cli, ["propose", str(img), "-o", str(tmp_path / "o")])
    _one_line_error(r, "config.toml", "Permission denied", code=1)
    r = CliRunner().invoke(cli, ["propose", str(img), "-o", str(tmp_path / "o2"), "-v"])
    assert r.exit_code == 1 and "Traceback" in r.output


def test_unexpected_errors_are_one_line_and_suggest_v(tmp_path, props, monkeypatch):
    from rcnn_cli import stages

    img, _ = props

    def broken(*a, **kw):
        raise KeyError("extractor")

    monkeypatch.setattr(stages, "propose_folder", broken)
    r = CliRunner().invoke(cli, ["propose", str(img), "-o", str(tmp_path / "o")])
    _one_line_error(r, "KeyError", "-v", code=1)


def test_each_warning_is_printed_once(tmp_path, rect_image):
    # regression: a truncated image was reported twice (warnings.warn, routed to the log by
    # logging.captureWarnings, and log.warning)
    import io

    img = tmp_path / "imgs"
    img.mkdir()
    buf = io.BytesIO()
    Image.fromarray(rect_image[0]).save(buf, "JPEG")
    (img / "t.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    r = CliRunner().invoke(cli, ["propose", str(img), "-o", str(tmp_path / "o"), "--top-k", "5",
                                 "--max-side", "80"])
    assert r.exit_code == 0, r.output
    assert r.output.count("truncated") == 1, r.output


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_refused_before_any_work(tmp_path, rect_image):
    img = tmp_path / "imgs"
    img.mkdir()
    Image.fromarray(rect_image[0]).save(img / "a.png")
    r = CliRunner().invoke(cli, ["propose", str(img), "-o", str(tmp_path / "o"),
                                 "--device", "cuda"])
    _one_line_error(r, "--device", "CUDA is not available", code=2)
    assert not (tmp_path / "o").exists()


def test_main_freezes_the_gc_before_the_interpreter_exits(monkeypatch):
    """The console entry point freezes what is left before the interpreter's exit (its
    collection of torch's objects took 1-1.5 s per command), also when the command failed."""
    import gc

    from rcnn_cli.cli import main

    for argv in (["rcnn", "--help"], ["rcnn", "detect"]):  # success, then a usage error
        gc.unfreeze()
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit):
            main()
        try:
            assert gc.get_freeze_count() > 0, argv
        finally:
            gc.unfreeze()


def test_detect_reports_a_bad_model_before_importing_torch(tmp_path, rect_image):
    """Start-up (issue 16): `rcnn detect` checks its inputs and the model bundle with numpy
    alone, so a wrong --model fails in well under a second instead of after torch's import
    (4-5 s here, 9 s under load); the model and detect modules import no torch or numba."""
    img = tmp_path / "imgs" / "a.png"
    img.parent.mkdir()
    Image.fromarray(rect_image[0]).save(img)
    (tmp_path / "model").mkdir()
    before, [(code, output)], after = cli_in_fresh_python(
        ["detect", img.parent, "--model", tmp_path / "model", "-o", tmp_path / "out",
         "--workers", "2"], preimport=("rcnn_cli.detect", "rcnn_cli.model"), timeout=120)
    assert before == []
    assert code == 1 and "torch" not in after
    assert "model.json: missing file (not a model bundle)" in output
    assert not (tmp_path / "out").exists()


def test_v_shows_our_debug_lines_and_vv_other_libraries_too(tmp_path, props):
    # regression: -v printed thousands of PIL / matplotlib / numba DEBUG lines
    from rcnn_cli.cli import _setup_logging

    img, _ = props
    for flag, filtered in (("-v", True), ("-vv", False)):
        r = CliRunner().invoke(cli, ["propose", str(img), "-o", str(tmp_path / flag), flag])
        assert r.exit_code == 0, r.output
        handler = logging.getLogger().handlers[0]  # as the command left it
        pil = logging.LogRecord("PIL.Png", logging.DEBUG, "", 0, "m", (), None)
        assert bool(handler.filter(pil)) is not filtered, flag
    for verbose, shown in ((0, set()), (1, {"rcnn_cli.x"}), (2, {"rcnn_cli.x", "PIL.Png"})):
        _setup_logging(verbose, 0)
        handler = logging.getLogger().handlers[0]
        kept = {name for name in ("rcnn_cli.x", "PIL.Png")
                if logging.getLogger(name).isEnabledFor(logging.DEBUG)
                and bool(handler.filter(logging.LogRecord(name, logging.DEBUG, "", 0, "m", (), None)))}
        assert kept == shown, verbose
        info = logging.LogRecord("PIL.Png", logging.INFO, "", 0, "m", (), None)
        assert handler.filter(info)  # other libraries' INFO lines stay
    _setup_logging(0, 0)
