"""Input pipelines: ImageNet and CIFAR-10 through TFDS/tf.data, scikit-learn digits for quick runs.

Each process reads its own slice of the data and yields per-process batches of
`global_batch_size // process_count` examples; turning those into global jax arrays is the
caller's job. Training streams are infinite, shuffled and augmented as in REFERENCE.md §4.
Evaluation streams are exact: every example once, the last batch padded with zero images that
carry `mask == 0`, and the same number of batches on every process so that all processes run the
same number of collective steps.

All randomness is stateless and keyed on (seed, process index, position in the stream), so a
training stream is reproducible given its seed and process index.

This is the only pcjax module that imports TensorFlow. TF is only used on the host CPU:
`_hide_accelerators_from_tf` runs before any pipeline is built, so TF never takes GPU memory or
TPU cores from JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's RandomResizedCrop defaults (REFERENCE.md §4.1).
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_MAX_ATTEMPTS = 10
# ImageNet evaluation: Resize(256) then CenterCrop(224); other crop sizes keep the 256/224 ratio.
IMAGENET_EVAL_RESIZE_RATIO = 256 / 224
CIFAR_PADDING = 4


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a supported dataset.

    Attributes:
        image_size: default height = width of the images the pipelines yield.
        num_channels: channels of the yielded images.
        num_classes: number of labels.
        train_split: split used for training.
        eval_split: split used for evaluation.
        num_train_examples: size of `train_split`.
        num_eval_examples: size of `eval_split`.
        shuffle_buffer: training shuffle buffer, in examples (encoded JPEGs for ImageNet).
        cache: whether the decoded training split fits in host memory and is cached.
    """

    image_size: int
    num_channels: int
    num_classes: int
    train_split: str
    eval_split: str
    num_train_examples: int
    num_eval_examples: int
    shuffle_buffer: int
    cache: bool


DIGITS_NUM_EXAMPLES = 1797
DIGITS_NUM_TEST_EXAMPLES = 450  # ceil(0.25 * 1797): `load_digits_split` defaults.
# "digits_canvas": each 8x8 digit, upsampled to DIGITS_CANVAS_DIGIT_SIZE, pasted at a random
# (fixed per example) position of a larger blank canvas: spatial variability for the
# class-separation experiment (experiments/separation.py).
DIGITS_CANVAS_DIGIT_SIZE = 16
DIGITS_CANVAS_SIZE = 32

DATASETS: dict[str, DatasetSpec] = {
    "imagenet2012": DatasetSpec(
        image_size=224,
        num_channels=3,
        num_classes=1000,
        train_split="train",
        eval_split="validation",
        num_train_examples=1_281_167,
        num_eval_examples=50_000,
        shuffle_buffer=10_000,
        cache=False,
    ),
    "cifar10": DatasetSpec(
        image_size=32,
        num_channels=3,
        num_classes=10,
        train_split="train",
        eval_split="test",
        num_train_examples=50_000,
        num_eval_examples=10_000,
        shuffle_buffer=50_000,
        cache=True,
    ),
    "digits": DatasetSpec(
        image_size=16,
        num_channels=1,
        num_classes=10,
        train_split="train",
        eval_split="test",
        num_train_examples=DIGITS_NUM_EXAMPLES - DIGITS_NUM_TEST_EXAMPLES,
        num_eval_examples=DIGITS_NUM_TEST_EXAMPLES,
        shuffle_buffer=DIGITS_NUM_EXAMPLES,
        cache=False,
    ),
    "digits_canvas": DatasetSpec(
        image_size=DIGITS_CANVAS_SIZE,
        num_channels=1,
        num_classes=10,
        train_split="train",
        eval_split="test",
        num_train_examples=DIGITS_NUM_EXAMPLES - DIGITS_NUM_TEST_EXAMPLES,
        num_eval_examples=DIGITS_NUM_TEST_EXAMPLES,
        shuffle_buffer=DIGITS_NUM_EXAMPLES,
        cache=False,
    ),
}

_SKLEARN_DATASETS = ("digits", "digits_canvas")  # in memory, from scikit-learn; no TFDS

Example = dict[str, tf.Tensor]


# ------------------------------------------------------------------------------------------------
# Small helpers: names, sizes, processes, seeds.


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid choices: {sorted(DATASETS)}.")
    return DATASETS[name]


