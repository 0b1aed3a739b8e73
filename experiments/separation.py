"""Class separation layer by layer: phase collapse (mod) versus phase-preserving thresholdings.

    python experiments/separation.py --workdir=workdirs/separation

trains the same phase-collapse net (pcjax/configs/digits_canvas.py) once per
non-linearity (mod, cst, ms, mc, tanh) on digits pasted at random positions of 32x32 canvases,
one workdir per non-linearity (`<workdir>/<block_type>/<rho>`, so rerunning the command resumes
or only re-analyses), then measures class separation at the input and after every block on the
train and test sets (`pcjax.analysis.layerwise_separation`) and writes docs/separation/
results.md, results.csv and separation_vs_depth.png. The paper's claim (REFERENCE.md 5) is that
iterated phase collapses progressively separate classes while thresholdings do not; the report
states whether these runs show it, with the numbers.

The logic is `run_separation`, importable from a notebook; `main` only parses flags.
"""

from __future__ import annotations

import csv
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pcjax import analysis, config_lib, configs, data, filters, models, train, wavelets  # noqa: E402
from pcjax.configs import digits_canvas  # noqa: E402

DEFAULT_OUTPUT_DIR = ROOT / "docs" / "separation"
NONLINEARITIES = models.TABLE2_NONLINEARITIES  # ("mod", "cst", "ms", "mc", "tanh")
ANALYSIS_BATCH_SIZE = 128

# Per-layer measures written to the CSV, in column order: (CSV name, layerwise_separation key).
MEASURES = (
    ("train_trace_within", "train/trace_within"),
    ("train_trace_between", "train/trace_between"),
    ("train_fisher_ratio", "train/fisher_ratio"),
    ("train_between_within_ratio", "train/between_within_ratio"),
    ("test_fisher_ratio", "eval/fisher_ratio"),
    ("test_between_within_ratio", "eval/between_within_ratio"),
    ("train_ncm_accuracy", "train/ncm_accuracy"),
    ("test_ncm_accuracy", "eval/ncm_accuracy"),
    ("train_probe_accuracy", "train/probe_accuracy"),
    ("test_probe_accuracy", "eval/probe_accuracy"),
)
CSV_COLUMNS = (
    "nonlinearity",
    "block_type",
    "layer",
    "depth",
    "dim",
    "train_top1",
    "test_top1",
) + tuple(name for name, _ in MEASURES)

# Tables of results.md: (CSV column, title, whether higher means better separated).
_MD_TABLES = (
    ("train_between_within_ratio", "Between/within ratio tr(Σ_B)/tr(Σ_W), train set", True),
    ("test_between_within_ratio", "Between/within ratio tr(Σ_B)/tr(Σ_W), test set", True),
    ("train_fisher_ratio", "Fisher ratio tr(Σ_W)/tr(Σ_B), train set", False),
    ("test_fisher_ratio", "Fisher ratio tr(Σ_W)/tr(Σ_B), test set", False),
    ("test_ncm_accuracy", "Nearest-class-mean accuracy, test set (train means)", True),
    ("train_ncm_accuracy", "Nearest-class-mean accuracy, train set", True),
    ("test_probe_accuracy", "Linear-probe accuracy, test set", True),
    ("train_probe_accuracy", "Linear-probe accuracy, train set", True),
)


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


def _classifier_accuracy(
    model: Any, variables: Mapping[str, Any], images: np.ndarray, labels: np.ndarray
) -> float:
    """Top-1 accuracy of the trained network on a whole split (evaluation mode)."""
    import jax
    import jax.numpy as jnp

    predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False), axis=-1))
    correct = 0.0
    for batch in _batches(images, labels, ANALYSIS_BATCH_SIZE):
        pred = np.asarray(predict(variables, jnp.asarray(batch["image"])))
        correct += float(np.sum((pred == batch["label"]) * batch["mask"]))
    return correct / len(labels)


def _resolutions(image_size: int, num_blocks: int) -> list[int]:
    """Side of the input and of each block's output (factorised banks, no standard block)."""
    sizes = [image_size]
    for mode in filters.block_filter_modes(num_blocks, 0):
        sizes.append(wavelets.output_size(sizes[-1], filters.mode_subsamples(mode)))
    return sizes


