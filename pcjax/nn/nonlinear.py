"""Point-wise non-linearities: the phase collapse (modulus) and its phase-preserving rivals.

Complex non-linearities of docs/spec.md 2.4 act on the modulus only,
rho(z) = f(|z|) z / (|z| + eps), so they keep the phase; the modulus |z| discards it. Real
non-linearities are those of the bias-free ResNet baselines (section 3.9). Every function here
has finite gradients everywhere, at z = 0 included.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

EPS = 1e-6  # added to |z| in every phase-preserving non-linearity, as in the reference


def modulus(z: jax.Array) -> jax.Array:
    """Phase collapse |z|. Real output; gradient defined as 0 at z = 0.

    `jnp.abs` has a zero gradient at 0, unlike a hand-written sqrt(re^2 + im^2) (NaN there).
    """
    return jnp.abs(z)


def soft_threshold_complex(z: jax.Array, threshold: jax.Array | float) -> jax.Array:
    """`cst`: ReLU(1 - lambda / (|z| + eps)) z, shrinks |z| by lambda and keeps the phase."""
    return jax.nn.relu(1 - threshold / (modulus(z) + EPS)) * z


def phase(z: jax.Array) -> jax.Array:
    """`mc` ("modulus collapse"): z / (|z| + eps), keeps only the phase."""
    return z / (modulus(z) + EPS)


def modulus_sigmoid(z: jax.Array, gain: jax.Array | float, bias: jax.Array | float) -> jax.Array:
    """`ms`: sigmoid(g |z| + b) z / (|z| + eps)."""
    r = modulus(z)
    return jax.nn.sigmoid(gain * r + bias) / (r + EPS) * z


def modulus_tanh(z: jax.Array) -> jax.Array:
    """`tanh`: tanh(|z|) z / (|z| + eps)."""
    r = modulus(z)
    return jnp.tanh(r) / (r + EPS) * z


def modulus_power(z: jax.Array, gain: jax.Array | float, bias: jax.Array | float) -> jax.Array:
    """`pow`: t / ((1 + t)(|z| + eps)) z with t = e^b |z|^g (defined in the reference, unused)."""
    r = modulus(z)
    # |z|^g has an infinite derivative at 0 for g < 1: evaluate it away from 0 and use 0 there.
    positive = r > 0
    t = jnp.where(positive, jnp.exp(bias) * jnp.where(positive, r, 1.0) ** gain, 0.0)
    return t / ((1 + t) * (r + EPS)) * z


def soft_threshold(x: jax.Array, threshold: jax.Array | float) -> jax.Array:
    """Real soft-thresholding ReLU(x - b) - ReLU(-x - b) (ResNet baseline `thresh`)."""
    return jax.nn.relu(x - threshold) - jax.nn.relu(-x - threshold)


def power_fixed(x: jax.Array) -> jax.Array:
    """x / (1 + |x|) (ResNet baseline `powfixed`)."""
    return x / (1 + jnp.abs(x))


# name -> (input kind, output kind, names of per-channel parameters). "mod" is the phase
# collapse; the others of the first group are the phase-preserving baselines of Table 2.
COMPLEX_NONLINEARITIES: dict[str, tuple[str, ...]] = {
    "mod": (),
    "cst": ("threshold",),
    "ms": ("gain", "bias"),
    "mc": (),
    "tanh": (),
    "pow": ("gain", "bias"),
}
REAL_NONLINEARITIES: dict[str, tuple[str, ...]] = {
    "relu": (),
    "abs": (),
    "thresh": ("threshold",),
    "tanh": (),
    "powfixed": (),
}


def apply_complex_nonlinearity(name: str, z: jax.Array, **params: jax.Array) -> jax.Array:
    """rho(z) for a complex non-linearity of `COMPLEX_NONLINEARITIES` by name.

    `mod` returns a real array; the others return complex arrays (phase preserved).
    Raises ValueError for an unknown name or a real input.
    """
    if name not in COMPLEX_NONLINEARITIES:
        raise ValueError(
            f"Unknown complex non-linearity {name!r}; "
            f"valid choices: {tuple(COMPLEX_NONLINEARITIES)}."
        )
    if not jnp.iscomplexobj(z):
        raise ValueError(f"Non-linearity {name!r} expects a complex input, got {z.dtype}.")
    fns: dict[str, Callable[..., jax.Array]] = {
        "mod": modulus,
        "cst": soft_threshold_complex,
        "ms": modulus_sigmoid,
        "mc": phase,
        "tanh": modulus_tanh,
        "pow": modulus_power,
    }
    return fns[name](z, **params)


def apply_real_nonlinearity(name: str, x: jax.Array, **params: jax.Array) -> jax.Array:
    """A real non-linearity of `REAL_NONLINEARITIES` (ResNet baselines) by name."""
    fns: dict[str, Callable[..., jax.Array]] = {
        "relu": jax.nn.relu,
        "abs": jnp.abs,
        "thresh": soft_threshold,
        "tanh": jnp.tanh,
        "powfixed": power_fixed,
    }
    if name not in fns:
        raise ValueError(
            f"Unknown real non-linearity {name!r}; valid choices: {tuple(REAL_NONLINEARITIES)}."
        )
    if jnp.iscomplexobj(x):
        raise ValueError(f"Non-linearity {name!r} expects a real input, got {x.dtype}.")
    return fns[name](x, **params)


def normalize_pixels(x: jax.Array, axis: int = -1) -> jax.Array:
    """N: divides each pixel vector by its L2 norm over channels, sqrt(sum_c |x_c|^2).

    x: [batch, h, w, c] (or channel-major with `axis`=1), real or complex. The reference has
    no epsilon; an exactly zero pixel vector (0 / 0 there) is mapped to 0 here, which changes
    nothing else.
    """
    sq = jnp.sum(
        jnp.real(x * jnp.conj(x)) if jnp.iscomplexobj(x) else x * x, axis=axis, keepdims=True
    )
    nonzero = sq > 0
    # Double `where` keeps the gradient of sqrt finite at 0.
    norm = jnp.sqrt(jnp.where(nonzero, sq, 1.0))
    return jnp.where(nonzero, x / norm, jnp.zeros_like(x))
