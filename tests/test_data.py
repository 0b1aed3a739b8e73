"""Tests of the input names in pcjax.data: metadata, split arithmetic, digits, augmentations.

The sampler-based pipelines on real array_record data are tested in test_input_pipeline.py."""

import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from pcjax.data import datasets, digits, input_pipeline, preprocessing

MEAN = np.array(datasets.IMAGENET_MEAN, np.float32)
STD = np.array(datasets.IMAGENET_STD, np.float32)
NORMALISED_ZERO = -MEAN / STD
NORMALISED_ONE = (1 - MEAN) / STD


def _map_seeds(fn, num: int, base_seed: int = 7) -> np.ndarray:
    """Evaluates `fn(seed)` for `num` distinct stateless seeds; returns the stacked results."""
    ds = tf.data.Dataset.range(num).map(
        lambda i: fn(tf.stack([tf.constant(base_seed, tf.int64), i]))
    )
    return next(ds.batch(num).as_numpy_iterator())


def _to_unit_normalised(image: tf.Tensor) -> tf.Tensor:
    """The on-device normalisation of a uint8 image, in TF (the preprocessing outputs uint8)."""
    assert image.dtype == tf.uint8
    return preprocessing.normalize(tf.cast(image, tf.float32) / 255.0)


def _constant_jpeg(height: int, width: int, rgb: tuple[int, int, int]) -> tf.Tensor:
    image = np.broadcast_to(np.array(rgb, np.uint8), (height, width, 3))
    return tf.io.encode_jpeg(tf.constant(image), quality=100)


def _torchvision_crop_params(rng, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """NumPy transcription of torchvision 0.9 `RandomResizedCrop.get_params` (the oracle)."""
    area = height * width
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ------------------------------------------------------------------------------------------------
# Names, sizes and split arithmetic.


def test_dataset_facts():
    assert datasets.num_classes("imagenet2012") == 1000
    assert datasets.num_classes("cifar10") == 10
    assert datasets.image_shape("imagenet2012") == (224, 224, 3)
    assert datasets.image_shape("imagenet2012", 128) == (128, 128, 3)
    assert datasets.image_shape("cifar10") == (32, 32, 3)
    assert datasets.image_shape("digits", 24) == (24, 24, 1)
    assert datasets.DATASETS["imagenet2012"].num_train_examples == 1_281_167
    assert datasets.DATASETS["imagenet2012"].num_eval_examples == 50_000
    assert (
        input_pipeline.num_train_examples("digits")
        == datasets.DATASETS["digits"].num_train_examples
        == 1347
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda: datasets.num_classes("mnist"),
        lambda: datasets.image_shape("mnist"),
        lambda: input_pipeline.create_train_dataset("mnist", global_batch_size=8, seed=0),
        lambda: input_pipeline.create_eval_dataset("mnist", global_batch_size=8),
    ],
)
def test_unknown_dataset_names_value_and_choices(call):
    with pytest.raises(ValueError, match=r"'mnist'.*cifar10.*digits.*imagenet2012"):
        call()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="global_batch_size=10.*process_count=4"):
        input_pipeline.create_train_dataset(
            "digits", global_batch_size=10, seed=0, process_index=0, process_count=4
        )
    with pytest.raises(ValueError, match="process_index"):
        input_pipeline.create_eval_dataset(
            "digits", global_batch_size=8, process_index=2, process_count=2
        )
    with pytest.raises(ValueError, match="image_size=16"):
        datasets.image_shape("cifar10", 16)
    with pytest.raises(ValueError, match="7"):
        digits.load_digits_split(image_size=7)
    with pytest.raises(ValueError, match="seed"):
        input_pipeline.create_train_dataset(
            "digits", global_batch_size=8, seed=-1, process_index=0, process_count=1
        )


@pytest.mark.parametrize("num_examples", [1, 7, 450, 50_000, 1_281_167])
@pytest.mark.parametrize("process_count", [1, 2, 3, 8])
def test_process_example_counts_match_tfds(num_examples, process_count):
    split_dict = tfds.core.SplitDict(
        [tfds.core.SplitInfo(name="validation", shard_lengths=[num_examples], num_bytes=0)]
    )
    expected = []
    for index in range(process_count):
        split = tfds.split_for_jax_process(
            "validation", process_index=index, process_count=process_count, drop_remainder=False
        )
        (instruction,) = split.to_absolute(split_dict)
        expected.append((instruction.to or num_examples) - (instruction.from_ or 0))
    assert datasets.process_example_counts(num_examples, process_count) == expected
    shard_counts = [len(range(i, num_examples, process_count)) for i in range(process_count)]
    assert shard_counts == expected  # `Dataset.shard` distributes the same way.


def test_num_eval_batches():
    assert datasets.num_eval_batches(50_000, 128, 1) == 391
    assert datasets.num_eval_batches(50_000, 16, 8) == 391  # 6250 per process.
    assert datasets.num_eval_batches(450, 16, 4) == 8  # 113, 113, 112, 112 -> busiest needs 8.
    assert datasets.num_eval_batches(3, 4, 8) == 1  # Idle processes still run one masked batch.


