"""Separation study: phase collapse (mod) versus phase-preserving thresholdings, layer by layer.

    python experiments/separation.py --workdir=workdirs/separation

For every block type (rho_psi, linear_plus_rho) and non-linearity (mod, cst, ms, mc, tanh), trains
the same phase-collapse net (pcjax/configs/digits_canvas.py) on digits pasted at random positions
of 32x32 canvases: first once per learning rate of a small grid (seed 0), scored on a validation
split carved from the training set, then at the chosen rate with further seeds. Every run is
saved under `<workdir>/<block type>/<rho>/lr<lr>/seed<seed>/` and skipped when rerun, so the
command resumes. The final networks are then measured at the input and after every block
(class separation, nearest class mean, neural collapse: `pcjax.analysis`), and the report goes
to docs/separation/ (results.md, runs.csv, layers.csv, plots). Config fields are overridden with
config_flags, e.g. `--config.optim.num_epochs=10 --config.model.widths='(8,16,16,32)'`.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from pcjax import analysis, configs
from pcjax.configs import digits_canvas, schema
from pcjax.data import datasets, digits
from pcjax.nn import layers, models
from pcjax.training import metrics, train

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_OUTPUT_DIR = ROOT / "docs" / "separation"
NONLINEARITIES = models.TABLE2_NONLINEARITIES  # ("mod", "cst", "ms", "mc", "tanh")
BLOCK_TYPES = layers.BLOCK_TYPES  # ("rho_psi", "linear_plus_rho")
ANALYSIS_BATCH_SIZE = 128

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
    size = config.data.image_size or datasets.DATASETS[config.data.name].image_size
    splits = digits.load_digits_canvas_split(size)
    fit, val = carve_validation(*splits["train"], validation_fraction)
    return {"fit": fit, "val": val, "test": splits["test"]}


def _batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape batches {"image", "label", "mask"}; the last one padded with masked zeros."""
    for start in range(0, len(labels), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        pad = batch_size - len(y)
        yield {
            "image": np.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)),
            "label": np.pad(y, (0, pad)),
            "mask": np.pad(np.ones(len(y), np.float32), (0, pad)),
        }


def run_config(base: Any, rho: str, block_type: str, lr: float, seed: int) -> Any:
    """`base` with the non-linearity, block type, learning rate and seed of one run."""
    config = base.copy_and_resolve_references()
    config.model.name = f"{config.data.name}/{rho}/{block_type}"
    config.model.nonlinearity, config.model.block_type = rho, block_type
    config.optim.learning_rate = float(lr)
    config.seed = int(seed)
    schema.validate(config)
    return config


def run_name(rho: str, block_type: str, lr: float, seed: int) -> str:
    return f"{block_type}/{rho}/lr{lr:g}/seed{seed}"


@functools.lru_cache(maxsize=4)
def _compiled(model: Any, optim: tuple, steps_per_epoch: int, image_shape: tuple) -> tuple:
    """(init, step, eval) jitted once per network and recipe, shared by every rate and seed.

    The optimiser is the trainer's (`train.create_optimizer`: coupled weight decay, SGD
    with momentum, step decay) with the base rate factored out into a trailing
    `optax.scale`, whose factor is a state value (`optax.inject_hyperparams`): the update
    -lr0 * decay(step) * momentum_buffer is the same, and changing lr0 does not recompile.
    """
    import jax
    import optax

    weight_decay, momentum, nesterov, decay_epochs, decay_factor = optim
    boundary = decay_epochs * steps_per_epoch
    unit = lambda step: decay_factor ** (step // boundary)  # noqa: E731
    tx = optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(unit, momentum=momentum or None, nesterov=nesterov),
        optax.inject_hyperparams(optax.scale)(step_size=1.0),
    )
    init = jax.jit(functools.partial(train.create_train_state, model, tx, image_shape=image_shape))
    step = jax.jit(functools.partial(train.train_step, learning_rate_fn=unit))
    return init, step, jax.jit(train.eval_step)


