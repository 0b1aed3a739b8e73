"""Which examples each training step reads: the global index sampler and process arguments.

`IndexSampler` fixes the global batch of every step from (seed, step) alone: the example indices
of step s are `permutation(seed, epoch)[pos : pos + B]` with `epoch = s // steps_per_epoch`,
`pos = (s % steps_per_epoch) * B` and `steps_per_epoch = num_examples // B`; each epoch is one
pass over the training set in a fresh permutation, and the last `num_examples % B` examples of
that permutation are dropped (which examples these are changes from epoch to epoch with the
permutation). Process p of P materialises rows `p * B / P : (p + 1) * B / P` of that global
batch, so 2 processes x 4 devices see the same examples in the same order as 1 x 8.
NumPy only: no TensorFlow, no JAX (JAX is asked for the process defaults alone).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from pcjax.data.datasets import per_process_batch_size


def resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process index, process count), `None` standing for JAX's; ValueError if inconsistent."""
    if process_index is None or process_count is None:
        import jax  # Only needed for the defaults; keeps this module importable without a backend.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
    return process_index, process_count


def check_seed(seed: int) -> None:
    """Raises ValueError for a negative seed (NumPy's `default_rng` and TF's stateless ops)."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}.")


class IndexSampler:
    """The global example indices of each training step, a function of (seed, step) only.

    Step s of epoch e = s // steps_per_epoch takes `permutation(seed, e)[pos : pos + B]`,
    `pos = (s % steps_per_epoch) * B`; the permutation is NumPy's
    `default_rng([seed, e]).permutation(num_examples)`, built once per epoch (O(N) integers, not
    O(N) record reads) and kept for the current and previous epoch. Thread-safe: the pipeline
    reads two steps concurrently.
    """

    def __init__(self, num_examples: int, global_batch_size: int, seed: int):
        check_seed(seed)
        if global_batch_size < 1 or num_examples < global_batch_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be in [1, num_examples="
                f"{num_examples}] (an epoch holds at least one full batch)."
            )
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.steps_per_epoch = num_examples // global_batch_size
        self._permutations: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def permutation(self, epoch: int) -> np.ndarray:
        """Returns int64[num_examples], the visiting order of `epoch`."""
        with self._lock:
            if epoch not in self._permutations:
                rng = np.random.default_rng([self.seed, epoch])
                self._permutations = {e: p for e, p in self._permutations.items() if e == epoch - 1}
                self._permutations[epoch] = rng.permutation(self.num_examples)
            return self._permutations[epoch]

    def global_indices(self, step: int) -> np.ndarray:
        """Returns int64[B], the example indices of the global batch of `step`, in order."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        epoch, within = divmod(step, self.steps_per_epoch)
        pos = within * self.global_batch_size
        return self.permutation(epoch)[pos : pos + self.global_batch_size]

    def process_rows(self, process_index: int, process_count: int) -> slice:
        """Rows of the global batch that process `process_index` of `process_count` materialises."""
        local = per_process_batch_size(self.global_batch_size, process_count)
        return slice(process_index * local, (process_index + 1) * local)


class ArraySource:
    """An in-memory random-access source over NumPy arrays (the digits sets)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index]}