# ------------------------------------------------------------------------------------------------
# Digits.


def test_digits_split_stratified_fixed_disjoint():
    splits = digits.load_digits_split()
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    assert x_train.shape == (1347, 16, 16, 1) and x_test.shape == (450, 16, 16, 1)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int32
    assert len(y_train) + len(y_test) == 1797
    # Standardised with training statistics.
    np.testing.assert_allclose(x_train.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(x_train.std(), 1.0, atol=1e-5)
    # Stratified: class proportions agree to within one example.
    train_counts, test_counts = (
        np.bincount(y_train, minlength=10),
        np.bincount(y_test, minlength=10),
    )
    np.testing.assert_allclose(test_counts, (train_counts + test_counts) * 0.25, atol=1)
    # Disjoint (no image appears in both splits; the raw set has no exact duplicates).
    train_keys = {x.tobytes() for x in x_train}
    assert len(train_keys) == len(x_train)
    assert not train_keys & {x.tobytes() for x in x_test}
    # Fixed given the seed, different for another seed.
    again = digits.load_digits_split()
    np.testing.assert_array_equal(again["test"][0], x_test)
    other = digits.load_digits_split(seed=1)
    assert not np.array_equal(other["test"][1], y_test)


def test_digits_upsampling_preserves_blank_background():
    value = digits.digits_background_value(24)
    images, _ = digits.load_digits_split(image_size=24)["train"]
    assert images.shape[1:] == (24, 24, 1)
    # Digit corners are blank, so they hold exactly the normalised value of 0.
    np.testing.assert_allclose(np.median(images[:, 0, 0, 0]), value, rtol=1e-6)
    np.testing.assert_allclose(images.min(), value, rtol=1e-6)


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_digits_eval_is_exact(process_count):
    global_batch = 64  # Does not divide the 450 test examples.
    x_test, y_test = digits.load_digits_split()["test"]
    seen_images, seen_labels, lengths = [], [], []
    for index in range(process_count):
        ds, total = input_pipeline.create_eval_dataset(
            "digits",
            global_batch_size=global_batch,
            process_index=index,
            process_count=process_count,
        )
        assert total == 450
        batches = list(ds.as_numpy_iterator())
        lengths.append(len(batches))
        for batch in batches:
            assert batch["image"].shape == (global_batch // process_count, 16, 16, 1)
            assert batch["mask"].dtype == np.float32
            real = batch["mask"] == 1
            assert np.all((batch["mask"] == 0) | real)
            assert np.all(batch["image"][~real] == 0) and np.all(batch["label"][~real] == 0)
            seen_images.extend(batch["image"][real])
            seen_labels.extend(batch["label"][real])
    # Same number of batches everywhere, every example once.
    assert len(set(lengths)) == 1
    assert lengths[0] == datasets.num_eval_batches(
        450, global_batch // process_count, process_count
    )
    assert len(seen_labels) == 450
    assert sorted(x.tobytes() for x in seen_images) == sorted(x.tobytes() for x in x_test)
    np.testing.assert_array_equal(np.sort(seen_labels), np.sort(y_test))


def test_digits_train_stream_is_reproducible_and_per_process():
    def first_batch(seed, index, count=2):
        ds = input_pipeline.create_train_dataset(
            "digits", global_batch_size=64, seed=seed, process_index=index, process_count=count
        )
        return next(ds.as_numpy_iterator())

    batch = first_batch(0, 0)
    assert batch["image"].shape == (32, 16, 16, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(10))
    again = first_batch(0, 0)
    np.testing.assert_array_equal(batch["image"], again["image"])
    assert not np.array_equal(batch["image"], first_batch(1, 0)["image"])
    assert not np.array_equal(batch["image"], first_batch(0, 1)["image"])


# ------------------------------------------------------------------------------------------------
# Augmentations on synthetic images.


def test_random_resized_crop_window_matches_torchvision_distribution():
    height, width, num = 300, 400, 2000
    windows = _map_seeds(
        lambda s: preprocessing.random_resized_crop_window([height, width, 3], s), num
    )
    y, x, h, w = windows.T
    assert np.all((y >= 0) & (x >= 0) & (y + h <= height) & (x + w <= width) & (h > 0) & (w > 0))
    area = h * w / (height * width)
    aspect = w / h
    # Rounding w and h to integers moves the area and aspect by about 1% at the smallest crops.
    assert area.min() >= 0.08 * 0.98 and area.max() <= 1.0
    assert aspect.min() >= 0.75 * 0.98 and aspect.max() <= 4 / 3 * 1.02
    assert len({tuple(v) for v in windows}) > 0.95 * num

    rng = np.random.default_rng(0)
    reference = np.array([_torchvision_crop_params(rng, height, width) for _ in range(num)])
    ref_area = reference[:, 2] * reference[:, 3] / (height * width)
    ref_aspect = reference[:, 3] / reference[:, 2]
    quantiles = [0.1, 0.25, 0.5, 0.75, 0.9]
    # 2000 samples: quantile standard errors are about 0.01 on both scales.
    np.testing.assert_allclose(
        np.quantile(area, quantiles), np.quantile(ref_area, quantiles), atol=0.04
    )
    np.testing.assert_allclose(
        np.quantile(np.log(aspect), quantiles),
        np.quantile(np.log(ref_aspect), quantiles),
        atol=0.04,
    )


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((10, 1000), (0, 493, 10, 13)),  # Too wide for any attempt: clamp to 4/3, centre.
        ((1000, 10), (493, 0, 13, 10)),  # Too tall: clamp to 3/4.
    ],
)
def test_random_resized_crop_window_fallback(shape, expected):
    windows = _map_seeds(lambda s: preprocessing.random_resized_crop_window(shape, s), 20)
    for window in windows:
        assert tuple(window) == expected
        assert tuple(window) == _torchvision_crop_params(np.random.default_rng(0), *shape)


