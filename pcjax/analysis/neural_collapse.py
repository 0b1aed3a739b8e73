"""Neural-collapse measures of one layer (Papyan, Han & Donoho, PNAS 2020), streamed.

Notation: features h_i of N examples (a layer's output, flattened; complex features are vectors
of R^{2d} through [Re h, Im h], so every inner product below is Re <u, v>), K classes with
means mu_c, the class-balanced global mean mu_G = (1/K) sum_c mu_c, centred means
m_c = mu_c - mu_G (rows of M, K x d) and

    Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T,
    Sigma_B = (1/K) sum_c m_c m_c^T.

Measures (all -> 0, or for NC4 -> 1, under neural collapse):

* NC1 = tr(Sigma_W Sigma_B^+) / K: within-class variability against the between-class one.
* NC2 equinorm = std_c ||m_c|| / mean_c ||m_c|| (coefficient of variation);
  NC2 equiangularity = std over pairs c < c' of cos(m_c, m_c'), and
  NC2 max-angle = mean over pairs of |cos(m_c, m_c') + 1/(K - 1)| (distance to a simplex ETF).
* NC3 self-duality = || W / ||W||_F - M / ||M||_F ||_F, W (K x d) the linear classifier acting
  on this layer's features.
* NC4 = fraction of examples whose nearest class mean (argmin_c ||h - mu_c||) is the network's
  own prediction; here for every layer, not only the last.

Streaming without d x d matrices: Sigma_B^+ lives in the span of the m_c, and with
G = M M^T (K x K), Sigma_B^+ = K M^T (G^+)^2 M, so NC1 = tr(C (G^+)^2) with
C = M Sigma_W M^T = (1/N) sum_i p_i p_i^T, p_i = M (h_i - mu_{y_i}) in R^K. A second pass over
the data (after the class means of `separation_stats`) accumulates C from centred projections
(no cancellation); the K x K algebra and NC2/NC3 run in float64 NumPy (`finalize_neural_collapse`).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from pcjax.analysis.separation_stats import _HIGHEST, _weights, ncm_predict


@flax.struct.dataclass
class CollapseStats:
    """Second-pass sums of one layer (a pytree).

    Attributes:
        within_proj: real[K, K], sum_i w_i p_i p_i^T with p_i = Re(conj(M) (h_i - mu_{y_i})).
        count: real 0-d, sum_i w_i.
        agree: real 0-d, sum_i w_i [nearest class mean of h_i == network prediction].
    """

    within_proj: jax.Array
    count: jax.Array
    agree: jax.Array


def init_collapse_stats(num_classes: int) -> CollapseStats:
    """Empty accumulator."""
    zero = jnp.zeros((), jnp.float32)
    return CollapseStats(jnp.zeros((num_classes, num_classes), jnp.float32), zero, zero)


def centred_means(class_means: jax.Array, class_present: jax.Array) -> jax.Array:
    """m_c = mu_c - (1/K') sum_{present c'} mu_c' for present classes, 0 for absent ones."""
    present = class_present.astype(class_means.real.dtype)
    mu_g = present.astype(class_means.dtype) @ class_means / jnp.maximum(jnp.sum(present), 1)
    return (class_means - mu_g) * present[:, None].astype(class_means.dtype)


def update_collapse_stats(
    stats: CollapseStats,
    features: jax.Array,
    labels: jax.Array,
    class_means: jax.Array,
    class_present: jax.Array,
    predictions: jax.Array,
    mask: jax.Array | None = None,
) -> CollapseStats:
    """Adds one batch (jit-able, fixed shapes; masked examples ignored).

    Args:
        stats: accumulator.
        features: [batch, d] (or [batch, ...]) real or complex.
        labels: int[batch].
        class_means, class_present: `separation_stats.finalize(...)` of the same layer, fitted on
            the same dataset (first pass).
        predictions: int[batch], the network's predicted classes.
        mask: optional [batch].
    """
    x = features.reshape(features.shape[0], -1)
    dtype = jnp.result_type(x.dtype, class_means.dtype)
    x, mus = x.astype(dtype), class_means.astype(dtype)
    num_classes = mus.shape[0]
    real = jnp.float32 if dtype in (jnp.float32, jnp.complex64) else jnp.float64
    w = _weights(labels, num_classes, mask, real)  # [b, K], zero rows for masked examples
    weight = jnp.sum(w, axis=1)
    m = centred_means(mus, class_present)
    resid = x - jnp.matmul(w.astype(dtype), mus, precision=_HIGHEST)  # h_i - mu_{y_i}
    p = jnp.real(jnp.matmul(resid, jnp.conj(m).T, precision=_HIGHEST)).astype(real)  # [b, K]
    ncm = ncm_predict(x, mus, class_present)
    return CollapseStats(
        within_proj=stats.within_proj + jnp.matmul((p * weight[:, None]).T, p, precision=_HIGHEST),
        count=stats.count + jnp.sum(weight),
        agree=stats.agree + jnp.sum(weight * (ncm == predictions)),
    )


