"""Low-pass and wavelet moduli of a channels-last block as one TPU kernel (Pallas), with its own
backward pass: the layout for blocks whose channels fill the TPU's 128 lanes.

`wavelet_kernel` holds one channel image per step with the spatial axes minor; from 28x28 down
those planes pad to whole (8, 128) tiles (a 28x28 plane takes 5x its size), and the moduli it
writes must be relaid out for the projection. Here one step holds a 128-channel tile of one
image, [h, w, 128], channels on the lanes: the block's NHWC input is read as it is, nothing pads
the lanes, and the moduli are written channels-last, the layout in which XLA runs the batch
statistics and the projection that follow. The per-axis products are batched matmuls, the two
spatial axes swapping in VMEM between them:

    Y[r] = F_w X[r] (per row r),  Z[q] = F_h Y^T[q] (per spectral column q),
    V_k = G_w (A_k[q] Z[q])^T  with  A_k[q] = G_h diag(hat_k[:, q]),

the operator G_h ((F_h X F_w^T) * hat_k) G_w^T of `sampling.axis_matrices`: exact. Only the
"rho_psi" block with the modulus uses it: it writes phi and |psi| and nothing else. Off the TPU
it runs in Pallas's interpreter (slow; for tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pcjax.nn import complex_ops, sampling, wavelet_kernel

LANES = 128


def channel_tile(c: int) -> int:
    """Channels per kernel step: one lane tile where c fills whole tiles, else all of them."""
    return LANES if c % LANES == 0 else c


def fills_lanes(c: int) -> bool:
    """Whole 128-lane tiles, or one at least half full (64 channels moved less than the other
    paths on every block measured; 32 did not fit in VMEM)."""
    return c % LANES == 0 or LANES // 2 <= c < LANES


@dataclasses.dataclass(frozen=True)
class ChannelOrder:
    """The channel order of a block's segments as the kernel writes them: [phi ; |psi|], or
    with `keep_psi` [phi ; psi ; |phi| ; |psi|].

    The reference orders psi and |psi| by input channel, then angle (c K + k). The kernel
    writes tile t's K angles one after the other, [t, k, lane]: the layout in which each angle's
    tile is one whole-lane store. Statistics and projection rows are stored in the reference's
    order, so checkpoints do not depend on the wavelet method; these maps move a per-channel
    array (axis 0) between the two orders with reshapes and transposes.
    """

    channels: int  # c, the block's input channels (phi's channels)
    angles: int  # K
    keep_psi: bool = False

    def _map(self, a: jax.Array, to_stored: bool) -> jax.Array:
        c, k, tile = self.channels, self.angles, channel_tile(self.channels)
        sections = [(c, False), (c * k, True)] * (2 if self.keep_psi else 1)
        parts, start = [], 0
        for size, per_angle in sections:
            part = a[start : start + size]
            start += size
            if per_angle:
                inner = (k, tile) if to_stored else (tile, k)
                part = part.reshape(c // tile, *inner, *a.shape[1:])
                part = jnp.swapaxes(part, 1, 2).reshape(-1, *a.shape[1:])
            parts.append(part)
        return jnp.concatenate(parts)

    def from_stored(self, a: jax.Array) -> jax.Array:
        """Reference order -> the kernel's order."""
        return self._map(a, to_stored=False)

    def to_stored(self, a: jax.Array) -> jax.Array:
        """The kernel's order -> reference order."""
        return self._map(a, to_stored=True)

    def permutation(self) -> np.ndarray:
        """The stored channel of each channel in the kernel's order (concrete under a trace)."""
        n = self.channels * (1 + self.angles) * (2 if self.keep_psi else 1)
        with jax.ensure_compile_time_eval():
            return np.asarray(self.from_stored(np.arange(n)))


