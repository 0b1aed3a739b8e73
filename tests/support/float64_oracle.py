"""float64 NumPy evaluation of a phase-collapse net with the parameters of a pcjax one.

Used to measure pcjax's float32/bf16 forward error. It shares nothing with pcjax's JAX code but
the filter values (the model is defined by its float32 Fourier filters, promoted to float64
here) and re-implements pad, FFT filtering, fold, crop, rho, Std, projection and N in float64.
Train-mode batch statistics throughout (the mode the accuracy figures refer to).
"""

from __future__ import annotations

import numpy as np

from pcjax.nn import filters

EPS_STD = 1e-5


def _padded(m: int) -> tuple[int, tuple[int, int]]:
    mp = 2 * ((m + 2) // 2 + 1)
    top = (mp - m) // 2
    return mp, (top, mp - m - top)


def wavelet(x: np.ndarray, num_angles: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """phi [b, h', w', c] (real for real x), psi [b, h', w', c * L] complex128."""
    real_input = not np.iscomplexobj(x)
    b, h, w, c = x.shape
    P, ph = _padded(h)
    Q, pw = _padded(w)
    bank = filters.filter_bank(P, Q, num_angles, mode)
    hat = np.concatenate([bank.phi_hat[None], bank.psi_hat], 0).astype(np.float64)
    xp = np.pad(x.astype(np.complex128), ((0, 0), ph, pw, (0, 0)), mode="reflect")
    xf = np.fft.fft2(xp, axes=(1, 2))  # [b, P, Q, c]
    yf = xf[:, None] * hat[None, :, :, :, None]  # [b, K+1, P, Q, c]
    y = np.fft.ifft2(yf, axes=(2, 3))
    y = y[:, :, ::2, ::2][:, :, 1:-1, 1:-1] if bank.subsample else y[:, :, 2:-2, 2:-2]
    phi = y[:, 0].real if real_input else y[:, 0]
    psi = np.moveaxis(y[:, 1:], 1, -1)  # [b, h', w', c, L]
    return phi, psi.reshape(*psi.shape[:3], c * num_angles)


def rho(name: str, z: np.ndarray, params: dict) -> np.ndarray:
    """The complex non-linearities of docs/spec.md 2.4 (eps 1e-6)."""
    r = np.abs(z)
    if name == "mod":
        return r
    if name == "cst":
        return np.maximum(1 - params["rho_threshold"] / (r + 1e-6), 0) * z
    if name == "ms":
        g, b = params["rho_gain"], params["rho_bias"]
        return 1 / (1 + np.exp(-(g * r + b))) / (r + 1e-6) * z
    if name == "tanh":
        return np.tanh(r) / (r + 1e-6) * z
    if name == "mc":
        return z / (r + 1e-6)
    raise ValueError(f"oracle has no non-linearity {name!r}")


def standardize(z: np.ndarray) -> np.ndarray:
    mu = z.mean(axis=(0, 1, 2))
    var = (np.abs(z - mu) ** 2).mean(axis=(0, 1, 2))
    return (z - mu) / np.sqrt(var + EPS_STD)


def block_pre_norm(x, params, num_angles, mode, block_type, nonlinearity):
    """Pc(Std(R(W x))) in float64: the projection output before the pixel normalisation."""
    phi, psi = wavelet(x, num_angles, mode)
    if block_type == "rho_psi":
        z = np.concatenate([phi.astype(np.complex128), rho(nonlinearity, psi, params)], -1)
    else:
        w = np.concatenate([phi.astype(np.complex128), psi], -1)
        z = np.concatenate([w, rho(nonlinearity, w, params)], -1)
    k = np.asarray(params["proj"]["kernel"], np.float64)
    return standardize(z) @ (k[..., 0] + 1j * k[..., 1])


def normalize(u: np.ndarray) -> np.ndarray:
    return u / np.sqrt((np.abs(u) ** 2).sum(-1, keepdims=True))


def block(x, params, num_angles, mode, block_type, nonlinearity):
    """One block N(Pc(Std(R(W x)))) in float64."""
    return normalize(block_pre_norm(x, params, num_angles, mode, block_type, nonlinearity))


def net_blocks(model, variables, x):
    """Outputs of every block of a `PhaseCollapseNet` in float64 (list, block order)."""
    outs = []
    u = np.asarray(x, np.float64)
    for b, kw in enumerate(model.block_kwargs()):
        p = variables["params"][f"block{b}"]
        u = block(u, p, kw["num_angles"], kw["filter_mode"], kw["block_type"], kw["nonlinearity"])
        outs.append(u)
    return outs


def relative_error(got, want) -> float:
    """max |got - want| / max |want|."""
    want = np.asarray(want)
    return float(np.abs(np.asarray(got, want.dtype) - want).max() / np.abs(want).max())
