"""The fused transform-and-modulus kernel (`pcjax.nn.wavelet_kernel`), run by Pallas's
interpreter on this host: its moduli against the float64 oracle, its hand-written backward
pass against autodiff of the "matmul" path, the block built on it against the block built on
"matmul"; and, compiled for a TPU, the kernel's traffic in XLA's count."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcjax.accelerators import compile_only, targets
from pcjax.configs import digits as digits_config
from pcjax.nn import layers, sampling, wavelet_kernel, wavelets
from pcjax.training import sharding, train
from tests.support import float64_oracle

OUTPUTS = [
    wavelet_kernel.Outputs(psi=True),
    wavelet_kernel.Outputs(psi=False, mod_psi=True),
    wavelet_kernel.Outputs(psi=True, mod_phi=True, mod_psi=True),
]
OUTPUT_IDS = ["linear", "rho_psi", "linear_plus_rho"]


def _input(shape, complex_input, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) + 0.5
    if complex_input:
        return jnp.asarray(x + 1j * (rng.standard_normal(shape) - 0.3), jnp.complex64)
    return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("mode", ["standard", "factorized_even"])
@pytest.mark.parametrize("complex_input", [False, True], ids=["real", "complex"])
def test_moduli_match_the_float64_oracle(mode, complex_input):
    x = _input((2, 3, 12, 10), complex_input, seed=1)
    _, _, mod_phi, mod_psi = jax.jit(
        lambda x: wavelet_kernel.coefficients(x, 4, mode, outputs=OUTPUTS[2])
    )(x)
    want_phi, want_psi = float64_oracle.wavelet(np.moveaxis(np.asarray(x), 1, -1), 4, mode)
    b, ho, wo, _ = want_psi.shape
    want_psi = np.moveaxis(want_psi.reshape(b, ho, wo, 3, 4), (3, 4), (1, 2))
    atol = 1e-5 * float(jnp.max(jnp.abs(x)))
    np.testing.assert_allclose(mod_phi, np.abs(np.moveaxis(want_phi, -1, 1)), rtol=0, atol=atol)
    np.testing.assert_allclose(mod_psi, np.abs(want_psi), rtol=0, atol=atol)


@pytest.mark.parametrize("outputs", OUTPUTS, ids=OUTPUT_IDS)
@pytest.mark.parametrize("complex_input", [False, True], ids=["real", "complex"])
def test_backward_pass_equals_autodiff_of_the_matmul_path(outputs, complex_input):
    """The kernel's adjoint products and modulus derivative against XLA's autodiff of the
    per-axis matmul transform, for random cotangents of every output."""
    x = _input((2, 3, 9, 12), complex_input, seed=2)

    def reference(x):
        phi, psi = wavelets.wavelet_transform_channel_major(
            x, 4, "standard", "matmul", guard_gradients=False
        )
        return (
            phi,
            psi if outputs.psi else None,
            jnp.abs(phi.astype(jnp.complex64)) if outputs.mod_phi else None,
            jnp.abs(psi) if outputs.mod_psi else None,
        )

    def kernel(x):
        return wavelet_kernel.coefficients(x, 4, "standard", outputs=outputs)

    rng = np.random.default_rng(3)
    cotangents = []
    for out in reference(x):
        if out is None:
            cotangents.append(None)
            continue
        ct = rng.standard_normal(out.shape)
        if jnp.iscomplexobj(out):
            ct = ct + 1j * rng.standard_normal(out.shape)
        cotangents.append(jnp.asarray(ct, out.dtype))

    def loss(f):
        def value(x):
            pairs = zip(cotangents, f(x), strict=True)
            return sum(jnp.real(jnp.vdot(c, o)) for c, o in pairs if c is not None)

        return value

    want = jax.jit(jax.grad(loss(reference)))(x)
    got = jax.jit(jax.grad(loss(kernel)))(x)
    # Two float32 evaluations of sums of ~10^3 terms of O(1): round-off of a few 1e-7.
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale)


def test_modulus_gradient_is_zero_where_a_coefficient_is_zero():
    """A zero channel has zero coefficients: the modulus's derivative is 0 there, as
    `jnp.abs`'s, not NaN."""
    x = _input((1, 2, 8, 8), True, seed=4).at[:, 1].set(0)

    def loss(x):
        _, _, _, mod_psi = wavelet_kernel.coefficients(x, 4, "standard", outputs=OUTPUTS[1])
        return jnp.sum(mod_psi)

    g = jax.jit(jax.grad(loss))(x)
    assert bool(jnp.all(jnp.isfinite(g.real)) and jnp.all(jnp.isfinite(g.imag)))
    assert float(jnp.max(jnp.abs(g[:, 1]))) == 0.0
    assert float(jnp.max(jnp.abs(g[:, 0]))) > 0.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "block_type,complex_input", [("rho_psi", True), ("linear_plus_rho", False)]
)
def test_block_on_the_kernel_equals_the_block_on_matmul(block_type, complex_input):
    """Output, batch statistics and every gradient of a train-mode block: a complex input to
    the moduli-only block (every block but the first), an image to the block that also keeps
    the wavelets and the modulus of a real low-pass (the kernel's other branches)."""
    x = jnp.moveaxis(_input((4, 3, 12, 12), complex_input, seed=5), 1, -1)
    results = []
    for method in ("matmul", "pallas"):
        block = layers.PhaseCollapseBlock(
            features=5,
            num_angles=4,
            filter_mode="standard",
            block_type=block_type,
            wavelet_method=method,
        )
        variables = block.init(jax.random.key(0), x, True)

        def loss(v, x, block=block):
            y, state = block.apply(v, x, True, mutable=["batch_stats"])
            return jnp.sum(jnp.abs(y) ** 2 * jnp.arange(y.shape[-1])), (y, state)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        (_, aux), grads = step(variables, x)
        results.append((aux, grads))
    for want, got in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, rtol=0, atol=3e-6 * scale)


