"""Folder walking and robust image decoding.

Every decoded image is ``uint8 (H, W, 3)`` RGB:

* grayscale, palette, CMYK and two-channel images are converted to RGB;
* RGBA / LA are composited onto a mid-grey background (transparent pixels carry no colour);
* 16-bit images are scaled to 8 bits by their full range (``>> 8``);
* EXIF orientation is **ignored**: annotation formats (VOC, COCO, CSV) give boxes in the
  stored pixel grid, so rotating the pixels would move the objects away from their boxes.
  Detections are likewise reported in stored pixels.
* a truncated JPEG/PNG decodes what is there (the rest is grey) with a warning, because real
  photo collections hold such files;
* anything that cannot be decoded raises :class:`ImageError` naming the file and the reason.

Folders are walked recursively in sorted order, following symlinks; a symlink loop or a
dangling link is skipped with one warning naming it. An image's identity (:class:`ImageItem`
``rel``) is its path relative to the input folder with its extension.
"""
from __future__ import annotations

import logging
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageFile

log = logging.getLogger("rcnn_cli.images")

#: Extensions we treat as images (lower case). Other files in a folder are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Decompression-bomb guard: 12 MP photos are normal, 200 MP is suspicious but still allowed.
Image.MAX_IMAGE_PIXELS = 200_000_000


