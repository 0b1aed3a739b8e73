"""Separation study: phase collapse (mod) versus phase-preserving thresholdings, layer by layer.

    python experiments/separation.py --workdir=workdirs/separation

For every block type (rho_psi, linear_plus_rho) and non-linearity (mod, cst, ms, mc, tanh), trains
the same phase-collapse net (pcjax/configs/digits_canvas.py) on digits pasted at random positions
of 32x32 canvases: first once per learning rate of a small grid (seed 0), scored on a validation
split carved from the training set, then at the chosen rate with further seeds. Each run is a
workdir of the trainer, `<workdir>/<block type>/<rho>/lr<lr>/seed<seed>/` (its config, Orbax
checkpoints, per-epoch metrics and `result.json`): a rerun reuses the finished runs and resumes
the others from their checkpoints. The final networks are then measured at the input and after
every block (class separation, nearest class mean, neural collapse: `pcjax.analysis`), and the
report goes to docs/separation/ (results.md, runs.csv, layers.csv, plots). Config fields are
overridden with config_flags, e.g.
`--config.optim.num_epochs=10 --config.model.widths='(8,16,16,32)'`.

One run: separation_runs.py beside this file; the report: separation_report.py.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import separation_report
import separation_runs
from absl import app, flags, logging
from ml_collections import config_flags

from pcjax import analysis, configs
from pcjax.configs import digits_canvas, schema
from pcjax.data import datasets, digits
from pcjax.nn import layers, nonlinear

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_OUTPUT_DIR = ROOT / "docs" / "separation"
# Table 2's non-linearities: the phase collapse and the phase-preserving thresholdings.
NONLINEARITIES = tuple(n for n in nonlinear.COMPLEX_NONLINEARITIES if n != "pow")
BLOCK_TYPES = layers.BLOCK_TYPES  # ("rho_psi", "linear_plus_rho")

# --- Training runs: one (block type, non-linearity, learning rate, seed) each --------------------


def carve_validation(
    images: np.ndarray, labels: np.ndarray, fraction: float, seed: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Stratified (fit, validation) split of a training set; the test set is never touched."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must lie in (0, 1), got {fraction!r}.")
    idx = np.arange(len(labels))
    fit, val = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
    fit, val = np.sort(fit), np.sort(val)
    return (images[fit], labels[fit]), (images[val], labels[val])


def load_splits(config: Any, validation_fraction: float) -> dict[str, tuple[np.ndarray, ...]]:
    """{"fit", "val", "test"}: the digits-canvas train split carved into fit + validation."""
    size = datasets.resolve_image_size(config.data.name, config.data.image_size)
    splits = digits.load_digits_canvas_split(size)
    fit, val = carve_validation(*splits["train"], validation_fraction)
    return {"fit": fit, "val": val, "test": splits["test"]}


def train_all(
    base: Any,
    workdir: Path,
    splits: Mapping[str, Any],
    nonlinearities: Sequence[str],
    block_types: Sequence[str],
    learning_rates: Sequence[float],
    num_seeds: int,
    train_missing: bool = True,
) -> dict[tuple[str, str], dict[str, Any]]:
    """The learning-rate grid (seed 0) then the other seeds at the chosen rate, per network.

    The rate is chosen by the final validation accuracy of seed 0 (ties: the smaller rate);
    the test set plays no part in it. With `train_missing` False, networks with a missing run
    are left out (an analysis of what has finished).

    Returns:
        {(block_type, rho): {"grid": {lr: result}, "lr": chosen, "seeds": [result per seed]}}.
    """
    num_fit = len(splits["fit"][1])
    out = {}
    for block_type in block_types:
        for rho in nonlinearities:

            def run(lr: float, seed: int, rho=rho, block_type=block_type) -> dict | None:
                config = separation_runs.run_config(base, rho, block_type, lr, seed, num_fit)
                path = workdir / separation_runs.run_name(rho, block_type, lr, seed)
                result = separation_runs.train_one(config, splits, path, train_missing)
                if result is not None:
                    result.update(lr=lr, seed=seed, dir=str(path))
                return result

            grid = {lr: run(lr, 0) for lr in learning_rates}
            if any(r is None for r in grid.values()):
                continue
            best = max(learning_rates, key=lambda lr: (grid[lr]["val_top1"], -lr))
            seeds = [grid[best]] + [run(best, seed) for seed in range(1, num_seeds)]
            if any(r is None for r in seeds):
                continue
            out[(block_type, rho)] = {"grid": grid, "lr": best, "seeds": seeds}
            logging.info(
                "%s/%s: lr %g, test top-1 %s",
                block_type,
                rho,
                best,
                [round(r["test_top1"], 4) for r in seeds],
            )
    return out


# --- Measures of the trained networks ----------------------------------------------------------


def analyse_run(config: Any, run_dir: Path, splits: Mapping[str, Any]) -> dict[str, dict]:
    """Per-layer separation and neural-collapse measures of one trained run (cached on disk).

    Train-set measures use the fit split (the network's training data); "eval/" ones the test
    set with the fit split's class means. The head's linear classifier gives NC3 at "head/bn".
    The variables are the run's last checkpoint (`analysis.load_variables_from_workdir`).
    """
    import jax

    cached = run_dir / "analysis.json"
    if cached.exists():
        return json.loads(cached.read_text())
    model = schema.build_model(config)
    shape = datasets.image_shape(config.data.name, config.data.image_size)
    variables = analysis.load_variables_from_workdir(run_dir, model, shape)
    x_fit = splits["fit"][0]
    feats, _ = jax.eval_shape(
        lambda v, x: analysis.capture_with_output(model, v, x, [analysis.CLASSIFIER_LAYER]),
        variables,
        x_fit[:1],
    )
    head = feats[analysis.CLASSIFIER_LAYER].shape[1:]
    result = analysis.layerwise_separation(
        model,
        variables,
        lambda: separation_runs.eval_batches(config, *splits["fit"]),
        datasets.num_classes(config.data.name),
        eval_batches=lambda: separation_runs.eval_batches(config, *splits["test"]),
        classifier=(analysis.CLASSIFIER_LAYER, analysis.phase_collapse_classifier(variables, head)),
    )
    cached.write_text(json.dumps(result, indent=1))
    return result


def run_study(
    workdir: str | Path,
    config: Any = None,
    *,
    nonlinearities: Sequence[str] = NONLINEARITIES,
    block_types: Sequence[str] = BLOCK_TYPES,
    learning_rates: Sequence[float] = (0.01, 0.03),
    num_seeds: int = 3,
    validation_fraction: float = 0.2,
    output_dir: str | Path = DEFAULT_OUTPUT_DIR,
    train_missing: bool = True,
    analyse: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Trains (or reuses) every run, then measures and reports (see the module docstring).

    Returns:
        {"networks": train_all's dict, "layers": {(block_type, rho): [per-seed analysis]}}.
    """
    start = time.perf_counter()
    workdir = Path(workdir)
    base = digits_canvas.get_config() if config is None else config
    splits = load_splits(base, validation_fraction)
    settings = {
        "nonlinearities": list(nonlinearities),
        "block_types": list(block_types),
        "learning_rates": list(learning_rates),
        "num_seeds": num_seeds,
        "validation_fraction": validation_fraction,
    }
    networks = train_all(
        base, workdir, splits, nonlinearities, block_types, learning_rates, num_seeds, train_missing
    )
    per_layer: dict[tuple[str, str], list[dict]] = {}
    if not analyse:
        return {"networks": networks, "layers": per_layer}
    num_fit = len(splits["fit"][1])
    for (block_type, rho), net in networks.items():
        per_layer[(block_type, rho)] = [
            analyse_run(
                separation_runs.run_config(base, rho, block_type, r["lr"], r["seed"], num_fit),
                Path(r["dir"]),
                splits,
            )
            for r in net["seeds"]
        ]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    separation_report.write_report(
        networks,
        per_layer,
        output_dir,
        base=base,
        splits=splits,
        settings=settings,
        command=command or "run_study(...)",
        wall_seconds=time.perf_counter() - start,
    )
    return {"networks": networks, "layers": per_layer}


# --- Command line ---------------------------------------------------------------------------------


def _define_flags() -> None:
    """Flags of the command line, defined only when run as a script (importing stays clean)."""
    flags.DEFINE_string("workdir", None, "Parent of the per-run workdirs.", required=True)
    flags.DEFINE_list("nonlinearities", list(NONLINEARITIES), "Non-linearities to compare.")
    flags.DEFINE_list("block_types", list(BLOCK_TYPES), "Block types.")
    flags.DEFINE_list("learning_rates", ["0.01", "0.03"], "Learning-rate grid (seed 0).")
    flags.DEFINE_integer("num_seeds", 3, "Seeds per network at the chosen learning rate.")
    flags.DEFINE_float("validation_fraction", 0.2, "Share of the train split held out.")
    flags.DEFINE_string("output_dir", str(DEFAULT_OUTPUT_DIR), "Report directory.")
    flags.DEFINE_bool("analyse", True, "Measure the final networks and write the report.")
    flags.DEFINE_bool("train", True, "Train missing runs (False: report what has finished).")
    config_flags.DEFINE_config_file(
        "config",
        configs.path("digits_canvas") + ":default",
        "Shared config (file:preset); override fields with --config.<field>=<value>.",
    )


def main(argv: Sequence[str]) -> None:
    del argv
    logging.set_verbosity(logging.INFO)
    f = flags.FLAGS
    run_study(
        f.workdir,
        f.config,
        nonlinearities=f.nonlinearities,
        block_types=f.block_types,
        learning_rates=[float(v) for v in f.learning_rates],
        num_seeds=f.num_seeds,
        validation_fraction=f.validation_fraction,
        output_dir=f.output_dir,
        train_missing=f.train,
        analyse=f.analyse,
        command="python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
