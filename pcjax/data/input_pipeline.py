"""Input pipelines: one global stream per seed on any topology, O(1) resume, exact evaluation.

Training. The examples of step s are those `sampler.IndexSampler` assigns to it from (seed, s)
alone, and process p of P materialises its contiguous rows of that global batch, so a run resumed
on another topology continues the same stream. Augmentation randomness is keyed on (seed, step,
position in the global batch), never on the process. The input state is the step (checkpointed
with the TrainState): creating the stream at step k reads only the records of steps k, k+1, ...
(random access through `sources`; nothing is replayed).

Executor (measured in docs/benchmarks/input_pipeline.md): the NumPy index sampler and one
random-access read per record (`source[i]`) inside a tf.data graph (a `tf.numpy_function` per
step, two steps read concurrently), then the TF per-example preprocessing of
`pcjax.data.preprocessing` (image decoding included) in a parallel, order-preserving map. Grain
0.2.18 installs on Python 3.11 but was not adopted: its sampler does the same index arithmetic
and tf.data already runs our TF preprocessing in parallel, without one more dependency.

Wire format. The pipelines yield host NumPy batches (`as_numpy_iterator`); the trainer puts them
on the devices (`pcjax.training.prefetch`). CIFAR-10 and ImageNet batches are uint8 (a quarter
of float32's bytes) and are normalised on the device (`datasets.normalize_images`, called at the
top of the train and eval steps). The digits sets stay float32: their upsampled, standardised
pixels are not integers, so uint8 would not be exact.

Evaluation stays exact: process p reads its contiguous share of the evaluation split, the last
batch padded with zero images that carry `mask == 0`, and every process yields the same number
of batches so that all processes run the same number of collective steps.

The entry points take a dataset name, resolve it to its `DatasetSpec` once and hand that down.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from pcjax.data import digits, preprocessing, sources
from pcjax.data.datasets import (
    DatasetSpec,
    num_eval_batches,
    per_process_batch_size,
    process_example_counts,
    spec,
)
from pcjax.data.sampler import IndexSampler, check_seed, resolve_processes

Example = sources.Example


def _dataset_options() -> tf.data.Options:
    options = tf.data.Options()
    # Outputs stay in order, which with stateless randomness makes streams reproducible.
    options.deterministic = True
    return options


# ------------------------------------------------------------------------------------------------
# Per-example preprocessing.


def _decode_cifar(png: tf.Tensor) -> tf.Tensor:
    return tf.ensure_shape(tf.io.decode_png(png, channels=3), [32, 32, 3])


def _train_image_fn(
    dataset: DatasetSpec, image_size: int
) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    name = dataset.name
    if name == "imagenet2012":
        return lambda image, seed: preprocessing.imagenet_train_preprocess(image, seed, image_size)
    if name == "cifar10":
        return lambda png, seed: preprocessing.cifar_train_preprocess(_decode_cifar(png), seed)
    if name == "digits_canvas":
        return lambda image, seed: image  # no augmentation: the placements are the variability
    padding = image_size // 8
    fill_value = digits.digits_background_value(image_size)
    return lambda image, seed: preprocessing.pad_and_random_crop(image, padding, seed, fill_value)


def _eval_image_fn(dataset: DatasetSpec, image_size: int) -> Callable[[tf.Tensor], tf.Tensor]:
    name = dataset.name
    if name == "imagenet2012":
        return lambda image: preprocessing.imagenet_eval_preprocess(image, image_size)
    if name == "cifar10":
        return lambda png: preprocessing.cifar_eval_preprocess(_decode_cifar(png))
    return lambda image: image  # digits: already standardised by `digits.load_split`


# ------------------------------------------------------------------------------------------------
# Pipelines.


def num_train_examples(name: str, data_dir: str | None = None) -> int:
    """Returns the number of training examples of `name` (the prepared split's, for TFDS)."""
    dataset = spec(name)
    if not dataset.tfds:
        return dataset.num_train_examples
    return len(sources.open_source(dataset, dataset.train_split, data_dir))


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
        source: random-access source of the training split (`None`: `sources.open_source`).

    Returns:
        A dataset of dicts {"image": uint8 (CIFAR-10, ImageNet) or float32 (digits)
        [b, h, w, c], "label": int32[b]} with b = global_batch_size // process_count.

    Raises:
        ValueError: for an unknown dataset, an unsupported image size, a negative seed or step,
            bad process arguments, or a global batch not divisible by the process count.
        DataNotPreparedError: a TFDS dataset that is not prepared as array_record.
    """
    dataset = spec(name)
    size = dataset.resolve_image_size(image_size)
    process_index, process_count = resolve_processes(process_index, process_count)
    per_process_batch_size(global_batch_size, process_count)
    check_seed(seed)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    preprocessing.hide_accelerators_from_tf()
    if source is None:
        source = sources.open_source(dataset, dataset.train_split, data_dir, size)
    sampler = IndexSampler(len(source), global_batch_size, seed)
    rows = sampler.process_rows(process_index, process_count)
    image_spec = sources.record_spec(dataset, size)

    def read(step: np.ndarray) -> tuple:
        step = int(step)
        indices = sampler.global_indices(step)[rows]
        images, labels = sources.stack_records(sources.read_records(source, indices), image_spec)
        positions = step * global_batch_size + np.arange(rows.start, rows.stop, dtype=np.int64)
        return images, labels, positions

    image_fn = _train_image_fn(dataset, size)
    seed_tensor = tf.constant(seed, tf.int64)

    def augment(example: Example) -> Example:
        image = image_fn(example["image"], tf.stack([seed_tensor, example["position"]]))
        return {"image": image, "label": example["label"]}

    ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
    ds = ds.map(sources.read_op(read, image_spec), num_parallel_calls=2).unbatch()
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
        source: random-access source of the evaluation split (`None`: `sources.open_source`).

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
    size = dataset.resolve_image_size(image_size)
    process_index, process_count = resolve_processes(process_index, process_count)
    batch_size = per_process_batch_size(global_batch_size, process_count)
    preprocessing.hide_accelerators_from_tf()
    if source is None:
        source = sources.open_source(dataset, dataset.eval_split, data_dir, size)
    num_examples = len(source)
    counts = process_example_counts(num_examples, process_count)
    first = sum(counts[:process_index])
    image_spec = sources.record_spec(dataset, size)

    def read(indices: np.ndarray) -> tuple:
        images, labels = sources.stack_records(sources.read_records(source, indices), image_spec)
        return images, labels, indices.astype(np.int64)

    image_fn = _eval_image_fn(dataset, size)

    def preprocess(example: Example) -> Example:
        image = image_fn(example["image"])
        return {"image": image, "label": example["label"], "mask": tf.constant(1.0)}

    real = tf.data.Dataset.range(first, first + counts[process_index]).batch(batch_size)
    real = real.map(sources.read_op(read, image_spec)).unbatch()
    real = real.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    shape = dataset.image_shape(size)
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