@functools.lru_cache(maxsize=32)
def _constants(h: int, w: int, num_angles: int, mode: str, full_angles: bool) -> dict:
    """The kernel's matrices as float32 (Re, Im) pairs, built in float64, forward and adjoint."""
    bank = sampling.bank_for_input(h, w, num_angles, mode, full_angles)
    f_h, g_h = (m.astype(np.complex128) for m in sampling.axis_matrices(h, bank.subsample))
    f_w, g_w = (m.astype(np.complex128) for m in sampling.axis_matrices(w, bank.subsample))
    hats = np.concatenate([bank.phi_hat[None], bank.psi_hat]).astype(np.float32)  # [k1, P, Q]
    mats = {"fw": f_w, "fh": f_h, "gh": g_h, "gw": g_w}
    mats.update({f"{n}_adj": np.conj(np.swapaxes(m, -1, -2)) for n, m in mats.items()})
    out = {n: (m.real.astype(np.float32), m.imag.astype(np.float32)) for n, m in mats.items()}
    # Column q of each filter as a row [1, P]: the kernel scales G_h's columns by it.
    out["hat"] = np.ascontiguousarray(np.transpose(hats, (0, 2, 1))[:, :, None, :])
    out["out_shape"] = (g_h.shape[0], g_w.shape[0])
    out["spectrum"] = (f_h.shape[0], f_w.shape[0])
    out["num_filters"] = hats.shape[0]
    return out


def _cdot(a, b, precision: str):
    """(Re, Im) of the complex product of (Re, Im) pairs a and b."""
    return wavelet_kernel._cdot(*a, *b, precision)


def _per_slab(n: int, body) -> None:
    """body(r) for r in range(n), as a loop: one copy of the products in the kernel's code."""
    jax.lax.fori_loop(0, n, lambda r, carry: (body(r), carry)[1], 0)


def _apply(matrix, src, dst, precision: str, matrix_at=None) -> None:
    """dst[r] = M_r @ src[r] for every slab r of the (Re, Im) scratch pairs src and dst; M_r is
    `matrix` or `matrix_at(r)`."""

    def body(r):
        m = matrix if matrix_at is None else matrix_at(r)
        dst[0][r], dst[1][r] = _cdot(m, (src[0][r], src[1][r]), precision)

    _per_slab(src[0].shape[0], body)


def _swap(src, dst) -> None:
    """dst = src with its two spatial axes swapped (in VMEM; the lanes stay)."""
    for s, d in zip(src, dst, strict=True):
        d[...] = jnp.swapaxes(s[...], 0, 1)


def _read(refs):
    return tuple(r[...] for r in refs)


def _spectrum(x, mats, scratch, precision: str) -> None:
    """scratch["z"] = Z [Q, P, T] (columns first) of the input tile x [h, w, T]."""
    _apply(_read(mats["fw"]), x, scratch["y"], precision)  # [h, Q, T]
    _swap(scratch["y"], scratch["yt"])  # [Q, h, T]
    _apply(_read(mats["fh"]), scratch["yt"], scratch["z"], precision)  # [Q, P, T]


def _filtered(k: int, q, mats, adjoint: bool):
    """G_h diag(hat_k[:, q]) (its columns scaled by filter k's column q), or its adjoint."""
    row = mats["hat"][k, q]  # [1, P]
    gh = tuple(m[...] * row for m in mats["gh"])
    if not adjoint:
        return gh
    return jnp.transpose(gh[0]), -jnp.transpose(gh[1])


def _coefficient(k: int, mats, scratch, each_row, precision: str) -> None:
    """each_row(i, (Re, Im) of row i [J, T] of coefficient k) from the spectrum scratch["z"]."""
    a_k = lambda q: _filtered(k, q, mats, adjoint=False)  # noqa: E731
    _apply(None, scratch["z"], scratch["u"], precision, a_k)  # [Q, I, T]
    _swap(scratch["u"], scratch["ut"])  # [I, Q, T]
    gw, ut = _read(mats["gw"]), scratch["ut"]
    _per_slab(ut[0].shape[0], lambda i: each_row(i, _cdot(gw, (ut[0][i], ut[1][i]), precision)))


def _modulus(v):
    return jnp.sqrt(v[0] * v[0] + v[1] * v[1])