def train_one(
    config: Any, splits: Mapping[str, Any], run_dir: Path, train_missing: bool = True
) -> dict[str, Any] | None:
    """Trains one network on the fit split with pcjax's train step; resumable per run.

    Every epoch: a fresh permutation (seeded by config.seed and the epoch), full batches only
    (as the trainer), then the validation accuracy. At the end, the accuracy of the final
    network on fit, validation and test sets (evaluation mode) and its variables
    (`variables.msgpack`). `result.json` is written last: if it exists the run is skipped.
    """
    import flax
    import jax
    import jax.numpy as jnp

    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    if not train_missing:
        return None
    tick = time.perf_counter()
    model = schema.build_model(config)
    (x_fit, y_fit) = splits["fit"]
    batch = config.data.global_batch_size
    steps_per_epoch = max(1, len(y_fit) // batch)
    o = config.optim
    init, step, eval_step = _compiled(
        model,
        (o.weight_decay, o.momentum, o.nesterov, o.lr_decay_epochs, o.lr_decay_factor),
        steps_per_epoch,
        tuple(x_fit.shape[1:]),
    )
    state = init(jax.random.key(config.seed))
    scale = state.opt_state[-1]
    scale.hyperparams["step_size"] = jnp.asarray(o.learning_rate, jnp.float32)

    def accuracy(split: str) -> float:
        images, labels = splits[split]
        sums = None
        for b in _batches(images, labels, ANALYSIS_BATCH_SIZE):
            s = eval_step(state, {k: jnp.asarray(v) for k, v in b.items()})
            sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
        return metrics.finalize(jax.device_get(sums))["top1"]

    curve = []
    for epoch in range(o.num_epochs):
        order = np.random.default_rng([config.seed, epoch]).permutation(len(y_fit))
        losses, top1 = [], []
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            state, out = step(state, {"image": x_fit[idx], "label": y_fit[idx]})
            losses.append(out["loss"])
            top1.append(out["top1"])
        loss = float(np.mean(jax.device_get(losses)))
        if not np.isfinite(loss):
            raise FloatingPointError(f"{run_dir}: non-finite training loss at epoch {epoch}.")
        curve.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss,
                "train_top1_running": float(np.mean(jax.device_get(top1))),
                "val_top1": accuracy("val"),
            }
        )
        logging.info("%s epoch %d: %s", run_dir, epoch + 1, curve[-1])
    result = {
        "fit_top1": accuracy("fit"),
        "val_top1": accuracy("val"),
        "test_top1": accuracy("test"),
        "curve": curve,
        "steps": int(state.step),
        "train_seconds": time.perf_counter() - tick,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    (run_dir / "variables.msgpack").write_bytes(
        flax.serialization.msgpack_serialize(jax.device_get(variables))
    )
    done.write_text(json.dumps(result, indent=1))
    return result


def load_run_variables(config: Any, run_dir: Path) -> dict[str, Any]:
    """The variables `train_one` saved, restored against the network's own structure."""
    import flax
    import jax
    import jax.numpy as jnp

    model = schema.build_model(config)
    size = config.data.image_size or datasets.DATASETS[config.data.name].image_size
    x = jnp.zeros((1, size, size, 1))
    target = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(target))
    return flax.serialization.from_bytes(target, (run_dir / "variables.msgpack").read_bytes())


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
    out = {}
    for block_type in block_types:
        for rho in nonlinearities:

            def run(lr: float, seed: int, rho=rho, block_type=block_type) -> dict | None:
                config = run_config(base, rho, block_type, lr, seed)
                path = workdir / run_name(rho, block_type, lr, seed)
                result = train_one(config, splits, path, train_missing)
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
    """
    import jax

    cached = run_dir / "analysis.json"
    if cached.exists():
        return json.loads(cached.read_text())
    model = schema.build_model(config)
    variables = load_run_variables(config, run_dir)
    x_fit, y_fit = splits["fit"]
    x_test, y_test = splits["test"]
    feats, _ = jax.eval_shape(
        lambda v, x: analysis.capture_with_output(model, v, x, [analysis.CLASSIFIER_LAYER]),
        variables,
        x_fit[:1],
    )
    shape = feats[analysis.CLASSIFIER_LAYER].shape[1:]
    classifier = analysis.phase_collapse_classifier(variables, shape)
    result = analysis.layerwise_separation(
        model,
        variables,
        lambda: _batches(x_fit, y_fit, ANALYSIS_BATCH_SIZE),
        datasets.DATASETS[config.data.name].num_classes,
        eval_batches=lambda: _batches(x_test, y_test, ANALYSIS_BATCH_SIZE),
        classifier=(analysis.CLASSIFIER_LAYER, classifier),
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
    """Trains (or resumes) every run, then measures and reports (see the module docstring).

    Returns:
        {"networks": train_all's dict, "layers": {(block_type, rho): [per-seed analysis]}}.
    """
    start = time.perf_counter()
    workdir = Path(workdir)
    base = digits_canvas.get_config() if config is None else config
    splits = load_splits(base, validation_fraction)
    networks = train_all(
        base,
        workdir,
        splits,
        nonlinearities,
        block_types,
        learning_rates,
        num_seeds,
        train_missing,
    )
    per_layer: dict[tuple[str, str], list[dict]] = {}
    if analyse:
        for (block_type, rho), net in networks.items():
            per_layer[(block_type, rho)] = [
                analyse_run(
                    run_config(base, rho, block_type, r["lr"], r["seed"]), Path(r["dir"]), splits
                )
                for r in net["seeds"]
            ]
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_report(
            networks,
            per_layer,
            output_dir,
            base=base,
            splits=splits,
            settings={
                "nonlinearities": list(nonlinearities),
                "block_types": list(block_types),
                "learning_rates": list(learning_rates),
                "num_seeds": num_seeds,
                "validation_fraction": validation_fraction,
            },
            command=command or "run_study(...)",
            wall_seconds=time.perf_counter() - start,
        )
    return {"networks": networks, "layers": per_layer}


# --- Report ---------------------------------------------------------------------------------------

# Per-layer measures of the report: (key of layerwise_separation, title, higher is better).
LAYER_MEASURES = (
    ("train/between_within_ratio", "Between/within ratio tr(Σ_B)/tr(Σ_W), fit set", True),
    ("eval/ncm_accuracy", "Nearest-class-mean accuracy, test set (fit-set means)", True),
    ("train/nc1", "NC1 = tr(Σ_W Σ_B⁺)/K, fit set", False),
    ("train/nc2_equinorm", "NC2 equinorm (CV of centred class-mean norms)", False),
    ("train/nc2_max_angle", "NC2 mean |cos + 1/(K−1)| of centred class means", False),
    ("train/nc4", "NC4: NCM agrees with the network's prediction, fit set", True),
    ("eval/nc4", "NC4 on the test set (fit-set means)", True),
)
PAPER = {"mod": 7.7, "cst": 22.5}  # CIFAR-10 test error %, skip network (linear_plus_rho)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def _pm(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    m, s = _mean_std(np.asarray(values) * scale)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _layer_order(layers: Mapping[str, Any]) -> list[str]:
    return list(layers)


def write_runs_csv(networks: Mapping, path: Path) -> None:
    """One line per training run (grid and seeds), with its final accuracies and time."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "block_type",
                "nonlinearity",
                "lr",
                "seed",
                "chosen_lr",
                "fit_top1",
                "val_top1",
                "test_top1",
                "final_train_loss",
                "train_seconds",
            ]
        )
        for (block_type, rho), net in networks.items():
            runs = {(r["lr"], r["seed"]): r for r in [*net["grid"].values(), *net["seeds"]]}
            for (lr, seed), r in sorted(runs.items()):
                w.writerow(
                    [
                        block_type,
                        rho,
                        lr,
                        seed,
                        lr == net["lr"],
                        f"{r['fit_top1']:.6g}",
                        f"{r['val_top1']:.6g}",
                        f"{r['test_top1']:.6g}",
                        f"{r['curve'][-1]['train_loss']:.6g}",
                        f"{r['train_seconds']:.1f}",
                    ]
                )


