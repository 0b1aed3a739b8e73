"""Morlet/Gabor filter banks of the phase-collapse networks (NumPy, float64, pure).

Filters are designed once in float64 NumPy, on the padded grid of a block's input, and handed to
the JAX transform (`pcjax.nn.wavelets`) as constant arrays. Paper symbols: `L` angles, `sigma`
envelope width, `xi` centre frequency (radians per sample), `theta` orientation, `slant` the
envelope's aspect ratio. Rows are the first spatial axis (H), columns the second (W).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

# The reference normalises Gabor filters by 2 * 3.1415 * sigma^2 / slant, with the literal 3.1415
# rather than pi. It changes DC gains by ~3e-5 relative; kept so filters match the reference to
# float64 round-off (docs/spec.md 1.1).
REFERENCE_PI = 3.1415

SIGMA0 = 0.8  # envelope width of the finest wavelet and of the standard low-pass
XI0 = 3 * np.pi / 4  # centre frequency of the finest wavelet
PERIODIZATION_RANGE = 2  # sum of the (2k+1)^2 = 25 translates by multiples of the grid size

FILTER_MODES = ("standard", "factorized_even", "factorized_odd")


def gabor_2d(
    P: int, Q: int, sigma: float, theta: float, xi: float, slant: float = 1.0
) -> np.ndarray:
    r"""Periodised 2-D Gabor filter in space, complex128[P, Q].

    .. math::
        g[n] = \frac{s}{2\pi\sigma^2}\sum_{a,b=-2}^{2}
               \exp\Big(-\frac{u^2 + s^2 v^2}{2\sigma^2} + i\xi u\Big),
        \quad u = x\cos\theta + y\sin\theta,\ v = -x\sin\theta + y\cos\theta,

    with (x, y) = (n_1 + aP, n_2 + bQ) and pi replaced by `REFERENCE_PI`. Along the modulation
    direction (cos theta, sin theta) the envelope std is sigma, across it sigma / slant.
    """
    shifts = np.arange(-PERIODIZATION_RANGE, PERIODIZATION_RANGE + 1)
    x = (np.arange(P)[None, :] + shifts[:, None] * P).reshape(-1)  # all translates, rows
    y = (np.arange(Q)[None, :] + shifts[:, None] * Q).reshape(-1)
    x, y = x[:, None].astype(np.float64), y[None, :].astype(np.float64)
    u = x * np.cos(theta) + y * np.sin(theta)
    v = -x * np.sin(theta) + y * np.cos(theta)
    arg = -(u**2 + slant**2 * v**2) / (2 * sigma**2) + 1j * xi * u
    n = 2 * PERIODIZATION_RANGE + 1
    g = np.exp(arg).reshape(n, P, n, Q).sum(axis=(0, 2))
    return g / (2 * REFERENCE_PI * sigma**2 / slant)


def morlet_2d(
    P: int, Q: int, sigma: float, theta: float, xi: float, slant: float = 1.0
) -> np.ndarray:
    """Periodised zero-mean Morlet wavelet, complex128[P, Q]: psi = g_xi - K g_0.

    K = sum(g_xi) / sum(g_0) makes the discrete mean of psi exactly zero on the P x Q grid.
    """
    wave = gabor_2d(P, Q, sigma, theta, xi, slant)
    envelope = gabor_2d(P, Q, sigma, theta, 0.0, slant)
    return wave - (wave.sum() / envelope.sum()) * envelope


def angles(L: int, full_angles: bool = False) -> np.ndarray:
    """Orientations theta_k = (int(L - L/2 - 1) - k) * A / L, k = 0..L-1 (docs/spec.md 1.3).

    A = pi (the paper's runs: the wavelets tile a half-plane of frequencies) or, with
    `full_angles`, A = 2 pi (the whole plane: theta and theta + pi are both present for even L).
    """
    max_angle = 2 * np.pi if full_angles else np.pi
    return (int(L - L / 2 - 1) - np.arange(L)) * max_angle / L


def default_slant(L: int, full_angles: bool = False) -> float:
    """Envelope aspect ratio 4 / L (0.5 for L = 8, 1 for L = 4), or 8 / L with `full_angles`.

    Both give the same angular spacing per unit of slant: full angles spread L filters over
    twice the angle, so each envelope is twice as wide across its orientation.
    """
    return (8.0 if full_angles else 4.0) / L


def odd_slant(s: float) -> float:
    """Slant sqrt(3 s^2 / (4 - s^2)) of the factorised odd wavelet psi_3/2; needs s < 2."""
    if not 0 < s < 2:
        raise ValueError(
            f"slant {s} has no factorised odd wavelet (needs 0 < s < 2: more angles, L > 4 with "
            "full angles, L > 2 without)."
        )
    return math.sqrt(3 * s**2 / (4 - s**2))


@dataclasses.dataclass(frozen=True)
class FilterSpec:
    """Parameters of one filter of a bank (for documentation, plots and tests)."""

    kind: str  # "morlet" or "gabor" (low-pass)
    sigma: float
    theta: float
    xi: float
    slant: float


@dataclasses.dataclass(frozen=True)
class FilterBank:
    """A block's filters on its padded grid.

    Attributes:
        psi_hat: float32[K, P, Q], real part of the unnormalised DFT of each wavelet (DC at [0, 0]).
        phi_hat: float32[P, Q], same for the low-pass.
        psi: complex128[K, P, Q], the wavelets in space.
        phi: complex128[P, Q], the low-pass in space.
        subsample: whether the block decimates its output by 2.
        specs: one `FilterSpec` per wavelet, then the low-pass.
    """

    psi_hat: np.ndarray
    phi_hat: np.ndarray
    psi: np.ndarray
    phi: np.ndarray
    subsample: bool
    specs: tuple[FilterSpec, ...]

    @property
    def num_wavelets(self) -> int:
        return self.psi_hat.shape[0]


def _check_mode(mode: str) -> None:
    if mode not in FILTER_MODES:
        raise ValueError(f"Unknown filter mode {mode!r}; valid choices: {FILTER_MODES}.")


def filter_specs(
    L: int, mode: str, scales_per_octave: int = 1, full_angles: bool = False
) -> tuple[FilterSpec, ...]:
    """The wavelets (theta-minor within each scale) then the low-pass of a bank (docs/spec.md 1.3).

    Modes: "standard" (Morlet sigma = 0.8 * 2^j, xi = 3pi/4 / 2^j for j in {0, 1/S, ..}, low-pass
    sigma 0.8, subsamples), "factorized_even" (psi_1: sigma 0.8, xi 3pi/4; low-pass phi_1/2 of
    sigma 0.8/sqrt 2; no subsampling), "factorized_odd" (psi_3/2: sigma 0.8 sqrt(3/2), xi pi/sqrt 2,
    slant sqrt(3 s^2 / (4 - s^2)); low-pass phi_1/2; subsamples). `full_angles`: see `angles`.
    """
    _check_mode(mode)
    if L < 1:
        raise ValueError(f"Number of angles L must be >= 1, got {L}.")
    if scales_per_octave < 1 or (mode != "standard" and scales_per_octave != 1):
        raise ValueError(
            f"scales_per_octave={scales_per_octave}: must be >= 1, and 1 for factorized banks."
        )
    s = default_slant(L, full_angles)
    thetas = angles(L, full_angles)
    if mode == "standard":
        scales = [
            (SIGMA0 * 2**j, XI0 / 2**j, s) for j in np.arange(scales_per_octave) / scales_per_octave
        ]
        lowpass = FilterSpec("gabor", SIGMA0, 0.0, 0.0, 1.0)  # sigma0 * 2^(J-1) with J = 1
    elif mode == "factorized_even":
        scales = [(SIGMA0, XI0, s)]
        lowpass = FilterSpec("gabor", SIGMA0 / math.sqrt(2), 0.0, 0.0, 1.0)
    else:
        scales = [(SIGMA0 * math.sqrt(1.5), np.pi / math.sqrt(2), odd_slant(s))]
        lowpass = FilterSpec("gabor", SIGMA0 / math.sqrt(2), 0.0, 0.0, 1.0)
    wavelets = [
        FilterSpec("morlet", float(sigma), float(theta), float(xi), float(slant))
        for sigma, xi, slant in scales
        for theta in thetas
    ]
    return tuple(wavelets) + (lowpass,)


def mode_subsamples(mode: str) -> bool:
    """Whether a block with this filter mode decimates by 2 (all but "factorized_even")."""
    _check_mode(mode)
    return mode != "factorized_even"


@functools.lru_cache(maxsize=128)
def filter_bank(
    P: int, Q: int, L: int, mode: str, scales_per_octave: int = 1, full_angles: bool = False
) -> FilterBank:
    """Builds a bank on a P x Q grid: spatial filters and the real part of their DFT (float32).

    The reference keeps only the real part of `fft2` of each periodised spatial filter; the
    imaginary part it drops is ~1e-8 of the real part because the filters are nearly Hermitian.
    Cached: banks are immutable and rebuilt only for a new (grid, L, mode).
    """
    if P < 2 or Q < 2 or P % 2 or Q % 2:
        raise ValueError(f"Padded grid must be even and >= 2 in each axis, got {P}x{Q}.")
    specs = filter_specs(L, mode, scales_per_octave, full_angles)
    psi = np.stack([morlet_2d(P, Q, f.sigma, f.theta, f.xi, f.slant) for f in specs[:-1]])
    low = specs[-1]
    phi = gabor_2d(P, Q, low.sigma, low.theta, low.xi, low.slant)
    psi_hat = np.fft.fft2(psi).real.astype(np.float32)
    phi_hat = np.fft.fft2(phi).real.astype(np.float32)
    for a in (psi_hat, phi_hat, psi, phi):
        a.setflags(write=False)  # shared through the cache: never mutate
    return FilterBank(psi_hat, phi_hat, psi, phi, mode_subsamples(mode), specs)


def block_filter_modes(num_blocks: int, num_standard_blocks: int) -> tuple[str, ...]:
    """Filter mode of each block: standard for b < F, then factorized even/odd alternating.

    `num_standard_blocks` is the reference's `--factorize-filters F` (1 for ImageNet, 0 for
    CIFAR-10).
    """
    if not 0 <= num_standard_blocks <= num_blocks:
        raise ValueError(
            f"num_standard_blocks={num_standard_blocks} must lie in [0, num_blocks={num_blocks}]."
        )
    return tuple(
        "standard"
        if b < num_standard_blocks
        else ("factorized_even", "factorized_odd")[(b - num_standard_blocks) % 2]
        for b in range(num_blocks)
    )
