"""Per-stage settings: strict load, merge, dump, hash.

Precedence (black's model): built-in defaults (``rcnn_cli/default.toml``, also shown as
``configs/default.toml``) < a ``--config`` TOML file < command-line flags. A key that the
defaults do not have is rejected with its name, and a value of the wrong type is rejected
with the key, the expected type and the value, so a typo never silently does nothing.
"""
from __future__ import annotations

import copy
import json
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad config file or value (one line, names the file and key)."""


def defaults() -> dict[str, dict[str, Any]]:
    """The built-in defaults, one table per section."""
    text = resources.files("rcnn_cli").joinpath("default.toml").read_text()
    return tomllib.loads(text)


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
                          f"got {value!r}")
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
            out[section][key] = _check_type(where, f"{section}.{key}", value,
                                            out[section][key])
    return out


def load(path: str | Path | None = None,
         overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides`` (flags).

    ``overrides`` values that are None are ignored (flags the user did not give).
    """
    cfg = defaults()
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML ({e})") from None
        cfg = merge(cfg, data, where=str(p))
    if overrides:
        clean = {s: {k: v for k, v in t.items() if v is not None} for s, t in overrides.items()}
        cfg = merge(cfg, clean, where="command line")
    return cfg


def explicit_keys(path: str | Path | None, section: str) -> dict[str, Any]:
    """The keys of ``section`` that a config file sets itself (not inherited defaults)."""
    if path is None:
        return {}
    try:
        return dict(tomllib.loads(Path(path).read_text()).get(section, {}))
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if v is None:
        return '""'
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps(cfg: Mapping[str, Mapping[str, Any]]) -> str:
    """TOML text of a config (sections of scalars and lists; what :func:`load` reads back)."""
    lines = []
    for section, table in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)


def write_resolved(folder: str | Path, cfg: Mapping[str, Mapping[str, Any]],
                   sections: list[str] | None = None) -> Path:
    """Write the resolved config (optionally only some sections) to ``folder/config.toml``."""
    from rcnn_cli.store import atomic_write_text

    sub = {s: cfg[s] for s in (sections or list(cfg)) if s in cfg}
    path = Path(folder) / "config.toml"
    atomic_write_text(path, "# settings this command ran with (rcnn_cli)\n" + dumps(sub))
    return path
