"""Shared fixtures: tiny synthetic images and the optional real raccoon data."""
from __future__ import annotations

import os
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
