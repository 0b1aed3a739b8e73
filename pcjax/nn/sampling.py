"""The transform's sampling geometry: reflect padding, output sizes, the filter bank on the
padded grid, and the per-axis matrices that fold padding, DFT, decimation and crop together
(docs/spec.md 2.2). Plain NumPy; the transform (`wavelets`) and both TPU kernels build on it.
"""

from __future__ import annotations

import functools

import numpy as np

from pcjax.nn import filters


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


@functools.lru_cache(maxsize=64)
def axis_matrices(m: int, subsample: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis matrices of the "matmul" method for an axis of m samples, built in float64.

    Returns F complex64[Mp, m] = DFT_Mp @ (reflect padding), and G complex64[m', Mp] = the rows
    of the inverse DFT (1 / Mp normalisation) at the output samples kept: index 2 (j + 1) when
    subsampling (decimate, then crop 1), j + 2 otherwise (crop 2). Decimating the inverse DFT's
    output equals folding the spectrum (docs/spec.md 2.2).
    """
    mp = padded_size(m)
    pad = np.pad(np.eye(m), (pad_widths(m), (0, 0)), mode="reflect")  # [Mp, m]
    k = np.arange(mp)
    dft = np.exp(-2j * np.pi * np.outer(k, k) / mp)
    f = dft @ pad
    n_out = output_size(m, subsample)
    kept = 2 * (np.arange(n_out) + 1) if subsample else np.arange(n_out) + 2
    g = np.exp(2j * np.pi * np.outer(kept, k) / mp) / mp
    f, g = f.astype(np.complex64), g.astype(np.complex64)
    f.setflags(write=False)
    g.setflags(write=False)
    return f, g


def plane_matrix(m: np.ndarray) -> np.ndarray:
    """A constant complex matrix M [o, i] as the real float32[o, 2, i, 2] acting on (Re, Im) planes.

    Index [o, r, i, s] is the weight of plane s of input i in plane r of output o:
    [[Mr, -Mi], [Mi, Mr]]. Same products and sums as the complex product (no 3-product trick:
    it loses accuracy).
    """
    out = np.zeros((m.shape[0], 2, m.shape[1], 2), np.float32)
    out[:, 0, :, 0] = out[:, 1, :, 1] = m.real
    out[:, 0, :, 1] = -m.imag
    out[:, 1, :, 0] = m.imag
    return out
