"""Per-block compiled figures of a phase-collapse network for a compile-only TPU v5e chip.

    python -m benchmarks.scale_blocks --config imagenet:mod/rho_psi --blocks 0 1 --batch 16
    python -m benchmarks.scale_blocks --config imagenet:mod/rho_psi --blocks 1 --stages
    python -m benchmarks.scale_blocks --blocks 1 7 --precision bf16

Each block of a preset's network is compiled (never run) on its own, forward + backward
(the gradient of a random linear function of its output w.r.t. its parameters and its input),
in train mode, for one chip of a compile-only v5e 2x2 slice (libtpu's topology description on
this host). Prints XLA's own figures per image: FLOPs, bytes accessed, temporaries, and next to
them the "natural" bytes: the block's input and output at their logical shapes (what a block
that kept everything else on chip would have to move once each way), and the compile's wall
seconds (`--precision` shows what the products' precision costs the compiler).

`--stages` adds, per block, an approximate split of the traffic by stage (wavelets,
non-linearity, Std, projection, normalisation; forward and backward), from the compiled
program's operations: each top-level operation's operands and result at their tiled (padded)
sizes, attributed by the JAX operation that produced it. It sums to about XLA's total (it
counts what the tiles pad), so read it for proportions.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from pcjax.accelerators import targets  # noqa: E402
from pcjax.configs import schema  # noqa: E402
from pcjax.nn import complex_ops, layers  # noqa: E402


def tpu_device():
    """One compile-only chip of a v5e 2x2 slice (accelerators.targets; a missing libtpu: the install
    line)."""
    return targets.devices(targets.get_target("v5e-4"))[0]


def block_inputs(spec: str, batch: int, wavelet_method: str, precision: str = "highest"):
    """(block, variables, input, output) shape structs of every block of the network of
    "dataset:preset" (`common.load_config`)."""
    config, image_shape = common.load_config(spec)
    config.model.wavelet_method = wavelet_method
    config.model.precision = precision
    net = schema.build_model(config, backend="tpu")
    x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    out = []
    for b, kwargs in enumerate(net.block_kwargs()):
        block = layers.PhaseCollapseBlock(**kwargs)
        v = jax.eval_shape(lambda x, blk=block, b=b: blk.init(jax.random.key(b), x, True), x)
        y = jax.eval_shape(
            lambda v, x, blk=block: blk.apply(v, x, True, mutable=["batch_stats"])[0], v, x
        )
        out.append((block, v, x, y))
        x = y
    return out


def compile_block(device, block, v, x, y):
    """The compiled forward + backward program of one block on `device`."""
    sharding = jax.sharding.SingleDeviceSharding(device)

    def place(tree):
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree
        )

    def loss(v, x, ct):
        return jnp.real(jnp.vdot(ct, block.apply(v, x, True, mutable=["batch_stats"])[0]))

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(place(v), place(x), place(y)).compile()


_ITEM = {"f32": 4, "c64": 8, "s32": 4, "u32": 4, "pred": 1, "bf16": 2, "u8": 1}
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]\{([\d,]*)(?::T\((\d+),(\d+)\))?[^}]*\}")
_STAGES = (
    ("_rho", "non-linearity"),
    ("/std/", "Std"),
    ("/proj/", "projection"),
    ("normalize", "normalisation"),
    ("sqrt", "normalisation"),
    ("/div", "normalisation"),
    ("dot_general", "wavelets"),
    ("fft", "wavelets"),
    ("pad", "wavelets"),
    ("/mul", "wavelets"),
)


def _tiled_bytes(text: str) -> int:
    """Bytes of every array type in `text` with its two minor dimensions padded to the tile."""
    total = 0
    for dtype, dims, layout, t0, t1 in _SHAPE.findall(text):
        if dtype not in _ITEM:
            continue
        d = [int(v) for v in dims.split(",")] if dims else []
        minor = [int(v) for v in layout.split(",")] if layout else []
        if t0 and minor:
            d[minor[0]] = -(-d[minor[0]] // int(t1)) * int(t1)
            if len(minor) > 1:
                d[minor[1]] = -(-d[minor[1]] // int(t0)) * int(t0)
        total += _ITEM[dtype] * int(np.prod(d))
    return total


def stage_bytes(hlo_text: str) -> dict[str, int]:
    """Approximate bytes per stage and direction of a compiled TPU program (see the docstring)."""
    entry = re.search(r"^ENTRY .*?^}", hlo_text, re.S | re.M).group(0)
    sizes, stages = {}, collections.Counter()
    free = {"parameter", "constant", "get-tuple-element", "bitcast", "tuple", "copy-done"}
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(.*)", line)
        if not m:
            continue
        name, typ, op, args, rest = m.groups()
        sizes[name] = _tiled_bytes(typ)
        if op in free or op.endswith("-done"):
            continue
        moved = sizes[name] + sum(sizes.get(a.strip().lstrip("%"), 0) for a in args.split(","))
        op_name = re.search(r'op_name="([^"]*)"', rest)
        op_name = op_name.group(1) if op_name else ""
        stage = next((s for key, s in _STAGES if key in op_name), "layout/other")
        stages[f"{stage} {'bwd' if 'transpose(' in op_name else 'fwd'}"] += moved
    return dict(stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="imagenet:mod/rho_psi", help="dataset:preset")
    parser.add_argument("--blocks", type=int, nargs="*", help="default: all")
    parser.add_argument("--batch", type=int, default=16, help="images per chip")
    parser.add_argument("--wavelet-method", default="matmul", choices=("matmul", "pallas", "fft"))
    parser.add_argument("--precision", default="highest", choices=complex_ops.PRECISIONS)
    parser.add_argument("--stages", action="store_true")
    args = parser.parse_args()
    device = tpu_device()
    blocks = block_inputs(args.config, args.batch, args.wavelet_method, args.precision)
    print(
        "| block | input | output | GFLOP/img | HBM MB/img | natural MB/img | ratio "
        "| temporaries MiB/img | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for b in args.blocks if args.blocks is not None else range(len(blocks)):
        block, v, x, y = blocks[b]
        tick = time.perf_counter()
        compiled = compile_block(device, block, v, x, y)
        seconds = time.perf_counter() - tick
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        mem = compiled.memory_analysis()
        n = args.batch
        natural = (x.size * x.dtype.itemsize + y.size * y.dtype.itemsize) / n
        moved = cost["bytes accessed"] / n
        print(
            f"| {b} | {'x'.join(map(str, x.shape[1:]))} {x.dtype} | "
            f"{'x'.join(map(str, y.shape[1:]))} | {cost['flops'] / n / 1e9:.2f} | "
            f"{moved / 1e6:.1f} | {natural / 1e6:.2f} | {moved / natural:.0f} | "
            f"{mem.temp_size_in_bytes / n / 2**20:.1f} | {seconds:.0f} |",
            flush=True,
        )
        if args.stages:
            for stage, nbytes in sorted(stage_bytes(compiled.as_text()).items()):
                print(f"|  | {stage} |  |  | ~{nbytes / n / 1e6:.1f} |  |  |  |  |", flush=True)


if __name__ == "__main__":
    main()
