"""``run.json``: a record of every command in its output folder.

Each command (propose, extract, finetune, train-svm, detect, evaluate, localize, demo) writes
at its end, from the CLI layer, one record under its name::

    {"rcnn_cli_run_record": 1,
     "runs": {"detect": {"command": "detect", "argv": [...], "cwd": ...,
                         "inputs": [...], "model": ... | null,
                         "resolved": {"device": "cpu", "features": {"mode": ..., "tap": ...}},
                         "settings": {section: {key: value}},   # the resolved config
                         "versions": {"rcnn_cli", "torch", "torchvision", "numpy", "python"},
                         "started": "2026-01-01T12:00:00+00:00", "finished": ...,
                         "seconds": 12.3,
                         "counts": {"images": 10, "done": 9, "skipped": 0, "failed": 1}}}}

``resolved`` says what ``auto`` and empty settings became (device, mode, tap, head...),
taken from what the library used (its stage manifest, the model it returned). A rerun
replaces its own command's record (``evaluate`` writing into a detect folder adds its own
next to detect's). The file is written atomically and only over a ``run.json`` that carries
the marker above: a user's file of that name is never replaced (the command stops before
any work, naming it).
"""
from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from rcnn_cli import __version__

RUN_JSON = "run.json"
MARK = "rcnn_cli_run_record"
RECORD_VERSION = 1
#: the packages whose versions every record carries (besides rcnn_cli and python)
PACKAGES = ("torch", "torchvision", "numpy")


def utc_now() -> str:
    """The current time, UTC, ISO 8601 with seconds (``2026-01-01T12:00:00+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    """Versions of rcnn_cli, torch, torchvision, numpy and python (installed metadata: no
    package is imported; None when one is not installed)."""
    out: dict[str, str | None] = {"rcnn_cli": __version__}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def _is_ours(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get(MARK) == RECORD_VERSION and \
        isinstance(data.get("runs"), dict)


def check_folder(folder: str | Path) -> None:
    """Refuse a folder whose ``run.json`` rcnn did not write (run before any work).

    Raises:
        ForeignFileError: naming the file.
    """
    from rcnn_cli.store import ForeignFileError

    path = Path(folder) / RUN_JSON
    if (path.exists() or path.is_symlink()) and not _is_ours(path):
        raise ForeignFileError(f"{path}: exists and was not written by rcnn; it is never "
                               "replaced, even with --overwrite (move it, or choose another "
                               "output folder)")


def report_counts(report: Any) -> dict[str, int]:
    """Image counts of a :class:`rcnn_cli.runner.Report`."""
    return {"images": report.done + report.skipped + report.failed, "done": report.done,
            "skipped": report.skipped, "failed": report.failed}


def resolved_device(device: str) -> str:
    """What ``--device`` (``auto``, ``cpu``, ``cuda[:N]``) runs on here, as the extractor
    resolves it (:func:`rcnn_cli.features.resolve_device`); without importing torch where
    the answer is the CPU anyway (``cpu``, or ``auto`` with no NVIDIA driver: 3-4 s of
    import at the end of a run whose CNN ran in other processes)."""
    from rcnn_cli.cpus import cuda_possible

    if device == "cpu" or (device == "auto" and not cuda_possible()):
        return "cpu"
    from rcnn_cli.features import resolve_device

    return str(resolve_device(device))


def stage_settings(folder: str | Path) -> dict[str, Any]:
    """The settings a stage keyed its outputs by (its ``manifest.json``), or {}."""
    from rcnn_cli.store import read_manifest

    m = read_manifest(folder)
    return dict(m.get("settings") or {}) if m else {}


def write_run(folder: str | Path, command: str, *, started: str,
              inputs: Iterable[str | Path | None] = (), model: str | Path | None = None,
              resolved: Mapping[str, Any] | None = None,
              settings: Mapping[str, Any] | None = None,
              counts: Mapping[str, Any] | None = None,
              argv: list[str] | None = None) -> Path:
    """Write (or update) ``folder/run.json`` with this command's record; return its path.

    Args:
        folder: the command's output folder (created if missing).
        command: the subcommand (``"detect"``, ``"localize predict"``).
        started: :func:`utc_now` at the command's start.
        inputs: the input paths (None entries are left out); stored absolute.
        model: the model bundle read, if any.
        resolved: what ``auto`` and empty settings became (device, mode, tap, head...).
        settings: the resolved config sections the command ran with.
        counts: images processed, skipped (already done), failed, ...
        argv: the command line (default ``sys.argv``).

    Raises:
        ForeignFileError: ``folder/run.json`` exists and rcnn did not write it.
    """
    from rcnn_cli.store import atomic_write_json

    folder = Path(folder)
    check_folder(folder)
    path = folder / RUN_JSON
    data = json.loads(path.read_text()) if path.exists() else {MARK: RECORD_VERSION,
                                                                "runs": {}}
    finished = utc_now()
    seconds = (datetime.fromisoformat(finished) - datetime.fromisoformat(started))
    data["runs"][command] = _jsonable({
        "command": command, "argv": list(sys.argv if argv is None else argv),
        "cwd": os.getcwd(),
        "inputs": [os.path.abspath(p) for p in inputs if p is not None],
        "model": None if model is None else os.path.abspath(model),
        "resolved": dict(resolved or {}), "settings": dict(settings or {}),
        "versions": package_versions(), "started": started, "finished": finished,
        "seconds": seconds.total_seconds(), "counts": dict(counts or {})})
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)
    return path


def _jsonable(obj: Any) -> Any:
    """Plain-JSON copy (paths and tuples converted, numpy scalars as numbers)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj
