"""Filter banks against an independent float64 NumPy transcription of docs/spec.md 1.

The oracle below is written from the formulas of docs/spec.md 1.1-1.3 (explicit 5x5
periodisation loop, quadratic form R diag(1, s^2) R^T / (2 sigma^2), Z = 2 * 3.1415 * sigma^2 / s,
Morlet correction K = sum(g_xi) / sum(g_0)) and never calls `pcjax.nn.filters` to build filters.
"""

import math

import numpy as np
import pytest

from pcjax.nn import filters

# --------------------------------------------------------------------------------------------
# Oracle: docs/spec.md 1, transcribed independently in float64.
# --------------------------------------------------------------------------------------------


def _oracle_gabor(P, Q, sigma, theta, xi, slant=1.0):
    """Periodised Gabor on the P x Q grid, complex128 (docs/spec.md 1.1)."""
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    # Quadratic form R diag(1, s^2) R^T / (2 sigma^2); the cross term is (A01 + A10) x y.
    curv = rot @ np.diag([1.0, slant**2]) @ rot.T / (2 * sigma**2)
    n1 = np.arange(P, dtype=np.float64)[:, None]
    n2 = np.arange(Q, dtype=np.float64)[None, :]
    g = np.zeros((P, Q), dtype=np.complex128)
    for a in range(-2, 3):
        for b in range(-2, 3):
            x = n1 + a * P
            y = n2 + b * Q
            energy = curv[0, 0] * x**2 + (curv[0, 1] + curv[1, 0]) * x * y + curv[1, 1] * y**2
            g += np.exp(-energy + 1j * xi * (x * c + y * s))
    return g / (2 * 3.1415 * sigma**2 / slant)


def _oracle_morlet(P, Q, sigma, theta, xi, slant=1.0):
    """psi = g_xi - K g_0 with K = sum(g_xi) / sum(g_0) (docs/spec.md 1.2)."""
    g_xi = _oracle_gabor(P, Q, sigma, theta, xi, slant)
    g_0 = _oracle_gabor(P, Q, sigma, theta, 0.0, slant)
    return g_xi - g_xi.sum() / g_0.sum() * g_0


