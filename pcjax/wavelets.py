"""One-scale wavelet transform of a block: reflect pad, filter, subsample, crop (pure JAX).

For an input U: [batch, h, w, channels] (real or complex) the transform returns the low-pass
phi * U and the L wavelet coefficients psi_theta * U (REFERENCE.md section 2.2):

1. reflect-pad each spatial axis from M to Mp = 2 (floor((M + 2) / 2) + 1) samples;
2. circular convolution on the padded grid, computed in the Fourier domain with the bank's real
   Fourier filters (`pcjax.filters.filter_bank`);
3. if the bank subsamples: fold the spectrum (exact decimation y[2m, 2n]) and crop 1 sample per
   side; otherwise crop 2 samples per side.

Two methods compute the same linear operator: "fft" (FFTs, any size) and "spatial" (the whole
pad-convolve-subsample-crop operator applied in space as one dense matrix, built once in
float64; cheaper than FFTs on small grids and matmul-friendly on TPUs). "auto" picks by size.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from pcjax import filters

Method = Literal["fft", "spatial", "auto"]
METHODS = ("fft", "spatial", "auto")
# "auto" uses the dense spatial operator up to this many input pixels per image (h * w); above
# it the operator's cost grows as (h w)^2. benchmarks/wavelets.py (forward only, idle 2-core
# CPU): spatial wins by 2.4-16x up to 8x8, FFTs by 1.8-2.2x from 28x28, 14x14-16x16 is close.
# With the backward pass the 16x16 blocks favour FFTs: benchmarks/train_step.py measured the
# CIFAR variant-B train step at 12.5 img/s with this threshold and 7.4 img/s with 16 * 16.
SPATIAL_MAX_PIXELS = 8 * 8


def padded_size(m: int) -> int:
    """Padded length Mp = 2 (floor((m + 2) / 2) + 1): m + 4 for even m, m + 3 for odd m."""
    return 2 * ((m + 2) // 2 + 1)


def pad_widths(m: int) -> tuple[int, int]:
    """(before, after) reflect-padding widths: 2/2 for even m, 1/2 for odd m."""
    p = padded_size(m) - m
    return p // 2, p - p // 2


def output_size(m: int, subsample: bool) -> int:
    """Spatial size after the transform: Mp/2 - 2 if subsampling, else Mp - 4."""
    mp = padded_size(m)
    return mp // 2 - 2 if subsample else mp - 4


def bank_for_input(
    h: int, w: int, num_angles: int, mode: str, full_angles: bool = False
) -> filters.FilterBank:
    """The filter bank on the padded grid of an h x w input."""
    if h < 3 or w < 3:
        raise ValueError(
            f"Wavelet transform needs inputs of at least 3x3 pixels (reflect padding), got {h}x{w}."
        )
    return filters.filter_bank(
        padded_size(h), padded_size(w), num_angles, mode, full_angles=full_angles
    )


@jax.custom_vjp
def zero_nonfinite_grad(x: jax.Array) -> jax.Array:
    """Identity whose backward pass replaces NaN/Inf cotangents by 0.

    The reference registers this hook on the input of every wavelet transform, so one
    non-finite gradient (e.g. from an exactly zero pixel vector) cannot poison the whole update.
    """
    return x


def _zero_nonfinite_fwd(x):
    return x, None


def _zero_nonfinite_bwd(_, g):
    return (jnp.where(jnp.isfinite(g), g, jnp.zeros_like(g)),)


zero_nonfinite_grad.defvjp(_zero_nonfinite_fwd, _zero_nonfinite_bwd)


def _split_outputs(y: jax.Array, real_input: bool) -> tuple[jax.Array, jax.Array]:
    """[b, h, w, K + 1, c] -> phi [b, h, w, c], psi [b, h, w, c * K] (channel c * K + k)."""
    b, h, w, k1, c = y.shape
    phi = y[..., 0, :]
    if real_input:
        phi = phi.real  # the low-pass of a real image is real (its filter is symmetric)
    psi = jnp.swapaxes(y[..., 1:, :], -1, -2).reshape(b, h, w, c * (k1 - 1))
    return phi, psi


def _check_input(x: jax.Array) -> None:
    if x.ndim != 4:
        raise ValueError(
            f"Wavelet transform expects [batch, h, w, channels], got shape {tuple(x.shape)}."
        )


def _fft_transform(x: jax.Array, bank: filters.FilterBank) -> jax.Array:
    """Fourier-domain path; returns complex64[b, h', w', K + 1, c] (low-pass first)."""
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), pad_widths(h), pad_widths(w), (0, 0)), mode="reflect")
    xf = jnp.fft.fft2(xp.astype(jnp.complex64), axes=(1, 2))
    # [P, Q, K + 1]: low-pass then wavelets, broadcast over batch and channels.
    hat = jnp.asarray(np.concatenate([bank.phi_hat[None], bank.psi_hat], 0).transpose(1, 2, 0))
    yf = xf[:, :, :, None, :] * hat[None, :, :, :, None]
    if bank.subsample:
        p, q = yf.shape[1] // 2, yf.shape[2] // 2
        # Folding the spectrum = decimating y[2m, 2n] in space; 1/4 from the inverse DFT size.
        # Four slices added element-wise (a complex reduction would not fuse as well).
        yf = 0.25 * ((yf[:, :p, :q] + yf[:, p:, :q]) + (yf[:, :p, q:] + yf[:, p:, q:]))
        y = jnp.fft.ifft2(yf, axes=(1, 2))
        return y[:, 1:-1, 1:-1]
    y = jnp.fft.ifft2(yf, axes=(1, 2))
    return y[:, 2:-2, 2:-2]


@functools.lru_cache(maxsize=64)
def spatial_operator(
    h: int, w: int, num_angles: int, mode: str, full_angles: bool = False
) -> np.ndarray:
    """Dense matrix of the whole transform, complex64[h * w, h' * w' * (K + 1)].

    Output columns are ordered (h', w', k) with k = 0 the low-pass and k = 1 + theta the
    wavelets, so `x @ M` lands directly in the angle-major layout of `wavelet_coefficients`.

    Built in float64 by pushing the canonical basis through a NumPy transcription of the
    pipeline (pad, FFT, filter, fold, inverse FFT, crop), so `x @ M` equals the "fft" method
    up to float32 round-off.
    """
    bank = bank_for_input(h, w, num_angles, mode, full_angles)
    eye = np.eye(h * w).reshape(h * w, h, w)
    xp = np.pad(eye, ((0, 0), pad_widths(h), pad_widths(w)), mode="reflect")
    hat = np.concatenate([bank.phi_hat[None], bank.psi_hat], 0).astype(np.float64)
    yf = np.fft.fft2(xp)[:, None] * hat[None]  # [hw, K + 1, P, Q]
    if bank.subsample:
        n, k, p, q = yf.shape
        yf = yf.reshape(n, k, 2, p // 2, 2, q // 2).mean(axis=(2, 4))
        y = np.fft.ifft2(yf)[..., 1:-1, 1:-1]
    else:
        y = np.fft.ifft2(yf)[..., 2:-2, 2:-2]
    y = y.transpose(0, 2, 3, 1)  # [hw, h', w', K + 1]
    m = y.reshape(h * w, -1).astype(np.complex64)
    m.setflags(write=False)
    return m


def _spatial_transform(
    x: jax.Array, bank: filters.FilterBank, num_angles: int, mode: str, full_angles: bool = False
):
    """Dense spatial path; returns complex64[b, h', w', K + 1, c] (low-pass first)."""
    b, h, w, c = x.shape
    m = spatial_operator(h, w, num_angles, mode, full_angles)
    n_out = m.shape[1]
    ho, wo = output_size(h, bank.subsample), output_size(w, bank.subsample)
    # [Re M, Im M] side by side: one real matmul per real input plane, so a complex input costs
    # two real matmuls of twice the width (faster than a native complex64 matmul on CPU/TPU).
    mri = jnp.asarray(np.concatenate([m.real, m.imag], axis=1))
    xt = x.reshape(b, h * w, c)

    def apply(plane):
        y = jnp.einsum("bic,io->boc", plane.astype(jnp.float32), mri)
        return y[:, :n_out], y[:, n_out:]  # plane @ Re M, plane @ Im M

    if jnp.iscomplexobj(x):
        rr, ri = apply(xt.real)
        ir, ii = apply(xt.imag)
        y = jax.lax.complex(rr - ii, ri + ir)
    else:
        y = jax.lax.complex(*apply(xt))
    return y.reshape(b, ho, wo, -1, c)


def choose_method(h: int, w: int, method: Method) -> str:
    """Resolves "auto" to "spatial" for small grids and "fft" otherwise."""
    if method not in METHODS:
        raise ValueError(f"Unknown wavelet method {method!r}; valid choices: {METHODS}.")
    if method == "auto":
        return "spatial" if h * w <= SPATIAL_MAX_PIXELS else "fft"
    return method


def wavelet_coefficients(
    x: jax.Array,
    num_angles: int,
    mode: str,
    method: Method = "fft",
    guard_gradients: bool = True,
    full_angles: bool = False,
) -> jax.Array:
    """All K + 1 coefficients of one block in one angle-major array.

    Args:
        x: float32 or complex64[batch, h, w, c], h and w >= 3.
        num_angles: L, the number of wavelet orientations.
        mode: filter mode, one of `pcjax.filters.FILTER_MODES`.
        method: "fft", "spatial" (dense operator) or "auto" (by size); same numbers either way.
        guard_gradients: zero NaN/Inf cotangents flowing into `x` (as the reference does).
        full_angles: orientations over 2 pi instead of pi (`pcjax.filters.angles`).

    Returns:
        complex64[batch, h', w', K + 1, c]: index 0 of axis -2 is the low-pass phi * U, index
        1 + theta the wavelet psi_theta * U. Both FFT and spatial paths produce this layout
        without a transpose; `wavelet_transform` regroups it into the reference's channel order.
    """
    _check_input(x)
    _, h, w, _ = x.shape
    bank = bank_for_input(h, w, num_angles, mode, full_angles)
    if guard_gradients:
        x = zero_nonfinite_grad(x)
    if choose_method(h, w, method) == "spatial":
        return _spatial_transform(x, bank, num_angles, mode, full_angles)
    return _fft_transform(x, bank)


def wavelet_transform(
    x: jax.Array,
    num_angles: int,
    mode: str,
    method: Method = "fft",
    guard_gradients: bool = True,
    full_angles: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Low-pass and wavelet coefficients of one block, in the reference's channel order.

    Args: as `wavelet_coefficients`.

    Returns:
        phi: [batch, h', w', c], real if `x` is real, else complex64.
        psi: complex64[batch, h', w', c * L], channel index c * L + angle.
    """
    y = wavelet_coefficients(x, num_angles, mode, method, guard_gradients, full_angles)
    return _split_outputs(y, real_input=not jnp.iscomplexobj(x))
