"""The separation study's report: runs.csv, layers.csv, curves.png, layers.png and results.md.

Every number comes from the runs (`experiments/separation.py`); nothing is typed in by hand.
`networks` is {(block type, rho): {"grid": {lr: run}, "lr": chosen, "seeds": [run per seed]}}
and `per_layer` {(block type, rho): [{layer: {measure: value}} per seed]}.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pcjax import analysis
from pcjax.configs import cifar10
from pcjax.data import datasets

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
# CIFAR-10 test error % of the skip network (linear_plus_rho), from the preset table
PAPER = {rho: cifar10.EXPECTED_TEST_ERROR[f"{rho}/linear_plus_rho"][0] for rho in ("mod", "cst")}
RUN_COLUMNS = (
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
)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def _pm(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    m, s = _mean_std(np.asarray(values) * scale)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _distinct_runs(net: Mapping) -> list[dict]:
    """The grid runs and the seed runs of a network, each once (seed 0 is in both)."""
    return list({id(r): r for r in [*net["grid"].values(), *net["seeds"]]}.values())


def write_runs_csv(networks: Mapping, path: Path) -> None:
    """One line per training run (grid and seeds), with its final accuracies and time."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(RUN_COLUMNS)
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(networks: Mapping, path: Path) -> None:
    """Training loss and validation accuracy per epoch (mean over seeds), one line per network."""
    plt = _pyplot()
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
    plt = _pyplot()
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


def _setup_lines(
    networks: Mapping,
    base: Any,
    splits: Mapping[str, Any],
    settings: Mapping[str, Any],
    command: str,
    wall_seconds: float,
) -> list[str]:
    """Title, command, budget and the set-up (data, network, training, rate selection)."""
    sizes = {k: len(v[1]) for k, v in splits.items()}
    train_seconds = sum(r["train_seconds"] for n in networks.values() for r in _distinct_runs(n))
    size = datasets.resolve_image_size(base.data.name, base.data.image_size)
    num_runs = sum(len(n["grid"]) + len(n["seeds"]) - 1 for n in networks.values())
    o = base.optim
    return [
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
        f"* Training: SGD momentum {o.momentum}, weight decay {o.weight_decay}, batch "
        f"{base.data.global_batch_size}, {o.num_epochs} epochs, lr x{o.lr_decay_factor} after "
        f"epoch {o.lr_decay_epochs}.",
        f"* Learning rate per network: the grid {settings['learning_rates']} with seed 0, chosen "
        "by final validation accuracy; then seeds 1.."
        f"{settings['num_seeds'] - 1} at the chosen rate. Mean ± std over "
        f"{settings['num_seeds']} seeds (sample std).",
        "",
    ]


def _accuracy_lines(networks: Mapping) -> list[str]:
    """The accuracy table: chosen rate (validation accuracy per grid rate), fit and test."""
    lines = [
        "## Accuracy",
        "",
        "| block type | ρ | lr (val. top-1 per grid lr) | fit top-1 | test top-1 | test error % |",
        "|---|---|---|---|---|---|",
    ]
    for (bt, rho), net in networks.items():
        grid = ", ".join(f"{lr:g}: {r['val_top1']:.3f}" for lr, r in net["grid"].items())
        seeds = net["seeds"]
        lines.append(
            f"| {bt} | {rho} | **{net['lr']:g}** ({grid}) | "
            f"{_pm([r['fit_top1'] for r in seeds], digits=3)} | "
            f"{_pm([r['test_top1'] for r in seeds], digits=3)} | "
            f"{_pm([1 - r['test_top1'] for r in seeds], 100, 1)} |"
        )
    return lines


def _gap_lines(networks: Mapping) -> list[str]:
    """Test-error gap of each thresholding to `mod` in the same block type, and the ratio."""
    lines = [
        "",
        "## Gap: thresholding minus mod, test error (percentage points)",
        "",
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
    return lines


def _layer_table_lines(per_layer: Mapping) -> list[str]:
    """One table per (measure, block type): a row per layer, a column per non-linearity."""
    lines = ["", "## Per-layer measures (mean ± std over seeds)", ""]
    for key, title, higher in LAYER_MEASURES:
        for bt in sorted({bt for bt, _ in per_layer}):
            rhos = [rho for b, rho in per_layer if b == bt]
            first = per_layer[(bt, rhos[0])][0]
            lines += [
                f"### {title} — {bt} ({'higher' if higher else 'lower'} = more separated)",
                "",
                "| layer | " + " | ".join(rhos) + " |",
                "|---|" + "---|" * len(rhos),
            ]
            for layer in [k for k in first if key in first[k]]:
                cells = []
                for rho in rhos:
                    m, s = _mean_std([a[layer][key] for a in per_layer[(bt, rho)]])
                    cells.append(f"{m:.4g} ± {s:.2g}")
                lines.append(f"| {layer} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def _nc3_and_footer_lines(
    networks: Mapping, per_layer: Mapping, settings: Mapping[str, Any]
) -> list[str]:
    """NC3 at the classifier per block type, the networks left out, and the other files."""
    rhos = settings["nonlinearities"]
    lines = ["### NC3 self-duality at the classifier (head/bn), lower = more collapsed", ""]
    lines += ["| block type | " + " | ".join(rhos) + " |", "|---|" + "---|" * len(rhos)]
    for bt in sorted({bt for bt, _ in per_layer}):
        cells = []
        for rho in rhos:
            runs = per_layer.get((bt, rho))
            nc3 = [a[analysis.CLASSIFIER_LAYER]["train/nc3"] for a in runs] if runs else None
            cells.append(_pm(nc3, digits=3) if nc3 else "not run")
        lines.append(f"| {bt} | " + " | ".join(cells) + " |")
    missing = [
        f"{bt}/{rho}" for bt in settings["block_types"] for rho in rhos if (bt, rho) not in networks
    ]
    return lines + [
        "",
        "Not finished (left out above): " + (", ".join(missing) if missing else "none") + ".",
        "",
        "Plots: `curves.png` (training loss and validation accuracy per epoch), `layers.png` "
        "(per-layer measures). Every run: `runs.csv`; every layer of every seed: `layers.csv`.",
        "",
    ]


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
    tables."""
    lines = _setup_lines(networks, base, splits, settings, command, wall_seconds)
    lines += _accuracy_lines(networks) + _gap_lines(networks) + _layer_table_lines(per_layer)
    lines += _nc3_and_footer_lines(networks, per_layer, settings)
    path.write_text("\n".join(lines))


def write_report(networks: Mapping, per_layer: Mapping, output_dir: Path, **kwargs) -> None:
    """Every file of the report in `output_dir` (`kwargs`: those of `write_markdown`)."""
    write_runs_csv(networks, output_dir / "runs.csv")
    plot_curves(networks, output_dir / "curves.png")
    if per_layer:
        write_layers_csv(networks, per_layer, output_dir / "layers.csv")
        plot_layers(per_layer, output_dir / "layers.png")
    write_markdown(networks, per_layer, output_dir / "results.md", **kwargs)
