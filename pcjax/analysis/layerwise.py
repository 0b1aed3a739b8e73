"""Whole-dataset, layer-by-layer measures: separation, nearest class mean, neural collapse, probes.

One jitted step per configuration (network, layers, pooling, mode, probe settings) is built once
and cached: repeated calls on the same network and batch shape reuse the compiled code
(`TRACES` counts the traces).
"""

from __future__ import annotations

import collections
import dataclasses
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
Means = dict[str, tuple[jax.Array, jax.Array]]  # layer -> (class means, class present)

TRACES: collections.Counter = collections.Counter()
"""Number of times each cached step was traced (compiled), by name; for tests."""

_SCALARS = ("trace_within", "trace_between", "trace_total", "fisher_ratio", "between_within_ratio")


@dataclasses.dataclass(frozen=True)
class LayerwiseOptions:
    """What `layerwise_separation` measures and how (every field has the usual default).

    Attributes:
        layers: as in `capture_block_outputs` (None: input and every block, plus the
            classifier's layer if a classifier is given).
        pooling: None (flatten [h, w, c]) or "mean" (spatial mean, then [c]).
        train: capture in training mode (batch statistics) instead of evaluation mode.
        train_ncm, neural_collapse: make the second pass over the training batches and report
            these measures.
        linear_probe: fit `linear_probe_accuracy` per layer (needs evaluation batches).
        probe_max_dim, probe_max_examples, probe_steps, probe_l2, seed: probe settings (sketch
            width, training examples kept, L-BFGS steps, L2 penalty, sketch seed).
    """

    layers: Sequence[str] | None = None
    pooling: str | None = None
    train: bool = False
    train_ncm: bool = True
    neural_collapse: bool = True
    linear_probe: bool = False
    probe_max_dim: int | None = 2048
    probe_max_examples: int | None = 50_000
    probe_steps: int = 200
    probe_l2: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        if self.layers is not None:  # a tuple, so that the options key the step cache
            object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def second_pass(self) -> bool:
        return self.train_ncm or self.neural_collapse

    @property
    def sketch(self) -> tuple[int | None, int] | None:
        return (self.probe_max_dim, self.seed) if self.linear_probe else None


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


class _ProbeSample:
    """The sketched features and labels of the first `limit` real examples of a pass."""

    def __init__(self, layers: Iterable[str], limit: int | None):
        self.limit, self.count = limit, 0
        self.features: dict[str, list[np.ndarray]] = {k: [] for k in layers}
        self.labels: list[np.ndarray] = []

    def add(self, sketched: Mapping[str, jax.Array], labels: jax.Array, mask: jax.Array) -> None:
        if self.limit is not None and self.count >= self.limit:
            return
        room = None if self.limit is None else self.limit - self.count
        idx = np.flatnonzero(np.asarray(mask) > 0)[:room]
        for k, kept in self.features.items():
            kept.append(np.asarray(sketched[k])[idx])
        self.labels.append(np.asarray(labels)[idx])
        self.count += idx.size

    def arrays(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.features.items()}, np.concatenate(self.labels)


@dataclasses.dataclass(frozen=True)
class _Passes:
    """One configuration's compiled step, applied to whole datasets."""

    step: Callable
    variables: dict[str, Any]
    shapes: dict[str, jax.ShapeDtypeStruct]  # layer -> flattened features [batch, dim]
    num_classes: int
    probe_max_examples: int | None

    def fresh(self) -> tuple[dict, dict, dict]:
        """Empty (separation, NCM, collapse) sums of every layer."""
        stats = {
            k: init_stats(
                self.num_classes,
                s.shape[1],
                jnp.complex64 if jnp.issubdtype(s.dtype, jnp.complexfloating) else jnp.float32,
            )
            for k, s in self.shapes.items()
        }
        ncm = {k: init_ncm_stats() for k in self.shapes}
        collapse = {k: nc.init_collapse_stats(self.num_classes) for k in self.shapes}
        return stats, ncm, collapse

    def run(self, batches: Iterable[Batch], means: Means | None, collect: bool):
        """(sums, probe sample or None) of one pass; `means` None: the first pass (dummy means
        of the right shapes, NCM and collapse sums ignored)."""
        carry = self.fresh()
        if means is None:
            means = {
                k: (jnp.zeros_like(s.sums), jnp.zeros((self.num_classes,), bool))
                for k, s in carry[0].items()
            }
        sample = _ProbeSample(self.shapes, self.probe_max_examples) if collect else None
        for batch in batches:
            images, labels, mask = _unpack_batch(batch)
            labels = jnp.asarray(labels, jnp.int32)
            mask = jnp.asarray(mask, jnp.float32)
            carry, sketched = self.step(
                carry, means, self.variables, jnp.asarray(images), labels, mask
            )
            if sample is not None:
                sample.add(sketched, labels, mask)
        return carry, None if sample is None else sample.arrays()


def _check_sources(
    train_batches: BatchSource, eval_batches: BatchSource | None, options: LayerwiseOptions
) -> None:
    if options.linear_probe and eval_batches is None:
        raise ValueError("linear_probe=True needs eval_batches (the probe's test set).")
    if options.second_pass and not callable(train_batches) and iter(train_batches) is train_batches:
        raise ValueError(
            "train_batches is a one-shot iterator but two passes are needed: pass a callable "
            "returning a fresh iterable (or a list), or set the options' train_ncm and "
            "neural_collapse to False."
        )


def _layers(
    model: nn.Module,
    variables: dict[str, Any],
    images: jax.Array,
    classifier: tuple[str, Any] | None,
    options: LayerwiseOptions,
) -> tuple[str, ...] | None:
    """The layers to capture: the options', else the default ones and the classifier's."""
    if classifier is None or options.layers is not None:
        return options.layers
    default, _, order = _pass_functions(model, None, options.pooling, options.train, None)
    jax.eval_shape(default, variables, images)
    return (*order, classifier[0])