def _resolve_image_size(name: str, image_size: int | None) -> int:
    spec = _spec(name)
    if image_size is None:
        return spec.image_size
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}.")
    if name == "cifar10" and image_size != spec.image_size:
        raise ValueError(f"cifar10 images are 32x32; image_size={image_size} is not supported.")
    if name == "digits":
        _check_digits_image_size(image_size)
    if name == "digits_canvas":
        _check_canvas_size(image_size)
    return image_size


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


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    """Returns the batch each process yields so that the processes together form the global batch.

    Args:
        global_batch_size: examples per step over all processes.
        process_count: number of processes.

    Returns:
        `global_batch_size // process_count`.

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

    Same arithmetic as `tfds.split_for_jax_process(..., drop_remainder=False)` and as
    `Dataset.shard(process_count, index)`: the first `num_examples % process_count` processes get
    one extra example.

    Args:
        num_examples: examples in the whole split.
        process_count: number of processes.

    Returns:
        A list of `process_count` counts summing to `num_examples`.
    """
    base, extra = divmod(num_examples, process_count)
    return [base + (index < extra) for index in range(process_count)]


def num_eval_batches(num_examples: int, per_process_batch: int, process_count: int) -> int:
    """Returns the number of evaluation batches every process yields (the busiest one's count).

    Args:
        num_examples: examples in the whole evaluation split.
        per_process_batch: batch size of one process.
        process_count: number of processes.

    Returns:
        `ceil(max per-process examples / per_process_batch)`, at least 1.
    """
    busiest = max(process_example_counts(num_examples, process_count))
    return max(1, math.ceil(busiest / per_process_batch))


