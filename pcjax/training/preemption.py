"""SIGTERM handling: every process saves the same step and stops with a distinct exit status."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from pcjax.training import sharding

if TYPE_CHECKING:
    pass


# Exit status of a run stopped by SIGTERM after saving (128 + SIGTERM, as a shell reports it):
# not 0, so that a scheduler does not take a preempted job for a finished one.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class Preempted(Exception):
    """SIGTERM reached a process: every process saved step `step` and stopped."""

    def __init__(self, step: int, path: str):
        super().__init__(
            f"Preempted: saved step {step} in {path}; rerun the same command to resume."
        )
        self.step = step


class Stopper:
    """SIGTERM (what a scheduler sends before it preempts a job) sets a local flag; `poll` says
    when every process stops.

    One process may receive the signal and another not, or at different steps. With several
    processes the flags are max-reduced over the mesh after every step and the result is read
    one step later, so that every process stops after the same step without a host sync per
    step (XLA runs the reduction after the step it follows).
    """

    def __init__(self, mesh: jax.sharding.Mesh):
        self.set = False
        self._previous = None
        self._mesh = mesh
        self._pending = None
        self._reduce = jax.jit(jnp.max, out_shardings=sharding.replicated(mesh))

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some notebook runners)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.set = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def poll(self) -> bool:
        """Whether to stop now; call once per step on every process."""
        if jax.process_count() == 1:
            return self.set
        decided = self._pending is not None and bool(jax.device_get(self._pending))
        local = np.full((jax.local_device_count(),), int(self.set), np.int32)
        with jax.transfer_guard("allow"):  # intended: this process's flag onto its devices
            flags = jax.make_array_from_process_local_data(
                sharding.batch_sharded(self._mesh), local
            )
        self._pending = self._reduce(flags)
        return decided
