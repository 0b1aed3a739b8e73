"""Input pipelines: per-process training streams and exact, padded evaluation passes.

Each process yields per-process batches of `global_batch_size // process_count` examples;
turning those into global jax arrays is the caller's job. Evaluation streams are exact: every
example once, the last batch padded with zero images that carry `mask == 0`, and the same number
of batches on every process so that all processes run the same number of collective steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from pcjax import preprocessing, toy_data
from pcjax.datasets import (
    image_shape,
    num_eval_batches,
    per_process_batch_size,
    resolve_image_size,
    spec,
)

Example = dict[str, tf.Tensor]
# Training shuffle buffers, in examples (encoded JPEGs for ImageNet); default: the whole split.
_SHUFFLE_BUFFER = {"imagenet2012": 10_000}


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



def _process_seed(seed: int, process_index: int) -> int:
    """Derives a 32-bit seed per process so processes shuffle and augment independently."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}.")
    return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])


def _dataset_options() -> tf.data.Options:
    options = tf.data.Options()
    # Outputs stay in order, which with stateless randomness makes streams reproducible.
    options.deterministic = True
    return options



def _tfds_split_size(builder: tfds.core.DatasetBuilder, split: str, default: int) -> int:
    """Returns the split size recorded by a prepared dataset, else the documented size."""
    splits = builder.info.splits
    if split in splits and splits[split].num_examples > 0:
        return splits[split].num_examples
    return default


def num_train_examples(name: str, data_dir: str | None = None) -> int:
    """Returns the number of training examples of dataset `name` (over all processes).

    Args:
        name: dataset name, a key of `DATASETS`.
        data_dir: TFDS data directory; when the dataset is prepared there its recorded split size
            is used, otherwise the size in `DATASETS`.

    Raises:
        ValueError: for an unknown dataset name.
    """
    dataset = spec(name)
    if not dataset.tfds:
        return len(toy_data.load_split(name, dataset.train_split, dataset.image_size)[1])
    return _tfds_split_size(
        tfds.builder(name, data_dir=data_dir), dataset.train_split, dataset.num_train_examples
    )



def _digits_dataset(
    split: str, image_size: int, process_index: int, process_count: int, name: str = "digits"
) -> tf.data.Dataset:
    images, labels = toy_data.load_split(name, split, image_size)
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
    return ds.shard(process_count, process_index)


# ------------------------------------------------------------------------------------------------
# Pipelines.


def _tfds_decoders(name: str) -> dict[str, Any] | None:
    # ImageNet JPEGs stay encoded so the training crop decodes only the pixels it keeps.
    return {"image": tfds.decode.SkipDecoding()} if name == "imagenet2012" else None


def _train_preprocess_fn(name: str, image_size: int) -> Callable[[Example, tf.Tensor], Example]:
    if name == "imagenet2012":

        def image_fn(image, seed):
            return preprocessing.imagenet_train_preprocess(image, seed, image_size)

    elif name == "cifar10":
        image_fn = preprocessing.cifar_train_preprocess
    elif name == "digits_canvas":

        def image_fn(image, seed):
            del seed  # no augmentation: the fixed placements are the variability studied
            return image

    else:
        padding = image_size // 8
        fill_value = toy_data.digits_background_value(image_size)

        def image_fn(image, seed):
            return preprocessing.pad_and_random_crop(image, padding, seed, fill_value)

    def preprocess(example: Example, seed: tf.Tensor) -> Example:
        return {
            "image": image_fn(example["image"], seed),
            "label": tf.cast(example["label"], tf.int32),
        }

    return preprocess


