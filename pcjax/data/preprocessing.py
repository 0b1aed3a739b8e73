"""Per-example image preprocessing in TensorFlow: the augmentations of docs/spec.md §4.

Pure functions of one example and a stateless seed, used by `pcjax.data.input_pipeline` inside
tf.data maps. CIFAR-10 and ImageNet images come out as uint8 in [0, 255] (the resized ImageNet
crops rounded to the nearest level, as torchvision's PIL resize does before `ToTensor`); the
normalisation by the ImageNet mean and std runs on the device (`datasets.normalize_images`).
`normalize` is its host-side TF twin, kept for tests and the benchmark of the former pipeline.
TF runs on the host CPU only: `hide_accelerators_from_tf` runs before any pipeline is built (and
in the CLI before training starts), so TF never takes GPU memory or TPU cores from JAX.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import tensorflow as tf
from absl import logging

from pcjax.data.datasets import IMAGENET_MEAN, IMAGENET_STD

# torchvision's RandomResizedCrop defaults (docs/spec.md §4.1).
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_MAX_ATTEMPTS = 10
# ImageNet evaluation: Resize(256) then CenterCrop(224); other crop sizes keep the 256/224 ratio.
IMAGENET_EVAL_RESIZE_RATIO = 256 / 224
CIFAR_PADDING = 4


@functools.cache
def hide_accelerators_from_tf() -> None:
    """Makes TF see only the host CPU, so that it leaves GPU memory and TPU cores to JAX.

    Effective only before TF's runtime starts: the CLI calls it before it trains, the pipeline
    builders again (a no-op then, or a warning if TF started with other devices visible).
    """
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except RuntimeError as error:  # TF runtime already started; visibility is frozen.
            logging.warning("Could not hide %s devices from TensorFlow: %s", kind, error)


def normalize(image: tf.Tensor) -> tf.Tensor:
    """Maps a float image in [0, 1] to `(image - IMAGENET_MEAN) / IMAGENET_STD` channel-wise.

    The authors normalise CIFAR-10 with the ImageNet statistics too (docs/spec.md §7.6).

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
    """RandomResizedCrop and random horizontal flip of one ImageNet JPEG, as uint8.

    Only the crop window is decoded (`decode_and_crop_jpeg`). The resize is bilinear with
    antialiasing, which approximates PIL's bilinear filter used by torchvision 0.9; like
    torchvision the resized crop is rounded to uint8.

    Args:
        encoded_jpeg: string scalar, a JPEG file.
        seed: int32 or int64[2] stateless seed.
        image_size: side of the square output.

    Returns:
        uint8[image_size, image_size, 3].
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    window = random_resized_crop_window(tf.image.extract_jpeg_shape(encoded_jpeg), crop_seed)
    image = tf.image.decode_and_crop_jpeg(encoded_jpeg, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return _round_to_uint8(image)


def imagenet_eval_preprocess(encoded_jpeg: tf.Tensor, image_size: int = 224) -> tf.Tensor:
    """Resize(256) of the shorter side and CenterCrop(224) of one ImageNet JPEG, as uint8.

    Sizes and crop offsets follow torchvision 0.9 (`int()` truncation of the longer side, centre
    offsets rounded half-to-even); the resize is antialiased bilinear, close to PIL's.

    Args:
        encoded_jpeg: string scalar, a JPEG file.
        image_size: side of the square output; the shorter side is first resized to
            `round(image_size * 256 / 224)`.

    Returns:
        uint8[image_size, image_size, 3].
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
    return _round_to_uint8(image)


def pad_and_random_crop(
    image: tf.Tensor, padding: int, seed: tf.Tensor, fill_value: float = 0.0
) -> tf.Tensor:
    """Pads every side with `fill_value` and crops back to the input size at a random offset.

    torchvision's `RandomCrop(size, padding)`: the offset is uniform in [0, 2 * padding] on each
    axis, so the content moves by up to `padding` pixels and the uncovered border is `fill_value`.

    Args:
        image: [h, w, c] with static h and w, any numeric dtype.
        padding: pixels added on each side.
        seed: int32 or int64[2] stateless seed.
        fill_value: value of the padded border (cast to the image's dtype).

    Returns:
        [h, w, c], the dtype of `image`.
    """
    height, width = image.shape[0], image.shape[1]
    padded = tf.pad(
        image,
        [[padding, padding], [padding, padding], [0, 0]],
        constant_values=tf.cast(fill_value, image.dtype),
    )
    offset = tf.random.stateless_uniform([2], seed, 0, 2 * padding + 1, dtype=tf.int32)
    return tf.slice(padded, tf.concat([offset, [0]], axis=0), [height, width, image.shape[2]])


def cifar_train_preprocess(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """RandomHorizontalFlip and RandomCrop(32, padding=4, zero fill) of a uint8 image.

    The zero padding is in pixel space, before normalisation, as in the original.

    Args:
        image: uint8[32, 32, 3].
        seed: int32 or int64[2] stateless seed.

    Returns:
        uint8[32, 32, 3].
    """
    flip_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return pad_and_random_crop(image, CIFAR_PADDING, crop_seed)


def cifar_eval_preprocess(image: tf.Tensor) -> tf.Tensor:
    """CIFAR evaluation: the uint8[32, 32, 3] image unchanged (normalised on the device)."""
    return tf.ensure_shape(tf.convert_to_tensor(image, tf.uint8), [32, 32, 3])


def _round_to_uint8(image: tf.Tensor) -> tf.Tensor:
    """Rounds a float image in [0, 255] to the nearest uint8 level (clipping overshoot)."""
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
