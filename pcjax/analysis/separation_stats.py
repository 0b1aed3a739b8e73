"""Streaming class statistics of one layer: class means, covariance traces, nearest class mean.

Definitions (count-weighted) are in the package docstring (`pcjax.analysis`).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes in accumulations (GPU/TPU defaults)


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