def _eval_preprocess_fn(name: str, image_size: int) -> Callable[[Example], Example]:
    if name == "imagenet2012":

        def image_fn(image):
            return preprocessing.imagenet_eval_preprocess(image, image_size)

    elif name == "cifar10":
        image_fn = preprocessing.cifar_eval_preprocess
    else:

        def image_fn(image):
            return image  # Already standardised by `load_digits_split`.

    def preprocess(example: Example) -> Example:
        return {
            "image": image_fn(example["image"]),
            "label": tf.cast(example["label"], tf.int32),
        }

    return preprocess


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
) -> tf.data.Dataset:
    """Returns this process's infinite, shuffled, augmented stream of training batches.

    Each process reads a disjoint, equal-sized slice of the training split
    (`tfds.split_for_jax_process(..., drop_remainder=True)`, or `Dataset.shard` for digits),
    shuffles it with a seed derived from (`seed`, process index) and draws each example's
    augmentation from a stateless seed keyed on its position in the stream, so the stream is
    reproducible. Prepared TFDS data is required: nothing is downloaded.

    Args:
        name: dataset name, a key of `DATASETS`.
        global_batch_size: examples per step over all processes.
        seed: non-negative base seed for shuffling and augmentation.
        data_dir: TFDS data directory (`None`: the TFDS default).
        image_size: output side length (`None`: the dataset default; CIFAR-10 only allows 32).
        process_index: this process (`None`: `jax.process_index()`).
        process_count: number of processes (`None`: `jax.process_count()`).
        start_step: batches to skip, so a resumed run sees exactly the batches an uninterrupted
            one would. Skipped examples are read but neither decoded nor augmented.

    Returns:
        A dataset of dicts {"image": float32[b, h, w, c], "label": int32[b]} with
        b = global_batch_size // process_count; it never ends.

    Raises:
        ValueError: for an unknown dataset, an unsupported image size, a negative seed, bad
            process arguments, or a global batch not divisible by the process count.
    """
    dataset = spec(name)
    size = resolve_image_size(name, image_size)
    process_index, process_count = _resolve_processes(process_index, process_count)
    batch_size = per_process_batch_size(global_batch_size, process_count)
    process_seed = _process_seed(seed, process_index)
    preprocessing.hide_accelerators_from_tf()

    if not dataset.tfds:
        ds = _digits_dataset(dataset.train_split, size, process_index, process_count, name)
    else:
        split = tfds.split_for_jax_process(
            dataset.train_split,
            process_index=process_index,
            process_count=process_count,
            drop_remainder=True,
        )
        ds = tfds.builder(name, data_dir=data_dir).as_dataset(
            split=split,
            shuffle_files=True,
            decoders=_tfds_decoders(name),
            read_config=tfds.ReadConfig(shuffle_seed=process_seed, skip_prefetch=True),
        )
        if name == "cifar10":  # the decoded training split fits in host memory
            ds = ds.cache()

    preprocess = _train_preprocess_fn(name, size)
    seed_tensor = tf.constant(process_seed, tf.int64)

    def augment(index: tf.Tensor, example: Example) -> Example:
        return preprocess(example, tf.stack([seed_tensor, index]))

    buffer = _SHUFFLE_BUFFER.get(name, dataset.num_train_examples)
    ds = ds.repeat().shuffle(buffer, seed=process_seed)
    ds = ds.enumerate()
    if start_step:
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}.")
        ds = ds.skip(start_step * batch_size)  # before `map`: no decoding of skipped examples
    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_dataset_options())


def _pad_to_batches(
    ds: tf.data.Dataset, num_batches: int, batch_size: int, shape: tuple[int, int, int]
) -> tf.data.Dataset:
    """Appends masked zero examples so that `ds` fills exactly `num_batches` full batches."""
    real = ds.map(lambda ex: {**ex, "mask": tf.constant(1.0, tf.float32)})
    padding = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros(shape, tf.float32),
            "label": tf.constant(0, tf.int32),
            "mask": tf.constant(0.0, tf.float32),
        }
    ).repeat()
    ds = real.concatenate(padding).take(num_batches * batch_size)
    return ds.batch(batch_size, drop_remainder=True)


def create_eval_dataset(
    name: str,
    *,
    global_batch_size: int,
    data_dir: str | None = None,
    image_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tuple[tf.data.Dataset, int]:
    """Returns this process's single pass over its share of the evaluation split, padded.

    The processes split the evaluation set without dropping anything
    (`tfds.split_for_jax_process(..., drop_remainder=False)`, or `Dataset.shard` for digits).
    Every process yields `num_eval_batches(...)` full batches: real examples with `mask == 1`,
    then zero images with label 0 and `mask == 0`. Dividing masked counts by the returned total
    gives exact accuracy, and all processes take part in the same number of steps.

    Args:
        name: dataset name, a key of `DATASETS`.
        global_batch_size: examples per step over all processes.
        data_dir: TFDS data directory (`None`: the TFDS default).
        image_size: output side length (`None`: the dataset default; CIFAR-10 only allows 32).
        process_index: this process (`None`: `jax.process_index()`).
        process_count: number of processes (`None`: `jax.process_count()`).

    Returns:
        (dataset, num_examples): a finite dataset of dicts {"image": float32[b, h, w, c],
        "label": int32[b], "mask": float32[b]} with b = global_batch_size // process_count, and
        the number of real examples in the evaluation split over all processes.

    Raises:
        ValueError: for an unknown dataset, an unsupported image size, bad process arguments,
            or a global batch not divisible by the process count.
    """
    dataset = spec(name)
    size = resolve_image_size(name, image_size)
    process_index, process_count = _resolve_processes(process_index, process_count)
    batch_size = per_process_batch_size(global_batch_size, process_count)
    preprocessing.hide_accelerators_from_tf()

    if not dataset.tfds:
        num_examples = len(toy_data.load_split(name, dataset.eval_split, size)[1])
        ds = _digits_dataset(dataset.eval_split, size, process_index, process_count, name)
    else:
        builder = tfds.builder(name, data_dir=data_dir)
        num_examples = _tfds_split_size(builder, dataset.eval_split, dataset.num_eval_examples)
        split = tfds.split_for_jax_process(
            dataset.eval_split,
            process_index=process_index,
            process_count=process_count,
            drop_remainder=False,
        )
        ds = builder.as_dataset(
            split=split,
            shuffle_files=False,
            decoders=_tfds_decoders(name),
            read_config=tfds.ReadConfig(skip_prefetch=True),
        )

    ds = ds.map(_eval_preprocess_fn(name, size), num_parallel_calls=tf.data.AUTOTUNE)
    num_batches = num_eval_batches(num_examples, batch_size, process_count)
    ds = _pad_to_batches(ds, num_batches, batch_size, image_shape(name, size))
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_dataset_options())
    return ds, num_examples
