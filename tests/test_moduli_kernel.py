"""The channels-on-lanes kernel (`pcjax.nn.moduli_kernel`), run by Pallas's interpreter on this
host: its coefficients and moduli against the float64 oracle, its hand-written backward pass
against autodiff of the "matmul" path, its channel order, blocks of both types built on it
against blocks built on "matmul" (train and eval, one device and eight); and, compiled for a
TPU, its traffic in XLA's count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcjax.accelerators import targets
from pcjax.nn import layers, moduli_kernel, sampling, wavelets
from pcjax.training import sharding
from tests.support import float64_oracle


def _input(shape, seed):
    rng = np.random.default_rng(seed)
    re, im = rng.standard_normal(shape) + 0.5, rng.standard_normal(shape) - 0.3
    return jnp.asarray(re + 1j * im, jnp.complex64)


def _per_angle(psi, c, angles):
    """psi [b, h, w, c K] in the reference's order, moved into the kernel's order."""
    return psi[..., moduli_kernel.ChannelOrder(c, angles).permutation()[c:] - c]


@pytest.mark.parametrize(
    "shape,mode,keep_psi",
    [((2, 12, 10, 3), "standard", True), ((1, 9, 8, 256), "factorized_even", False)],
    ids=["one-tile-all-outputs", "two-tiles-moduli"],
)
def test_coefficients_match_the_float64_oracle(shape, mode, keep_psi):
    x = _input(shape, seed=1)
    phi, psi, mod_phi, mod_psi = jax.jit(
        lambda x: moduli_kernel.coefficients(x, 4, mode, keep_psi=keep_psi)
    )(x)
    want_phi, want_psi = float64_oracle.wavelet(np.asarray(x), 4, mode)
    want_psi = _per_angle(want_psi, shape[-1], 4)
    atol = 1e-5 * float(jnp.max(jnp.abs(x)))
    np.testing.assert_allclose(phi, want_phi, rtol=0, atol=atol)
    np.testing.assert_allclose(mod_psi, np.abs(want_psi), rtol=0, atol=atol)
    if keep_psi:
        np.testing.assert_allclose(psi, want_psi, rtol=0, atol=atol)
        np.testing.assert_allclose(mod_phi, np.abs(want_phi), rtol=0, atol=atol)
    else:
        assert psi is None and mod_phi is None


def test_channel_order_maps_back_and_forth():
    """Channel c + t K T + k T + l of the kernel's segments is the reference's c + (t T + l) K + k
    (tile t, angle k, lane l), and the two maps invert each other on random rows."""
    c, k, tile = 256, 8, moduli_kernel.LANES
    t, a, lane = 1, 5, 17
    for keep_psi in (False, True):
        order = moduli_kernel.ChannelOrder(c, k, keep_psi)
        perm = order.permutation()
        n = c * (k + 1)
        for start in (0, n) if keep_psi else (0,):  # [phi ; psi], then [|phi| ; |psi|]
            assert list(perm[start : start + c]) == list(range(start, start + c))
            got = perm[start + c + t * k * tile + a * tile + lane]
            assert got == start + c + (t * tile + lane) * k + a
        assert sorted(perm) == list(range(len(perm)))
        rows = jnp.asarray(np.random.default_rng(2).standard_normal((len(perm), 3, 2)))
        np.testing.assert_array_equal(order.from_stored(rows), np.asarray(rows)[perm])
        np.testing.assert_array_equal(order.to_stored(order.from_stored(rows)), rows)


@pytest.mark.parametrize("keep_psi", [False, True], ids=["rho_psi", "linear_plus_rho"])
def test_backward_pass_equals_autodiff_of_the_matmul_path(keep_psi):
    """The kernel's adjoint products and modulus derivative against XLA's autodiff of the
    per-axis matmul transform, for random cotangents of every output."""
    x = _input((2, 9, 12, 3), seed=3)
    c, angles = x.shape[-1], 4

    def reference(x):
        phi, psi = wavelets.wavelet_transform(x, angles, "standard", "matmul", False)
        psi = _per_angle(psi, c, angles)
        if not keep_psi:
            return phi, None, None, jnp.abs(psi)
        return phi, psi, jnp.abs(phi), jnp.abs(psi)

    def kernel(x):
        return moduli_kernel.coefficients(x, angles, "standard", keep_psi=keep_psi)

    rng = np.random.default_rng(4)
    cotangents = []
    for out in reference(x):
        ct = None if out is None else rng.standard_normal(out.shape)
        if out is not None and jnp.iscomplexobj(out):
            ct = ct + 1j * rng.standard_normal(out.shape)
        cotangents.append(None if ct is None else jnp.asarray(ct, out.dtype))

    def loss(f):
        def value(x):
            pairs = zip(cotangents, f(x), strict=True)
            return sum(jnp.real(jnp.vdot(c, o)) for c, o in pairs if c is not None)

        return value

    want = jax.jit(jax.grad(loss(reference)))(x)
    got = jax.jit(jax.grad(loss(kernel)))(x)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale)


def test_modulus_gradient_is_zero_where_a_coefficient_is_zero():
    """A zero channel has zero coefficients: the modulus's derivative is 0 there, not NaN."""
    x = _input((1, 8, 8, 2), seed=5).at[..., 1].set(0)

    def loss(x):
        return jnp.sum(moduli_kernel.coefficients(x, 4, "standard")[3])

    g = jax.jit(jax.grad(loss))(x)
    assert bool(jnp.all(jnp.isfinite(g.real)) and jnp.all(jnp.isfinite(g.imag)))
    assert float(jnp.max(jnp.abs(g[..., 1]))) == 0.0
    assert float(jnp.max(jnp.abs(g[..., 0]))) > 0.0


