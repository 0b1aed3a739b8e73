"""The sampler-based input pipeline: epochs, topology-independent batches, O(1) resume, real
array_record TFDS datasets (tiny, built in a temporary directory), validation and prefetch."""

import itertools
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from support import synthetic_tfds

from pcjax.configs import schema
from pcjax.data import datasets, digits, input_pipeline, prepared, sources
from pcjax.data import sampler as sampler_lib
from pcjax.training import prefetch, sharding

MEAN = np.array(datasets.IMAGENET_MEAN, np.float64)
STD = np.array(datasets.IMAGENET_STD, np.float64)


class CountingSource:
    """Wraps a real source and records the index of every record read."""

    def __init__(self, source):
        self.source = source
        self.reads: list[int] = []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.reads.append(int(index))
        return self.source[index]


def _digits_source():
    return CountingSource(sources.open_source(datasets.spec("digits"), "train"))


def _batches(ds, n):
    it = ds.as_numpy_iterator()
    return [next(it) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# Sampler and stream semantics on the in-memory digits.


def test_one_epoch_visits_every_example_once():
    """(c) 1347 digits, batch 64: 21 steps read 1344 distinct examples, 3 dropped per epoch."""
    source = _digits_source()
    ds = input_pipeline.create_train_dataset(
        "digits", global_batch_size=64, seed=5, process_index=0, process_count=1, source=source
    )
    batches = _batches(ds, 42)
    sampler = sampler_lib.IndexSampler(1347, 64, seed=5)
    assert sampler.steps_per_epoch == 21
    for epoch in range(2):
        steps = [sampler.global_indices(s) for s in range(21 * epoch, 21 * epoch + 21)]
        assert set(np.concatenate(steps)) <= set(source.reads)
        read = [i for step in steps for i in step]
        assert len(read) == len(set(read)) == 21 * 64
        assert set(read) <= set(range(1347))
    assert set(sampler.global_indices(0)) != set(sampler.global_indices(21))  # fresh order
    labels = np.concatenate([b["label"] for b in batches[:21]])
    _, train_labels = digits.load_split("digits", "train")
    np.testing.assert_array_equal(labels, train_labels[sampler.permutation(0)[:1344]])


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_slice_the_same_global_batch(process_count):
    """Concatenated process slices equal the 1-process batch, bitwise, augmentations included."""

    def stream(index, count):
        ds = input_pipeline.create_train_dataset(
            "digits", global_batch_size=64, seed=3, process_index=index, process_count=count
        )
        return _batches(ds, 3)

    whole = stream(0, 1)
    parts = [stream(p, process_count) for p in range(process_count)]
    for step in range(3):
        for key in ("image", "label"):
            joined = np.concatenate([part[step][key] for part in parts])
            np.testing.assert_array_equal(joined, whole[step][key])
    assert not np.array_equal(whole[0]["image"], whole[1]["image"])


def test_resume_reads_only_the_steps_from_k():
    """(d) Starting at step 1000 reads step 1000's records first and never an earlier step's."""
    k, batch = 1000, 32
    source = _digits_source()
    resumed_ds = input_pipeline.create_train_dataset(
        "digits",
        global_batch_size=batch,
        seed=1,
        process_index=1,
        process_count=2,
        start_step=k - 2,
        source=source,
    )
    assert source.reads == []  # creating the stream reads nothing
    resumed = _batches(resumed_ds, 1)[0]
    sampler = sampler_lib.IndexSampler(1347, batch, seed=1)
    rows = sampler.process_rows(1, 2)
    step_of = {}  # example -> first step in [k - 2, k + 62) whose slice holds it
    for step in range(k - 2, k + 62):
        for index in sampler.global_indices(step)[rows]:
            step_of.setdefault(int(index), step)
    assert set(sampler.global_indices(k - 2)[rows]) <= set(source.reads)
    # Read-ahead is a few batches of tf.data buffering, not the k * batch records replayed before:
    # every record read belongs to one of the 64 steps from k - 2 on.
    assert all(index in step_of for index in source.reads)
    assert len(source.reads) < 64 * batch // 2 < k * batch // 2
    # The batch of a step does not depend on where the stream started.
    earlier = _batches(
        input_pipeline.create_train_dataset(
            "digits",
            global_batch_size=batch,
            seed=1,
            process_index=1,
            process_count=2,
            start_step=k - 3,
        ),
        2,
    )
    np.testing.assert_array_equal(earlier[1]["image"], resumed["image"])
    late = sampler_lib.IndexSampler(1347, batch, seed=1).global_indices(k - 2)[rows]
    _, labels = digits.load_split("digits", "train")
    np.testing.assert_array_equal(resumed["label"], labels[late])


def test_sampler_bad_arguments():
    with pytest.raises(ValueError, match="global_batch_size=2000"):
        sampler_lib.IndexSampler(1347, 2000, seed=0)
    with pytest.raises(ValueError, match="seed"):
        sampler_lib.IndexSampler(1347, 64, seed=-1)
    with pytest.raises(ValueError, match="step"):
        sampler_lib.IndexSampler(1347, 64, seed=0).global_indices(-1)
    with pytest.raises(ValueError, match="start_step"):
        input_pipeline.create_train_dataset(
            "digits", global_batch_size=8, seed=0, process_index=0, process_count=1, start_step=-3
        )


# ------------------------------------------------------------------------------------------------
# On-device normalisation and device prefetch.


def test_normalize_images_against_float64():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 5, 4, 3), np.uint8)
    got = jax.jit(datasets.normalize_images)(jnp.asarray(pixels))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), (pixels / 255.0 - MEAN) / STD, rtol=1e-5, atol=1e-6)
    floats = rng.normal(size=(2, 4, 4, 1)).astype(np.float32)
    np.testing.assert_array_equal(datasets.normalize_images(jnp.asarray(floats)), floats)


