"""Trained variables of a training run's workdir, checked against the network they belong to."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def load_variables_from_workdir(
    workdir: str | Path,
    model: nn.Module,
    image_shape: Sequence[int],
    step: int | None = None,
) -> dict[str, Any]:
    """{"params", "batch_stats"} of a training checkpoint, ready for `model.apply`.

    Reads the checkpoint the trainer writes in `workdir` (a folder or a URL) through
    `pcjax.training.checkpoint.restore_variables` (nested dicts, no target), and checks that the
    parameter and statistics trees match `model.init` on an input of shape [1, *image_shape]
    (names, shapes; dtypes are cast). The arrays are uncommitted (no fixed device).

    Args:
        workdir: the training run's directory.
        model: the network that was trained.
        image_shape: (h, w, c) of its input.
        step: checkpoint step; None = latest.

    Raises:
        FileNotFoundError: no checkpoint under `workdir/checkpoints`.
        ValueError: the checkpoint does not fit `model`.
    """
    from pcjax.training import (
        checkpoint,  # imported here: Orbax is heavy, and only this function needs it
    )

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
        # Through the host: uncommitted arrays, placed by each jitted call like fresh ones
        # (committed ones beside uncommitted means would compile the analysis step twice).
        out[collection] = jax.tree.map(lambda a, w: jnp.asarray(np.asarray(a), w.dtype), got, want)
    return out
