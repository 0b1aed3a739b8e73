"""Forward error of pcjax against a float64 NumPy evaluation of the same weights and images.

    python -m benchmarks.accuracy                        # CIFAR-10 variant B, every precision
    python -m benchmarks.accuracy --quick                # smoke widths, batch 2
    python -m benchmarks.accuracy --seed 1 --reference CHECKOUT --reference-python TORCH_PYTHON

For each precision policy and each block of the seeded net (train-mode batch statistics): the
error of the block's projection output when the block alone is fed its float64 input rounded to
float32 ("one block"), and the error of the block output when the float32 net runs from the
image ("chained"); each max |pcjax - float64| / max |float64| against
`tests/support/float64_oracle.py`. It runs on the device JAX has, where `default` and `bf16` are
the backend's own (TF32 and bf16 tensor cores on GPUs, one bf16 pass on TPUs).

`--reference`: the authors' float32 PyTorch code with the same weights, images and float64
outputs (`--same-weights PATH` keeps the `.npz`), run by `benchmarks.reference error`; its
chained error is one more column, on the rows of the first precision.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from pcjax.configs import schema
from pcjax.nn import layers
from tests.support import float64_oracle as oracle


def block_errors(config, shape, batch: int, seed: int = 0, dump: str | None = None):
    """[(block, one-block projection error, chained output error)] of `config`'s network.

    With `dump` (a path), also saves the images, kernels and float64 block outputs (`.npz`)."""
    model = schema.build_model(config)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((batch, *shape)) * 1.2 + 0.3).astype(np.float32)
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
        xin = inputs[b]
        xin32 = jnp.asarray(xin.astype(np.complex64 if np.iscomplexobj(xin) else np.float32))
        _, inter = blk.apply(
            v, xin32, train=True, mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda mdl, _: mdl.name == "proj",
        )  # fmt: skip
        want_proj = oracle.block_pre_norm(
            xin, v["params"], kw["num_angles"], kw["filter_mode"], kw["block_type"],
            kw["nonlinearity"],
        )  # fmt: skip
        got_proj = inter["intermediates"]["proj"]["__call__"][0]
        u32, _ = blk.apply(v, u32, train=True, mutable=["batch_stats"])
        rows.append(
            (b, oracle.relative_error(got_proj, want_proj), oracle.relative_error(u32, want[b]))
        )
    return rows


def reference_errors(checkout: str, python: str, weights: str) -> list[float]:
    """Per block, the chained error of the authors' code on the weights and images of `weights`."""
    cmd = [python, "-m", "benchmarks.reference", "error", os.path.abspath(checkout), weights]
    out = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["errors"]


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="cifar10:mod/linear_plus_rho", help="dataset:preset")
    p.add_argument("--quick", action="store_true", help="the preset's smoke widths, batch 2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", nargs="+", default=list(layers.PRECISIONS))
    p.add_argument("--wavelet-method", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the images")
    p.add_argument("--same-weights", help="write the seed's weights, images, float64 outputs")
    p.add_argument("--reference", metavar="CHECKOUT", help="also the authors' code (CIFAR-10 B)")
    p.add_argument("--reference-python", default=sys.executable, help="a Python with torch")
    args = p.parse_args(argv)
    if args.reference and (args.quick or args.config != "cifar10:mod/linear_plus_rho"):
        p.error("--reference runs the authors' CIFAR-10 variant B at full width")
    spec, batch = (args.config + ",smoke", 2) if args.quick else (args.config, args.batch)
    dump = args.same_weights
    if args.reference and not dump:
        dump = os.path.join(tempfile.mkdtemp(), "weights.npz")
    cols = ["precision", "block", "one block (proj. out)", "chained (block out)"]
    rows = []
    for i, prec in enumerate(args.precision):
        config, shape = common.load_config(spec)
        config.model.precision, config.model.wavelet_method = prec, args.wavelet_method
        errors = block_errors(config, shape, batch, args.seed, dump if i == 0 else None)
        rows += [[prec, b, f"{one:.2e}", f"{chained:.2e}"] for b, one, chained in errors]
    if args.reference:
        cols.append("reference, chained")
        ref = reference_errors(args.reference, args.reference_python, dump)
        rows = [r + [f"{ref[r[1]]:.2e}" if r[0] == args.precision[0] else ""] for r in rows]
    text = (
        common.header("accuracy")
        + f"Network: {spec}, batch {batch}, seed {args.seed}, wavelets {args.wavelet_method}, "
        "train-mode batch statistics.\n\n" + common.markdown_table(cols, rows)
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
