"""Random-access sources of records, and reading them into tf.data.

TFDS datasets (cifar10, imagenet2012) are read with TFDS data sources over the `array_record`
file format, images left encoded (decoding happens in the parallel TF map, outside Python's
lock, and the ImageNet training crop decodes only the pixels it keeps); the digits sets are NumPy
arrays in memory. A record that cannot be read is reported with its shard file and index. The
functions here take a resolved `DatasetSpec`; the entry points of `input_pipeline` resolve names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from etils import epath

from pcjax.data import digits
from pcjax.data.datasets import DatasetSpec
from pcjax.data.prepared import (
    DEFAULT_DATA_DIR,
    DataNotPreparedError,
    missing_folder_error,
    prepare_command,
)
from pcjax.data.sampler import ArraySource

Example = dict[str, tf.Tensor]


class RecordReadError(IOError):
    """A record of a prepared dataset could not be read or decoded."""


def open_source(
    dataset: DatasetSpec, split: str, data_dir: str | None = None, image_size: int | None = None
) -> Sequence[Any]:
    """Returns a random-access source of split `split` of `dataset` (`len`, `source[i]`).

    `image_size` matters only for the in-memory digits sets, whose records are made at that size.

    Raises:
        DataNotPreparedError: a TFDS dataset missing or not prepared as array_record, with the
            exact command that prepares it.
    """
    name = dataset.name
    if not dataset.tfds:
        return ArraySource(*digits.load_split(name, split, image_size))
    import tensorflow_datasets as tfds

    builder = None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as error:  # any failure to open is reported with the fix
        folder = getattr(builder, "data_dir", None)
        if folder is not None and not epath.Path(folder).exists():  # TFDS's own text misleads
            raise missing_folder_error(name, data_dir, str(folder)) from None
        raise DataNotPreparedError(
            f"Dataset {name!r} (split {split!r}) is not prepared in the array_record format in "
            f"data_dir={data_dir or DEFAULT_DATA_DIR}: {type(error).__name__}: {error}\n"
            f"{prepare_command(name, data_dir)}"
        ) from error


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


def record_spec(dataset: DatasetSpec, image_size: int) -> tf.TensorSpec:
    """Shape and dtype of a batch of records as read (before preprocessing)."""
    if dataset.tfds:
        return tf.TensorSpec([None], tf.string)  # encoded JPEG (ImageNet) or PNG (CIFAR-10)
    return tf.TensorSpec([None, *dataset.image_shape(image_size)], tf.float32)


def stack_records(records: list[dict[str, Any]], image_spec: tf.TensorSpec) -> tuple:
    """Stacks records into (images, labels) NumPy arrays of the pipeline's record dtypes."""
    if image_spec.dtype == tf.string:
        images = np.array([bytes(r["image"]) for r in records], dtype=object)
    else:
        images = np.zeros((0, *image_spec.shape[1:]), image_spec.dtype.as_numpy_dtype)
        if records:
            images = np.stack([r["image"] for r in records]).astype(images.dtype, copy=False)
    labels = np.array([r["label"] for r in records], np.int32)
    return images, labels


def read_op(
    read: Callable[[int], tuple], image_spec: tf.TensorSpec
) -> Callable[[tf.Tensor], Example]:
    """Wraps a NumPy `read(key) -> (images, labels, positions)` as a tf.data map function."""

    def op(key: tf.Tensor) -> Example:
        images, labels, positions = tf.numpy_function(
            read, [key], [image_spec.dtype, tf.int32, tf.int64], stateful=False
        )
        images.set_shape(image_spec.shape)
        labels.set_shape([None])
        positions.set_shape([None])
        return {"image": images, "label": labels, "position": positions}

    return op
