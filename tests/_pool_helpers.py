"""Picklable functions for local-pool tests (the pool's processes import them by name)."""
from __future__ import annotations

import time


def work(item, prepared=None):
    """A worker's part: slow enough that the driver prepares while the first images run."""
    time.sleep(0.4)
    return {"path": "prepared" if prepared is not None else "worker",
            "value": None if prepared is None else prepared["value"], "times": {"work": 1.0}}


def prepare(item):
    """The driver's part; fails for images named ``bad*``."""
    if item.rel.startswith("bad"):
        raise ValueError("cannot prepare")
    time.sleep(0.02)
    return {"value": item.rel.upper(), "times": {"prep": 0.5, "work": -1.0}}


def prepare_slowly(item):
    """:func:`prepare` at a quarter of the worker's pace."""
    time.sleep(0.1)
    return prepare(item)
