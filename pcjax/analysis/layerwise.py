"""Whole-dataset, layer-by-layer measures: separation, nearest class mean, neural collapse, probes.

One jitted step per configuration (network, layers, pooling, mode, probe settings) is built once
and cached: repeated calls on the same network and batch shape reuse the compiled code
(`TRACES` counts the traces).
"""

from __future__ import annotations

import collections
import functools
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pcjax.analysis import neural_collapse as nc
from pcjax.analysis.capture import capture_with_output, flatten_features
from pcjax.analysis.probes import linear_probe_accuracy, probe_features
from pcjax.analysis.separation_stats import (
    finalize,
    init_ncm_stats,
    init_stats,
    ncm_accuracy,
    update_ncm_stats,
    update_stats,
)

Batch = Mapping[str, Any] | Sequence[Any]
BatchSource = Iterable[Batch] | Callable[[], Iterable[Batch]]

TRACES: collections.Counter = collections.Counter()
"""Number of times each cached step was traced (compiled), by name; for tests."""

_SCALARS = ("trace_within", "trace_between", "trace_total", "fisher_ratio", "between_within_ratio")


def _unpack_batch(batch: Batch) -> tuple[Any, Any, Any]:
    """(images, labels, mask) from a dict {"image", "label"[, "mask"]} or a 2/3-tuple."""
    if isinstance(batch, Mapping):
        images = batch["image"] if "image" in batch else batch["images"]
        labels = batch["label"] if "label" in batch else batch["labels"]
        mask = batch.get("mask")
    else:
        images, labels, *rest = batch
        mask = rest[0] if rest else None
    if mask is None:
        mask = np.ones(np.shape(labels)[0], np.float32)
    return images, labels, mask


def _open(source: BatchSource) -> Iterable[Batch]:
    return source() if callable(source) else source


@functools.lru_cache(maxsize=16)
def _pass_functions(
    model: nn.Module,
    layers: tuple[str, ...] | None,
    pooling: str | None,
    train: bool,
    sketch: tuple[int | None, int] | None,
) -> tuple[Callable, Callable, list[str]]:
    """(features_of, jitted step, layer order) for one analysis configuration (cached).

    The step updates, for every layer, the class sums (`SeparationStats`), the NCM counts and
    the neural-collapse sums against given class means, and returns the sketched features for
    the probe (if `sketch` = (max_dim, seed)). The first pass over a dataset passes dummy means
    and ignores the NCM and collapse outputs; the extra work is small next to the forward pass.
    """
    order: list[str] = []  # capture order (jit outputs sort dict keys)

    def features_of(variables: Mapping[str, Any], images: jax.Array):
        raw, output = capture_with_output(model, variables, images, layers, train)
        order[:] = list(raw)
        feats = {k: flatten_features(v, pooling) for k, v in raw.items()}
        return feats, jnp.argmax(output, axis=-1).astype(jnp.int32)

    @jax.jit
    def step(carry, means, variables, images, labels, mask):
        TRACES["layerwise_step"] += 1
        stats, ncm, collapse = carry
        feats, pred = features_of(variables, images)
        stats = {k: update_stats(stats[k], feats[k], labels, mask) for k in stats}
        ncm = {
            k: update_ncm_stats(ncm[k], feats[k], labels, means[k][0], mask, means[k][1])
            for k in ncm
        }
        collapse = {
            k: nc.update_collapse_stats(
                collapse[k], feats[k], labels, means[k][0], means[k][1], pred, mask
            )
            for k in collapse
        }
        sketched = None
        if sketch is not None:
            sketched = {k: probe_features(v, sketch[0], sketch[1]) for k, v in feats.items()}
        return (stats, ncm, collapse), sketched

    return features_of, step, order


