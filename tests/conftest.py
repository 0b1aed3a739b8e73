"""Test set-up: eight fake CPU devices so sharding code runs for real on one host."""

import atexit
import os
import shutil
import tempfile

from tests.support import xla

# Must happen before the first `import jax` anywhere in the test session. A user's own XLA_FLAGS
# are kept, except a device count of their own: the tests are written for eight devices. The
# CPU programs compile at LLVM -O0 unless the user's flags set a level (tests/support/xla.py).
os.environ["XLA_FLAGS"] = xla.xla_flags(8, os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One compilation cache for the session, shared by the xdist workers and the subprocesses the
# tests launch (they inherit the environment): the same small programs are compiled by many
# tests and by every process of a multi-process or resumed run. A fresh directory per session,
# so nothing carries over between runs; a user's own cache directory is kept. Every program is
# cached, however quick its compile: most are small (tens of milliseconds each, thousands per
# run) and recur across tests, workers and processes, and reading one back costs less than
# compiling it (README.md, "Tests").
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="pcjax-test-compile-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_collection_modifyitems(config, items):
    """Slow tests first (a stable sort). With `make test`'s `--maxschedchunk=1` a worker takes
    the next test only when it is nearly done, so the long runs start early on both workers
    and short tests fill in at the end (a pre-filled queue left one worker alone for minutes)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
