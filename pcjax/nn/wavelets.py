"""One-scale wavelet transform of a block: reflect pad, filter, subsample, crop (pure JAX).

For an input U: [batch, h, w, channels] (real or complex) the transform returns the low-pass
phi * U and the L wavelet coefficients psi_theta * U (docs/spec.md 2.2):

1. reflect-pad each spatial axis from M to Mp = 2 (floor((M + 2) / 2) + 1) samples;
2. circular convolution on the padded grid, computed in the Fourier domain with the bank's real
   Fourier filters (`pcjax.nn.filters.filter_bank`);
3. if the bank subsamples: fold the spectrum (exact decimation y[2m, 2n]) and crop 1 sample per
   side; otherwise crop 2 samples per side.

Three methods compute the same linear operator:

* "fft": FFTs, any size (precision cannot be set: TPU FFTs are float32-ish at best).
* "spatial": the whole pad-convolve-subsample-crop operator applied in space as one dense
  matrix [h w, h' w' (K + 1)], built once in float64; cheapest on small grids, cost (h w)^2.
* "pallas": the "matmul" products in one TPU kernel per channel image, with its own backward
  pass (`pcjax.nn.wavelet_kernel`); for a block that keeps only moduli and whose channels fill
  the 128 lanes, one kernel per 128-channel tile, channels-last (`pcjax.nn.moduli_kernel`).
  Elsewhere Pallas's interpreter runs them (slow; for tests).
* "matmul": the FFT pipeline as per-axis matrices, any size. The filters are not separable
  (rotated anisotropic envelopes for L = 8, Morlet = Gabor minus a scaled envelope, and only the
  real part of each filter's DFT is kept), so the 2-D filtering cannot be folded into per-axis
  matrices; what is separable is everything else. Per axis, reflect padding and the DFT fold
  into one complex matrix F [Mp, M], and the inverse DFT with decimation (= spectrum folding)
  and the crop fold into one complex matrix G [M', Mp] (the rows of the inverse DFT at the kept
  output samples). Each block is then 4 small matmuls and one element-wise product by the real
  filters: G_h ((F_h X F_w^T) * h_hat_k) G_w^T. Exact for any filter bank, every matmul runs
  under the precision policy, and there are no awkward FFT sizes (228 = 2^2 3 19). It computes
  channel-major, with the (Re, Im) planes between the two spatial axes (`_matmul_planes`): the
  layout in which XLA:TPU chains the four matmuls without transposes.
  `wavelet_transform_channel_major` returns that layout; the blocks of the TPU path use it.

"auto" picks per backend (`choose_method`). Matmuls follow the precision policy of
`pcjax.nn.complex_ops` (default "highest": float32 products).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from pcjax.nn import complex_ops, filters, moduli_kernel, sampling, wavelet_kernel

Method = Literal["fft", "spatial", "matmul", "pallas", "auto"]
METHODS = ("fft", "spatial", "matmul", "pallas", "auto")
# Methods that compute channel-major ([batch, c, h, w]), the layout their matmuls want.
CHANNEL_MAJOR = ("matmul", "pallas")
# "auto" uses the dense spatial operator up to this many input pixels per image (h * w); above
# it the operator's cost grows as (h w)^2. Chosen by measurement on CPU, with the backward pass
# (docs/benchmarks/wavelets.md, forward only; docs/benchmarks/README.md, "Tried and not kept").
SPATIAL_MAX_PIXELS = 8 * 8


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
    xp = jnp.pad(
        x, ((0, 0), sampling.pad_widths(h), sampling.pad_widths(w), (0, 0)), mode="reflect"
    )
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
    bank = sampling.bank_for_input(h, w, num_angles, mode, full_angles)
    eye = np.eye(h * w).reshape(h * w, h, w)
    xp = np.pad(eye, ((0, 0), sampling.pad_widths(h), sampling.pad_widths(w)), mode="reflect")
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
    x: jax.Array,
    bank: filters.FilterBank,
    num_angles: int,
    mode: str,
    precision: str,
    full_angles: bool = False,
):
    """Dense spatial path; returns complex64[b, h', w', K + 1, c] (low-pass first)."""
    b, h, w, c = x.shape
    m = spatial_operator(h, w, num_angles, mode, full_angles)
    n_out = m.shape[1]
    ho, wo = sampling.output_size(h, bank.subsample), sampling.output_size(w, bank.subsample)
    # [Re M, Im M] side by side: one real matmul per real input plane, so a complex input costs
    # two real matmuls of twice the width (faster than a native complex64 matmul on CPU/TPU).
    mri = jnp.asarray(np.concatenate([m.real, m.imag], axis=1))
    xt = x.reshape(b, h * w, c)

    def apply(plane):
        y = complex_ops.einsum("bic,io->boc", plane.astype(jnp.float32), mri, precision)
        return y[:, :n_out], y[:, n_out:]  # plane @ Re M, plane @ Im M

    if jnp.iscomplexobj(x):
        rr, ri = apply(xt.real)
        ir, ii = apply(xt.imag)
        y = jax.lax.complex(rr - ii, ri + ir)
    else:
        y = jax.lax.complex(*apply(xt))
    return y.reshape(b, ho, wo, -1, c)


def _matmul_planes(
    x: jax.Array, bank: filters.FilterBank, precision: str
) -> tuple[jax.Array, jax.Array]:
    """Per-axis matmul path on a channel-major input [b, c, h, w]: (phi [b, c, h', w'],
    psi complex64[b, c, K, h', w']); phi is real for a real input.

    Inside, a complex array is real [..., rows, 2, cols] with its (Re, Im) planes between the
    two spatial axes. Each step is then one real matmul against `_plane_matrix` that contracts
    the plane axis together with the spatial axis next to it, (plane, col) or (row, plane), and
    the next step's operand is the previous step's result as written: no transposes between
    the four matmuls. The low-pass and the wavelets are inverted separately so that neither
    result is sliced out of (or its gradient padded into) one larger array.
    """
    f_h, g_h = sampling.axis_matrices(x.shape[2], bank.subsample)
    f_w, g_w = sampling.axis_matrices(x.shape[3], bank.subsample)
    m_gw, m_gh = jnp.asarray(sampling.plane_matrix(g_w)), jnp.asarray(sampling.plane_matrix(g_h))
    if jnp.iscomplexobj(x):
        planes = jnp.stack([x.real, x.imag], axis=3)  # [b, c, h, 2, w]
        y = complex_ops.einsum(
            "bchsw,qrws->bchrq", planes, jnp.asarray(sampling.plane_matrix(f_w)), precision
        )
    else:
        f_w2 = np.stack([f_w.real, f_w.imag], axis=1).astype(np.float32)  # [q, 2, w]
        y = complex_ops.einsum("bchw,qrw->bchrq", x, jnp.asarray(f_w2), precision)
    xf = complex_ops.einsum(
        "bchsq,prhs->bcprq", y, jnp.asarray(sampling.plane_matrix(f_h)), precision
    )

    def inverse(hat: np.ndarray) -> jax.Array:  # [k, P, Q] -> [b, c, k, h', 2, w']
        yf = xf[:, :, None] * jnp.asarray(hat)[None, None, :, :, None, :]
        u = complex_ops.einsum("bckprq,jsqr->bckpsj", yf, m_gw, precision)
        return complex_ops.einsum("bckpsj,irps->bckirj", u, m_gh, precision)

    phi = inverse(bank.phi_hat[None])[:, :, 0]
    psi = inverse(bank.psi_hat)
    psi = jax.lax.complex(psi[..., 0, :], psi[..., 1, :])
    if jnp.iscomplexobj(x):
        return jax.lax.complex(phi[..., 0, :], phi[..., 1, :]), psi
    return phi[..., 0, :], psi  # the low-pass of a real image is real


# "auto" on TPUs, by XLA:TPU's compiled figures of each ImageNet block (docs/scale.md, "Per
# block"). A block with the modulus whose channels fill the 128 lanes: the lanes kernel
# (`moduli_kernel`), which moved 2 to 5 times fewer bytes than "matmul" on every such block of
# both presets. Otherwise the per-image kernel (`wavelet_kernel`) where the block keeps only
# the moduli of its wavelets (rho_psi with the modulus) and from 28x28 inputs up, where it moves
# 2 to 60 % fewer bytes than "matmul"; below 28x28 its planes pad to whole (8, 128) tiles, and
# a block that also keeps the complex wavelets moves more with it; "matmul" there. All move
# fewer bytes than the FFT path (about half on the large blocks) and than the dense operator
# on the 7x7 and 6x6 blocks; TPU FFTs also run at a reduced precision that cannot be raised.
PALLAS_MIN_PIXELS = 28 * 28


# On GPUs, until a device measurement exists, by the counts of
# docs/benchmarks/accelerator.md: cuFFT runs at full float32 accuracy and at memory speed, so
# the FFT path moves the least data, and the dense operator is cheaper up to 8x8 inputs.
def kernel_on_lanes(x: jax.Array) -> bool:
    """Whether the "pallas" method can run channels on the lanes (`moduli_kernel`) for a
    block's channels-last input x rather than one channel image per step (`wavelet_kernel`):
    complex inputs whose channels fill the lanes (`moduli_kernel.fills_lanes`)."""
    return jnp.iscomplexobj(x) and x.ndim == 4 and moduli_kernel.fills_lanes(x.shape[-1])


def choose_method(
    h: int,
    w: int,
    method: Method,
    backend: str | None = None,
    moduli_only: bool = False,
    lanes: bool = False,
) -> str:
    """Resolves "auto" per backend: on TPU "pallas" for a modulus block whose channels fill
    the lanes (`lanes`, see `kernel_on_lanes`), or that keeps only the moduli of its wavelets
    (`moduli_only`) from 28x28 up, else "matmul"; dense "spatial" up to 8x8, above it "fft",
    on CPU (measured) and GPU."""
    if method not in METHODS:
        raise ValueError(f"Unknown wavelet method {method!r}; valid choices: {METHODS}.")
    if method != "auto":
        return method
    if (backend or jax.default_backend()) == "tpu":
        kernel = lanes or (moduli_only and h * w >= PALLAS_MIN_PIXELS)
        return "pallas" if kernel else "matmul"
    return "spatial" if h * w <= SPATIAL_MAX_PIXELS else "fft"


def wavelet_coefficients(
    x: jax.Array,
    num_angles: int,
    mode: str,
    method: Method = "fft",
    guard_gradients: bool = True,
    precision: str = "highest",
    full_angles: bool = False,
    backend: str | None = None,
) -> jax.Array:
    """All K + 1 coefficients of one block in one angle-major array.

    Args:
        x: float32 or complex64[batch, h, w, c], h and w >= 3.
        num_angles: L, the number of wavelet orientations.
        mode: filter mode, one of `pcjax.nn.filters.FILTER_MODES`.
        method: "fft", "spatial" (dense operator), "matmul" (per-axis matrices) or "auto" (by
            size and backend); same numbers either way.
        guard_gradients: zero NaN/Inf cotangents flowing into `x` (as the reference does).
        precision: matmul policy of the spatial and matmul paths (`complex_ops.PRECISIONS`).
        full_angles: orientations over 2 pi instead of pi (`pcjax.nn.filters.angles`).
        backend: the platform "auto" resolves for (None: `jax.default_backend()`); a program
            compiled for other devices than the host's passes theirs.

    Returns:
        complex64[batch, h', w', K + 1, c]: index 0 of axis -2 is the low-pass phi * U, index
        1 + theta the wavelet psi_theta * U. Every path produces this layout
        without a transpose; `wavelet_transform` regroups it into the reference's channel order.
    """
    _check_input(x)
    _, h, w, _ = x.shape
    bank = sampling.bank_for_input(h, w, num_angles, mode, full_angles)
    if guard_gradients:
        x = zero_nonfinite_grad(x)
    complex_ops.check_precision(precision)
    resolved = choose_method(h, w, method, backend)
    if resolved == "spatial":
        return _spatial_transform(x, bank, num_angles, mode, precision, full_angles)
    if resolved in CHANNEL_MAJOR:
        phi, psi = wavelet_transform_channel_major(
            jnp.moveaxis(x, -1, 1), num_angles, mode, resolved, False, precision, full_angles
        )
        y = jnp.concatenate([phi.astype(jnp.complex64)[:, :, None], psi], axis=2)
        return jnp.transpose(y, (0, 3, 4, 2, 1))
    return _fft_transform(x, bank)


def wavelet_transform(
    x: jax.Array,
    num_angles: int,
    mode: str,
    method: Method = "fft",
    guard_gradients: bool = True,
    precision: str = "highest",
    full_angles: bool = False,
    backend: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Low-pass and wavelet coefficients of one block, in the reference's channel order.

    Args: as `wavelet_coefficients`.

    Returns:
        phi: [batch, h', w', c], real if `x` is real, else complex64.
        psi: complex64[batch, h', w', c * L], channel index c * L + angle.
    """
    y = wavelet_coefficients(
        x, num_angles, mode, method, guard_gradients, precision, full_angles, backend
    )
    return _split_outputs(y, real_input=not jnp.iscomplexobj(x))


