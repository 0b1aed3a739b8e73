"""Where a train step's time goes: each phase-collapse block timed alone, against the matmul peak.

    python -m benchmarks.blocks                          # CIFAR-10 variant B, batch 128
    python -m benchmarks.blocks --config imagenet:mod/linear_plus_rho --batch 16
    python -m benchmarks.blocks --quick                  # the digits network, batch 8, no file

Each block of the preset's network is compiled on its own, in train mode (batch statistics),
and fed the previous block's output (random images for block 0). Two programs per block: the
forward pass, and forward + backward (the gradient of a random linear function of the output
w.r.t. the block's parameters and, after block 0, its input, as in the train step). FLOPs are
XLA's cost analysis; "at peak" is the time they would take at the fp32 matmul rate measured in
the same run, and the rest is the per-element work around the projection (wavelet transform,
modulus, statistics, packing, layout copies). CPU runs reuse step memory (`host_memory`).
"""

from __future__ import annotations

import argparse

from benchmarks import common, host_memory


def measure_blocks(spec: str, batch: int, min_runs: int) -> list[dict]:
    """Per-block forward and forward + backward times and FLOPs of the network of `spec`."""
    import jax
    import jax.numpy as jnp

    from pcjax.configs import schema
    from pcjax.nn import layers

    config, shape = common.load_config(spec)
    if config.model.arch != "phase_collapse":
        raise ValueError(f"{spec!r} is not a phase-collapse network.")
    net = schema.build_model(config)
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, *shape), jnp.float32)
    rows = []
    for b, kwargs in enumerate(net.block_kwargs()):
        block = layers.PhaseCollapseBlock(**kwargs)
        variables = block.init(jax.random.fold_in(key, b), x, True)

        def forward(v, x, block=block):
            return block.apply(v, x, True, mutable=["batch_stats"])[0]

        fwd, _ = common.compile_fn(forward, variables, x)
        y = fwd(variables, x)
        cotangent = jax.random.normal(jax.random.fold_in(key, 1000 + b), y.shape, y.dtype)

        def loss(v, x, forward=forward, cotangent=cotangent):
            return jnp.real(jnp.vdot(cotangent, forward(v, x)))

        # Block 0 sees the images: the train step needs no gradient w.r.t. them.
        grad, _ = common.compile_fn(jax.grad(loss, argnums=(0, 1) if b else 0), variables, x)
        t_fwd = common.time_fn(fwd, variables, x, min_runs=min_runs, min_time=0.0)
        t_grad = common.time_fn(grad, variables, x, min_runs=min_runs, min_time=0.0)
        rows.append(
            {
                "block": b,
                "filter_mode": kwargs["filter_mode"],
                "input": "x".join(map(str, x.shape[1:])) + ("c" if jnp.iscomplexobj(x) else ""),
                "output": "x".join(map(str, y.shape[1:])) + "c",
                "fwd_ms": t_fwd.median_ms,
                "fwd_bwd_ms": t_grad.median_ms,
                "fwd_gflop": common.compiled_flops(fwd) / 1e9,
                "fwd_bwd_gflop": common.compiled_flops(grad) / 1e9,
            }
        )
        print(rows[-1], flush=True)
        x = y
    return rows


def format_table(rows: list[dict], peak: float) -> str:
    """Markdown table of `measure_blocks` rows, with the time their FLOPs take at `peak`."""
    cols = ["block", "filters", "input", "output", "fwd ms", "fwd+bwd ms", "fwd+bwd GFLOP"]
    cols += ["GFLOP/s", "ms at peak", "ms above peak", "share of blocks' time"]
    total = sum(r["fwd_bwd_ms"] for r in rows)
    at_peak = [r["fwd_bwd_gflop"] / peak * 1e3 for r in rows]
    cells = [
        [r["block"], r["filter_mode"], r["input"], r["output"], f"{r['fwd_ms']:.0f}",
         f"{r['fwd_bwd_ms']:.0f}", f"{r['fwd_bwd_gflop']:.1f}",
         f"{r['fwd_bwd_gflop'] / r['fwd_bwd_ms'] * 1e3:.0f}", f"{p:.0f}",
         f"{r['fwd_bwd_ms'] - p:.0f}", f"{100 * r['fwd_bwd_ms'] / total:.0f}%"]
        for r, p in zip(rows, at_peak, strict=True)
    ]  # fmt: skip
    cells.append(
        ["all", "", "", "", f"{sum(r['fwd_ms'] for r in rows):.0f}", f"{total:.0f}",
         f"{sum(r['fwd_bwd_gflop'] for r in rows):.1f}", "", f"{sum(at_peak):.0f}",
         f"{total - sum(at_peak):.0f}", "100%"]
    )  # fmt: skip
    return common.markdown_table(cols, cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="cifar10:mod/linear_plus_rho", help="dataset:preset")
    p.add_argument("--batch", type=int, help="default: 128 (CIFAR-10), 16 (ImageNet)")
    p.add_argument("--quick", action="store_true", help="digits network, batch 8, no file")
    p.add_argument("--runs", type=int, default=3, help="timed calls per program (median)")
    p.add_argument("--out", help="Markdown path (default: docs/benchmarks/blocks_<name>.md)")
    args = p.parse_args()
    host_memory.reuse_step_memory()  # before JAX starts its backends
    spec = "digits" if args.quick else args.config
    batch = 8 if args.quick else (args.batch or (16 if spec.startswith("imagenet") else 128))
    rows = measure_blocks(spec, batch, args.runs)
    peak = common.matmul_peak_gflops()
    text = (
        common.header("blocks")
        + f"Network: {spec}, batch {batch}, train mode. fp32 4096x4096 matmul peak measured in "
        f"the same run: {peak:.0f} GFLOP/s.\n\n" + format_table(rows, peak)
    )
    print(text)
    if not args.quick:
        name = spec.split(":")[0] + "_" + spec.split("/")[-1]
        out = args.out or common.DOCS / f"blocks_{name}.md"
        rows = [{**r, "matmul_peak_gflops": peak} for r in rows]
        common.write_report(out, f"Per-block benchmark: {spec}", text, rows)


if __name__ == "__main__":
    main()
