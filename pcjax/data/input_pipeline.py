"""Input pipelines: one global stream per seed on any topology, O(1) resume, device prefetch.

Training. `IndexSampler` fixes the global batch of every step from (seed, step) alone: the
example indices of step s are `permutation(seed, epoch)[pos : pos + B]` with
`epoch = s // steps_per_epoch`, `pos = (s % steps_per_epoch) * B` and
`steps_per_epoch = num_examples // B`; each epoch is one pass over the training set in a fresh
permutation, and the last `num_examples % B` examples of that permutation are dropped (which
examples these are changes from epoch to epoch with the permutation). Process p of P materialises
rows `p * B / P : (p + 1) * B / P` of that global batch, so 2 processes x 4 devices see the
same images, labels and order as 1 x 8, and a run resumed on another topology continues the same
stream. Augmentation randomness is keyed on (seed, step, position in the global batch), never on
the process. The input state is the step (checkpointed with the TrainState): creating the stream
at step k reads only the records of steps k, k+1, ... (random access; nothing is replayed).

Sources. TFDS datasets (cifar10, imagenet2012) are read with `tfds.data_source` from the
`array_record` file format; `check_prepared` says how to prepare them if they are missing or
in another format. The digits sets are NumPy arrays in memory. A record that cannot be read is
reported with its shard file and index.

Executor (measured in docs/benchmarks/input_pipeline.md): a NumPy index sampler and one
random-access read per record (`source[i]`) inside a tf.data graph (a `tf.numpy_function` per
step, two steps read concurrently), then the TF per-example preprocessing of
`pcjax.data.preprocessing` (image decoding included) in a parallel, order-preserving map. Grain
0.2.18 installs on Python 3.11 but was not adopted: its sampler does the same index arithmetic
and tf.data already runs our TF preprocessing in parallel, without one more dependency.

Wire format. CIFAR-10 and ImageNet batches leave the host as uint8 (a quarter of float32's bytes)
and are normalised on the device (`datasets.normalize_images`, called at the top of the train
and eval steps). The digits sets stay float32: their upsampled, standardised pixels are not
integers, so uint8 would not be exact. `DevicePrefetcher` keeps batches already on the devices
(`jax.make_array_from_process_local_data`) so the step does not wait on the host transfer.

Evaluation stays exact: process p reads its contiguous share of the evaluation split, the last
batch padded with zero images that carry `mask == 0`, and every process yields the same number
of batches so that all processes run the same number of collective steps.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from pcjax.data import digits, preprocessing
from pcjax.data.datasets import (
    image_shape,
    num_eval_batches,
    per_process_batch_size,
    process_example_counts,
    resolve_image_size,
    spec,
)

Example = dict[str, tf.Tensor]
DEFAULT_DATA_DIR = "$TFDS_DATA_DIR or ~/tensorflow_datasets"


class DataNotPreparedError(ValueError):
    """A TFDS dataset is missing from the data directory or not in the array_record format."""


class RecordReadError(IOError):
    """A record of a prepared dataset could not be read or decoded."""


# ------------------------------------------------------------------------------------------------
# Processes and seeds.


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # Only needed for the defaults; keeps this module importable without a backend.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
    return process_index, process_count


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}.")


def _dataset_options() -> tf.data.Options:
    options = tf.data.Options()
    # Outputs stay in order, which with stateless randomness makes streams reproducible.
    options.deterministic = True
    return options


# ------------------------------------------------------------------------------------------------
# The global index sampler.


class IndexSampler:
    """The global example indices of each training step, a function of (seed, step) only.

    Step s of epoch e = s // steps_per_epoch takes `permutation(seed, e)[pos : pos + B]`,
    `pos = (s % steps_per_epoch) * B`; the permutation is NumPy's
    `default_rng([seed, e]).permutation(num_examples)`, built once per epoch (O(N) integers, not
    O(N) record reads) and kept for the current and previous epoch.
    """

    def __init__(self, num_examples: int, global_batch_size: int, seed: int):
        _check_seed(seed)
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


# ------------------------------------------------------------------------------------------------
# Random-access sources.


class ArraySource:
    """An in-memory random-access source over NumPy arrays (the digits sets)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index]}


