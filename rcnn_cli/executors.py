"""Where a stage's per-image work runs: this process, a local process pool, Dask or Ray.

Each place is a *session* with one interface: ``map(task, items)`` yields one result per item
(in completion order), ``close()`` releases what the session started. :func:`map_images_on`
opens the session an executor name asks for, checks that its workers can see the files, and
streams ``(item, result, error)`` with a progress bar. What a stage run *is* (resume, shards,
the report) is :mod:`rcnn_cli.runner`'s; this module knows no stage.

The work of one image is a picklable ``fn(item) -> dict | None`` that writes its own output
atomically into the stage folder, so on a cluster the folder must be on a filesystem every
worker shares with the driver. Nothing is sent back but a small dict, so a lost worker loses
only the images it was working on; they are retried, and finished images are skipped on the
next run.

* local: ``workers <= 1`` runs in this process, in order; otherwise a pool of ``workers``
  one-thread processes. A failure is reported at once (no retry); a worker process that dies
  fails the images it had.
* Dask: ``distributed.Client(address)`` (or ``DASK_SCHEDULER_ADDRESS``), else a
  ``LocalCluster`` of ``workers`` one-thread processes started for the run. One task per image.
  Dask workers are long-lived processes, so a per-process model cache (e.g.
  :func:`rcnn_cli.stages.get_extractor`) loads the backbone once per worker.
* Ray: ``ray.init(address)`` (or ``RAY_ADDRESS``), else a local instance with ``workers`` CPUs.
  Functions that hold a model (the CNN stages: ``holds_model=True``) run on a pool of ``workers``
  long-lived actors that keep the model loaded (a share of the GPUs each when the cluster has
  GPUs); others as stateless tasks.

Retries on a cluster (bounded, by the engines themselves): an
:class:`~rcnn_cli.images.ImageError` (a corrupt file stays corrupt) is reported at once; any
other exception is retried :data:`RETRIES` times, then reported as a one-line reason like a
local failure. A worker process that dies has its images rescheduled (Dask
``allowed-failures``; Ray ``max_retries`` / ``max_restarts``). At most a window of images is in
flight, so a folder of millions of images never becomes millions of futures on the scheduler.

Neither engine is a dependency of the base install: they are imported here, lazily, and a
missing one raises :class:`ExecutorError` naming the extra to install.
"""
from __future__ import annotations

import functools
import importlib
import logging
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from tqdm import tqdm

from rcnn_cli.cpus import THREAD_VARS
from rcnn_cli.images import ImageError, ImageItem

log = logging.getLogger("rcnn_cli.executors")

EXECUTORS = ("local", "dask", "ray")
RETRIES = 2  # attempts after the first, for a failure other than an undecodable image
WINDOW_PER_WORKER = 8  # images in flight per worker slot (and at least MIN_WINDOW)
MIN_WINDOW = 64

Result = tuple[ImageItem, "dict | None", "str | None"]
#: what a session yields per image: (item, result, reason, worker ``host:pid``, seconds)
TaskResult = tuple[ImageItem, "dict | None", "str | None", "str | None", float]


class ExecutorError(RuntimeError):
    """The executor cannot run: unknown name, missing extra, unreachable cluster, or workers
    that cannot see the files (a usage problem: the CLI exits 2)."""


class TaskError(RuntimeError):
    """One image failed with an exception other than ImageError; ``str()`` is the one-line
    reason. Raised in the worker so that the engine retries it (always picklable)."""


class Session(Protocol):
    """Where the work runs: one object per run of a stage."""

    name: str
    #: the work runs in the driver's own process (it keeps its threads)
    in_driver: bool

    def check_paths(self, paths: list[str]) -> None:
        """Raise :class:`ExecutorError` if a worker cannot see one of ``paths``."""

    def map(self, task: _Task, items: list[ImageItem]) -> Iterator[TaskResult]:
        """Run ``task`` on every item; yield each :data:`TaskResult` as it finishes."""

    def close(self) -> None:
        """Release what the session started (pools, clusters, actors)."""


def progress(iterable: Iterable, total: int | None, desc: str, quiet: bool = False):
    """A tqdm bar on stderr, shown only when stderr is a terminal."""
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, unit="img",
                disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)


