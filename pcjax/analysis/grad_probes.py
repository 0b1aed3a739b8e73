"""Gradients of a layer's class separation with respect to the input and the parameters."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from pcjax.analysis.capture import capture_block_outputs
from pcjax.analysis.separation_stats import batch_separation


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
