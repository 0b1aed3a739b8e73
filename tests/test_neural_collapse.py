"""Neural-collapse measures against float64 NumPy oracles written from Papyan, Han & Donoho (2020).

The oracle forms the d x d covariances, Sigma_B's pseudo-inverse and the pairwise cosines
directly; the library streams K x K sums in float32 and never builds a d x d matrix.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcjax import analysis
from pcjax.analysis import neural_collapse as nc


def _oracle(h, y, k, w=None, pred=None):
    """NC1-NC4 of real features h [n, d] (float64), class-balanced global mean."""
    h = np.asarray(h, np.float64)
    mus = np.stack([h[y == c].mean(axis=0) for c in range(k)])
    mu_g = mus.mean(axis=0)
    resid = h - mus[y]
    sigma_w = resid.T @ resid / len(y)
    centred = mus - mu_g
    sigma_b = centred.T @ centred / k
    out = {"nc1": np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10, hermitian=True)) / k}
    norms = np.linalg.norm(centred, axis=1)
    out["nc2_equinorm"] = norms.std() / norms.mean()
    cos = [
        centred[a] @ centred[b] / (norms[a] * norms[b]) for a in range(k) for b in range(a + 1, k)
    ]
    out["nc2_equiangularity"] = np.std(cos)
    out["nc2_max_angle"] = np.mean(np.abs(np.array(cos) + 1 / (k - 1)))
    if w is not None:
        out["nc3"] = np.linalg.norm(w / np.linalg.norm(w) - centred / np.linalg.norm(centred))
    if pred is not None:
        dist = ((h[:, None, :] - mus[None]) ** 2).sum(-1)
        out["nc4"] = np.mean(dist.argmin(axis=1) == pred)
    return out


def _stream(features, labels, k, pred, batch=16, classifier=None):
    """The library path: pass 1 class means, pass 2 collapse sums; padded, masked batches."""
    n = len(labels)
    pad = (-n) % batch
    x = np.concatenate([features, np.zeros((pad,) + features.shape[1:], features.dtype)])
    y = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    p = np.concatenate([pred, np.zeros(pad, pred.dtype)])
    m = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    dtype = jnp.complex64 if np.iscomplexobj(features) else jnp.float32
    stats = analysis.init_stats(k, x.shape[1], dtype)
    update = jax.jit(analysis.update_stats)
    for i in range(0, len(y), batch):
        stats = update(stats, x[i : i + batch], y[i : i + batch], m[i : i + batch])
    fin = analysis.finalize(stats)
    collapse = nc.init_collapse_stats(k)
    for i in range(0, len(y), batch):
        sl = slice(i, i + batch)
        collapse = nc.update_collapse_stats_jit(
            collapse, x[sl], y[sl], fin["class_means"], fin["class_present"], p[sl], m[sl]
        )
    return nc.finalize_neural_collapse(
        fin["class_means"], fin["class_present"], collapse, classifier
    )


def _structured(rng, n, k, d, spread, offset=0.0):
    """Unbalanced classes around random means, anisotropic noise, a common offset."""
    y = rng.choice(k, size=n, p=rng.dirichlet(np.full(k, 5.0)))
    y[:k] = np.arange(k)  # every class present
    means = rng.normal(size=(k, d)) * 2.0
    scales = rng.uniform(0.2, 1.5, size=d) * spread
    h = offset + means[y] + rng.normal(size=(n, d)) * scales
    return h, y


@pytest.mark.parametrize("k,d", [(3, 5), (5, 12), (10, 40)])
def test_real_features_match_oracle(k, d):
    rng = np.random.default_rng(k * 100 + d)
    h, y = _structured(rng, 203, k, d, spread=0.7)
    w = rng.normal(size=(k, d))
    pred = np.where(rng.uniform(size=len(y)) < 0.7, y, rng.integers(0, k, len(y)))
    got = _stream(h.astype(np.float32), y.astype(np.int32), k, pred.astype(np.int32), classifier=w)
    want = _oracle(h.astype(np.float32), y, k, w, pred)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=2e-4, atol=1e-6, err_msg=key)
    assert 0 < got["nc1"] and 0 < got["nc4"] < 1


def test_complex_features_are_vectors_of_r2d():
    rng = np.random.default_rng(7)
    k, d = 4, 6
    h, y = _structured(rng, 150, k, 2 * d, spread=0.5)
    z = (h[:, :d] + 1j * h[:, d:]).astype(np.complex64)
    w = rng.normal(size=(k, 2 * d))  # acts on [Re z, Im z]
    pred = rng.integers(0, k, len(y)).astype(np.int32)
    got = _stream(z, y.astype(np.int32), k, pred, classifier=w)
    real = np.concatenate([z.real, z.imag], axis=1)
    want = _oracle(real, y, k, w, pred)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=2e-4, atol=1e-6, err_msg=key)


def test_large_common_offset_does_not_cancel():
    """Features far from the origin (as unit-norm maps are): float32 streams stay accurate."""
    rng = np.random.default_rng(3)
    k, d = 5, 8
    h, y = _structured(rng, 300, k, d, spread=0.3, offset=300.0)
    pred = y.astype(np.int32)
    got = _stream(h.astype(np.float32), y.astype(np.int32), k, pred)
    want = _oracle(h.astype(np.float32), y, k, pred=pred)
    np.testing.assert_allclose(got["nc1"], want["nc1"], rtol=5e-3)
    assert got["nc4"] == want["nc4"]


def test_exact_collapse_gives_zeros():
    """Features equal to a simplex ETF's vertices: NC1 = NC2 = NC3 = 0 and NC4 = 1."""
    k, d = 6, 9
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(d, k)))[0]  # orthonormal columns
    etf = (np.eye(k) - 1 / k) @ basis.T * 3.0  # centred, equinorm, cos = -1/(K-1)
    y = np.repeat(np.arange(k), 7).astype(np.int32)
    h = (etf[y] + 5.0).astype(np.float32)
    got = _stream(h, y, k, y, classifier=etf)
    for key in ("nc1", "nc2_equinorm", "nc2_equiangularity", "nc2_max_angle", "nc3"):
        assert abs(got[key]) < 1e-5, (key, got[key])
    assert got["nc4"] == 1.0


