"""Device prefetch: host batches become global arrays on the mesh a few steps before they are used.

No thread: the iterator keeps `size` device batches in a deque. Each `next` pops the oldest,
whose copy to the devices started `size` steps earlier and overlapped those steps, and
starts the copy of the next host batch (`sharding.shard_batch` returns once the copy is
enqueued). The host pipeline (tf.data) reads ahead on its own threads, so taking one host batch
per step costs the loop little; and with no thread of ours inside TensorFlow's iterator, ending
the run or the interpreter needs no waiting. `create_train_iterator` is the trainer's input:
the training stream of a config, through this prefetch.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from pcjax.training import sharding


class DevicePrefetcher:
    """Iterates global, device-resident batches, keeping up to `size` of them ahead on the devices.

    An error of the host iterator is raised by `next` once the batches read before it are used;
    every later call raises it again. `close` drops the queued batches and the host iterator.
    """

    def __init__(self, host_batches: Iterator[dict[str, np.ndarray]], mesh: Any, size: int = 2):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}.")
        self._host: Iterator | None = iter(host_batches)
        self._mesh = mesh
        self._size = size
        self._ahead: collections.deque = collections.deque()
        self._error: Exception | None = None

    def _fill(self) -> None:
        """Starts the transfers of host batches until `size` are queued or the host is done."""
        while self._host is not None and len(self._ahead) < self._size:
            try:
                batch = next(self._host)
            except StopIteration:
                self._host = None
            except Exception as error:  # raised once the batches read before it are used
                self._host, self._error = None, error
            else:
                with jax.transfer_guard("allow"):  # intended: the input onto its devices
                    self._ahead.append(sharding.shard_batch(batch, self._mesh))

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        self._fill()  # the first call; later the deque is full already, or the host is done
        if not self._ahead:
            if self._error is not None:
                raise self._error
            raise StopIteration
        batch = self._ahead.popleft()
        self._fill()  # the copy of the batch `size` steps ahead runs while this one is used
        return batch

    @property
    def closed(self) -> bool:
        """Whether the host iterator was let go (closed, or ran out or failed)."""
        return self._host is None

    def close(self) -> None:
        """Drops the queued device batches and the host iterator (tf.data frees its buffers)."""
        self._ahead.clear()
        self._host = None


def create_train_iterator(config: Any, start_step: int, mesh: Any) -> DevicePrefetcher:
    """The training input: global batches of steps `start_step, ...`, already on the devices."""
    from pcjax.data import input_pipeline  # TensorFlow: imported where used

    host = input_pipeline.create_train_dataset(
        config.data.name,
        global_batch_size=config.data.global_batch_size,
        seed=config.seed,
        data_dir=config.data.data_dir,
        image_size=config.data.image_size,
        start_step=start_step,
    )
    return DevicePrefetcher(host.as_numpy_iterator(), mesh)
