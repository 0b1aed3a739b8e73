"""Wavelet transform against an independent float64 NumPy oracle (docs/spec.mds 2.1-2.3).

The oracle pads with `np.pad(mode="reflect")`, convolves circularly on the padded grid directly
in space (no FFT), decimates y[2m, 2n] and crops. Filters come from its own transcription of
docs/spec.md 1 (not from `pcjax.nn.filters`). The spatial and matmul paths run at the
"highest" precision policy (the default; float32 products on every backend).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcjax.nn import filters, sampling, wavelets

# --------------------------------------------------------------------------------------------
# Oracle.
# --------------------------------------------------------------------------------------------


def _oracle_gabor(P, Q, sigma, theta, xi, slant=1.0):
    """Periodised Gabor of docs/spec.md 1.1 (5x5 translates, Z = 2 * 3.1415 * sigma^2 / s)."""
    c, s = math.cos(theta), math.sin(theta)
    g = np.zeros((P, Q), dtype=np.complex128)
    for a in range(-2, 3):
        for b in range(-2, 3):
            x = np.arange(P, dtype=np.float64)[:, None] + a * P
            y = np.arange(Q, dtype=np.float64)[None, :] + b * Q
            energy = ((x * c + y * s) ** 2 + slant**2 * (-x * s + y * c) ** 2) / (2 * sigma**2)
            g += np.exp(-energy + 1j * xi * (x * c + y * s))
    return g / (2 * 3.1415 * sigma**2 / slant)


def _oracle_morlet(P, Q, sigma, theta, xi, slant):
    g_xi = _oracle_gabor(P, Q, sigma, theta, xi, slant)
    g_0 = _oracle_gabor(P, Q, sigma, theta, 0.0, slant)
    return g_xi - g_xi.sum() / g_0.sum() * g_0


@functools.cache
def _oracle_filters(P, Q, L, mode):
    """Spatial filters [psi(theta_0..theta_{L-1}), phi]: complex128[L+1, P, Q]."""
    s = 4.0 / L
    thetas = [(L // 2 - 1 - k) * np.pi / L for k in range(L)]
    if mode == "standard":
        sigma, xi, slant, sigma_low = 0.8, 3 * np.pi / 4, s, 0.8
    elif mode == "factorized_even":
        sigma, xi, slant, sigma_low = 0.8, 3 * np.pi / 4, s, 0.8 / np.sqrt(2)
    else:
        sigma, xi = 0.8 * np.sqrt(1.5), np.pi / np.sqrt(2)
        slant, sigma_low = np.sqrt(3 * s**2 / (4 - s**2)), 0.8 / np.sqrt(2)
    bank = [_oracle_morlet(P, Q, sigma, t, xi, slant) for t in thetas]
    bank.append(_oracle_gabor(P, Q, sigma_low, 0.0, 0.0, 1.0))
    return np.stack(bank)


def _effective_kernel(h):
    """Spatial kernel of the Fourier filter Re(fft2(h)) that the transform actually applies.

    Re(H[k]) = (H[k] + conj(H[k])) / 2 and conj(H[k]) is the DFT of conj(h[-n mod P]), so
    ifft2(Re fft2(h)) = (h[n] + conj(h[-n])) / 2, computed here without any DFT. (The periodised
    filters are nearly Hermitian, so h_eff ~ h, but the identity makes the oracle exact.)
    """
    h_reflected = np.roll(h[..., ::-1, ::-1], shift=(1, 1), axis=(-2, -1))  # h[-n mod P]
    return (h + np.conj(h_reflected)) / 2


def _circular_conv(x, h):
    """y[n] = sum_m h[(n - m) mod (P, Q)] x[m] directly in space; x [b, P, Q, c], h [P, Q]."""
    P, Q = h.shape
    rows = (np.arange(P)[:, None] - np.arange(P)[None, :]) % P  # [n1, m1]
    cols = (np.arange(Q)[:, None] - np.arange(Q)[None, :]) % Q  # [n2, m2]
    circulant = h[rows[:, None, :, None], cols[None, :, None, :]]  # [n1, n2, m1, m2]
    return np.einsum("ijkl,bklc->bijc", circulant, x)


def _oracle_padded(m):
    mp = 2 * (math.floor((m + 2) / 2) + 1)
    top = math.floor((mp - m) / 2)
    return mp, (top, mp - m - top)


def _oracle_transform(x, L, mode):
    """float64 reference of docs/spec.md 2.1-2.3: phi [b, h', w', c], psi [b, h', w', c * L]."""
    x = np.asarray(x).astype(np.complex128)
    _, h, w, c = x.shape
    P, pad_h = _oracle_padded(h)
    Q, pad_w = _oracle_padded(w)
    xp = np.pad(x, ((0, 0), pad_h, pad_w, (0, 0)), mode="reflect")
    subsample = mode in ("standard", "factorized_odd")
    outs = []
    for h_k in _oracle_filters(P, Q, L, mode):
        y = _circular_conv(xp, _effective_kernel(h_k))
        y = y[:, ::2, ::2][:, 1:-1, 1:-1] if subsample else y[:, 2:-2, 2:-2]
        outs.append(y)
    phi = outs[-1]
    psi = np.stack(outs[:-1], axis=-1)  # [b, h', w', c, L]: channel-major, angle-minor
    return phi, psi.reshape(*psi.shape[:3], c * L)


def _random_input(shape, complex_input, seed=0):
    """Random never-zero input with a non-zero mean (exercises the low-pass DC gain)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) + 0.5
    if complex_input:
        x = x + 1j * (rng.standard_normal(shape) - 0.3)
        return x.astype(np.complex64)
    return x.astype(np.float32)


