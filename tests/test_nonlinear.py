"""Non-linearities against float64 NumPy formulas, and finite gradients at z = 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcjax.nn import nonlinear

EPS = 1e-6


def _random_complex(rng, shape, scale=1.0):
    return (scale * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))).astype(
        np.complex64
    )


# Independent float64 transcriptions of docs/spec.md 2.4.
def _oracle(name, z, p):
    r = np.abs(z)
    if name == "mod":
        return r
    if name == "cst":
        return np.maximum(1 - p["threshold"] / (r + EPS), 0) * z
    if name == "mc":
        return z / (r + EPS)
    if name == "ms":
        return 1 / (1 + np.exp(-(p["gain"] * r + p["bias"]))) / (r + EPS) * z
    if name == "tanh":
        return np.tanh(r) / (r + EPS) * z
    if name == "pow":
        t = np.exp(p["bias"]) * r ** p["gain"]
        return t / ((1 + t) * (r + EPS)) * z
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(nonlinear.COMPLEX_NONLINEARITIES))
def test_complex_nonlinearity_matches_formula(name):
    rng = np.random.default_rng(1)
    z = _random_complex(rng, (5, 7), scale=0.7)
    c = z.shape[-1]
    # Per-channel parameters, random so a broadcasting mistake cannot hide.
    params = {
        k: rng.uniform(0.05, 0.9, c).astype(np.float32)
        for k in nonlinear.COMPLEX_NONLINEARITIES[name]
    }
    got = np.asarray(nonlinear.apply_complex_nonlinearity(name, jnp.asarray(z), **params))
    want = _oracle(
        name, z.astype(np.complex128), {k: v.astype(np.float64) for k, v in params.items()}
    )
    # float32 evaluation of O(1) quantities: a few ulps.
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert got.dtype == (np.float32 if name == "mod" else np.complex64)


@pytest.mark.parametrize("name", list(nonlinear.COMPLEX_NONLINEARITIES))
def test_complex_nonlinearity_gradient_finite_at_zero(name):
    rng = np.random.default_rng(2)
    z = _random_complex(rng, (6,))
    z[:3] = 0  # exact zeros are where a hand-written modulus would give NaN
    params = {k: jnp.full((6,), 0.5) for k in nonlinear.COMPLEX_NONLINEARITIES[name]}

    def loss(z, params):
        out = nonlinear.apply_complex_nonlinearity(name, z, **params)
        return jnp.sum(jnp.abs(out) ** 2 + jnp.real(out))

    gz, gp = jax.grad(loss, argnums=(0, 1))(jnp.asarray(z), params)
    assert np.all(np.isfinite(np.asarray(gz)))
    for g in jax.tree_util.tree_leaves(gp):
        assert np.all(np.isfinite(np.asarray(g)))


def test_modulus_gradient_values():
    # d|z|/dz at 3 + 4i: JAX returns the conjugate of PyTorch's 0.6 + 0.8i; 0 at z = 0.
    g = jax.grad(lambda z: nonlinear.modulus(z))(jnp.complex64(3 + 4j))
    np.testing.assert_allclose(g, 0.6 - 0.8j, rtol=1e-6)
    assert jax.grad(lambda z: nonlinear.modulus(z))(jnp.complex64(0)) == 0


@pytest.mark.parametrize("name", list(nonlinear.REAL_NONLINEARITIES))
def test_real_nonlinearity_matches_formula(name):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 9)).astype(np.float32) * 2
    b = rng.uniform(0.2, 1.5, 9).astype(np.float32)
    oracle = {
        "relu": np.maximum(x, 0),
        "abs": np.abs(x),
        "thresh": np.maximum(x - b, 0) - np.maximum(-x - b, 0),
        "tanh": np.tanh(x),
        "powfixed": x / (1 + np.abs(x)),
    }[name]
    params = {"threshold": b} if name == "thresh" else {}
    got = nonlinear.apply_real_nonlinearity(name, jnp.asarray(x), **params)
    np.testing.assert_allclose(got, oracle, rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda x: jnp.sum(nonlinear.apply_real_nonlinearity(name, x, **params)))(
        jnp.zeros(9)
    )
    assert np.all(np.isfinite(np.asarray(g)))


def test_normalize_pixels_unit_norm_and_zero_pixel():
    rng = np.random.default_rng(4)
    x = _random_complex(rng, (2, 3, 3, 5))
    x[0, 1, 1] = 0
    y = np.asarray(nonlinear.normalize_pixels(jnp.asarray(x)))
    want = x / np.linalg.norm(x.astype(np.complex128), axis=-1, keepdims=True).clip(1e-300)
    mask = np.ones((2, 3, 3), bool)
    mask[0, 1, 1] = False
    np.testing.assert_allclose(y[mask], want[mask], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(y[mask], axis=-1), 1, rtol=1e-5)
    assert np.all(y[0, 1, 1] == 0)
    g = jax.grad(lambda x: jnp.sum(jnp.real(nonlinear.normalize_pixels(x))))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(g)))


def test_bad_names_and_types():
    with pytest.raises(ValueError, match="valid choices"):
        nonlinear.apply_complex_nonlinearity("relu", jnp.ones(2, jnp.complex64))
    with pytest.raises(ValueError, match="complex input"):
        nonlinear.apply_complex_nonlinearity("mod", jnp.ones(2))
    with pytest.raises(ValueError, match="real input"):
        nonlinear.apply_real_nonlinearity("relu", jnp.ones(2, jnp.complex64))
