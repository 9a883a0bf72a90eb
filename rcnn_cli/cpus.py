"""How many CPUs this process may use: its affinity mask and its cgroup's CPU quota.

A container started with ``docker run --cpus 2`` (or a Kubernetes CPU limit) on a 64-core
host sees 64 cores: OpenMP, MKL and OpenBLAS start 64 threads each, and the kernel then
throttles the process to 2 cores' worth of time per period, so every parallel region waits
for descheduled threads (the fc head's SGD ran 5-30x slower per step beside busy processes
here). The affinity mask (``--cpuset-cpus``) is already honoured by those libraries; the
quota is not. Go's automaxprocs and the JVM read it the same way.

No numeric library is imported here: :func:`limit_threads_to_quota` runs first thing in the
CLI, before numpy starts OpenBLAS's threads.
"""
from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

#: Where the cgroup file systems are mounted.
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: The thread-count variables of the numeric libraries we load (OpenMP: torch; MKL; OpenBLAS:
#: numpy; numba's parallel layer).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "NUMBA_NUM_THREADS")


def _own_cgroups(root: Path, proc_cgroup: Path, controller: str, mounts: tuple[str, ...]
                 ) -> tuple[Path, list[Path]]:
    """This process's cgroup folders from ``proc_cgroup``: the v2 one (``root`` itself when
    none is listed) and the v1 ones of ``controller``, under the hierarchy's listed name
    (e.g. ``cpu,cpuacct``) and then under each of ``mounts`` (other names it is mounted or
    linked as)."""
    own_v2, own_v1 = root, []
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                own_v2 = root / path.lstrip("/")
            elif controller in controllers.split(","):
                own_v1 = [root / name / path.lstrip("/") for name in (controllers, *mounts)]
    except (OSError, ValueError):
        pass
    return own_v2, own_v1


def cpu_quota(root: Path | None = None, proc_cgroup: Path = Path("/proc/self/cgroup")
              ) -> float | None:
    """CPUs' worth of time the cgroup quota allows per period (e.g. 1.5), or None without
    a quota or when it cannot be read.

    cgroup v2: ``cpu.max`` (``"150000 100000"``; ``"max ..."`` is no quota); v1:
    ``cpu.cfs_quota_us / cpu.cfs_period_us`` (-1 is no quota). The process's own cgroup
    (from ``/proc/self/cgroup``) is read first, then the mount's top (what a container with
    its own cgroup namespace sees).
    """
    root = CGROUP_ROOT if root is None else root
    own_v2, own_v1 = _own_cgroups(root, proc_cgroup, "cpu", ("cpu", "cpu,cpuacct"))
    for folder in dict.fromkeys([own_v2, root]):  # v2, own cgroup first
        try:
            fields = (folder / "cpu.max").read_text().split()
        except OSError:
            continue
        try:
            return None if fields[0] == "max" else _ratio(int(fields[0]), int(fields[1]))
        except (ValueError, IndexError):
            return None
    for folder in dict.fromkeys([*own_v1, root / "cpu", root / "cpu,cpuacct"]):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return _ratio(quota, period)
    return None


def _ratio(quota: int, period: int) -> float | None:
    return quota / period if quota > 0 and period > 0 else None


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (all CPUs where the OS has no such call)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def available_cpus(root: Path | None = None) -> int:
    """CPUs this process can keep busy: its affinity mask, capped by the cgroup quota
    rounded down (at least 1; a quota of 1.5 CPUs gives 1, as automaxprocs does, so that
    no thread waits for the next period). ``root``: the cgroup mount (default
    :data:`CGROUP_ROOT`)."""
    cpus = affinity_cpus()
    quota = cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def memory_limit(root: Path | None = None, proc_cgroup: Path = Path("/proc/self/cgroup")
                 ) -> int | None:
    """Bytes the cgroup's memory limit allows, or None without a limit or when it cannot be
    read: v2 ``memory.max`` (``"max"``: none), v1 ``memory.limit_in_bytes`` (a value near
    2**63: none); the process's own cgroup first, then the mount's top."""
    root = CGROUP_ROOT if root is None else root
    own_v2, own_v1 = _own_cgroups(root, proc_cgroup, "memory", ("memory",))
    for name, folders in (("memory.max", [own_v2, root]),
                          ("memory.limit_in_bytes", [*own_v1, root / "memory"])):
        for folder in dict.fromkeys(folders):
            try:
                text = (folder / name).read_text().strip()
            except OSError:
                continue
            try:
                value = int(text)
            except ValueError:
                return None  # "max", or unreadable
            return value if 0 < value < 2**60 else None
    return None


def available_memory(root: Path | None = None) -> int:
    """Bytes this process's machine or container has: physical memory, capped by the cgroup
    limit (:func:`memory_limit`)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on a POSIX system
        total = 2**62
    limit = memory_limit(root)
    return min(total, limit) if limit is not None else total


def limit_threads_to_quota(environ: MutableMapping[str, str] | None = None,
                           root: Path | None = None) -> int | None:
    """Under a CPU quota smaller than the affinity mask, set every unset thread-count
    variable (:data:`THREAD_VARS`) to the quota's CPUs, before the libraries load; returns
    that count, or None when there is no such quota (nothing is changed). A variable the
    user set is kept."""
    env = os.environ if environ is None else environ
    cpus = available_cpus(root)
    if cpus >= affinity_cpus():
        return None
    for var in THREAD_VARS:
        env.setdefault(var, str(cpus))
    return cpus


#: Device files of a GPU that torch may use as ``cuda``: NVIDIA's driver, WSL2's GPU
#: paravirtualisation (no ``/dev/nvidia*`` there) and ROCm (torch's HIP builds answer
#: ``torch.cuda.is_available()`` too).
GPU_DEVICE_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def cuda_possible(dev: Path = Path("/dev")) -> bool:
    """Whether this machine may have a device torch calls ``cuda``, without importing torch:
    False only on Linux with none of :data:`GPU_DEVICE_FILES` and no ``/dev/nvidia*``, where
    ``torch.cuda.is_available()`` is False too; True elsewhere (then ask torch)."""
    import sys

    if not sys.platform.startswith("linux"):
        return True
    return (any(Path(f).exists() for f in GPU_DEVICE_FILES)
            or any(dev.glob("nvidia*")))