def limit_threads() -> None:
    """One thread per worker process for every numeric library (the workers share the cores).

    The environment variables reach libraries this process loads later (each reads them when
    it loads); threadpoolctl limits the BLAS and OpenMP pools already loaded (for those,
    setting a variable does nothing); torch and OpenCV have their own calls.
    """
    for var in THREAD_VARS:
        os.environ[var] = "1"
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)  # stays in force: the returned object is never restored
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


# ------------------------------------------------------------------ the worker side
_THREADS_LIMITED = False


def worker_id() -> str:
    """``host:pid`` of this process (the per-worker throughput summary groups by it)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _Task:
    """Picklable wrapper run on a worker: ``task(item) -> (item, result, reason, worker, s)``.

    Limits numeric libraries to one thread (once per process, unless ``limit`` is False: work
    run in the driver's own process keeps its threads), adds ``"worker"`` to the result dict
    (its ``"times"`` entry is kept), returns an ImageError as a reason, and raises
    :class:`TaskError` for any other exception so that an engine retries the image.
    """

    def __init__(self, fn: Callable[[ImageItem], dict | None], limit: bool = True):
        self.fn = fn
        self.limit = limit

    def __call__(self, item: ImageItem) -> TaskResult:
        global _THREADS_LIMITED
        if self.limit and not _THREADS_LIMITED:
            limit_threads()  # here, not only at the worker's start: fn's libraries are loaded
            _THREADS_LIMITED = True
        t0 = time.perf_counter()
        try:
            result = self.fn(item)
        except ImageError as e:
            return item, None, e.reason, worker_id(), time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - becomes a retry, then a reported failure
            raise TaskError(_one_line(f"{type(e).__name__}: {e}")) from None
        out = dict(result) if isinstance(result, dict) else {}
        out["worker"] = worker_id()
        return item, out, None, out["worker"], time.perf_counter() - t0


def _one_line(text: str) -> str:
    lines = [s for s in str(text).strip().splitlines() if s.strip()]
    return lines[0].strip() if lines else "unknown error"


def _reason(exc: BaseException) -> str:
    """One-line reason for an exception that came back from the engine."""
    exc = getattr(exc, "cause", None) or exc  # Ray wraps the worker's exception
    if isinstance(exc, TaskError):
        return _one_line(str(exc))
    return _one_line(f"{type(exc).__name__}: {exc}")


def _paths_visible(paths: Sequence[str]) -> list[str]:
    """The paths of ``paths`` this (worker) process cannot see."""
    return [p for p in paths if not os.path.exists(p)]


def _probe_paths(fn: Callable, items: Sequence[ImageItem]) -> list[str]:
    """The stage's output folder and the first image: both must be visible to every worker."""
    paths = [str(items[0].path.resolve())] if items else []
    store = getattr(fn, "keywords", {}).get("store")
    if store is not None and getattr(store, "root", None) is not None:
        paths.append(str(store.root.resolve()))
    return paths


def _shared_fs_error(missing: dict[str, list[str]]) -> ExecutorError:
    who, paths = next(iter(missing.items()))
    return ExecutorError(
        f"worker {who} cannot see {', '.join(paths)}: the images and the output folder must be "
        "on a filesystem shared by every worker, under the same paths")


def _cannot_run(e: BaseException) -> ExecutorError:
    return ExecutorError(f"the workers cannot run rcnn_cli ({_reason(e)}): install the same "
                         "rcnn_cli version (and its dependencies) on every worker")


# ------------------------------------------------------------------ the driver side
def start_local_pool(preload: Sequence[str], env: Mapping[str, str] | None = None) -> bool:
    """Start the local pool's forkserver now, importing ``preload`` in it, while this process
    goes on with its own start-up; False where there is no forkserver (Windows).

    Every worker of a local pool is forked from that server, so it starts with the modules
    already imported (torch and torchvision: ~3 s per process here, without torch._dynamo:
    :mod:`rcnn_cli._torchvision`) and with what their import did (numba's machine code for
    selective search and the grid head: :mod:`rcnn_cli.proposals._warm`,
    :mod:`rcnn_cli._gridpool`). Called before the
    driver's own imports, the server's imports run beside them on another core instead of
    after them in every worker. A server already running keeps its modules (multiprocessing
    starts one per process); ``__main__`` stays preloaded, as multiprocessing's default;
    :mod:`rcnn_cli._forkserver_limit` comes first (one thread per library, so the server
    forks with no thread pool running) and :mod:`rcnn_cli._forkserver_freeze` last.
    ``env``: variables the server starts with (and this process does not keep), for its
    preloaded modules (:mod:`rcnn_cli._pool_detector`).
    """
    if sys.platform == "win32":
        return False
    from multiprocessing import forkserver

    mp.get_context("forkserver").set_forkserver_preload(
        ["rcnn_cli._forkserver_limit", "__main__", *preload, "rcnn_cli._forkserver_freeze"])
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        forkserver.ensure_running()  # the server is spawned here, with this environment
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return True


def _require_extra(name: str, module: str) -> None:
    """Raise ExecutorError (how to install the extra) unless ``module`` imports."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ExecutorError(
            f"--executor {name} needs the '{module}' package, which is not installed ({e}); "
            f"install the extra: pip install 'rcnn_cli[{name}]'") from None


def open_session(executor: str, workers: int = 1, address: str | None = None,
                 holds_model: bool = False) -> Session:
    """The session of ``executor`` ("local", "dask" or "ray"; see the module docstring).

    Raises:
        ExecutorError: unknown executor, its extra not installed, the cluster unreachable.
    """
    if executor == "local":
        return _InProcessSession() if workers <= 1 else _LocalPoolSession(workers)
    if executor == "dask":
        return _DaskSession(workers, address)
    if executor == "ray":
        return _RaySession(workers, address, actors=holds_model)
    raise ExecutorError(f"executor must be one of {', '.join(EXECUTORS)}; got {executor!r}")


def map_images_on(executor: str, fn: Callable[[ImageItem], dict | None],
                  items: Sequence[ImageItem], workers: int = 1, address: str | None = None,
                  desc: str = "images", holds_model: bool = False,
                  driver_prepare: Callable[[ImageItem], dict] | None = None
                  ) -> Iterator[Result]:
    """Yield ``(item, result, error)`` for each item, in completion order (in order when
    run in this process), with a progress bar.

    Args:
        executor: "local", "dask" or "ray".
        fn: picklable per-image function; it writes its own output (on a cluster: on a
            filesystem every worker shares).
        items: the images to process.
        workers: local: processes of the pool (``<= 1``: this process); dask/ray: processes
            of the local cluster started when ``address`` is None (Ray: also the number of
            model-holding actors on any cluster).
        address: scheduler to connect to (dask ``tcp://host:8786``; ray ``auto`` or
            ``ray://host:10001``); None: the engine's environment variable
            (``DASK_SCHEDULER_ADDRESS`` / ``RAY_ADDRESS``), else a local cluster for the run.
        desc: progress bar label.
        holds_model: ``fn`` loads a model into a per-process cache (a CNN stage): on Ray it
            runs on long-lived actors that keep it.
        driver_prepare: a local pool only: while its processes start, this process runs
            ``driver_prepare(item)`` for the images after their first ones, and those go to
            the pool as ``fn(item, prepared=...)`` (``rcnn detect``: proposals made while the
            workers import torch); the preparation's ``"times"`` join the result's.

    Returns:
        An iterator of ``(item, result, error)``: ``result`` is the dict ``fn`` returned plus
        ``"worker"`` (``host:pid``), ``error`` a one-line reason or None.

    Raises:
        ExecutorError: unknown executor, its extra not installed, the cluster unreachable, or
            workers that cannot see the images / output folder. Raised at the call, before
            any image is processed.
    """
    items = list(items)
    if executor not in EXECUTORS:
        raise ExecutorError(f"executor must be one of {', '.join(EXECUTORS)}; got {executor!r}")
    if executor != "local":
        _require_extra(executor, {"dask": "distributed", "ray": "ray"}[executor])
    if not items:
        return iter(())
    session = open_session(executor, workers, address,
                           holds_model=holds_model)
    try:
        session.check_paths(_probe_paths(fn, items))
    except BaseException:
        session.close()
        raise
    return _run(session, _Task(fn, limit=not session.in_driver), items, desc,
                driver_prepare if isinstance(session, _LocalPoolSession) else None)


def _run(session: Session, task: _Task, items: list[ImageItem], desc: str,
         driver_prepare: Callable[[ImageItem], dict] | None = None) -> Iterator[Result]:
    """Drive ``session`` over ``items`` with a bar; log a cluster's per-worker summary."""
    t0 = time.perf_counter()
    per_worker: Counter[str] = Counter()
    busy: dict[str, float] = defaultdict(float)
    n = failed = 0
    try:
        results = session.map(task, items) if driver_prepare is None else \
            session.map(task, items, driver_prepare)
        for item, result, err, worker, seconds in progress(results, len(items), desc):
            n += 1
            failed += err is not None
            if worker is not None:
                per_worker[worker] += 1
                busy[worker] += seconds
            yield item, result, err
    finally:
        session.close()
        wall = time.perf_counter() - t0
        if n and session.name != "local":
            log.info("%s", throughput_summary(session.name, n, failed, wall, per_worker, busy))


def map_prepared(prepare: Callable[[ImageItem], dict], fn: Callable[..., dict | None],
                 items: Sequence[ImageItem], workers: int, desc: str = "images"
                 ) -> Iterator[Result]:
    """A two-stage local pipeline: ``prepare(item)`` on a pool of ``workers`` one-thread
    processes (CPU work: decoding, selective search), ``fn(item, prepared=...)`` in this
    process (a GPU model), image after image in item order. At most ``2 * workers`` images
    are prepared ahead, so memory stays bounded when this process is the slower stage.

    Yields ``(item, result, error)`` like :func:`map_images_on`; a result's ``"times"`` holds
    both stages' entries. A failure of either stage is that image's error. A worker that dies
    (killed, out of memory) breaks the whole pool: a new pool takes over the images whose
    preparation the break lost (finished ones keep their results) and runs them one at a time,
    so the one that kills a worker again breaks the pool alone, not the images beside it; the
    image being waited for is tried once more before it is reported as failed. Then the
    pipeline fills up again.
    """
    from collections import deque

    items = list(items)
    if not items:
        return
    task = _Task(prepare)
    pool = _LocalPoolSession(workers)
    todo, ahead = iter(items), deque()
    retried: set[str] = set()
    renewals = 0

    def renew() -> None:
        """A new pool; the images whose work the break lost are resubmitted one at a time
        (isolated); finished ones keep their results."""
        nonlocal pool, renewals
        renewals += 1
        if renewals > 2 * len(items) + 2:  # each killer costs two breaks
            raise ExecutorError(f"{desc}: worker processes keep dying; stopped")
        pool.close()
        pool = _LocalPoolSession(workers)
        for entry in ahead:
            fut = entry[1]  # closing the broken pool failed or cancelled what it lost
            if (fut is None or not fut.done() or fut.cancelled()
                    or isinstance(fut.exception(), BrokenProcessPool)):
                entry[1] = None

    def fill() -> None:
        if any(entry[1] is None for entry in ahead):
            return  # after a break: the images that were in flight run alone first
        while len(ahead) < 2 * workers:
            nxt = next(todo, None)
            if nxt is None:
                return
            entry = [nxt, None]
            ahead.append(entry)
            try:
                entry[1] = pool.pool.submit(task, nxt)
            except BrokenProcessPool:
                renew()
                return

    bar = progress(None, len(items), desc)
    try:
        fill()
        while ahead:
            if ahead[0][1] is None:  # isolated: the only image in the pool
                try:
                    ahead[0][1] = pool.pool.submit(task, ahead[0][0])
                except BrokenProcessPool:
                    renew()
                    continue
            item, fut = ahead.popleft()
            try:
                _, prepared, err, _, _ = fut.result()
            except TaskError as e:
                prepared, err = None, str(e)
            except Exception as e:  # noqa: BLE001 - a dead worker (killed, out of memory)
                prepared, err = None, f"worker process died ({type(e).__name__}: {e})"
                if item.rel not in retried:
                    retried.add(item.rel)
                    ahead.appendleft([item, None])
                    renew()
                    continue
                renew()
            fill()
            result = None
            if err is None:
                try:
                    _, result, err, _, _ = _Task(functools.partial(fn, prepared=prepared),
                                                 limit=False)(item)
                except TaskError as e:
                    result, err = None, str(e)
                if result is not None:
                    times = dict(prepared.get("times") or {})
                    times.update(result.get("times") or {})
                    result["times"] = times
            bar.update(1)
            yield item, result, err
    finally:
        bar.close()
        pool.close()


def throughput_summary(engine: str, n: int, failed: int, wall: float,
                       per_worker: Counter, busy: dict[str, float]) -> str:
    """One line: images, wall time, images/s overall and per worker (images, images/s, busy)."""
    rate = n / wall if wall > 0 else float("inf")
    head = (f"{engine}: {n} images ({failed} failed) on {len(per_worker)} workers in "
            f"{wall:.1f} s, {rate:.2f} images/s")
    parts = [f"{w} {c} images {c / wall:.2f}/s busy {100 * busy[w] / wall:.0f}%"
             for w, c in sorted(per_worker.items())] if wall > 0 else []
    return head + ("; " + ", ".join(parts) if parts else "")


def _windowed(submit: Callable[[ImageItem], Any], wait_one: Callable[[], Any],
              items: list[ImageItem], window: int) -> Iterator[Any]:
    """Keep at most ``window`` submissions in flight; yield each finished one."""
    it = iter(items)
    inflight = 0
    for item in it:
        submit(item)
        inflight += 1
        if inflight >= window:
            break
    while inflight:
        done = wait_one()
        inflight -= 1
        nxt = next(it, None)
        if nxt is not None:
            submit(nxt)
            inflight += 1
        yield done


# ------------------------------------------------------------------ local
class _InProcessSession:
    """This process, one image after the other, in order (``--workers 1``)."""

    name = "local"
    in_driver = True

    def check_paths(self, paths: list[str]) -> None:
        pass

    def map(self, task: _Task, items: list[ImageItem]) -> Iterator[TaskResult]:
        for item in items:
            try:
                yield task(item)
            except TaskError as e:
                yield item, None, str(e), None, 0.0

    def close(self) -> None:
        pass


class _LocalPoolSession:
    """A pool of ``workers`` one-thread processes on this machine (no retries: a failure is
    reported at once; a dead worker process fails the images it had)."""

    name = "local"
    in_driver = False

    def __init__(self, workers: int):
        ctx = mp.get_context("forkserver" if sys.platform != "win32" else "spawn")
        # limit_threads at the start too: its variables then reach every library loaded later
        self.workers = workers
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                        initializer=limit_threads)

    def check_paths(self, paths: list[str]) -> None:
        pass

    def map(self, task: _Task, items: list[ImageItem],
            driver_prepare: Callable[[ImageItem], dict] | None = None
            ) -> Iterator[TaskResult]:
        """Run ``task`` on every item; ``driver_prepare``: see :meth:`_submit_helped`."""
        if driver_prepare is None or len(items) <= self.workers:
            futs = {self.pool.submit(task, it): it for it in items}
            helped: dict[str, dict] = {}
        else:
            futs, helped = self._submit_helped(task, list(items), driver_prepare)
        for f in as_completed(futs):
            try:
                item, out, reason, worker, seconds = f.result()
            except TaskError as e:
                yield futs[f], None, str(e), None, 0.0
                continue
            except Exception as e:  # noqa: BLE001 - a dead worker (killed, out of memory)
                yield futs[f], None, f"worker process died ({type(e).__name__}: {e})", None, 0.0
                continue
            if out is not None and item.rel in helped:  # this process's share of the work
                out["times"] = {**(helped[item.rel].get("times") or {}),
                                **(out.get("times") or {})}
            yield item, out, reason, worker, seconds

    def _submit_helped(self, task: _Task, items: list[ImageItem],
                       driver_prepare: Callable[[ImageItem], dict]
                       ) -> tuple[dict[Any, ImageItem], dict[str, dict]]:
        """Submit every item, this process doing ``driver_prepare(item)`` for the next ones
        while the pool's processes start: their first images are submitted from a thread,
        because starting a process waits for the forkserver's imports (seconds: torch); until
        they are up, and until one of them finishes an image, this process prepares the
        following images (e.g. their proposals, CPU work on a core the starting pool leaves
        idle) and they go to the pool as ``task.fn(item, prepared=...)``. A preparation that
        fails is left to the worker (which reports the image's error). Returns the futures
        and the preparations by image."""
        futs: dict[Any, ImageItem] = {}
        helped: dict[str, dict] = {}
        first = items[:self.workers]
        failure: list[BaseException] = []

        def start() -> None:
            try:
                for it in first:
                    futs[self.pool.submit(task, it)] = it
            except BaseException as e:  # noqa: BLE001 - re-raised by the driver below
                failure.append(e)

        starter = threading.Thread(target=start, name="pool-start", daemon=True)
        starter.start()
        ready: list[tuple[ImageItem, dict | None]] = []
        rest = iter(items[len(first):])

        def prepare_next() -> bool:
            it = next(rest, None)
            if it is None:
                return False
            try:
                ready.append((it, driver_prepare(it)))
            except Exception as e:  # noqa: BLE001 - the worker redoes it and reports
                log.debug("%s: preparing in the driver failed (%s); left to the pool",
                          it.rel, e)
                ready.append((it, None))
            return True

        def submit_ready() -> None:
            for it, prep in ready:
                if prep is None:
                    futs[self.pool.submit(task, it)] = it
                else:
                    helped[it.rel] = prep
                    job = _Task(functools.partial(task.fn, prepared=prep), limit=task.limit)
                    futs[self.pool.submit(job, it)] = it
            ready.clear()

        while starter.is_alive() and prepare_next():
            pass
        starter.join()
        if failure:
            raise failure[0]
        submit_ready()
        while not any(f.done() for f in futs) and prepare_next():
            submit_ready()
        for it in rest:
            futs[self.pool.submit(task, it)] = it
        log.info("while the pool started, this process prepared %d of %d images", len(helped),
                 len(items))
        return futs, helped

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------ Dask
class _DaskSession:
    name = "dask"
    in_driver = False

    def __init__(self, workers: int, address: str | None):
        from distributed import Client, LocalCluster

        address = address or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
        self.cluster = None
        try:
            if address:
                self.client = Client(address, timeout="30s")
            else:
                self.cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1,
                                            processes=True, dashboard_address=":0")
                self.client = Client(self.cluster)
        except (OSError, TimeoutError, ValueError) as e:
            if self.cluster is not None:
                self.cluster.close()
            raise ExecutorError(f"cannot connect to the Dask scheduler at {address}: "
                                f"{_one_line(str(e))}") from None
        where = address or "a local cluster"
        log.info("dask: %s, %d workers", where, len(self.client.scheduler_info()["workers"]))

    def check_paths(self, paths: list[str]) -> None:
        if not paths:
            return
        try:
            seen = self.client.run(_paths_visible, paths)
        except Exception as e:  # noqa: BLE001 - e.g. rcnn_cli not installed on the workers
            raise _cannot_run(e) from None
        missing = {w: m for w, m in seen.items() if m}
        if missing:
            raise _shared_fs_error(missing)

    def map(self, task: _Task, items: list[ImageItem]) -> Iterator[TaskResult]:
        from distributed import as_completed

        threads = sum(self.client.nthreads().values()) or 1
        pending = as_completed()
        owner: dict[str, ImageItem] = {}

        def submit(item: ImageItem) -> None:
            fut = self.client.submit(task, item, pure=False, retries=RETRIES)
            owner[fut.key] = item
            pending.add(fut)

        def wait_one():
            fut = next(pending)
            item = owner.pop(fut.key)
            if fut.status == "finished":
                out = fut.result()
            else:  # error after the retries, or a worker that died too often (KilledWorker)
                try:
                    exc = fut.exception()
                except BaseException as e:  # noqa: BLE001 - cancelled: the reason is this
                    exc = e
                out = (item, None, _reason(exc), None, 0.0)
            fut.release()
            return out

        yield from _windowed(submit, wait_one, items,
                             max(MIN_WINDOW, WINDOW_PER_WORKER * threads))

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


