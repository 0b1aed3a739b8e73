"""Where a train step's time goes: each phase-collapse block timed alone, against the matmul peak.

    python benchmarks/blocks.py                                  # CIFAR-10 variant B, batch 128
    python benchmarks/blocks.py --model imagenet/mod/linear_plus_rho --batch 16
    python benchmarks/blocks.py --quick                          # digits network, smoke run

Each block of a registered phase-collapse network is compiled on its own, in train mode (batch
statistics), and fed the previous block's output (random images for block 0). Two programs per
block: the forward pass, and forward + backward (the gradient of a random linear function of the
output w.r.t. the block's parameters and, after block 0, its input, as in the full train step).
FLOPs are XLA's cost analysis of each compiled program. "At peak" is the time those FLOPs would
take at the fp32 matmul peak measured in the same run; the rest of a block's time is the
per-element work around its projection matmul (wavelet transform, modulus, statistics, packing
and layout copies). CPU runs use the trainer's host-memory setting (`pcjax.training.host_memory`).
Prints a Markdown table and writes it, with a CSV, under docs/benchmarks/ unless --quick.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import shlex
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `timing` when run as a script

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from timing import compile_fn, compiled_flops, matmul_peak_gflops, time_fn  # noqa: E402

from pcjax.nn import layers, models  # noqa: E402
from pcjax.training import host_memory  # noqa: E402


def measure_blocks(model_name: str, batch: int, min_runs: int) -> list[dict]:
    """Per-block forward and forward + backward times and FLOPs of `model_name`."""
    spec = models.get_model_spec(model_name)
    net = spec.build()
    if not isinstance(net, models.PhaseCollapseNet):
        raise ValueError(f"{model_name!r} is not a phase-collapse network.")
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, *spec.image_shape), jnp.float32)
    rows = []
    for b, kwargs in enumerate(net.block_kwargs()):
        block = layers.PhaseCollapseBlock(**kwargs)
        variables = block.init(jax.random.fold_in(key, b), x, True)

        def forward(v, x, block=block):
            return block.apply(v, x, True, mutable=["batch_stats"])[0]

        fwd, _ = compile_fn(forward, variables, x)
        y = fwd(variables, x)
        cotangent = jax.random.normal(jax.random.fold_in(key, 1000 + b), y.shape, y.dtype)

        def loss(v, x, forward=forward, cotangent=cotangent):
            return jnp.real(jnp.vdot(cotangent, forward(v, x)))

        # Block 0 sees the images: the train step needs no gradient w.r.t. them.
        grad, _ = compile_fn(jax.grad(loss, argnums=(0, 1) if b else 0), variables, x)
        t_fwd = time_fn(fwd, variables, x, min_runs=min_runs, min_time=0.0)
        t_grad = time_fn(grad, variables, x, min_runs=min_runs, min_time=0.0)
        rows.append(
            {
                "block": b,
                "filter_mode": kwargs["filter_mode"],
                "input": "x".join(map(str, x.shape[1:])) + ("c" if jnp.iscomplexobj(x) else ""),
                "output": "x".join(map(str, y.shape[1:])) + "c",
                "fwd_ms": t_fwd.median_ms,
                "fwd_bwd_ms": t_grad.median_ms,
                "fwd_gflop": compiled_flops(fwd) / 1e9,
                "fwd_bwd_gflop": compiled_flops(grad) / 1e9,
            }
        )
        print(rows[-1], flush=True)
        x = y
    return rows


def format_table(rows: list[dict], peak: float) -> str:
    """Markdown table of `measure_blocks` rows, with the time their FLOPs take at `peak`."""
    lines = [
        "| block | filters | input | output | fwd ms | fwd+bwd ms | fwd+bwd GFLOP "
        "| GFLOP/s | ms at peak | ms above peak | share of blocks' time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    total = sum(r["fwd_bwd_ms"] for r in rows)
    at_peak_total = 0.0
    for r in rows:
        at_peak = r["fwd_bwd_gflop"] / peak * 1e3
        at_peak_total += at_peak
        lines.append(
            f"| {r['block']} | {r['filter_mode']} | {r['input']} | {r['output']} | "
            f"{r['fwd_ms']:.0f} | {r['fwd_bwd_ms']:.0f} | {r['fwd_bwd_gflop']:.1f} | "
            f"{r['fwd_bwd_gflop'] / r['fwd_bwd_ms'] * 1e3:.0f} | {at_peak:.0f} | "
            f"{r['fwd_bwd_ms'] - at_peak:.0f} | {100 * r['fwd_bwd_ms'] / total:.0f}% |"
        )
    lines.append(
        f"| all | | | | {sum(r['fwd_ms'] for r in rows):.0f} | {total:.0f} | "
        f"{sum(r['fwd_bwd_gflop'] for r in rows):.1f} | | {at_peak_total:.0f} | "
        f"{total - at_peak_total:.0f} | 100% |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cifar10/mod/linear_plus_rho")
    parser.add_argument("--batch", type=int, help="default: 128 (CIFAR-10), 16 (ImageNet)")
    parser.add_argument("--quick", action="store_true", help="digits network, batch 8, no file")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per program (median)")
    parser.add_argument("--out", help="Markdown path (default: docs/benchmarks/blocks_<name>.md)")
    args = parser.parse_args()
    host_memory.reuse_step_memory()  # before JAX starts its backends, as launch.run does
    model_name = "digits/mod/rho_psi" if args.quick else args.model
    batch = 8 if args.quick else (args.batch or (16 if model_name.startswith("imagenet") else 128))
    rows = measure_blocks(model_name, batch, args.runs)
    peak = matmul_peak_gflops()
    header = (
        f"Command: `python benchmarks/blocks.py {shlex.join(sys.argv[1:])}`  \n"
        f"Date: {datetime.date.today()}; jax {jax.__version__}; device "
        f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}; {os.cpu_count()} CPU "
        f"cores.  \nModel: {model_name}, batch {batch}, train mode. fp32 4096x4096 matmul "
        f"peak measured in the same run: {peak:.0f} GFLOP/s.\n"
    )
    table = header + "\n" + format_table(rows, peak) + "\n"
    print(table)
    if args.quick:
        return
    name = model_name.split("/")[0] + "_" + model_name.split("/")[-1]
    out = Path(args.out or REPO_ROOT / "docs" / "benchmarks" / f"blocks_{name}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Per-block benchmark: {model_name}\n\n" + table)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "matmul_peak_gflops"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "matmul_peak_gflops": peak})


if __name__ == "__main__":
    main()