def _kernel(precision: str, k1: int, keep_psi: bool, backward: bool, *refs) -> None:
    """One grid step, refs in `_call`'s operand order: x (Re, Im), [the cotangents of the
    outputs], the matrices, the outputs, then the VMEM scratch pairs. The outputs: phi (Re,
    Im), with `keep_psi` psi (Re, Im) and |phi|, then |psi|; psi and |psi| are [h', w', K T],
    angle k's tile at lanes k T."""
    it = iter(refs)
    x = (next(it), next(it))  # refs: the loops read one slab at a time
    if backward:
        g = {"phi": (next(it), next(it))}
        if keep_psi:
            g["psi"], g["mod_phi"] = (next(it), next(it)), next(it)
        g["mod_psi"] = next(it)
    names = ("fw", "fh", "gh", "gw") + (("fw_adj", "fh_adj", "gw_adj") if backward else ())
    mats = {n: (next(it), next(it)) for n in names}
    mats["hat"] = next(it)
    outs = [next(it) for _ in range(2 if backward else 6 if keep_psi else 3)]
    scratch = {n: (next(it), next(it)) for n in (_SCRATCH if backward else _SCRATCH[:-2])}
    tile = x[0].shape[-1]
    _spectrum(x, mats, scratch, precision)
    if not backward:
        for k in range(k1):

            def write(i, v, k=k):
                lanes = slice((k - 1) * tile, k * tile)
                if k == 0:
                    outs[0][i], outs[1][i] = v
                    if keep_psi:
                        outs[4][i] = _modulus(v)
                    return
                if keep_psi:
                    outs[2][i, :, lanes], outs[3][i, :, lanes] = v
                outs[-1][i, :, lanes] = _modulus(v)

            _coefficient(k, mats, scratch, write, precision)
        return
    zb = scratch["zb"]
    zb[0][...] = jnp.zeros(zb[0].shape, jnp.float32)
    zb[1][...] = jnp.zeros(zb[1].shape, jnp.float32)
    gw_adj = _read(mats["gw_adj"])
    rows = scratch["v"][0].shape[0]  # I
    for k in range(k1):

        def cotangent(i, v, k=k):
            lanes = slice((k - 1) * tile, k * tile)
            if k == 0:
                gr, gi = g["phi"][0][i], g["phi"][1][i]
                gm = g["mod_phi"][i] if keep_psi else None
            else:
                gm = g["mod_psi"][i, :, lanes]
                if keep_psi:
                    gr, gi = g["psi"][0][i, :, lanes], g["psi"][1][i, :, lanes]
            if gm is not None:  # d|v| = v / |v|, 0 at v = 0 as jnp.abs
                mod = _modulus(v)
                s = jnp.where(mod > 0, gm / jnp.where(mod > 0, mod, 1.0), 0.0)
                if k == 0 or keep_psi:
                    gr, gi = gr + s * v[0], gi + s * v[1]
                else:
                    gr, gi = s * v[0], s * v[1]
            scratch["v"][0][i], scratch["v"][1][i] = _cdot(gw_adj, (gr, gi), precision)

        if k == 0 and not keep_psi:  # phi's cotangent alone needs no coefficient
            _per_slab(rows, lambda i: cotangent(i, None))
        else:
            _coefficient(k, mats, scratch, cotangent, precision)
        _swap(scratch["v"], scratch["u"])  # [Q, I, T]

        def accumulate(q, k=k):
            m = _filtered(k, q, mats, adjoint=True)
            dr, di = _cdot(m, (scratch["u"][0][q], scratch["u"][1][q]), precision)
            zb[0][q] += dr
            zb[1][q] += di

        _per_slab(zb[0].shape[0], accumulate)
    _apply(_read(mats["fh_adj"]), zb, scratch["yt"], precision)  # [Q, h, T]
    _swap(scratch["yt"], scratch["y"])  # [h, Q, T]
    _apply(_read(mats["fw_adj"]), scratch["y"], outs, precision)  # [h, w, T]


# VMEM scratch (Re, Im) pairs of one step; the last two only in the backward kernel.
_SCRATCH = ("y", "yt", "z", "u", "ut", "v", "zb")


