import pytest

from rcnn_cli import config as C


def test_defaults_have_every_section():
    d = C.defaults()
    for s in ("common", "propose", "extract", "finetune", "train_svm", "detect", "evaluate"):
        assert s in d
    assert d["train_svm"]["C"] == 0.001 and d["extract"]["padding"] == 16


def test_precedence_defaults_file_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[propose]\ntop_k = 500\nstrategy = 'quality'\n")
    cfg = C.load(f, {"propose": {"top_k": 100, "seed": None}})
    assert cfg["propose"]["top_k"] == 100          # flag beats file
    assert cfg["propose"]["strategy"] == "quality"  # file beats default
    assert cfg["propose"]["seed"] == 0              # None flag = not given


def test_unknown_key_and_section_named(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[propose]\ntopk = 5\n")
    with pytest.raises(C.ConfigError, match="unknown key propose.topk"):
        C.load(f)
    f.write_text("[proposal]\n")
    with pytest.raises(C.ConfigError, match=r"unknown section \[proposal\]"):
        C.load(f)


def test_type_checked_and_int_to_float(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[propose]\ntop_k = 'many'\n")
    with pytest.raises(C.ConfigError, match="propose.top_k must be int"):
        C.load(f)
    f.write_text("[train_svm]\nC = 1\n")
    assert C.load(f)["train_svm"]["C"] == 1.0
    f.write_text("[propose\n")
    with pytest.raises(C.ConfigError, match="invalid TOML"):
        C.load(f)
    with pytest.raises(C.ConfigError, match="no such config file"):
        C.load(tmp_path / "missing.toml")


def test_dump_roundtrip(tmp_path):
    cfg = C.load()
    p = C.write_resolved(tmp_path, cfg)
    assert C.load(p) == cfg


def test_shipped_override_files_load():
    from pathlib import Path

    for p in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")):
        cfg = C.load(p)
        assert set(cfg) == set(C.defaults())
