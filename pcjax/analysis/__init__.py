"""Layer-by-layer class-separation analysis: capture, statistics, neural collapse, probes.

The paper's exact separation measures are unknown (docs/spec.md 6.1), so the measures below are
a documented **[choice]**: the "natural, unambiguous set" of docs/spec.md 6.1, computed on the
output U_k of each block (or any other captured module output).

Conventions used throughout:

* A layer's features for one example are flattened to a vector u in C^d (complex blocks) or
  R^d (the input image, ResNet layers). Complex vectors are treated as vectors of C^d: squared
  norms are ||u||^2 = sum_j |u_j|^2 and inner products are Hermitian, <u, v> = sum_j u_j conj(v_j).
  For every trace below this equals the real computation on [Re u, Im u] in R^{2d}.
* Statistics are **count-weighted** (each example counts once, not each class): with N examples,
  n_y of them in class y,

      mu_y = (1/n_y) sum_{i in y} u_i,            mu = (1/N) sum_i u_i = sum_y (n_y/N) mu_y,
      tr(Sigma_W) = (1/N) sum_y sum_{i in y} ||u_i - mu_y||^2,
      tr(Sigma_B) = (1/N) sum_y n_y ||mu_y - mu||^2,
      tr(Sigma_T) = (1/N) sum_i ||u_i - mu||^2 = tr(Sigma_W) + tr(Sigma_B).

  On class-balanced data (CIFAR-10, the ImageNet validation set) this equals the
  class-balanced average E_y of docs/spec.md 6.1; the ImageNet training set is mildly
  unbalanced (732 to 1300 images per class), where the two differ slightly.
* Fisher ratio = tr(Sigma_W) / tr(Sigma_B): **lower is better separated** (classes concentrated
  around means that are far apart). Its inverse tr(Sigma_B) / tr(Sigma_W) is reported as
  `between_within_ratio` (higher is better) and is the objective of the gradient probes.
* Nearest-class-mean (NCM) accuracy: class means mu_y from a fitting set (the training set),
  each example of a dataset classified as argmin_y ||u - mu_y||^2.
* Linear-probe accuracy: multinomial logistic regression on real-ified, optionally sketched,
  standardised features (`linear_probe_accuracy`).

* Neural collapse (Papyan, Han & Donoho 2020): NC1-NC4, `neural_collapse`.

Streaming: `SeparationStats` holds per-class sums, so a dataset is reduced batch by batch without
holding its features (`update_stats`, jit-able, with a mask for padded evaluation batches).
The package works on any Linen network it is given. Import direction: analysis may use
`pcjax.nn`, and reads a trained run only through `pcjax.training.checkpoint.restore_variables`
(`checkpoints`); it never imports the trainer's loop or the data pipeline, and nothing in
`pcjax.nn`, `pcjax.training` or `pcjax.data` imports analysis.

Modules, by concern:

* `capture`: layer outputs of a network (evaluation or training mode), flattening.
* `separation_stats`: streaming class sums, covariance traces, nearest class mean.
* `neural_collapse`: NC1-NC4 from the class means and a second pass.
* `probes`: linear probes on (sketched) features.
* `layerwise`: `layerwise_separation` (settings in `LayerwiseOptions`), all of the above at
  every layer over a dataset.
* `grad_probes`: gradients of a layer's separation with respect to images and parameters.
* `checkpoints`: trained variables of a workdir.
"""

from pcjax.analysis.capture import (
    INPUT,
    capture_block_outputs,
    capture_with_output,
    flatten_features,
    make_feature_fn,
)
from pcjax.analysis.checkpoints import load_variables_from_workdir
from pcjax.analysis.grad_probes import (
    make_separation_grad_fn,
    separation_gradients,
    separation_objective,
)
from pcjax.analysis.layerwise import LayerwiseOptions, layerwise_separation
from pcjax.analysis.neural_collapse import (
    CLASSIFIER_LAYER,
    CollapseStats,
    finalize_neural_collapse,
    init_collapse_stats,
    phase_collapse_classifier,
    update_collapse_stats,
)
from pcjax.analysis.probes import (
    count_sketch,
    linear_probe_accuracy,
    probe_features,
    realify,
)
from pcjax.analysis.separation_stats import (
    NCMStats,
    SeparationStats,
    batch_separation,
    finalize,
    init_ncm_stats,
    init_stats,
    ncm_accuracy,
    ncm_predict,
    update_ncm_stats,
    update_stats,
)

__all__ = [
    "CLASSIFIER_LAYER",
    "INPUT",
    "CollapseStats",
    "LayerwiseOptions",
    "NCMStats",
    "SeparationStats",
    "batch_separation",
    "capture_block_outputs",
    "capture_with_output",
    "count_sketch",
    "finalize",
    "finalize_neural_collapse",
    "flatten_features",
    "init_collapse_stats",
    "init_ncm_stats",
    "init_stats",
    "layerwise_separation",
    "linear_probe_accuracy",
    "load_variables_from_workdir",
    "make_feature_fn",
    "make_separation_grad_fn",
    "ncm_accuracy",
    "ncm_predict",
    "phase_collapse_classifier",
    "probe_features",
    "realify",
    "separation_gradients",
    "separation_objective",
    "update_collapse_stats",
    "update_ncm_stats",
    "update_stats",
]