def _process_seed(seed: int, process_index: int) -> int:
    """Derives a 32-bit seed per process so processes shuffle and augment independently."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}.")
    return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])


@functools.cache
def _hide_accelerators_from_tf() -> None:
    """Makes TF see only the host CPU, so that it leaves GPU memory and TPU cores to JAX."""
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except RuntimeError as error:  # TF runtime already started; visibility is frozen.
            logging.warning("Could not hide %s devices from TensorFlow: %s", kind, error)


def _dataset_options() -> tf.data.Options:
    options = tf.data.Options()
    # Outputs stay in order, which with stateless randomness makes streams reproducible.
    options.deterministic = True
    return options


def num_classes(name: str) -> int:
    """Returns the number of classes of dataset `name`.

    Raises:
        ValueError: for an unknown dataset name.
    """
    return _spec(name).num_classes


def image_shape(name: str, image_size: int | None = None) -> tuple[int, int, int]:
    """Returns the (height, width, channels) of the images the pipelines yield for `name`.

    Args:
        name: dataset name, a key of `DATASETS`.
        image_size: side length override; `None` uses the dataset default.

    Raises:
        ValueError: for an unknown dataset name or an unsupported image size.
    """
    size = _resolve_image_size(name, image_size)
    return (size, size, _spec(name).num_channels)


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
    spec = _spec(name)
    if name in _SKLEARN_DATASETS:
        return len(_sklearn_split(name, spec.image_size)[spec.train_split][1])
    return _tfds_split_size(
        tfds.builder(name, data_dir=data_dir), spec.train_split, spec.num_train_examples
    )


# ------------------------------------------------------------------------------------------------
# Per-example preprocessing (TF ops on one example).


def normalize(image: tf.Tensor) -> tf.Tensor:
    """Maps a float image in [0, 1] to `(image - IMAGENET_MEAN) / IMAGENET_STD` channel-wise.

    The authors normalise CIFAR-10 with the ImageNet statistics too (REFERENCE.md §7.6).

    Args:
        image: float32[h, w, 3] in [0, 1].

    Returns:
        float32[h, w, 3].
    """
    mean = tf.constant(IMAGENET_MEAN, tf.float32)
    std = tf.constant(IMAGENET_STD, tf.float32)
    return (image - mean) / std


def random_resized_crop_window(
    image_shape: tf.Tensor | Sequence[int],
    seed: tf.Tensor,
    area_range: tuple[float, float] = CROP_AREA_RANGE,
    aspect_range: tuple[float, float] = CROP_ASPECT_RANGE,
    max_attempts: int = CROP_MAX_ATTEMPTS,
) -> tf.Tensor:
    """Samples a crop window with the semantics of torchvision's `RandomResizedCrop.get_params`.

    Each attempt draws an area fraction uniformly in `area_range` and a log-aspect ratio
    (width / height) uniformly in `log(aspect_range)`, rounds width and height half-to-even like
    Python's `round`, and is kept if it fits; the first fitting attempt wins and its offset is
    uniform over the valid positions. If none fits, the centre crop of the whole image clamped to
    `aspect_range` is returned. Only the random stream differs from torchvision: the attempts are
    drawn all at once from stateless TF generators.

    Args:
        image_shape: int[>=2] (height, width, ...) of the image to crop.
        seed: int32 or int64[2] stateless seed.
        area_range: bounds of the crop area as a fraction of the image area.
        aspect_range: bounds of the crop aspect ratio, width / height.
        max_attempts: number of rejection-sampling attempts.

    Returns:
        int32[4]: (offset_y, offset_x, crop_height, crop_width), the layout of
        `tf.image.decode_and_crop_jpeg`'s `crop_window`.
    """
    shape = tf.convert_to_tensor(image_shape)
    height = tf.cast(shape[0], tf.int32)
    width = tf.cast(shape[1], tf.int32)
    height_f = tf.cast(height, tf.float64)
    width_f = tf.cast(width, tf.float64)
    area_seed, aspect_seed, y_seed, x_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=4)
    )

    target_area = (height_f * width_f) * tf.random.stateless_uniform(
        [max_attempts], area_seed, area_range[0], area_range[1], dtype=tf.float64
    )
    log_aspect = tf.random.stateless_uniform(
        [max_attempts],
        aspect_seed,
        math.log(aspect_range[0]),
        math.log(aspect_range[1]),
        dtype=tf.float64,
    )
    aspect = tf.exp(log_aspect)
    crop_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

    # Fallback: whole image, with the longer side shortened to bring the aspect into range.
    in_aspect = width_f / height_f
    fallback_h = tf.where(
        in_aspect < aspect_range[0],
        tf.cast(tf.round(width_f / aspect_range[0]), tf.int32),
        height,
    )
    fallback_w = tf.where(
        in_aspect > aspect_range[1],
        tf.cast(tf.round(height_f * aspect_range[1]), tf.int32),
        width,
    )

    found = tf.reduce_any(fits)
    out_h = tf.where(found, crop_h[first], fallback_h)
    out_w = tf.where(found, crop_w[first], fallback_w)
    random_y = tf.random.stateless_uniform([], y_seed, 0, height - out_h + 1, dtype=tf.int32)
    random_x = tf.random.stateless_uniform([], x_seed, 0, width - out_w + 1, dtype=tf.int32)
    offset_y = tf.where(found, random_y, (height - out_h) // 2)
    offset_x = tf.where(found, random_x, (width - out_w) // 2)
    return tf.stack([offset_y, offset_x, out_h, out_w])


def imagenet_train_preprocess(
    encoded_jpeg: tf.Tensor, seed: tf.Tensor, image_size: int = 224
) -> tf.Tensor:
    """RandomResizedCrop, random horizontal flip and normalisation of one ImageNet JPEG.

    Only the crop window is decoded (`decode_and_crop_jpeg`). The resize is bilinear with
    antialiasing, which approximates PIL's bilinear filter used by torchvision 0.9; unlike
    torchvision the resized crop is not rounded to uint8 before scaling to [0, 1].

    Args:
        encoded_jpeg: string scalar, a JPEG file.
        seed: int32 or int64[2] stateless seed.
        image_size: side of the square output.

    Returns:
        float32[image_size, image_size, 3], normalised.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    window = random_resized_crop_window(tf.image.extract_jpeg_shape(encoded_jpeg), crop_seed)
    image = tf.image.decode_and_crop_jpeg(encoded_jpeg, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return normalize(image / 255.0)


def imagenet_eval_preprocess(encoded_jpeg: tf.Tensor, image_size: int = 224) -> tf.Tensor:
    """Resize(256) of the shorter side, CenterCrop(224) and normalisation of one ImageNet JPEG.

    Sizes and crop offsets follow torchvision 0.9 (`int()` truncation of the longer side, centre
    offsets rounded half-to-even); the resize is antialiased bilinear, close to PIL's.

    Args:
        encoded_jpeg: string scalar, a JPEG file.
        image_size: side of the square output; the shorter side is first resized to
            `round(image_size * 256 / 224)`.

    Returns:
        float32[image_size, image_size, 3], normalised.
    """
    resize_size = round(image_size * IMAGENET_EVAL_RESIZE_RATIO)
    image = tf.image.decode_jpeg(encoded_jpeg, channels=3)
    shape = tf.shape(image)
    height = tf.cast(shape[0], tf.float64)
    width = tf.cast(shape[1], tf.float64)
    short = tf.minimum(height, width)
    new_h = tf.where(height <= width, resize_size, tf.cast(resize_size * height / short, tf.int32))
    new_w = tf.where(height <= width, tf.cast(resize_size * width / short, tf.int32), resize_size)
    image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
    top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float64) / 2), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float64) / 2), tf.int32)
    image = image[top : top + image_size, left : left + image_size]
    image = tf.ensure_shape(image, [image_size, image_size, 3])
    return normalize(image / 255.0)


