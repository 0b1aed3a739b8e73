"""Classification metrics as masked sums, so batch results add up to exact dataset figures."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """float32[batch]: 1 where fewer than k other classes have a logit >= the label's.

    Ties count against the label (constant logits are a miss for k < num_classes), and a row
    with any NaN logit is a miss, so a broken model never scores.
    """
    k = min(k, logits.shape[-1])
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    # Classes other than the label whose logit is at least the label's (the label counts itself).
    rivals = jnp.sum(logits >= label_logit, axis=-1) - 1
    valid = ~jnp.any(jnp.isnan(logits), axis=-1)
    return ((rivals < k) & valid).astype(jnp.float32)


def classification_sums(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Masked sums of loss, top-1 and top-5 hits and example count (float32 scalars)."""
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return {
        "loss": jnp.sum(loss * mask),
        "top1": jnp.sum(topk_correct(logits, labels, 1) * mask),
        "top5": jnp.sum(topk_correct(logits, labels, 5) * mask),
        "count": jnp.sum(mask),
    }


def finalize(sums: dict[str, float]) -> dict[str, float]:
    """Divides summed metrics by the number of real examples."""
    n = max(float(sums["count"]), 1.0)
    return {k: float(v) / n for k, v in sums.items() if k != "count"}
