"""Thin Orbax wrapper: resume-by-default from a workdir, periodic and forced saves."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def create_manager(workdir: str, every_steps: int, max_to_keep: int) -> ocp.CheckpointManager:
    """A manager saving every `every_steps` steps under workdir/checkpoints, keeping the last k."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every_steps, max_to_keep=max_to_keep, create=True
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), options=options
    )


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> tuple[Any, int | None]:
    """Restores the latest checkpoint into `target`'s structure, shapes and shardings.

    Returns (state, step), or (target, None) when the workdir has no checkpoint yet.
    """
    step = manager.latest_step()
    if step is None:
        return target, None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract)), step


def save(manager: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> bool:
    """Saves asynchronously if `step` is due (or `force`); returns whether a save started."""
    return manager.save(step, args=ocp.args.StandardSave(state), force=force)
