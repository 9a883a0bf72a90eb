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


def test_dump_keeps_types_and_refuses_none(tmp_path):
    """tomli-w writes what load reads back, type for type; None (TOML has no null) is an
    error naming the key, not an empty string that reads back as a str."""
    import tomllib

    cfg = C.load(None, {"propose": {"sliding_stride": 0.5, "top_k": 7}})
    back = tomllib.loads(C.dumps(cfg))
    assert back == cfg
    assert all(type(back[s][k]) is type(v) for s, t in cfg.items() for k, v in t.items())
    assert back["extract"]["tap"] == "" and isinstance(back["train_svm"]["pos_weight"], float)
    with pytest.raises(TypeError, match="extract.tap"):
        C.dumps({"extract": {"tap": None}})


def test_packaged_and_configs_default_toml_agree():
    """configs/default.toml shows the packaged defaults: a link or a copy, it must say the
    same (comments included), and config.defaults() reads that text."""
    import tomllib
    from importlib import resources
    from pathlib import Path

    shown = Path(__file__).resolve().parents[1] / "configs" / "default.toml"
    packaged = resources.files("rcnn_cli").joinpath("default.toml").read_text()
    assert shown.read_text() == packaged, "configs/default.toml differs from rcnn_cli/default.toml"
    assert tomllib.loads(shown.read_text()) == C.defaults()


def test_shipped_override_files_load():
    from pathlib import Path

    for p in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")):
        cfg = C.load(p)
        assert set(cfg) == set(C.defaults())


# ---------------------------------------------------------------- value rules (schema)
@pytest.mark.parametrize("section,key,bad", [
    ("extract", "dtype", "int8"),          # regression: int8 features were stored
    ("extract", "mode", "fast"),
    ("detect", "nms_iou", 7.5),            # regression: accepted
    ("detect", "max_per_image", -1),       # regression: accepted
    ("detect", "formats", ["csv", "bogus"]),
    ("detect", "formats", []),
    ("common", "device", "gpu"),
    ("common", "executor", "slurm"),
    ("common", "shard", "3/2"),
    ("common", "workers", 0),
    ("propose", "method", "edge_boxes"),
    ("propose", "strategy", "fastest"),
    ("propose", "top_k", -5),
    ("propose", "sliding_stride", 0.0),
    ("propose", "sliding_scales", [0.5, -1.0]),
    ("train_svm", "solver", "sgd"),
    ("train_svm", "head", "mlp"),
    ("train_svm", "C", 0.0),
    ("train_svm", "neg_overlap", 1.5),
    ("finetune", "iterations", 0),
    ("finetune", "lr", float("nan")),
    ("evaluate", "iou", 0.0),
])
def test_bad_values_are_rejected_with_the_key(tmp_path, section, key, bad):
    f = tmp_path / "c.toml"
    f.write_text(C.dumps({section: {key: bad}}).replace("nan", "nan"))
    with pytest.raises(C.ConfigError, match=rf"{section}\.{key}") as e:
        C.load(f)
    assert e.value.key == f"{section}.{key}" and str(f) in str(e.value)
    with pytest.raises(C.ConfigError, match=rf"{section}\.{key}"):  # flags: same rules
        C.load(None, {section: {key: bad}})


def test_every_default_passes_its_rule_and_every_rule_names_a_default_key():
    d = C.defaults()
    for key in C.RULES:
        section, name = key.split(".")
        assert name in d[section], key
        assert C.check_value(key, d[section][name]) is None, key
    for section, table in d.items():  # every enumerated or ranged number has a rule
        for name, v in table.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                assert f"{section}.{name}" in C.RULES, f"{section}.{name}"


def test_good_values_pass(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[extract]\ndtype = 'float32'\n[detect]\nformats = ['voc', 'yolo']\n"
                 "nms_iou = 1.0\n[common]\nshard = '1/4'\ndevice = 'cuda:1'\n")
    cfg = C.load(f)
    assert cfg["extract"]["dtype"] == "float32" and cfg["common"]["shard"] == "1/4"


def test_non_utf8_or_binary_config_is_one_config_error(tmp_path):
    f = tmp_path / "c.toml"
    f.write_bytes(b"\xff\xfe\x00\x01binary\x00")
    with pytest.raises(C.ConfigError, match="c.toml"):
        C.load(f)
    f.write_bytes("[propose]\ntop_k = 5 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(C.ConfigError, match="UTF-8"):
        C.load(f)
    d = tmp_path / "dir.toml"
    d.mkdir()
    with pytest.raises(C.ConfigError, match="dir.toml"):
        C.load(d)


def test_every_shipped_config_file_loads():
    """configs/*.toml are documented starting points: each must pass the same checks as a
    user's file (unknown keys and bad values are refused)."""
    from pathlib import Path

    from rcnn_cli import config

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
    assert {f.name for f in files} >= {"default.toml", "quality.toml", "gpu.toml"}
    for f in files:
        config.load(str(f))
    assert config.load(str(files[[f.name for f in files].index("quality.toml")]))[
        "extract"]["keep"] == "all"
