"""Test set-up: eight fake CPU devices so sharding code runs for real on one host."""

import os
import re

# Must happen before the first `import jax` anywhere in the test session. A user's own XLA_FLAGS
# are kept, except a device count of their own: the tests are written for eight devices.
_flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{_flags.strip()} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_collection_modifyitems(config, items):
    """Slow tests first (a stable sort): under pytest-xdist the two workers then start on the
    long runs together and finish on short tests, instead of one long test running alone at
    the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