def _fit_measures(stats: Mapping[str, Any], prefix: str) -> tuple[dict[str, dict], Means]:
    """({layer: traces and ratios under `prefix`}, class means) from the separation sums."""
    results, means = {}, {}
    for k, s in stats.items():
        fin = finalize(s)
        results[k] = {f"{prefix}/{m}": float(fin[m]) for m in _SCALARS}
        means[k] = (fin["class_means"], fin["class_present"])
    return results, means


def _probe_measures(
    train: tuple[dict, np.ndarray],
    test: tuple[dict, np.ndarray],
    num_classes: int,
    options: LayerwiseOptions,
) -> dict[str, dict[str, float]]:
    """{layer: train and eval accuracy of a linear probe on the sketched features}."""
    (train_x, train_y), (eval_x, eval_y) = train, test
    # Zero-pad every layer to one width so the L-BFGS fit compiles once: a zero column has zero
    # gradient, so its weights stay exactly 0 and the fit is unchanged.
    width = max(x.shape[1] for x in train_x.values())
    pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))  # noqa: E731
    out = {}
    for k in train_x:
        acc = linear_probe_accuracy(
            pad(train_x[k]),
            train_y,
            pad(eval_x[k]),
            eval_y,
            num_classes,
            steps=options.probe_steps,
            l2=options.probe_l2,
            max_dim=None,
        )
        out[k] = {
            "train/probe_accuracy": acc["train_accuracy"],
            "eval/probe_accuracy": acc["test_accuracy"],
        }
    return out


def _train_collapse(
    passes: _Passes,
    train_batches: BatchSource,
    means: Means,
    classifier: tuple[str, Any] | None,
    options: LayerwiseOptions,
) -> dict[str, dict[str, float]]:
    """Pass 2: NCM accuracy and neural collapse of the train means on the train set."""
    (_, ncm, collapse), _ = passes.run(_open(train_batches), means, False)
    out: dict[str, dict[str, float]] = {k: {} for k in means}
    for k in means:
        if options.train_ncm:
            out[k]["train/ncm_accuracy"] = float(ncm_accuracy(ncm[k]))
        if options.neural_collapse:
            weights = classifier[1] if classifier and classifier[0] == k else None
            measures = nc.finalize_neural_collapse(*means[k], collapse[k], weights)
            out[k].update({f"train/{m}": v for m, v in measures.items()})
    return out


def _eval_measures(
    passes: _Passes, eval_batches: BatchSource, means: Means, options: LayerwiseOptions
) -> tuple[dict[str, dict[str, float]], tuple | None]:
    """Pass 3: the eval set's traces, NCM accuracy and NC4 against the train means."""
    (stats, ncm, collapse), probe = passes.run(_open(eval_batches), means, options.linear_probe)
    out, _ = _fit_measures(stats, "eval")
    for k in out:
        out[k]["eval/ncm_accuracy"] = float(ncm_accuracy(ncm[k]))
        if options.neural_collapse:
            c = collapse[k]
            out[k]["eval/nc4"] = float(c.agree) / float(c.count)
    return out, probe


def _merge(results: dict[str, dict], more: Mapping[str, Mapping]) -> None:
    for k, measures in more.items():
        results[k].update(measures)


def layerwise_separation(
    model: nn.Module,
    variables: Mapping[str, Any],
    train_batches: BatchSource,
    num_classes: int,
    *,
    eval_batches: BatchSource | None = None,
    classifier: tuple[str, Any] | None = None,
    options: LayerwiseOptions | None = None,
) -> dict[str, dict[str, float]]:
    """Class-separation and neural-collapse measures at every layer, streaming over a dataset.

    Passes (each one cached jitted step per batch computing all layers at once):

    1. over `train_batches`: `SeparationStats` of every layer -> class means, traces, Fisher
       ratio ("train/..."); with `options.linear_probe`, also keeps the first
       `probe_max_examples` sketched train features.
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
        classifier: optional (layer, W [K, d]) of the linear classifier reading that layer's
            flattened features, for NC3 (`neural_collapse.phase_collapse_classifier`).
        options: layers, pooling, mode, which passes and the probe (`LayerwiseOptions`;
            None: its defaults).

    Returns:
        {layer: {measure: float}}, "dim" included.
    """
    options = LayerwiseOptions() if options is None else options
    _check_sources(train_batches, eval_batches, options)
    variables = dict(variables)
    iterator = iter(_open(train_batches))
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("train_batches yielded no batch.") from None
    first_images = jnp.asarray(_unpack_batch(first)[0])
    layers = _layers(model, variables, first_images, classifier, options)
    features_of, step, order = _pass_functions(
        model, layers, options.pooling, options.train, options.sketch
    )
    shapes = jax.eval_shape(features_of, variables, first_images)[0]
    passes = _Passes(step, variables, shapes, num_classes, options.probe_max_examples)

    (stats, _, _), train_probe = passes.run(
        itertools.chain([first], iterator), None, options.linear_probe
    )
    results: dict[str, dict[str, float]] = {k: {"dim": float(shapes[k].shape[1])} for k in order}
    fit, means = _fit_measures(stats, "train")
    _merge(results, fit)
    del stats
    if options.second_pass:
        _merge(results, _train_collapse(passes, train_batches, means, classifier, options))
    if eval_batches is not None:
        measures, eval_probe = _eval_measures(passes, eval_batches, means, options)
        _merge(results, measures)
        if options.linear_probe:
            _merge(results, _probe_measures(train_probe, eval_probe, num_classes, options))
    return results
