"""The trainer's train and eval steps compiled for an accelerator this machine may not have.

`check(config, target_name)` builds the steps with `train.build_steps` (the trainer's own
code) over compile-only devices of a TPU slice or GPUs (`pcjax.accelerators.targets`), feeds them
`ShapeDtypeStruct`s (the replicated state, the batch split over "data", uint8 images as the
input pipeline sends them), compiles, and reports per-device memory, FLOPs, HBM traffic, a
time estimate and the bytes all-reduced per step. A step that does not fit raises
`OutOfMemory` naming the largest per-device batch that does (found by compiling). Where the
local devices are the target's (or the target is "local"), the step also runs on random data
and the measured time is reported beside the estimate. Needs no dataset and no workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax._src import config as jax_config  # the compilation cache's write threshold, scoped

from pcjax.accelerators import batch_search, costs, targets
from pcjax.configs import schema
from pcjax.data import datasets
from pcjax.training import checkpoint, sharding, train

LOCAL = "local"  # the devices this process sees: compile, then run the step too


class OutOfMemory(Exception):
    """A step does not fit the device's memory; the message is the one-line answer."""


class DoesNotFit(Exception):
    """One compile did not fit: args (bytes required or None, bytes available or None,
    global batch)."""


@dataclasses.dataclass
class StepReport:
    """What compiling one step for one device says (sizes in bytes, per device, per step)."""

    name: str  # "train" | "eval"
    global_batch: int
    per_device_batch: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float
    bytes_accessed: float
    cost_source: str
    compiler_seconds: float | None  # the compiler's own estimate, when positive
    allreduce_bytes: int
    compile_seconds: float
    measured_seconds: float | None = None

    @property
    def total_bytes(self) -> int:
        """Peak HBM: arguments + outputs - donated (aliased) + temporaries + code."""
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )


@dataclasses.dataclass
class Setup:
    """A target's devices and mesh, and whether they are real (then the step can run)."""

    target: targets.Target | None  # None: local devices of no known datasheet
    mesh: jax.sharding.Mesh
    hosts: int
    real: bool
    label: str

    @property
    def chip(self) -> targets.Chip | None:
        return self.target.chip if self.target else None


def setup_target(name: str) -> Setup:
    """The devices `name` compiles for: the local ones where they are the target's, else
    compile-only devices of every host (ValueError lists the valid names)."""
    target = None if name == LOCAL else targets.get_target(name)  # a bad name: before jax starts
    local = jax.devices()
    kind = local[0].device_kind
    if target is None:
        known = [t for t in targets.all_targets().values() if _same_kind(kind, t.chip)]
        target = next((t for t in known if t.num_devices == len(local)), None)
        label = f"local: {len(local)} x {kind}"
        return Setup(target, sharding.make_mesh(local), 1, True, label)
    if (
        _same_kind(kind, target.chip)
        and len(local) == target.num_devices
        and jax.process_count() == 1
    ):
        label = f"{target.name}: {len(local)} x {kind} (local devices: compiled and run)"
        return Setup(target, sharding.make_mesh(local), 1, True, label)
    devices = targets.devices(target)
    label = (
        f"{target.name}: {target.chips} x {target.chip.device_kind}, {target.hosts} host(s), "
        f"topology {target.topology} (compile-only)"
    )
    return Setup(target, sharding.make_mesh(devices), target.hosts, False, label)


def _same_kind(kind: str, chip: targets.Chip) -> bool:
    """Whether a device of `kind` is `chip` (GPUs: any "NVIDIA H100 ..." is an h100)."""
    if chip.platform == "gpu":
        return f" {chip.generation.upper()}" in f" {kind}"
    return kind == chip.device_kind


def batch_structs(config, mesh, global_batch: int, eval_batch: bool) -> dict:
    """ShapeDtypeStructs of the global batch the input pipeline feeds: images uint8 for the
    TFDS datasets (float32 for the digits sets), int32 labels, a float32 mask for eval."""
    spec = datasets.spec(config.data.name)
    shape = datasets.image_shape(config.data.name, config.data.image_size)
    dtype = jnp.uint8 if spec.tfds else jnp.float32
    batched = sharding.batch_sharded(mesh)
    out = {
        "image": jax.ShapeDtypeStruct((global_batch, *shape), dtype, sharding=batched),
        "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=batched),
    }
    if eval_batch:
        out["mask"] = jax.ShapeDtypeStruct((global_batch,), jnp.float32, sharding=batched)
    return out


def _steps(config, mesh) -> train.Steps:
    per_epoch = train.steps_per_epoch(config, datasets.spec(config.data.name).num_train_examples)
    shape = datasets.image_shape(config.data.name, config.data.image_size)
    return train.build_steps(config, mesh, per_epoch, shape)