def _prepare_command(name: str, data_dir: str | None) -> str:
    """The commands that prepare `name` as array_record in `data_dir` (Python API and TFDS CLI)."""
    dir_arg = f", data_dir={data_dir!r}" if data_dir else ""
    dir_flag = f" --data_dir={data_dir}" if data_dir else ""
    prepare = "download_and_prepare()"
    manual_flag = ""
    lines = []
    if name == "imagenet2012":
        manual = os.path.join(
            data_dir or os.path.expanduser("~/tensorflow_datasets"), "downloads", "manual"
        )
        config = f"tfds.download.DownloadConfig(manual_dir={manual!r})"
        prepare = f"download_and_prepare(download_config={config})"
        manual_flag = f" --manual_dir={manual}"
        lines.append(
            "ImageNet needs a manual download: register at https://image-net.org and put "
            f"ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {manual}/. Then run:"
        )
    else:
        lines.append("Prepare it once (it downloads the data) with:")
    lines += [
        f'    python -c "import tensorflow_datasets as tfds; tfds.builder({name!r}{dir_arg}, '
        f"file_format='array_record').{prepare}\"",
        "or, where the TFDS command line works (it needs apache-beam):",
        f"    tfds build {name} --file_format=array_record{dir_flag}{manual_flag}",
    ]
    return "\n".join(lines)


def _tfds_decoders(name: str) -> dict[str, Any] | None:
    import tensorflow_datasets as tfds

    # Images stay encoded: decoding happens in the parallel TF map (outside Python's lock), and
    # the ImageNet training crop decodes only the pixels it keeps.
    return {"image": tfds.decode.SkipDecoding()}


def open_source(
    name: str, split: str, data_dir: str | None = None, image_size: int | None = None
) -> Sequence[Any]:
    """Returns a random-access source of split `split` of `name` (`len`, `source[i]`).

    `image_size` matters only for the in-memory digits sets, whose records are made at that size.

    Raises:
        DataNotPreparedError: a TFDS dataset missing or not prepared as array_record, with the
            exact command that prepares it.
    """
    dataset = spec(name)
    if not dataset.tfds:
        return ArraySource(*digits.load_split(name, split, image_size))
    import tensorflow_datasets as tfds

    builder = None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        return builder.as_data_source(split=split, decoders=_tfds_decoders(name))
    except Exception as error:  # any failure to open is reported with the fix
        folder = getattr(builder, "data_dir", None)
        if folder is not None and not tf.io.gfile.exists(folder):  # TFDS's own text misleads
            raise DataNotPreparedError(
                f"Dataset {name!r} is not in data_dir={data_dir or DEFAULT_DATA_DIR} (no folder "
                f"{folder}).\n{_prepare_command(name, data_dir)}"
            ) from None
        raise DataNotPreparedError(
            f"Dataset {name!r} (split {split!r}) is not prepared in the array_record format in "
            f"data_dir={data_dir or DEFAULT_DATA_DIR}: {type(error).__name__}: {error}\n"
            f"{_prepare_command(name, data_dir)}"
        ) from error


def check_prepared(name: str, data_dir: str | None = None) -> None:
    """Opens both splits of `name` (no record is read); raises DataNotPreparedError if it fails."""
    dataset = spec(name)
    if dataset.tfds:
        for split in (dataset.train_split, dataset.eval_split):
            open_source(name, split, data_dir)


def _locate(source: Any, index: int) -> str:
    """Names the shard file and in-file position of record `index` of a TFDS data source."""
    try:
        instructions = source.dataset_info.splits[source.split].file_instructions
    except Exception:  # not a TFDS source, or no file layout recorded
        return f"record {index}"
    offset = 0
    for instruction in instructions:
        if index < offset + instruction.take:
            return f"record {instruction.skip + index - offset} of {instruction.filename}"
        offset += instruction.take
    return f"record {index} (beyond the {offset} records of the split)"


