"""CPU runs: let each train step reuse the last step's host memory instead of fresh pages.

XLA:CPU allocates a step's temporaries on every call (2.5 GB for the CIFAR variant-B train step)
and frees them when the step ends. glibc serves allocations this large with a fresh `mmap` and
returns them with `munmap`, so every step page-faults its whole working set in again and the
kernel zeroes it: about 3 s of kernel CPU per CIFAR variant-B train step, 7 s for ImageNet
(docs/benchmarks/README.md, "Host memory"). Two settings together remove that cost:

- glibc serves large allocations from its heap, from every thread, and never gives freed
  memory back (`keep_freed_memory`), so a freed buffer stays mapped for the next allocation;
- the CPU backend runs each computation before the call returns (`synchronous_cpu_dispatch`),
  so a step's temporaries are freed before the next step allocates its own. With asynchronous
  dispatch the next steps allocate while the current one runs, and the heap grows instead.

`reuse_step_memory` applies both on a CPU backend; `pcjax.train.run` calls it when
`config.train.cpu_reuse_step_memory` is set. Neither changes a computed number. On GPU/TPU
the device allocator already reuses memory, and nothing here applies.
"""

from __future__ import annotations

import ctypes

import jax

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def synchronous_cpu_dispatch() -> bool:
    """Makes the CPU backend finish each computation before the call returns.

    JAX reads this setting when it creates its backends (at the first computation or device
    query), so call it before those, as `pcjax.train.run` does. Returns whether the CPU backend
    runs synchronously: False, changing nothing, if the backends had already started
    asynchronous. Computations on GPU/TPU stay asynchronous.
    """
    # There is no public way to ask whether the backends have started.
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    return not jax.config.values["jax_cpu_enable_async_dispatch"]


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
    """Both settings above, if the default backend is the CPU; returns whether they applied.

    Call it before JAX starts its backends (after `jax.distributed.initialize`, which does not
    start them). False on GPU/TPU, where nothing is needed, and where the backends had already
    started asynchronous or the C library is not glibc.
    """
    synchronous = synchronous_cpu_dispatch()  # must precede the backend query below
    return jax.default_backend() == "cpu" and synchronous and keep_freed_memory()
