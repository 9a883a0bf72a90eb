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
"""
from __future__ import annotations

import logging
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


@dataclass(frozen=True)
class ImageItem:
    """One image of a batch: its path and its path relative to the input root (posix)."""

    path: Path
    rel: str

    @property
    def stem_rel(self) -> str:
        """Relative path without extension: the key of every per-image stage output."""
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


def list_images(inputs: list[str | Path] | str | Path,
                split: str | Path | None = None) -> list[ImageItem]:
    """Images to process, in a deterministic order.

    Args:
        inputs: folders (walked recursively, sorted), image files, or ``.txt`` list files of
            image paths (relative paths in a list file are resolved against the list's folder).
        split: optional file of stems; only images whose stem (or relative stem) is listed
            are kept.

    Returns:
        ImageItems sorted by relative path within each input, inputs in the order given.

    Raises:
        FileNotFoundError: an input does not exist.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    items: list[ImageItem] = []
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
            items += [ImageItem(f, f.relative_to(p).as_posix()) for f in files]
        elif p.suffix.lower() == ".txt":
            for line in read_split(p):
                f = Path(line)
                f = f if f.is_absolute() else p.parent / f
                items.append(ImageItem(f, Path(line).as_posix()))
        else:
            items.append(ImageItem(p, p.name))
    if split is not None:
        wanted = set(read_split(split))
        items = [it for it in items if _split_matches(it, wanted)]
    return items


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
