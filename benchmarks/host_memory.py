"""CPU benchmarks: let each step reuse the last step's host memory instead of fresh pages.

XLA:CPU allocates a step's temporaries on every call and frees them when the step ends. glibc
serves allocations this large with a fresh `mmap` and returns them with `munmap`, so every step
page-faults its whole working set in again and the kernel zeroes it (figures in
docs/benchmarks/README.md, "Host memory"). Two settings together remove that cost:

- glibc serves large allocations from its heap, from every thread, and never gives freed
  memory back (`keep_freed_memory`; the same as GLIBC_TUNABLES=glibc.malloc.mmap_max=0:
  glibc.malloc.trim_threshold=<SIZE_MAX>:glibc.malloc.arena_max=1 at process start);
- the CPU backend runs each computation before the call returns (`synchronous_cpu_dispatch`),
  so a step's temporaries are freed before the next step allocates its own. With asynchronous
  dispatch the next steps allocate while the current one runs, and the heap grows instead.

`reuse_step_memory` applies both where JAX runs on the CPU alone. Neither changes a computed
number; the trainer sets neither. On GPU/TPU the device allocator already reuses memory.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util

import jax

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def cpu_only() -> bool:
    """Whether JAX will run on the host CPU alone: JAX_PLATFORMS=cpu, or no accelerator plugin
    (CUDA, ROCm, TPU) installed. Decided without starting JAX's backends."""
    platforms = (jax.config.jax_platforms or "").split(",")
    if platforms != [""]:
        return platforms == ["cpu"]
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return not plugins and importlib.util.find_spec("libtpu") is None


def synchronous_cpu_dispatch() -> None:
    """Makes the CPU backend finish each computation before the call returns.

    JAX reads this setting when it creates its backends (at the first computation or device
    query): call it before those; afterwards it has no effect.
    Computations on GPU/TPU are not affected.
    """
    jax.config.update("jax_cpu_enable_async_dispatch", False)


def keep_freed_memory() -> bool:
    """Makes glibc serve every allocation from its heap and keep freed memory mapped.

    Process-wide and irreversible, so the host's resident memory stays at its peak. Run steps
    one at a time (`synchronous_cpu_dispatch`) so that each finds the last one's buffer free;
    otherwise the heap grows. Call it before JAX starts its worker threads (see below).
    Returns False, changing nothing, where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(None)  # the C library this process is linked against
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: mallopt is a no-op
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # No mmap'd chunks: large requests come from the heap, where a freed chunk is reused.
    # A trim threshold of -1 is SIZE_MAX to glibc: the heap's top is never returned.
    # One arena: a thread that allocates in an arena of its own (XLA:CPU's worker threads do)
    # gets any request above that arena's 64 MiB heaps mmap'd, whatever M_MMAP_MAX says, and
    # unmapped again on free. Threads that already have an arena keep it.
    return (
        mallopt(M_MMAP_MAX, 0) == 1
        and mallopt(M_TRIM_THRESHOLD, -1) == 1
        and mallopt(M_ARENA_MAX, 1) == 1
    )


def reuse_step_memory() -> bool:
    """Both settings above when JAX runs on the CPU alone (`cpu_only`); returns whether applied.

    Call it before JAX starts its backends (after `jax.distributed.initialize`, which does not
    start them). Does nothing where an accelerator may be used or the C library is not glibc.
    """
    if not cpu_only():
        return False
    synchronous_cpu_dispatch()
    return keep_freed_memory()
