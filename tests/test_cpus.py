"""CPU quota (cgroup v1 and v2) and the thread limits the CLI derives from it."""
import json
import os
import subprocess
import sys

import pytest

from rcnn_cli import cpus


def _cgroup(tmp_path, files, own="0::/\n"):
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(own)
    return root, proc


@pytest.mark.parametrize(("files", "own", "want"), [
    ({"cpu.max": "150000 100000\n"}, "0::/\n", 1.5),  # v2, container's own namespace
    ({"cpu.max": "max 100000\n"}, "0::/\n", None),  # v2 without a quota
    ({"job/cpu.max": "300000 100000\n", "cpu.max": "max 100000\n"}, "0::/job\n", 3.0),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"},
     "4:cpu:/\n", 2.0),  # v1
    ({"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "50000\n",
      "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n"}, "3:cpu,cpuacct:/docker/x\n", 0.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "4:cpu:/\n", None),
    ({"cpu/job/cpu.cfs_quota_us": "400000\n", "cpu/job/cpu.cfs_period_us": "100000\n",
      "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
     "5:cpuacct,cpu:/job\n", 4.0),  # listed as cpuacct,cpu, mounted (linked) as cpu
    ({}, "0::/\n", None),  # nothing mounted
    ({"cpu.max": "garbage\n"}, "0::/\n", None),
])
def test_cpu_quota_reads_cgroup_v1_and_v2(tmp_path, files, own, want):
    root, proc = _cgroup(tmp_path, files, own)
    assert cpus.cpu_quota(root, proc) == want


def test_available_cpus_is_the_affinity_capped_by_the_quota_rounded_down(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    for quota, want in ((None, 8), (2.5, 2), (0.5, 1), (16.0, 8)):
        monkeypatch.setattr(cpus, "cpu_quota", lambda _root=None, q=quota: q)
        assert cpus.available_cpus(tmp_path) == want, quota


def test_limit_threads_to_quota_sets_only_unset_variables(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    monkeypatch.setattr(cpus, "cpu_quota", lambda _root=None: 2.0)
    env = {"MKL_NUM_THREADS": "5"}
    assert cpus.limit_threads_to_quota(env, tmp_path) == 2
    assert env == {"MKL_NUM_THREADS": "5", "OMP_NUM_THREADS": "2",
                   "OPENBLAS_NUM_THREADS": "2", "NUMBA_NUM_THREADS": "2"}
    monkeypatch.setattr(cpus, "cpu_quota", lambda _root=None: None)  # no quota: untouched
    env = {}
    assert cpus.limit_threads_to_quota(env, tmp_path) is None and env == {}


def test_the_cli_entry_point_limits_torch_to_the_quota(tmp_path):
    """Through ``rcnn_cli.cli.main`` in a fresh interpreter under a fake 1-CPU quota on an
    affinity of 2: the variables are set before torch loads and torch uses one thread."""
    root, _ = _cgroup(tmp_path, {"cpu.max": "100000 100000\n"})
    code = (
        "import json, os, sys\n"
        "os.sched_getaffinity = lambda _pid: {0, 1}\n"
        "from pathlib import Path\n"
        "import rcnn_cli.cpus as c\n"
        f"c.CGROUP_ROOT = Path({str(root)!r})\n"
        "from rcnn_cli.cli import main\n"
        "sys.argv = ['rcnn', 'propose', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "import torch\n"
        "print(json.dumps([os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads()]))\n")
    env = {k: v for k, v in os.environ.items() if k not in cpus.THREAD_VARS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120, env=env).stdout
    assert json.loads(out.splitlines()[-1]) == ["1", 1]


@pytest.mark.parametrize(("files", "own", "want"), [
    ({"memory.max": "3221225472\n"}, "0::/\n", 3 << 30),  # v2, container's own namespace
    ({"memory.max": "max\n"}, "0::/\n", None),
    ({"job/memory.max": "1073741824\n", "memory.max": "max\n"}, "0::/job\n", 1 << 30),
    ({"memory/memory.limit_in_bytes": "2147483648\n"}, "6:memory:/\n", 2 << 30),  # v1
    ({"memory/docker/x/memory.limit_in_bytes": "536870912\n"}, "6:memory:/docker/x\n", 1 << 29),
    ({"memory/memory.limit_in_bytes": "9223372036854771712\n"}, "6:memory:/\n", None),  # none
    ({}, "0::/\n", None),
    ({"memory.max": "garbage\n"}, "0::/\n", None),
])
def test_memory_limit_reads_cgroup_v1_and_v2(tmp_path, files, own, want):
    root, proc = _cgroup(tmp_path, files, own)
    assert cpus.memory_limit(root, proc) == want


def test_available_memory_is_the_physical_memory_capped_by_the_limit(monkeypatch, tmp_path):
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setattr(cpus, "memory_limit", lambda root=None: None)
    assert cpus.available_memory() == total
    monkeypatch.setattr(cpus, "memory_limit", lambda root=None: 1 << 30)
    assert cpus.available_memory() == min(total, 1 << 30)