def layerwise_separation(
    model: nn.Module,
    variables: Mapping[str, Any],
    train_batches: BatchSource,
    num_classes: int,
    *,
    eval_batches: BatchSource | None = None,
    layers: Sequence[str] | None = None,
    pooling: str | None = None,
    train: bool = False,
    train_ncm: bool = True,
    neural_collapse: bool = True,
    classifier: tuple[str, Any] | None = None,
    linear_probe: bool = False,
    probe_max_dim: int | None = 2048,
    probe_max_examples: int | None = 50_000,
    probe_steps: int = 200,
    probe_l2: float = 1e-4,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Class-separation and neural-collapse measures at every layer, streaming over a dataset.

    Passes (each one cached jitted step per batch computing all layers at once):

    1. over `train_batches`: `SeparationStats` of every layer -> class means, traces, Fisher
       ratio ("train/..."); with `linear_probe`, also keeps the first `probe_max_examples`
       sketched train features.
    2. over `train_batches` again (if `train_ncm` or `neural_collapse`): NCM accuracy of the
       train means on the train set ("train/ncm_accuracy") and the neural-collapse measures
       "train/nc1", "train/nc2_*", "train/nc3" (layer of `classifier` only), "train/nc4".
    3. over `eval_batches` (if given), one pass: NCM accuracy of the *train* means, the eval set's
       own traces and ratios ("eval/..."), "eval/nc4" (agreement of the train-mean NCM with the
       network's predictions), and, with `linear_probe`, the probe accuracies.

    Batches are dicts {"image", "label", "mask"} or tuples (images, labels[, mask]); masked
    examples are ignored. Keep the batch shape fixed (pad the last batch) to avoid recompiles.

    Args:
        model, variables: the network and its {"params", "batch_stats"}.
        train_batches: zero-argument callable returning a fresh iterable of batches (needed when
            two passes are made), or a re-iterable such as a list.
        num_classes: K.
        eval_batches: optional callable or iterable of evaluation batches (one pass).
        layers: as in `capture_block_outputs` (default: input and every block, plus the
            classifier's layer if `classifier` is given).
        pooling: None (flatten [h, w, c]) or "mean" (spatial mean, then [c]).
        train: capture in training mode (batch statistics) instead of evaluation mode.
        train_ncm, neural_collapse: make pass 2 and report these measures.
        classifier: optional (layer, W [K, d]) of the linear classifier reading that layer's
            flattened features, for NC3 (`neural_collapse.phase_collapse_classifier`).
        linear_probe: fit `linear_probe_accuracy` per layer (needs `eval_batches`).
        probe_max_dim, probe_max_examples, probe_steps, probe_l2, seed: probe settings.

    Returns:
        {layer: {measure: float}}, "dim" included.
    """
    if linear_probe and eval_batches is None:
        raise ValueError("linear_probe=True needs eval_batches (the probe's test set).")
    second_pass = train_ncm or neural_collapse
    if second_pass and not callable(train_batches) and iter(train_batches) is train_batches:
        raise ValueError(
            "train_batches is a one-shot iterator but two passes are needed: pass a callable "
            "returning a fresh iterable (or a list), or set train_ncm=neural_collapse=False."
        )
    variables = dict(variables)
    iterator = iter(_open(train_batches))
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("train_batches yielded no batch.") from None
    first_images = jnp.asarray(_unpack_batch(first)[0])
    if classifier is not None and layers is None:
        default, _, order = _pass_functions(model, None, pooling, train, None)
        jax.eval_shape(default, variables, first_images)
        layers = [*order, classifier[0]]
    layers = None if layers is None else tuple(layers)
    sketch = (probe_max_dim, seed) if linear_probe else None
    features_of, step, order = _pass_functions(model, layers, pooling, train, sketch)
    shapes = jax.eval_shape(features_of, variables, first_images)[0]
    dims = {k: shapes[k].shape[1] for k in order}

    def fresh() -> tuple[dict, dict, dict]:
        stats = {
            k: init_stats(
                num_classes,
                s.shape[1],
                jnp.complex64 if jnp.issubdtype(s.dtype, jnp.complexfloating) else jnp.float32,
            )
            for k, s in shapes.items()
        }
        ncm = {k: init_ncm_stats() for k in shapes}
        collapse = {k: nc.init_collapse_stats(num_classes) for k in shapes}
        return stats, ncm, collapse

    def run_pass(batches: Iterable[Batch], means, collect: bool):
        carry = fresh()
        if means is None:  # first pass: dummy means of the right shapes, results ignored
            means = {
                k: (jnp.zeros_like(s.sums), jnp.zeros((num_classes,), bool))
                for k, s in carry[0].items()
            }
        kept: dict[str, list[np.ndarray]] = {k: [] for k in shapes}
        kept_labels: list[np.ndarray] = []
        num_kept = 0
        for batch in batches:
            images, labels, mask = _unpack_batch(batch)
            labels = jnp.asarray(labels, jnp.int32)
            mask = jnp.asarray(mask, jnp.float32)
            carry, sketched = step(carry, means, variables, jnp.asarray(images), labels, mask)
            if collect and (probe_max_examples is None or num_kept < probe_max_examples):
                room = None if probe_max_examples is None else probe_max_examples - num_kept
                idx = np.flatnonzero(np.asarray(mask) > 0)[:room]
                for k in kept:
                    kept[k].append(np.asarray(sketched[k])[idx])
                kept_labels.append(np.asarray(labels)[idx])
                num_kept += idx.size
        probe = None
        if collect:
            probe = ({k: np.concatenate(v) for k, v in kept.items()}, np.concatenate(kept_labels))
        return carry, probe

    # Pass 1: statistics of the fitting set.
    (train_stats, _, _), train_probe = run_pass(
        itertools.chain([first], iterator), None, linear_probe
    )
    results: dict[str, dict[str, float]] = {k: {"dim": float(d)} for k, d in dims.items()}
    means: dict[str, tuple[jax.Array, jax.Array]] = {}
    for k, s in train_stats.items():
        fin = finalize(s)
        results[k].update({f"train/{m}": float(fin[m]) for m in _SCALARS})
        means[k] = (fin["class_means"], fin["class_present"])
    del train_stats

    # Pass 2: NCM accuracy and neural collapse of the train means on the train set.
    if second_pass:
        (_, ncm, collapse), _ = run_pass(_open(train_batches), means, False)
        for k in dims:
            if train_ncm:
                results[k]["train/ncm_accuracy"] = float(ncm_accuracy(ncm[k]))
            if neural_collapse:
                weights = classifier[1] if classifier and classifier[0] == k else None
                measures = nc.finalize_neural_collapse(*means[k], collapse[k], weights)
                results[k].update({f"train/{m}": v for m, v in measures.items()})

    # Pass 3: evaluation set.
    if eval_batches is not None:
        (eval_stats, eval_ncm, eval_collapse), eval_probe = run_pass(
            _open(eval_batches), means, linear_probe
        )
        for k, s in eval_stats.items():
            fin = finalize(s)
            results[k].update({f"eval/{m}": float(fin[m]) for m in _SCALARS})
            results[k]["eval/ncm_accuracy"] = float(ncm_accuracy(eval_ncm[k]))
            if neural_collapse:
                c = eval_collapse[k]
                results[k]["eval/nc4"] = float(c.agree) / float(c.count)
        if linear_probe:
            (train_x, train_y), (eval_x, eval_y) = train_probe, eval_probe
            # Zero-pad every layer to one width so the L-BFGS fit compiles once: a zero column
            # has zero gradient, so its weights stay exactly 0 and the fit is unchanged.
            width = max(x.shape[1] for x in train_x.values())
            pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))  # noqa: E731
            for k in dims:
                acc = linear_probe_accuracy(
                    pad(train_x[k]),
                    train_y,
                    pad(eval_x[k]),
                    eval_y,
                    num_classes,
                    steps=probe_steps,
                    l2=probe_l2,
                    max_dim=None,
                )
                results[k]["train/probe_accuracy"] = acc["train_accuracy"]
                results[k]["eval/probe_accuracy"] = acc["test_accuracy"]
    return results
