"""Accelerators to compile for: TPU slices and NVIDIA GPUs by name, with datasheet figures.

A target name is what a cloud console calls the machine: `v5e-8`, `v6e-256`, `v4-32`,
`v5p-128`, `h100-8`, `h200-1`. As Cloud TPU does, v2, v3, v4 and v5p names count TensorCores
(two per chip: v4-32 has 16 chips) and v5e/v6e names count chips. `devices(target)` gives
compile-only devices of the whole slice, every host's, in the order the runtime lists them
(`jax.devices()` on a real slice), so that a mesh built from them is the one a real
multi-process run builds. TPU devices come from libtpu (`pip install -e '.[tpu]'`), GPU
devices from the CUDA plugin (`pip install -e '.[gpu-compile]'`); neither needs the device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

TPU_INSTALL = "pip install -e '.[tpu]'  (libtpu, the TPU compiler, matching the installed jax)"
GPU_INSTALL = "pip install -e '.[gpu-compile]'  (the CUDA plugin matching the installed jaxlib)"
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Datasheet figures of one JAX device (a chip; a TensorCore on v2/v3).

    `peak_flops` is keyed by `config.model.precision`: on TPUs "highest" float32 products take
    six bf16 passes of the matrix unit (peak / 6), "default" and "bf16" one pass; on GPUs
    "highest" runs on the float32 (CUDA core) units, "default" on TF32 tensor cores.
    Dense (no sparsity) figures throughout.
    """

    generation: str
    device_kind: str  # what `jax.devices()[0].device_kind` reports on the real device
    platform: str  # "tpu" | "gpu"
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    peak_flops: dict  # precision -> FLOP/s
    source: str


def _tpu(generation, kind, hbm_gib, bw_gbs, bf16_tflops, source) -> Chip:
    bf16 = bf16_tflops * 1e12
    peaks = {"highest": bf16 / 6, "default": bf16, "bf16": bf16}
    return Chip(generation, kind, "tpu", hbm_gib * GiB, bw_gbs * 1e9, peaks, source)


_CLOUD_TPU = "Cloud TPU system architecture pages (per chip)"
# v2/v3: each TensorCore is its own JAX device; the figures are per TensorCore (half a chip).
CHIPS: dict[str, Chip] = {
    "v2": _tpu("v2", "TPU v2", 8, 350, 23, "TPUv2 chip: 46 TFLOP/s, 16 GiB, 700 GB/s, halved"),
    "v3": _tpu("v3", "TPU v3", 16, 450, 61.5, "TPUv3 chip: 123 TFLOP/s, 32 GiB, 900 GB/s, halved"),
    "v4": _tpu("v4", "TPU v4", 32, 1200, 275, _CLOUD_TPU),
    "v5e": _tpu("v5e", "TPU v5 lite", 16, 819, 197, _CLOUD_TPU),
    "v5p": _tpu("v5p", "TPU v5", 95, 2765, 459, _CLOUD_TPU),
    "v6e": _tpu("v6e", "TPU v6 lite", 32, 1640, 918, _CLOUD_TPU),
    "h100": Chip(
        "h100",
        "NVIDIA H100 80GB HBM3",
        "gpu",
        80e9,
        3.35e12,
        {"highest": 67e12, "default": 494.7e12, "bf16": 989.4e12},
        "NVIDIA H100 SXM datasheet",
    ),
    "h200": Chip(
        "h200",
        "NVIDIA H200",
        "gpu",
        141e9,
        4.8e12,
        {"highest": 67e12, "default": 494.7e12, "bf16": 989.4e12},
        "NVIDIA H200 SXM datasheet",
    ),
}

# JAX's GPU client preallocates this share of a GPU's memory as its pool unless the environment
# names another (jax's "GPU memory allocation" page); XLA:GPU also aims its own rematerialisation
# at about three quarters of the device. TPUs need no such share: their compiler checks the
# program against the chip's HBM itself.
GPU_MEMORY_FRACTION = 0.75
_FRACTION_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")


def usable_bytes(chip: Chip, environ=os.environ) -> float:
    """The memory one process may fill: a TPU's HBM; on a GPU, JAX's default pool (75 %, or the
    fraction `XLA_CLIENT_MEM_FRACTION` / `XLA_PYTHON_CLIENT_MEM_FRACTION` sets)."""
    if chip.platform != "gpu":
        return chip.hbm_bytes
    name = next((v for v in _FRACTION_VARS if environ.get(v)), None)
    if name is None:
        return GPU_MEMORY_FRACTION * chip.hbm_bytes
    try:
        fraction = float(environ[name])
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise ValueError(f"{name}={environ[name]!r}: a fraction of GPU memory in (0, 1] is needed.")
    return fraction * chip.hbm_bytes


