"""The train-step benchmark's per-row process environment (glibc huge-page tunable)."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_train_step_benchmark():
    spec = importlib.util.spec_from_file_location(
        "bench_train_step", os.path.join(ROOT, "benchmarks", "train_step.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_train_step_benchmark()


def test_child_environment_adds_and_removes_the_tunable(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=0")
    on = bench.child_environment("hugepages")["GLIBC_TUNABLES"].split(":")
    assert on == ["glibc.malloc.tcache_count=0", "glibc.malloc.hugetlb=1"]
    for setting in ("reuse", "default"):  # reuse is set inside the process (pcjax.host_memory)
        off = bench.child_environment(setting)["GLIBC_TUNABLES"].split(":")
        assert off == ["glibc.malloc.tcache_count=0"]
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert bench.child_environment("hugepages")["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert "GLIBC_TUNABLES" not in bench.child_environment("default")


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unavailable"


# Through libc's malloc as XLA:CPU allocates (NumPy would madvise huge pages by itself).
_TOUCH = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
n = 256 * 2**20
p = libc.malloc(n)  # above glibc's mmap threshold: mapped afresh
ctypes.memset(p, 1, n)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or _thp_mode() not in ("always", "madvise"),
    reason="needs Linux with transparent huge pages enabled or on madvise",
)
def test_hugepage_tunable_cuts_page_faults_of_a_fresh_buffer():
    """256 MiB touched page by page: 65,536 faults with 4 KiB pages, a few hundred with 2 MiB."""

    def faults(setting: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _TOUCH],
            env=bench.child_environment(setting),
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout.strip())

    without, with_thp = faults("default"), faults("hugepages")
    assert without > 60_000
    assert with_thp < without / 20


def test_every_host_memory_setting_has_reference_figures_and_its_own_table():
    assert set(bench.REFERENCE) == set(bench.HOST_MEMORY)
    assert len({table for table, _ in bench.HOST_MEMORY.values()}) == len(bench.HOST_MEMORY)
    for figures in bench.REFERENCE.values():
        assert set(figures) == set(bench.ROWS)
        # None: the reference could not run that row under the setting (out of memory).
        assert all(v is None or v > 0 for row in figures.values() for v in row.values())
        assert all(row["eval"] > 0 and row["rss_gib"] > 0 for row in figures.values())