def _oracle_params(L, mode, full_angles=False):
    """(thetas, wavelet (sigma, xi, slant), low-pass sigma, subsample) of docs/spec.md 1.3.

    Full angles: max_angle 2 pi instead of pi and slant 8 / L instead of 4 / L.
    """
    max_angle, s = (2 * np.pi, 8.0 / L) if full_angles else (np.pi, 4.0 / L)
    thetas = [(L // 2 - 1 - k) * max_angle / L for k in range(L)]  # even L only
    if mode == "standard":
        return thetas, (0.8, 3 * np.pi / 4, s), 0.8, True
    if mode == "factorized_even":
        return thetas, (0.8, 3 * np.pi / 4, s), 0.8 / np.sqrt(2), False
    if mode == "factorized_odd":
        s_odd = np.sqrt(3 * s**2 / (4 - s**2))
        return thetas, (0.8 * np.sqrt(1.5), np.pi / np.sqrt(2), s_odd), 0.8 / np.sqrt(2), True
    raise AssertionError(mode)


def _oracle_bank(P, Q, L, mode, full_angles=False):
    """Spatial filters [psi(theta_0..theta_{L-1}), phi] and their Fourier real parts (float64)."""
    thetas, (sigma, xi, slant), sigma_low, _ = _oracle_params(L, mode, full_angles)
    psi = np.stack([_oracle_morlet(P, Q, sigma, t, xi, slant) for t in thetas])
    phi = _oracle_gabor(P, Q, sigma_low, 0.0, 0.0, 1.0)
    return psi, phi, np.fft.fft2(psi).real, np.fft.fft2(phi).real


# --------------------------------------------------------------------------------------------
# Angles, slants, specs, block modes.
# --------------------------------------------------------------------------------------------


def test_angles_L8():
    want = np.pi / 8 * np.array([3, 2, 1, 0, -1, -2, -3, -4])
    np.testing.assert_allclose(filters.angles(8), want, rtol=0, atol=1e-15)
    assert filters.default_slant(8) == 0.5


def test_angles_L4():
    want = np.pi / 4 * np.array([1, 0, -1, -2])
    np.testing.assert_allclose(filters.angles(4), want, rtol=0, atol=1e-15)
    assert filters.default_slant(4) == 1.0


def test_full_angles_L16_and_L8():
    # docs/spec.md 1.3 with full_angles: theta_k = (L/2 - 1 - k) 2 pi / L, slant 8 / L.
    want = np.pi / 8 * np.arange(7, -9, -1)  # 7pi/8, 6pi/8, ..., -pi
    np.testing.assert_allclose(filters.angles(16, full_angles=True), want, rtol=0, atol=1e-15)
    assert filters.default_slant(16, full_angles=True) == 0.5
    want = np.pi / 4 * np.array([3, 2, 1, 0, -1, -2, -3, -4])
    np.testing.assert_allclose(filters.angles(8, full_angles=True), want, rtol=0, atol=1e-15)
    assert filters.default_slant(8, full_angles=True) == 1.0
    # The odd factorised slant sqrt(3 s^2 / (4 - s^2)) needs s < 2: none for 4 full angles.
    assert filters.filter_specs(16, "factorized_odd", full_angles=True)[0].slant == (
        pytest.approx(math.sqrt(0.2), rel=1e-14)
    )
    with pytest.raises(ValueError, match="slant 2.0"):
        filters.filter_specs(4, "factorized_odd", full_angles=True)


@pytest.mark.parametrize("L,full_angles", [(4, False), (8, False), (8, True), (16, True)])
@pytest.mark.parametrize("mode", filters.FILTER_MODES)
def test_filter_specs_match_reference_table(L, full_angles, mode):
    thetas, (sigma, xi, slant), sigma_low, subsample = _oracle_params(L, mode, full_angles)
    specs = filters.filter_specs(L, mode, full_angles=full_angles)
    assert len(specs) == L + 1
    for k, spec in enumerate(specs[:-1]):
        assert spec.kind == "morlet"
        np.testing.assert_allclose(
            [spec.sigma, spec.theta, spec.xi, spec.slant],
            [sigma, thetas[k], xi, slant],
            rtol=1e-14,
            atol=1e-15,
        )
    low = specs[-1]
    assert low.kind == "gabor"
    np.testing.assert_allclose(
        [low.sigma, low.theta, low.xi, low.slant], [sigma_low, 0.0, 0.0, 1.0], rtol=1e-14, atol=0
    )
    assert filters.mode_subsamples(mode) is subsample
    assert filters.filter_bank(12, 12, L, mode).subsample is subsample


def test_factorized_odd_slant_values():
    # docs/spec.md 1.3: s' = sqrt(0.2) for L = 8 (s = 0.5), s' = 1 for L = 4.
    assert filters.filter_specs(8, "factorized_odd")[0].slant == pytest.approx(
        math.sqrt(0.2), rel=1e-14
    )
    assert filters.filter_specs(4, "factorized_odd")[0].slant == pytest.approx(1.0, rel=1e-14)
    assert filters.filter_specs(8, "factorized_odd")[0].sigma == pytest.approx(0.9798, abs=5e-5)
    assert filters.filter_specs(8, "factorized_odd")[0].xi == pytest.approx(2.2214, abs=5e-5)
    assert filters.filter_specs(8, "factorized_odd")[-1].sigma == pytest.approx(0.5657, abs=5e-5)


def test_block_filter_modes_imagenet_and_cifar():
    imagenet = filters.block_filter_modes(11, 1)
    assert imagenet == ("standard",) + ("factorized_even", "factorized_odd") * 5
    cifar = filters.block_filter_modes(8, 0)
    assert cifar == ("factorized_even", "factorized_odd") * 4


# --------------------------------------------------------------------------------------------
# Filters against the oracle.
# --------------------------------------------------------------------------------------------

GRIDS_AND_L = [
    ((12, 20), 4),
    ((12, 20), 8),
    ((20, 12), 8),
    ((16, 16), 4),
    ((36, 36), 4),
    ((36, 36), 8),
    ((116, 116), 8),
    ((228, 228), 8),
]


@pytest.mark.parametrize("grid,L", GRIDS_AND_L)
@pytest.mark.parametrize("mode", filters.FILTER_MODES)
def test_filter_bank_matches_oracle(grid, L, mode):
    P, Q = grid
    psi, phi, psi_hat, phi_hat = _oracle_bank(P, Q, L, mode)
    bank = filters.filter_bank(P, Q, L, mode)
    assert bank.psi.shape == (L, P, Q) and bank.phi.shape == (P, Q)
    assert bank.psi_hat.shape == (L, P, Q) and bank.phi_hat.shape == (P, Q)
    assert bank.psi_hat.dtype == np.float32 and bank.phi_hat.dtype == np.float32
    # Spatial filters are float64 on both sides and differ only in summation order: the error is
    # a few ulps of the largest value (filter peaks are O(0.1-0.5)).
    for got, want in ((bank.psi, psi), (bank.phi, phi)):
        err = np.abs(np.asarray(got) - want).max()
        assert err <= 1e-12 * np.abs(want).max(), err
    # Fourier filters are stored in float32: rounding is ~6e-8 of each value (<= 1.01), so 1e-6 of
    # the largest value is a safe bound that still catches any formula or ordering slip.
    for got, want in ((bank.psi_hat, psi_hat), (bank.phi_hat, phi_hat)):
        err = np.abs(got.astype(np.float64) - want).max()
        assert err <= 1e-6 * np.abs(want).max(), err


@pytest.mark.parametrize("grid,L", [((12, 20), 8), ((36, 36), 16), ((20, 12), 6)])
@pytest.mark.parametrize("mode", filters.FILTER_MODES)
def test_full_angle_bank_matches_oracle(grid, L, mode):
    P, Q = grid
    psi, phi, psi_hat, phi_hat = _oracle_bank(P, Q, L, mode, full_angles=True)
    bank = filters.filter_bank(P, Q, L, mode, full_angles=True)
    assert bank.psi.shape == (L, P, Q)
    err = np.abs(np.asarray(bank.psi) - psi).max()
    assert err <= 1e-12 * np.abs(psi).max(), err
    err = np.abs(bank.psi_hat.astype(np.float64) - psi_hat).max()
    assert err <= 1e-6 * np.abs(psi_hat).max(), err
    np.testing.assert_array_equal(bank.phi_hat, filters.filter_bank(P, Q, L, mode).phi_hat)


@pytest.mark.parametrize("L", [8, 16])
def test_full_angles_cover_both_half_planes(L):
    """theta_{k + L/2} = theta_k - pi flips u and v, so psi_{k + L/2} = conj(psi_k) in space:
    each full-angle wavelet has its mirror at -omega (the half-angle bank has none)."""
    P = Q = 20
    bank = filters.filter_bank(P, Q, L, "factorized_even", full_angles=True)
    half = L // 2
    np.testing.assert_allclose(bank.psi[half:], np.conj(bank.psi[:half]), rtol=0, atol=1e-13)
    flip = lambda a: np.roll(a[..., ::-1, ::-1], 1, axis=(-2, -1))  # noqa: E731  a(-omega)
    np.testing.assert_allclose(bank.psi_hat[half:], flip(bank.psi_hat[:half]), atol=1e-6)
    # The peak of each mirrored wavelet sits at minus the other's peak frequency.
    for k in range(half):
        a = np.unravel_index(np.argmax(bank.psi_hat[k]), (P, Q))
        b = np.unravel_index(np.argmax(bank.psi_hat[k + half]), (P, Q))
        assert ((a[0] + b[0]) % P, (a[1] + b[1]) % Q) == (0, 0)


@pytest.mark.parametrize("grid,L", [((12, 20), 8), ((36, 36), 4), ((116, 116), 8)])
@pytest.mark.parametrize("mode", filters.FILTER_MODES)
def test_morlets_have_zero_mean(grid, L, mode):
    bank = filters.filter_bank(*grid, L, mode)
    # Sum of P*Q values of size <= ~0.5 in float64: exact zero up to ~1e-15 of the filter scale.
    means = np.abs(np.asarray(bank.psi).sum(axis=(1, 2)))
    assert means.max() < 1e-13, means
    assert np.abs(bank.psi_hat[:, 0, 0]).max() < 1e-6


def test_gabor_and_morlet_functions_match_oracle():
    # The public helpers directly, at a non-square grid, oblique angle and slant != 1.
    args = (14, 22, 0.9, 0.7, 2.1, 0.6)
    np.testing.assert_allclose(filters.gabor_2d(*args), _oracle_gabor(*args), rtol=0, atol=1e-14)
    np.testing.assert_allclose(filters.morlet_2d(*args), _oracle_morlet(*args), rtol=0, atol=1e-14)


# --------------------------------------------------------------------------------------------
# docs/spec.md 1.6 table.
# --------------------------------------------------------------------------------------------

# (mode, L, P, phi_hat(0), phi_hat(pi, pi), {k: (max, (w_row, w_col))}, min over all psi_hat),
# values as printed in the table (strings, so the tolerance follows the printed digits).
TABLE_1_6 = [
    (
        "standard",
        8,
        228,
        "1.000043",
        "0.007225",
        {0: ("0.9726", ("0.937", "2.232")), 3: ("0.9701", ("2.425", "0"))},
        "-0.097",
    ),
    (
        "factorized_even",
        4,
        36,
        "1.007267",
        "0.170",
        {0: ("0.9716", ("1.745", "1.745")), 1: ("0.9699", ("2.443", "0"))},
        "-0.095",
    ),
    ("factorized_odd", 4, 36, "1.007267", "0.170", {1: ("0.9910", ("2.269", "0"))}, "-0.057"),
    ("factorized_even", 8, 116, "1.007267", "0.170", {3: ("0.9700", ("2.437", "0"))}, "-0.097"),
    ("factorized_odd", 8, 116, "1.007267", "0.170", {3: ("0.9912", ("2.221", "0"))}, "-0.057"),
]


def _assert_printed(got, printed, what):
    """|got - printed| <= half a unit of the last printed decimal (+ float32 rounding slack)."""
    decimals = len(printed.split(".")[1]) if "." in printed else 3
    tol = 0.5 * 10.0**-decimals + 2e-7
    assert abs(float(got) - float(printed)) <= tol, (what, float(got), printed)


@pytest.mark.parametrize("mode,L,P,phi0,phi_pi,maxima,psi_min", TABLE_1_6)
def test_reference_table_values(mode, L, P, phi0, phi_pi, maxima, psi_min):
    bank = filters.filter_bank(P, P, L, mode)
    _assert_printed(bank.phi_hat[0, 0], phi0, "phi_hat(0)")
    _assert_printed(bank.phi_hat[P // 2, P // 2], phi_pi, "phi_hat(pi, pi)")
    assert np.abs(bank.psi_hat[:, 0, 0]).max() < 1e-6  # table: ~1e-8
    omega = 2 * np.pi * np.fft.fftfreq(P)  # radians per sample, DC at index 0
    for k, (peak, (w_row, w_col)) in maxima.items():
        _assert_printed(bank.psi_hat[k].max(), peak, f"max psi_hat[{k}]")
        i, j = np.unravel_index(np.argmax(bank.psi_hat[k]), (P, P))
        # Locations are grid frequencies 2 pi k / P printed to 3 decimals (column 0 means DC).
        _assert_printed(omega[i], w_row, f"row frequency of the peak of psi_hat[{k}]")
        _assert_printed(omega[j], w_col, f"column frequency of the peak of psi_hat[{k}]")
    _assert_printed(bank.psi_hat.min(), psi_min, "min psi_hat")


def test_theta_zero_oscillates_along_rows():
    # docs/spec.md 1.6: theta = 0 has frequency vector (xi, 0) in (row, column) order, positive.
    bank = filters.filter_bank(36, 20, 4, "factorized_even")
    k = list(filters.angles(4)).index(0.0)
    i, j = np.unravel_index(np.argmax(bank.psi_hat[k]), bank.psi_hat[k].shape)
    assert 0 < i < 36 // 2 and j == 0


# --------------------------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------------------------


def test_unknown_mode_raises_with_value():
    with pytest.raises(ValueError, match="bogus_mode"):
        filters.filter_bank(12, 12, 4, "bogus_mode")
    with pytest.raises(ValueError, match="bogus_mode"):
        filters.filter_specs(4, "bogus_mode")
    with pytest.raises(ValueError, match="bogus_mode"):
        filters.mode_subsamples("bogus_mode")


@pytest.mark.parametrize("grid", [(13, 12), (12, 13), (0, 12)])
def test_odd_or_empty_grid_raises_with_value(grid):
    with pytest.raises(ValueError, match=f"{grid[0]}x{grid[1]}"):
        filters.filter_bank(*grid, 4, "standard")


def test_bad_block_count_raises_with_value():
    with pytest.raises(ValueError, match="num_standard_blocks=5"):
        filters.block_filter_modes(3, 5)


@pytest.mark.parametrize("method", ["fft", "spatial"])
def test_full_angles_reach_the_wavelet_transform(method):
    """On a real image, mirrored full-angle wavelets give conjugate coefficients (both methods)."""
    import jax

    from pcjax.nn import wavelets

    x = np.asarray(jax.random.normal(jax.random.key(3), (2, 12, 12, 1)))
    L = 8
    _, psi = wavelets.wavelet_transform(x, L, "factorized_odd", method, full_angles=True)
    psi = np.asarray(psi)  # [b, h', w', c * L], channel c * L + angle
    np.testing.assert_allclose(psi[..., L // 2 :], np.conj(psi[..., : L // 2]), atol=1e-5)
    _, half = wavelets.wavelet_transform(x, L, "factorized_odd", method)
    assert np.abs(psi - np.asarray(half)).max() > 1e-2  # a different bank really was used