def read_records(source: Any, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Reads `indices` from `source` one record at a time; a failure names file and index.

    One `source[i]` per record (TFDS's mocked data sources implement only that).
    """
    records = []
    for index in indices:
        index = int(index)
        try:
            records.append(source[index])
        except Exception as error:
            raise RecordReadError(
                f"Cannot read {_locate(source, index)} (example {index} of {source!r}): "
                f"{type(error).__name__}: {error}"
            ) from error
    return records


def _stack(records: list[dict[str, Any]], name: str, image_spec: tf.TensorSpec) -> tuple:
    """Stacks records into (images, labels) NumPy arrays of the pipeline's record dtypes."""
    if image_spec.dtype == tf.string:
        images = np.array([bytes(r["image"]) for r in records], dtype=object)
    else:
        images = np.zeros((0, *image_spec.shape[1:]), image_spec.dtype.as_numpy_dtype)
        if records:
            images = np.stack([r["image"] for r in records]).astype(images.dtype, copy=False)
    labels = np.array([r["label"] for r in records], np.int32)
    return images, labels


def _record_spec(name: str, image_size: int) -> tf.TensorSpec:
    """Shape and dtype of a batch of records as read (before preprocessing)."""
    if spec(name).tfds:
        return tf.TensorSpec([None], tf.string)  # encoded JPEG (ImageNet) or PNG (CIFAR-10)
    return tf.TensorSpec([None, *image_shape(name, image_size)], tf.float32)


def _read_op(
    read: Callable[[int], tuple], name: str, image_size: int
) -> Callable[[tf.Tensor], Example]:
    """Wraps a NumPy `read(key) -> (images, labels, positions)` as a tf.data map function."""
    image_spec = _record_spec(name, image_size)

    def op(key: tf.Tensor) -> Example:
        images, labels, positions = tf.numpy_function(
            read, [key], [image_spec.dtype, tf.int32, tf.int64], stateful=False
        )
        images.set_shape(image_spec.shape)
        labels.set_shape([None])
        positions.set_shape([None])
        return {"image": images, "label": labels, "position": positions}

    return op


# ------------------------------------------------------------------------------------------------
# Per-example preprocessing.


def _decode_cifar(png: tf.Tensor) -> tf.Tensor:
    return tf.ensure_shape(tf.io.decode_png(png, channels=3), [32, 32, 3])


def _train_image_fn(name: str, image_size: int) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    if name == "imagenet2012":
        return lambda image, seed: preprocessing.imagenet_train_preprocess(image, seed, image_size)
    if name == "cifar10":
        return lambda png, seed: preprocessing.cifar_train_preprocess(_decode_cifar(png), seed)
    if name == "digits_canvas":
        return lambda image, seed: image  # no augmentation: the placements are the variability
    padding = image_size // 8
    fill_value = digits.digits_background_value(image_size)
    return lambda image, seed: preprocessing.pad_and_random_crop(image, padding, seed, fill_value)


def _eval_image_fn(name: str, image_size: int) -> Callable[[tf.Tensor], tf.Tensor]:
    if name == "imagenet2012":
        return lambda image: preprocessing.imagenet_eval_preprocess(image, image_size)
    if name == "cifar10":
        return lambda png: preprocessing.cifar_eval_preprocess(_decode_cifar(png))
    return lambda image: image  # digits: already standardised by `toy_data`


# ------------------------------------------------------------------------------------------------
# Pipelines.


def num_train_examples(name: str, data_dir: str | None = None) -> int:
    """Returns the number of training examples of `name` (the prepared split's, for TFDS)."""
    dataset = spec(name)
    if not dataset.tfds:
        return dataset.num_train_examples
    return len(open_source(name, dataset.train_split, data_dir))


def create_train_dataset(
    name: str,
    *,
    global_batch_size: int,
    seed: int,
    data_dir: str | None = None,
    image_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
    source: Any = None,
) -> tf.data.Dataset:
    """Returns this process's infinite stream of its rows of the global training batches.

    Batch k of the stream is this process's slice of `IndexSampler(...).global_indices(
    start_step + k)`, read from `source`, augmented with the stateless seed
    (seed, global position) where the global position of row r of step s is `s * B + r`.
    Creating it reads nothing; each step reads only its own records.

    Args:
        name: dataset name, a key of `datasets.DATASETS`.
        global_batch_size: examples per step over all processes.
        seed: non-negative seed of the permutations and augmentations.
        data_dir: TFDS data directory (`None`: the TFDS default).
        image_size: output side length (`None`: the dataset default; CIFAR-10 only allows 32).
        process_index: this process (`None`: `jax.process_index()`).
        process_count: number of processes (`None`: `jax.process_count()`).
        start_step: first step of the stream (resume).
        source: random-access source of the training split (`None`: `open_source(...)`).

    Returns:
        A dataset of dicts {"image": uint8 (CIFAR-10, ImageNet) or float32 (digits)
        [b, h, w, c], "label": int32[b]} with b = global_batch_size // process_count.

    Raises:
        ValueError: for an unknown dataset, an unsupported image size, a negative seed or step,
            bad process arguments, or a global batch not divisible by the process count.
        DataNotPreparedError: a TFDS dataset that is not prepared as array_record.
    """
    dataset = spec(name)
    size = resolve_image_size(name, image_size)
    process_index, process_count = _resolve_processes(process_index, process_count)
    per_process_batch_size(global_batch_size, process_count)
    _check_seed(seed)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    preprocessing.hide_accelerators_from_tf()
    if source is None:
        source = open_source(name, dataset.train_split, data_dir, size)
    sampler = IndexSampler(len(source), global_batch_size, seed)
    rows = sampler.process_rows(process_index, process_count)
    image_spec = _record_spec(name, size)

    def read(step: np.ndarray) -> tuple:
        step = int(step)
        indices = sampler.global_indices(step)[rows]
        images, labels = _stack(read_records(source, indices), name, image_spec)
        positions = step * global_batch_size + np.arange(rows.start, rows.stop, dtype=np.int64)
        return images, labels, positions

    image_fn = _train_image_fn(name, size)
    seed_tensor = tf.constant(seed, tf.int64)

    def augment(example: Example) -> Example:
        image = image_fn(example["image"], tf.stack([seed_tensor, example["position"]]))
        return {"image": image, "label": example["label"]}

    ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
    ds = ds.map(_read_op(read, name, size), num_parallel_calls=2).unbatch()
    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(rows.stop - rows.start, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_dataset_options())


def create_eval_dataset(
    name: str,
    *,
    global_batch_size: int,
    data_dir: str | None = None,
    image_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    source: Any = None,
) -> tuple[tf.data.Dataset, int]:
    """Returns this process's single pass over its share of the evaluation split, padded.

    Process p reads the contiguous examples `sum(counts[:p]) : sum(counts[:p + 1])` with
    `counts = process_example_counts(n, process_count)` (the split of
    `tfds.split_for_jax_process(..., drop_remainder=False)`). Every process yields
    `num_eval_batches(...)` full batches: real examples with `mask == 1`, then zero images with
    label 0 and `mask == 0`. Dividing masked counts by the returned total gives exact accuracy.

    Args:
        name: dataset name, a key of `datasets.DATASETS`.
        global_batch_size: examples per step over all processes.
        data_dir: TFDS data directory (`None`: the TFDS default).
        image_size: output side length (`None`: the dataset default; CIFAR-10 only allows 32).
        process_index: this process (`None`: `jax.process_index()`).
        process_count: number of processes (`None`: `jax.process_count()`).
        source: random-access source of the evaluation split (`None`: `open_source(...)`).

    Returns:
        (dataset, num_examples): a finite dataset of dicts {"image": [b, h, w, c] (dtype as in
        `create_train_dataset`), "label": int32[b], "mask": float32[b]} with
        b = global_batch_size // process_count, and the number of real examples in the split.

    Raises:
        ValueError: for an unknown dataset, an unsupported image size, bad process arguments,
            or a global batch not divisible by the process count.
        DataNotPreparedError: a TFDS dataset that is not prepared as array_record.
    """
    dataset = spec(name)
    size = resolve_image_size(name, image_size)
    process_index, process_count = _resolve_processes(process_index, process_count)
    batch_size = per_process_batch_size(global_batch_size, process_count)
    preprocessing.hide_accelerators_from_tf()
    if source is None:
        source = open_source(name, dataset.eval_split, data_dir, size)
    num_examples = len(source)
    counts = process_example_counts(num_examples, process_count)
    first = sum(counts[:process_index])
    image_spec = _record_spec(name, size)

    def read(indices: np.ndarray) -> tuple:
        images, labels = _stack(read_records(source, indices), name, image_spec)
        return images, labels, indices.astype(np.int64)

    image_fn = _eval_image_fn(name, size)

    def preprocess(example: Example) -> Example:
        image = image_fn(example["image"])
        return {"image": image, "label": example["label"], "mask": tf.constant(1.0)}

    real = tf.data.Dataset.range(first, first + counts[process_index]).batch(batch_size)
    real = real.map(_read_op(read, name, size)).unbatch()
    real = real.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    shape = image_shape(name, size)
    dtype = tf.uint8 if dataset.tfds else tf.float32
    padding = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros(shape, dtype),
            "label": tf.constant(0, tf.int32),
            "mask": tf.constant(0.0, tf.float32),
        }
    ).repeat()
    num_batches = num_eval_batches(num_examples, batch_size, process_count)
    ds = real.concatenate(padding).take(num_batches * batch_size)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_dataset_options()), num_examples