class ImageError(Exception):
    """An image file that cannot be read; ``str()`` is a one-line message naming the file."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class InputError(ValueError):
    """The inputs cannot be told apart (two images with one identity)."""


@dataclass(frozen=True)
class ImageItem:
    """One image of a batch: its path and its identity ``rel``, the path relative to the
    input root (POSIX separators) *with* extension. Every per-image output is keyed by
    ``rel``: ``a/img.jpg``, ``a/img.png`` and ``b/img.jpg`` are three images."""

    path: Path
    rel: str

    @property
    def stem_rel(self) -> str:
        """Relative path without extension (only to match ``--split`` entries)."""
        p = Path(self.rel)
        return str(p.with_suffix("").as_posix())


def is_image_file(path: str | Path) -> bool:
    """True if the file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def read_split(path: str | Path) -> list[str]:
    """Stems listed in a split file (one per line; blank lines and ``#`` comments skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def _split_matches(item: ImageItem, wanted: set[str]) -> bool:
    return item.stem_rel in wanted or Path(item.rel).stem in wanted or item.rel in wanted


def _walk(root: Path, exclude: list[Path]) -> list[Path]:
    """Image files under ``root``, following symlinks, sorted by relative path.

    A symlink loop (a link to a folder above it, or a link chain that never ends) and a
    dangling link are skipped with one warning each; a folder that cannot be listed too.
    Folders in ``exclude`` (an output folder inside an input) are not entered.
    """
    out: list[Path] = []
    excl = {(s.st_dev, s.st_ino) for s in (_stat(e) for e in exclude) if s is not None}

    def visit(d: Path, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            log.warning("%s: cannot list folder (%s), skipped", d, e.strerror or e)
            return
        for e in entries:
            p = Path(e.path)
            try:
                st = os.stat(e.path)  # follows links
            except OSError as err:
                if e.is_symlink():
                    what = ("symlink loop" if _is_loop(err) else "dangling symlink")
                    log.warning("%s: %s (-> %s), skipped", p, what, _link_target(p))
                else:
                    log.warning("%s: cannot read (%s), skipped", p, err.strerror or err)
                continue
            ident = (st.st_dev, st.st_ino)
            if stat.S_ISDIR(st.st_mode):
                if ident in ancestors:
                    log.warning("%s: symlink loop (-> %s), skipped", p, _link_target(p))
                elif ident not in excl:
                    visit(p, ancestors | {ident})
            elif stat.S_ISREG(st.st_mode) and is_image_file(p):
                out.append(p)

    top = _stat(root)
    visit(root, frozenset() if top is None else frozenset({(top.st_dev, top.st_ino)}))
    return sorted(out, key=lambda f: f.relative_to(root).parts)


def _stat(p: Path) -> os.stat_result | None:
    try:
        return os.stat(p)
    except OSError:
        return None


def _is_loop(err: OSError) -> bool:
    import errno

    return err.errno == errno.ELOOP


def _link_target(p: Path) -> str:
    try:
        return os.readlink(p)
    except OSError:
        return "?"


def _list_rel(line: str, list_dir: Path) -> tuple[Path, str]:
    """(path, identity) of one line of a list file: relative to the list's folder when the
    image lies inside it, else its absolute path without the leading ``/`` (never ``..``)."""
    f = Path(line)
    f = f if f.is_absolute() else list_dir / f
    f = Path(os.path.normpath(f))
    base = Path(os.path.normpath(list_dir.absolute()))
    absf = Path(os.path.normpath(f.absolute()))
    if base in absf.parents:
        return f, absf.relative_to(base).as_posix()
    return f, "/".join(part for part in absf.parts if part not in (absf.anchor, "/", "\\"))


def list_images(inputs: list[str | Path] | str | Path,
                split: str | Path | None = None,
                exclude: list[str | Path] | None = None) -> list[ImageItem]:
    """Images to process, in a deterministic order.

    Args:
        inputs: folders (walked recursively, sorted, symlinks followed), image files, or
            ``.txt`` list files of image paths (relative paths in a list file are resolved
            against the list's folder).
        split: optional file of stems; only images whose stem, relative stem or relative
            path is listed are kept.
        exclude: folders not to walk into (an output folder inside an input folder).

    Returns:
        ImageItems sorted by relative path within each input, inputs in the order given.
        ``rel`` is the path relative to the input folder (a file given directly: its name;
        a list file entry: relative to the list's folder).

    Raises:
        FileNotFoundError: an input does not exist.
        InputError: two different images get the same identity (e.g. ``x/img.jpg`` from
            one input folder and ``y/img.jpg`` from another).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    excl = [Path(e) for e in (exclude or [])]
    items: list[ImageItem] = []
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            if p.is_symlink():
                raise FileNotFoundError(f"{p}: dangling symlink (-> {_link_target(p)})")
            raise FileNotFoundError(f"{p}: no such file or folder")
        if p.is_dir():
            items += [ImageItem(f, f.relative_to(p).as_posix()) for f in _walk(p, excl)]
        elif p.suffix.lower() == ".txt":
            for line in read_split(p):
                f, rel = _list_rel(line, p.parent)
                items.append(ImageItem(f, rel))
        else:
            items.append(ImageItem(p, p.name))
    items = _unique(items)
    if split is not None:
        wanted = set(read_split(split))
        items = [it for it in items if _split_matches(it, wanted)]
    return items


def _unique(items: list[ImageItem]) -> list[ImageItem]:
    """Drop an image listed twice (same file, same identity); refuse two files with one
    identity."""
    seen: dict[str, ImageItem] = {}
    out = []
    for it in items:
        first = seen.get(it.rel)
        if first is None:
            seen[it.rel] = it
            out.append(it)
        elif os.path.realpath(first.path) != os.path.realpath(it.path):
            raise InputError(
                f"{first.path} and {it.path} both have the identity {it.rel!r} (the path "
                "relative to their input); give their common parent folder as the input "
                "instead, so that each keeps its own name")
    return out


def _to_rgb(img: Image.Image) -> NDArray[np.uint8]:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.int64)
        a = (a >> 8) if a.max(initial=0) > 255 else a
        a = np.clip(a, 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.min(a, initial=0)), float(np.max(a, initial=1))
        a = ((a - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[:, :, 3:4] / 255.0
        rgb = rgba[:, :, :3] * alpha + 127.0 * (1 - alpha)
        return np.round(rgb).astype(np.uint8)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def read_image(path: str | Path) -> NDArray[np.uint8]:
    """Decode an image file to ``uint8 (H, W, 3)`` RGB (see the module docstring for rules).

    Raises:
        ImageError: empty file, not an image, unsupported or hopelessly corrupt data.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageError(path, f"cannot read file ({e.strerror})") from None
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            try:
                img.load()
            except OSError as e:
                if "truncated" not in str(e).lower() and "broken data" not in str(e).lower():
                    raise
                # one report: the CLI shows warnings as log lines
                warnings.warn(f"{path}: truncated image data, decoding what is there",
                              stacklevel=2)
                with Image.open(path) as img2:
                    ImageFile.LOAD_TRUNCATED_IMAGES = True
                    try:
                        img2.load()
                    finally:
                        ImageFile.LOAD_TRUNCATED_IMAGES = False
                    return _to_rgb(img2)
            return _to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"image too large ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        reason = str(e).split("\n")[0] or type(e).__name__
        if "cannot identify image file" in reason:
            reason = "not a decodable image (unknown or corrupt format)"
        raise ImageError(path, reason) from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, ValueError) as e:
        raise ImageError(path, str(e).split("\n")[0]) from None
    return h, w
