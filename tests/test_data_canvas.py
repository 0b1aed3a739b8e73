"""The "digits_canvas" dataset: digits pasted at fixed random positions of a blank canvas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcjax import analysis
from pcjax.configs import digits_canvas as digits_canvas_config
from pcjax.configs import schema
from pcjax.data import datasets, digits, input_pipeline
from pcjax.nn import models

SIZE = datasets.DIGITS_CANVAS_SIZE
DIGIT = datasets.DIGITS_CANVAS_DIGIT_SIZE


@pytest.fixture(scope="module")
def canvas():
    return digits.load_digits_canvas_split()


def test_facts_and_split(canvas):
    assert datasets.image_shape("digits_canvas") == (SIZE, SIZE, 1)
    assert datasets.num_classes("digits_canvas") == 10
    assert input_pipeline.num_train_examples("digits_canvas") == 1347
    assert "digits_canvas" in schema.DATASET_NAMES
    (x_train, y_train), (x_test, y_test) = canvas["train"], canvas["test"]
    assert x_train.shape == (1347, SIZE, SIZE, 1) and x_train.dtype == np.float32
    assert x_test.shape == (450, SIZE, SIZE, 1)
    # Same stratified split (same examples, same order) as the "digits" quick start.
    small = digits.load_digits_split(DIGIT)
    np.testing.assert_array_equal(y_train, small["train"][1])
    np.testing.assert_array_equal(y_test, small["test"][1])
    # Standardised with the train statistics (float32 sums: loose tolerance).
    assert abs(float(x_train.mean())) < 1e-4 and abs(float(x_train.std()) - 1) < 1e-4
    again = digits.load_digits_canvas_split()
    np.testing.assert_array_equal(again["test"][0], x_test)  # fixed placements


def test_each_digit_is_the_upsampled_digit_at_its_offset(canvas):
    """Background outside the 16x16 window at `canvas_offsets`; inside, the 16x16 digit.

    Oracle: scikit-learn's split indices (same call as documented) pick each example's offset;
    the canvas and the "digits" images are standardised differently, so one affine map relates
    every window to its digit.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    indices = dict(
        zip(
            ("train", "test"),
            train_test_split(
                np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=0
            ),
            strict=True,
        )
    )
    offsets = digits.canvas_offsets(len(labels), SIZE, seed=0)
    small = digits.load_digits_split(DIGIT)
    for split in ("train", "test"):
        x = canvas[split][0][..., 0].astype(np.float64)
        d = small[split][0][..., 0].astype(np.float64)
        background = x.min()
        windows = np.empty_like(d)
        for i, (r, c) in enumerate(offsets[indices[split]]):
            windows[i] = x[i, r : r + DIGIT, c : c + DIGIT]
            outside = x[i].copy()
            outside[r : r + DIGIT, c : c + DIGIT] = background
            np.testing.assert_array_equal(outside, background)
        a, b = np.polyfit(d.ravel(), windows.ravel(), 1)
        assert a > 0
        np.testing.assert_allclose(a * d + b, windows, atol=1e-4)  # float32 standardisations


def test_offsets_are_seeded_and_cover_the_canvas():
    off = digits.canvas_offsets(1797, SIZE, seed=0)
    np.testing.assert_array_equal(off, digits.canvas_offsets(1797, SIZE, seed=0))
    assert not np.array_equal(off, digits.canvas_offsets(1797, SIZE, seed=1))
    assert off.min() == 0 and off.max() == SIZE - DIGIT
    assert len(np.unique(off[:, 0])) == SIZE - DIGIT + 1


def test_bad_canvas_size_raises():
    with pytest.raises(ValueError, match="digits_canvas image_size"):
        datasets.image_shape("digits_canvas", DIGIT - 1)
    with pytest.raises(ValueError, match="15"):
        digits.load_digits_canvas_split(15)


def test_pipelines_yield_the_arrays_unaugmented(canvas):
    x_test, y_test = canvas["test"]
    ds, n = input_pipeline.create_eval_dataset(
        "digits_canvas", global_batch_size=128, process_index=0, process_count=1
    )
    batches = list(ds.as_numpy_iterator())
    assert n == 450 and len(batches) == 4
    images = np.concatenate([b["image"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert mask.sum() == 450 and mask[:450].all()
    np.testing.assert_array_equal(images[:450], x_test)
    np.testing.assert_array_equal(labels[:450], y_test)

    x_train = canvas["train"][0].reshape(1347, -1)
    train = input_pipeline.create_train_dataset(
        "digits_canvas", global_batch_size=64, seed=0, process_index=0, process_count=1
    )
    batch = next(train.as_numpy_iterator())
    assert batch["image"].shape == (64, SIZE, SIZE, 1)
    # No augmentation: every training image is one of the stored canvases.
    dist = ((batch["image"].reshape(64, 1, -1) - x_train[None]) ** 2).sum(-1)
    assert np.all(dist.min(axis=1) == 0)


def test_preset_networks_and_geometry():
    for rho in models.TABLE2_NONLINEARITIES:  # every network of the separation experiment
        for block_type in ("rho_psi", "linear_plus_rho"):
            cfg = digits_canvas_config.get_config()
            cfg.model.update(nonlinearity=rho, block_type=block_type)
            schema.validate(cfg)
    cfg = digits_canvas_config.get_config()
    assert datasets.image_shape(cfg.data.name, cfg.data.image_size) == (SIZE, SIZE, 1)
    model = schema.build_model(cfg)
    x = jnp.zeros((1, SIZE, SIZE, 1))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    shapes = jax.eval_shape(lambda v: analysis.capture_block_outputs(model, v, x), variables)
    layers = ["input", "block0", "block1", "block2", "block3"]
    assert sorted(shapes) == sorted(layers)
    assert [shapes[k].shape[1] for k in layers] == [32, 32, 16, 16, 8]
    assert [shapes[k].shape[-1] for k in layers[1:]] == list(digits_canvas_config.WIDTHS)
