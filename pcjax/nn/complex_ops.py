"""Complex-number plumbing: real-pair storage, 1x1 complex projections, semi-unitary init.

Dtype and optimiser policy (decided once for the whole library):

* Activations inside the networks are native complex64 (or float32 where they are real).
* Learned complex weights are stored as real pairs float32[..., 2] = (Re, Im), like the
  reference's `view_as_real` storage. `jax.grad` of a real loss w.r.t. a complex array returns
  the *conjugate* of the descent direction; with real pairs the gradient is the ordinary one,
  so plain optax optimisers, weight decay on (Re, Im) (= on |w|^2) and momentum act exactly as
  in the reference, and checkpoints hold only real arrays.
* There is no complex bfloat16: every matmul of the model is a real matmul on (Re, Im) planes,
  run under one precision policy (`PRECISIONS`, below).

Precision policy (`model.precision`), applied to every matmul the model does (projections, the
dense and matmul wavelet paths, the classifier):

* "highest": float32 operands at `lax.Precision.HIGHEST`: true float32 products on every
  backend (CPU: the only mode; GPU: no TF32; TPU: the 6-pass bf16 emulation of float32).
  The library default on every backend, because it is the only setting whose accuracy does
  not depend on the backend (the float32 tests and the 8-device test tolerances assume it).
* "default": float32 operands at the backend's default precision (CPU: float32, identical to
  "highest"; GPU Ampere and newer: TF32, 10-bit mantissa; TPU: one bf16 pass). Faster on
  accelerators, about 1e-3 relative error per product there.
* "bf16": bfloat16 operands, float32 accumulation (`preferred_element_type=float32`). Inputs
  are centred before the cast (see `project_segments`), which is what keeps the error at the
  bf16 rounding of the centred values instead of that of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PRECISIONS = ("highest", "default", "bf16")


def check_precision(precision: str) -> None:
    """ValueError naming `precision` and the valid choices, before anything is traced."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; valid choices: {PRECISIONS}.")


def dot_operands(a: jax.Array, b: jax.Array, precision: str, general: bool = True):
    """(a, b, lax precision) of a real matmul under the policy: bf16 casts the operands.

    `general`: the dot may be a batched or non-2-D contraction. XLA:CPU runs plain 2-D
    bf16 x bf16 -> f32 matmuls (with AVX-512 BF16 at twice the float32 rate) but rejects others
    ("Unsupported element type for DotThunk"); those get the same numbers (products of bf16
    values are exact in float32, sums in float32) from the bf16-rounded operands in float32.
    """
    check_precision(precision)
    if precision == "bf16":
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        if general and jax.default_backend() == "cpu":
            return a.astype(jnp.float32), b.astype(jnp.float32), None
        return a, b, None
    lax_precision = jax.lax.Precision.HIGHEST if precision == "highest" else None
    return a, b, lax_precision


def einsum(spec: str, a: jax.Array, b: jax.Array, precision: str = "highest") -> jax.Array:
    """Real `jnp.einsum` under the precision policy, float32 result (float32 accumulation)."""
    a, b, lax_precision = dot_operands(a, b, precision)
    return jnp.einsum(spec, a, b, precision=lax_precision, preferred_element_type=jnp.float32)


def matmul(a: jax.Array, b: jax.Array, precision: str = "highest") -> jax.Array:
    """Real `a @ b` under the precision policy, float32 result (float32 accumulation)."""
    a, b, lax_precision = dot_operands(a, b, precision, general=a.ndim != 2 or b.ndim != 2)
    return jnp.matmul(a, b, precision=lax_precision, preferred_element_type=jnp.float32)


def to_complex(w: jax.Array) -> jax.Array:
    """float[..., 2] (Re, Im) -> complex64[...]."""
    if w.shape[-1] != 2:
        raise ValueError(f"Real-pair arrays end with a size-2 axis, got shape {tuple(w.shape)}.")
    return jax.lax.complex(w[..., 0], w[..., 1])


def to_pair(z: jax.Array) -> jax.Array:
    """complex[...] -> float[..., 2] (Re, Im)."""
    return jnp.stack([z.real, z.imag], axis=-1)


