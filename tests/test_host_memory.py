"""benchmarks.host_memory: glibc keeps freed memory mapped, CPU steps run one at a time."""

import os
import platform
import subprocess
import sys

import pytest

# A benchmark's support, each test a fresh interpreter: the slow lane.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One 256 MiB buffer through libc's malloc, as XLA:CPU allocates a step's temporaries:
# allocated, touched page by page and freed, three times over, on the main thread or on a
# thread started after the setting (as XLA:CPU's worker threads are).
_CYCLE = """
import ctypes, resource, threading
from benchmarks import host_memory
applied = host_memory.keep_freed_memory() if {keep} else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 256 * 2**20
faults = []

def cycle():
    libc.free(libc.malloc(64))  # a thread takes its arena at its first allocation
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

if {worker}:
    t = threading.Thread(target=cycle)
    t.start()
    t.join()
else:
    cycle()
print(applied, *faults)
"""


def _run(code: str, **extra_env: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}  # 4 KiB pages
    env.update(extra_env)
    out = subprocess.run(  # from the repository root, where `benchmarks` is importable
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def _thp_always() -> bool:
    """Transparent huge pages for every mapping: a fresh 256 MiB buffer then faults in 2 MiB
    pages, and the 4 KiB page counts below do not apply."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc's mallopt")
@pytest.mark.skipif(platform.system() != "Linux", reason="counts Linux page faults")
@pytest.mark.skipif(_thp_always(), reason="transparent huge pages on every mapping")
@pytest.mark.parametrize("worker", [False, True], ids=["main_thread", "worker_thread"])
def test_keep_freed_memory_reuses_a_freed_buffer_without_page_faults(worker):
    """65,536 faults for every fresh 256 MiB mapping; after the first, none once memory is kept."""
    applied, *fresh = _run(_CYCLE.format(keep=False, worker=worker))
    assert applied == "None" and all(int(f) > 60_000 for f in fresh)
    applied, first, *again = _run(_CYCLE.format(keep=True, worker=worker))
    assert applied == "True"
    assert int(first) > 60_000  # the heap grows once
    assert all(int(f) < 1_000 for f in again)  # then the same pages serve every round


_SYNC = """
from benchmarks import host_memory
import jax, jax.numpy as jnp
host_memory.synchronous_cpu_dispatch()  # before the backend starts
x = jnp.ones((1024, 1024))
f = jax.jit(lambda x: [x := jnp.tanh(x @ x) for _ in range(16)][-1])
f(x).block_until_ready()
y = f(x)
print(y.is_ready(), jax.devices()[0].platform)
"""


def test_synchronous_cpu_dispatch_returns_finished_results():
    assert _run(_SYNC) == ["True", "cpu"]


_PROBE = """
from benchmarks import host_memory
import jax
print(host_memory.cpu_only(), host_memory.reuse_step_memory(),
      jax.config.values["jax_cpu_enable_async_dispatch"])
"""


@pytest.mark.parametrize(
    "platforms,want",
    [("cuda,cpu", ["False", "False", "True"]), ("tpu", ["False", "False", "True"])],
)
def test_reuse_step_memory_never_applies_where_an_accelerator_may_run(platforms, want):
    """Decided from the requested platforms, before any backend starts (none is started)."""
    assert _run(_PROBE, JAX_PLATFORMS=platforms) == want


def test_reuse_step_memory_applies_on_cpu():
    applied = "True" if platform.libc_ver()[0] == "glibc" else "False"
    assert _run(_PROBE, JAX_PLATFORMS="cpu") == ["True", applied, "False"]
