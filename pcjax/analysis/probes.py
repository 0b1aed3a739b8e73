"""Linear probes: multinomial logistic regression on (sketched, real-ified) layer features."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pcjax.analysis.separation_stats import _HIGHEST


def realify(features: jax.Array) -> jax.Array:
    """complex[n, d] -> real[n, 2d] = [Re u, Im u]; real features are returned unchanged."""
    x = features.reshape(features.shape[0], -1)
    if jnp.iscomplexobj(x):
        return jnp.concatenate([x.real, x.imag], axis=1)
    return x


def count_sketch(x: jax.Array, out_dim: int, seed: int = 0) -> jax.Array:
    """Sparse random projection real[n, D] -> real[n, out_dim] (identity if D <= out_dim).

    Count sketch: coordinate j goes to bucket h(j) ~ U{0..out_dim-1} with sign s(j) = +-1,
    y_k = sum_{j: h(j) = k} s(j) x_j. It is linear, E[<Sx, Sx'>] = <x, x'> (a Johnson-Lindenstrauss
    embedding), costs O(n D) and needs O(D) memory instead of a dense D x out_dim matrix. The
    hash depends only on (seed, D, out_dim), so train and test features get the same projection.
    """
    dim = x.shape[1]
    if dim <= out_dim:
        return x
    k_bucket, k_sign = jax.random.split(jax.random.key(seed))
    bucket = jax.random.randint(k_bucket, (dim,), 0, out_dim)
    sign = jax.random.rademacher(k_sign, (dim,), dtype=x.dtype)
    return jnp.zeros((x.shape[0], out_dim), x.dtype).at[:, bucket].add(x * sign)


def probe_features(features: jax.Array, max_dim: int | None = 2048, seed: int = 0) -> jax.Array:
    """Linear-probe input: `realify`, then `count_sketch` to at most `max_dim` (None: no cap)."""
    x = realify(features)
    return x if max_dim is None else count_sketch(x, max_dim, seed)


def _fit_logistic_regression(
    x: jax.Array, y: jax.Array, num_classes: int, steps: int, l2: float
) -> tuple[jax.Array, jax.Array]:
    """Full-batch L-BFGS on mean cross-entropy + (l2/2) ||W||_F^2 (bias not penalised)."""

    def loss(params: tuple[jax.Array, jax.Array]) -> jax.Array:
        w, b = params
        logits = jnp.matmul(x, w, precision=_HIGHEST) + b
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + 0.5 * l2 * jnp.sum(jnp.square(w))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)
    params = (jnp.zeros((x.shape[1], num_classes), x.dtype), jnp.zeros((num_classes,), x.dtype))

    def body(_: int, carry: tuple[Any, Any]) -> tuple[Any, Any]:
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(params, updates), state

    params, _ = jax.lax.fori_loop(0, steps, body, (params, opt.init(params)))
    return params


_fit_logistic_regression_jit = jax.jit(_fit_logistic_regression, static_argnums=(2, 3))


def linear_probe_accuracy(
    train_feats: jax.Array | np.ndarray,
    train_labels: jax.Array | np.ndarray,
    test_feats: jax.Array | np.ndarray,
    test_labels: jax.Array | np.ndarray,
    num_classes: int,
    steps: int = 200,
    l2: float = 1e-4,
    max_dim: int | None = 2048,
    seed: int = 0,
) -> dict[str, float]:
    """Train/test accuracy of a multinomial logistic regression fitted on the train features.

    Pipeline: x = `probe_features(u, max_dim, seed)` (real-ify complex features to [Re u, Im u],
    count-sketch to at most `max_dim` dims); standardise each coordinate with the train mean and
    standard deviation (std < 1e-6 treated as 1); minimise

        (1/n) sum_i -log softmax(W^T x_i + b)_{y_i} + (l2/2) ||W||_F^2

    with `steps` iterations of full-batch L-BFGS (optax.lbfgs, zoom line search) from W = 0,
    b = 0. Features are held in memory (n x min(2d, max_dim) float32 on one device): use a
    subset of a large training set.

    Args:
        train_feats, test_feats: [n, d] real or complex (already sketched features are fine:
            real arrays of dim <= max_dim pass through unchanged).
        train_labels, test_labels: int[n].
        num_classes: K.
        steps: L-BFGS iterations.
        l2: weight-decay coefficient on W.
        max_dim: sketch dimension cap (None: none).
        seed: sketch seed.

    Returns:
        {"train_accuracy": float, "test_accuracy": float}.
    """
    x_tr = probe_features(jnp.asarray(train_feats), max_dim, seed).astype(jnp.float32)
    x_te = probe_features(jnp.asarray(test_feats), max_dim, seed).astype(jnp.float32)
    y_tr = jnp.asarray(train_labels, jnp.int32)
    y_te = jnp.asarray(test_labels, jnp.int32)
    mean = jnp.mean(x_tr, axis=0)
    std = jnp.std(x_tr, axis=0)
    std = jnp.where(std < 1e-6, 1.0, std)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    w, b = _fit_logistic_regression_jit(x_tr, y_tr, num_classes, int(steps), float(l2))

    def accuracy(x: jax.Array, y: jax.Array) -> float:
        pred = jnp.argmax(jnp.matmul(x, w, precision=_HIGHEST) + b, axis=1)
        return float(jnp.mean(pred == y))

    return {"train_accuracy": accuracy(x_tr, y_tr), "test_accuracy": accuracy(x_te, y_te)}
