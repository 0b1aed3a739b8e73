"""Complex projections, real-pair storage, semi-unitary init, and SGD on complex weights.

Projections run at the "highest" precision policy (float32 products) unless a test names another.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pcjax.nn import complex_ops


def test_pair_roundtrip_and_interleave():
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((2, 3)) + 1j * rng.standard_normal((2, 3))).astype(np.complex64)
    np.testing.assert_array_equal(complex_ops.to_complex(complex_ops.to_pair(z)), z)
    inter = np.asarray(complex_ops.interleave_real_imag(jnp.asarray(z)))
    np.testing.assert_array_equal(inter[:, 0::2], z.real)
    np.testing.assert_array_equal(inter[:, 1::2], z.imag)


@pytest.mark.parametrize("complex_input", [True, False])
def test_projection_matches_complex_matmul(complex_input):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 5, 6))
    if complex_input:
        x = x + 1j * rng.standard_normal((4, 5, 6))
    w = rng.standard_normal((6, 3)) + 1j * rng.standard_normal((6, 3))
    kernel = np.stack([w.real, w.imag], -1).astype(np.float32)
    got = complex_ops.complex_projection(
        jnp.asarray(x.astype(np.complex64 if complex_input else np.float32)), jnp.asarray(kernel)
    )
    # float32 matmul over 2 x 6 terms of O(1) values.
    np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-5)
    low = complex_ops.complex_projection(
        jnp.asarray(x.astype(np.complex64 if complex_input else np.float32)),
        jnp.asarray(kernel),
        "bf16",
    )
    # bfloat16 operands keep 8 bits of mantissa: ~1e-2 relative.
    np.testing.assert_allclose(low, x @ w, rtol=5e-2, atol=5e-2)


def test_projection_rejects_bad_kernel_and_precision():
    with pytest.raises(ValueError, match="c_in=4"):
        complex_ops.complex_projection(jnp.ones((2, 4)), jnp.ones((3, 2, 2)))
    with pytest.raises(ValueError, match=r"'fp8'.*\('highest', 'default', 'bf16'\)"):
        complex_ops.complex_projection(jnp.ones((2, 3)), jnp.ones((3, 2, 2)), "fp8")


def _standardize_then_project_inputs(ratio, seed):
    """Complex channels with |mean| / std = `ratio` (moduli reach 10), a semi-unitary kernel."""
    rng = np.random.default_rng(seed)
    c_in, c_out, n = 64, 16, 512
    std = rng.uniform(0.5, 2.0, c_in)
    mean = ratio * std * np.exp(2j * np.pi * rng.uniform(size=c_in))
    x = mean + std * (rng.standard_normal((n, c_in)) + 1j * rng.standard_normal((n, c_in))) / 2
    kernel = np.asarray(complex_ops.semi_unitary_host(np.array([seed]), c_in, c_out))
    w = kernel[..., 0].astype(np.float64) + 1j * kernel[..., 1]
    mu, sd = x.mean(0), np.sqrt((np.abs(x - x.mean(0)) ** 2).mean(0))
    want = ((x - mu) / sd) @ w
    args = ([jnp.asarray(x.astype(np.complex64))], jnp.asarray(kernel))
    stats = dict(
        means=[jnp.asarray(mu.astype(np.complex64))], scales=jnp.asarray(1 / sd, jnp.float32)
    )
    return args, stats, want


@pytest.mark.parametrize("ratio", [0.5, 2.0, 10.0])
def test_centring_before_projection_keeps_error_at_float32_and_bf16_rounding(ratio):
    """Standardise-then-project against float64, channels with |mean| / std from 0.5 to 10.

    Centred before the matmul (and before the bf16 cast), the error is that of rounding the
    centred, O(1) values: float32 ~1e-7, bf16 ~2^-9 = 2e-3 relative to max |y|, whatever the
    ratio. Folding the mean into a bias m W instead would grow with the ratio (2.5e-2 in bf16 at
    10). Bounds: 2e-6 (float32 over 128 real terms) and 8e-3 (bf16 operands, float32 sums).
    """
    args, stats, want = _standardize_then_project_inputs(ratio, seed=int(ratio * 10))
    scale = np.abs(want).max()
    errors = {}
    for precision, bound in [("highest", 2e-6), ("bf16", 8e-3)]:
        got = complex_ops.project_segments(*args, precision, **stats)
        errors[precision] = np.abs(np.asarray(got) - want).max() / scale
        assert errors[precision] < bound, (precision, ratio, errors[precision])
    if ratio == 10.0:
        # The folded form x (W / std) - m (W / std), bf16 operands: several times worse.
        (x,), kernel = args
        w = kernel * stats["scales"][:, None, None]
        folded = complex_ops.project_segments([x], w, "bf16") - complex_ops.project_segments(
            [stats["means"][0][None]], w, "highest"
        )
        folded_err = np.abs(np.asarray(folded) - want).max() / scale
        assert folded_err > 3 * errors["bf16"], (folded_err, errors["bf16"])


@pytest.mark.parametrize("c_in,c_out", [(12, 5), (5, 12), (7, 7)])
def test_semi_unitary_init(c_in, c_out):
    k = np.asarray(complex_ops.semi_unitary_init(jax.random.key(3), c_in, c_out))
    assert k.shape == (c_in, c_out, 2) and k.dtype == np.float32
    w = (k[..., 0] + 1j * k[..., 1]).T  # reference layout W in C^{c_out x c_in}
    if c_out <= c_in:
        np.testing.assert_allclose(w @ w.conj().T, np.eye(c_out), atol=1e-5)
    else:
        np.testing.assert_allclose(w.conj().T @ w, np.eye(c_in), atol=1e-5)
    # Genuinely complex: imaginary parts are not negligible.
    assert np.abs(k[..., 1]).mean() > 0.1 * np.abs(k[..., 0]).mean()


def test_semi_unitary_init_is_the_host_computation_under_jit_eval_shape_and_vmap():
    """The kernel is NumPy's float64 SVD result rounded to float32, bit for bit, however called."""
    key = jax.random.key(7)
    want = complex_ops.semi_unitary_host(np.asarray(jax.random.key_data(key)), 9, 4)
    np.testing.assert_array_equal(complex_ops.semi_unitary_init(key, 9, 4), want)
    init = jax.jit(lambda k: complex_ops.semi_unitary_init(k, 9, 4))
    np.testing.assert_array_equal(init(key), want)
    shape = jax.eval_shape(lambda k: complex_ops.semi_unitary_init(k, 9, 4), key)
    assert shape.shape == (9, 4, 2) and shape.dtype == jnp.float32
    keys = jax.random.split(key, 3)
    stacked = jax.vmap(lambda k: complex_ops.semi_unitary_init(k, 9, 4))(keys)
    for i in range(3):
        np.testing.assert_array_equal(stacked[i], complex_ops.semi_unitary_init(keys[i], 9, 4))
    assert not np.array_equal(stacked[0], stacked[1])
    # Legacy uint32 keys give the same kernel as the typed key with the same words.
    raw = jax.random.key_data(key)
    np.testing.assert_array_equal(complex_ops.semi_unitary_init(raw, 9, 4), want)


