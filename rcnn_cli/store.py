"""Per-image stage outputs: atomic writes, content keys, a manifest, resume.

The lesson of py-faster-rcnn (stale caches keyed by a dataset name) and of R-CNN's MATLAB
cache (a crash mid-write left a file later runs trusted): every stage folder has a
``manifest.json`` holding a *key* = sha256(stage name, format version, stage settings,
upstream key). Each per-image ``.npz`` is written to a temp name in the same folder and
``os.replace``-d into place, and carries, next to its arrays, who it is and what it was
made from (black's cache records size and mtime the same way), as one JSON string in the
array ``_identity`` (one small read per check):

* ``key``: the store's key (settings);
* ``rel``: the image's identity, its path relative to the input root *with* extension;
* ``source``: ``[size, mtime_ns]`` of the input image when it was read (``[]``: unknown);
* ``upstream``: the ``id`` of the upstream stage's record it read ("" for none);
* ``id``: sha256 of the four above, the record's own identity (downstream records store it).

An image is *done* only if its file exists, loads, and carries the current key, its own
relative path, the current size and mtime of the image and the current id of its upstream
record, so

* an interrupted run resumes where it stopped (finished images are skipped);
* a half-written file never exists under the real name;
* a replaced image, a recomputed upstream record or a record copied over another image's
  file is recomputed, never "already done";
* a changed setting with the same output folder is refused (:class:`StaleStoreError`), or,
  with ``overwrite=True``, every image is recomputed (old files fail the key check).

Output folders are checked before any work (:func:`check_output_folder`, and the store
itself): a folder that holds files rcnn did not write (no manifest) is refused
(:class:`ForeignFolderError`) unless ``overwrite``; even then no file rcnn did not write is
replaced. Temp files left by a killed run (``.<name>.*.tmp``, untouched for
:data:`STALE_TMP_SECONDS`) are removed when the folder is opened again.

Layout: ``OUT/manifest.json``, ``OUT/config.toml`` (resolved settings) and
``OUT/<relative/path/of/image.ext>.npz`` (``img.jpg`` and ``img.png`` are two files).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rcnn_cli import __version__

log = logging.getLogger("rcnn_cli.store")

MANIFEST = "manifest.json"
#: a temp file untouched this long (seconds) belongs to a dead writer; younger ones may be
#: another shard's file being written right now
STALE_TMP_SECONDS = 60.0
#: names every stage folder gets besides the per-image files
_STAGE_FILES = (MANIFEST, "config.toml")


class StaleStoreError(RuntimeError):
    """The output folder holds results made with other settings."""


class ForeignFolderError(StaleStoreError, FileExistsError):
    """The output folder holds files rcnn did not write, or is (inside) an input folder."""


class ForeignFileError(FileExistsError):
    """A file rcnn would write exists and was not written by rcnn (it is never replaced)."""


class StaleRecordError(ValueError):
    """A per-image record does not belong where it lies (other settings, other image)."""


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
        # mkstemp creates 0600; a file written with open() would get 0666 & ~umask
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_UMASK: int | None = None


def _umask() -> int:
    """The process umask (read once: reading it means setting it)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


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


def class_names_problem(classes: Any) -> str | None:
    """What is wrong with a bundle's ``classes`` list (model, localizer), or None."""
    if not classes or not all(isinstance(c, str) and c for c in classes):
        return "'classes' must be a non-empty list of names"
    if len(set(classes)) != len(classes):
        return f"duplicate class names in {classes}"
    return None