def test_device_prefetcher_yields_sharded_batches_in_order():
    mesh = sharding.make_mesh()
    host = [{"image": np.full((8, 2), i, np.uint8), "label": np.arange(8) + i} for i in range(5)]
    prefetcher = prefetch.DevicePrefetcher(iter(host), mesh, size=2)
    got = list(prefetcher)
    assert len(got) == 5
    for i, batch in enumerate(got):
        assert batch["image"].sharding == sharding.batch_sharded(mesh)
        assert batch["image"].dtype == jnp.uint8
        np.testing.assert_array_equal(batch["image"], host[i]["image"])
        np.testing.assert_array_equal(batch["label"], host[i]["label"])


def test_device_prefetcher_raises_the_producer_error():
    def broken():
        yield {"image": np.zeros((8, 1), np.float32)}
        raise OSError("disk gone")

    prefetcher = prefetch.DevicePrefetcher(broken(), sharding.make_mesh())
    next(prefetcher)
    with pytest.raises(OSError, match="disk gone"):
        next(prefetcher)


# ------------------------------------------------------------------------------------------------
# Tiny real TFDS datasets in the array_record format.

CIFAR_TRAIN, CIFAR_TEST, IMAGENET_TRAIN, IMAGENET_VAL = 12, 5, 10, 5


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tfds"))
    synthetic_tfds.prepare("cifar10", root, [("train", CIFAR_TRAIN), ("test", CIFAR_TEST)])
    splits = [("train", IMAGENET_TRAIN), ("validation", IMAGENET_VAL)]
    synthetic_tfds.prepare("imagenet2012", root, splits, small=True)
    return root


def _raw_split(data_dir, name, split):
    """(images, labels) of a split read straight from TFDS, the oracle of the pipelines."""
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    records = [source[i] for i in range(len(source))]
    return [r["image"] for r in records], np.array([r["label"] for r in records])


def test_cifar_train_on_array_record(data_dir):
    """(e) Rows are the sampler's examples, flipped and shifted in uint8; processes agree."""
    images, labels = _raw_split(data_dir, "cifar10", "train")
    whole = _batches(
        input_pipeline.create_train_dataset(
            "cifar10",
            global_batch_size=4,
            seed=2,
            data_dir=data_dir,
            process_index=0,
            process_count=1,
        ),
        3,
    )
    halves = [
        _batches(
            input_pipeline.create_train_dataset(
                "cifar10",
                global_batch_size=4,
                seed=2,
                data_dir=data_dir,
                process_index=p,
                process_count=2,
            ),
            3,
        )
        for p in range(2)
    ]
    sampler = sampler_lib.IndexSampler(CIFAR_TRAIN, 4, seed=2)
    for step, batch in enumerate(whole):
        assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 32, 32, 3)
        indices = sampler.global_indices(step)
        np.testing.assert_array_equal(batch["label"], labels[indices])
        for row, index in enumerate(indices):
            # A crop shifted by at most 4 pixels, maybe flipped: some shift matches exactly.
            got = batch["image"][row].astype(int)
            assert any(
                np.array_equal(
                    got[max(0, -dy) : 32 - max(0, dy), max(0, -dx) : 32 - max(0, dx)],
                    src[max(0, dy) : 32 - max(0, -dy), max(0, dx) : 32 - max(0, -dx)],
                )
                for src in (images[index].astype(int), images[index][:, ::-1].astype(int))
                for dy in range(-4, 5)
                for dx in range(-4, 5)
            )
        joined = np.concatenate([halves[0][step]["image"], halves[1][step]["image"]])
        np.testing.assert_array_equal(joined, batch["image"])


