"""Shared fixtures: tiny synthetic images and the optional real raccoon data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Keep every test single-threaded and off the network.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def raccoon_dir() -> Path | None:
    """../shared/data/raccoon next to the checkout (or $RCNN_RACCOON), if present."""
    for p in (os.environ.get("RCNN_RACCOON"), ROOT.parent / "shared" / "data" / "raccoon",
              ROOT / "shared" / "data" / "raccoon"):
        if p and Path(p, "annotations").is_dir():
            return Path(p)
    return None


HEAVY_MODULES = ("torch", "torchvision", "numba")


def cli_in_fresh_python(*argvs: list, preimport: tuple[str, ...] = (), timeout: int = 300
                        ) -> tuple[list[str], list[tuple[int, str]], list[str]]:
    """Run each ``rcnn`` command line (a list of arguments) through click's CliRunner in one
    fresh interpreter (start-up tests: what a command imports). Returns the
    :data:`HEAVY_MODULES` imported once ``preimport`` is, each command's (exit code,
    output), and the heavy modules imported at the end."""
    argvs = [[str(a) for a in argv] for argv in argvs]
    code = ("import json, sys\nfrom click.testing import CliRunner\nfrom rcnn_cli.cli import cli\n"
            f"for m in {list(preimport)!r}: __import__(m)\n"
            f"heavy = lambda: sorted(set({list(HEAVY_MODULES)!r}) & set(sys.modules))\n"
            "before = heavy()\n"
            f"runs = [CliRunner().invoke(cli, argv) for argv in {argvs!r}]\n"
            "print(json.dumps([before, [[r.exit_code, r.output] for r in runs], heavy()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=timeout).stdout
    before, runs, after = json.loads(out.splitlines()[-1])
    return before, [tuple(r) for r in runs], after


@pytest.fixture
def raccoon() -> Path:
    d = raccoon_dir()
    if d is None:
        pytest.skip("raccoon data set not present")
    return d


def rectangles_image(h=120, w=160, seed=0):
    """A flat background with three flat coloured rectangles; returns (image, boxes)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), (40, 90, 40), np.uint8)
    img += rng.integers(0, 6, img.shape, dtype=np.uint8)
    boxes = np.array([[10, 15, 60, 70], [80, 20, 150, 60], [70, 75, 130, 115]], np.float32)
    colors = [(220, 30, 30), (30, 30, 220), (230, 230, 40)]
    for (x1, y1, x2, y2), c in zip(boxes.astype(int), colors):
        img[y1:y2, x1:x2] = c
    return img, boxes


@pytest.fixture
def rect_image():
    return rectangles_image()