# ------------------------------------------------------------------ Ray
def _ray_remote_fn(ray):
    @ray.remote(max_retries=RETRIES, retry_exceptions=[TaskError])
    def run_one(task: _Task, item: ImageItem):
        return task(item)

    return run_one


def _ray_actor_cls(ray, num_gpus: float):
    @ray.remote(num_cpus=1, num_gpus=num_gpus, max_restarts=RETRIES,
                max_task_retries=RETRIES)
    class StageWorker:
        """Long-lived worker: the per-process model cache of ``fn`` stays loaded."""

        def __init__(self, task: _Task):
            self.task = task

        @ray.method(retry_exceptions=[TaskError])
        def run(self, item: ImageItem):
            return self.task(item)

    return StageWorker


class _RaySession:
    name = "ray"
    in_driver = False

    def __init__(self, workers: int, address: str | None, actors: bool):
        import ray

        self.ray = ray
        self.workers = max(1, workers)
        self.actors = actors
        address = address or os.environ.get("RAY_ADDRESS") or None
        self.started = not ray.is_initialized()
        if self.started:
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
            if address is None:
                kw["num_cpus"] = self.workers  # a local instance for this run
            try:
                ray.init(address=address, **kw)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ExecutorError(f"cannot start or connect to Ray at {address or 'local'}: "
                                    f"{_one_line(str(e))}") from None
        res = ray.cluster_resources()
        where = address or ("a local instance" if self.started else "the running instance")
        log.info("ray: %s, %d CPUs, %d GPUs", where,
                 int(res.get("CPU", 0)), int(res.get("GPU", 0)))
        self.cpus = int(res.get("CPU", 1)) or 1
        if actors and self.workers > self.cpus:  # an actor holds a CPU: more would never start
            log.warning("ray: %d actors asked for, the cluster has %d CPUs; using %d",
                        self.workers, self.cpus, self.cpus)
            self.workers = self.cpus
        self.num_gpus = min(1.0, res.get("GPU", 0) / self.workers) if actors else 0.0

    def check_paths(self, paths: list[str]) -> None:
        if not paths:
            return
        probe = self.ray.remote(num_cpus=0)(_paths_visible)
        try:
            missing = self.ray.get(probe.remote(paths))
        except Exception as e:  # noqa: BLE001 - e.g. rcnn_cli not installed on the workers
            raise _cannot_run(e) from None
        if missing:
            raise _shared_fs_error({"(a ray worker)": missing})

    def map(self, task: _Task, items: list[ImageItem]) -> Iterator[TaskResult]:
        ray = self.ray
        owner: dict[Any, tuple[ImageItem, Any]] = {}
        if self.actors:
            cls = _ray_actor_cls(ray, self.num_gpus)
            pool = [cls.remote(task) for _ in range(self.workers)]
            load = {id(a): 0 for a in pool}
            slots = self.workers
        else:
            run_one = _ray_remote_fn(ray)
            task_ref = ray.put(task)
            slots = self.cpus

        def submit(item: ImageItem) -> None:
            if self.actors:
                actor = min(pool, key=lambda a: load[id(a)])  # least busy actor
                load[id(actor)] += 1
                ref = actor.run.remote(item)
            else:
                actor, ref = None, run_one.remote(task_ref, item)
            owner[ref] = (item, actor)

        def wait_one():
            [ref], _ = ray.wait(list(owner), num_returns=1)
            item, actor = owner.pop(ref)
            if actor is not None:
                load[id(actor)] -= 1
            try:
                return ray.get(ref)
            except Exception as e:  # noqa: BLE001 - task failed after retries, actor died
                return item, None, _reason(e), None, 0.0

        try:
            yield from _windowed(submit, wait_one, items,
                                 max(MIN_WINDOW, WINDOW_PER_WORKER * slots))
        finally:
            if self.actors:
                for a in pool:
                    ray.kill(a)

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