def interleave_real_imag(z: jax.Array) -> jax.Array:
    """complex[..., c] -> real[..., 2c], channel 2k = Re z_k, 2k + 1 = Im z_k (classifier input).

    A real input is promoted with zero imaginary parts, as in the reference.
    """
    if not jnp.iscomplexobj(z):
        z = z.astype(jnp.complex64)
    return jnp.stack([z.real, z.imag], axis=-1).reshape(*z.shape[:-1], 2 * z.shape[-1])


def complex_projection(x: jax.Array, kernel: jax.Array, precision: str = "highest") -> jax.Array:
    """y = x W over the last axis: a bias-free complex 1x1 convolution.

    Args:
        x: float32 or complex64[..., c_in]; a real input is a complex one with zero imaginary part.
        kernel: float32[c_in, c_out, 2], W as (Re, Im) pairs.
        precision: one of `PRECISIONS`.

    Returns:
        complex64[..., c_out].

    Computed as one real matmul: [Re x, Im x] @ [[Wr, Wi], [-Wi, Wr]] for complex x (about 2x
    faster than a native complex64 matmul on CPU), x @ [Wr, Wi] for real x (half the FLOPs of
    the promoted complex product).
    """
    return project_segments([x], kernel, precision)


def semi_unitary_host(seed_words: np.ndarray, c_in: int, c_out: int) -> np.ndarray:
    """The semi-unitary kernel from integer seed words, in NumPy float64: float32[c_in, c_out, 2].

    G in C^{c_out x c_in} with i.i.d. standard complex normal entries (Re, Im each N(0, 1/2)),
    drawn by NumPy's PCG64 seeded with `seed_words`; thin SVD G = U S V^H (LAPACK, float64);
    W = V^H if c_out <= c_in (W W^H = I) else U (W^H W = I). Returns W^T as (Re, Im) pairs.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(v) for v in np.ravel(seed_words)]))
    g = (rng.standard_normal((c_out, c_in)) + 1j * rng.standard_normal((c_out, c_in))) / np.sqrt(2)
    u, _, vh = np.linalg.svd(g, full_matrices=False)
    w = vh if c_out <= c_in else u  # [c_out, c_in]
    return np.stack([w.T.real, w.T.imag], axis=-1).astype(np.float32)


def semi_unitary_init(key: jax.Array, c_in: int, c_out: int) -> jax.Array:
    """Semi-unitary complex projection, float32[c_in, c_out, 2] (Re, Im) pairs (docs/spec.md 3.4).

    Computed on the host (`semi_unitary_host`: NumPy float64 SVD, then rounded once to float32)
    through `jax.pure_callback`, seeded by the words of `key`: the kernel is bit-identical on
    every backend, needs no device SVD (fragile on TPUs), and the call works under `jit` (the
    usual `model.init`), `eval_shape` (no host call at all) and `vmap` over keys.
    """
    words = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    out = jax.ShapeDtypeStruct((c_in, c_out, 2), jnp.float32)
    return jax.pure_callback(
        lambda w: semi_unitary_host(np.asarray(w), c_in, c_out),
        out,
        words,
        vmap_method="sequential",
    )


def rotate_pairs(kernel: jax.Array) -> jax.Array:
    """(Re, Im) pairs of i W, i.e. (-Wi, Wr): the row an imaginary part meets."""
    return jnp.stack([-kernel[..., 1], kernel[..., 0]], axis=-1)


def pack_kernel(kernel: jax.Array, layout: Sequence[tuple[int, bool]]) -> jax.Array:
    """Real matrix of W acting on packed segments, float32[sum(2n or n), 2 c_out].

    `layout` lists (channels, is_complex) per segment. A complex segment x = a + ib meets
    rows (Wr, Wi) for a, then (-Wi, Wr) for b; a real one meets (Wr, Wi) only: 2 real
    multiplications per complex weight instead of 4. Output columns are (Re, Im) interleaved
    per output channel, so the rows for a and for real segments are the kernel itself
    reshaped, with no copy of its real and imaginary halves.
    """
    rows, start = [], 0
    for n, is_complex in layout:
        k = kernel[start : start + n]
        rows.append(k.reshape(n, -1))
        if is_complex:
            rows.append(rotate_pairs(k).reshape(n, -1))
        start += n
    return rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=0)


def _planes(segments: Sequence[jax.Array]) -> list[jax.Array]:
    """Real planes of channel segments: (Re, Im) of a complex segment, a real one as is."""
    planes = []
    for s in segments:
        planes += [s.real, s.imag] if jnp.iscomplexobj(s) else [s]
    return planes


def project_segments(
    segments: Sequence[jax.Array],
    kernel: jax.Array,
    precision: str = "highest",
    means: Sequence[jax.Array] | None = None,
    scales: jax.Array | None = None,
    channel_axis: int = -1,
    planes_apart: bool = False,
) -> jax.Array:
    """y = [(x_1 - m_1), (x_2 - m_2), ...] diag(scales) W for real or complex segments.

    One real matmul; equals `complex_projection(concatenate(segments), kernel)` up to float32
    round-off, with every real segment costing half of a complex one. `means` (one [channels]
    vector per segment) are subtracted from x *before* the matmul (and before any bf16 cast):
    subtracting m W afterwards instead cancels catastrophically on channels whose |mean| / std
    is large (moduli reach 10), costing 2-5x the float32 error and 10x the bf16 error. The
    subtraction fuses into the concatenation of the (Re, Im) planes, so it costs no extra pass.
    `scales` (real [c_in], e.g. 1/std) are folded into the small kernel, which is harmless:
    a per-row scale is one rounding wherever it is applied.

    `channel_axis`=1: channel-major segments [batch, c, ...] and output [batch, c_out, ...];
    each real plane meets its kernel rows in its own matmul (the kernel on the left, the
    spatial axes minor), summed, so no concatenation of the planes is written.
    `planes_apart` does the same channels-last, with the output's Re and Im columns in two
    halves: no concatenation, and no size-2 (Re, Im) axis minor, which TPU tiles pad to 128.
    """
    if channel_axis not in (-1, 1):
        raise ValueError(f"channel_axis must be -1 or 1, got {channel_axis}.")
    c_in = sum(s.shape[channel_axis] for s in segments)
    if kernel.ndim != 3 or kernel.shape[-1] != 2 or kernel.shape[0] != c_in:
        raise ValueError(
            f"Projection kernel must be [c_in={c_in}, c_out, 2], got {tuple(kernel.shape)}."
        )
    check_precision(precision)
    layout = [(s.shape[channel_axis], bool(jnp.iscomplexobj(s))) for s in segments]
    if means is not None:
        segments = [
            s
            - (m.astype(s.dtype) if jnp.iscomplexobj(s) else jnp.real(m)).reshape(
                m.shape + (1,) * (s.ndim - 2 if channel_axis == 1 else 0)
            )
            for s, m in zip(segments, means, strict=True)
        ]
    planes = _planes(segments)
    if channel_axis == 1 or planes_apart:
        if scales is not None:
            kernel = kernel * scales[:, None, None]
        rows = pack_kernel(kernel, layout)  # [sum of plane channels, 2 c_out]
        starts = np.cumsum([0] + [p.shape[channel_axis] for p in planes])
        if channel_axis == -1:
            c_out = kernel.shape[1]
            rows = jnp.swapaxes(rows.reshape(-1, c_out, 2), 1, 2).reshape(-1, 2 * c_out)
            y = sum(
                einsum("...n,nk->...k", p, rows[lo:hi], precision)
                for p, lo, hi in zip(planes, starts[:-1], starts[1:], strict=True)
            )
            return jax.lax.complex(y[..., :c_out], y[..., c_out:])
        y = sum(
            einsum("nk,bn...->bk...", rows[lo:hi], p, precision)
            for p, lo, hi in zip(planes, starts[:-1], starts[1:], strict=True)
        )
        y = y.reshape(y.shape[0], kernel.shape[1], 2, *y.shape[2:])
        return jax.lax.complex(y[:, :, 0], y[:, :, 1])
    x = jnp.concatenate(planes, axis=-1) if len(planes) > 1 else planes[0]
    if scales is not None:
        kernel = kernel * scales[:, None, None]
    # As one 2-D matmul (a free reshape): the form every backend runs in bf16, see `dot_operands`.
    y = matmul(x.reshape(-1, x.shape[-1]), pack_kernel(kernel, layout), precision)
    y = y.reshape(*x.shape[:-1], kernel.shape[1], 2)
    return jax.lax.complex(y[..., 0], y[..., 1])
