"""Per-array checksums: against a NumPy oracle, every single-bit flip detected, and a
checkpoint with one flipped bit in its array data set aside instead of restored."""

import logging
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pcjax.training import checkpoint, checksums


def _oracle(x: np.ndarray) -> tuple[int, int]:
    """The two sums of pcjax.training.checksums in Python integers, from the raw bytes."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    width = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
    words = [int(w) for w in x.reshape(-1).view(width)]
    plain = sum(words) % 2**32
    weighted = sum((2 * i + 1) * w for i, w in enumerate(words)) % 2**32
    return plain, weighted


def test_manifest_matches_a_numpy_oracle():
    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.standard_normal((7, 5)).astype(np.float32),
        "i32": rng.integers(-(2**31), 2**31 - 1, (33,), dtype=np.int32),
        "u8": rng.integers(0, 256, (3, 4, 5), dtype=np.uint8),
        "bf16": rng.standard_normal(9).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal((2, 3)).astype(np.float16),
        "flag": rng.integers(0, 2, 11).astype(np.bool_),
        "scalar": np.float32(3.5),
    }
    got = checksums.manifest({k: jnp.asarray(v) for k, v in tree.items()})
    for key, value in tree.items():
        entry = got[f"['{key}']"]
        assert (entry["sum"], entry["weighted"]) == _oracle(np.asarray(value)), key
        assert entry["shape"] == list(np.shape(value))


def test_every_single_bit_flip_changes_the_checksum():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(24).astype(np.float32)
    clean = checksums.manifest({"x": jnp.asarray(x)})
    words = x.view(np.uint32)
    flipped = np.repeat(words[None], 24 * 32, axis=0)
    for i in range(24):
        for bit in range(32):
            flipped[i * 32 + bit, i] ^= np.uint32(1 << bit)
    # One manifest per flipped copy: the rows of a (768, 24) array, each a separate leaf.
    leaves = {str(r): jnp.asarray(row.view(np.float32)) for r, row in enumerate(flipped)}
    got = checksums.manifest(leaves)
    same = [
        r
        for r, e in got.items()
        if (e["sum"], e["weighted"]) == (clean["['x']"]["sum"], clean["['x']"]["weighted"])
    ]
    assert same == []
    with pytest.raises(checksums.ChecksumError, match=r"array \['x'\] \(24,\) float32"):
        checksums.verify({"x": jnp.asarray(flipped[5].view(np.float32))}, clean)
    checksums.verify({"x": jnp.asarray(x)}, clean)


def _state(rng):
    return {
        "w": jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32)),
        "b": jnp.asarray(rng.standard_normal(32).astype(np.float32)),
    }


def test_a_flipped_bit_in_the_array_data_is_set_aside_not_restored(tmp_path, caplog):
    rng = np.random.default_rng(2)
    states = {}
    with checkpoint.create_manager(tmp_path, 1, 5) as manager:
        for step in (1, 2):
            states[step] = _state(rng)
            checkpoint.save(manager, step, states[step], {"step": step}, force=True)
    step_dir = tmp_path / "checkpoints" / "2"
    # The arrays' bytes: the largest file of the array store (the others are its index).
    data = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    assert data.stat().st_size > 64 * 32 * 4 * 0.9
    backup = tmp_path / "backup"
    shutil.copytree(step_dir, backup)
    size = data.stat().st_size
    for offset in rng.choice(size, 6, replace=False):
        raw = bytearray(data.read_bytes())
        raw[offset] ^= 1 << int(rng.integers(8))
        data.write_bytes(bytes(raw))
        caplog.clear()
        with checkpoint.create_manager(tmp_path, 1, 5) as manager, caplog.at_level(logging.WARN):
            state, loop, step = checkpoint.restore_latest(manager, states[1])
        assert step == 1 and loop == {"step": 1}, offset
        np.testing.assert_array_equal(state["w"], states[1]["w"])
        lines = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
        assert len(lines) == 1 and "step 2" in lines[0], lines
        assert (tmp_path / "damaged_checkpoints" / "2").is_dir()
        shutil.rmtree(tmp_path / "damaged_checkpoints")
        shutil.copytree(backup, step_dir)


def test_checkpoints_without_checksums_still_restore(tmp_path):
    """Checkpoints written before checksums existed restore, unverified."""
    rng = np.random.default_rng(3)
    state = _state(rng)
    with checkpoint.create_manager(tmp_path, 1, 5) as manager:
        checkpoint.save(manager, 1, state, force=True)
    shutil.rmtree(tmp_path / "checkpoints" / "1" / checkpoint.CHECKSUMS)
    with checkpoint.create_manager(tmp_path, 1, 5) as manager:
        got, _, step = checkpoint.restore_latest(manager, state)
    assert step == 1
    np.testing.assert_array_equal(got["w"], state["w"])
    assert jax.tree.structure(got) == jax.tree.structure(state)