@pytest.mark.parametrize(
    ("name", "split", "size", "count"),
    [("cifar10", "test", 32, CIFAR_TEST), ("imagenet2012", "validation", 48, IMAGENET_VAL)],
)
def test_eval_on_array_record_is_exact(data_dir, name, split, size, count):
    _, labels = _raw_split(data_dir, name, split)
    seen = []
    for p in range(2):
        ds, total = input_pipeline.create_eval_dataset(
            name,
            global_batch_size=4,
            data_dir=data_dir,
            image_size=size if name != "cifar10" else None,
            process_index=p,
            process_count=2,
        )
        batches = list(ds.as_numpy_iterator())
        assert total == count
        assert len(batches) == datasets.num_eval_batches(count, 2, 2)
        for batch in batches:
            assert batch["image"].dtype == np.uint8 and batch["image"].shape == (2, size, size, 3)
            real = batch["mask"] == 1
            assert np.all(batch["image"][~real] == 0) and np.all(batch["label"][~real] == 0)
            seen.extend(batch["label"][real])
    np.testing.assert_array_equal(seen, labels)  # contiguous shares, in order, each once


def test_imagenet_train_on_array_record(data_dir):
    images, labels = _raw_split(data_dir, "imagenet2012", "train")
    ds = input_pipeline.create_train_dataset(
        "imagenet2012",
        global_batch_size=4,
        seed=0,
        data_dir=data_dir,
        image_size=40,
        process_index=1,
        process_count=2,
    )
    batch = _batches(ds, 1)[0]
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (2, 40, 40, 3)
    indices = sampler_lib.IndexSampler(IMAGENET_TRAIN, 4, seed=0).global_indices(0)[2:]
    np.testing.assert_array_equal(batch["label"], labels[indices])
    assert len(images) == IMAGENET_TRAIN


def test_corrupted_record_names_file_and_index(data_dir, tmp_path):
    shutil.copytree(f"{data_dir}/cifar10", tmp_path / "cifar10")
    (shard,) = (tmp_path / "cifar10").glob("*/cifar10-train.array_record-*")
    raw = bytearray(shard.read_bytes())
    raw[2000:2100] = bytes(b ^ 0xFF for b in raw[2000:2100])
    shard.write_bytes(raw)
    source = sources.open_source(datasets.spec("cifar10"), "train", str(tmp_path))
    with pytest.raises(sources.RecordReadError, match=rf"record \d+ of .*{shard.name}"):
        sources.read_records(source, range(CIFAR_TRAIN))


def _config(name, data_dir):
    cfg = schema.default_config()
    cfg.data.name = name
    cfg.data.data_dir = data_dir
    return cfg


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_validation_gives_the_prepare_command(tmp_path, name):
    """A data_dir that does not exist is named as missing (never "already prepared in the
    TFRECORD format"), followed by the command that prepares it."""
    with pytest.raises(
        schema.ConfigError,
        match=rf"(?s)is not in data_dir=.*empty.*tfds build {name} --file_format=array_record",
    ) as caught:
        schema.validate_data(_config(name, str(tmp_path / "empty")))
    assert "TFRECORD" not in str(caught.value).upper()


def test_validation_rejects_tfrecord_and_accepts_array_record(data_dir, tmp_path):
    schema.validate_data(_config("cifar10", data_dir))
    schema.validate_data(_config("digits", None))
    synthetic_tfds.prepare("cifar10", str(tmp_path), [("train", 4), ("test", 2)], "tfrecord")
    with pytest.raises(schema.ConfigError, match="tfds build cifar10 --file_format=array_record"):
        schema.validate_data(_config("cifar10", str(tmp_path)))