def test_update_is_compiled_once_per_shape():
    rng = np.random.default_rng(1)
    k, d, b = 3, 4, 8
    means = jnp.asarray(rng.normal(size=(k, d)), jnp.float32)
    present = jnp.ones(k, bool)
    before = nc.update_collapse_stats_jit._cache_size()
    stats = nc.init_collapse_stats(k)
    for _ in range(3):
        x = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
        y = jnp.asarray(rng.integers(0, k, b), jnp.int32)
        stats = nc.update_collapse_stats_jit(stats, x, y, means, present, y, jnp.ones(b))
    assert nc.update_collapse_stats_jit._cache_size() - before <= 1


def test_phase_collapse_classifier_matches_the_head():
    """W @ flatten(head/bn output) + b reproduces the network's logits."""
    from pcjax.configs import digits, schema

    cfg = digits.get_config()
    cfg.model.widths = (4, 6)
    model = schema.build_model(cfg).clone(num_classes=5)
    x = jax.random.normal(jax.random.key(0), (3, 16, 16, 1))
    variables = model.init(jax.random.key(1), x, train=False)
    feats, logits = analysis.capture_with_output(model, variables, x, [nc.CLASSIFIER_LAYER])
    h = feats[nc.CLASSIFIER_LAYER]
    w = nc.phase_collapse_classifier(variables, h.shape[1:])
    bias = np.asarray(variables["params"]["head"]["linear"]["bias"])
    flat = np.asarray(h, np.float64).reshape(3, -1)
    np.testing.assert_allclose(flat @ w.T + bias, np.asarray(logits), rtol=1e-4, atol=1e-4)
