"""What a compiled program says about itself: FLOPs, HBM bytes, the compiler's time estimate,
bytes all-reduced per step, and the sizes in an out-of-memory message."""

from __future__ import annotations

import math
import re

_SIZE = re.compile(r"([\d.]+)\s*([KMGT]i?B?|B)?\b")
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def size_bytes(text: str) -> float | None:
    match = _SIZE.fullmatch(text.strip())
    if not match:
        return None
    unit = (match.group(2) or "").replace("i", "").replace("B", "")
    return float(match.group(1)) * _UNITS[unit or ""]


def oom_sizes(message: str) -> tuple[float | None, float | None]:
    """(required, available) bytes from a compiler's out-of-memory message, where it says."""
    sizes = re.findall(r"\(([\d.]+\s*[KMGT]i?B?)\)", message)
    if len(sizes) >= 2:
        return size_bytes(sizes[0]), size_bytes(sizes[1])
    return None, None


def is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "exceeds available" in text or "out of memory" in text


def allreduce_bytes(hlo_text: str) -> int:
    """Bytes all-reduced per step: the result shapes of the program's all-reduce ops."""
    total = 0
    pattern = re.compile(r"=\s*(\(.*?\)|\S+)\s+all-reduce(?:-start)?\(")
    for match in pattern.finditer(hlo_text):
        for dtype, dims in re.findall(r"([a-z]+\d*)\[([\d,]*)\]", match.group(1)):
            count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            total += count * _dtype_bytes(dtype)
    return total


def _dtype_bytes(name: str) -> int:
    if name == "pred":
        return 1
    bits = re.search(r"(\d+)$", name)
    return max(1, int(bits.group(1)) // 8) if bits else 4


def program_costs(lowered, compiled, num_devices: int) -> tuple[float, float, float | None, str]:
    """(FLOPs, bytes accessed, compiler's positive time estimate or None, source) per device.

    XLA's TPU and CPU compilers report their own cost analysis. The CUDA compiler's
    compile-only executable reports none; then XLA's HLO cost analysis (run by the CPU
    client) counts FLOPs on the lowered program (split evenly over the devices) and bytes on
    the GPU-optimised per-device program.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    if cost:
        seconds = cost.get("optimal_seconds")
        seconds = seconds if seconds is not None and seconds > 0 else None
        return float(cost["flops"]), float(cost["bytes accessed"]), seconds, "compiler"
    from jax._src import xla_bridge
    from jax._src.lib import _jax

    cpu = xla_bridge.get_backend("cpu")
    logical = _jax.hlo_module_cost_analysis(cpu, lowered._lowering.hlo().as_hlo_module())
    module = compiled.runtime_executable().hlo_modules()[0]
    optimised = _jax.hlo_module_cost_analysis(cpu, module)
    source = "HLO cost analysis (FLOPs: lowered program / devices; bytes: optimised program)"
    return logical["flops"] / num_devices, optimised["bytes accessed"], None, source