def _step_shapes(h, w, c, m, keep_psi: bool, backward: bool):
    """(blocks, matrices, scratch): the shapes one kernel step holds in VMEM."""
    ho, wo = m["out_shape"]
    p, q = m["spectrum"]
    k1, tile = m["num_filters"], channel_tile(c)
    plane, per_angle = (ho, wo, tile), (ho, wo, (k1 - 1) * tile)
    outs = [plane] * 2 + ([per_angle] * 2 + [plane] if keep_psi else []) + [per_angle]
    blocks = [(h, w, tile)] * 2 + outs + ([(h, w, tile)] * 2 if backward else [])
    names = ("fw", "fh", "gh", "gw") + (("fw_adj", "fh_adj", "gw_adj") if backward else ())
    consts = [a.shape for n in names for a in m[n]] + [m["hat"].shape]
    shapes = {
        "y": (h, q, tile),
        "yt": (q, h, tile),
        "z": (q, p, tile),
        "u": (q, ho, tile),
        "ut": (ho, q, tile),
        "v": (ho, q, tile),
        "zb": (q, p, tile),
    }
    names = _SCRATCH if backward else _SCRATCH[:-2]
    return blocks, consts, [shapes[n] for n in names for _ in range(2)]


def _flops(h, w, p, q, i, j, tile, k1, backward: bool) -> int:
    """Real multiply-adds x 2 of one kernel step (4 real products per complex one)."""
    spectrum = 8 * tile * (h * q * w + q * p * h)
    coefficient = 8 * tile * (q * i * p + i * j * q)
    if not backward:
        return spectrum + k1 * coefficient
    return 2 * spectrum + (k1 - 1) * coefficient + k1 * coefficient


def _vmem_bytes(blocks, consts, scratch) -> int:
    """A VMEM budget for one step: the pipeline's two buffers of each block, the matrices once,
    the scratch, and as much again for the values in flight; at least 4 MiB. Mosaic needed
    68.7 MB for block 4 of the ImageNet net's backward kernel (56x56x128), budgeted at 99 MB;
    1.75 MB on a v4 for a 7x7x512 block, budgeted at 1.68 MB without the floor."""
    tiled = wavelet_kernel._tiled_bytes
    total = sum(2 * tiled(b) for b in blocks) + sum(tiled(a) for a in consts)
    return max(total + 2 * sum(tiled(s) for s in scratch), 4 * 2**20)


# Device kinds of TPU cores -> pltpu.ChipVersion values, for their VMEM capacity.
_CHIPS = {
    "TPU v2": "v2",
    "TPU v3": "v3",
    "TPU v4": "v4",
    "TPU v4 lite": "v4i",
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v5": "v5p",
    "TPU v5p": "v5p",
    "TPU v6 lite": "v6e",
    "TPU v6e": "v6e",
    "TPU7x": "7x",
}
_SMALLEST_VMEM = 16 * 2**20  # v2-v4: what an unknown TPU is taken to have


def fits(shape, num_angles, mode, full_angles, keep_psi: bool, device=None) -> bool:
    """Whether both kernels' steps for a [b, h, w, c] input fit the VMEM of `device`'s TPU
    core with a quarter to spare (True off the TPU, where the interpreter runs it, and for
    device None). Cores of less than 64 MiB (v2-v4) are left to the other paths: on a v4 the
    14x14x512 backward kernel asked for 16.7 MB of its 16."""
    if device is None or device.platform != "tpu":
        return True
    chip = _CHIPS.get(device.device_kind)
    capacity = (
        pltpu.get_tpu_info_for_chip(pltpu.ChipVersion(chip), 1).vmem_capacity_bytes
        if chip
        else _SMALLEST_VMEM
    )
    _, h, w, c = shape
    m = _constants(h, w, num_angles, mode, full_angles)
    need = max(_vmem_bytes(*_step_shapes(h, w, c, m, keep_psi, b)) for b in (False, True))
    return capacity >= 64 * 2**20 and need <= 0.75 * capacity


