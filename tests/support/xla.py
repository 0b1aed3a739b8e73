"""XLA flags of the test processes: a number of fake CPU devices, compiled at LLVM -O0.

The suite's programs are small and most run a few times, so XLA:CPU's time goes into compiling
them; LLVM's optimisation passes are most of that. A program's results may differ from -O2's in
the last bits (fused multiply-adds are formed only when optimising), within every tolerance of
the suite; runs compared bit for bit (a resume against a straight run) must therefore compile
alike, so every process a test starts gets its flags from here. Compile-only TPU programs and
their figures do not change (tests/test_layout.py: the same bytes). Production never sets it.
"""

import os
import re

OPT_LEVEL_FLAG = "--xla_backend_optimization_level=0"


def xla_flags(device_count: int, base: str | None = None, optimize: bool = False) -> str:
    """`base` (default: this process's XLA_FLAGS) with `device_count` fake CPU devices and,
    unless `base` sets its own level, LLVM -O0. So a level the user sets for the session
    (`XLA_FLAGS=--xla_backend_optimization_level=2 make test`) reaches every process a test
    starts. `optimize`: without this module's -O0, for a process whose time goes into running
    its programs rather than compiling them (tens of full-width training steps)."""
    base = os.environ.get("XLA_FLAGS", "") if base is None else base
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", base).split()
    flags.append(f"--xla_force_host_platform_device_count={device_count}")
    if optimize:
        flags = [f for f in flags if f != OPT_LEVEL_FLAG]
    elif not any(f.startswith("--xla_backend_optimization_level=") for f in flags):
        flags.append(OPT_LEVEL_FLAG)
    return " ".join(flags)
