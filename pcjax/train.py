"""Training and evaluation: explicit state, one jitted data-parallel step, resume by default.

Public vocabulary: `TrainState`, `create_train_state`, `train_step`, `eval_step`, `evaluate`,
`train_and_evaluate(config, workdir)`. The recipe is REFERENCE.md 4: cross-entropy, SGD with
momentum 0.9 (no Nesterov), coupled L2 weight decay on every parameter, step learning-rate
decay by epoch.

Parallelism: the state is replicated and the batch sharded over a 1-D "data" mesh of every
device of every process; `train_step` is written for the global batch and XLA inserts the
all-reduces. Batch statistics (Std, BatchNorm) are therefore those of the *global* batch, where
the reference's `DataParallel` used per-GPU sub-batches (REFERENCE.md 7.5).
"""

from __future__ import annotations

import functools
import json
import logging as std_logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from flax import struct

from pcjax import checkpoint, config_lib, datasets, host_memory, metrics, sharding

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


def _steps(config: ml_collections.ConfigDict, num_train_examples: int) -> tuple[int, int, int]:
    """(steps_per_epoch, num_steps, eval_every_steps); an epoch's last partial batch is dropped."""
    steps_per_epoch = max(1, num_train_examples // config.data.global_batch_size)
    num_steps = config.train.num_steps or config.optim.num_epochs * steps_per_epoch
    eval_every = config.train.eval_every_steps or steps_per_epoch
    return steps_per_epoch, num_steps, eval_every


class _TerminationFlag:
    """Set by SIGTERM (preemption notice) so the loop saves and exits cleanly."""

    def __init__(self):
        self.set = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some notebook runners)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.set = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _preempted(flag: _TerminationFlag, step: int) -> bool:
    if flag.set:
        return True
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # preemption service not enabled in jax.distributed
            return False
    return False


