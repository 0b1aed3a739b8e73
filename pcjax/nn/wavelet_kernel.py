"""A block's wavelet transform and modulus as one TPU kernel (Pallas), with its own backward pass.

The "matmul" path (`wavelets._matmul_planes`) compiled by XLA writes every stage to HBM: the
spectrum, the K + 1 filtered spectra, both inverse products, the moduli, and their gradients
the same way back. Here one kernel step holds one channel of one image in on-chip memory from
the input to the coefficients, G_h ((F_h X F_w^T) * h_hat_k) G_w^T for every k, and writes
only what the block uses: the low-pass, the complex wavelets if the block keeps them, and the
moduli if its non-linearity is the modulus. The backward kernel recomputes the coefficients
from the input rather than storing them, and applies the adjoint products (conjugate
transposes, the filters summed over k), so HBM sees the input, the outputs and their
cotangents once each way.

Same per-axis matrices as the "matmul" path (`sampling.axis_matrices`), padded with zeros to
TPU tiles (second-minor 8, minor 128): exact. On other backends the kernel runs in Pallas's
interpreter (slow; for tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pcjax.nn import complex_ops, sampling


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What the kernel writes besides the low-pass phi [b, c, h', w']."""

    psi: bool = True  # complex wavelets [b, c, K, h', w']
    mod_phi: bool = False  # |phi| [b, c, h', w']
    mod_psi: bool = False  # |psi| [b, c, K, h', w']


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _tiled_bytes(shape: tuple[int, ...], itemsize: int = 4) -> int:
    """HBM bytes of a float32 array in TPU tiles: minor dimension to 128, second-minor to 8."""
    dims = list(shape)
    dims[-1] = _round_up(dims[-1], 128)
    if len(dims) > 1:
        dims[-2] = _round_up(dims[-2], 8)
    return itemsize * int(np.prod(dims))


@functools.lru_cache(maxsize=32)
def _matrices(h: int, w: int, num_angles: int, mode: str, full_angles: bool) -> dict:
    """The kernel's constant operands, float32 (Re, Im) pairs padded to tiles, built in float64
    from `sampling.axis_matrices` and the filter bank: forward and adjoint."""
    bank = sampling.bank_for_input(h, w, num_angles, mode, full_angles)
    f_h, g_h = sampling.axis_matrices(h, bank.subsample)
    f_w, g_w = sampling.axis_matrices(w, bank.subsample)
    mp, mq = f_h.shape[0], f_w.shape[0]
    pp, qq = _round_up(mp, 8), _round_up(mq, 128)

    def pad(a, shape):
        out = np.zeros(shape, np.complex128)
        out[: a.shape[0], : a.shape[1]] = a
        return out

    hats = np.zeros((1 + bank.psi_hat.shape[0], pp, qq), np.float32)
    hats[0, :mp, :mq] = bank.phi_hat
    hats[1:, :mp, :mq] = bank.psi_hat
    fwd = {
        "fw": pad(f_w.T, (w, qq)),  # X F_w^T
        "fh": pad(f_h, (pp, h)),  # F_h Y
        "gw": pad(g_w.T, (qq, g_w.shape[0])),  # W G_w^T
        "gh": pad(g_h, (g_h.shape[0], pp)),  # G_h U
    }
    # Adjoints of right and left products: A N -> A N^H, M A -> M^H A.
    adj = {f"{k}_adj": np.conj(v.T) for k, v in fwd.items()}
    out = {"hat": hats}
    for k, v in {**fwd, **adj}.items():
        out[k] = (v.real.astype(np.float32), v.imag.astype(np.float32))
    out["out_shape"] = (g_h.shape[0], g_w.shape[0])
    return out


def _dot(a, b, precision: str):
    if precision == "bf16":
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    lax_precision = jax.lax.Precision.HIGHEST if precision == "highest" else None
    return jnp.dot(a, b, precision=lax_precision, preferred_element_type=jnp.float32)