def test_flip_happens_half_the_time():
    image = np.broadcast_to((10 + 7 * np.arange(32, dtype=np.uint8))[None, :, None], (32, 32, 3))
    images = _map_seeds(lambda s: preprocessing.cifar_train_preprocess(tf.constant(image), s), 400)
    # Columns 8..23 are never reached by the 4-pixel padding, so their order tells the flip.
    flipped = images[:, 16, 8, 0] > images[:, 16, 23, 0]
    assert 0.4 < flipped.mean() < 0.6


def test_cifar_pad_crop_fills_with_normalised_zero():
    white = tf.constant(np.full((32, 32, 3), 255, np.uint8))
    images = _map_seeds(
        lambda s: _to_unit_normalised(preprocessing.cifar_train_preprocess(white, s)), 1000
    )
    shifts = set()
    for image in images:
        is_zero = np.all(np.isclose(image, NORMALISED_ZERO, atol=1e-5), axis=-1)
        is_one = np.all(np.isclose(image, NORMALISED_ONE, atol=1e-5), axis=-1)
        assert np.all(is_zero | is_one)
        zero_rows, zero_cols = is_zero.all(axis=1), is_zero.all(axis=0)
        top, bottom = np.argmin(zero_rows), np.argmin(zero_rows[::-1])
        left, right = np.argmin(zero_cols), np.argmin(zero_cols[::-1])
        assert top * bottom == 0 and left * right == 0
        assert top + bottom <= 4 and left + right <= 4
        # A crop shifted by k pixels has exactly k padded rows (columns); the rest is image.
        assert is_one[top : 32 - bottom, left : 32 - right].all()
        assert is_zero.sum() == 32 * 32 - (32 - top - bottom) * (32 - left - right)
        shifts.add((top - bottom, left - right))
    assert shifts == {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)}


def test_normalize_constant_image():
    out = preprocessing.normalize(tf.fill([4, 5, 3], 0.5)).numpy()
    np.testing.assert_allclose(out, np.broadcast_to((0.5 - MEAN) / STD, (4, 5, 3)), rtol=1e-6)
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
    out = preprocessing.cifar_eval_preprocess(tf.constant(pixels)).numpy()
    np.testing.assert_array_equal(out, pixels)  # uint8 on the wire, normalised on the device


def test_imagenet_preprocess_constant_jpeg():
    rgb = (128, 64, 200)
    expected = (np.array(rgb) / 255 - MEAN) / STD
    encoded = _constant_jpeg(90, 150, rgb)
    # JPEG colour conversion may move a constant colour by a couple of levels: 3 / 255 / 0.224.
    atol = 0.06
    out = _to_unit_normalised(preprocessing.imagenet_eval_preprocess(encoded)).numpy()
    assert out.shape == (224, 224, 3)
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=atol)
    out = preprocessing.imagenet_train_preprocess(
        encoded, tf.constant([1, 2], tf.int64), image_size=64
    )
    out = _to_unit_normalised(out)
    assert out.shape == (64, 64, 3)
    np.testing.assert_allclose(out.numpy(), np.broadcast_to(expected, out.shape), atol=atol)


def test_imagenet_eval_geometry_follows_torchvision():
    # A white image with a black right half: Resize(256) gives 256 x int(256 * 300 / 200) = 384,
    # CenterCrop(224) starts at column 80, so the edge (column 192 after resizing) lands at 112.
    image = np.full((200, 300, 3), 255, np.uint8)
    image[:, 150:] = 0
    out = _to_unit_normalised(
        preprocessing.imagenet_eval_preprocess(tf.io.encode_jpeg(tf.constant(image), quality=100))
    )
    row = out.numpy()[112, :, 0]
    white, black = NORMALISED_ONE[0], NORMALISED_ZERO[0]
    # Away from the 8x8 JPEG block holding the edge, pixels are flat.
    assert np.allclose(row[:100], white, atol=0.06) and np.allclose(row[120:], black, atol=0.06)
    assert row[111] > (white + black) / 2 > row[112]