def pad_and_random_crop(
    image: tf.Tensor, padding: int, seed: tf.Tensor, fill_value: float = 0.0
) -> tf.Tensor:
    """Pads every side with `fill_value` and crops back to the input size at a random offset.

    torchvision's `RandomCrop(size, padding)`: the offset is uniform in [0, 2 * padding] on each
    axis, so the content moves by up to `padding` pixels and the uncovered border is `fill_value`.

    Args:
        image: float32[h, w, c] with static h and w.
        padding: pixels added on each side.
        seed: int32 or int64[2] stateless seed.
        fill_value: value of the padded border.

    Returns:
        float32[h, w, c].
    """
    height, width = image.shape[0], image.shape[1]
    padded = tf.pad(
        image, [[padding, padding], [padding, padding], [0, 0]], constant_values=fill_value
    )
    offset = tf.random.stateless_uniform([2], seed, 0, 2 * padding + 1, dtype=tf.int32)
    return tf.slice(padded, tf.concat([offset, [0]], axis=0), [height, width, image.shape[2]])


def cifar_train_preprocess(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """RandomHorizontalFlip, RandomCrop(32, padding=4, zero fill) and normalisation.

    The zero padding is applied in [0, 1] pixel space, before normalisation, as in the original.

    Args:
        image: uint8[32, 32, 3].
        seed: int32 or int64[2] stateless seed.

    Returns:
        float32[32, 32, 3], normalised.
    """
    flip_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    image = tf.cast(image, tf.float32) / 255.0
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = pad_and_random_crop(image, CIFAR_PADDING, crop_seed)
    return normalize(image)


def cifar_eval_preprocess(image: tf.Tensor) -> tf.Tensor:
    """Scales a uint8[32, 32, 3] CIFAR image to [0, 1] and normalises it."""
    return normalize(tf.cast(image, tf.float32) / 255.0)


# ------------------------------------------------------------------------------------------------
# scikit-learn digits.


def _check_digits_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ValueError(f"digits image_size must be an int >= 8, got {image_size!r}.")


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Returns float64[out, in] bilinear interpolation weights with half-pixel centres."""
    src = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
    src = np.clip(src, 0, in_size - 1)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, in_size - 1)
    frac = src - low
    weights = np.zeros((out_size, in_size))
    np.add.at(weights, (np.arange(out_size), low), 1 - frac)
    np.add.at(weights, (np.arange(out_size), high), frac)
    return weights


@functools.lru_cache(maxsize=8)
def _digits_arrays(
    image_size: int, test_fraction: float, seed: int
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float, float]:
    """Builds the digits splits once per argument tuple; returns (splits, mean, std)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0  # [N, 8, 8], values 0..16 -> [0, 1].
    labels = digits.target.astype(np.int32)
    resize = _bilinear_matrix(8, image_size)
    images = np.einsum("ab,nbc,dc->nad", resize, images, resize)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    mean = float(images[train_idx].mean())
    std = float(images[train_idx].std())
    images = ((images - mean) / std).astype(np.float32)[..., None]
    splits = {
        "train": (images[train_idx], labels[train_idx]),
        "test": (images[test_idx], labels[test_idx]),
    }
    return splits, mean, std


def load_digits_split(
    image_size: int = 16, test_fraction: float = 0.25, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Returns a fixed stratified train/test split of scikit-learn's 8x8 digits, upsampled.

    A 1,797-image, 10-class set bundled with scikit-learn: small enough for CPU smoke runs and
    tests, with no download. Pixels (0..16) are scaled to [0, 1], bilinearly resized to
    `image_size` (half-pixel centres) and standardised with the scalar mean and standard
    deviation of the training pixels.

    Args:
        image_size: side of the output images, an int >= 8.
        test_fraction: fraction of the examples in the test split, in (0, 1).
        seed: `random_state` of the stratified `train_test_split`; fixes the split.

    Returns:
        {"train": (images, labels), "test": (images, labels)} with images
        float32[n, image_size, image_size, 1] and labels int32[n]; fresh copies.

    Raises:
        ValueError: if `image_size` or `test_fraction` is out of range.
    """
    _check_digits_image_size(image_size)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
    splits, _, _ = _digits_arrays(image_size, float(test_fraction), seed)
    return {name: (images.copy(), labels.copy()) for name, (images, labels) in splits.items()}


def digits_background_value(
    image_size: int = 16, test_fraction: float = 0.25, seed: int = 0
) -> float:
    """Returns the normalised value of a blank (0) digits pixel, used to pad translated images.

    Args:
        image_size: as in `load_digits_split`.
        test_fraction: as in `load_digits_split`.
        seed: as in `load_digits_split`.
    """
    _check_digits_image_size(image_size)
    _, mean, std = _digits_arrays(image_size, float(test_fraction), seed)
    return float((0.0 - mean) / std)


def _check_canvas_size(canvas_size: int) -> None:
    if (
        not isinstance(canvas_size, int)
        or isinstance(canvas_size, bool)
        or canvas_size < DIGITS_CANVAS_DIGIT_SIZE
    ):
        raise ValueError(
            f"digits_canvas image_size must be an int >= {DIGITS_CANVAS_DIGIT_SIZE} (the "
            f"pasted digit's size), got {canvas_size!r}."
        )


def canvas_offsets(num_examples: int, canvas_size: int, seed: int = 0) -> np.ndarray:
    """Returns the fixed top-left corner of each digit on its canvas, int64[num_examples, 2].

    Offsets (row, column) are uniform over every position that keeps the whole
    `DIGITS_CANVAS_DIGIT_SIZE` digit inside the canvas, drawn from `np.random.default_rng(seed)`
    in the order of scikit-learn's examples (so an example keeps its position whatever split
    it lands in).

    Args:
        num_examples: number of digits.
        canvas_size: canvas side, >= DIGITS_CANVAS_DIGIT_SIZE.
        seed: placement seed.
    """
    _check_canvas_size(canvas_size)
    rng = np.random.default_rng(seed)
    return rng.integers(0, canvas_size - DIGITS_CANVAS_DIGIT_SIZE + 1, size=(num_examples, 2))


@functools.lru_cache(maxsize=8)
def _digits_canvas_arrays(
    canvas_size: int, test_fraction: float, seed: int
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float, float]:
    """Builds the digits_canvas splits once per argument tuple; returns (splits, mean, std)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0  # [N, 8, 8] in [0, 1]
    labels = digits.target.astype(np.int32)
    size = DIGITS_CANVAS_DIGIT_SIZE
    resize = _bilinear_matrix(8, size)
    images = np.einsum("ab,nbc,dc->nad", resize, images, resize)
    offsets = canvas_offsets(len(labels), canvas_size, seed)
    canvas = np.zeros((len(labels), canvas_size, canvas_size))
    for i, (row, col) in enumerate(offsets):
        canvas[i, row : row + size, col : col + size] = images[i]
    # Same stratified split as "digits" (same examples in train and test).
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    mean = float(canvas[train_idx].mean())
    std = float(canvas[train_idx].std())
    canvas = ((canvas - mean) / std).astype(np.float32)[..., None]
    splits = {
        "train": (canvas[train_idx], labels[train_idx]),
        "test": (canvas[test_idx], labels[test_idx]),
    }
    return splits, mean, std


def load_digits_canvas_split(
    canvas_size: int = DIGITS_CANVAS_SIZE, test_fraction: float = 0.25, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Returns scikit-learn's digits, each pasted at a random fixed position of a blank canvas.

    Each 8x8 digit (pixels 0..16 scaled to [0, 1]) is bilinearly upsampled to
    `DIGITS_CANVAS_DIGIT_SIZE` (16x16, half-pixel centres, as `load_digits_split`) and pasted
    on a `canvas_size` x `canvas_size` canvas of zeros at the offset `canvas_offsets(...)[i]`;
    the canvases are then standardised with the scalar mean and standard deviation of the
    training pixels. The train/test split is the stratified split of `load_digits_split` with
    the same `test_fraction` and `seed`. Translations are the within-class variability that
    the class-separation experiment probes; the training pipeline adds no augmentation.

    Args:
        canvas_size: side of the output images, an int >= DIGITS_CANVAS_DIGIT_SIZE.
        test_fraction: fraction of the examples in the test split, in (0, 1).
        seed: split and placement seed.

    Returns:
        {"train": (images, labels), "test": (images, labels)} with images
        float32[n, canvas_size, canvas_size, 1] and labels int32[n]; fresh copies.

    Raises:
        ValueError: if `canvas_size` or `test_fraction` is out of range.
    """
    _check_canvas_size(canvas_size)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
    splits, _, _ = _digits_canvas_arrays(canvas_size, float(test_fraction), seed)
    return {name: (images.copy(), labels.copy()) for name, (images, labels) in splits.items()}


def _sklearn_split(name: str, image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if name == "digits_canvas":
        return load_digits_canvas_split(image_size)
    return load_digits_split(image_size)


def _digits_dataset(
    split: str, image_size: int, process_index: int, process_count: int, name: str = "digits"
) -> tf.data.Dataset:
    images, labels = _sklearn_split(name, image_size)[split]
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
            return imagenet_train_preprocess(image, seed, image_size)

    elif name == "cifar10":
        image_fn = cifar_train_preprocess
    elif name == "digits_canvas":

        def image_fn(image, seed):
            del seed  # no augmentation: the fixed placements are the variability studied
            return image

    else:
        padding = image_size // 8
        fill_value = digits_background_value(image_size)

        def image_fn(image, seed):
            return pad_and_random_crop(image, padding, seed, fill_value)

    def preprocess(example: Example, seed: tf.Tensor) -> Example:
        return {
            "image": image_fn(example["image"], seed),
            "label": tf.cast(example["label"], tf.int32),
        }

    return preprocess


def _eval_preprocess_fn(name: str, image_size: int) -> Callable[[Example], Example]:
    if name == "imagenet2012":

        def image_fn(image):
            return imagenet_eval_preprocess(image, image_size)

    elif name == "cifar10":
        image_fn = cifar_eval_preprocess
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
    spec = _spec(name)
    size = _resolve_image_size(name, image_size)
    process_index, process_count = _resolve_processes(process_index, process_count)
    batch_size = per_process_batch_size(global_batch_size, process_count)
    process_seed = _process_seed(seed, process_index)
    _hide_accelerators_from_tf()

    if name in _SKLEARN_DATASETS:
        ds = _digits_dataset(spec.train_split, size, process_index, process_count, name)
    else:
        split = tfds.split_for_jax_process(
            spec.train_split,
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
        if spec.cache:
            ds = ds.cache()

    preprocess = _train_preprocess_fn(name, size)
    seed_tensor = tf.constant(process_seed, tf.int64)

    def augment(index: tf.Tensor, example: Example) -> Example:
        return preprocess(example, tf.stack([seed_tensor, index]))

    ds = ds.repeat().shuffle(spec.shuffle_buffer, seed=process_seed)
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
    spec = _spec(name)
    size = _resolve_image_size(name, image_size)
    process_index, process_count = _resolve_processes(process_index, process_count)
    batch_size = per_process_batch_size(global_batch_size, process_count)
    _hide_accelerators_from_tf()

    if name in _SKLEARN_DATASETS:
        num_examples = len(_sklearn_split(name, size)[spec.eval_split][1])
        ds = _digits_dataset(spec.eval_split, size, process_index, process_count, name)
    else:
        builder = tfds.builder(name, data_dir=data_dir)
        num_examples = _tfds_split_size(builder, spec.eval_split, spec.num_eval_examples)
        split = tfds.split_for_jax_process(
            spec.eval_split,
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