def read_bundle(directory: str | Path, json_name: str, arrays_name: str, version: int,
                error: type[Exception], what: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON and the arrays of a bundle folder (model, localizer), checked as files.

    Checks, each failure one ``error`` naming the file: the JSON exists (``what`` says what
    the folder should be), parses to an object, has ``format_version == version``; the
    arrays file exists, matches the SHA-256 recorded under ``arrays.sha256`` and loads
    without pickle. The bundle's own module then validates keys and shapes.
    """
    d = Path(directory)
    jpath, apath = d / json_name, d / arrays_name
    if not jpath.is_file():
        raise error(f"{jpath}: missing file (not {what})")
    try:
        meta = json.loads(jpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{jpath}: unreadable JSON ({e})") from None
    if not isinstance(meta, dict):
        raise error(f"{jpath}: expected a JSON object")
    if meta.get("format_version") != version:
        raise error(f"{jpath}: format_version {meta.get('format_version')!r} is not supported "
                    f"(this rcnn_cli {__version__} reads version {version})")
    if not apath.is_file():
        raise error(f"{apath}: missing file")
    rec = meta.get("arrays")
    if not isinstance(rec, dict) or rec.get("sha256") != sha256_file(apath):
        raise error(f"{apath}: contents do not match the sha256 recorded in {json_name} "
                    "(incomplete or mixed bundle; save it again)")
    try:
        arrays = load_npz(apath)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise error(f"{apath}: unreadable arrays ({e})") from None
    return meta, arrays


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


def file_identity(path: str | Path) -> np.ndarray:
    """int64 ``[size, mtime_ns]`` of a file (what a stage record remembers of its input).

    Raises:
        OSError: the file cannot be stat-ed.
    """
    st = os.stat(path)
    return np.array([st.st_size, st.st_mtime_ns], np.int64)


def check_rel(rel: str) -> str:
    """Check an image identity (relative POSIX path with extension) names a file inside a
    folder: not empty, not absolute, no ``..``, ``.`` or empty parts, no NUL.

    Raises:
        ValueError: naming ``rel``.
    """
    parts = rel.split("/")
    if not rel or "\0" in rel or rel.startswith("/") or any(q in ("", ".", "..") for q in parts):
        raise ValueError(f"{rel!r}: not a relative image path inside the input folder")
    return rel


def _record_id(key: str, rel: str, source: list[int], upstream: str) -> str:
    blob = json.dumps([key, rel, source, upstream])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


IDENTITY = "_identity"


def _read_meta(path: Path) -> dict[str, Any] | None:
    """The identity of a record file (see the module docstring), or None if it is not a
    readable rcnn record."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if IDENTITY not in z.files:
                return None
            meta = json.loads(str(z[IDENTITY]))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError):
        return None
    return meta if isinstance(meta, dict) else None


def _same_source(meta: Mapping[str, Any], source: np.ndarray) -> bool:
    return [int(v) for v in meta.get("source", [])] == [int(v) for v in source]


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_folder(out: str | Path, inputs: list[str | Path], overwrite: bool = False,
                        what: str = "-o") -> None:
    """Refuse an output folder that is, lies inside, or contains one of the ``inputs``
    (folders or files), unless ``overwrite`` (then the walk of the inputs must skip ``out``:
    see ``images.list_images(exclude=...)``).

    Raises:
        ForeignFolderError: naming the folder and the input.
    """
    o = Path(os.path.abspath(out))
    o_real = Path(os.path.realpath(out))
    for inp in inputs:
        i = Path(os.path.abspath(inp))
        i_real = Path(os.path.realpath(inp))
        if i.is_dir() and (_is_within(o, i) or _is_within(o_real, i_real)):
            rel = "is" if o_real == i_real else "is inside"
        elif _is_within(i, o) or _is_within(i_real, o_real):
            rel = "contains"
        else:
            continue
        if overwrite:
            log.warning("%s %s the input %s (--overwrite: writing there, user files kept)",
                        out, rel, inp)
            continue
        raise ForeignFolderError(
            f"{out}: the output folder ({what}) {rel} the input {inp}; its files would mix "
            "with your images. Choose another output folder (or pass --overwrite to write "
            "there anyway; files rcnn did not write are never replaced)")