def _cdot(ar, ai, br, bi, precision: str):
    """(Re, Im) of (ar + i ai)(br + i bi) as real products; `ai` may be None (real operand)."""
    rr, ir = _dot(ar, br, precision), _dot(ar, bi, precision)
    if ai is None:
        return rr, ir
    return rr - _dot(ai, bi, precision), ir + _dot(ai, br, precision)


def _flops(h, w, pp, qq, ho, wo, k1, complex_input, backward, needs_v) -> int:
    """Real multiply-adds x 2 of one kernel step, at the padded sizes the kernel computes."""
    forward = (2 if complex_input else 1) * 2 * h * w * qq + 4 * pp * h * qq  # F_w, F_h
    inverse = 4 * (pp * qq * wo + ho * pp * wo)  # G_w, G_h, per k
    if not backward:
        return 2 * (forward + k1 * inverse)
    n = k1 * inverse + 4 * h * pp * qq + (4 if complex_input else 2) * h * qq * w  # adjoints
    if needs_v:
        n += forward + k1 * inverse
    return 2 * n


@dataclasses.dataclass(frozen=True)
class _Step:
    """The static shape of one kernel step: one channel image in, its coefficients out."""

    complex_input: bool
    outputs: Outputs
    precision: str
    k1: int  # K + 1 filters, the low-pass first
    padded: tuple[int, int]  # the spectrum's (rows, columns), padded to tiles
    out: tuple[int, int]  # (h', w')
    names: tuple[str, ...]  # the constant matrices, in operand order

    @property
    def phi_planes(self) -> int:
        return 2 if self.complex_input else 1


def _forward(step: _Step, x_r, x_i, hat, mats, outs) -> None:
    """Coefficient k = G_h ((F_h X F_w^T) * hat_k) G_w^T; writes phi, psi and moduli."""
    (f1r, f1i), (f2r, f2i), (g1r, g1i), (g2r, g2i) = (mats[n] for n in step.names)
    yr, yi = _cdot(x_r, x_i, f1r[...], f1i[...], step.precision)
    zr, zi = _cdot(f2r[...], f2i[...], yr, yi, step.precision)
    o = iter(outs)
    phi_refs = [next(o) for _ in range(step.phi_planes)]
    psi_refs = (next(o), next(o)) if step.outputs.psi else None
    mphi_ref = next(o) if step.outputs.mod_phi else None
    mpsi_ref = next(o) if step.outputs.mod_psi else None
    for k in range(step.k1):
        if k > 0 and psi_refs is None and mpsi_ref is None:
            break
        hk = hat[k]
        ur, ui = _cdot(zr * hk, zi * hk, g1r[...], g1i[...], step.precision)
        vr, vi = _cdot(g2r[...], g2i[...], ur, ui, step.precision)
        if k == 0:
            phi_refs[0][...] = vr
            if step.complex_input:
                phi_refs[1][...] = vi
            if mphi_ref is not None:
                mphi_ref[...] = (
                    jnp.sqrt(vr * vr + vi * vi) if step.complex_input else jnp.maximum(vr, -vr)
                )
            continue
        if psi_refs is not None:
            psi_refs[0][k - 1] = vr
            psi_refs[1][k - 1] = vi
        if mpsi_ref is not None:
            mpsi_ref[k - 1] = jnp.sqrt(vr * vr + vi * vi)


def _coefficient_cotangent(step: _Step, k: int, g_refs: dict):
    """(Re, Im) of the cotangent of coefficient k from its own outputs' cotangents, and that of
    its modulus (None where it has none)."""
    ho, wo = step.out
    if k == 0:
        gr = g_refs["phi"][0][...]
        gi = g_refs["phi"][1][...] if step.complex_input else jnp.zeros_like(gr)
        return gr, gi, g_refs["mod_phi"][...] if "mod_phi" in g_refs else None
    psi = g_refs.get("psi")
    gr = psi[0][k - 1] if psi is not None else jnp.zeros((ho, wo), jnp.float32)
    gi = psi[1][k - 1] if psi is not None else jnp.zeros((ho, wo), jnp.float32)
    return gr, gi, g_refs["mod_psi"][k - 1] if "mod_psi" in g_refs else None


