"""Test set-up: eight fake CPU devices so sharding code runs for real on one host."""

import os
import re

# Must happen before the first `import jax` anywhere in the test session. A user's own XLA_FLAGS
# are kept, except a device count of their own: the tests are written for eight devices.
_flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{_flags.strip()} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