def _call(xr, xi, h, w, num_angles, mode, full_angles, precision, keep_psi, interpret, grads=None):
    """Forward (grads None: the outputs of `_kernel`) or backward (the input's Re, Im)."""
    m = _constants(h, w, num_angles, mode, full_angles)
    ho, wo = m["out_shape"]
    k1 = m["num_filters"]
    b, _, _, c = xr.shape
    tile = channel_tile(c)
    backward = grads is not None
    names = ("fw", "fh", "gh", "gw") + (("fw_adj", "fh_adj", "gw_adj") if backward else ())
    consts = [jnp.asarray(v) for n in names for v in m[n]] + [jnp.asarray(m["hat"])]
    lanes = lambda i, t: (i, 0, 0, t)  # noqa: E731
    x_spec = pl.BlockSpec((None, h, w, tile), lanes)
    phi_spec = pl.BlockSpec((None, ho, wo, tile), lanes)
    mod_spec = pl.BlockSpec((None, ho, wo, (k1 - 1) * tile), lanes)
    # The matrices are fetched once: one buffer each, not the pipeline's two.
    once = {} if interpret else {"pipeline_mode": pl.Buffered(1)}
    full = lambda a: pl.BlockSpec(a.shape, lambda i, t, n=a.ndim: (0,) * n, **once)  # noqa: E731
    per_angle = (mod_spec, (b, ho, wo, (k1 - 1) * c))
    outs = [(phi_spec, (b, ho, wo, c))] * 2
    if keep_psi:
        outs += [per_angle] * 2 + [(phi_spec, (b, ho, wo, c))]
    outs += [per_angle]
    extra, extra_specs = [], []
    if backward:
        extra, extra_specs = list(grads), [s for s, _ in outs]
        outs = [(x_spec, (b, h, w, c))] * 2
    moved = sum(wavelet_kernel._tiled_bytes(a.shape) for a in [xr, xi, *extra])
    moved += sum(wavelet_kernel._tiled_bytes(s) for _, s in outs)
    moved += sum(wavelet_kernel._tiled_bytes(a.shape) for a in consts)
    p, q = m["spectrum"]
    cost = pl.CostEstimate(
        flops=b * (c // tile) * _flops(h, w, p, q, ho, wo, tile, k1, backward),
        transcendentals=b * (k1 - 1) * c * ho * wo,
        bytes_accessed=moved,
    )
    blocks, const_shapes, scratch = _step_shapes(h, w, c, m, keep_psi, backward)
    kwargs = {}
    if not interpret:
        kwargs["compiler_params"] = pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"),
            vmem_limit_bytes=_vmem_bytes(blocks, const_shapes, scratch),
        )
    return pl.pallas_call(
        functools.partial(_kernel, precision, k1, keep_psi, backward),
        grid=(b, c // tile),
        in_specs=[x_spec] * 2 + extra_specs + [full(a) for a in consts],
        out_specs=[s for s, _ in outs],
        out_shape=[jax.ShapeDtypeStruct(s, jnp.float32) for _, s in outs],
        scratch_shapes=[pltpu.VMEM(s, jnp.float32) for s in scratch],
        interpret=interpret,
        cost_estimate=None if interpret else cost,
        name="lanes_coefficients" if not backward else "lanes_coefficients_bwd",
        **kwargs,
    )(xr, xi, *extra, *consts)


def coefficients(
    x: jax.Array,
    num_angles: int,
    mode: str,
    precision: str = "highest",
    full_angles: bool = False,
    keep_psi: bool = False,
    backend: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array]:
    """(phi, psi, |phi|, |psi|) of a complex channels-last x [b, h, w, c].

    phi: complex64[b, h', w', c]; |psi|: float32[b, h', w', c K]; with `keep_psi` also psi,
    complex64 like |psi|, and |phi| float32 like phi (else None). Channel a of psi and |psi| is
    the reference's channel `ChannelOrder(c, K).permutation()[c + a] - c`. `backend` and
    `mesh` as in `wavelet_kernel.coefficients`.
    """
    complex_ops.check_precision(precision)
    if x.ndim != 4 or not jnp.iscomplexobj(x):
        raise ValueError(f"Expected a complex channels-last [batch, h, w, c] input, got {x}.")
    interpret = (backend or jax.default_backend()) != "tpu"
    _, h, w, _ = x.shape
    fn = wavelet_kernel.kernel_vjp(
        _call,
        h=h,
        w=w,
        num_angles=num_angles,
        mode=mode,
        full_angles=full_angles,
        precision=precision,
        keep_psi=keep_psi,
        interpret=interpret,
    )
    fn = wavelet_kernel.split_over(fn, mesh, x.shape[0], batched_inputs=(True, True))
    outs = fn(x.real, x.imag)
    phi = jax.lax.complex(outs[0], outs[1])
    if not keep_psi:
        return phi, None, None, outs[2]
    return phi, jax.lax.complex(outs[2], outs[3]), outs[4], outs[5]
