"""Layer-by-layer class-separation analysis: feature capture, streaming statistics, probes.

The paper's exact separation measures are unknown (REFERENCE.md 6.1), so the measures below are
a documented **[choice]**: the "natural, unambiguous set" of REFERENCE.md 6.1, computed on the
output U_k of each block (or any other captured module output).

Conventions used throughout:

* A layer's features for one example are flattened to a vector u in C^d (complex blocks) or
  R^d (the input image, ResNet layers). Complex vectors are treated as vectors of C^d: squared
  norms are ||u||^2 = sum_j |u_j|^2 and inner products are Hermitian, <u, v> = sum_j u_j conj(v_j).
  For every trace below this equals the real computation on [Re u, Im u] in R^{2d}.
* Statistics are **count-weighted** (each example counts once, not each class): with N examples,
  n_y of them in class y,

      mu_y = (1/n_y) sum_{i in y} u_i,            mu = (1/N) sum_i u_i = sum_y (n_y/N) mu_y,
      tr(Sigma_W) = (1/N) sum_y sum_{i in y} ||u_i - mu_y||^2,
      tr(Sigma_B) = (1/N) sum_y n_y ||mu_y - mu||^2,
      tr(Sigma_T) = (1/N) sum_i ||u_i - mu||^2 = tr(Sigma_W) + tr(Sigma_B).

  On class-balanced data (CIFAR-10, the ImageNet validation set) this equals the
  class-balanced average E_y of REFERENCE.md 6.1; the ImageNet training set is mildly
  unbalanced (732 to 1300 images per class), where the two differ slightly.
* Fisher ratio = tr(Sigma_W) / tr(Sigma_B): **lower is better separated** (classes concentrated
  around means that are far apart). Its inverse tr(Sigma_B) / tr(Sigma_W) is reported as
  `between_within_ratio` (higher is better) and is the objective of the gradient probes.
* Nearest-class-mean (NCM) accuracy: class means mu_y from a fitting set (the training set),
  each example of a dataset classified as argmin_y ||u - mu_y||^2.
* Linear-probe accuracy: multinomial logistic regression on real-ified, optionally sketched,
  standardised features (`linear_probe_accuracy`).

Streaming: `SeparationStats` holds per-class sums, so a dataset is reduced batch by batch without
holding its features (`update_stats`, jit-able, with a mask for padded evaluation batches).
This module works on any Linen network it is given and imports nothing from pcjax (in
particular neither the trainer nor the data pipeline).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

INPUT = "input"
"""Layer name of the network input (the images themselves) in captured features."""

# Default layers: the top-level blocks of a PhaseCollapseNet and the residual blocks of ResNet18.
_DEFAULT_LAYER_PATTERN = re.compile(r"^(block\d+|layer\d+_\d+)$")
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes in accumulations (GPU/TPU defaults)

Batch = Mapping[str, Any] | Sequence[Any]
BatchSource = Iterable[Batch] | Callable[[], Iterable[Batch]]


# --- Layer feature capture ------------------------------------------------------------------------


def _natural_key(name: str) -> tuple:
    """Sort key putting "block2" before "block10"."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def capture_block_outputs(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    layers: Sequence[str] | None = None,
) -> dict[str, jax.Array]:
    """Outputs of the network's blocks on `images`, in evaluation mode (`train=False`).

    Uses Flax's `capture_intermediates`: the value returned by each selected submodule's
    `__call__`. Pure and differentiable in `variables` and `images`; wrap it in `jax.jit` (or use
    `make_feature_fn`) for speed.

    Args:
        model: a pcjax network (`PhaseCollapseNet`, `ResNet18`, or any Linen module whose
            `__call__(x, train)` calls named submodules).
        variables: {"params": ..., "batch_stats": ...} of `model`.
        images: float32[batch, h, w, c], normalised images.
        layers: names to capture. "input" is the images themselves; any other name is the
            "/"-joined path of a submodule, e.g. "block3", "block3/std", "head/bn", "layer2_1".
            Default: "input" followed by every top-level `block{i}` (PhaseCollapseNet) or
            `layer{s}_{i}` (ResNet18) module, in natural order.

    Returns:
        {layer: array}, unflattened: complex64[batch, h, w, c] for phase-collapse blocks
        (unit-norm pixel vectors), float32 for the input and ResNet layers. Ordered as `layers`.

    Raises:
        KeyError: a requested layer is not a submodule called during the forward pass.
    """
    wanted = None if layers is None else [str(name) for name in layers]
    module_names = None if wanted is None else {n for n in wanted if n != INPUT}

    def keep(mdl: nn.Module, method_name: str) -> bool:
        if method_name != "__call__" or not mdl.path:
            return False
        path = "/".join(mdl.path)
        if module_names is None:
            return len(mdl.path) == 1 and bool(_DEFAULT_LAYER_PATTERN.match(path))
        return path in module_names

    _, state = model.apply(
        dict(variables), images, train=False, capture_intermediates=keep, mutable=["intermediates"]
    )
    captured: dict[str, jax.Array] = {}

    def walk(tree: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        for key, value in tree.items():
            if key == "__call__":
                captured["/".join(prefix)] = value[0]
            elif isinstance(value, Mapping):
                walk(value, prefix + (key,))

    walk(state.get("intermediates", {}), ())
    if wanted is None:
        wanted = [INPUT] + sorted(captured, key=_natural_key)
    out = {}
    for name in wanted:
        if name == INPUT:
            out[name] = images
        elif name in captured:
            out[name] = captured[name]
        else:
            raise KeyError(
                f"Layer {name!r} was not captured; captured module outputs: {sorted(captured)}."
            )
    return out


def flatten_features(x: jax.Array, pooling: str | None = None) -> jax.Array:
    """[batch, ...] -> [batch, d]; `pooling="mean"` first averages over the spatial axes.

    With pooling "mean", a [batch, h, w, c] array becomes [batch, c] (global average pooling),
    which bounds d for large early feature maps; the default keeps every coordinate.
    """
    if pooling == "mean":
        if x.ndim > 2:
            x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
    elif pooling is not None:
        raise ValueError(f"Unknown pooling {pooling!r}; valid choices: None, 'mean'.")
    return x.reshape(x.shape[0], -1)


def make_feature_fn(
    model: nn.Module,
    variables: Mapping[str, Any],
    layers: Sequence[str] | None = None,
    pooling: str | None = None,
) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """A jitted function images -> {layer: features[batch, d]} (flattened, see `flatten_features`).

    `variables` are passed to the compiled function as arguments (not baked in as constants),
    so large networks compile quickly; a new image shape triggers one recompile.

    Args:
        model, variables, layers: as in `capture_block_outputs`.
        pooling: None (flatten [h, w, c]) or "mean" (spatial mean, then [c]).

    Returns:
        f(images: float32[batch, h, w, c]) -> {layer: complex64 or float32[batch, d]}.
    """
    layers = None if layers is None else tuple(layers)

    @jax.jit
    def features(variables: Mapping[str, Any], images: jax.Array) -> dict[str, jax.Array]:
        raw = capture_block_outputs(model, variables, images, layers)
        return {k: flatten_features(v, pooling) for k, v in raw.items()}

    return lambda images: features(variables, images)


# --- Streaming separation statistics -------------------------------------------------------------


def _real_dtype(dtype: Any) -> jnp.dtype:
    return jnp.finfo(jnp.dtype(dtype)).dtype


def _sq_norms(x: jax.Array) -> jax.Array:
    """sum_j |x_j|^2 over the last axis, without a square root (smooth, finite gradient at 0)."""
    if jnp.iscomplexobj(x):
        return jnp.sum(jnp.square(x.real) + jnp.square(x.imag), axis=-1)
    return jnp.sum(jnp.square(x), axis=-1)


def _weights(labels: jax.Array, num_classes: int, mask: jax.Array | None, dtype: Any) -> jax.Array:
    """One-hot class weights times the mask, real[batch, num_classes].

    Labels outside [0, num_classes) get an all-zero row (ignored), like masked examples.
    """
    w = jax.nn.one_hot(labels, num_classes, dtype=dtype)
    if mask is not None:
        w = w * jnp.asarray(mask, dtype)[:, None]
    return w


@flax.struct.dataclass
class SeparationStats:
    """Streaming per-class sums of one layer's features (a pytree: jit, scan, device_put work).

    All sums are of shifted features v_i = u_i - c (c = `shift`); every trace is shift-invariant,
    and a shift near the data mean avoids the cancellation in Q_y - n_y ||m_y||^2 when
    ||mu||^2 >> tr(Sigma_T) (unit-norm features have ||u||^2 = h w for every example).

    Attributes:
        counts: real[num_classes], n_y = number of (unmasked) examples of class y.
        sums: dtype[num_classes, d], S_y = sum_{i in y} (u_i - c).
        sq_norm_sums: real[num_classes], Q_y = sum_{i in y} ||u_i - c||^2.
        shift: dtype[d], c.
        auto_shift: static; if True, c is replaced by the (masked) mean of the first batch that
            reaches an empty accumulator.
    """

    counts: jax.Array
    sums: jax.Array
    sq_norm_sums: jax.Array
    shift: jax.Array
    auto_shift: bool = flax.struct.field(pytree_node=False, default=True)


def init_stats(
    num_classes: int, dim: int, dtype: Any = jnp.float32, shift: jax.Array | None = None
) -> SeparationStats:
    """Empty accumulator for `dim`-dimensional features of `dtype` (float or complex).

    Args:
        num_classes: number of labels.
        dim: feature dimension d.
        dtype: accumulator dtype of the sums S_y; complex features need a complex dtype.
            float64/complex128 need `jax.enable_x64`.
        shift: fixed shift c ([d]); None = automatic (the first batch's mean), see
            `SeparationStats`.
    """
    dtype = jnp.dtype(dtype)
    real = _real_dtype(dtype)
    auto = shift is None
    shift = jnp.zeros((dim,), dtype) if shift is None else jnp.asarray(shift, dtype).reshape(dim)
    return SeparationStats(
        counts=jnp.zeros((num_classes,), real),
        sums=jnp.zeros((num_classes, dim), dtype),
        sq_norm_sums=jnp.zeros((num_classes,), real),
        shift=shift,
        auto_shift=auto,
    )


def update_stats(
    stats: SeparationStats,
    features: jax.Array,
    labels: jax.Array,
    mask: jax.Array | None = None,
) -> SeparationStats:
    """Adds one batch to the per-class sums of `stats`.

    n_y += sum_i w_iy, S_y += sum_i w_iy (u_i - c), Q_y += sum_i w_iy ||u_i - c||^2, with
    w_iy = mask_i [label_i == y].

    Jit-able: shapes are static and padded examples are dropped through `mask`, so a final
    short batch padded to full size does not recompile.

    Args:
        stats: accumulator from `init_stats` or a previous update.
        features: [batch, d] (or [batch, ...], flattened here), real or complex.
        labels: int[batch] in [0, num_classes).
        mask: optional [batch], 1 for real examples and 0 for padding.

    Returns:
        The updated accumulator.
    """
    num_classes, dim = stats.sums.shape
    dtype = stats.sums.dtype
    x = features.reshape(features.shape[0], -1)
    if x.shape[1] != dim:
        raise ValueError(f"Features have dimension {x.shape[1]}, the accumulator {dim}.")
    if jnp.iscomplexobj(x) and not jnp.issubdtype(dtype, jnp.complexfloating):
        raise ValueError("Complex features need a complex accumulator dtype (init_stats dtype).")
    x = x.astype(dtype)
    real = stats.counts.dtype
    w = _weights(labels, num_classes, mask, real)
    shift = stats.shift
    if stats.auto_shift:
        batch_count = jnp.sum(w)
        batch_mean = jnp.sum(w, axis=1).astype(dtype) @ x / jnp.maximum(batch_count, 1)
        shift = jnp.where(jnp.sum(stats.counts) == 0, batch_mean, shift)
    v = x - shift
    return stats.replace(
        counts=stats.counts + jnp.sum(w, axis=0),
        sums=stats.sums + jnp.matmul(w.T.astype(dtype), v, precision=_HIGHEST),
        sq_norm_sums=stats.sq_norm_sums + jnp.matmul(w.T, _sq_norms(v), precision=_HIGHEST),
        shift=shift,
    )


def finalize(stats: SeparationStats) -> dict[str, jax.Array]:
    """Class means and covariance traces from the streaming sums (jit-able).

    With m_y = S_y / n_y (shifted class mean), m = sum_y S_y / N and N = sum_y n_y:

        mu_y = c + m_y,  mu = c + m,
        tr(Sigma_W) = (1/N) sum_y (Q_y - n_y ||m_y||^2),
        tr(Sigma_B) = (1/N) sum_y n_y ||m_y - m||^2,
        tr(Sigma_T) = (1/N) sum_y Q_y - ||m||^2,
        fisher_ratio = tr(Sigma_W) / tr(Sigma_B)   (lower = better separated),
        between_within_ratio = tr(Sigma_B) / tr(Sigma_W).

    Each class term Q_y - n_y ||m_y||^2 is clipped at 0 against rounding. Classes with n_y = 0
    are absent: they do not contribute, their `class_means` row is c, `class_present` is False.

    Returns:
        {"class_means": [K, d], "mean": [d], "class_counts": [K], "class_present": bool[K],
         "num_examples", "trace_within", "trace_between", "trace_total", "fisher_ratio",
         "between_within_ratio": 0-d real arrays}.
    """
    n = stats.counts
    total = jnp.sum(n)
    present = n > 0
    safe_n = jnp.where(present, n, 1)
    m_y = stats.sums / safe_n[:, None].astype(stats.sums.dtype)
    m = jnp.sum(stats.sums, axis=0) / jnp.maximum(total, 1).astype(stats.sums.dtype)
    safe_total = jnp.maximum(total, 1)
    within = jnp.sum(jnp.maximum(stats.sq_norm_sums - n * _sq_norms(m_y), 0)) / safe_total
    between = jnp.sum(n * _sq_norms(m_y - m)) / safe_total
    total_trace = jnp.sum(stats.sq_norm_sums) / safe_total - _sq_norms(m)
    return {
        "class_means": m_y + stats.shift,
        "mean": m + stats.shift,
        "class_counts": n,
        "class_present": present,
        "num_examples": total,
        "trace_within": within,
        "trace_between": between,
        "trace_total": total_trace,
        "fisher_ratio": within / between,
        "between_within_ratio": between / within,
    }


def batch_separation(
    features: jax.Array,
    labels: jax.Array,
    num_classes: int,
    mask: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Two-pass (direct) traces on one batch; differentiable, finite gradients everywhere.

    tr(Sigma_W) = (1/N) sum_i w_i ||u_i - mu_{y_i}||^2, tr(Sigma_B) = (1/N) sum_y n_y
    ||mu_y - mu||^2 with the batch's own means (same definitions as `finalize`). Only squared
    norms appear (no square roots), so exact zeros in the features are harmless.

    Args:
        features: [batch, d] or [batch, ...], real or complex.
        labels: int[batch].
        num_classes: K.
        mask: optional [batch] weights (0 drops an example).

    Returns:
        {"trace_within", "trace_between", "between_within_ratio", "fisher_ratio"} (0-d arrays).
    """
    x = features.reshape(features.shape[0], -1)
    real = _real_dtype(x.dtype)
    w = _weights(labels, num_classes, mask, real)  # [b, K]
    n = jnp.sum(w, axis=0)
    total = jnp.maximum(jnp.sum(n), 1)
    means = jnp.matmul(w.T.astype(x.dtype), x, precision=_HIGHEST) / jnp.where(n > 0, n, 1)[
        :, None
    ].astype(x.dtype)
    mean = jnp.sum(w, axis=1).astype(x.dtype) @ x / total.astype(x.dtype)
    assigned = jnp.matmul(w.astype(x.dtype), means, precision=_HIGHEST)  # mu_{y_i}
    within = jnp.sum(jnp.sum(w, axis=1) * _sq_norms(x - assigned)) / total
    between = jnp.sum(n * _sq_norms(means - mean)) / total
    tiny = jnp.finfo(real).tiny
    return {
        "trace_within": within,
        "trace_between": between,
        "between_within_ratio": between / jnp.maximum(within, tiny),
        "fisher_ratio": within / jnp.maximum(between, tiny),
    }


# --- Nearest class mean ---------------------------------------------------------------------------


@flax.struct.dataclass
class NCMStats:
    """Streaming nearest-class-mean counts: `correct` and `total` (real 0-d arrays)."""

    correct: jax.Array
    total: jax.Array


def init_ncm_stats() -> NCMStats:
    """Empty NCM counters."""
    return NCMStats(correct=jnp.zeros((), jnp.float32), total=jnp.zeros((), jnp.float32))


def ncm_predict(
    features: jax.Array, class_means: jax.Array, class_present: jax.Array | None = None
) -> jax.Array:
    """argmin_y ||u - mu_y||^2 for each row u of `features`, int32[batch].

    Computed as argmin_y (||mu_y - c||^2 - 2 Re <u - c, mu_y - c>) with c the mean of the
    present class means (the argmin does not depend on c; centring shrinks the numbers), which
    avoids a [batch, K, d] tensor. Absent classes (class_present False) are never predicted;
    ties go to the lowest class index.

    Args:
        features: [batch, d] (or [batch, ...]), real or complex.
        class_means: [K, d], e.g. `finalize(train_stats)["class_means"]`.
        class_present: optional bool[K].
    """
    x = features.reshape(features.shape[0], -1)
    dtype = jnp.result_type(x.dtype, class_means.dtype)
    x, mus = x.astype(dtype), class_means.astype(dtype)
    if class_present is None:
        class_present = jnp.ones(mus.shape[0], bool)
    present = class_present.astype(_real_dtype(dtype))
    c = present.astype(dtype) @ mus / jnp.maximum(jnp.sum(present), 1).astype(dtype)
    x, mus = x - c, mus - c
    cross = jnp.real(jnp.matmul(x, jnp.conj(mus).T, precision=_HIGHEST))
    dist = _sq_norms(mus)[None, :] - 2 * cross
    dist = jnp.where(class_present[None, :], dist, jnp.inf)
    return jnp.argmin(dist, axis=1).astype(jnp.int32)


def update_ncm_stats(
    stats: NCMStats,
    features: jax.Array,
    labels: jax.Array,
    class_means: jax.Array,
    mask: jax.Array | None = None,
    class_present: jax.Array | None = None,
) -> NCMStats:
    """Adds one batch: correct += sum_i mask_i [ncm_predict(u_i) == y_i], total += sum_i mask_i.

    Jit-able; `class_means` stay fixed across the pass (second pass over a dataset).
    """
    pred = ncm_predict(features, class_means, class_present)
    m = jnp.ones(labels.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    hit = (pred == labels).astype(jnp.float32)
    return NCMStats(correct=stats.correct + jnp.sum(hit * m), total=stats.total + jnp.sum(m))


def ncm_accuracy(stats: NCMStats) -> jax.Array:
    """correct / total (NaN if no example was seen)."""
    return stats.correct / stats.total


# --- Linear probe ---------------------------------------------------------------------------------


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


# --- Whole-dataset, layer-by-layer analysis ----------------------------------------------------


def _unpack_batch(batch: Batch) -> tuple[Any, Any, Any]:
    """(images, labels, mask) from a dict {"image", "label"[, "mask"]} or a 2/3-tuple."""
    if isinstance(batch, Mapping):
        images = batch["image"] if "image" in batch else batch["images"]
        labels = batch["label"] if "label" in batch else batch["labels"]
        mask = batch.get("mask")
    else:
        images, labels, *rest = batch
        mask = rest[0] if rest else None
    if mask is None:
        mask = np.ones(np.shape(labels)[0], np.float32)
    return images, labels, mask


def _open(source: BatchSource) -> Iterable[Batch]:
    return source() if callable(source) else source


_SCALARS = ("trace_within", "trace_between", "trace_total", "fisher_ratio", "between_within_ratio")


def layerwise_separation(
    model: nn.Module,
    variables: Mapping[str, Any],
    train_batches: BatchSource,
    num_classes: int,
    *,
    eval_batches: BatchSource | None = None,
    layers: Sequence[str] | None = None,
    pooling: str | None = None,
    train_ncm: bool = True,
    linear_probe: bool = False,
    probe_max_dim: int | None = 2048,
    probe_max_examples: int | None = 50_000,
    probe_steps: int = 200,
    probe_l2: float = 1e-4,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Class-separation measures at every layer, streaming over a dataset in evaluation mode.

    Passes (each one jitted step per batch computing all layers at once):

    1. over `train_batches`: `SeparationStats` of every layer -> class means, traces, Fisher
       ratio ("train/..."); with `linear_probe`, also keeps the first `probe_max_examples`
       sketched train features.
    2. over `train_batches` again (if `train_ncm`): NCM accuracy of the train means on the train
       set ("train/ncm_accuracy").
    3. over `eval_batches` (if given), one pass: NCM accuracy of the *train* means, the eval set's
       own traces and ratios ("eval/..."), and, with `linear_probe`, the eval features for the
       probe ("train/probe_accuracy", "eval/probe_accuracy").

    Batches are dicts {"image", "label", "mask"} (as yielded by `pcjax.data`) or tuples
    (images, labels[, mask]); masked examples (mask 0, padding) are ignored. Keep the batch
    shape fixed (pad the last batch) to avoid recompiles.

    Args:
        model, variables: the network and its {"params", "batch_stats"}.
        train_batches: zero-argument callable returning a fresh iterable of batches (needed when
            two passes are made), or a re-iterable such as a list.
        num_classes: K.
        eval_batches: optional callable or iterable of evaluation batches (one pass).
        layers, pooling: as in `make_feature_fn` (default: input and every block).
        train_ncm: make pass 2.
        linear_probe: fit `linear_probe_accuracy` per layer (needs `eval_batches`).
        probe_max_dim, probe_max_examples, probe_steps, probe_l2, seed: probe settings; at most
            `probe_max_examples` examples of each set are kept (the first ones).

    Returns:
        {layer: {measure: float}} with measures "dim", "train/trace_within",
        "train/trace_between", "train/trace_total", "train/fisher_ratio",
        "train/between_within_ratio", "train/ncm_accuracy" and, with `eval_batches`, the same
        under "eval/", plus "train/probe_accuracy" and "eval/probe_accuracy" with `linear_probe`.
    """
    if linear_probe and eval_batches is None:
        raise ValueError("linear_probe=True needs eval_batches (the probe's test set).")
    if train_ncm and not callable(train_batches) and iter(train_batches) is train_batches:
        raise ValueError(
            "train_batches is a one-shot iterator but two passes are needed: pass a callable "
            "returning a fresh iterable (or a list), or set train_ncm=False."
        )
    variables = dict(variables)
    layers = None if layers is None else tuple(layers)

    order: list[str] = []  # layer order of `capture_block_outputs` (jit outputs sort dict keys)

    def features_of(variables: Mapping[str, Any], images: jax.Array) -> dict[str, jax.Array]:
        raw = capture_block_outputs(model, variables, images, layers)
        order[:] = list(raw)
        return {k: flatten_features(v, pooling) for k, v in raw.items()}

    def sketch(feats: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {k: probe_features(v, probe_max_dim, seed) for k, v in feats.items()}

    # One compiled step for every pass: pass 1 feeds the accumulator's own sums as dummy class
    # means (same shape and dtype as the real ones, no extra memory) and ignores the NCM counts;
    # pass 2 ignores the statistics. The NCM work is negligible next to the forward pass.
    @jax.jit
    def step(stats, ncm, means, variables, images, labels, mask):
        feats = features_of(variables, images)
        new_stats = {k: update_stats(stats[k], feats[k], labels, mask) for k in stats}
        new_ncm = {
            k: update_ncm_stats(ncm[k], feats[k], labels, means[k][0], mask, means[k][1])
            for k in ncm
        }
        return new_stats, new_ncm, (sketch(feats) if linear_probe else None)

    def run_pass(batches: Iterable[Batch], stats, means, collect: bool):
        ncm = {k: init_ncm_stats() for k in stats}
        kept: dict[str, list[np.ndarray]] = {k: [] for k in stats}
        kept_labels: list[np.ndarray] = []
        num_kept = 0
        for batch in batches:
            images, labels, mask = _unpack_batch(batch)
            images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
            mask = jnp.asarray(mask, jnp.float32)
            pass_means = (
                means
                if means is not None
                else {k: (s.sums, jnp.zeros((num_classes,), bool)) for k, s in stats.items()}
            )
            stats, ncm, sketched = step(stats, ncm, pass_means, variables, images, labels, mask)
            if collect and (probe_max_examples is None or num_kept < probe_max_examples):
                room = None if probe_max_examples is None else probe_max_examples - num_kept
                idx = np.flatnonzero(np.asarray(mask) > 0)[:room]
                for k in kept:
                    kept[k].append(np.asarray(sketched[k])[idx])
                kept_labels.append(np.asarray(labels)[idx])
                num_kept += idx.size
        probe = None
        if collect:
            probe = ({k: np.concatenate(v) for k, v in kept.items()}, np.concatenate(kept_labels))
        return stats, ncm, probe

    iterator = iter(_open(train_batches))
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("train_batches yielded no batch.") from None
    shapes = jax.eval_shape(features_of, variables, jnp.asarray(_unpack_batch(first)[0]))
    dims = {k: shapes[k].shape[1] for k in order}

    def fresh_stats() -> dict[str, SeparationStats]:
        return {
            k: init_stats(
                num_classes,
                s.shape[1],
                jnp.complex64 if jnp.issubdtype(s.dtype, jnp.complexfloating) else jnp.float32,
            )
            for k, s in shapes.items()
        }

    # Pass 1: statistics of the fitting set.
    train_stats, _, train_probe = run_pass(
        itertools.chain([first], iterator), fresh_stats(), None, linear_probe
    )
    results: dict[str, dict[str, float]] = {k: {"dim": float(d)} for k, d in dims.items()}
    means = {}
    for k, s in train_stats.items():
        fin = finalize(s)
        results[k].update({f"train/{m}": float(fin[m]) for m in _SCALARS})
        means[k] = (fin["class_means"], fin["class_present"])
    del train_stats

    # Pass 2: NCM accuracy of the train means on the train set.
    if train_ncm:
        _, ncm, _ = run_pass(_open(train_batches), fresh_stats(), means, False)
        for k, s in ncm.items():
            results[k]["train/ncm_accuracy"] = float(ncm_accuracy(s))

    # Pass 3: evaluation set.
    if eval_batches is not None:
        eval_stats, eval_ncm, eval_probe = run_pass(
            _open(eval_batches), fresh_stats(), means, linear_probe
        )
        for k, s in eval_stats.items():
            fin = finalize(s)
            results[k].update({f"eval/{m}": float(fin[m]) for m in _SCALARS})
            results[k]["eval/ncm_accuracy"] = float(ncm_accuracy(eval_ncm[k]))
        if linear_probe:
            (train_x, train_y), (eval_x, eval_y) = train_probe, eval_probe
            # Zero-pad every layer to one width so the L-BFGS fit compiles once: a zero column
            # has zero gradient, so its weights stay exactly 0 and the fit is unchanged.
            width = max(x.shape[1] for x in train_x.values())
            pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))  # noqa: E731
            for k in dims:
                acc = linear_probe_accuracy(
                    pad(train_x[k]),
                    train_y,
                    pad(eval_x[k]),
                    eval_y,
                    num_classes,
                    steps=probe_steps,
                    l2=probe_l2,
                    max_dim=None,
                )
                results[k]["train/probe_accuracy"] = acc["train_accuracy"]
                results[k]["eval/probe_accuracy"] = acc["test_accuracy"]
    return results


# --- Gradient probes ------------------------------------------------------------------------------


def separation_objective(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    labels: jax.Array,
    layer: str,
    num_classes: int,
    mask: jax.Array | None = None,
) -> jax.Array:
    """tr(Sigma_B) / tr(Sigma_W) of the batch's features at `layer` (higher = better separated).

    The features are those of `capture_block_outputs` in evaluation mode (running batch
    statistics, so each example's features do not depend on the rest of the batch), flattened;
    the traces are `batch_separation`'s (two-pass, squared norms only), so the value is smooth
    in the images and parameters wherever the network is, with finite gradients even when
    features are exactly zero. A zero tr(Sigma_W) is floored at the dtype's smallest normal.

    Returns:
        Real 0-d array.
    """
    feats = capture_block_outputs(model, variables, images, [layer])[layer]
    return batch_separation(feats, labels, num_classes, mask)["between_within_ratio"]


@functools.lru_cache(maxsize=32)
def make_separation_grad_fn(
    model: nn.Module, layer: str, num_classes: int
) -> Callable[..., tuple[jax.Array, jax.Array, Any]]:
    """Jitted f(variables, images, labels, mask=None) -> (objective, d/d images, d/d params).

    Gradients of `separation_objective`; `batch_stats` are held fixed. Parameters are real
    pytrees (complex projection weights are (Re, Im) pairs, see `complex_ops`), so the parameter
    gradient is the ordinary ascent direction: W + t * grad increases the ratio for small t.
    Cached on (model, layer, num_classes) (Linen modules hash by their fields), so repeated
    calls, and `separation_gradients`, reuse one compiled function per input shape.
    """

    def objective(
        params: Any,
        images: jax.Array,
        variables: Mapping[str, Any],
        labels: jax.Array,
        mask: jax.Array | None,
    ) -> jax.Array:
        full = {**variables, "params": params}
        return separation_objective(model, full, images, labels, layer, num_classes, mask)

    value_and_grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))

    def fn(
        variables: Mapping[str, Any],
        images: jax.Array,
        labels: jax.Array,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, Any]:
        variables = dict(variables)
        value, (g_params, g_images) = value_and_grads(
            variables["params"], images, variables, labels, mask
        )
        return value, g_images, g_params

    return fn


