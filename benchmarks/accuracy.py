"""Forward error of pcjax against a float64 NumPy evaluation of the same seeded model.

For each block of the CIFAR-10 variant-B net (train-mode batch statistics, seeded weights and
images) prints: the error of the projection output of that block alone (its float64 input
rounded to float32), and the error of the block output when the float32 net runs from the image
(chained). Errors are max |pcjax - float64| / max |float64|, at each precision policy.

    python -m benchmarks.accuracy [--batch 4] [--precision highest default bf16]
    python -m benchmarks.accuracy --seed 1 --same-weights /tmp/cifar_b_seed1.npz

`--same-weights PATH` also writes the image batch, every projection kernel and the float64
block outputs of that seed to PATH, for `benchmarks/reference_accuracy.py` to run the authors'
code with the same weights and inputs against the same float64 outputs.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from pcjax.nn import layers, models
from tests.support import float64_oracle as oracle


def block_errors(
    model_name: str,
    precision: str,
    batch: int,
    seed: int = 0,
    size: int = 32,
    wavelet_method: str = "auto",
    dump: str | None = None,
):
    """[(block, single-block projection error, chained output error)] for one model.

    With `dump` (a path), also saves the input, kernels and float64 outputs there (`.npz`)."""
    model = models.build_model(model_name, precision=precision, wavelet_method=wavelet_method)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((batch, size, size, 3)) * 1.2 + 0.3).astype(np.float32)
    variables = model.init(jax.random.key(seed), jnp.asarray(x))
    want = oracle.net_blocks(model, variables, x)
    if dump:
        kernels = {
            f"kernel{b}": np.asarray(variables["params"][f"block{b}"]["proj"]["kernel"])
            for b in range(len(want))
        }
        np.savez(dump, x=x, **kernels, **{f"want{b}": w for b, w in enumerate(want)})
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
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the images")
    p.add_argument("--same-weights", help="also write the seed's weights, input, float64 outputs")
    args = p.parse_args()
    print(
        f"{args.model}, batch {args.batch}, wavelets {args.wavelet_method}, "
        f"seed {args.seed}, backend {jax.default_backend()}"
    )
    print("| precision | block | one block (proj. out) | chained (block out) |")
    print("|---|---|---|---|")
    for prec in args.precision:
        dump = args.same_weights if prec == args.precision[0] else None
        for b, single, chained in block_errors(
            args.model, prec, args.batch, args.seed, wavelet_method=args.wavelet_method, dump=dump
        ):
            print(f"| {prec} | {b} | {single:.2e} | {chained:.2e} |")


if __name__ == "__main__":
    main()