def state_struct(steps: train.Steps, mesh) -> Any:
    """The train state's shapes, replicated over `mesh` (nothing is allocated)."""
    shapes = jax.eval_shape(steps.init, jax.random.key(0))
    replicated = sharding.replicated(mesh)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes
    )


# A Pallas kernel's source locations ride in its custom call's configuration, beside its body.
_KERNEL_LOCATIONS = re.compile(r", \\22debug_locations\\22: \\22[^\\]*\\22")


def program_key(lowered_text: str) -> str:
    """The compile cache's key of a lowered program: a hash of its text, less the source
    locations of its Pallas kernels (which change with any edit above them in their file and
    not the compiled code)."""
    return hashlib.sha256(_KERNEL_LOCATIONS.sub("", lowered_text).encode()).hexdigest()[:20]


def compile_step(
    config,
    setup: Setup,
    which: str,
    per_device_batch: int | None = None,
    cache: Any = None,
    steps: train.Steps | None = None,
    state: Any = None,
):
    """Compiles the train or eval step of `config` on `setup`; (StepReport, compiled, steps).

    Raises DoesNotFit when the compiler refuses the program, or, where the compiler does not
    check (GPU), when the total exceeds what one process may use (`targets.usable_bytes`).
    With `cache` (`get(key)`, `put(key, StepReport | DoesNotFit)`, the key a hash of the
    lowered program), a program compiled before is not compiled again (then `compiled` is
    None). `steps` and `state`
    (`_steps`, `state_struct` of this config and mesh) are built when not given.
    """
    mesh = setup.mesh
    d = config.data
    batch = d.global_batch_size if which == "train" else d.eval_global_batch_size
    batch = batch or d.global_batch_size
    if per_device_batch is not None:
        batch = per_device_batch * mesh.size
    steps = steps or _steps(config, mesh)
    state = state if state is not None else state_struct(steps, mesh)
    fn = steps.train_step if which == "train" else steps.eval_step
    tick = time.perf_counter()
    lowered = fn.lower(state, batch_structs(config, mesh, batch, which == "eval"))
    key = program_key(lowered.as_text()) if cache else None
    known = cache.get(key) if cache else None
    if isinstance(known, DoesNotFit):
        raise known
    if known is not None:
        _check_usable(known, setup.chip)
        return known, None, steps
    try:
        # A compile-only executable cannot be loaded back from JAX's persistent compilation
        # cache (there is no device client to load it into): never write one to a user's cache.
        never = jax_config.persistent_cache_min_compile_time_secs(float("inf"))
        with contextlib.nullcontext() if setup.real else never:
            compiled = lowered.compile()
    except Exception as error:  # XlaRuntimeError; its type moves between jaxlib releases
        if not costs.is_oom(error):
            raise
        required, available = costs.oom_sizes(str(error))
        if cache:
            cache.put(key, DoesNotFit(required, available, batch))
        raise DoesNotFit(required, available, batch) from None
    seconds = time.perf_counter() - tick
    mem = compiled.memory_analysis()
    flops, accessed, estimate, source = costs.program_costs(lowered, compiled, mesh.size)
    report = StepReport(
        name=which,
        global_batch=batch,
        per_device_batch=batch // mesh.size,
        argument_bytes=mem.argument_size_in_bytes,
        output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes,
        code_bytes=mem.generated_code_size_in_bytes,
        flops=flops,
        bytes_accessed=accessed,
        cost_source=source,
        compiler_seconds=estimate,
        allreduce_bytes=costs.allreduce_bytes(compiled.as_text()),
        compile_seconds=seconds,
    )
    if cache:  # what the compiler said; the GPU verdict below is made afresh on every read
        cache.put(key, report)
    _check_usable(report, setup.chip)
    return report, compiled, steps


def _check_usable(report: StepReport, chip: targets.Chip | None) -> None:
    """Raises DoesNotFit where the compiler does not check memory (GPU) and the program's
    total exceeds what a JAX process may use there (`targets.usable_bytes`)."""
    if chip is not None and chip.platform == "gpu":
        usable = targets.usable_bytes(chip)
        if report.total_bytes > usable:
            raise DoesNotFit(report.total_bytes, usable, report.global_batch)


