"""Checkpoints: a damaged latest step falls back to the newest one that restores."""

import logging
import shutil

import jax
import numpy as np
import pytest

from pcjax.training import checkpoint


def _state(rng: np.random.Generator) -> dict:
    return {
        "w": jax.numpy.asarray(rng.standard_normal((16, 8)).astype(np.float32)),
        "b": jax.numpy.asarray(rng.standard_normal(8).astype(np.float32)),
    }


def _save_steps(workdir, steps, seed=0):
    rng = np.random.default_rng(seed)
    states = {}
    with checkpoint.create_manager(workdir, every_steps=1, max_to_keep=5) as manager:
        for step in steps:
            states[step] = _state(rng)
            checkpoint.save(manager, step, states[step], {"best_top1": step / 10}, force=True)
    return states


def _truncate_data(step_dir):
    """Cuts every array data file in half (OCDBT keeps them in `d/` folders)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for path in files:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def _drop_metadata(step_dir):
    """The tree metadata and the array store's manifests: the arrays cannot be found."""
    (step_dir / "state" / "_METADATA").unlink()
    for manifest in (step_dir / "state").rglob("manifest.ocdbt"):
        manifest.unlink()


def _empty(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


@pytest.mark.parametrize("damage", [_truncate_data, _drop_metadata, _empty])
def test_damaged_latest_step_falls_back_to_previous(tmp_path, damage, caplog):
    states = _save_steps(tmp_path, [1, 2, 3])
    damage(tmp_path / "checkpoints" / "3")
    target = states[1]  # the trainer restores into its freshly initialised (sharded) state
    with checkpoint.create_manager(tmp_path, 1, 5) as manager, caplog.at_level(logging.WARNING):
        state, loop, step = checkpoint.restore_latest(manager, target)
        assert step == 2 and loop == {"best_top1": 0.2}
        for key in states[2]:
            np.testing.assert_array_equal(state[key], states[2][key])
        # The damaged step was moved aside, so the run can save step 3 again.
        assert (tmp_path / "damaged_checkpoints" / "3").is_dir()
        assert checkpoint.save(manager, 3, states[3], force=True)
    lines = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert len(lines) == 1 and "step 3" in lines[0] and "checkpoints/3" in lines[0], lines
    assert len(lines[0]) < 500
    with checkpoint.create_manager(tmp_path, 1, 5) as manager:
        assert checkpoint.restore_latest(manager, target)[2] == 3


def test_missing_tree_metadata_alone_still_restores(tmp_path):
    """Restoring into the trainer's target needs only the arrays: not damage."""
    states = _save_steps(tmp_path, [1, 2], seed=1)
    (tmp_path / "checkpoints" / "2" / "state" / "_METADATA").unlink()
    with checkpoint.create_manager(tmp_path, 1, 5) as manager:
        state, _, step = checkpoint.restore_latest(manager, states[1])
    assert step == 2
    np.testing.assert_array_equal(state["w"], states[2]["w"])


def test_no_step_restores_names_the_folder(tmp_path):
    states = _save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        _truncate_data(tmp_path / "checkpoints" / str(step))
    with checkpoint.create_manager(tmp_path, 1, 5) as manager:
        with pytest.raises(checkpoint.CheckpointError, match=f"{tmp_path}/checkpoints restores"):
            checkpoint.restore_latest(manager, states[2])


def test_restore_variables_reads_the_state_item(tmp_path):
    states = _save_steps(tmp_path, [4, 7], seed=3)
    for step in (None, 4):
        got, at = checkpoint.restore_variables(str(tmp_path), step)
        assert at == (step or 7)
        for key in states[at]:
            np.testing.assert_array_equal(got[key], states[at][key])
    with pytest.raises(FileNotFoundError):
        checkpoint.restore_variables(tmp_path / "nowhere")
