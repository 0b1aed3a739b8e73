"""Data-parallel layout: one mesh axis over every device of every process.

The batch is split along "data"; the train state is replicated. The step is written as if on
one device over the global batch, and XLA inserts the gradient all-reduce (and the cross-device
reductions of batch statistics).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named "data" over `devices` (default: all devices of all processes).

    The axis is Auto: shardings are fixed at the jitted step's inputs and outputs and XLA
    propagates them inside (an Explicit axis would carry the batch sharding in every traced
    type). Stated here because `jax.make_mesh` defaults to Explicit axes.
    """
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds a full copy (train state)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the "data" axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles per-process batches into global arrays sharded over the batch axis.

    Each process passes its own `global_batch / process_count` examples.
    """
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a host pytree on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
