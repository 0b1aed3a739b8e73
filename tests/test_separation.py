"""The separation study (experiments/separation.py): lr grid on a validation split, seeds,
training through the trainer's loop, a rerun that reuses finished runs, the report."""

import csv
import importlib
import math
import os

import numpy as np
import pytest

from pcjax.configs import digits_canvas

EXPERIMENTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"
)


@pytest.fixture(scope="module")
def separation():
    """The study's module, imported as the script imports its sibling modules."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(EXPERIMENTS)
        yield importlib.import_module("separation")


def test_validation_split_is_stratified_and_disjoint(separation):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 20)
    images = rng.normal(size=(100, 2)) + labels[:, None]
    (x_fit, y_fit), (x_val, y_val) = separation.carve_validation(images, labels, 0.2)
    assert len(y_val) == 20 and np.all(np.bincount(y_val) == 4)
    rows = {tuple(r) for r in x_fit} | {tuple(r) for r in x_val}
    assert len(rows) == 100  # a partition of the training set
    with pytest.raises(ValueError, match="fraction"):
        separation.carve_validation(images, labels, 1.5)


def _stamps(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_study_trains_selects_reuses_and_reports(tmp_path, separation):
    config = digits_canvas.get_config("smoke")
    config.model.widths = (4,)  # one block: 32x32 -> 32x32 (compile time dominates)
    config.data.global_batch_size = 256  # 4 steps per epoch on the 1,077 fit examples
    config.optim.num_epochs = 2
    kwargs = dict(
        nonlinearities=("mod", "cst"),
        block_types=("rho_psi",),
        learning_rates=(0.01, 0.05),
        num_seeds=2,
        output_dir=tmp_path / "report",
    )
    runs = tmp_path / "runs"
    out = separation.run_study(runs, config, **kwargs)
    nets = out["networks"]
    assert sorted(nets) == [("rho_psi", "cst"), ("rho_psi", "mod")]
    for (bt, rho), net in nets.items():
        grid = net["grid"]
        assert net["lr"] == max(grid, key=lambda lr: (grid[lr]["val_top1"], -lr))
        assert [r["seed"] for r in net["seeds"]] == [0, 1]
        assert net["seeds"][0] is grid[net["lr"]]
        for r in net["seeds"]:
            assert len(r["curve"]) == 2 and r["steps"] == 8
            assert 0 <= r["test_top1"] <= 1 and math.isfinite(r["curve"][-1]["train_loss"])
        other = [lr for lr in grid if lr != net["lr"]][0]
        assert not (runs / bt / rho / f"lr{other:g}" / "seed1").exists()
        layers = out["layers"][(bt, rho)]
        assert list(layers[0]) == ["input", "block0", "head/bn"]
        assert {"train/nc1", "train/nc4", "eval/ncm_accuracy"} <= set(layers[0]["block0"])
        assert "train/nc3" in layers[0]["head/bn"]
    # Each run is a trainer workdir: its config and the Orbax checkpoint of the last step.
    run = runs / "rho_psi" / "mod" / f"lr{nets[('rho_psi', 'mod')]['lr']:g}" / "seed1"
    assert (run / "config.json").exists() and (run / "checkpoints" / "8").is_dir()
    assert not list(runs.rglob("*.msgpack"))
    # Seeds differ; the input layer's measures do not depend on the network.
    mod = out["layers"][("rho_psi", "mod")]
    assert mod[0]["block0"]["train/nc1"] != mod[1]["block0"]["train/nc1"]
    assert (
        mod[0]["input"]["train/nc1"] == out["layers"][("rho_psi", "cst")][1]["input"]["train/nc1"]
    )

    # A rerun reuses every finished run: nothing in the runs' workdirs is written again.
    stamp = _stamps(runs)
    again = separation.run_study(runs, config, **kwargs)
    assert _stamps(runs) == stamp and again["layers"] == out["layers"]
    # A run without its result resumes from its checkpoint: no step is trained again.
    before = {k: v for k, v in again["networks"][("rho_psi", "mod")]["seeds"][1].items()}
    (run / "result.json").unlink()
    resumed = separation.run_study(runs, config, train_missing=True, analyse=False, **kwargs)
    after = resumed["networks"][("rho_psi", "mod")]["seeds"][1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["8"]
    for key in ("steps", "curve", "fit_top1", "val_top1", "test_top1"):
        assert after[key] == before[key], key

    report = tmp_path / "report"
    with open(report / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and sum(r["chosen_lr"] == "True" for r in rows) == 4
    text = (report / "results.md").read_text()
    assert "| rho_psi | cst |" in text and "7.7 %" in text and "22.5 %" in text
    assert "NC1" in text and "NC3" in text and "Not finished (left out above): none." in text
    for png in ("curves.png", "layers.png"):
        assert (report / png).read_bytes().startswith(b"\x89PNG")
