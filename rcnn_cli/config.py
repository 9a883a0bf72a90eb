"""Per-stage settings: strict load, merge, dump, hash.

Precedence (black's model): built-in defaults (``rcnn_cli/default.toml``, also shown as
``configs/default.toml``) < a ``--config`` TOML file < command-line flags. A key that the
defaults do not have is rejected with its name, and a value of the wrong type is rejected
with the key, the expected type and the value, so a typo never silently does nothing.
Values are then checked against :data:`RULES` (allowed choices and ranges, next to the
defaults), from a file and from flags alike, so a bad value stops a command before any work.
"""
from __future__ import annotations

import copy
import functools
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w


class ConfigError(ValueError):
    """A bad config file or setting value (one line, names the file and key).

    ``key`` is ``"section.name"`` when one setting is at fault (the CLI then names the flag
    that set it, or the config file); library code raises it for settings it checks itself
    (backbone, tap, weights, device).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------- value rules
Rule = Callable[[Any], "str | None"]


def _finite(v: Any) -> bool:
    return not isinstance(v, float) or math.isfinite(v)


def one_of(*choices: str) -> Rule:
    """The value is one of ``choices``."""
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def in_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
             hi_open: bool = False) -> Rule:
    """A finite number in [lo, hi] (``lo_open`` / ``hi_open`` exclude the ends)."""
    lo_s = "-inf" if lo is None else repr(lo)
    hi_s = "inf" if hi is None else repr(hi)
    text = f"{'(' if lo_open else '['}{lo_s}, {hi_s}{')' if hi_open else ']'}"

    def rule(v: Any) -> str | None:
        ok = _finite(v) and (lo is None or (v > lo if lo_open else v >= lo)) and \
            (hi is None or (v < hi if hi_open else v <= hi))
        return None if ok else f"must be in {text}"
    return rule


def at_least(lo: int) -> Rule:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def finite(v: Any) -> str | None:
    return None if _finite(v) else "must be a finite number"


def subset_of(*choices: str) -> Rule:
    """A non-empty list of distinct items of ``choices``."""
    def rule(v: list) -> str | None:
        if not v or any(x not in choices for x in v) or len(set(v)) != len(v):
            return f"must be a non-empty list of distinct items of {', '.join(choices)}"
        return None
    return rule


def positive_list(v: list) -> str | None:
    ok = bool(v) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and
                         _finite(x) and x > 0 for x in v)
    return None if ok else "must be a non-empty list of positive numbers"


def _scale_pair(v: list) -> str | None:
    ok = (len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
          and 32 <= v[0] <= v[1])
    return None if ok else "must be [shorter side, longer-side cap]: integers, 32 <= first <= second"


def _device(v: str) -> str | None:
    return None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) else \
        "must be auto, cpu, cuda or cuda:N"


def _shard(v: str) -> str | None:
    if not v:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", v.strip())
    if m is None:
        return "must look like 'i/n' (e.g. 0/4)"
    return None if int(m.group(1)) < int(m.group(2)) else "must satisfy 0 <= i < n"


_PROB = in_range(0.0, 1.0)
#: Allowed values of every enumerated or ranged setting (checked after the type check, for
#: the config file, flags and the thresholds stored in a model bundle alike).
RULES: dict[str, Rule] = {
    "common.workers": at_least(1),
    "common.device": _device,
    "common.executor": one_of("local", "dask", "ray"),
    "common.shard": _shard,
    "propose.method": one_of("selective_search", "opencv", "sliding"),
    "propose.strategy": one_of("single", "fast", "quality"),
    "propose.max_side": at_least(0),        # 0 = keep the original size
    "propose.min_size": at_least(0),
    "propose.top_k": at_least(0),           # 0 = keep every box
    "propose.seed": at_least(0),
    "propose.sliding_scales": positive_list,
    "propose.sliding_ratios": positive_list,
    "propose.sliding_stride": in_range(0.0, 1.0, lo_open=True),
    "extract.mode": one_of("auto", "warp", "shared"),
    "extract.padding": at_least(0),
    "extract.shared_scale": _scale_pair,
    "extract.dtype": one_of("float16", "float32"),
    "extract.batch_size": at_least(1),
    "extract.max_proposals": at_least(1),
    "extract.keep": one_of("all", "train"),
    "extract.keep_near_iou": in_range(0.0, 1.0),  # 0 = by the dataset's size
    "extract.keep_background": at_least(0),
    "extract.keep_seed": at_least(0),
    "finetune.iterations": at_least(1),
    "finetune.batch_size": at_least(1),
    "finetune.fg_per_batch": at_least(1),
    "finetune.images_per_batch": at_least(1),
    "finetune.fg_iou": in_range(0.0, 1.0, lo_open=True),
    "finetune.lr": in_range(0.0, lo_open=True),
    "finetune.new_layer_lr_mult": in_range(0.0, lo_open=True),
    "finetune.momentum": in_range(0.0, 1.0, hi_open=True),
    "finetune.weight_decay": in_range(0.0),
    "finetune.step_size": at_least(0),
    "finetune.val_fraction": in_range(0.0, 1.0, hi_open=True),
    "finetune.seed": at_least(0),
    "train_svm.C": in_range(0.0, lo_open=True),
    "train_svm.pos_weight": in_range(0.0, lo_open=True),
    "train_svm.bias_mult": in_range(0.0),
    "train_svm.neg_overlap": _PROB,
    "train_svm.hard_thresh": finite,
    "train_svm.evict_thresh": finite,
    "train_svm.retrain_limit": at_least(1),
    "train_svm.feat_norm": in_range(0.0, lo_open=True),
    "train_svm.solver": one_of("liblinear", "torch"),
    "train_svm.head": one_of("auto", "fc", "none"),
    "train_svm.head_hidden": at_least(1),
    "train_svm.head_iterations": at_least(1),
    "train_svm.head_lr": in_range(0.0, lo_open=True),
    "train_svm.head_bg_per_image": at_least(1),
    "train_svm.bbox_lambda": in_range(0.0),
    "train_svm.bbox_min_overlap": _PROB,
    "train_svm.seed": at_least(0),
    "detect.nms_iou": _PROB,
    "detect.score_thresh": finite,
    "detect.max_per_image": at_least(1),
    "detect.formats": subset_of("csv", "coco", "voc", "yolo"),
    "detect.vis_thresh": finite,
    "detect.nms": one_of("hard", "soft"),
    "detect.box_vote_iou": _PROB,
    "evaluate.iou": in_range(0.0, 1.0, lo_open=True),
    "localize.backbone": one_of("mobilenet_v2", "resnet18", "resnet50", "vgg16", "alexnet"),
    "localize.input_size": lambda v: None if v == 0 or v >= 32 else "must be 0 or >= 32",
    "localize.attach": one_of("conv", "fc"),
    "localize.loss": one_of("l2", "smooth_l1"),
    "localize.parts": at_least(0),          # 0 = one object box per image
    "localize.hidden": at_least(1),
    "localize.iterations": at_least(1),
    "localize.batch_size": at_least(1),
    "localize.lr": in_range(0.0, lo_open=True),
    "localize.seed": at_least(0),
    "localize.formats": subset_of("csv", "coco", "voc", "yolo"),
}


def check_value(key: str, value: Any) -> str | None:
    """The problem with ``value`` for setting ``key`` ("section.name"), or None if it is
    allowed (keys without a rule allow anything of the right type)."""
    rule = RULES.get(key)
    return None if rule is None else rule(value)


def defaults() -> dict[str, dict[str, Any]]:
    """The built-in defaults, one table per section."""
    text = resources.files("rcnn_cli").joinpath("default.toml").read_text()
    return tomllib.loads(text)


@functools.cache
def _parsed_defaults() -> dict[str, dict[str, Any]]:
    return defaults()


def default(key: str) -> Any:
    """The built-in default of setting ``key`` (``"section.name"``) from
    ``rcnn_cli/default.toml``: library defaults read it here, so the TOML is the one place a
    default value is written.

    Raises:
        KeyError: no such setting.
    """
    section, name = key.split(".", 1)
    return copy.deepcopy(_parsed_defaults()[section][name])


def _check_type(where: str, key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{where}: {key} must be {type(default).__name__}, "
                          f"got {value!r}", key=key)
    return value


def merge(base: Mapping[str, Mapping[str, Any]], override: Mapping[str, Any],
          where: str = "config") -> dict[str, dict[str, Any]]:
    """Return ``base`` updated by ``override`` ({section: {key: value}}), strictly.

    Raises:
        ConfigError: unknown section or key, or a value of the wrong type.
    """
    out = copy.deepcopy({k: dict(v) for k, v in base.items()})
    for section, table in override.items():
        if section not in out:
            raise ConfigError(f"{where}: unknown section [{section}] "
                              f"(known: {', '.join(sorted(out))})")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: [{section}] must be a table")
        for key, value in table.items():
            if key not in out[section]:
                raise ConfigError(f"{where}: unknown key {section}.{key} "
                                  f"(known: {', '.join(sorted(out[section]))})")
            name = f"{section}.{key}"
            value = _check_type(where, name, value, out[section][key])
            problem = check_value(name, value)
            if problem:
                raise ConfigError(f"{where}: {name} {problem}, got {value!r}", key=name)
            out[section][key] = value
    return out


def load(path: str | Path | None = None,
         overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides`` (flags).

    ``overrides`` values that are None are ignored (flags the user did not give).
    """
    cfg = defaults()
    if path is not None:
        p = Path(path)
        data = _read_toml(p)
        cfg = merge(cfg, data, where=str(p))
    if overrides:
        clean = {s: {k: v for k, v in t.items() if v is not None} for s, t in overrides.items()}
        cfg = merge(cfg, clean, where="command line")
    return cfg


