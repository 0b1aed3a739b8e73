"""Top-k hits against a NumPy argsort oracle: ties count against the label, NaN is a miss."""

import jax.numpy as jnp
import numpy as np
import pytest

from pcjax.training import metrics


def _oracle(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Hit iff the label sorts within the first k when, among equal logits, the label is put
    last (a stable descending sort of the logits with the label's entry moved behind its
    ties); any NaN in the row is a miss."""
    out = np.zeros(len(labels))
    for i, (row, label) in enumerate(zip(logits.astype(np.float64), labels, strict=True)):
        if np.isnan(row).any():
            continue
        # Secondary key: 1 for the label, 0 for the others, so ties rank the label last.
        order = np.lexsort((np.arange(len(row)) == label, -row))
        out[i] = float(np.nonzero(order == label)[0][0] < k)
    return out


def _cases(rng: np.random.Generator, n: int = 64, c: int = 10) -> tuple[np.ndarray, np.ndarray]:
    # Logits on a coarse grid, so rows hold many exact ties, plus constant rows and NaNs.
    logits = rng.integers(-3, 4, size=(n, c)).astype(np.float32) * 0.5
    logits[:4] = rng.standard_normal()  # constant rows: every class ties with the label
    logits[4, rng.integers(c)] = np.nan
    logits[5, :] = np.nan
    logits[6, 3] = np.inf
    labels = rng.integers(0, c, n).astype(np.int32)
    labels[7] = np.argmax(logits[7])  # a strict maximum or a tie at the top
    return logits, labels


@pytest.mark.parametrize("k", [1, 2, 5, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_correct_matches_argsort_oracle(k, seed):
    logits, labels = _cases(np.random.default_rng(seed))
    got = np.asarray(metrics.topk_correct(jnp.asarray(logits), jnp.asarray(labels), k))
    np.testing.assert_array_equal(got, _oracle(logits, labels, k))


def test_constant_and_nan_logits_score_nothing():
    labels = jnp.arange(8) % 10
    assert float(metrics.topk_correct(jnp.zeros((8, 10)), labels, 1).sum()) == 0.0
    assert float(metrics.topk_correct(jnp.zeros((8, 10)), labels, 5).sum()) == 0.0
    nan = jnp.full((8, 10), jnp.nan)
    assert float(metrics.topk_correct(nan, labels, 5).sum()) == 0.0
    # A strict maximum on the label is a hit.
    logits = jnp.zeros((8, 10)).at[jnp.arange(8), labels].set(1.0)
    assert float(metrics.topk_correct(logits, labels, 1).sum()) == 8.0
