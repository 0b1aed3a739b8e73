"""The channels-on-lanes kernel (`pcjax.nn.moduli_kernel`), run by Pallas's interpreter on this
host: its low-pass and moduli against the float64 oracle, its hand-written backward pass
against autodiff of the "matmul" path, its channel order, the block built on it against the
block built on "matmul" (train and eval, one device and eight); and, compiled for a TPU, its
traffic in XLA's count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcjax.accelerators import targets
from pcjax.nn import layers, moduli_kernel, wavelets
from pcjax.training import sharding
from tests.support import float64_oracle


def _input(shape, seed):
    rng = np.random.default_rng(seed)
    re, im = rng.standard_normal(shape) + 0.5, rng.standard_normal(shape) - 0.3
    return jnp.asarray(re + 1j * im, jnp.complex64)


def _reference_moduli(psi, c, angles):
    """|psi| [b, h, w, c K] in the reference's order, moved into the kernel's order."""
    order = moduli_kernel.ChannelOrder(c, angles).permutation()[c:] - c
    return np.abs(np.asarray(psi))[..., order]


@pytest.mark.parametrize(
    "shape,mode",
    [((2, 12, 10, 3), "standard"), ((1, 9, 8, 256), "factorized_even")],
    ids=["one-tile", "two-tiles"],
)
def test_lowpass_and_moduli_match_the_float64_oracle(shape, mode):
    x = _input(shape, seed=1)
    phi, mod = jax.jit(lambda x: moduli_kernel.lowpass_and_moduli(x, 4, mode))(x)
    want_phi, want_psi = float64_oracle.wavelet(np.asarray(x), 4, mode)
    atol = 1e-5 * float(jnp.max(jnp.abs(x)))
    np.testing.assert_allclose(phi, want_phi, rtol=0, atol=atol)
    np.testing.assert_allclose(mod, _reference_moduli(want_psi, shape[-1], 4), rtol=0, atol=atol)


def test_channel_order_maps_back_and_forth():
    """Channel c + t K T + k T + l of the kernel's segments is the reference's c + (t T + l) K + k
    (tile t, angle k, lane l), and the two maps invert each other on random rows."""
    c, k, tile = 256, 8, moduli_kernel.LANES
    order = moduli_kernel.ChannelOrder(c, k)
    perm = order.permutation()
    t, a, lane = 1, 5, 17
    assert perm[c + t * k * tile + a * tile + lane] == c + (t * tile + lane) * k + a
    assert sorted(perm) == list(range(c * (k + 1)))
    rows = jnp.asarray(np.random.default_rng(2).standard_normal((c * (k + 1), 3, 2)))
    np.testing.assert_array_equal(order.from_stored(rows), np.asarray(rows)[perm])
    np.testing.assert_array_equal(order.to_stored(order.from_stored(rows)), rows)


def test_backward_pass_equals_autodiff_of_the_matmul_path():
    """The kernel's adjoint products and modulus derivative against XLA's autodiff of the
    per-axis matmul transform, for random cotangents of phi and of the moduli."""
    x = _input((2, 9, 12, 3), seed=3)
    c, angles = x.shape[-1], 4

    def reference(x):
        phi, psi = wavelets.wavelet_transform(x, angles, "standard", "matmul", False)
        order = moduli_kernel.ChannelOrder(c, angles).permutation()[c:] - c
        return phi, jnp.abs(psi)[..., order]

    rng = np.random.default_rng(4)
    phi, mod = reference(x)
    ct_phi = jnp.asarray(rng.standard_normal(phi.shape) + 1j * rng.standard_normal(phi.shape))
    ct_mod = jnp.asarray(rng.standard_normal(mod.shape), jnp.float32)

    def loss(f):
        def value(x):
            phi, mod = f(x)
            return jnp.real(jnp.vdot(ct_phi.astype(jnp.complex64), phi)) + jnp.sum(ct_mod * mod)

        return value

    want = jax.grad(loss(reference))(x)
    kernel = lambda x: moduli_kernel.lowpass_and_moduli(x, angles, "standard")  # noqa: E731
    got = jax.jit(jax.grad(loss(kernel)))(x)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale)


def test_modulus_gradient_is_zero_where_a_coefficient_is_zero():
    """A zero channel has zero coefficients: the modulus's derivative is 0 there, not NaN."""
    x = _input((1, 8, 8, 2), seed=5).at[..., 1].set(0)

    def loss(x):
        return jnp.sum(moduli_kernel.lowpass_and_moduli(x, 4, "standard")[1])

    g = jax.grad(loss)(x)
    assert bool(jnp.all(jnp.isfinite(g.real)) and jnp.all(jnp.isfinite(g.imag)))
    assert float(jnp.max(jnp.abs(g[..., 1]))) == 0.0
    assert float(jnp.max(jnp.abs(g[..., 0]))) > 0.0


