"""scikit-learn's 8x8 digits as in-memory NumPy splits: "digits" and "digits_canvas".

A 1,797-image, 10-class set bundled with scikit-learn: small enough for CPU smoke runs and tests,
with no download. Both data sets share one builder (`_digit_arrays`): scale, upsample, optionally
paste on a canvas, split, standardise.
"""

from __future__ import annotations

import functools

import numpy as np

from pcjax.data.datasets import (
    DIGITS_CANVAS_DIGIT_SIZE,
    DIGITS_CANVAS_SIZE,
    check_canvas_size,
    check_digits_image_size,
    resolve_image_size,
)

Splits = dict[str, tuple[np.ndarray, np.ndarray]]


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
    check_canvas_size(canvas_size)
    rng = np.random.default_rng(seed)
    return rng.integers(0, canvas_size - DIGITS_CANVAS_DIGIT_SIZE + 1, size=(num_examples, 2))


def _check_test_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")


@functools.lru_cache(maxsize=8)
def _digit_arrays(
    digit_size: int, canvas_size: int | None, test_fraction: float, seed: int
) -> tuple[Splits, float, float]:
    """Builds the splits once per argument tuple; returns (splits, mean, std).

    Digits are upsampled to `digit_size` and, when `canvas_size` is set, pasted on a blank
    canvas at `canvas_offsets(..., seed)`; the stratified split is the same in both cases.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0  # [N, 8, 8], values 0..16 -> [0, 1].
    labels = digits.target.astype(np.int32)
    resize = _bilinear_matrix(8, digit_size)
    images = np.einsum("ab,nbc,dc->nad", resize, images, resize)
    if canvas_size is not None:
        canvas = np.zeros((len(labels), canvas_size, canvas_size))
        for i, (row, col) in enumerate(canvas_offsets(len(labels), canvas_size, seed)):
            canvas[i, row : row + digit_size, col : col + digit_size] = images[i]
        images = canvas
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


def _copies(splits: Splits) -> Splits:
    return {name: (images.copy(), labels.copy()) for name, (images, labels) in splits.items()}


def load_digits_split(image_size: int = 16, test_fraction: float = 0.25, seed: int = 0) -> Splits:
    """Returns a fixed stratified train/test split of scikit-learn's 8x8 digits, upsampled.

    Pixels (0..16) are scaled to [0, 1], bilinearly resized to `image_size` (half-pixel
    centres) and standardised with the scalar mean and standard deviation of the training pixels.

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
    check_digits_image_size(image_size)
    _check_test_fraction(test_fraction)
    return _copies(_digit_arrays(image_size, None, float(test_fraction), seed)[0])


def digits_background_value(
    image_size: int = 16, test_fraction: float = 0.25, seed: int = 0
) -> float:
    """Returns the standardised value of a blank (0) digits pixel, used to pad translated images.

    Arguments as in `load_digits_split`.
    """
    check_digits_image_size(image_size)
    _, mean, std = _digit_arrays(image_size, None, float(test_fraction), seed)
    return float((0.0 - mean) / std)


def load_digits_canvas_split(
    canvas_size: int = DIGITS_CANVAS_SIZE, test_fraction: float = 0.25, seed: int = 0
) -> Splits:
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
    check_canvas_size(canvas_size)
    _check_test_fraction(test_fraction)
    splits = _digit_arrays(DIGITS_CANVAS_DIGIT_SIZE, canvas_size, float(test_fraction), seed)[0]
    return _copies(splits)


def load_split(name: str, split: str, image_size: int | None = None) -> tuple[np.ndarray, ...]:
    """Returns (images, labels) of `split` ("train" or "test") of toy dataset `name`.

    Not copied: callers must not write into the arrays.
    """
    size = resolve_image_size(name, image_size)
    if name == "digits_canvas":
        splits = _digit_arrays(DIGITS_CANVAS_DIGIT_SIZE, size, 0.25, 0)[0]
    elif name == "digits":
        splits = _digit_arrays(size, None, 0.25, 0)[0]
    else:
        raise ValueError(f"{name!r} is not a toy dataset; valid choices: digits, digits_canvas.")
    return splits[split]
