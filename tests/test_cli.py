
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rcnn_cli import __version__
from rcnn_cli.cli import cli

SUBCOMMANDS = ["propose", "extract", "finetune", "train-svm", "detect", "evaluate", "demo"]


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
    z = np.load(out / "a.npz")
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
    z = np.load(out / "a.npz")
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
