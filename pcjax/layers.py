"""Flax modules of the phase-collapse networks: where parameters and batch statistics live.

The maths is in pure functions (`wavelets`, `nonlinear`, `complex_ops`); these modules only
declare parameters/statistics and wire the functions together. Layout is NHWC.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pcjax import complex_ops, nonlinear, wavelets

BLOCK_TYPES = ("rho_psi", "linear_plus_rho")
# Initial values of learned non-linearity parameters in the paper's runs (REFERENCE.md 3.8).
DEFAULT_NONLINEARITY_INIT: dict[str, dict[str, float]] = {
    "cst": {"threshold": 0.1},
    "ms": {"gain": 1.0, "bias": 0.0},
    "pow": {"gain": 1.0, "bias": 0.0},
}


class BatchStandardize(nn.Module):
    """Per-channel batch standardisation of a real or complex tensor (`Std`, classifier BN).

    Train: mu = mean(x), var = mean(|x - mu|^2) over all axes but the last (biased), output
    (x - mu) / sqrt(var + eps); one variance per complex channel (Re and Im scaled together).
    Running statistics follow PyTorch: new = (1 - momentum) old + momentum batch, with the
    unbiased variance n / (n - 1) var. Eval uses the running statistics. `affine` adds a learned
    scale and shift (real inputs only), as in the classifier's BatchNorm2d.

    Statistics are over the whole (global) batch the step sees; under a data-parallel `jit` that
    is the batch of all devices, not the reference's per-GPU sub-batches.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    affine: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        c = x.shape[-1]
        is_complex = jnp.iscomplexobj(x)
        if self.affine and is_complex:
            raise ValueError("Affine batch standardisation is defined for real inputs only.")
        # Complex running means are stored as (Re, Im) pairs so checkpoints stay real.
        ra_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((c, 2) if is_complex else (c,), jnp.float32)
        )
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if use_running_average:
            mean = complex_ops.to_complex(ra_mean.value) if is_complex else ra_mean.value
            var = ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axis=axes)
            centred = x - mean
            var = jnp.mean(
                jnp.real(centred * jnp.conj(centred)) if is_complex else centred**2, axis=axes
            )
            if not self.is_initializing():
                n = int(np.prod([x.shape[a] for a in axes]))
                m = self.momentum
                batch_mean = complex_ops.to_pair(mean) if is_complex else mean
                ra_mean.value = (1 - m) * ra_mean.value + m * batch_mean
                ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.affine:
            y = y * self.param("scale", nn.initializers.ones, (c,)) + self.param(
                "bias", nn.initializers.zeros, (c,)
            )
        return y


class ComplexProjection(nn.Module):
    """`Pc`: learned bias-free complex 1x1 projection, semi-unitary initialisation.

    The kernel is stored as float32[c_in, features, 2] (Re, Im) pairs (see `complex_ops`).
    """

    features: int
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            lambda key, shape: complex_ops.semi_unitary_init(key, *shape),
            (x.shape[-1], self.features),
        )
        return complex_ops.complex_projection(x, kernel, self.compute_dtype)


def _concat_channels(parts: list[jax.Array]) -> jax.Array:
    """Concatenates along channels, promoting to complex if any part is complex."""
    if any(jnp.iscomplexobj(p) for p in parts):
        parts = [p.astype(jnp.complex64) for p in parts]
    return jnp.concatenate(parts, axis=-1)


class PhaseCollapseBlock(nn.Module):
    """One block U -> N(Pc(Std(R(W U)))) with fixed wavelets W and non-linearity rho.

    `block_type` says what R keeps (REFERENCE.md 2.5, 3.2):
      * "rho_psi":         [phi*U ; rho(psi*U)] (the low-pass stays linear; the reference's
                           `--psi-arch mod`, labelled `skip=True` in its run list);
      * "linear_plus_rho": [phi*U ; psi*U ; rho(phi*U) ; rho(psi*U)] (linear coefficients carried
                           beside their non-linear images; labelled `skip=False` there).
    Learned non-linearity parameters (cst, ms, pow) have one value per channel rho sees.
    """

    features: int
    num_angles: int
    filter_mode: str
    block_type: str = "rho_psi"
    nonlinearity: str = "mod"
    nonlinearity_init: Mapping[str, float] | None = None
    learn_nonlinearity: bool = True
    wavelet_method: str = "fft"
    compute_dtype: Any = None

    def _rho(self, z: jax.Array) -> jax.Array:
        names = nonlinear.COMPLEX_NONLINEARITIES[self.nonlinearity]
        init = dict(DEFAULT_NONLINEARITY_INIT.get(self.nonlinearity, {}))
        init.update(self.nonlinearity_init or {})
        params = {}
        for name in names:
            if self.learn_nonlinearity:
                params[name] = self.param(
                    f"rho_{name}", nn.initializers.constant(init[name]), (z.shape[-1],)
                )
            else:
                params[name] = init[name]
        return nonlinear.apply_complex_nonlinearity(self.nonlinearity, z, **params)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.block_type not in BLOCK_TYPES:
            raise ValueError(
                f"Unknown block_type {self.block_type!r}; valid choices: {BLOCK_TYPES}."
            )
        phi, psi = wavelets.wavelet_transform(
            x, self.num_angles, self.filter_mode, self.wavelet_method
        )
        if self.block_type == "rho_psi":
            z = _concat_channels([phi, self._rho(psi)])
        else:
            w = _concat_channels([phi, psi]).astype(jnp.complex64)
            z = _concat_channels([w, self._rho(w)])
        z = BatchStandardize(name="std")(z, use_running_average=not train)
        z = ComplexProjection(self.features, self.compute_dtype, name="proj")(z)
        return nonlinear.normalize_pixels(z)


def torch_linear_init(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default for Linear weights and biases."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Classifier(nn.Module):
    """Head: interleave (Re, Im) -> BatchNorm (affine) -> flatten -> Linear with bias.

    Flattening follows the reference's (channel, h, w) order so weights port one-to-one; there is
    no pooling, so the classifier is position-dependent.
    """

    num_classes: int

    @nn.compact
    def __call__(self, u: jax.Array, train: bool = False) -> jax.Array:
        x = complex_ops.interleave_real_imag(u)
        x = BatchStandardize(affine=True, name="bn")(x, use_running_average=not train)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        init = torch_linear_init(x.shape[-1])
        return nn.Dense(self.num_classes, kernel_init=init, bias_init=init, name="linear")(x)
