"""What a run of a per-image stage is: its store, its shard, resume, a report.

Each stage's work is a plain function of one image (``fn(item) -> dict``, picklable, no
shared state) so that the same function runs in this process, in a local process pool
(``--workers N``), or on a cluster: *where* it runs is :mod:`rcnn_cli.executors`'s. A
failure on one image (an :class:`~rcnn_cli.images.ImageError` or any exception) is recorded
with the path and a one-line reason; the batch goes on, and the :class:`Report` tells the
command to exit 1.

:func:`run_stage_into` is the one driver of the stages that write one record per image
(propose, extract, detect): it claims the stage's folder, writes the resolved settings, keeps
one shard, skips the images whose record is current and maps the per-image function.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from rcnn_cli.executors import map_images_on, map_prepared
from rcnn_cli.images import ImageItem
from rcnn_cli.store import StageStore, file_identity

log = logging.getLogger("rcnn_cli.runner")


@dataclass
class Report:
    """Counts and failures of one batch (black's ``Report``)."""

    done: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    workers: int | None = None  # the stage's workers (run_stage_into)

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


def is_current(store: StageStore, item: ImageItem, upstream: str | None = None) -> bool:
    """Whether ``store`` holds a record of ``item`` made from the image as it is now (size
    and mtime) and, when given, from this upstream record id."""
    try:
        source = file_identity(item.path)
    except OSError:
        return False  # the stage reports the unreadable file
    return store.is_done(item.rel, source=source, upstream=upstream)


def run_stage(fn: Callable[[ImageItem], dict | None], items: Sequence[ImageItem],
              is_done: Callable[[ImageItem], bool] | None = None, workers: int = 1,
              desc: str = "images", executor: str = "local", address: str | None = None,
              shard: str | None = None, holds_model: bool = False,
              prepare: Callable[[ImageItem], dict] | None = None,
              driver_prepare: Callable[[ImageItem], dict] | None = None) -> Report:
    """Run a per-image stage over ``items``, skipping those ``is_done`` says are finished.

    ``fn`` may return a dict with a ``"times"`` entry ({stage: seconds}) for the report.
    ``executor`` picks where ``fn`` runs ("local": this process or a pool of ``workers``;
    "dask"/"ray": a cluster at ``address``, see :mod:`rcnn_cli.executors`); ``shard`` keeps
    one slice of the images; ``holds_model``: ``fn`` keeps a model loaded per process (see
    :func:`rcnn_cli.executors.map_images_on`). ``prepare`` (local executor, ``workers > 1``):
    a two-stage pipeline instead, ``prepare(item)`` on ``workers`` processes feeding
    ``fn(item, prepared=...)`` in this process (:func:`rcnn_cli.executors.map_prepared`: a
    GPU process fed by CPU processes); otherwise ``fn(item)`` does all the work.
    ``driver_prepare`` (a local pool): this process prepares images while the pool starts
    (see :func:`rcnn_cli.executors.map_images_on`).
    """
    report = Report()
    t0 = time.perf_counter()
    todo = []
    for it in shard_items(items, shard):
        if is_done is not None and is_done(it):
            report.skipped += 1
        else:
            todo.append(it)
    if prepare is not None and executor == "local" and workers > 1:
        results = map_prepared(prepare, fn, todo, workers, desc)
    else:
        results = map_images_on(executor, fn, todo, workers=workers, address=address or None,
                                desc=desc, holds_model=holds_model,
                                driver_prepare=driver_prepare)
    for it, result, err in results:
        if err is not None:
            report.fail(str(it.path), err)
        else:
            report.done += 1
            report.add_times((result or {}).get("times"))
    report.seconds = time.perf_counter() - t0
    return report


def run_stage_into(store: StageStore, fn: Callable[[ImageItem], dict | None],
                   items: Sequence[ImageItem], *, overwrite: bool = False,
                   write_settings: Callable[[], object] | None = None,
                   upstream: Mapping[str, str | None] | None = None,
                   also_done: Callable[[ImageItem], bool] | None = None,
                   desc: str = "images", holds_model: bool = False, workers: int = 1,
                   executor: str = "local", address: str | None = None,
                   shard: str | None = None,
                   prepare: Callable[[ImageItem], dict] | None = None,
                   driver_prepare: Callable[[ImageItem], dict] | None = None) -> Report:
    """Run a stage that writes one record per image into ``store`` (the one stage driver).

    Steps: claim the store's folder (:meth:`StageStore.claim`: refuses a folder of other
    settings or of files rcnn did not write unless ``overwrite``, writes the manifest); call
    ``write_settings`` (the resolved config next to the outputs); keep the ``shard``; skip
    each image whose record is current (:func:`is_current`: this key, the image as it is
    now, the record ``upstream[item.rel]`` when given) and, when given, ``also_done(item)``
    (what else a finished image has, e.g. its picture);
    map ``fn`` (which writes the record) over the rest on ``executor`` (:func:`run_stage`;
    ``holds_model``: ``fn`` keeps a CNN loaded per process; ``prepare``: its CPU half on a
    pool of ``workers`` feeding ``fn`` in this process; ``driver_prepare``: its CPU half
    done here for some images while the pool starts).

    Raises:
        StaleStoreError, ForeignFolderError: see :meth:`StageStore.claim`.
        ExecutorError: see :func:`rcnn_cli.executors.map_images_on`.
        ValueError: a malformed ``shard``.
    """
    store.claim(overwrite)
    if write_settings is not None:
        write_settings()

    def current(it: ImageItem) -> bool:
        up = None if upstream is None else upstream[it.rel]
        return is_current(store, it, up) and (also_done is None or also_done(it))

    report = run_stage(fn, items, is_done=current, workers=workers, desc=desc,
                       executor=executor, address=address, shard=shard,
                       holds_model=holds_model, prepare=prepare,
                       driver_prepare=driver_prepare)
    report.workers = workers
    return report
