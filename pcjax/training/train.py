"""Training and evaluation: explicit state, one jitted data-parallel step, resume by default.

Public vocabulary: `TrainState`, `create_train_state`, `train_step`, `eval_step`, `evaluate`,
`train_and_evaluate(config, workdir)`. The recipe is docs/spec.md 4: cross-entropy, SGD with
momentum 0.9 (no Nesterov), coupled L2 weight decay on every parameter, step learning-rate
decay by epoch.

Parallelism: the state is replicated and the batch sharded over a 1-D "data" mesh of every
device of every process; `train_step` is written for the global batch and XLA inserts the
all-reduces. Batch statistics (Std, BatchNorm) are therefore those of the *global* batch, where
the reference's `DataParallel` used per-GPU sub-batches (docs/spec.md 7.5).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from pcjax.configs import schema
from pcjax.data import datasets
from pcjax.training import metrics, sharding

if TYPE_CHECKING:  # CLU's writers import TensorFlow: imported where used, so that the steps
    pass  # (`build_steps`) come without it

Batch = dict[str, jax.Array]


class TrainState(struct.PyTreeNode):
    """Everything a step reads and writes; checkpointed whole."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """lr0 * factor ** floor(epoch / decay_epochs): constant within an epoch, as the reference."""
    o = config.optim
    boundary = o.lr_decay_epochs * steps_per_epoch

    def schedule(step):
        return o.learning_rate * o.lr_decay_factor ** (step // boundary)

    return schedule


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """torch.optim.SGD semantics: g + wd * p, momentum buffer without dampening, then -lr."""
    o = config.optim
    return optax.chain(
        optax.add_decayed_weights(o.weight_decay),
        optax.sgd(
            learning_rate_schedule(config, steps_per_epoch),
            momentum=o.momentum or None,
            nesterov=o.nesterov,
        ),
    )


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, int, int],
) -> TrainState:
    """Initialises parameters, batch statistics and optimizer state (pure; jit it to place it)."""
    variables = model.init(rng, jnp.zeros((2, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        apply_fn=model.apply,
        tx=tx,
    )


def _global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def _all_finite(*trees: Any) -> jax.Array:
    """float32 1.0 if every element of every leaf is finite, else 0.0 (one fused reduction)."""
    leaves = jax.tree_util.tree_leaves(trees)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all().astype(jnp.float32)


def train_step(
    state: TrainState, batch: Batch, learning_rate_fn: Callable
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on the global batch; returns the new state and scalar metrics."""

    images = datasets.normalize_images(batch["image"])  # uint8 input is normalised on device

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        sums = metrics.classification_sums(logits, batch["label"])
        return sums["loss"] / sums["count"], (sums, updates)

    (loss, (sums, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    step_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, step_updates)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=updates.get("batch_stats", state.batch_stats),
        opt_state=opt_state,
    )
    out = {
        "loss": loss,
        "top1": sums["top1"] / sums["count"],
        "top5": sums["top5"] / sums["count"],
        "grad_norm": _global_norm(grads),
        "param_norm": _global_norm(params),
        "learning_rate": jnp.asarray(learning_rate_fn(state.step), jnp.float32),
        # 1.0 when the loss and the state after this step are finite; checked before any save.
        "finite": _all_finite(loss, new_state.params, new_state.batch_stats),
    }
    return new_state, out


def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Masked metric sums on one (possibly padded) evaluation batch, with running statistics."""
    images = datasets.normalize_images(batch["image"])  # uint8 input is normalised on device
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    return metrics.classification_sums(logits, batch["label"], batch.get("mask"))


def evaluate(
    p_eval_step: Callable,
    state: TrainState,
    batches: Iterator[dict[str, np.ndarray]],
    mesh: jax.sharding.Mesh,
    max_steps: int | None = None,
) -> dict[str, float]:
    """Runs `p_eval_step` over (padded, masked) batches; exact top-1/top-5 over real examples."""
    total = None
    for i, batch in enumerate(batches):
        if max_steps is not None and i >= max_steps:
            break
        sums = p_eval_step(state, sharding.shard_batch(batch, mesh))
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if total is None:
        raise ValueError("The evaluation dataset yielded no batch.")
    return metrics.finalize(jax.device_get(total))


def steps_per_epoch(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """Train steps in one epoch: an epoch's last partial batch is dropped."""
    return max(1, num_train_examples // config.data.global_batch_size)


def _steps(config: ml_collections.ConfigDict, num_train_examples: int) -> tuple[int, int, int]:
    """(steps_per_epoch, num_steps, eval_every_steps)."""
    per_epoch = steps_per_epoch(config, num_train_examples)
    num_steps = config.train.num_steps or config.optim.num_epochs * per_epoch
    eval_every = config.train.eval_every_steps or per_epoch
    return per_epoch, num_steps, eval_every


@dataclasses.dataclass(frozen=True)
class Steps:
    """The trainer's jitted programs on one mesh, as `build_steps` makes them."""

    model: nn.Module
    init: Callable  # rng key -> replicated TrainState
    train_step: Callable  # (state, sharded batch) -> (state, metrics); donates the state
    eval_step: Callable  # (state, sharded batch) -> metric sums


def build_steps(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    steps_per_epoch: int,
    image_shape: tuple[int, int, int],
) -> Steps:
    """The model and the jitted init, train and eval steps the trainer runs on `mesh`.

    State replicated, batch split over the "data" axis, the train step donating the state.
    The model is built for the platform of the mesh's devices (wavelet_method="auto"), so that
    a program compiled ahead of time for other devices than the host's is the one they run.
    """
    model = schema.build_model(config, backend=mesh.devices.flat[0].platform, mesh=mesh)
    tx = create_optimizer(config, steps_per_epoch)
    replicated, batched = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    init = jax.jit(
        functools.partial(create_train_state, model, tx, image_shape=image_shape),
        out_shardings=replicated,
    )
    p_train_step = jax.jit(
        functools.partial(
            train_step, learning_rate_fn=learning_rate_schedule(config, steps_per_epoch)
        ),
        in_shardings=(replicated, batched),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    p_eval_step = jax.jit(eval_step, in_shardings=(replicated, batched), out_shardings=replicated)
    return Steps(model=model, init=init, train_step=p_train_step, eval_step=p_eval_step)