# Tolerance: outputs are O(1) sums of O(1) inputs weighted by filters of L1 norm ~1-3. The code
# computes in float32 (FFTs of <= 20x20 grids, or a float32 dense operator), whose round-off is a
# few 1e-7 of the input scale; float32 Fourier filters add ~6e-8 relative. 1e-5 of the input
# scale leaves a wide margin yet is ~1e4 below any indexing, padding or filter error.
def _assert_close_to_oracle(got, want, x):
    atol = 1e-5 * np.abs(x).max()
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=atol)


# --------------------------------------------------------------------------------------------
# Oracle comparisons.
# --------------------------------------------------------------------------------------------

# The transform under test, compiled once per shape and static arguments: run op by op, each
# call compiles a dozen small XLA programs (eager equals jit: `test_jit_matches_eager`).
_transform = jax.jit(
    wavelets.wavelet_transform,
    static_argnums=(1, 2, 3),
    static_argnames=("guard_gradients", "precision", "full_angles", "backend"),
)

SIZES = [(8, 8), (9, 9), (16, 16), (7, 10)]
CASES = [(size, 4) for size in SIZES] + [((9, 9), 8), ((7, 10), 8), ((8, 8), 8)]


# The kernel runs in Pallas's interpreter here, half of each case's time: its cases in the slow
# lane (the fast lane checks it against the oracle in tests/test_wavelet_kernel.py and against
# fft in `test_matmul_methods_equal_fft`).
@pytest.mark.parametrize(
    "method", ["fft", "spatial", pytest.param("pallas", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("complex_input", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("mode", filters.FILTER_MODES)
@pytest.mark.parametrize("size,L", CASES)
def test_transform_matches_oracle(size, L, mode, complex_input, method):
    x = _random_input((2, *size, 3), complex_input)
    want_phi, want_psi = _oracle_transform(x, L, mode)
    phi, psi = _transform(jnp.asarray(x), L, mode, method)
    assert psi.shape == want_psi.shape and psi.dtype == jnp.complex64
    assert phi.shape == want_phi.shape
    if complex_input:
        assert phi.dtype == jnp.complex64
        _assert_close_to_oracle(phi, want_phi, x)
    else:
        # The low-pass of a real image is real: the oracle's imaginary part is round-off.
        assert phi.dtype == jnp.float32
        assert np.abs(want_phi.imag).max() < 1e-12
        _assert_close_to_oracle(phi, want_phi.real, x)
    _assert_close_to_oracle(psi, want_psi, x)


@pytest.mark.parametrize("mode", filters.FILTER_MODES)
@pytest.mark.parametrize("m", [4, 6, 7, 8, 9, 16, 32])
def test_output_size_rule(m, mode):
    # docs/spec.md 2.2: even M -> M or M/2; odd M -> M - 1 or (M - 1)/2.
    subsample = mode != "factorized_even"
    even = m - m % 2
    want = even // 2 if subsample else even
    assert sampling.output_size(m, subsample) == want
    out = jax.eval_shape(
        lambda x: wavelets.wavelet_transform(x, 4, mode),
        jax.ShapeDtypeStruct((1, m, m + 1, 2), jnp.float32),
    )
    even_w = (m + 1) - (m + 1) % 2
    want_w = even_w // 2 if subsample else even_w
    assert out[0].shape == (1, want, want_w, 2)
    assert out[1].shape == (1, want, want_w, 2 * 4)


@pytest.mark.parametrize("m", [3, 4, 6, 7, 8, 9, 16, 32, 112, 224])
def test_padded_size_and_widths(m):
    mp, widths = _oracle_padded(m)
    assert sampling.padded_size(m) == mp == (m + 4 if m % 2 == 0 else m + 3)
    assert sampling.pad_widths(m) == widths == ((2, 2) if m % 2 == 0 else (1, 2))


def test_psi_channel_order_is_channel_major():
    # Channel c of the input only feeds psi channels c * L .. c * L + L - 1.
    L = 4
    x = np.zeros((1, 8, 8, 3), np.float32)
    x[..., 1] = _random_input((1, 8, 8), False)
    _, psi = wavelets.wavelet_transform(jnp.asarray(x), L, "factorized_even")
    energy = np.abs(np.asarray(psi)).sum(axis=(0, 1, 2))
    assert np.all(energy[L : 2 * L] > 1e-2)
    assert np.all(energy[:L] == 0) and np.all(energy[2 * L :] == 0)


@pytest.mark.parametrize("method", ["fft", "spatial"])
@pytest.mark.parametrize("complex_input", [False, True], ids=["real", "complex"])
def test_coefficients_layout_matches_transform(method, complex_input):
    # coefficients[..., 0, ci] = phi[..., ci]; [..., 1 + theta, ci] = psi[..., ci * L + theta].
    L, c = 4, 3
    x = jnp.asarray(_random_input((2, 9, 8, c), complex_input, seed=7))
    y = np.asarray(wavelets.wavelet_coefficients(x, L, "factorized_odd", method))
    phi, psi = (np.asarray(a) for a in wavelets.wavelet_transform(x, L, "factorized_odd", method))
    assert y.shape == (*phi.shape[:3], L + 1, c) and y.dtype == np.complex64
    np.testing.assert_array_equal(y[..., 0, :].real if not complex_input else y[..., 0, :], phi)
    psi_from_y = np.swapaxes(y[..., 1:, :], -1, -2).reshape(psi.shape)
    np.testing.assert_array_equal(psi_from_y, psi)


# --------------------------------------------------------------------------------------------
# Methods.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["spatial", "matmul", "pallas"])
@pytest.mark.parametrize("mode", filters.FILTER_MODES)
@pytest.mark.parametrize("complex_input", [False, True], ids=["real", "complex"])
def test_matmul_methods_equal_fft(mode, complex_input, method):
    x = jnp.asarray(_random_input((2, 11, 6, 2), complex_input, seed=3))
    phi_f, psi_f = wavelets.wavelet_transform(x, 8, mode, "fft")
    phi_s, psi_s = wavelets.wavelet_transform(x, 8, mode, method, precision="highest")
    assert phi_f.dtype == phi_s.dtype and psi_f.dtype == psi_s.dtype
    # Two float32 evaluations of the same operator: round-off of a few 1e-7 of the input scale.
    np.testing.assert_allclose(np.asarray(phi_s), np.asarray(phi_f), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(psi_s), np.asarray(psi_f), rtol=0, atol=1e-5)


def _oracle_transform_fft(x, L, mode):
    """The oracle's pipeline with the circular convolution as a float64 NumPy FFT product.

    Same filters, padding, decimation and crop as `_oracle_transform`, for grids where the
    dense circulant (P Q)^2 would not fit in memory.
    """
    x = np.asarray(x).astype(np.complex128)
    _, h, w, c = x.shape
    P, pad_h = _oracle_padded(h)
    Q, pad_w = _oracle_padded(w)
    xf = np.fft.fft2(np.pad(x, ((0, 0), pad_h, pad_w, (0, 0)), mode="reflect"), axes=(1, 2))
    subsample = mode in ("standard", "factorized_odd")
    outs = []
    for h_k in _oracle_filters(P, Q, L, mode):
        kf = np.fft.fft2(_effective_kernel(h_k))
        y = np.fft.ifft2(xf * kf[None, :, :, None], axes=(1, 2))
        outs.append(y[:, ::2, ::2][:, 1:-1, 1:-1] if subsample else y[:, 2:-2, 2:-2])
    psi = np.stack(outs[:-1], axis=-1)
    return outs[-1], psi.reshape(*psi.shape[:3], c * L)


# Every (input size, filter mode, L, real input) of the paper's two networks (docs/spec.md 3.7).
CIFAR_BLOCKS = [
    (m, mode, 4, b == 0)
    for b, (m, mode) in enumerate(
        zip([32, 32, 16, 16, 8, 8, 4, 4], filters.block_filter_modes(8, 0), strict=True)
    )
]
IMAGENET_BLOCKS = [
    (m, mode, 8, b == 0)
    for b, (m, mode) in enumerate(
        zip(
            [224, 112, 112, 56, 56, 28, 28, 14, 14, 7, 6],
            filters.block_filter_modes(11, 1),
            strict=True,
        )
    )
]


# Paper-size transforms (up to 112x112): the slow lane. The fast lane's oracle cases above cover
# the same rules (odd and even sizes, every filter mode, 4 and 8 angles) on small grids.
@pytest.mark.slow
@pytest.mark.parametrize("method", ["fft", "spatial", "matmul", "pallas"])
@pytest.mark.parametrize(
    "size,mode,L,real_input",
    CIFAR_BLOCKS + IMAGENET_BLOCKS,
    ids=[f"cifar{b}" for b in range(8)] + [f"imagenet{b}" for b in range(11)],
)
def test_every_paper_block_matches_oracle(size, mode, L, real_input, method):
    """Each method against the float64 oracle on every block size (odd 7 -> 6 included)."""
    if method == "spatial" and size > 32:
        pytest.skip("dense (h w)^2 operator: too large above 32x32 (never chosen there)")
    x = _random_input((1, size, size, 2), not real_input, seed=size)
    oracle = _oracle_transform if size <= 16 else _oracle_transform_fft
    want_phi, want_psi = oracle(x, L, mode)
    phi, psi = _transform(jnp.asarray(x), L, mode, method, precision="highest")
    assert phi.shape == want_phi.shape and psi.shape == want_psi.shape
    _assert_close_to_oracle(phi, want_phi, x)
    _assert_close_to_oracle(psi, want_psi, x)


def test_axis_matrices_fold_padding_and_decimation():
    """F is the DFT of the reflect-padded axis; G picks the inverse DFT at the kept samples."""
    rng = np.random.default_rng(11)
    for m, subsample in [(7, False), (6, True), (8, True), (9, False)]:
        f, g = sampling.axis_matrices(m, subsample)
        v = rng.standard_normal(m)
        mp, pads = _oracle_padded(m)
        np.testing.assert_allclose(f @ v, np.fft.fft(np.pad(v, pads, mode="reflect")), atol=1e-5)
        u = rng.standard_normal(mp) + 1j * rng.standard_normal(mp)
        full = np.fft.ifft(u)
        want = full[::2][1:-1] if subsample else full[2:-2]
        np.testing.assert_allclose(g @ u, want, atol=1e-6)


@pytest.mark.parametrize(
    "size,backend,resolved",
    [
        ((8, 8), "cpu", "spatial"),
        ((7, 9), "tpu", "matmul"),
        ((7, 7), "gpu", "spatial"),
        ((9, 9), "cpu", "fft"),
        ((9, 9), "gpu", "fft"),
        ((9, 9), "tpu", "matmul"),
        ((28, 28), "tpu", "matmul"),
        ((224, 224), "tpu", "matmul"),
    ],
)
def test_auto_method_per_backend(size, backend, resolved):
    assert wavelets.choose_method(*size, "auto", backend=backend) == resolved


@pytest.mark.parametrize(
    "size,backend,resolved",
    [
        ((14, 14), "tpu", "matmul"),
        ((28, 28), "tpu", "pallas"),
        ((224, 224), "tpu", "pallas"),
        ((224, 224), "gpu", "fft"),
        ((28, 28), "cpu", "fft"),
    ],
)
def test_auto_method_for_a_block_that_keeps_only_moduli(size, backend, resolved):
    """The kernel where the block needs only the moduli of its wavelets, on TPU, from 28x28."""
    assert wavelets.choose_method(*size, "auto", backend, moduli_only=True) == resolved


@pytest.mark.parametrize("size,resolved", [((8, 8), "spatial"), ((9, 9), "fft")])
def test_auto_method(size, resolved):
    assert wavelets.choose_method(*size, "auto") == resolved
    x = jnp.asarray(_random_input((1, *size, 2), True, seed=4))
    phi_a, psi_a = wavelets.wavelet_transform(x, 4, "factorized_odd", "auto")
    phi_f, psi_f = wavelets.wavelet_transform(x, 4, "factorized_odd", "fft")
    np.testing.assert_allclose(np.asarray(phi_a), np.asarray(phi_f), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(psi_a), np.asarray(psi_f), rtol=0, atol=1e-5)


def test_bad_arguments_raise_with_value():
    x = jnp.ones((1, 8, 8, 1))
    with pytest.raises(ValueError, match="bogus_method"):
        wavelets.wavelet_transform(x, 4, "standard", "bogus_method")
    with pytest.raises(ValueError, match="bogus_mode"):
        wavelets.wavelet_transform(x, 4, "bogus_mode")
    with pytest.raises(ValueError, match="bogus_precision.*highest"):
        wavelets.wavelet_transform(x, 4, "standard", "matmul", precision="bogus_precision")
    with pytest.raises(ValueError, match=r"\(8, 8, 1\)"):
        wavelets.wavelet_transform(jnp.ones((8, 8, 1)), 4, "standard")
    with pytest.raises(ValueError, match="2x8"):
        wavelets.wavelet_transform(jnp.ones((1, 2, 8, 1)), 4, "standard")


# --------------------------------------------------------------------------------------------
# Chained block shapes (docs/spec.md 3.7), abstract evaluation only.
# --------------------------------------------------------------------------------------------


def _chain_sizes(size, num_blocks, num_standard, L):
    modes = filters.block_filter_modes(num_blocks, num_standard)
    sizes, padded = [size], []
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    for b, mode in enumerate(modes):
        padded.append(sampling.padded_size(x.shape[1]))
        phi, psi = jax.eval_shape(lambda u, m=mode: wavelets.wavelet_transform(u, L, m), x)
        assert phi.shape[1:3] == psi.shape[1:3]
        assert psi.dtype == jnp.complex64
        assert phi.dtype == (jnp.float32 if b == 0 else jnp.complex64)
        sizes.append(psi.shape[1])
        x = jax.ShapeDtypeStruct((1, psi.shape[1], psi.shape[2], 1), jnp.complex64)
    return modes, sizes, padded


def test_cifar_chain_shapes():
    modes, sizes, padded = _chain_sizes(32, 8, 0, 4)
    assert modes == ("factorized_even", "factorized_odd") * 4
    assert sizes == [32, 32, 16, 16, 8, 8, 4, 4, 2]
    assert padded == [36, 36, 20, 20, 12, 12, 8, 8]


def test_imagenet_chain_shapes():
    modes, sizes, padded = _chain_sizes(224, 11, 1, 8)
    assert modes[0] == "standard"
    assert sizes == [224, 112, 112, 56, 56, 28, 28, 14, 14, 7, 6, 3]
    assert padded == [228, 116, 116, 60, 60, 32, 32, 18, 18, 10, 10]


# --------------------------------------------------------------------------------------------
# JAX transformations.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fft", "spatial", "matmul"])
def test_jit_matches_eager(method):
    x = jnp.asarray(_random_input((2, 9, 8, 2), True, seed=5))
    f = functools.partial(
        wavelets.wavelet_transform, num_angles=4, mode="factorized_odd", method=method
    )
    eager = f(x)
    jitted = jax.jit(f)(x)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["fft", "spatial", "matmul"])
def test_vmap_matches_loop(method):
    x = jnp.asarray(_random_input((3, 2, 8, 9, 2), True, seed=6))
    f = functools.partial(wavelets.wavelet_transform, num_angles=4, mode="standard", method=method)
    phi_v, psi_v = jax.vmap(f)(x)
    for i in range(x.shape[0]):
        phi_i, psi_i = f(x[i])
        np.testing.assert_allclose(np.asarray(phi_v[i]), np.asarray(phi_i), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(psi_v[i]), np.asarray(psi_i), rtol=0, atol=1e-6)


def _quadratic_loss_weights(phi_shape, psi_shape, seed):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal(phi_shape) + 1j * rng.standard_normal(phi_shape),
        rng.standard_normal(psi_shape) + 1j * rng.standard_normal(psi_shape),
    )


@pytest.mark.parametrize("method", ["fft", "spatial", "matmul"])
@pytest.mark.parametrize("complex_input", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("mode", ["factorized_even", "factorized_odd"])
def test_grad_matches_float64_finite_differences(mode, complex_input, method):
    # Real loss: quadratic in |psi| plus a linear term in phi (Re of a complex weighting).
    x = _random_input((1, 7, 8, 2), complex_input, seed=7)
    L = 4
    want_phi, want_psi = _oracle_transform(x, L, mode)
    w_phi, w_psi = _quadratic_loss_weights(want_phi.shape, want_psi.shape, seed=8)

    def loss_np(u):
        phi, psi = _oracle_transform(u, L, mode)
        return np.sum(np.abs(w_psi * psi) ** 2) + np.sum(np.real(w_phi * phi))

    def loss_jax(u):
        phi, psi = wavelets.wavelet_transform(u, L, mode, method)
        return jnp.sum(jnp.abs(w_psi.astype(np.complex64) * psi) ** 2) + jnp.sum(
            jnp.real(w_phi.astype(np.complex64) * phi)
        )

    g = np.asarray(jax.jit(jax.grad(loss_jax))(jnp.asarray(x))).astype(np.complex128)
    rng = np.random.default_rng(9)
    v = rng.standard_normal(x.shape)
    if complex_input:
        v = v + 1j * rng.standard_normal(x.shape)
    # JAX's gradient of a real loss w.r.t. complex u is dL/dRe - i dL/dIm, so the directional
    # derivative along v is sum Re(g * v) (for real u, plain sum g * v).
    directional = np.sum(np.real(g * v))
    # The loss is quadratic, so the float64 central difference has no truncation error: it is
    # exact up to ~1e-13. The float32 JAX gradient carries ~1e-7 relative round-off per entry, so
    # the dot product is off by at most ~1e-6 |g| |v| (measured: <= 1e-7). The bound 1e-5 |g| |v|
    # is independent of cancellations in the sum, and a conjugated, mis-scaled or transposed
    # gradient misses it by orders of magnitude.
    eps = 1e-3
    fd = (
        loss_np(x.astype(np.complex128) + eps * v) - loss_np(x.astype(np.complex128) - eps * v)
    ) / (2 * eps)
    scale = np.linalg.norm(g) * np.linalg.norm(v)
    assert abs(directional - fd) <= 1e-5 * scale, (directional, fd, scale)


# --------------------------------------------------------------------------------------------
# Gradient guard.
# --------------------------------------------------------------------------------------------


def _nan_inf_loss(u):
    # d/du sqrt(u) at u = 0 is +inf; the where() gradient at u <= 0 is 0 * inf or 0 * nan = nan.
    return jnp.sum(jnp.sqrt(u[:2])) + jnp.sum(jnp.where(u[2:] > 0, jnp.sqrt(u[2:]), 0.0))


def test_zero_nonfinite_grad_forward_is_identity():
    x = jnp.asarray([1.5, -2.0, 0.0, np.inf, np.nan], jnp.float32)
    y = wavelets.zero_nonfinite_grad(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    z = jnp.asarray([1 + 2j, -3j], jnp.complex64)
    np.testing.assert_array_equal(np.asarray(wavelets.zero_nonfinite_grad(z)), np.asarray(z))


def test_zero_nonfinite_grad_zeroes_nan_and_inf():
    u = jnp.asarray([0.0, 4.0, 0.0, -1.0, 9.0], jnp.float32)
    raw = np.asarray(jax.grad(_nan_inf_loss)(u))
    assert np.isinf(raw[0]) and np.isnan(raw[2]) and np.isnan(raw[3])  # the loss is as intended
    guarded = np.asarray(jax.grad(lambda v: _nan_inf_loss(wavelets.zero_nonfinite_grad(v)))(u))
    np.testing.assert_allclose(guarded, [0.0, 0.25, 0.0, 0.0, 1 / 6], rtol=1e-6, atol=0)


def test_wavelet_transform_guards_input_gradient():
    x = jnp.asarray(_random_input((1, 8, 8, 1), False, seed=10))

    def loss(u, guard):
        phi, psi = wavelets.wavelet_transform(u, 4, "standard", guard_gradients=guard)
        # Finite loss whose cotangent w.r.t. phi is NaN at its first entry (0 * inf).
        first = phi.reshape(-1)[0]
        return jnp.where(first > 1e9, jnp.sqrt(first - 1e9), 0.0) + jnp.sum(jnp.abs(psi) ** 2)

    assert np.isfinite(float(loss(x, True)))
    # The NaN cotangent spreads to every input pixel through the (dense) linear transform...
    unguarded = np.asarray(jax.grad(loss)(x, False))
    assert np.isnan(unguarded).all()
    # ... so the guard zeroes the whole input gradient, as the reference's hook does.
    guarded = np.asarray(jax.grad(loss)(x, True))
    np.testing.assert_array_equal(guarded, np.zeros_like(guarded))


@pytest.mark.parametrize("method", ["fft", "spatial", "matmul"])
@pytest.mark.parametrize("mode", filters.FILTER_MODES)
@pytest.mark.parametrize("complex_input", [False, True], ids=["real", "complex"])
def test_channel_major_transform_equals_channels_last(mode, complex_input, method):
    """[b, c, h, w] in, phi [b, c, h', w'] and psi [b, c, L, h', w'] out: the channels-last
    transform's numbers, with psi's channel c * L + angle at [c, angle]."""
    x = jnp.asarray(_random_input((2, 10, 7, 3), complex_input, seed=7))
    phi, psi = wavelets.wavelet_transform(x, 4, mode, method)
    phi_cm, psi_cm = wavelets.wavelet_transform_channel_major(
        jnp.moveaxis(x, -1, 1), 4, mode, method
    )
    assert phi_cm.dtype == phi.dtype and psi_cm.dtype == psi.dtype
    b, ho, wo, _ = psi.shape
    assert psi_cm.shape == (b, 3, 4, ho, wo)
    np.testing.assert_allclose(np.moveaxis(np.asarray(phi_cm), 1, -1), phi, rtol=0, atol=1e-5)
    want = np.moveaxis(np.asarray(psi).reshape(b, ho, wo, 3, 4), (3, 4), (1, 2))
    np.testing.assert_allclose(np.asarray(psi_cm), want, rtol=0, atol=1e-5)