def separation_gradients(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    labels: jax.Array,
    layer: str,
    num_classes: int,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, Any]:
    """(d ratio / d images, d ratio / d params) of `separation_objective` at `layer`.

    The parameter gradient shows which weights (e.g. `params["block3"]["proj"]["kernel"]`, the
    complex 1x1 projections) move class means apart relative to the within-class spread; the
    weights of layers after `layer` get zero gradient. The compiled function is cached (see
    `make_separation_grad_fn`).

    Returns:
        (float32[batch, h, w, c] like `images`, a pytree like `variables["params"]`).
    """
    _, g_images, g_params = make_separation_grad_fn(model, layer, num_classes)(
        variables, images, labels, mask
    )
    return g_images, g_params


# --- Checkpoints ----------------------------------------------------------------------------------


def load_variables_from_workdir(
    workdir: str | Path,
    model: nn.Module,
    image_shape: Sequence[int],
    step: int | None = None,
) -> dict[str, Any]:
    """{"params", "batch_stats"} of a training checkpoint, ready for `model.apply`.

    Reads the checkpoint the trainer writes in `workdir` (a folder or a URL) through
    `pcjax.checkpoint.restore_variables` (nested dicts, no target), and checks that the
    parameter and statistics trees match `model.init` on an input of shape [1, *image_shape]
    (names, shapes; dtypes are cast).

    Args:
        workdir: the training run's directory.
        model: the network that was trained.
        image_shape: (h, w, c) of its input.
        step: checkpoint step; None = latest.

    Raises:
        FileNotFoundError: no checkpoint under `workdir/checkpoints`.
        ValueError: the checkpoint does not fit `model`.
    """
    from pcjax import checkpoint  # imported here: Orbax is heavy, and only this function needs it

    restored, step = checkpoint.restore_variables(workdir, step)

    x = jax.ShapeDtypeStruct((1, *tuple(image_shape)), jnp.float32)
    expected = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype), train=False)
    )
    out = {}
    for collection in ("params", "batch_stats"):
        want = expected.get(collection, {})
        if not isinstance(restored, Mapping) or collection not in restored:
            raise ValueError(f"Checkpoint at step {step} has no {collection!r} entry.")
        got = restored[collection] or {}  # an empty collection may come back as None
        want_paths = {
            jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(want)
        }
        got_paths = {
            jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(got)
        }
        if set(want_paths) != set(got_paths):
            missing = sorted(set(want_paths) - set(got_paths))[:5]
            extra = sorted(set(got_paths) - set(want_paths))[:5]
            raise ValueError(
                f"Checkpoint {collection!r} does not match the model: missing {missing}, "
                f"unexpected {extra}."
            )
        for key, leaf in got_paths.items():
            if tuple(np.shape(leaf)) != tuple(want_paths[key].shape):
                raise ValueError(
                    f"Checkpoint {collection}{key} has shape {np.shape(leaf)}, the model "
                    f"expects {want_paths[key].shape}."
                )
        out[collection] = jax.tree.map(lambda a, w: jnp.asarray(a, w.dtype), got, want)
    return out