# Standard slice shapes (chips along each axis) per TPU generation.
_SHAPES_2D = ("2x2", "4x4", "4x8", "8x8", "8x16", "16x16")
_SHAPES_3D = (
    "2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16", "8x16x16",
)  # fmt: skip
_TPU_SHAPES = {
    "v2": _SHAPES_2D,
    "v3": (*_SHAPES_2D, "16x32", "32x32"),
    "v4": _SHAPES_3D,
    "v5p": (*_SHAPES_3D, "16x16x16"),
    "v5e": ("1x1", "2x2", "2x4", *_SHAPES_2D[1:]),
    "v6e": ("1x1", "2x2", "2x4", *_SHAPES_2D[1:]),
}
_CORE_NAMED = ("v2", "v3", "v4", "v5p")  # names count TensorCores, two per chip
_SINGLE_HOST_MAX = {"v5e": 8, "v6e": 8}  # chips one host holds in the smallest slices
GPUS_PER_HOST = 8
_GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class Target:
    """One named accelerator configuration to compile for."""

    name: str
    chip: Chip
    chips: int
    devices_per_chip: int
    hosts: int
    topology: str  # libtpu's "v5e:2x4" or the CUDA plugin's "slices x hosts x gpus per host"
    chips_per_host_bounds: tuple[int, int, int] | None  # TPU only
    chip_config: str = "default"  # libtpu's; v4 VMs run "megacore" (one device per chip)

    @property
    def num_devices(self) -> int:
        return self.chips * self.devices_per_chip


def _tpu_target(generation: str, shape: str) -> Target:
    dims = [int(d) for d in shape.split("x")]
    chips = math.prod(dims)
    per_chip = 2 if generation in ("v2", "v3") else 1
    count = chips * 2 if generation in _CORE_NAMED else chips
    if chips <= _SINGLE_HOST_MAX.get(generation, 4):
        bounds = tuple(dims) if len(dims) == 3 else (*dims, 1)
    else:
        bounds = (2, 2, 1)
    return Target(
        name=f"{generation}-{count}",
        chip=CHIPS[generation],
        chips=chips,
        devices_per_chip=per_chip,
        hosts=chips // math.prod(bounds),
        topology=f"{generation}:{shape}",
        chips_per_host_bounds=bounds,
        chip_config="megacore" if generation == "v4" else "default",
    )


def _gpu_target(generation: str, count: int) -> Target:
    per_host = min(count, GPUS_PER_HOST)
    hosts = count // per_host
    return Target(
        name=f"{generation}-{count}",
        chip=CHIPS[generation],
        chips=count,
        devices_per_chip=1,
        hosts=hosts,
        topology=f"1x{hosts}x{per_host}",
        chips_per_host_bounds=None,
    )


@functools.cache
def all_targets() -> dict[str, Target]:
    """Every target name this module knows, TPU slices then GPUs."""
    found = [_tpu_target(g, s) for g, shapes in _TPU_SHAPES.items() for s in shapes]
    found += [_gpu_target(g, n) for g in ("h100", "h200") for n in _GPU_COUNTS]
    return {t.name: t for t in found}


def valid_names() -> str:
    """One line: every valid name, grouped by generation."""
    groups: dict[str, list[str]] = {}
    for t in all_targets().values():
        groups.setdefault(t.chip.generation, []).append(t.name.split("-")[1])
    return "; ".join(f"{g}-{{{','.join(counts)}}}" for g, counts in groups.items())


def get_target(name: str) -> Target:
    """The target called `name` (`v5litepod-N` is accepted for `v5e-N`); ValueError lists the
    valid names."""
    key = name.strip().lower().replace("v5litepod-", "v5e-")
    if key not in all_targets():
        raise ValueError(f"Unknown --compile_for target {name!r}; valid: {valid_names()}.")
    return all_targets()[key]


def _gpu_target_config(chip: Chip) -> str:
    """A stream_executor.GpuTargetConfigProto (text) for an SXM Hopper GPU (compute 9.0): what
    the CUDA compiler needs to know of a device it cannot see, from the public datasheet."""
    sm_count, clock_ghz, l2_bytes = 132, 1.98, 50 * 2**20
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {228 * 1024}
  shared_memory_per_block_optin: {227 * 1024}
  threads_per_core_limit: 2048
  core_count: {sm_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bandwidth)}
  l2_cache_size: {l2_bytes}
  clock_rate_ghz: {clock_ghz}
  device_memory_size: {int(chip.hbm_bytes)}
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{chip.device_kind}"
"""


class MissingCompiler(RuntimeError):
    """The compiler of a target's platform is not installed; the message gives the install line."""


def devices(target: Target) -> list:
    """Compile-only devices of every host of `target`, in the runtime's order."""
    from jax.experimental import topologies

    if target.chip.platform == "tpu":
        # libtpu refuses to load beside another process's lock file; compiling needs no chip.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            desc = topologies.get_topology_desc(
                platform="tpu",
                topology_name=target.topology,
                chip_config_name=target.chip_config,
                chips_per_host_bounds=target.chips_per_host_bounds,
                num_slices=1,
            )
        except RuntimeError as error:
            if "support not installed" in str(error):
                raise MissingCompiler(
                    f"Compiling for {target.name} needs libtpu ({_first_line(error)}); "
                    f"install it: {TPU_INSTALL}"
                ) from None
            raise
    else:
        try:
            desc = topologies.get_topology_desc(
                platform="cuda",
                target_config=_gpu_target_config(target.chip),
                topology=target.topology,
            )
        except Exception as error:
            raise MissingCompiler(
                f"Compiling for {target.name} needs the CUDA compiler plugin "
                f"({_first_line(error)}); install it: {GPU_INSTALL}"
            ) from None
    return list(desc.devices)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