def test_auto_puts_blocks_whose_channels_fill_the_lanes_on_the_kernel():
    on_lanes = lambda c, dtype=jnp.complex64: wavelets.kernel_on_lanes(  # noqa: E731
        jnp.zeros((1, 4, 4, c), dtype)
    )
    assert on_lanes(256) and on_lanes(128) and on_lanes(64)  # 64: one tile, half full
    assert not on_lanes(32) and not on_lanes(192) and not on_lanes(128, jnp.float32)
    on_tpu = lambda **kw: wavelets.choose_method(14, 14, "auto", "tpu", **kw)  # noqa: E731
    assert on_tpu(moduli_only=True, lanes=True) == "pallas"
    assert on_tpu(moduli_only=True) == "matmul"
    assert on_tpu(lanes=True) == "pallas"  # linear_plus_rho with the modulus
    assert on_tpu() == "matmul"
    assert wavelets.choose_method(14, 14, "auto", "cpu", True, True) == "fft"


def _block_results(method, x, block_type="rho_psi", mesh=None):
    """A train step's output, batch statistics and gradients of a 128-channel block, then its
    eval output from the statistics that step stored."""
    block = layers.PhaseCollapseBlock(
        features=6,
        num_angles=4,
        filter_mode="factorized_odd",
        block_type=block_type,
        wavelet_method=method,
        mesh=mesh,
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
@pytest.mark.parametrize("block_type", layers.BLOCK_TYPES)
def test_block_on_the_kernel_equals_the_block_on_matmul(block_type):
    """Train-mode output, batch statistics (stored in the reference's channel order) and every
    gradient, then the eval output from those statistics; also with the batch split over the
    eight devices, each running the kernel on its share."""
    x = jnp.moveaxis(_input((8, moduli_kernel.LANES, 6, 6), seed=6), 1, -1)
    want = _block_results("matmul", x, block_type)
    mesh = sharding.make_mesh()
    placed = jax.device_put(x, sharding.batch_sharded(mesh))
    got_one = _block_results("pallas", x, block_type)
    for got in (got_one, _block_results("pallas", placed, block_type, mesh)):
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
        phi, _, _, mod = moduli_kernel.coefficients(x, 8, "standard", backend="tpu")
        return jnp.sum(jnp.abs(phi)) + jnp.sum(mod)

    compiled = jax.jit(jax.grad(loss)).lower(x).compile()
    assert "tpu_custom_call" in compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ho = sampling.output_size(m, True)
    tiled = lambda *s: 4 * int(np.prod(s[:-2])) * -(-s[-2] // 8) * 8 * s[-1]  # noqa: E731
    least = 2 * (
        2 * tiled(batch, m, m, c) + 2 * tiled(batch, ho, ho, c) + tiled(batch, ho, ho, 8 * c)
    )
    assert cost["bytes accessed"] >= least
    assert cost["flops"] > 0


def test_the_kernel_is_kept_to_what_fits_a_chips_vmem(monkeypatch):
    """Block 4 of the ImageNet net (56x56x128) fits a v5e core's 128 MiB of VMEM, not a v5p's
    64 (whose compiler refuses it: 68.7 MB needed); the 14x14 blocks fit both. A v4 core's
    16 MiB is left to the other paths. Off the TPU (the interpreter) nothing is refused."""
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    chip = {n: targets.devices(targets.get_target(n))[0] for n in ("v4-8", "v5e-8", "v5p-8")}
    block4, block7 = (16, 56, 56, 128), (16, 14, 14, 512)
    fits = lambda shape, device: moduli_kernel.fits(  # noqa: E731
        shape, 8, "factorized_even", False, False, device
    )
    assert fits(block4, chip["v5e-8"])
    assert not fits(block4, chip["v4-8"]) and not fits(block4, chip["v5p-8"])
    assert fits(block7, chip["v5e-8"]) and fits(block7, chip["v5p-8"])
    assert not fits(block7, chip["v4-8"])
    assert fits(block4, None) and fits(block4, jax.devices("cpu")[0])
