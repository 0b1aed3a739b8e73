"""One-shot device benchmark: speed, memory, achieved TFLOP/s and error per precision policy.

    python benchmarks/accelerator.py            # on a GPU/TPU: about 5 minutes on one device
    python benchmarks/accelerator.py --quick    # tiny models on CPU, under a minute

Prints one Markdown table: per model (CIFAR-10 variant A and B at batch 128, ImageNet variant B
at 128 or the largest batch that fits) and per precision policy (`model.precision`): compile
time, train and eval images/s, peak device memory, achieved TFLOP/s (XLA's FLOP count of the
compiled step / time) against the device's datasheet peak for that precision, and the error of
one block (CIFAR-10 variant-B block 4 shape, batch 8) against a float64 NumPy evaluation.

The train step is self-contained (softmax cross-entropy, SGD momentum 0.9, coupled weight decay
1e-4, batch statistics updated), so the figures do not depend on the training loop's code.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from timing import compiled_flops  # noqa: E402

from pcjax.nn import layers, models  # noqa: E402
from tests.support import float64_oracle as oracle  # noqa: E402

# Dense datasheet peaks, TFLOP/s, per precision policy (highest = float32 non-tensor-core on
# GPUs, 6 bf16 passes on TPUs; default = TF32 / one bf16 pass). Unknown devices print "n/a".
PEAK_TFLOPS = {
    "H100": {"highest": 67.0, "default": 495.0, "bf16": 989.0},
    "H200": {"highest": 67.0, "default": 495.0, "bf16": 989.0},
    "A100": {"highest": 19.5, "default": 156.0, "bf16": 312.0},
    "TPU v5 lite": {"highest": 197.0 / 6, "default": 197.0, "bf16": 197.0},
}
ROWS = {
    "cifar_a": ("cifar10/mod/rho_psi", 128, None),
    "cifar_b": ("cifar10/mod/linear_plus_rho", 128, None),
    "imagenet_b": ("imagenet/mod/linear_plus_rho", 128, None),
}
QUICK_ROWS = {
    "cifar_a": ("cifar10/mod/rho_psi", 4, (8, 8)),
    "cifar_b": ("cifar10/mod/linear_plus_rho", 4, (8, 8)),
}


def peak_tflops(device_kind: str, precision: str) -> float | None:
    for name, peaks in PEAK_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return peaks[precision]
    return None


def _train_step(model, tx):
    def step(state, x, y):
        params, stats, opt_state = state

        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return (optax.apply_updates(params, updates), upd["batch_stats"], opt_state), loss

    return step


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _peak_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def measure_row(name, batch, widths, precision, repeats, image_size=None):
    """Compile time, train/eval images/s and TFLOP/s of one model at one precision."""
    overrides = {"precision": precision}
    if widths is not None:
        overrides["widths"] = widths
    spec = models.get_model_spec(name)
    model = spec.build(**overrides)
    shape = spec.image_shape if image_size is None else (image_size, image_size, 3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *shape)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, spec.kwargs["num_classes"], batch).astype(np.int32))
    v = jax.jit(functools.partial(model.init, train=True))(jax.random.key(0), x)
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.01, momentum=0.9))
    state = (v["params"], v["batch_stats"], tx.init(v["params"]))
    t = time.perf_counter()
    train = jax.jit(_train_step(model, tx)).lower(state, x, y).compile()
    compile_s = time.perf_counter() - t
    ev = jax.jit(lambda s, x: model.apply({"params": s[0], "batch_stats": s[1]}, x))
    ev = ev.lower(state, x).compile()
    train_s = _time(lambda: train(state, x, y), repeats=repeats)
    eval_s = _time(lambda: ev(state, x), repeats=repeats)
    return {
        "compile_s": compile_s,
        "train_ips": batch / train_s,
        "eval_ips": batch / eval_s,
        "train_tflops": compiled_flops(train) / train_s / 1e12,
        "peak_gib": _peak_memory_gib(),
    }


def block_error(precision: str, quick: bool) -> float:
    """One CIFAR variant-B block (block-4 shape: 8x8, 512 -> 512 channels) vs float64."""
    c, feats = (16, 16) if quick else (512, 512)
    block = layers.PhaseCollapseBlock(
        feats, 4, "factorized_even", "linear_plus_rho", precision=precision
    )
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 8, 8, c)) + 1j * rng.standard_normal((8, 8, 8, c))
    x = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.complex64)
    v = block.init(jax.random.key(0), jnp.asarray(x), train=True)
    got, _ = block.apply(v, jnp.asarray(x), train=True, mutable=["batch_stats"])
    want = oracle.block(
        x.astype(np.complex128), v["params"], 4, "factorized_even", "linear_plus_rho", "mod"
    )
    return oracle.relative_error(got, want)


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, CPU, under a minute")
    p.add_argument("--precision", nargs="+", default=list(layers.PRECISIONS))
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    rows = QUICK_ROWS if args.quick else ROWS
    dev = jax.devices()[0]
    lines = [
        f"Device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"{datetime.date.today()}{' (--quick: tiny models)' if args.quick else ''}",
        "",
        "| model | batch | precision | compile s | train img/s | eval img/s | peak GiB "
        "| train TFLOP/s | % of peak | one-block error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    errors = {prec: block_error(prec, args.quick) for prec in args.precision}
    for row, (name, batch, widths) in rows.items():
        for prec in args.precision:
            size = 16 if args.quick else None
            while True:
                try:
                    r = measure_row(name, batch, widths, prec, args.repeats, size)
                    break
                except Exception as e:  # out of device memory: halve the batch
                    if "RESOURCE_EXHAUSTED" not in str(e) or batch <= 8:
                        raise
                    batch //= 2
            peak = peak_tflops(dev.device_kind, prec)
            share = None if peak is None else 100 * r["train_tflops"] / peak
            lines.append(
                f"| {row} | {batch} | {prec} | {r['compile_s']:.1f} | {r['train_ips']:.1f} "
                f"| {r['eval_ips']:.1f} | {_fmt(r['peak_gib'], '.2f')} "
                f"| {r['train_tflops']:.3f} | {_fmt(share, '.1f')} | {errors[prec]:.1e} |"
            )
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