def _backward(step: _Step, x_r, x_i, g_refs: dict, hat, mats, outs) -> None:
    """The input's cotangent: the coefficients' cotangents (with the moduli's, v / |v| times
    theirs, the coefficients recomputed from the input), then the adjoint products."""
    (f1r, f1i), (f2r, f2i), (g1r, g1i), (g2r, g2i) = (
        mats[n] for n in ("fw_adj", "fh_adj", "gw_adj", "gh_adj")
    )
    prec = step.precision
    if "fw" in mats:  # the coefficients again, from the input (nothing stored between passes)
        yr, yi = _cdot(x_r, x_i, mats["fw"][0][...], mats["fw"][1][...], prec)
        zr, zi = _cdot(mats["fh"][0][...], mats["fh"][1][...], yr, yi, prec)
        gwr, gwi = mats["gw"][0][...], mats["gw"][1][...]
        ghr, ghi = mats["gh"][0][...], mats["gh"][1][...]
    zbr = jnp.zeros(step.padded, jnp.float32)
    zbi = jnp.zeros(step.padded, jnp.float32)
    for k in range(step.k1):
        if k > 0 and "psi" not in g_refs and "mod_psi" not in g_refs:
            break
        gr, gi, gm = _coefficient_cotangent(step, k, g_refs)
        hk = hat[k]
        if gm is not None:
            ur, ui = _cdot(zr * hk, zi * hk, gwr, gwi, prec)
            vr, vi = _cdot(ghr, ghi, ur, ui, prec)
            if k == 0 and not step.complex_input:  # |Re phi|: d/dvr = sign(vr), 0 at 0
                gr = gr + jnp.where(vr > 0, gm, jnp.where(vr < 0, -gm, 0.0))
            else:  # d|v| = v / |v|, 0 at v = 0 as jnp.abs
                mod = jnp.sqrt(vr * vr + vi * vi)
                s = jnp.where(mod > 0, gm / jnp.where(mod > 0, mod, 1.0), 0.0)
                gr, gi = gr + s * vr, gi + s * vi
        ubr, ubi = _cdot(g2r[...], g2i[...], gr, gi, prec)  # G_h^H [pp, h'] @ [h', w']
        wbr, wbi = _cdot(ubr, ubi, g1r[...], g1i[...], prec)  # @ conj(G_w) [w', qq]
        zbr, zbi = zbr + wbr * hk, zbi + wbi * hk
    ybr, ybi = _cdot(f2r[...], f2i[...], zbr, zbi, prec)  # F_h^H [h, pp] @ [pp, qq]
    if step.complex_input:  # @ conj(F_w) [qq, w]
        xbr, xbi = _cdot(ybr, ybi, f1r[...], f1i[...], prec)
        outs[0][...], outs[1][...] = xbr, xbi
    else:  # a real input's cotangent is the real part
        outs[0][...] = _dot(ybr, f1r[...], prec) - _dot(ybi, f1i[...], prec)


def _output_names(step: _Step) -> list[str]:
    """The forward kernel's outputs (the backward kernel's extra inputs), in order."""
    names = ["phi"] + (["psi"] if step.outputs.psi else [])
    return names + [n for n in ("mod_phi", "mod_psi") if getattr(step.outputs, n)]