def fits_function(
    config, setup: Setup, which: str, cache: Any = None
) -> Callable[[int], tuple[bool, float | None, float | None]]:
    """`fits(per_device_batch)` for `batch_search.largest_fitting_batch`: compiles the step and
    returns (fits, bytes, available) in the measure the compiler checks (TPU: temporaries;
    else: the total), available where a refusal states it."""
    tpu = setup.mesh.devices.flat[0].platform == "tpu"

    def fits(b: int) -> tuple[bool, float | None, float | None]:
        try:
            report, _, _ = compile_step(config, setup, which, b, cache)
            return True, report.temp_bytes if tpu else report.total_bytes, None
        except DoesNotFit as oom:
            return False, oom.args[0], oom.args[1]

    return fits


def _oom_answer(config, setup: Setup, which: str, error: DoesNotFit) -> str:
    """The one line for a step that does not fit: sizes, and the largest batch that does."""
    required, available, batch = error.args
    chip = setup.chip
    capacity = available or (targets.usable_bytes(chip) if chip else None)

    per_device = batch // setup.mesh.size
    fits = fits_function(config, setup, which)
    best = batch_search.largest_fitting_batch(fits, capacity, hi=per_device, hi_bytes=required)
    kind = chip.device_kind if chip else setup.mesh.devices.flat[0].device_kind
    need = f"needs {_gib(required)} of HBM per device" if required else "does not fit"
    have = f", {_gib(capacity)} available" if capacity else ""
    where = setup.target.name if setup.target else "the local devices"
    if best == 0:
        answer = "not even a batch of 1 per device fits"
    else:
        within = " to within 1 %" if batch_search.margin(best) > 1 else ""
        answer = (
            f"the largest per-device batch that fits is {best}{within} "
            f"(--config.data.{'global' if which == 'train' else 'eval_global'}_batch_size="
            f"{best * setup.mesh.size})"
        )
    return (
        f"out of memory on {where} ({kind}): the {which} step at {per_device} per device "
        f"(global {batch}) {need}{have}; {answer}."
    )


def _gib(n: float | None) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    if n is None:
        return "?"
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.2f} MiB"


def measure(config, setup: Setup, compiled, steps: train.Steps, repeats: int = 5) -> float:
    """Seconds per train step of `compiled` on the real devices of `setup`, on random data
    (after one warm-up step); the state is the trainer's initial state (`steps.init`)."""
    state = steps.init(jax.random.key(config.seed))
    structs = batch_structs(config, setup.mesh, config.data.global_batch_size, False)
    rng = np.random.default_rng(0)
    classes = datasets.num_classes(config.data.name)
    host = {
        "image": (
            rng.integers(0, 256, structs["image"].shape, np.uint8)
            if structs["image"].dtype == jnp.uint8
            else rng.standard_normal(structs["image"].shape, np.float32)
        ),
        "label": rng.integers(0, classes, structs["label"].shape, np.int32),
    }
    batch = {k: jax.device_put(v, structs[k].sharding) for k, v in host.items()}
    state, out = compiled(state, batch)
    jax.block_until_ready(out)
    tick = time.perf_counter()
    for _ in range(repeats):
        state, out = compiled(state, batch)
    jax.block_until_ready((state, out))
    return (time.perf_counter() - tick) / repeats


@dataclasses.dataclass
class Result:
    """Both steps of one config compiled for one target."""

    config: ml_collections.ConfigDict
    setup: Setup
    reports: dict[str, StepReport]  # "train", "eval"
    param_bytes: int

    def table(self) -> str:
        from pcjax.accelerators import compile_report

        return compile_report.format_report(self)


def run(config: ml_collections.ConfigDict, name: str, repeats: int = 5) -> Result:
    """Compiles the train and eval steps of `config` for target `name`; where the devices are
    real, also runs the train step `repeats` times.

    Raises ValueError for an unknown name, `schema.ConfigError` for a config the target
    cannot run, `targets.MissingCompiler`, and `OutOfMemory` with the one-line answer.
    """
    setup = setup_target(name)
    schema.validate(config, device_count=setup.mesh.size, process_count=setup.hosts)
    steps = _steps(config, setup.mesh)  # one model and one state trace for both steps
    state = state_struct(steps, setup.mesh)
    reports = {}
    for which in ("train", "eval"):
        try:
            report, compiled, _ = compile_step(config, setup, which, steps=steps, state=state)
        except DoesNotFit as error:
            raise OutOfMemory(_oom_answer(config, setup, which, error)) from None
        if setup.real and which == "train":
            report.measured_seconds = measure(config, setup, compiled, steps, repeats)
        reports[which] = report
    return Result(config, setup, reports, checkpoint.state_bytes(state.params))


def check(config: ml_collections.ConfigDict, name: str, repeats: int = 5) -> str:
    """`run`, as the report table the --compile_for flag prints."""
    return run(config, name, repeats).table()
