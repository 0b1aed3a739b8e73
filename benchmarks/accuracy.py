"""Forward error of pcjax against a float64 NumPy evaluation of the same seeded model.

For each block of the CIFAR-10 variant-B net (train-mode batch statistics, seeded weights and
images) prints: the error of the projection output of that block alone (its float64 input
rounded to float32), and the error of the block output when the float32 net runs from the image
(chained). Errors are max |pcjax - float64| / max |float64|, at each precision policy.

    python -m benchmarks.accuracy [--batch 4] [--precision highest default bf16]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from pcjax import layers, models
from tests import float64_oracle as oracle


def block_errors(
    model_name: str,
    precision: str,
    batch: int,
    seed: int = 0,
    size: int = 32,
    wavelet_method: str = "auto",
):
    """[(block, single-block projection error, chained output error)] for one model."""
    model = models.build_model(model_name, precision=precision, wavelet_method=wavelet_method)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((batch, size, size, 3)) * 1.2 + 0.3).astype(np.float32)
    variables = model.init(jax.random.key(seed), jnp.asarray(x))
    want = oracle.net_blocks(model, variables, x)
    rows = []
    u32 = jnp.asarray(x)
    inputs = [np.asarray(x, np.float64), *want[:-1]]
    for b, kw in enumerate(model.block_kwargs()):
        blk = layers.PhaseCollapseBlock(**kw)
        v = {"params": variables["params"][f"block{b}"]}
        if "batch_stats" in variables:
            v["batch_stats"] = variables["batch_stats"][f"block{b}"]
        # Single block: the float64 input rounded to float32, projection output before N.
        xin = inputs[b]
        xin32 = jnp.asarray(xin.astype(np.complex64 if np.iscomplexobj(xin) else np.float32))
        _, inter = blk.apply(
            v,
            xin32,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda mdl, _: mdl.name == "proj",
        )
        got_proj = inter["intermediates"]["proj"]["__call__"][0]
        want_proj = oracle.block_pre_norm(
            xin,
            v["params"],
            kw["num_angles"],
            kw["filter_mode"],
            kw["block_type"],
            kw["nonlinearity"],
        )
        u32, _ = blk.apply(v, u32, train=True, mutable=["batch_stats"])
        rows.append(
            (b, oracle.relative_error(got_proj, want_proj), oracle.relative_error(u32, want[b]))
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="cifar10/mod/linear_plus_rho")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", nargs="+", default=list(layers.PRECISIONS))
    p.add_argument("--wavelet-method", default="auto")
    args = p.parse_args()
    print(
        f"{args.model}, batch {args.batch}, wavelets {args.wavelet_method}, "
        f"backend {jax.default_backend()}"
    )
    print("| precision | block | one block (proj. out) | chained (block out) |")
    print("|---|---|---|---|")
    for prec in args.precision:
        for b, single, chained in block_errors(
            args.model, prec, args.batch, wavelet_method=args.wavelet_method
        ):
            print(f"| {prec} | {b} | {single:.2e} | {chained:.2e} |")


if __name__ == "__main__":
    main()
