"""Smoke test of experiments/separation.py: lr grid on a validation split, seeds, resume, report."""

import csv
import importlib.util
import math
import os

import numpy as np
import pytest

from pcjax.configs import digits_canvas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def separation():
    path = os.path.join(ROOT, "experiments", "separation.py")
    spec = importlib.util.spec_from_file_location("separation_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.mark.slow
def test_study_trains_selects_resumes_and_reports(tmp_path, separation):
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
    out = separation.run_study(tmp_path / "runs", config, **kwargs)
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
        assert not (tmp_path / "runs" / bt / rho / f"lr{other:g}" / "seed1").exists()
        layers = out["layers"][(bt, rho)]
        assert list(layers[0]) == ["input", "block0", "head/bn"]
        assert {"train/nc1", "train/nc4", "eval/ncm_accuracy"} <= set(layers[0]["block0"])
        assert "train/nc3" in layers[0]["head/bn"]
    # Seeds differ; the input layer's measures do not depend on the network.
    mod = out["layers"][("rho_psi", "mod")]
    assert mod[0]["block0"]["train/nc1"] != mod[1]["block0"]["train/nc1"]
    assert (
        mod[0]["input"]["train/nc1"] == out["layers"][("rho_psi", "cst")][1]["input"]["train/nc1"]
    )

    # Resume: nothing is retrained or re-measured, the report is the same.
    stamp = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.json")}
    again = separation.run_study(tmp_path / "runs", config, train_missing=False, **kwargs)
    assert {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.json")} == stamp
    assert again["layers"] == out["layers"]

    report = tmp_path / "report"
    with open(report / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 6 and sum(r["chosen_lr"] == "True" for r in runs) == 4
    text = (report / "results.md").read_text()
    assert "| rho_psi | cst |" in text and "7.7 %" in text and "22.5 %" in text
    assert "NC1" in text and "NC3" in text and "Not finished (left out above): none." in text
    for png in ("curves.png", "layers.png"):
        assert (report / png).read_bytes().startswith(b"\x89PNG")