def remove_stale_tmp(folder: str | Path, recursive: bool = True,
                     min_age: float = STALE_TMP_SECONDS) -> int:
    """Delete temp files of :func:`atomic_write_bytes` (``.<name>.<random>.tmp``) that nobody
    has touched for ``min_age`` seconds (a killed run's leftovers); return how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    now, n = time.time(), 0
    for p in (folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")):
        try:
            if p.is_file() and not p.is_symlink() and now - p.stat().st_mtime >= min_age:
                p.unlink()
                n += 1
        except OSError:
            pass
    if n:
        log.info("%s: removed %d temp file(s) left by an interrupted run", folder, n)
    return n


#: Files that file browsers drop into any folder (macOS Finder, Windows Explorer): not user
#: files, so a folder holding only these counts as empty (they are never touched).
OS_CLUTTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def _foreign_entries(folder: Path, ours: tuple[str, ...] = ()) -> list[str]:
    """Names in ``folder`` other than our temp files, OS clutter and ``ours`` (sorted)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [n for n in names if n not in ours and n not in OS_CLUTTER
            and not (n.startswith(".") and n.endswith(".tmp"))]


def claim_folder(folder: str | Path, ours: bool, names: tuple[str, ...], overwrite: bool,
                 what: str = "-o") -> None:
    """Check that writing ``names`` into ``folder`` replaces no file rcnn did not write.

    ``ours`` says whether the folder carries our marker (a manifest). A folder that is not
    ours and is not empty is refused unless ``overwrite``; even then, none of ``names`` may
    already exist in it. A folder that is ours gets its stale temp files removed.

    Raises:
        ForeignFolderError: naming the folder (and the first foreign file).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ForeignFolderError(f"{folder}: exists and is not a folder ({what})")
    if not folder.is_dir():
        return
    if ours:
        remove_stale_tmp(folder)
        return
    foreign = _foreign_entries(folder)
    if not foreign:
        return
    shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
    if not overwrite:
        raise ForeignFolderError(
            f"{folder}: the output folder ({what}) holds files rcnn did not write ({shown}; "
            f"no {MANIFEST}); choose a new or empty folder, or pass --overwrite to write "
            "next to them (they are kept)")
    clash = [n for n in names if (folder / n).exists()]
    if clash:
        raise ForeignFolderError(
            f"{folder}/{clash[0]}: exists and was not written by rcnn; it is never replaced, "
            f"even with --overwrite (move it, or choose another output folder)")


def check_settings_parts(root: str | Path, stage: str, parts: Mapping[str, Any],
                         upstream_key: str | None = None, format_version: int = 1,
                         overwrite: bool = False) -> None:
    """Before heavy work, the refusal :meth:`StageStore.claim` would make later: a folder
    whose manifest is another stage's, or records other values for any of ``parts`` (some of
    the settings; the rest may need a loaded model to compute), its upstream or its format.
    ``overwrite``: nothing is refused here.

    Raises:
        StaleStoreError: naming the folder and the settings that differ.
    """
    m = None if overwrite else read_manifest(root)
    if m is None:
        return
    if m.get("stage") != stage:
        raise StaleStoreError(f"{root}: holds {m.get('stage')} outputs, not {stage}; choose "
                              "another output folder or pass --overwrite to recompute")
    old = m.get("settings") or {}
    canon = functools.partial(json.dumps, sort_keys=True, default=str)
    differ = [k for k, v in parts.items() if canon(old.get(k)) != canon(v)]
    if m.get("upstream_key") != upstream_key:
        differ.append("upstream")
    if m.get("format_version", 1) != format_version:
        differ.append("format")
    if differ:
        raise StaleStoreError(f"{root}: holds {stage} outputs made with other settings "
                              f"({', '.join(differ)}); choose another output folder or pass "
                              "--overwrite to recompute")


def check_stage_folder(root: str | Path, overwrite: bool = False) -> None:
    """The folder checks of :class:`StageStore` alone, to run before heavy work (loading a
    backbone): a folder holding files rcnn did not write is refused unless ``overwrite``.

    Raises:
        ForeignFolderError: see :func:`claim_folder`.
    """
    claim_folder(root, read_manifest(root) is not None, _STAGE_FILES, overwrite)


class StageStore:
    """The output folder of one stage: where each image's record lies, and its key.

    Making one touches no file: :meth:`claim` (or :meth:`create`) checks the folder and
    writes its manifest before a stage writes records; :meth:`open_upstream` opens a
    finished stage's folder for reading.

    Args:
        root: the output folder.
        stage: stage name ("propose", "extract", ...).
        settings: JSON-able settings that determine the outputs.
        upstream_key: key of the stage whose outputs this one reads (or None).
        format_version: bump when the file layout changes.
        key: the key an existing manifest records (reading); default: computed from the
            above (:func:`settings_key`).
    """

    def __init__(self, root: str | Path, stage: str, settings: Mapping[str, Any],
                 upstream_key: str | None = None, format_version: int = 1,
                 key: str | None = None):
        self.root = Path(root)
        self.stage = stage
        self.settings = dict(settings)
        self.upstream_key = upstream_key
        self.format_version = format_version
        self.key = key or settings_key(stage, self.settings, upstream_key, format_version)

    @classmethod
    def create(cls, root: str | Path, stage: str, settings: Mapping[str, Any],
               upstream_key: str | None = None, format_version: int = 1,
               overwrite: bool = False) -> StageStore:
        """A store for writing: ``StageStore(...)`` then :meth:`claim` (``overwrite``)."""
        return cls(root, stage, settings, upstream_key, format_version).claim(overwrite)

    @classmethod
    def open_upstream(cls, root: str | Path, stage: str) -> StageStore:
        """Open an existing ``stage`` folder for reading (its manifest gives settings and key).

        Raises:
            FileNotFoundError: the folder has no manifest of that stage.
        """
        m = read_manifest(root)
        if m is None:
            raise FileNotFoundError(f"{root}: not a {stage} output folder (no {MANIFEST})")
        if m.get("stage") != stage:
            raise FileNotFoundError(f"{root}: holds {m.get('stage')} outputs, expected {stage}")
        return cls(root, stage, m.get("settings", {}), m.get("upstream_key"),
                   m.get("format_version", 1), key=m["key"])

    def claim(self, overwrite: bool = False) -> StageStore:
        """Make the folder this store's before any record is written; return the store.

        Creates the folder, removes a killed run's temp files, and writes the manifest
        (this key, stage, settings). A folder of another stage or other settings is refused,
        or, with ``overwrite``, taken over (its images are recomputed: old records fail the
        key check); a folder holding files rcnn did not write is refused unless
        ``overwrite`` (see :func:`claim_folder`).

        Raises:
            StaleStoreError: the folder holds another stage's or other settings' outputs and
                ``overwrite`` is False.
            ForeignFolderError: the folder holds files rcnn did not write.
        """
        old = read_manifest(self.root)
        if old is not None and old.get("key") != self.key and not overwrite:
            what = ("another stage (" + str(old.get("stage")) + ")"
                    if old.get("stage") != self.stage else "other settings")
            raise StaleStoreError(
                f"{self.root}: holds {self.stage} outputs made with {what} "
                f"(key {old.get('key')} != {self.key}); choose another output folder "
                "or pass --overwrite to recompute")
        claim_folder(self.root, old is not None, _STAGE_FILES, overwrite)
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = {"stage": self.stage, "key": self.key,
                    "format_version": self.format_version, "upstream_key": self.upstream_key,
                    "settings": self.settings, "rcnn_cli_version": __version__}
        if old != manifest:
            atomic_write_json(self.root / MANIFEST, manifest)
        return self

    def path_for(self, rel: str) -> Path:
        """File of one image, from its identity (relative path with extension):
        ``OUT/<rel>.npz``.

        Raises:
            ValueError: ``rel`` would leave the folder (see :func:`check_rel`).
        """
        return self.root / f"{check_rel(rel)}.npz"

    def _meta(self, rel: str) -> dict[str, Any] | None:
        """Identity entries of a record that carries this store's key and ``rel``."""
        p = self.path_for(rel)
        if not p.is_file():
            return None
        meta = _read_meta(p)
        if meta is None or meta.get("key") != self.key or meta.get("rel") != rel:
            return None
        return meta

    def record_id(self, rel: str, source: np.ndarray | None = None) -> str | None:
        """The ``_id`` of the image's record if it is valid here (this key, this ``rel``,
        and, when given, this ``source`` identity), else None."""
        meta = self._meta(rel)
        if meta is None or "id" not in meta:
            return None
        if source is not None and not _same_source(meta, source):
            return None
        return str(meta["id"])

    def is_done(self, rel: str, source: np.ndarray | None = None,
                upstream: str | None = None) -> bool:
        """True if the image's file exists, is readable and carries this store's key, the
        identity ``rel``, and, when given, the input's ``source`` identity (see
        :func:`file_identity`) and the upstream record's id."""
        meta = self._meta(rel)
        if meta is None:
            return False
        if source is not None and not _same_source(meta, source):
            return False
        return upstream is None or meta.get("upstream") == upstream

    def save(self, rel: str, arrays: Mapping[str, np.ndarray],
             source: np.ndarray | None = None, upstream: str = "") -> Path:
        """Write one image's arrays with its identity entries atomically; return the path.

        Raises:
            ForeignFileError: the file exists and was not written by rcnn.
        """
        p = self.path_for(rel)
        if p.exists() and _read_meta(p) is None:
            raise ForeignFileError(f"{p}: exists and was not written by rcnn; not replaced "
                                   "(move it away to compute this image)")
        src = [] if source is None else [int(v) for v in source]
        up = upstream or ""
        meta = {"key": self.key, "rel": rel, "source": src, "upstream": up,
                "id": _record_id(self.key, rel, src, up)}
        save_npz(p, {**arrays, IDENTITY: np.array(json.dumps(meta))})
        return p

    def load(self, rel: str) -> dict[str, np.ndarray]:
        """Arrays of one image (without the identity entries).

        Raises:
            FileNotFoundError: no file for ``rel``.
            StaleRecordError: the file carries another key or another image's identity.
        """
        p = self.path_for(rel)
        d = load_npz(p)
        try:
            meta = json.loads(str(d.pop(IDENTITY)))
        except (KeyError, ValueError):
            meta = {}
        key, own = meta.get("key"), meta.get("rel")
        if key != self.key:
            raise StaleRecordError(f"{p}: made with other settings than {self.root}'s "
                                   f"manifest (rerun the stage)")
        if own != rel:
            raise StaleRecordError(f"{p}: holds the record of {own!r}, not {rel!r} (a copied "
                                   "or moved file; rerun the stage)")
        return d

    def done_rels(self) -> list[str]:
        """Identities (relative paths with extension) of every valid record in the folder,
        sorted. Files carrying this key under another image's name are skipped with a
        warning; files of other settings are skipped silently (leftovers of --overwrite)."""
        out = []
        for p in sorted(self.root.rglob("*.npz")):
            rel = p.relative_to(self.root).as_posix()[: -len(".npz")]
            meta = _read_meta(p)
            if meta is None or meta.get("key") != self.key:
                continue
            if meta.get("rel") != rel:
                log.warning("%s: holds the record of %r, not of %r (a copied or moved file); "
                            "skipped", p, meta.get("rel"), rel)
                continue
            out.append(rel)
        return out

    def content_id(self, rels: list[str] | None = None) -> str:
        """Hash of the ids of the records ``rels`` (default :meth:`done_rels`): changes when
        any record is recomputed (a model trained on the folder records it)."""
        h = hashlib.sha256(self.key.encode())
        for rel in (self.done_rels() if rels is None else rels):
            meta = self._meta(rel) or {}
            h.update(f"{rel}\0{meta.get('id', '')}\n".encode())
        return h.hexdigest()[:32]


def open_upstream(root: str | Path, stage: str) -> StageStore:
    """:meth:`StageStore.open_upstream`: an existing ``stage`` folder, for reading.

    Raises:
        FileNotFoundError: the folder has no manifest of that stage.
    """
    return StageStore.open_upstream(root, stage)