def _write_config(
    config: ml_collections.ConfigDict, workdir: str, writer: metric_writers.MetricWriter
) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    flat = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, ml_collections.ConfigDict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk(config)
    writer.write_hparams(flat)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns final eval.

    Writes config.json, TensorBoard events (process 0) and Orbax checkpoints (every process).
    Stops with FloatingPointError on a non-finite loss, keeping the last good checkpoint.
    """
    from pcjax import data, input_pipeline  # TensorFlow imports; kept out of the maths modules

    mesh = sharding.make_mesh()
    config_lib.validate(config, device_count=mesh.size, process_count=jax.process_count())
    config_lib.validate_data(config)
    os.makedirs(workdir, exist_ok=True)
    eval_batch = config.data.eval_global_batch_size or config.data.global_batch_size

    model = config_lib.build_model(config)
    image_shape = data.image_shape(config.data.name, config.data.image_size)
    steps_per_epoch, num_steps, eval_every = _steps(
        config, data.num_train_examples(config.data.name, config.data.data_dir)
    )
    tx = create_optimizer(config, steps_per_epoch)
    lr_fn = learning_rate_schedule(config, steps_per_epoch)

    rng = jax.random.key(config.seed)
    replicated = sharding.replicated(mesh)
    state = jax.jit(
        functools.partial(create_train_state, model, tx, image_shape=image_shape),
        out_shardings=replicated,
    )(rng)
    manager = checkpoint.create_manager(
        workdir, config.train.checkpoint_every_steps, config.train.max_checkpoints_to_keep
    )
    state, restored = checkpoint.restore_latest(manager, state)
    start_step = int(restored or 0)

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start_step == 0:
        _write_config(config, workdir, writer)
        parameter_overview.log_parameter_overview(state.params)
    logging.info(
        "devices=%d processes=%d global_batch=%d per_device=%d steps=%d (%d/epoch), "
        "starting at step %d",
        mesh.size,
        jax.process_count(),
        config.data.global_batch_size,
        config.data.global_batch_size // mesh.size,
        num_steps,
        steps_per_epoch,
        start_step,
    )

    batched = sharding.batch_sharded(mesh)
    p_train_step = jax.jit(
        functools.partial(train_step, learning_rate_fn=lr_fn),
        in_shardings=(replicated, batched),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    p_eval_step = jax.jit(eval_step, in_shardings=(replicated, batched), out_shardings=replicated)

    train_iter = input_pipeline.create_train_iterator(config, start_step, mesh)

    def run_eval() -> dict[str, float]:
        ds, _ = data.create_eval_dataset(
            config.data.name,
            global_batch_size=eval_batch,
            data_dir=config.data.data_dir,
            image_size=config.data.image_size,
        )
        return evaluate(p_eval_step, state, ds.as_numpy_iterator(), mesh, config.train.eval_steps)

    hooks = [
        periodic_actions.ReportProgress(
            num_train_steps=num_steps, writer=writer, every_steps=config.train.log_every_steps
        )
    ]
    if config.train.profile and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5))

    pending: list[dict[str, jax.Array]] = []
    last_good = start_step
    best_top1 = 0.0
    eval_metrics: dict[str, float] = {}
    tick = time.perf_counter()

    def flush(step: int) -> None:
        """Fetches pending step metrics once (the only host sync), checks them, writes them."""
        nonlocal pending, tick
        if not pending:
            return
        fetched = jax.device_get(pending)
        losses = np.array([m["loss"] for m in fetched])
        if not np.all(np.isfinite(losses)):
            bad = step - len(fetched) + int(np.argmin(np.isfinite(losses))) + 1
            raise FloatingPointError(
                f"Non-finite training loss at step {bad} (config {config.model.name}, lr "
                f"{float(fetched[0]['learning_rate']):g}); the last good checkpoint (step "
                f"{last_good}) in {workdir} is kept. Lower config.optim.learning_rate or check "
                "the input data."
            )
        summary = {f"train/{k}": float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        elapsed = time.perf_counter() - tick
        summary["perf/examples_per_sec"] = (
            len(fetched) * config.data.global_batch_size / max(elapsed, 1e-9)
        )
        writer.write_scalars(step, summary)
        pending, tick = [], time.perf_counter()

    with _TerminationFlag() as term:
        step = start_step
        while step < num_steps:
            batch = next(train_iter)  # global, already on the devices
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, step_metrics = p_train_step(state, batch)
            step += 1
            pending.append(step_metrics)
            for hook in hooks:
                hook(step)
            stop = _preempted(term, step)
            due_ckpt = step % config.train.checkpoint_every_steps == 0
            if step % config.train.log_every_steps == 0 or due_ckpt or stop or step == num_steps:
                flush(step)  # checks the loss is finite before anything is saved
            if step % eval_every == 0 or step == num_steps:
                eval_metrics = run_eval()
                best_top1 = max(best_top1, eval_metrics["top1"])
                writer.write_scalars(
                    step,
                    {
                        **{f"eval/{k}": v for k, v in eval_metrics.items()},
                        "eval/best_top1": best_top1,
                    },
                )
                tick = time.perf_counter()
            if due_ckpt or stop or step == num_steps:
                checkpoint.save(manager, step, state, force=True)
                last_good = step
            if stop:
                break
    manager.wait_until_finished()
    writer.flush()
    if not eval_metrics:
        eval_metrics = run_eval()
    logging.info("Finished at step %d: %s", step, json.dumps(eval_metrics))
    return eval_metrics


class _QuietOrbax(std_logging.Filter):
    """Drops Orbax's INFO chatter (several lines per save); its warnings still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def run(
    config: ml_collections.ConfigDict, workdir: str, distributed: bool = False
) -> dict[str, float]:
    """Entry point shared by the experiment mains: optional multi-host set-up, then training.

    With `distributed`, `jax.distributed.initialize()` joins the other processes of a multi-host
    TPU/GPU job (it discovers the coordinator from the cluster environment); every process then
    runs this same function. On CPU, `config.train.cpu_reuse_step_memory` is applied here,
    before JAX starts its backends (see `pcjax.host_memory`).
    """
    # Orbax logs every save step by step at INFO; keep its warnings, drop the chatter.
    logging.get_absl_handler().addFilter(_QuietOrbax())
    if distributed:
        jax.distributed.initialize()
    if config.train.cpu_reuse_step_memory:
        if host_memory.reuse_step_memory():
            logging.info("CPU steps run synchronously and reuse freed host memory.")
        elif jax.default_backend() == "cpu":
            logging.warning(
                "config.train.cpu_reuse_step_memory is set but not applied: JAX's backends "
                "started before pcjax.train.run, or the C library is not glibc. Each step "
                "maps fresh host memory."
            )
    logging.info(
        "process %d/%d, %d local / %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    return train_and_evaluate(config, workdir)