def test_auto_puts_blocks_whose_channels_fill_the_lanes_on_the_kernel():
    assert wavelets.kernel_on_lanes(jnp.zeros((1, 4, 4, 256), jnp.complex64))
    assert not wavelets.kernel_on_lanes(jnp.zeros((1, 4, 4, 96), jnp.complex64))
    assert not wavelets.kernel_on_lanes(jnp.zeros((1, 4, 4, 128), jnp.float32))
    on_tpu = lambda **kw: wavelets.choose_method(14, 14, "auto", "tpu", **kw)  # noqa: E731
    assert on_tpu(moduli_only=True, lanes=True) == "pallas"
    assert on_tpu(moduli_only=True) == "matmul"
    assert on_tpu(lanes=True) == "matmul"  # the kernel writes moduli only
    assert wavelets.choose_method(14, 14, "auto", "cpu", True, True) == "fft"


def _block_results(method, x, mesh=None):
    """A train step's output, batch statistics and gradients of a 128-channel block, then its
    eval output from the statistics that step stored."""
    block = layers.PhaseCollapseBlock(
        features=6, num_angles=4, filter_mode="factorized_odd", wavelet_method=method, mesh=mesh
    )
    variables = block.init(jax.random.key(0), x, True)

    def loss(v, x):
        y, state = block.apply(v, x, True, mutable=["batch_stats"])
        return jnp.sum(jnp.abs(y) ** 2 * jnp.arange(y.shape[-1])), (y, state)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (y, state)), grads = step(variables, x)
    evaluated = jax.jit(lambda v, x: block.apply(v, x, False))({**variables, **state}, x)
    return jax.device_get((y, state, grads, evaluated))


@pytest.mark.slow
def test_block_on_the_kernel_equals_the_block_on_matmul():
    """Train-mode output, batch statistics (stored in the reference's channel order) and every
    gradient, then the eval output from those statistics; also with the batch split over the
    eight devices, each running the kernel on its share."""
    x = jnp.moveaxis(_input((8, moduli_kernel.LANES, 6, 6), seed=6), 1, -1)
    want = _block_results("matmul", x)
    mesh = sharding.make_mesh()
    placed = jax.device_put(x, sharding.batch_sharded(mesh))
    for got in (_block_results("pallas", x), _block_results("pallas", placed, mesh)):
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            # float32 sums over the 640 projected channels, in another order: the input's
            # gradient (through the statistics, where terms cancel) differs by ~7e-6 of its scale.
            scale = float(np.max(np.abs(w)))
            np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * scale)


@pytest.mark.slow
def test_kernel_compiles_for_a_tpu_and_its_traffic_is_counted(monkeypatch):
    """Mosaic lowers the forward and backward kernels for a compile-only v5e chip, and XLA's
    cost analysis includes their declared traffic: at least the input's planes, phi's and the
    moduli, each once per kernel."""
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    device = targets.devices(targets.get_target("v5e-4"))[0]
    place = jax.sharding.SingleDeviceSharding(device)
    batch, m, c = 4, 14, 256
    x = jax.ShapeDtypeStruct((batch, m, m, c), jnp.complex64, sharding=place)

    def loss(x):
        phi, mod = moduli_kernel.lowpass_and_moduli(x, 8, "standard", backend="tpu")
        return jnp.sum(jnp.abs(phi)) + jnp.sum(mod)

    compiled = jax.jit(jax.grad(loss)).lower(x).compile()
    assert "tpu_custom_call" in compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ho = wavelets.output_size(m, True)
    tiled = lambda *s: 4 * int(np.prod(s[:-2])) * -(-s[-2] // 8) * 8 * s[-1]  # noqa: E731
    least = 2 * (
        2 * tiled(batch, m, m, c) + 2 * tiled(batch, ho, ho, c) + tiled(batch, ho, ho, 8 * c)
    )
    assert cost["bytes accessed"] >= least
    assert cost["flops"] > 0