def test_plain_sgd_on_real_pairs_solves_complex_least_squares():
    """Real-pair storage makes jax.grad the descent direction: plain optax.sgd converges."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((64, 6)) + 1j * rng.standard_normal((64, 6))) / np.sqrt(2)
    w_true = rng.standard_normal((6, 3)) + 1j * rng.standard_normal((6, 3))
    y = x @ w_true
    xj, yj = jnp.asarray(x.astype(np.complex64)), jnp.asarray(y.astype(np.complex64))

    def loss(kernel):
        return jnp.mean(jnp.abs(complex_ops.complex_projection(xj, kernel) - yj) ** 2)

    kernel = complex_ops.semi_unitary_init(jax.random.key(0), 6, 3)
    opt = optax.sgd(0.3)
    state = opt.init(kernel)

    @jax.jit
    def step(kernel, state):
        g = jax.grad(loss)(kernel)
        updates, state = opt.update(g, state)
        return optax.apply_updates(kernel, updates), state

    start = float(loss(kernel))
    for _ in range(300):
        kernel, state = step(kernel, state)
    assert float(loss(kernel)) < 1e-6 * start
    np.testing.assert_allclose(complex_ops.to_complex(kernel), w_true, atol=1e-3)


def test_segments_projection_equals_promoted_concatenation():
    """Real segments (moduli) use half the multiplications; results equal the promoted product."""
    rng = np.random.default_rng(5)
    parts = [
        rng.standard_normal((3, 4, 2)).astype(np.float32),
        (rng.standard_normal((3, 4, 5)) + 1j * rng.standard_normal((3, 4, 5))).astype(np.complex64),
        rng.standard_normal((3, 4, 3)).astype(np.float32),
    ]
    w = rng.standard_normal((10, 6)) + 1j * rng.standard_normal((10, 6))
    kernel = jnp.asarray(np.stack([w.real, w.imag], -1).astype(np.float32))
    got = complex_ops.project_segments([jnp.asarray(p) for p in parts], kernel)
    full = np.concatenate([p.astype(np.complex128) for p in parts], -1)
    np.testing.assert_allclose(got, full @ w, rtol=1e-5, atol=1e-5)
    packed = complex_ops.pack_kernel(kernel, [(2, False), (5, True), (3, False)])
    assert packed.shape == (2 + 2 * 5 + 3, 12)
    # Per-channel means, subtracted as a bias on the packed kernel.
    means = [
        rng.standard_normal(2).astype(np.float32),
        (rng.standard_normal(5) + 1j * rng.standard_normal(5)).astype(np.complex64),
        rng.standard_normal(3).astype(np.float32),
    ]
    got = complex_ops.project_segments(
        [jnp.asarray(p) for p in parts], kernel, means=[jnp.asarray(m) for m in means]
    )
    m_full = np.concatenate([m.astype(np.complex128) for m in means])
    np.testing.assert_allclose(got, (full - m_full) @ w, rtol=1e-5, atol=1e-5)