def _ratio_floor(num_examples: int, num_classes: int) -> float:
    """(K - 1) / (N - K): the between/within ratio of data whose classes have equal means.

    With estimated class means, E tr(Sigma_B) ~ (K - 1) / N tr(Sigma) and E tr(Sigma_W) ~
    (N - K) / N tr(Sigma) for features whose class means coincide, so measured ratios near this
    value carry no class information.
    """
    return (num_classes - 1) / (num_examples - num_classes)


def _layer_depth(layer: str) -> int:
    return 0 if layer == analysis.INPUT else int(layer.removeprefix("block")) + 1


def analyse_run(
    config: Any,
    workdir: str | Path,
    *,
    pooling: str | None = None,
    linear_probe: bool = True,
    probe_steps: int = 200,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Loads a trained run and measures class separation at its input and after every block.

    Args:
        config: the run's config (model and dataset).
        workdir: its training directory (checkpoints under workdir/checkpoints).
        pooling: `layerwise_separation` pooling (None: every coordinate of each layer).
        linear_probe: also fit a linear probe per layer.
        probe_steps: L-BFGS iterations of each probe.

    Returns:
        ({"train_top1", "test_top1"} of the network's own classifier,
         {layer: measures of `layerwise_separation`}).
    """
    model = config_lib.build_model(config)
    shape = data.image_shape(config.data.name, config.data.image_size)
    variables = analysis.load_variables_from_workdir(workdir, model, shape)
    splits = data.load_digits_canvas_split(shape[0])
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    accuracy = {
        "train_top1": _classifier_accuracy(model, variables, x_train, y_train),
        "test_top1": _classifier_accuracy(model, variables, x_test, y_test),
    }
    results = analysis.layerwise_separation(
        model,
        variables,
        lambda: _batches(x_train, y_train, ANALYSIS_BATCH_SIZE),
        data.num_classes(config.data.name),
        eval_batches=lambda: _batches(x_test, y_test, ANALYSIS_BATCH_SIZE),
        pooling=pooling,
        linear_probe=linear_probe,
        probe_steps=probe_steps,
    )
    return accuracy, results


def run_separation(
    workdir: str | Path,
    nonlinearities: Sequence[str] = NONLINEARITIES,
    block_type: str = "rho_psi",
    num_epochs: int | None = None,
    *,
    config: Any = None,
    output_dir: str | Path = DEFAULT_OUTPUT_DIR,
    pooling: str | None = None,
    linear_probe: bool = True,
    probe_steps: int = 200,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """Trains one network per non-linearity, measures separation per layer, writes the report.

    Every network is "digits_canvas/{rho}/{block_type}" with the same config
    (`config`), trained by `pcjax.train.train_and_evaluate`
    in `workdir/block_type/rho` (resumed if a checkpoint is there), then analysed by
    `analyse_run`.

    Args:
        workdir: parent directory of the training runs.
        nonlinearities: non-linearities to compare (names of `pcjax.nonlinear`).
        block_type: "rho_psi" or "linear_plus_rho".
        num_epochs: training epochs (None: the config's).
        config: the shared config (None: `pcjax.configs.digits_canvas.get_config()`); its
            model.name is replaced per non-linearity.
        output_dir: where results.md, results.csv and separation_vs_depth.png go.
        pooling: None (flatten each layer) or "mean" (spatial mean first).
        linear_probe: fit linear probes (the slowest part of the analysis).
        probe_steps: L-BFGS iterations per probe.
        command: the command line to record in results.md (None: a Python call).

    Returns:
        The CSV rows (one per non-linearity and layer), as dicts keyed by `CSV_COLUMNS`.
    """
    start = time.perf_counter()
    workdir, output_dir = Path(workdir), Path(output_dir)
    rows: list[dict[str, Any]] = []
    timings: dict[str, tuple[float, float]] = {}
    base = digits_canvas.get_config() if config is None else config
    for rho in nonlinearities:
        config = base.copy_and_resolve_references()
        config.model.name = f"digits_canvas/{rho}/{block_type}"
        config.model.nonlinearity, config.model.block_type = rho, block_type
        if num_epochs is not None:
            config.optim.num_epochs = num_epochs
        run_dir = workdir / block_type / rho
        tick = time.perf_counter()
        eval_metrics = train.train_and_evaluate(config, str(run_dir))
        train_seconds = time.perf_counter() - tick
        logging.info("%s trained in %.0f s: %s", rho, train_seconds, eval_metrics)
        tick = time.perf_counter()
        accuracy, per_layer = analyse_run(
            config, run_dir, pooling=pooling, linear_probe=linear_probe, probe_steps=probe_steps
        )
        timings[rho] = (train_seconds, time.perf_counter() - tick)
        logging.info("%s analysed in %.0f s", rho, timings[rho][1])
        for layer, measures in per_layer.items():
            row = {
                "nonlinearity": rho,
                "block_type": block_type,
                "layer": layer,
                "depth": _layer_depth(layer),
                "dim": int(measures["dim"]),
                **accuracy,
            }
            row.update({name: measures.get(key, float("nan")) for name, key in MEASURES})
            rows.append(row)
    wall = time.perf_counter() - start
    if command is None:
        command = (
            f"run_separation({str(workdir)!r}, nonlinearities={tuple(nonlinearities)!r}, "
            f"block_type={block_type!r}, num_epochs={num_epochs!r}, pooling={pooling!r})"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, output_dir / "results.csv")
    plot_separation(rows, output_dir / "separation_vs_depth.png")
    write_markdown(
        rows,
        output_dir / "results.md",
        command=command,
        wall_seconds=wall,
        config=config,
        pooling=pooling,
        timings=timings,
    )
    logging.info("Separation report in %s (%.0f s).", output_dir, wall)
    return rows


# --- Report ---------------------------------------------------------------------------------------


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """One line per (non-linearity, layer), columns `CSV_COLUMNS`; floats with 6 significant."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )


def _by_rho(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["nonlinearity"], []).append(row)
    for rho_rows in out.values():
        rho_rows.sort(key=lambda r: r["depth"])
    return out


def plot_separation(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Three panels vs depth, one line per non-linearity: train between/within ratio (log
    scale), test NCM accuracy, test linear-probe accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("train_between_within_ratio", "between/within ratio (train)", True),
        ("test_ncm_accuracy", "NCM accuracy (test, train means)", False),
        ("test_probe_accuracy", "linear-probe accuracy (test)", False),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.8))
    by_rho = _by_rho(rows)
    for ax, (column, title, log) in zip(axes, panels, strict=True):
        for rho, rho_rows in by_rho.items():
            depth = [r["depth"] for r in rho_rows]
            ax.plot(depth, [r[column] for r in rho_rows], marker="o", label=rho)
        ticks = [r["depth"] for r in next(iter(by_rho.values()))]
        ax.set_xticks(ticks, ["input"] + [f"block {d - 1}" for d in ticks[1:]], rotation=30)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(title="non-linearity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.4e}"


def _observations(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Plain statements read off the numbers (no interpretation beyond orderings)."""
    by_rho = _by_rho(rows)
    lines = []
    if len(by_rho) < 2:
        return ["Only one non-linearity was run: no comparison."]
    top1 = {rho: r[0]["test_top1"] for rho, r in by_rho.items()}
    order = sorted(top1, key=top1.get, reverse=True)
    lines.append(
        "Test accuracy of the trained networks, best first: "
        + ", ".join(f"{rho} {top1[rho]:.4f}" for rho in order)
        + "."
    )
    for column, label, higher in (
        ("train_between_within_ratio", "train between/within ratio", True),
        ("test_between_within_ratio", "test between/within ratio", True),
        ("test_ncm_accuracy", "test NCM accuracy", True),
        ("test_probe_accuracy", "test linear-probe accuracy", True),
    ):
        last = {rho: r[-1][column] for rho, r in by_rho.items()}
        if all(v != v for v in last.values()):
            continue
        ranked = sorted(last, key=lambda k: -last[k] if higher else last[k])
        lines.append(
            f"Last block, {label}, best first: "
            + ", ".join(f"{rho} {_fmt(last[rho])}" for rho in ranked)
            + "."
        )
    for rho, rho_rows in by_rho.items():
        values = [r["train_between_within_ratio"] for r in rho_rows]
        steps = np.diff(values)
        if np.all(steps > 0):
            trend = "increases at every block"
        elif np.all(steps < 0):
            trend = "decreases at every block"
        else:
            trend = f"is not monotone ({int(np.sum(steps > 0))} of {len(steps)} blocks raise it)"
        lines.append(
            f"{rho}: the train between/within ratio {trend}: "
            + " → ".join(_fmt(v) for v in values)
            + "."
        )
    if "mod" in by_rho:
        others = [rho for rho in by_rho if rho != "mod"]
        checks = {
            "test accuracy": {rho: by_rho[rho][0]["test_top1"] for rho in by_rho},
            "last-block train between/within ratio": {
                rho: by_rho[rho][-1]["train_between_within_ratio"] for rho in by_rho
            },
            "last-block test NCM accuracy": {
                rho: by_rho[rho][-1]["test_ncm_accuracy"] for rho in by_rho
            },
        }
        for what, values in checks.items():
            beaten = [rho for rho in others if not values["mod"] > values[rho]]
            if not beaten:
                lines.append(f"mod is above every thresholding non-linearity in {what}.")
            else:
                lines.append(
                    f"mod is NOT above every thresholding non-linearity in {what}: "
                    + ", ".join(
                        f"{rho} {_fmt(values[rho])} >= mod {_fmt(values['mod'])}" for rho in beaten
                    )
                    + "."
                )
    return lines


def write_markdown(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    command: str,
    wall_seconds: float,
    config: Any = None,
    pooling: str | None = None,
    timings: Mapping[str, tuple[float, float]] | None = None,
) -> None:
    """results.md: set-up, accuracy table, one depth x non-linearity table per measure.

    Args:
        rows: `run_separation` rows.
        path: output file.
        command: command line recorded in the report.
        wall_seconds: total wall time.
        config: config of the last run (set-up section; None: omitted).
        pooling: feature pooling used.
        timings: {rho: (training seconds, analysis seconds)} (None: not reported); a resumed
            run that was already finished reports only its final evaluation as training time.
    """
    timings = timings or {}
    spec = data.DATASETS["digits_canvas"]
    floor_train = _ratio_floor(spec.num_train_examples, spec.num_classes)
    floor_test = _ratio_floor(spec.num_eval_examples, spec.num_classes)
    by_rho = _by_rho(rows)
    rhos = list(by_rho)
    first = next(iter(by_rho.values()))
    lines = [
        "# Class separation vs depth: phase collapse vs thresholding",
        "",
        "Generated by `experiments/separation.py` (do not edit by hand; rerun it).",
        "",
        f"Command: `{command}`",
        "",
        f"Total wall time (training + analysis of {len(rhos)} networks): "
        f"{wall_seconds:.0f} s ({wall_seconds / 60:.1f} min) on "
        f"{os.cpu_count()} CPU cores (shared).",
        "",
        "## Set-up",
        "",
    ]
    if config is not None:
        widths = config.model.widths
        num_steps = config.train.num_steps
        size = config.data.image_size or data.DATASETS[config.data.name].image_size
        chain = " → ".join(str(n) for n in _resolutions(size, len(widths)))
        lines += [
            f"* Data: `{config.data.name}`, scikit-learn's 8x8 digits upsampled to 16x16 and "
            "pasted at a random position (fixed per example) of a blank 32x32 canvas, "
            "1,347 train / 450 test (stratified split), standardised with the train statistics, "
            "no augmentation.",
            f"* Network: `digits_canvas/<rho>/{rows[0]['block_type']}`, widths {tuple(widths)}, "
            f"L = 8, factorised filters (resolution {chain}), "
            "same architecture and recipe for every non-linearity.",
            f"* Training: SGD lr {config.optim.learning_rate}, momentum {config.optim.momentum}, "
            f"weight decay {config.optim.weight_decay}, batch {config.data.global_batch_size}, "
            + (
                f"{num_steps} steps"
                if num_steps
                else f"{config.optim.num_epochs} epochs (lr x{config.optim.lr_decay_factor} "
                f"every {config.optim.lr_decay_epochs} epochs)"
            )
            + ", final checkpoint analysed.",
        ]
    lines += [
        f"* Measures ([choice], REFERENCE.md 6.1; definitions in `pcjax/analysis.py`) on the "
        f"input and on each block output U_k, flattened (pooling = {pooling!r}: every "
        "coordinate, as the network's position-dependent linear classifier sees them), "
        "complex features treated as vectors of C^d. Fisher ratio tr(Σ_W)/tr(Σ_B): lower is "
        "better separated; between/within ratio tr(Σ_B)/tr(Σ_W): higher is better. NCM: "
        "nearest class mean with the train class means. Linear probe: multinomial logistic "
        "regression on [Re, Im] features count-sketched to at most 2048 dims, standardised, "
        "L-BFGS.",
        f"* Finite-sample floor of the between/within ratio (classes with equal means, "
        f"(K − 1)/(N − K)): {floor_train:.4f} on the train set, {floor_test:.4f} on the test "
        "set. The test-set ratio uses the test set's own (noisier) class means, so it tends "
        "to sit higher than the train ratio for the same features; the plot and the trends "
        "below use the train ratio.",
        "",
        "## Accuracy of the trained networks",
        "",
        "| non-linearity | train top-1 | test top-1 | training (s) | analysis (s) |",
        "|---|---|---|---|---|",
    ]
    for rho in rhos:
        r = by_rho[rho][0]
        t_train, t_analysis = timings.get(rho, (float("nan"), float("nan")))
        lines.append(
            f"| {rho} | {r['train_top1']:.4f} | {r['test_top1']:.4f} | {t_train:.0f} | "
            f"{t_analysis:.0f} |"
        )
    lines += ["", "## Per-layer measures", ""]
    header = "| layer | dim | " + " | ".join(rhos) + " |"
    sep = "|---|---|" + "---|" * len(rhos)
    for column, title, higher in _MD_TABLES:
        lines += [
            f"### {title} ({'higher' if higher else 'lower'} = better separated)",
            "",
            header,
            sep,
        ]
        for i, row0 in enumerate(first):
            cells = [_fmt(by_rho[rho][i][column]) for rho in rhos]
            lines.append(f"| {row0['layer']} | {row0['dim']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Observations (read off the numbers above)", ""]
    lines += [f"* {line}" for line in _observations(rows)]
    lines += [
        "",
        "Plot: `separation_vs_depth.png`. All rows: `results.csv`.",
        "",
    ]
    Path(path).write_text("\n".join(lines))


# --- Command line ---------------------------------------------------------------------------------


def _define_flags() -> None:
    """Flags of the command line, defined only when run as a script (importing stays clean)."""
    flags.DEFINE_string(
        "workdir", None, "Parent of the per-non-linearity training directories.", required=True
    )
    flags.DEFINE_list("nonlinearities", list(NONLINEARITIES), "Non-linearities to compare.")
    flags.DEFINE_enum("block_type", "rho_psi", ["rho_psi", "linear_plus_rho"], "Block type.")
    flags.DEFINE_integer("num_epochs", None, "Training epochs (default: the config's).")
    config_flags.DEFINE_config_file(
        "config",
        configs.path("digits_canvas") + ":default",
        "Shared config (file:preset); override fields with --config.<field>=<value>.",
    )
    flags.DEFINE_string("output_dir", str(DEFAULT_OUTPUT_DIR), "Report directory.")
    flags.DEFINE_enum("pooling", "none", ["none", "mean"], "Feature pooling per layer.")
    flags.DEFINE_bool("linear_probe", True, "Fit a linear probe per layer.")


def main(argv: Sequence[str]) -> None:
    del argv
    logging.set_verbosity(logging.INFO)
    f = flags.FLAGS
    run_separation(
        f.workdir,
        f.nonlinearities,
        f.block_type,
        f.num_epochs,
        config=f.config,
        output_dir=f.output_dir,
        pooling=None if f.pooling == "none" else f.pooling,
        linear_probe=f.linear_probe,
        command="python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