@pytest.mark.slow
def test_train_steps_on_eight_devices_equal_the_matmul_path():
    """The step builder's programs on 8 devices: each runs the kernel on its share of the batch
    (a shard_map over the mesh), the state's initialisation on the whole of its two images."""
    assert jax.device_count() == 8
    cfg = digits_config.get_config("smoke")
    cfg.model.widths = (4, 8)
    cfg.data.global_batch_size = 16
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(6)
    batches = [
        {
            "image": rng.standard_normal((16, 16, 16, 1)).astype(np.float32),
            "label": rng.integers(0, 10, 16).astype(np.int32),
        }
        for _ in range(2)
    ]
    results = []
    for method in ("matmul", "pallas"):
        cfg.model.wavelet_method = method
        steps = train.build_steps(cfg, mesh, steps_per_epoch=10, image_shape=(16, 16, 1))
        state = steps.init(jax.random.key(0))
        for batch in batches:
            state, metrics = steps.train_step(state, sharding.shard_batch(batch, mesh))
        results.append(jax.device_get((state.params, state.batch_stats, metrics)))
    for want, got in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(scale, 1.0))


@pytest.mark.slow
def test_kernel_compiles_for_a_tpu_and_its_traffic_is_counted(monkeypatch):
    """Mosaic lowers the forward and backward kernels for a compile-only v5e chip, and XLA's
    cost analysis of the program includes the kernels' declared traffic: at least the input,
    the outputs and their cotangents, each once, at their tiled sizes."""
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    device = targets.devices(targets.get_target("v5e-4"))[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    batch, c, m = 4, 8, 32
    x = jax.ShapeDtypeStruct((batch, c, m, m), jnp.complex64, sharding=sharding)

    def loss(x):
        phi, _, _, mod_psi = wavelet_kernel.coefficients(
            x, 8, "standard", outputs=OUTPUTS[1], backend="tpu"
        )
        return jnp.sum(jnp.abs(phi)) + jnp.sum(mod_psi)

    lowered = jax.jit(jax.grad(loss)).lower(x)
    # The compile cache's key ignores the kernels' source locations, not their bodies.
    text = lowered.as_text()
    moved = re.sub(r"(debug_locations\\22: \\22)[^\\]*", r"\1QUJD", text)
    assert moved != text
    assert compile_only.program_key(moved) == compile_only.program_key(text)
    renamed = text.replace("wavelet_modulus_bwd", "wavelet_modulus_bwe")
    assert compile_only.program_key(renamed) != compile_only.program_key(text)
    compiled = lowered.compile()
    assert "tpu_custom_call" in compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ho = sampling.output_size(m, True)
    tiled = lambda *s: 4 * int(np.prod(s[:-2])) * -(-s[-2] // 8) * 8 * -(-s[-1] // 128) * 128  # noqa: E731
    least = 2 * (
        2 * tiled(batch, c, m, m)  # the input's planes, in and out of both kernels
        + 2 * tiled(batch, c, ho, ho)  # phi's planes
        + tiled(batch, c, 8, ho, ho)  # |psi|
    )
    assert cost["bytes accessed"] >= least
    assert cost["flops"] > 0