def _kernel(step: _Step, backward: bool, *refs) -> None:
    """One grid step: the refs as pallas_call passes them, in `_kernel_call`'s operand order."""
    it = iter(refs)
    x_r = next(it)[...]
    x_i = next(it)[...] if step.complex_input else None
    g_refs = {}
    if backward:
        for name in _output_names(step):
            planes = step.phi_planes if name == "phi" else 2 if name == "psi" else 1
            g_refs[name] = tuple(next(it) for _ in range(planes))
        g_refs = {n: r if n in ("phi", "psi") else r[0] for n, r in g_refs.items()}
    hat = next(it)
    mats = {n: (next(it), next(it)) for n in step.names}
    outs = list(it)
    if backward:
        _backward(step, x_r, x_i, g_refs, hat, mats, outs)
    else:
        _forward(step, x_r, x_i, hat, mats, outs)


def _kernel_call(
    xr, xi, h, w, num_angles, mode, full_angles, precision, outputs: Outputs, interpret, grads=None
):
    """Forward (grads None) or backward pallas_call on real planes xr, xi [b, c, h, w]."""
    m = _matrices(h, w, num_angles, mode, full_angles)
    ho, wo = m["out_shape"]
    k1 = m["hat"].shape[0]
    pp, qq = m["hat"].shape[1:]
    b, c = xr.shape[:2]
    complex_input = xi is not None
    backward = grads is not None
    needs_v = backward and (outputs.mod_phi or outputs.mod_psi)
    names = ("fw", "fh", "gw", "gh") if not backward or needs_v else ()
    names += ("fw_adj", "fh_adj", "gw_adj", "gh_adj") if backward else ()
    step = _Step(complex_input, outputs, precision, k1, (pp, qq), (ho, wo), names)
    consts = [jnp.asarray(m["hat"])]
    for n in names:
        consts += [jnp.asarray(m[n][0]), jnp.asarray(m[n][1])]
    xs = [xr] + ([xi] if complex_input else [])
    image = lambda i, j: (i, j, 0, 0)  # noqa: E731
    coef = lambda i, j: (i, j, 0, 0, 0)  # noqa: E731
    in_plane = pl.BlockSpec((None, None, h, w), image)
    out_phi = pl.BlockSpec((None, None, ho, wo), image)
    out_psi = pl.BlockSpec((None, None, k1 - 1, ho, wo), coef)
    specs, shapes = [], []  # the forward kernel's outputs
    for name in _output_names(step):
        planes = step.phi_planes if name == "phi" else 2 if name == "psi" else 1
        per_k = name in ("psi", "mod_psi")
        specs += [out_psi if per_k else out_phi] * planes
        shapes += [(b, c, k1 - 1, ho, wo) if per_k else (b, c, ho, wo)] * planes
    extra_in, extra_specs = [], []
    if backward:
        extra_in, extra_specs = list(grads), specs
        specs, shapes = [in_plane] * len(xs), [(b, c, h, w)] * len(xs)
    full = lambda a: pl.BlockSpec(a.shape, lambda i, j, n=a.ndim: (0,) * n)  # noqa: E731
    const_bytes = sum(_tiled_bytes(a.shape) for a in consts)
    moved = sum(_tiled_bytes(a.shape) for a in xs + extra_in) + sum(_tiled_bytes(s) for s in shapes)
    n_mod = int(outputs.mod_phi) + int(outputs.mod_psi) * (k1 - 1)
    cost = pl.CostEstimate(
        flops=b * c * _flops(h, w, pp, qq, ho, wo, k1, complex_input, backward, needs_v),
        transcendentals=b * c * n_mod * ho * wo,
        bytes_accessed=moved + const_bytes,
    )
    kwargs = {}
    if not interpret:
        from jax.experimental.pallas import tpu as pltpu

        kwargs["compiler_params"] = pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel")
        )
    return pl.pallas_call(
        functools.partial(_kernel, step, backward),
        grid=(b, c),
        in_specs=[in_plane] * len(xs) + extra_specs + [full(a) for a in consts],
        out_specs=specs,
        out_shape=[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes],
        interpret=interpret,
        cost_estimate=None if interpret else cost,
        name="wavelet_modulus" if not backward else "wavelet_modulus_bwd",
        **kwargs,
    )(*xs, *extra_in, *consts)


