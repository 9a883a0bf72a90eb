"""Per-image stage outputs: atomic writes, content keys, a manifest, resume.

The lesson of py-faster-rcnn (stale caches keyed by a dataset name) and of R-CNN's MATLAB
cache (a crash mid-write left a file later runs trusted): every stage folder has a
``manifest.json`` holding a *key* = sha256(stage name, format version, stage settings,
upstream key). Each per-image ``.npz`` is written to a temp name in the same folder and
``os.replace``-d into place, and carries the key in an array ``_key``. An image is *done*
only if its file exists, loads, and carries the current key, so

* an interrupted run resumes where it stopped (finished images are skipped);
* a half-written file never exists under the real name;
* a changed setting with the same output folder is refused (:class:`StaleStoreError`), or,
  with ``overwrite=True``, every image is recomputed (old files fail the key check).

Layout: ``OUT/manifest.json``, ``OUT/config.toml`` (resolved settings) and
``OUT/<relative/path/of/image/without/extension>.npz``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rcnn_cli import __version__

MANIFEST = "manifest.json"


class StaleStoreError(RuntimeError):
    """The output folder holds results made with other settings."""


# ------------------------------------------------------------------------------- atomic I/O
def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = True) -> None:
    """Write bytes to ``path`` through a temp file in the same folder and ``os.replace``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path}: exists (use --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(path: str | Path, obj: Any, overwrite: bool = True) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", overwrite)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write arrays to an ``.npz`` atomically (see :func:`npz_bytes`)."""
    atomic_write_bytes(path, npz_bytes(arrays))


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An uncompressed ``.npz`` (fast to write and to read) as bytes.

    Same layout as ``np.savez``, but every zip entry carries a fixed date, so the same
    arrays give the same bytes on every run and machine (outputs can be compared whole).
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for k, v in arrays.items():
            info = zipfile.ZipInfo(f"{k}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(v), allow_pickle=False)
    return buf.getvalue()


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` (never with pickle)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------------- keys
def settings_key(stage: str, settings: Mapping[str, Any], upstream_key: str | None = None,
                 format_version: int = 1) -> str:
    """Hex sha256 over the canonical JSON of (stage, format version, settings, upstream key)."""
    blob = json.dumps({"stage": stage, "format": format_version, "settings": settings,
                       "upstream": upstream_key}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def read_manifest(folder: str | Path) -> dict | None:
    """The stage manifest of a folder, or None if it has none."""
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class StageStore:
    """The output folder of one stage.

    Args:
        root: the output folder (created).
        stage: stage name ("propose", "extract", ...).
        settings: JSON-able settings that determine the outputs.
        upstream_key: key of the stage whose outputs this one reads (or None).
        format_version: bump when the file layout changes.
        overwrite: accept a folder made with other settings (its images are recomputed).

    Raises:
        StaleStoreError: the folder holds another stage's or other settings' outputs and
            ``overwrite`` is False.
    """

    def __init__(self, root: str | Path, stage: str, settings: Mapping[str, Any],
                 upstream_key: str | None = None, format_version: int = 1,
                 overwrite: bool = False):
        self.root = Path(root)
        self.stage = stage
        self.settings = dict(settings)
        self.upstream_key = upstream_key
        self.key = settings_key(stage, self.settings, upstream_key, format_version)
        old = read_manifest(self.root)
        if old is not None and old.get("key") != self.key and not overwrite:
            what = ("another stage (" + str(old.get("stage")) + ")"
                    if old.get("stage") != stage else "other settings")
            raise StaleStoreError(
                f"{self.root}: holds {stage} outputs made with {what} "
                f"(key {old.get('key')} != {self.key}); choose another output folder "
                "or pass --overwrite to recompute")
        if self.root.exists() and not self.root.is_dir():
            raise StaleStoreError(f"{self.root}: exists and is not a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = {"stage": stage, "key": self.key, "format_version": format_version,
                    "upstream_key": upstream_key, "settings": self.settings,
                    "rcnn_cli_version": __version__}
        if old != manifest:
            atomic_write_json(self.root / MANIFEST, manifest)

    def path_for(self, rel_stem: str) -> Path:
        """File of one image, from its relative path without extension."""
        return self.root / f"{rel_stem}.npz"

    def is_done(self, rel_stem: str) -> bool:
        """True if the image's file exists, is readable and carries this store's key."""
        p = self.path_for(rel_stem)
        if not p.is_file():
            return False
        try:
            with np.load(p, allow_pickle=False) as z:
                return "_key" in z.files and str(z["_key"]) == self.key
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            return False

    def save(self, rel_stem: str, arrays: Mapping[str, np.ndarray]) -> Path:
        """Write one image's arrays (plus the key) atomically; return the path."""
        p = self.path_for(rel_stem)
        save_npz(p, {**arrays, "_key": np.array(self.key)})
        return p

    def load(self, rel_stem: str) -> dict[str, np.ndarray]:
        """Arrays of one image (without the key)."""
        d = load_npz(self.path_for(rel_stem))
        d.pop("_key", None)
        return d

    def done_stems(self) -> list[str]:
        """Relative stems of every finished image in the folder, sorted."""
        out = []
        for p in sorted(self.root.rglob("*.npz")):
            rel = p.relative_to(self.root).with_suffix("").as_posix()
            if self.is_done(rel):
                out.append(rel)
        return out


def open_upstream(root: str | Path, stage: str) -> StageStore:
    """Open an existing stage folder for reading (its manifest gives settings and key).

    Raises:
        FileNotFoundError: the folder has no manifest of that stage.
    """
    m = read_manifest(root)
    if m is None:
        raise FileNotFoundError(f"{root}: not a {stage} output folder (no {MANIFEST})")
    if m.get("stage") != stage:
        raise FileNotFoundError(f"{root}: holds {m.get('stage')} outputs, expected {stage}")
    store = StageStore.__new__(StageStore)
    store.root, store.stage, store.settings = Path(root), stage, m.get("settings", {})
    store.upstream_key, store.key = m.get("upstream_key"), m["key"]
    return store