def write_layers_csv(networks: Mapping, per_layer: Mapping, path: Path) -> None:
    """One line per (network, seed, layer) with every measure of `layerwise_separation`."""
    keys = sorted({m for runs in per_layer.values() for a in runs for r in a.values() for m in r})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["block_type", "nonlinearity", "lr", "seed", "layer", *keys])
        for (block_type, rho), runs in per_layer.items():
            for r, layers_ in zip(networks[(block_type, rho)]["seeds"], runs, strict=True):
                for layer, m in layers_.items():
                    w.writerow(
                        [block_type, rho, r["lr"], r["seed"], layer]
                        + [f"{m[k]:.6g}" if k in m else "" for k in keys]
                    )


def plot_curves(networks: Mapping, path: Path) -> None:
    """Training loss and validation accuracy per epoch (mean over seeds), one line per network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    block_types = sorted({bt for bt, _ in networks})
    fig, axes = plt.subplots(
        2, len(block_types), figsize=(5.5 * len(block_types), 6.5), squeeze=False
    )
    for col, bt in enumerate(block_types):
        for (b, rho), net in networks.items():
            if b != bt:
                continue
            epochs = [c["epoch"] for c in net["seeds"][0]["curve"]]
            for row, key in enumerate(("train_loss", "val_top1")):
                values = np.array([[c[key] for c in r["curve"]] for r in net["seeds"]])
                axes[row, col].errorbar(
                    epochs,
                    values.mean(0),
                    yerr=values.std(0),
                    marker="o",
                    capsize=2,
                    label=f"{rho} (lr {net['lr']:g})",
                )
        axes[0, col].set_title(f"{bt}: training loss (running, per epoch)")
        axes[0, col].set_yscale("log")
        axes[1, col].set_title(f"{bt}: validation top-1")
        for ax in axes[:, col]:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_layers(per_layer: Mapping, path: Path) -> None:
    """Between/within ratio, NC1 and test NCM accuracy vs depth (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("train/between_within_ratio", "between/within ratio (fit set)", True),
        ("train/nc1", "NC1 (fit set, lower = more collapsed)", True),
        ("eval/ncm_accuracy", "NCM accuracy (test set)", False),
    )
    block_types = sorted({bt for bt, _ in per_layer})
    fig, axes = plt.subplots(
        len(block_types), len(panels), figsize=(15, 3.6 * len(block_types)), squeeze=False
    )
    for row, bt in enumerate(block_types):
        for col, (key, title, log) in enumerate(panels):
            ax = axes[row, col]
            for (b, rho), runs in per_layer.items():
                if b != bt:
                    continue
                layers_ = [k for k in runs[0] if k != analysis.CLASSIFIER_LAYER]
                values = np.array([[a[k][key] for k in layers_] for a in runs])
                ax.errorbar(
                    range(len(layers_)),
                    values.mean(0),
                    yerr=values.std(0),
                    marker="o",
                    capsize=2,
                    label=rho,
                )
                ax.set_xticks(range(len(layers_)), layers_, rotation=30)
            ax.set_title(f"{bt}: {title}", fontsize=10)
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[row, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_markdown(
    networks: Mapping,
    per_layer: Mapping,
    path: Path,
    *,
    base: Any,
    splits: Mapping[str, Any],
    settings: Mapping[str, Any],
    command: str,
    wall_seconds: float,
) -> None:
    """results.md: set-up, budget, accuracies (mean ± std), the mod-vs-threshold gaps, per-layer
    tables. Every number comes from the runs; nothing is typed in by hand."""
    sizes = {k: len(v[1]) for k, v in splits.items()}
    train_seconds = sum(
        r["train_seconds"]
        for net in networks.values()
        for r in {id(x): x for x in [*net["grid"].values(), *net["seeds"]]}.values()
    )
    size = base.data.image_size or datasets.DATASETS[base.data.name].image_size
    num_runs = sum(len(n["grid"]) + len(n["seeds"]) - 1 for n in networks.values())
    lines = [
        "# Separation study: phase collapse vs phase-preserving thresholdings",
        "",
        "Generated by `experiments/separation.py` (rerun it; do not edit by hand).",
        "",
        f"Command: `{command}`",
        "",
        f"Training time summed over the {num_runs} runs: {train_seconds / 60:.1f} min; this "
        "invocation (training what was missing, measuring, reporting): "
        f"{wall_seconds / 60:.1f} min, on {os.cpu_count()} shared CPU cores.",
        "",
        "## Set-up",
        "",
        f"* Data: digits on {size}x{size} canvases (`{base.data.name}`), the train split carved "
        f"into fit {sizes['fit']} / validation {sizes['val']} (stratified, "
        f"{settings['validation_fraction']:g}); test {sizes['test']}, used only for the "
        "reported accuracies and test-set measures.",
        f"* Network: widths {tuple(base.model.widths)}, L = {base.model.num_angles}, "
        f"factorised filters, block types {', '.join(sorted({bt for bt, _ in networks}))}.",
        f"* Training: SGD momentum {base.optim.momentum}, weight decay "
        f"{base.optim.weight_decay}, batch {base.data.global_batch_size}, "
        f"{base.optim.num_epochs} epochs, lr x{base.optim.lr_decay_factor} after epoch "
        f"{base.optim.lr_decay_epochs}.",
        f"* Learning rate per network: the grid {settings['learning_rates']} with seed 0, chosen "
        "by final validation accuracy; then seeds 1.."
        f"{settings['num_seeds'] - 1} at the chosen rate. Mean ± std over "
        f"{settings['num_seeds']} seeds (sample std).",
        "",
        "## Accuracy",
        "",
        "| block type | ρ | lr (val. top-1 per grid lr) | fit top-1 | test top-1 | test error % |",
        "|---|---|---|---|---|---|",
    ]
    for (bt, rho), net in networks.items():
        grid = ", ".join(f"{lr:g}: {r['val_top1']:.3f}" for lr, r in net["grid"].items())
        lines.append(
            f"| {bt} | {rho} | **{net['lr']:g}** ({grid}) | "
            f"{_pm([r['fit_top1'] for r in net['seeds']], digits=3)} | "
            f"{_pm([r['test_top1'] for r in net['seeds']], digits=3)} | "
            f"{_pm([1 - r['test_top1'] for r in net['seeds']], 100, 1)} |"
        )
    lines += ["", "## Gap: thresholding minus mod, test error (percentage points)", ""]
    lines += [
        "Gap = mean error(ρ) − mean error(mod) ± its standard error sqrt(s²_ρ/n + s²_mod/n); "
        "ratio = mean error(ρ) / mean error(mod). The paper (ICLR 2022 poster, CIFAR-10, skip "
        f"network = `linear_plus_rho`): mod {PAPER['mod']} %, cst {PAPER['cst']} %, a gap of "
        f"{PAPER['cst'] - PAPER['mod']:.1f} points, ratio {PAPER['cst'] / PAPER['mod']:.1f}.",
        "",
        "| block type | ρ | gap (points) | ratio |",
        "|---|---|---|---|",
    ]
    for (bt, rho), net in networks.items():
        if rho == "mod" or (bt, "mod") not in networks:
            continue
        err = np.array([1 - r["test_top1"] for r in net["seeds"]]) * 100
        ref = np.array([1 - r["test_top1"] for r in networks[(bt, "mod")]["seeds"]]) * 100
        se = np.sqrt(err.var(ddof=1) / len(err) + ref.var(ddof=1) / len(ref))
        lines.append(
            f"| {bt} | {rho} | {err.mean() - ref.mean():+.1f} ± {se:.1f} | "
            f"{err.mean() / ref.mean():.2f} |"
        )
    lines += ["", "## Per-layer measures (mean ± std over seeds)", ""]
    for key, title, higher in LAYER_MEASURES:
        for bt in sorted({bt for bt, _ in per_layer}):
            rhos = [rho for b, rho in per_layer if b == bt]
            first = per_layer[(bt, rhos[0])][0]
            layers_ = [k for k in first if key in first[k]]
            lines += [
                f"### {title} — {bt} ({'higher' if higher else 'lower'} = more separated)",
                "",
                "| layer | " + " | ".join(rhos) + " |",
                "|---|" + "---|" * len(rhos),
            ]
            for layer in layers_:
                cells = []
                for rho in rhos:
                    vals = [a[layer][key] for a in per_layer[(bt, rho)]]
                    m, s = _mean_std(vals)
                    cells.append(f"{m:.4g} ± {s:.2g}")
                lines.append(f"| {layer} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["### NC3 self-duality at the classifier (head/bn), lower = more collapsed", ""]
    lines += ["| block type | " + " | ".join(NONLINEARITIES) + " |", "|---|" + "---|" * 5]
    for bt in sorted({bt for bt, _ in per_layer}):
        cells = []
        for rho in NONLINEARITIES:
            runs = per_layer.get((bt, rho))
            cells.append(
                _pm([a[analysis.CLASSIFIER_LAYER]["train/nc3"] for a in runs], digits=3)
                if runs
                else "not run"
            )
        lines.append(f"| {bt} | " + " | ".join(cells) + " |")
    missing = [
        f"{bt}/{rho}"
        for bt in settings["block_types"]
        for rho in settings["nonlinearities"]
        if (bt, rho) not in networks
    ]
    lines += [
        "",
        "Not finished (left out above): " + (", ".join(missing) if missing else "none") + ".",
        "",
        "Plots: `curves.png` (training loss and validation accuracy per epoch), `layers.png` "
        "(per-layer measures). Every run: `runs.csv`; every layer of every seed: `layers.csv`.",
        "",
    ]
    path.write_text("\n".join(lines))


def write_report(networks, per_layer, output_dir: Path, **kwargs) -> None:
    """Every file of the report in `output_dir`."""
    write_runs_csv(networks, output_dir / "runs.csv")
    plot_curves(networks, output_dir / "curves.png")
    if per_layer:
        write_layers_csv(networks, per_layer, output_dir / "layers.csv")
        plot_layers(per_layer, output_dir / "layers.png")
    write_markdown(networks, per_layer, output_dir / "results.md", **kwargs)


# --- Command line ---------------------------------------------------------------------------------


def _define_flags() -> None:
    """Flags of the command line, defined only when run as a script (importing stays clean)."""
    flags.DEFINE_string("workdir", None, "Parent of the per-run directories.", required=True)
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