def split_over(fn, mesh: jax.sharding.Mesh | None, batch: int, batched_inputs: tuple[bool, ...]):
    """`fn` run by each device of `mesh` on its share of the batch (XLA cannot partition a
    kernel), or on all of it where `batch` does not split (the state's two-image
    initialisation). `batched_inputs`: which inputs have the batch axis (others: replicated)."""
    if mesh is None or mesh.size == 1:
        return fn
    spec = jax.sharding.PartitionSpec(mesh.axis_names if batch % mesh.size == 0 else None)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=tuple(spec if b else jax.sharding.PartitionSpec() for b in batched_inputs),
        out_specs=spec,
        check_vma=False,
    )


def with_vjp(call, complex_input: bool = True):
    """f(xr, xi) = call(xr, xi) on real planes, differentiated by the backward kernel
    call(xr, xi, grads=cotangents) (nothing but the input kept between the passes). A real
    input's xi is a placeholder, passed to `call` as None, with a zero cotangent."""

    @jax.custom_vjp
    def f(xr, xi):
        return tuple(call(xr, xi if complex_input else None))

    def fwd(xr, xi):
        return f(xr, xi), (xr, xi)

    def bwd(res, cts):
        xr, xi = res
        xb = call(xr, xi if complex_input else None, grads=list(cts))
        return xb[0], (xb[1] if complex_input else jnp.zeros_like(xi))

    f.defvjp(fwd, bwd)
    return f


@functools.lru_cache(maxsize=128)
def kernel_vjp(call, complex_input: bool = True, **static):
    """`with_vjp` of call(xr, xi, **static, grads=None) for one static configuration, built
    once per configuration (the kernels' forward/backward pallas_call builders)."""
    return with_vjp(functools.partial(call, **static), complex_input)


def coefficients(
    x: jax.Array,
    num_angles: int,
    mode: str,
    precision: str = "highest",
    full_angles: bool = False,
    outputs: Outputs = Outputs(),
    backend: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array | None]:
    """(phi, psi, |phi|, |psi|) of a channel-major x [b, c, h, w], real or complex.

    phi [b, c, h', w'] is real for a real x (its filter is symmetric), else complex64; psi is
    complex64 [b, c, K, h', w'] or None; the moduli are float32 or None, per `outputs`.
    `backend`: the platform it runs on (None: the host's); off the TPU the kernel runs in
    Pallas's interpreter. `mesh`:
    the devices the batch is split over (XLA cannot partition a kernel; each device runs it on
    its share of the batch, or on all of it where the batch does not split, as the state's
    initialisation's two images).
    """
    complex_ops.check_precision(precision)
    if x.ndim != 4:
        raise ValueError(f"Expected a channel-major [batch, c, h, w] input, got {x.shape}.")
    interpret = (backend or jax.default_backend()) != "tpu"
    cplx = jnp.iscomplexobj(x)
    xr = x.real if cplx else x.astype(jnp.float32)
    xi = x.imag if cplx else jnp.zeros((), jnp.float32)
    _, _, h, w = x.shape
    fn = kernel_vjp(
        _kernel_call,
        cplx,
        h=h,
        w=w,
        num_angles=num_angles,
        mode=mode,
        full_angles=full_angles,
        precision=precision,
        outputs=outputs,
        interpret=interpret,
    )
    fn = split_over(fn, mesh, x.shape[0], batched_inputs=(True, cplx))
    outs = iter(fn(xr, xi))
    phi = next(outs)
    if cplx:
        phi = jax.lax.complex(phi, next(outs))
    psi = jax.lax.complex(next(outs), next(outs)) if outputs.psi else None
    mod_phi = next(outs) if outputs.mod_phi else None
    mod_psi = next(outs) if outputs.mod_psi else None
    return phi, psi, mod_phi, mod_psi
