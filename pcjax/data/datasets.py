"""Dataset metadata: names, sizes, classes, splits and the split arithmetic of multi-process input.

Pure Python and NumPy (no TensorFlow, no JAX), so that config validation, the trainer's step
counts and the model's input shape come from this one table without starting the input pipeline.
The pipelines resolve a name to its `DatasetSpec` once and hand the spec down.
`normalize_images` is the normalisation the train and eval steps apply to each batch on the device.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DIGITS_NUM_EXAMPLES = 1797
DIGITS_NUM_TEST_EXAMPLES = 450  # ceil(0.25 * 1797): `toy_data.load_digits_split` defaults.
# "digits_canvas": each 8x8 digit, upsampled to DIGITS_CANVAS_DIGIT_SIZE, pasted at a random
# (fixed per example) position of a larger blank canvas: spatial variability for the
# class-separation experiment (experiments/separation.py).
DIGITS_CANVAS_DIGIT_SIZE = 16
DIGITS_CANVAS_SIZE = 32


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a supported dataset.

    Attributes:
        name: the dataset's name, its key in `DATASETS` (and its TFDS name for TFDS datasets).
        image_size: default height = width of the images the pipelines yield.
        num_channels: channels of the yielded images.
        num_classes: number of labels.
        train_split: split used for training.
        eval_split: split used for evaluation.
        num_train_examples: size of `train_split`.
        num_eval_examples: size of `eval_split`.
        tfds: whether the examples come from a prepared TFDS dataset (else: in memory, NumPy).
    """

    name: str
    image_size: int
    num_channels: int
    num_classes: int
    train_split: str
    eval_split: str
    num_train_examples: int
    num_eval_examples: int
    tfds: bool

    def resolve_image_size(self, image_size: int | None) -> int:
        """The side of the images yielded (`None`: the default); ValueError if unsupported."""
        if image_size is None:
            return self.image_size
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}.")
        if self.name == "cifar10" and image_size != self.image_size:
            raise ValueError(f"cifar10 images are 32x32; image_size={image_size} is not supported.")
        if self.name == "digits":
            check_digits_image_size(image_size)
        if self.name == "digits_canvas":
            check_canvas_size(image_size)
        return image_size

    def image_shape(self, image_size: int | None = None) -> tuple[int, int, int]:
        """(height, width, channels) of the images yielded at `image_size` (`None`: default)."""
        size = self.resolve_image_size(image_size)
        return (size, size, self.num_channels)


def _digits_spec(name: str, image_size: int) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        image_size=image_size,
        num_channels=1,
        num_classes=10,
        train_split="train",
        eval_split="test",
        num_train_examples=DIGITS_NUM_EXAMPLES - DIGITS_NUM_TEST_EXAMPLES,
        num_eval_examples=DIGITS_NUM_TEST_EXAMPLES,
        tfds=False,
    )


DATASETS: dict[str, DatasetSpec] = {
    "imagenet2012": DatasetSpec(
        name="imagenet2012",
        image_size=224,
        num_channels=3,
        num_classes=1000,
        train_split="train",
        eval_split="validation",
        num_train_examples=1_281_167,
        num_eval_examples=50_000,
        tfds=True,
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        image_size=32,
        num_channels=3,
        num_classes=10,
        train_split="train",
        eval_split="test",
        num_train_examples=50_000,
        num_eval_examples=10_000,
        tfds=True,
    ),
    "digits": _digits_spec("digits", 16),
    "digits_canvas": _digits_spec("digits_canvas", DIGITS_CANVAS_SIZE),
}
DATASET_NAMES = tuple(DATASETS)


def spec(name: str) -> DatasetSpec:
    """Returns the `DatasetSpec` of `name`; ValueError names the valid choices."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid choices: {sorted(DATASETS)}.")
    return DATASETS[name]


def check_digits_image_size(image_size: int) -> None:
    """Raises ValueError unless `image_size` is an int >= 8 (the raw digits are 8x8)."""
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ValueError(f"digits image_size must be an int >= 8, got {image_size!r}.")


def check_canvas_size(canvas_size: int) -> None:
    """Raises ValueError unless the canvas holds a whole DIGITS_CANVAS_DIGIT_SIZE digit."""
    if (
        not isinstance(canvas_size, int)
        or isinstance(canvas_size, bool)
        or canvas_size < DIGITS_CANVAS_DIGIT_SIZE
    ):
        raise ValueError(
            f"digits_canvas image_size must be an int >= {DIGITS_CANVAS_DIGIT_SIZE} (the "
            f"pasted digit's size), got {canvas_size!r}."
        )


def resolve_image_size(name: str, image_size: int | None) -> int:
    """Returns the side of the images yielded for `name` (`None`: the dataset default).

    Raises:
        ValueError: for an unknown dataset or a size the dataset does not support.
    """
    return spec(name).resolve_image_size(image_size)


def num_classes(name: str) -> int:
    """Returns the number of classes of dataset `name` (ValueError for an unknown name)."""
    return spec(name).num_classes


def image_shape(name: str, image_size: int | None = None) -> tuple[int, int, int]:
    """Returns the (height, width, channels) of the images the pipelines yield for `name`.

    Args:
        name: dataset name, a key of `DATASETS`.
        image_size: side length override; `None` uses the dataset default.

    Raises:
        ValueError: for an unknown dataset name or an unsupported image size.
    """
    return spec(name).image_shape(image_size)


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    """Returns the batch each process yields so that the processes together form the global batch.

    Raises:
        ValueError: if the global batch is not positive or not divisible by `process_count`.
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by "
            f"process_count={process_count}."
        )
    return global_batch_size // process_count


def process_example_counts(num_examples: int, process_count: int) -> list[int]:
    """Returns how many examples each process reads from a split it shares without dropping any.

    Same arithmetic as `tfds.split_for_jax_process(..., drop_remainder=False)`: the first
    `num_examples % process_count` processes get one extra example.
    """
    base, extra = divmod(num_examples, process_count)
    return [base + (index < extra) for index in range(process_count)]


def num_eval_batches(num_examples: int, per_process_batch: int, process_count: int) -> int:
    """Returns the number of evaluation batches every process yields (the busiest one's count).

    `ceil(max per-process examples / per_process_batch)`, at least 1, so that every process
    takes part in the same number of collective steps.
    """
    busiest = max(process_example_counts(num_examples, process_count))
    return max(1, math.ceil(busiest / per_process_batch))


def normalize_images(images):
    """On-device input normalisation: uint8 pixels -> `(x / 255 - IMAGENET_MEAN) / IMAGENET_STD`.

    CIFAR-10 and ImageNet batches arrive as uint8 (the authors normalise CIFAR-10 with the
    ImageNet statistics too, docs/spec.md §7.6); float batches (the digits sets, already
    standardised on the host) pass through unchanged. The dtype decides, statically under jit.
    Written with array methods and NumPy constants, so a jax.Array (traced or not) stays one.
    """
    if images.dtype != np.uint8:
        return images
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    return (images.astype(np.float32) / 255.0 - mean) / std
