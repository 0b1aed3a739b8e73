"""Flax modules of the phase-collapse networks: where parameters and batch statistics live.

The maths is in pure functions (`wavelets`, `nonlinear`, `complex_ops`); these modules only
declare parameters/statistics and wire the functions together. Blocks take and return NHWC;
on the matmul wavelet path (TPUs) a block computes channel-major [batch, c, h, w] inside.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pcjax.nn import complex_ops, moduli_kernel, nonlinear, wavelet_kernel, wavelets

BLOCK_TYPES = ("rho_psi", "linear_plus_rho")
PRECISIONS = complex_ops.PRECISIONS  # matmul precision policy, see `pcjax.nn.complex_ops`
# Initial values of learned non-linearity parameters in the paper's runs (docs/spec.md 3.8).
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
    # Return the per-segment (mean, 1 / std) instead of the standardised tensor, so that the
    # projection that follows centres while packing its input planes and folds 1 / std into its
    # (small) weights: one pass fewer over the largest activations of the block.
    return_statistics: bool = False
    channel_axis: int = -1  # 1 for channel-major [batch, c, h, w] tensors

    @nn.compact
    def __call__(
        self,
        x: jax.Array | Sequence[jax.Array],
        use_running_average: bool,
        order: Any = None,
    ) -> jax.Array | list[jax.Array]:
        """Standardises `x`, or a list of channel segments (real or complex) of one tensor.

        Segments are standardised exactly as their concatenation would be; keeping real
        segments real lets the projection that follows use half the multiplications on them.
        `order`: for segments a kernel writes in its own channel order, the maps
        (`from_stored`, `to_stored`) between it and the stored statistics' (None: the same).
        """
        segments = list(x) if isinstance(x, (list, tuple)) else [x]
        ax = self.channel_axis % segments[0].ndim
        sizes = [s.shape[ax] for s in segments]
        c = sum(sizes)
        any_complex = any(jnp.iscomplexobj(s) for s in segments)
        if self.affine and any_complex:
            raise ValueError("Affine batch standardisation is defined for real inputs only.")
        # Complex running means are stored as (Re, Im) pairs so checkpoints stay real.
        ra_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((c, 2) if any_complex else (c,), jnp.float32)
        )
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        offsets = np.cumsum([0, *sizes])
        means, variances = [], []
        if use_running_average:
            run_mean, run_var = ra_mean.value, ra_var.value
            if order is not None:
                run_mean, run_var = order.from_stored(run_mean), order.from_stored(run_var)
            for seg, lo, hi in zip(segments, offsets[:-1], offsets[1:], strict=True):
                m = run_mean[lo:hi]
                if any_complex:
                    m = complex_ops.to_complex(m) if jnp.iscomplexobj(seg) else m[:, 0]
                means.append(m)
                variances.append(run_var[lo:hi])
        else:
            axes = tuple(a for a in range(segments[0].ndim) if a != ax)
            means, variances = _batch_moments(segments, axes)
            if not self.is_initializing():
                n = int(np.prod([segments[0].shape[a] for a in axes]))
                mom = self.momentum
                if any_complex:
                    batch_mean = jnp.concatenate(
                        [complex_ops.to_pair(m.astype(jnp.complex64)) for m in means]
                    )
                else:
                    batch_mean = jnp.concatenate(means)
                batch_var = jnp.concatenate(variances)
                if order is not None:
                    batch_mean, batch_var = order.to_stored(batch_mean), order.to_stored(batch_var)
                ra_mean.value = (1 - mom) * ra_mean.value + mom * batch_mean
                ra_var.value = (1 - mom) * ra_var.value + mom * batch_var * (n / max(n - 1, 1))
        inv_stds = [jax.lax.rsqrt(v + self.epsilon) for v in variances]
        if self.return_statistics:
            if self.affine:
                raise ValueError("return_statistics is for non-affine standardisation.")
            return list(zip(means, inv_stds, strict=True))

        def per_channel(v):  # [c] -> broadcastable along the channel axis
            return v.reshape(v.shape + (1,) * (segments[0].ndim - 1 - ax))

        out = [
            (seg - per_channel(m)) * per_channel(a)
            for seg, m, a in zip(segments, means, inv_stds, strict=True)
        ]
        if self.affine:
            scale = self.param("scale", nn.initializers.ones, (c,))
            bias = self.param("bias", nn.initializers.zeros, (c,))
            out = [
                y * per_channel(scale[lo:hi]) + per_channel(bias[lo:hi])
                for y, lo, hi in zip(out, offsets[:-1], offsets[1:], strict=True)
            ]
        return out if isinstance(x, (list, tuple)) else out[0]


def _batch_moments(segments: list[jax.Array], axes: tuple[int, ...]) -> tuple[list, list]:
    """Per-channel mean and biased variance mean(|x - mu|^2) of each segment over `axes`.

    Complex statistics come from real reductions over the Re and Im planes (XLA reduces float32
    much faster than complex64 on CPU); two passes (mean, then centred squares) for float32
    accuracy.
    """
    means, variances = [], []
    for seg in segments:
        if jnp.iscomplexobj(seg):
            re, im = seg.real, seg.imag
            mr = jnp.mean(re, axis=axes, keepdims=True)
            mi = jnp.mean(im, axis=axes, keepdims=True)
            variances.append(jnp.mean(jnp.square(re - mr) + jnp.square(im - mi), axis=axes))
            means.append(jax.lax.complex(mr, mi).reshape(-1))
        else:
            m = jnp.mean(seg, axis=axes, keepdims=True)
            variances.append(jnp.mean(jnp.square(seg - m), axis=axes))
            means.append(m.reshape(-1))
    return means, variances


class ComplexProjection(nn.Module):
    """`Pc`: learned bias-free complex 1x1 projection, semi-unitary initialisation.

    The kernel is stored as float32[c_in, features, 2] (Re, Im) pairs (see `complex_ops`).
    `precision` is the matmul policy of `complex_ops.PRECISIONS`.
    """

    features: int
    precision: str = "highest"
    channel_axis: int = -1  # 1: channel-major [batch, c, h, w] segments and output

    @nn.compact
    def __call__(
        self,
        x: jax.Array | Sequence[jax.Array],
        standardize: Sequence[tuple[jax.Array, jax.Array]] | None = None,
        order: Any = None,
        planes_apart: bool = False,
    ) -> jax.Array:
        """Projects `x` (one array or its channel segments, see `complex_ops.project_segments`).

        With `standardize` = per-segment (mean, 1/std), computes ((x - mean) / std) W as
        (x - mean) (W / std): centred before the matmul, 1 / std folded into the weights.
        `order`: the maps between the input's channel order and the kernel's rows', as in
        `BatchStandardize`;
        `planes_apart`: see `complex_ops.project_segments`.
        """
        segments = list(x) if isinstance(x, (list, tuple)) else [x]
        kernel = self.param(
            "kernel",
            lambda key, shape: complex_ops.semi_unitary_init(key, *shape),
            (sum(s.shape[self.channel_axis] for s in segments), self.features),
        )
        if order is not None:
            kernel = order.from_stored(kernel)
        if standardize is None:
            return complex_ops.project_segments(
                segments,
                kernel,
                self.precision,
                channel_axis=self.channel_axis,
                planes_apart=planes_apart,
            )
        return complex_ops.project_segments(
            segments,
            kernel,
            self.precision,
            means=[m for m, _ in standardize],
            scales=jnp.concatenate([a for _, a in standardize]),  # real [c_in]
            channel_axis=self.channel_axis,
            planes_apart=planes_apart,
        )


def _merge_segments(parts: list[jax.Array], axis: int = -1) -> list[jax.Array]:
    """Channel segments in order, adjacent parts of the same kind (real/complex) concatenated.

    The reference concatenates everything into one complex tensor; keeping real parts (moduli,
    the low-pass of a real image) real changes no value but halves their projection cost.
    """
    merged: list[list[jax.Array]] = []
    for p in parts:
        if merged and jnp.iscomplexobj(merged[-1][0]) == jnp.iscomplexobj(p):
            merged[-1].append(p)
        else:
            merged.append([p])
    return [g[0] if len(g) == 1 else jnp.concatenate(g, axis=axis) for g in merged]


class PhaseCollapseBlock(nn.Module):
    """One block U -> N(Pc(Std(R(W U)))) with fixed wavelets W and non-linearity rho.

    `block_type` says what R keeps (docs/spec.md 2.5, 3.2):
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
    wavelet_method: str = "auto"
    precision: str = "highest"
    full_angles: bool = False  # orientations over 2 pi (docs/spec.md 1.3)
    backend: str | None = None  # platform wavelet_method="auto" resolves for (None: the host's)
    mesh: Any = None  # jax.sharding.Mesh the batch is split over, for the Pallas kernel

    def _rho(
        self, z: jax.Array, axis: int = -1, channels: tuple[int, ...] | None = None
    ) -> jax.Array:
        """rho with one learned value per channel of `axis`; `channels`: the shape of the
        channel axes of `z` from `axis` on, when a channel is split over several axes."""
        channels = channels or (z.shape[axis],)
        axis %= z.ndim
        names = nonlinear.COMPLEX_NONLINEARITIES[self.nonlinearity]
        init = dict(DEFAULT_NONLINEARITY_INIT.get(self.nonlinearity, {}))
        init.update(self.nonlinearity_init or {})
        params = {}
        for name in names:
            if self.learn_nonlinearity:
                p = self.param(
                    f"rho_{name}", nn.initializers.constant(init[name]), (int(np.prod(channels)),)
                )
                params[name] = p.reshape(channels + (1,) * (z.ndim - axis - len(channels)))
            else:
                params[name] = init[name]
        return nonlinear.apply_complex_nonlinearity(self.nonlinearity, z, **params)

    def _parts(self, x: jax.Array, method: str) -> list[jax.Array]:
        """R(W U) as channel segments: [phi, rho(psi)] or [phi, psi, rho([phi; psi])], by the
        wavelet method `choose_method` resolved for this block."""
        channel_major = method in wavelets.CHANNEL_MAJOR
        axis = 1 if channel_major else -1
        transform = (
            wavelets.wavelet_transform_channel_major
            if channel_major
            else wavelets.wavelet_transform
        )
        phi, psi = transform(
            jnp.moveaxis(x, -1, 1) if channel_major else x,
            self.num_angles,
            self.filter_mode,
            method,
            precision=self.precision,
            full_angles=self.full_angles,
            backend=self.backend,
        )
        if channel_major:  # psi: [b, c, L, h', w'] -> rho -> [b, c L, h', w']
            flat = lambda z: z.reshape(z.shape[0], -1, *z.shape[3:])  # noqa: E731
            if self.block_type == "rho_psi":
                return [phi, flat(self._rho(psi, axis, psi.shape[1:3]))]
            w = jnp.concatenate([phi.astype(jnp.complex64), flat(psi)], axis=axis)
            return [phi, flat(psi), self._rho(w, axis)]
        if self.block_type == "rho_psi":
            return [phi, self._rho(psi)]
        # rho sees the complex concatenation [phi ; psi], as in the reference.
        w = jnp.concatenate([phi.astype(jnp.complex64), psi], axis=axis)
        return [phi, psi, self._rho(w, axis)]

    def _kernel_parts(self, x: jax.Array) -> list[jax.Array]:
        """R(W U) of the modulus, channel-major, with the moduli computed in the transform's
        kernel (`wavelet_kernel`): the complex wavelets reach HBM only where the block keeps
        them (linear_plus_rho)."""
        keep_psi = self.block_type == "linear_plus_rho"
        phi, psi, mod_phi, mod_psi = wavelet_kernel.coefficients(
            wavelets.zero_nonfinite_grad(jnp.moveaxis(x, -1, 1)),
            self.num_angles,
            self.filter_mode,
            self.precision,
            self.full_angles,
            wavelet_kernel.Outputs(psi=keep_psi, mod_phi=keep_psi, mod_psi=True),
            backend=self.backend,
            mesh=self.mesh,
        )
        flat = lambda z: z.reshape(z.shape[0], -1, *z.shape[3:])  # noqa: E731
        if not keep_psi:
            return [phi, flat(mod_psi)]
        return [phi, flat(psi), jnp.concatenate([mod_phi, flat(mod_psi)], axis=1)]

    def _device(self):
        """One of the chips the block is compiled for: the mesh's, else the host's."""
        if self.mesh is not None:
            return self.mesh.devices.flat[0]
        return jax.devices()[0] if (self.backend or jax.default_backend()) == "tpu" else None

    def _lanes_parts(self, x: jax.Array) -> tuple[list[jax.Array], moduli_kernel.ChannelOrder]:
        """R(W U) of the modulus, channels-last, from the kernel that holds channels on the
        TPU's lanes (`moduli_kernel`), and the order its per-angle channels come in."""
        keep_psi = self.block_type == "linear_plus_rho"
        phi, psi, mod_phi, mod_psi = moduli_kernel.coefficients(
            wavelets.zero_nonfinite_grad(x),
            self.num_angles,
            self.filter_mode,
            self.precision,
            self.full_angles,
            keep_psi,
            backend=self.backend,
            mesh=self.mesh,
        )
        parts = [phi, psi, mod_phi, mod_psi] if keep_psi else [phi, mod_psi]
        angles = mod_psi.shape[-1] // x.shape[-1]
        return parts, moduli_kernel.ChannelOrder(x.shape[-1], angles, keep_psi)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.block_type not in BLOCK_TYPES:
            raise ValueError(
                f"Unknown block_type {self.block_type!r}; valid choices: {BLOCK_TYPES}."
            )
        complex_ops.check_precision(self.precision)
        # The matmul and Pallas wavelet paths (TPUs) run channel-major, the layout their
        # matmuls want, and so does the rest of the block (statistics and projection contract
        # or reduce over the spatial axes there); the other paths stay channels-last, and so
        # does the Pallas kernel of a block whose channels fill the lanes (`moduli_kernel`).
        moduli_only = self.block_type == "rho_psi" and self.nonlinearity == "mod"
        lanes = (
            self.nonlinearity == "mod"
            and wavelets.kernel_on_lanes(x)
            and moduli_kernel.fits(
                x.shape,
                self.num_angles,
                self.filter_mode,
                self.full_angles,
                self.block_type == "linear_plus_rho",
                self._device(),
            )
        )
        method = (
            wavelets.choose_method(
                x.shape[1], x.shape[2], self.wavelet_method, self.backend, moduli_only, lanes
            )
            if x.ndim == 4
            else self.wavelet_method
        )
        order = None
        if method == "pallas" and lanes:
            channel_major, (segments, order) = False, self._lanes_parts(x)
        else:
            channel_major = method in wavelets.CHANNEL_MAJOR
            if method == "pallas" and self.nonlinearity == "mod":
                parts = self._kernel_parts(x)
            else:
                parts = self._parts(x, method)
            segments = _merge_segments(parts, 1 if channel_major else -1)
        axis = 1 if channel_major else -1
        stats = BatchStandardize(name="std", return_statistics=True, channel_axis=axis)(
            segments, use_running_average=not train, order=order
        )
        z = ComplexProjection(self.features, self.precision, axis, name="proj")(
            segments, stats, order, planes_apart=order is not None
        )
        z = nonlinear.normalize_pixels(z, axis)
        return jnp.moveaxis(z, 1, -1) if channel_major else z