def test_files_alone_tell_prepared_from_not(data_dir, tmp_path, monkeypatch):
    """Without TFDS loaded, the files decide: array_record shards pass, TFRecord shards and a
    missing folder are refused with what was found and the prepare command."""
    synthetic_tfds.prepare("cifar10", str(tmp_path), [("train", 4), ("test", 2)], "tfrecord")
    monkeypatch.delitem(sys.modules, "tensorflow_datasets")
    cifar = datasets.spec("cifar10")
    prepared.check_prepared(cifar, data_dir)
    prepared.check_prepared(datasets.spec("imagenet2012"), data_dir)
    command = "tfds build cifar10 --file_format=array_record"
    with pytest.raises(
        prepared.DataNotPreparedError, match=rf"(?s)found cifar10-train.tfrecord.*{command}"
    ):
        prepared.check_prepared(cifar, str(tmp_path))
    with pytest.raises(prepared.DataNotPreparedError, match=rf"(?s)no folder .*nowhere.*{command}"):
        prepared.check_prepared(cifar, str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------------
# TFDS mock data (the smoke tests of the CIFAR/ImageNet mains use it).


@pytest.mark.parametrize("name", ["imagenet2012", "cifar10"])
def test_pipelines_on_tfds_mock_data_sources(name):
    size = 48 if name == "imagenet2012" else 32
    with tfds.testing.mock_data(num_examples=6):
        schema.validate_data(_config(name, None))
        train = input_pipeline.create_train_dataset(
            name, global_batch_size=4, seed=3, image_size=size, process_index=0, process_count=1
        )
        batches = _batches(train, 2)
        ds, total = input_pipeline.create_eval_dataset(
            name, global_batch_size=4, image_size=size, process_index=0, process_count=1
        )
        eval_batches = list(ds.as_numpy_iterator())
    assert total == 6 and len(eval_batches) == 2
    for batch in batches + eval_batches:
        assert batch["image"].shape == (4, size, size, 3) and batch["image"].dtype == np.uint8
        assert np.all((batch["label"] >= 0) & (batch["label"] < datasets.num_classes(name)))
    np.testing.assert_array_equal(eval_batches[1]["mask"], [1, 1, 0, 0])


def test_train_iterator_from_config():
    cfg = ml_collections.ConfigDict(
        {
            "seed": 4,
            "data": {
                "name": "digits",
                "global_batch_size": 16,
                "data_dir": None,
                "image_size": None,
            },
        }
    )
    mesh = sharding.make_mesh()
    it = prefetch.create_train_iterator(cfg, 7, mesh)
    batch = next(it)
    it.close()
    host = _batches(
        input_pipeline.create_train_dataset(
            "digits", global_batch_size=16, seed=4, process_index=0, process_count=1, start_step=7
        ),
        1,
    )[0]
    np.testing.assert_array_equal(batch["image"], host["image"])
    assert batch["image"].sharding == sharding.batch_sharded(mesh)


def test_device_prefetcher_reads_only_size_batches_ahead_and_close_lets_go():
    """No thread drains the host stream: after k batches used, k + size were read; `close`
    drops the queued device batches and the host iterator."""
    reads = []

    def host():
        for i in itertools.count():
            reads.append(i)
            yield {"image": np.full((8, 1), i % 256, np.uint8)}

    prefetcher = prefetch.DevicePrefetcher(host(), sharding.make_mesh(), size=2)
    assert reads == []  # creating it reads nothing
    with jax.transfer_guard("disallow"):  # as in the train loop: its copies are the intended ones
        got = [next(prefetcher) for _ in range(3)]
    for step, batch in enumerate(got):
        np.testing.assert_array_equal(batch["image"], np.full((8, 1), step))
    assert len(reads) == 3 + 2 and not prefetcher.closed
    prefetcher.close()
    assert prefetcher.closed and not prefetcher._ahead
    with pytest.raises(StopIteration):
        next(prefetcher)


@pytest.mark.parametrize("size", [8, 32])
def test_digits_at_another_size_read_records_of_that_size(size):
    """A digits stream at a non-default size reads records built at that size, train and eval."""
    images, labels = digits.load_split("digits", "train", size)
    ds = input_pipeline.create_train_dataset(
        "digits", global_batch_size=16, seed=3, image_size=size
    )
    batch = next(ds.as_numpy_iterator())
    assert batch["image"].shape == (16, size, size, 1)
    indices = sampler_lib.IndexSampler(len(labels), 16, 3).global_indices(0)
    np.testing.assert_array_equal(batch["label"], labels[indices])
    ds, count = input_pipeline.create_eval_dataset("digits", global_batch_size=64, image_size=size)
    test_images, _ = digits.load_split("digits", "test", size)
    first = next(ds.as_numpy_iterator())
    assert count == len(test_images) and first["image"].shape == (64, size, size, 1)
    np.testing.assert_array_equal(first["image"], test_images[:64])
