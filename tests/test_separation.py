"""Smoke test of experiments/separation.py: two tiny networks, a few steps, the three reports."""

import csv
import importlib.util
import math
import os

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


def test_run_separation_writes_reports(tmp_path, separation):
    out = tmp_path / "report"
    config = digits_canvas.get_config("smoke")  # batch 32, tiny widths
    config.model.widths = (4,)  # one block: 32x32 -> 32x32 (compile time dominates)
    config.train.num_steps = 2
    config.train.checkpoint_every_steps = 2
    rows = separation.run_separation(
        tmp_path / "runs",
        ("mod", "cst"),
        "rho_psi",
        config=config,
        output_dir=out,
        probe_steps=10,
    )
    layers = ["input", "block0"]
    assert [(r["nonlinearity"], r["layer"]) for r in rows] == [
        (rho, layer) for rho in ("mod", "cst") for layer in layers
    ]
    for rho in ("mod", "cst"):
        assert (tmp_path / "runs" / "rho_psi" / rho / "checkpoints" / "2").exists()

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == separation.CSV_COLUMNS
    assert len(table) == 4
    assert [int(r["depth"]) for r in table] == [0, 1] * 2
    assert [int(r["dim"]) for r in table[:2]] == [32 * 32, 32 * 32 * 4]
    for r in table:
        for name in separation.CSV_COLUMNS[5:]:
            assert math.isfinite(float(r[name])), (r["layer"], name)
        for name in ("test_top1", "test_ncm_accuracy", "test_probe_accuracy"):
            assert 0.0 <= float(r[name]) <= 1.0
        assert float(r["train_fisher_ratio"]) * float(r["train_between_within_ratio"]) == (
            pytest.approx(1.0, rel=1e-4)
        )
    # The input layer does not depend on the network: identical measures for both runs.
    for name in ("train_fisher_ratio", "test_ncm_accuracy", "test_probe_accuracy"):
        assert table[0][name] == table[2][name]

    report = (out / "results.md").read_text()
    assert "Command: `run_separation(" in report and "Total wall time" in report
    assert "| non-linearity | train top-1 | test top-1 |" in report
    assert "| layer | dim | mod | cst |" in report
    for title in ("Between/within ratio", "Fisher ratio", "Nearest-class-mean", "Linear-probe"):
        assert title in report
    assert "## Observations" in report
    png = (out / "separation_vs_depth.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