def _read_toml(p: Path) -> dict[str, Any]:
    """The TOML table of a config file, or ConfigError naming the file (one line)."""
    try:
        return tomllib.loads(p.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a folder, not a config file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 text file (byte {e.start}); a config is "
                          "TOML text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML ({e})") from None


def explicit_keys(path: str | Path | None, section: str) -> dict[str, Any]:
    """The keys of ``section`` that a config file sets itself (not inherited defaults)."""
    if path is None:
        return {}
    try:
        return dict(_read_toml(Path(path)).get(section, {}))
    except ConfigError:
        return {}


def dumps(cfg: Mapping[str, Mapping[str, Any]]) -> str:
    """TOML text of a config (sections of scalars and lists; what :func:`load` reads back,
    types included), written by tomli-w.

    Raises:
        TypeError: a value TOML cannot hold, e.g. None (TOML has no null; naming the key).
    """
    for section, table in cfg.items():
        for key, value in table.items():
            if value is None:
                raise TypeError(f"cannot write {section}.{key} = None to TOML (TOML has no "
                                "null)")
    return tomli_w.dumps({s: dict(t) for s, t in cfg.items()})


def write_resolved(folder: str | Path, cfg: Mapping[str, Mapping[str, Any]],
                   sections: list[str] | None = None) -> Path:
    """Write the resolved config (optionally only some sections) to ``folder/config.toml``."""
    from rcnn_cli.store import atomic_write_text

    sub = {s: cfg[s] for s in (sections or list(cfg)) if s in cfg}
    path = Path(folder) / "config.toml"
    atomic_write_text(path, "# settings this command ran with (rcnn_cli)\n" + dumps(sub))
    return path