# ------------------------------------------------------------------------------------------------
# Device-side prefetch and the trainer's entry point.


def _put(out: queue.Queue, stop: threading.Event, item: Any) -> bool:
    """Puts `item` unless `stop` is set first; returns whether it was put."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.5)
            return True
        except queue.Full:
            pass
    return False


def _fill(host_batches: Iterator, mesh: Any, out: queue.Queue, stop: threading.Event) -> None:
    """Producer thread of `DevicePrefetcher`: global device batches, then a final marker."""
    from pcjax.training import sharding

    try:
        for batch in host_batches:
            if not _put(out, stop, sharding.shard_batch(batch, mesh)):
                return
        _put(out, stop, DevicePrefetcher.DONE)
    except BaseException as error:  # handed to the consumer
        _put(out, stop, error)


class DevicePrefetcher:
    """Iterates global, device-resident batches, keeping `size` of them ahead on the devices.

    A background thread turns each per-process host batch into a global array sharded over the
    mesh's batch axis (`sharding.shard_batch`); an error in the thread is raised by `__next__`.
    The thread stops on `close()` or when the prefetcher is garbage-collected.
    """

    DONE = object()

    def __init__(self, host_batches: Iterator[dict[str, np.ndarray]], mesh: Any, size: int = 2):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}.")
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        # The thread holds no reference to `self`, so dropping the prefetcher stops it.
        self._thread = threading.Thread(
            target=_fill,
            args=(host_batches, mesh, self._queue, self._stop),
            daemon=True,
            name="device-prefetch",
        )
        weakref.finalize(self, self._stop.set)
        self._thread.start()

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> dict[str, Any]:
        item = self._queue.get()
        if item is self.DONE or isinstance(item, BaseException):
            self._queue.put(item)  # every later call ends the same way
            if item is self.DONE:
                raise StopIteration
            raise item
        return item

    def close(self, timeout_s: float = 120.0) -> None:
        """Stops the background thread and waits for it (at most `timeout_s`).

        Waiting matters at interpreter exit: a daemon thread still inside TensorFlow's C++
        iterator when Python finalises aborts the process, after the run has finished.
        """
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)


def create_train_iterator(config: Any, start_step: int, mesh: Any) -> DevicePrefetcher:
    """The trainer's training input: global batches of steps `start_step, ...`, on the devices."""
    host = create_train_dataset(
        config.data.name,
        global_batch_size=config.data.global_batch_size,
        seed=config.seed,
        data_dir=config.data.data_dir,
        image_size=config.data.image_size,
        start_step=start_step,
    )
    return DevicePrefetcher(host.as_numpy_iterator(), mesh)
