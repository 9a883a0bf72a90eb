"""Map a per-image function over a folder: resume, a process pool, failures, a report.

Each stage's work is a plain function of one image (``fn(item) -> dict``, picklable, no
shared state) so that the same function runs in this process, in a local process pool
(``--workers N``), or on a cluster executor. A failure on one image (an
:class:`~rcnn_cli.images.ImageError` or any exception) is recorded with the path and a
one-line reason; the batch goes on, and the :class:`Report` tells the command to exit 1.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from rcnn_cli.images import ImageError, ImageItem

log = logging.getLogger("rcnn_cli.runner")


@dataclass
class Report:
    """Counts and failures of one batch (black's ``Report``)."""

    done: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def fail(self, path: str, reason: str) -> None:
        self.failures.append((path, reason))
        log.error("%s: %s", path, reason)

    def add_times(self, times: dict[str, float] | None) -> None:
        for k, v in (times or {}).items():
            self.stage_seconds[k] = self.stage_seconds.get(k, 0.0) + v

    def summary(self, what: str = "images") -> str:
        n = self.done + self.skipped + self.failed
        parts = [(f"{n} {what}: {self.done} done, {self.skipped} already done (resumed), "
                  f"{self.failed} failed")]
        if self.done:
            per = ", ".join(f"{k} {v / self.done:.3f}" for k, v in self.stage_seconds.items())
            parts.append(f"{self.seconds:.1f} s" + (f" (s/image: {per})" if per else ""))
        return "; ".join(parts)


def _limit_threads() -> None:
    """Worker initialiser: one thread per process for every numeric library."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "NUMBA_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _call(fn: Callable[[Any], dict | None], item: ImageItem):
    """Run ``fn(item)``; turn an exception into a one-line reason (runs in the worker)."""
    try:
        return item, fn(item), None
    except ImageError as e:
        return item, None, e.reason
    except Exception as e:  # noqa: BLE001 - one image must never stop the batch
        return item, None, f"{type(e).__name__}: {e}"


def progress(iterable: Iterable, total: int | None, desc: str, quiet: bool = False):
    """A tqdm bar on stderr, shown only when stderr is a terminal."""
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, unit="img",
                disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)


def map_images(fn: Callable[[ImageItem], dict | None], items: Sequence[ImageItem],
               workers: int = 1, desc: str = "images") -> Iterator[tuple[ImageItem, dict | None,
                                                                          str | None]]:
    """Yield ``(item, result, error)`` for each item, in completion order when parallel.

    ``workers <= 1`` runs in this process (in order); otherwise a process pool whose
    workers each use one thread.
    """
    if workers <= 1 or len(items) <= 1:
        for it in progress(items, len(items), desc):
            yield _call(fn, it)
        return
    ctx = mp.get_context("forkserver" if sys.platform != "win32" else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                             initializer=_limit_threads) as pool:
        futs = {pool.submit(_call, fn, it): it for it in items}
        for f in progress(as_completed(futs), len(futs), desc):
            try:
                yield f.result()
            except Exception as e:  # noqa: BLE001 - a dead worker (killed, out of memory)
                yield futs[f], None, f"worker process died ({type(e).__name__}: {e})"


def shard_items(items: Sequence[ImageItem], shard: str | None) -> list[ImageItem]:
    """The ``i``-th of ``n`` interleaved slices of ``items`` for ``shard = "i/n"`` (0-based)."""
    if not shard:
        return list(items)
    try:
        i, n = (int(v) for v in shard.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like 'i/n' (e.g. 0/4), got {shard!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard must satisfy 0 <= i < n, got {shard!r}")
    return list(items)[i::n]


def run_stage(fn: Callable[[ImageItem], dict | None], items: Sequence[ImageItem],
              is_done: Callable[[ImageItem], bool] | None = None, workers: int = 1,
              desc: str = "images", executor: str = "local", address: str | None = None,
              shard: str | None = None) -> Report:
    """Run a per-image stage over ``items``, skipping those ``is_done`` says are finished.

    ``fn`` may return a dict with a ``"times"`` entry ({stage: seconds}) for the report.
    ``executor`` picks where ``fn`` runs ("local": this process or a pool of ``workers``;
    "dask"/"ray": a cluster at ``address``, see :mod:`rcnn_cli.executors`); ``shard`` keeps
    one slice of the images.
    """
    report = Report()
    t0 = time.perf_counter()
    todo = []
    for it in shard_items(items, shard):
        if is_done is not None and is_done(it):
            report.skipped += 1
        else:
            todo.append(it)
    if executor == "local":
        results = map_images(fn, todo, workers, desc)
    else:
        from rcnn_cli.executors import map_images_on

        results = map_images_on(executor, fn, todo, workers=workers, address=address or None,
                                desc=desc)
    for it, result, err in results:
        if err is not None:
            report.fail(str(it.path), err)
        else:
            report.done += 1
            report.add_times((result or {}).get("times"))
    report.seconds = time.perf_counter() - t0
    return report