update_collapse_stats_jit = jax.jit(update_collapse_stats)
"""`update_collapse_stats`, compiled once per input shape and reused across calls."""


def _real_rows(a: np.ndarray) -> np.ndarray:
    """complex[K, d] -> real[K, 2d] ([Re, Im]); real input unchanged; float64."""
    a = np.asarray(a)
    if np.iscomplexobj(a):
        return np.concatenate([a.real, a.imag], axis=1).astype(np.float64)
    return a.astype(np.float64)


def finalize_neural_collapse(
    class_means: Any,
    class_present: Any,
    stats: CollapseStats | None = None,
    classifier: Any | None = None,
    rcond: float = 1e-10,
) -> dict[str, float]:
    """NC1-NC4 of one layer, in float64 NumPy (see the module docstring).

    Args:
        class_means: [K, d] class means (real or complex), e.g. from `separation_stats.finalize`.
        class_present: bool[K]; absent classes are left out (K counts present classes only).
        stats: the second pass's `CollapseStats` (None: NC1 and NC4 are omitted).
        classifier: optional real[K, d'] weights W of the linear classifier acting on these
            features (d' = d for real, 2d for complex features in [Re, Im] order): adds NC3.
        rcond: relative cut-off of the pseudo-inverse of G (its null vector 1, from
            sum_c m_c = 0, is dropped).

    Returns:
        {"nc1", "nc2_equinorm", "nc2_equiangularity", "nc2_max_angle", "nc3", "nc4"} (those
        computable).
    """
    present = np.asarray(class_present, bool)
    mus = _real_rows(class_means)[present]
    k = mus.shape[0]
    m = mus - mus.mean(axis=0)
    g = m @ m.T
    norms = np.sqrt(np.diag(g))
    cos = g / np.outer(norms, norms)
    pairs = cos[np.triu_indices(k, 1)]
    out = {
        "nc2_equinorm": float(norms.std() / norms.mean()),
        "nc2_equiangularity": float(pairs.std()),
        "nc2_max_angle": float(np.mean(np.abs(pairs + 1.0 / (k - 1)))),
    }
    if stats is not None:
        c = np.asarray(stats.within_proj, np.float64)[np.ix_(present, present)]
        c = c / float(stats.count)
        g_pinv = np.linalg.pinv(g, rcond=rcond, hermitian=True)
        out["nc1"] = float(np.trace(c @ g_pinv @ g_pinv))
        out["nc4"] = float(stats.agree) / float(stats.count)
    if classifier is not None:
        w = np.asarray(classifier, np.float64)[present]
        if w.shape != m.shape:
            raise ValueError(f"Classifier of shape {w.shape}; the class means give {m.shape}.")
        out["nc3"] = float(np.linalg.norm(w / np.linalg.norm(w) - m / np.linalg.norm(m)))
    return out


def phase_collapse_classifier(variables: Any, feature_shape: tuple[int, int, int]) -> np.ndarray:
    """Weights W [K, h w 2c] of a PhaseCollapseNet's head in the order of its "head/bn" output.

    The head flattens its BatchNorm output [h, w, 2c] in (channel, h, w) order; `flatten_features`
    flattens in (h, w, channel) order, so the kernel rows are permuted to match.
    """
    h, w, c2 = feature_shape
    kernel = np.asarray(variables["params"]["head"]["linear"]["kernel"])  # [(c2, h, w), K]
    k = kernel.shape[1]
    return kernel.reshape(c2, h, w, k).transpose(1, 2, 0, 3).reshape(h * w * c2, k).T


CLASSIFIER_LAYER = "head/bn"
"""Layer whose flattened output a PhaseCollapseNet's linear classifier reads."""
