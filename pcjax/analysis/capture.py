"""Layer features of a Linen network: every block's output (or any submodule's), flattened.

`capture_block_outputs` works in evaluation mode (running statistics) or in training mode
(batch statistics, as the network sees its inputs during training).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

INPUT = "input"
"""Layer name of the network input (the images themselves) in captured features."""

# Default layers: the top-level blocks of a PhaseCollapseNet and the residual blocks of ResNet18.
_DEFAULT_LAYER_PATTERN = re.compile(r"^(block\d+|layer\d+_\d+)$")


def _natural_key(name: str) -> tuple:
    """Sort key putting "block2" before "block10"."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def capture_block_outputs(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    layers: Sequence[str] | None = None,
    train: bool = False,
) -> dict[str, jax.Array]:
    """Outputs of the network's blocks on `images`, in evaluation or training mode.

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
        train: False (evaluation mode: running statistics, each example independent of the
            batch) or True (training mode: the batch's own statistics, as during training; the
            updated running statistics are discarded).

    Returns:
        {layer: array}, unflattened: complex64[batch, h, w, c] for phase-collapse blocks
        (unit-norm pixel vectors), float32 for the input and ResNet layers. Ordered as `layers`.

    Raises:
        KeyError: a requested layer is not a submodule called during the forward pass.
    """
    return capture_with_output(model, variables, images, layers, train)[0]


def capture_with_output(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    layers: Sequence[str] | None = None,
    train: bool = False,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """(`capture_block_outputs(...)`, the network's own output) from one forward pass."""
    wanted = None if layers is None else [str(name) for name in layers]
    module_names = None if wanted is None else {n for n in wanted if n != INPUT}

    def keep(mdl: nn.Module, method_name: str) -> bool:
        if method_name != "__call__" or not mdl.path:
            return False
        path = "/".join(mdl.path)
        if module_names is None:
            return len(mdl.path) == 1 and bool(_DEFAULT_LAYER_PATTERN.match(path))
        return path in module_names

    mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
    output, state = model.apply(
        dict(variables), images, train=train, capture_intermediates=keep, mutable=mutable
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
    return out, output


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


@functools.lru_cache(maxsize=16)
def _feature_fn(
    model: nn.Module, layers: tuple[str, ...] | None, pooling: str | None, train: bool
) -> Callable:
    """The jitted (variables, images) -> flattened features, one per configuration (cached)."""

    @jax.jit
    def features(variables: Mapping[str, Any], images: jax.Array) -> dict[str, jax.Array]:
        raw = capture_block_outputs(model, variables, images, layers, train)
        return {k: flatten_features(v, pooling) for k, v in raw.items()}

    return features


def make_feature_fn(
    model: nn.Module,
    variables: Mapping[str, Any],
    layers: Sequence[str] | None = None,
    pooling: str | None = None,
    train: bool = False,
) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """A jitted function images -> {layer: features[batch, d]} (flattened, see `flatten_features`).

    `variables` are passed to the compiled function as arguments (not baked in as constants),
    so large networks compile quickly; the compiled function is cached per (model, layers,
    pooling, train), so new variables or a second call reuse it (a new image shape recompiles).

    Args:
        model, variables, layers, train: as in `capture_block_outputs`.
        pooling: None (flatten [h, w, c]) or "mean" (spatial mean, then [c]).

    Returns:
        f(images: float32[batch, h, w, c]) -> {layer: complex64 or float32[batch, d]}.
    """
    features = _feature_fn(model, None if layers is None else tuple(layers), pooling, train)
    return lambda images: features(variables, images)