def wavelet_transform_channel_major(
    x: jax.Array,
    num_angles: int,
    mode: str,
    method: Method = "fft",
    guard_gradients: bool = True,
    precision: str = "highest",
    full_angles: bool = False,
    backend: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`wavelet_transform` of a channel-major input [batch, c, h, w].

    Returns phi [batch, c, h', w'] and psi complex64[batch, c, L, h', w']: reshaped to
    [batch, c * L, h', w'] it is in the reference's channel order c * L + angle (a point-wise
    non-linearity applied before that reshape saves XLA:TPU a copy). The "matmul" method
    and "pallas" methods compute in this layout, the one their matmuls want; the others
    transpose to and from channels-last around `wavelet_transform`.
    """
    _check_input(x)
    _, _, h, w = x.shape
    resolved = choose_method(h, w, method, backend)
    if resolved not in CHANNEL_MAJOR:
        phi, psi = wavelet_transform(
            jnp.moveaxis(x, 1, -1),
            num_angles,
            mode,
            resolved,
            guard_gradients,
            precision,
            full_angles,
        )
        b, ho, wo, _ = psi.shape
        psi = jnp.moveaxis(psi.reshape(b, ho, wo, -1, num_angles), (3, 4), (1, 2))
        return jnp.moveaxis(phi, -1, 1), psi
    bank = sampling.bank_for_input(h, w, num_angles, mode, full_angles)
    if guard_gradients:
        x = zero_nonfinite_grad(x)
    complex_ops.check_precision(precision)
    if resolved == "pallas":
        phi, psi, _, _ = wavelet_kernel.coefficients(
            x, num_angles, mode, precision, full_angles, backend=backend
        )
        return phi, psi
    return _matmul_planes(x, bank, precision)
