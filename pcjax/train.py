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
import json
import logging as std_logging
import signal
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct

from pcjax import checkpoint, config_lib, datasets, health, host_memory, metrics, sharding
from pcjax import workdir as workdir_lib

if TYPE_CHECKING:  # CLU's writers import TensorFlow: imported where used, so that the steps
    from clu import metric_writers  # (`build_steps`) come without it

Batch = dict[str, jax.Array]

# Exit status of a run stopped by SIGTERM after saving (128 + SIGTERM, as a shell reports it):
# not 0, so that a scheduler does not take a preempted job for a finished one.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class Preempted(Exception):
    """SIGTERM reached a process: every process saved step `step` and stopped."""

    def __init__(self, step: int, path: str):
        super().__init__(
            f"Preempted: saved step {step} in {path}; rerun the same command to resume."
        )
        self.step = step


class Diverged(FloatingPointError):
    """The loss or the state blew up (non-finite, or a lasting spike); the checkpoints written
    since the spike began were set aside, so a rerun resumes from a healthy one."""


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


class _Stopper:
    """SIGTERM (a preemption notice) sets a local flag; `poll` says when every process stops.

    One process may receive the signal and another not, or at different steps. With several
    processes the flags are max-reduced over the mesh after every step and the result is read
    one step later, so that every process stops after the same step without a host sync per
    step (XLA runs the reduction after the step it follows).
    """

    def __init__(self, mesh: jax.sharding.Mesh):
        self.set = False
        self._previous = None
        self._mesh = mesh
        self._pending = None
        self._reduce = jax.jit(jnp.max, out_shardings=sharding.replicated(mesh))

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

    def poll(self) -> bool:
        """Whether to stop now; call once per step on every process."""
        if jax.process_count() == 1:
            return self.set
        decided = self._pending is not None and bool(jax.device_get(self._pending))
        local = np.full((jax.local_device_count(),), int(self.set), np.int32)
        with jax.transfer_guard("allow"):  # intended: this process's flag onto its devices
            flags = jax.make_array_from_process_local_data(
                sharding.batch_sharded(self._mesh), local
            )
        self._pending = self._reduce(flags)
        return decided


@dataclasses.dataclass
class Run:
    """What `setup` builds and the loop uses; the loop needs no dataset library."""

    config: ml_collections.ConfigDict
    workdir: Any  # etils.epath.Path
    mesh: jax.sharding.Mesh
    state: TrainState
    start_step: int
    num_steps: int
    eval_every: int
    train_step: Callable  # (state, sharded batch) -> (state, metrics)
    eval_step: Callable  # (state, sharded batch) -> metric sums
    train_batches: Iterator[dict[str, np.ndarray]]
    eval_batches: Callable[[], Iterator[dict[str, np.ndarray]]]
    manager: Any  # orbax CheckpointManager
    writer: metric_writers.MetricWriter
    loop_state: dict = dataclasses.field(default_factory=dict)
    hooks: list = dataclasses.field(default_factory=list)


def input_pipelines(
    config: ml_collections.ConfigDict, start_step: int, mesh: jax.sharding.Mesh
) -> tuple[Iterator[Batch], Callable[[], Iterator[dict[str, np.ndarray]]]]:
    """(global train batches from `start_step`, already on the devices; a function giving a
    fresh pass over the eval set as host batches)."""
    from pcjax import data, input_pipeline  # TensorFlow imports; kept out of the maths modules

    d = config.data
    train_batches = input_pipeline.create_train_iterator(config, start_step, mesh)

    def eval_batches() -> Iterator[dict[str, np.ndarray]]:
        ds, _ = data.create_eval_dataset(
            d.name,
            global_batch_size=d.eval_global_batch_size or d.global_batch_size,
            data_dir=d.data_dir,
            image_size=d.image_size,
        )
        return ds.as_numpy_iterator()

    return train_batches, eval_batches


def _claim_workdir(config: ml_collections.ConfigDict, path: Any, latest: int | None) -> Any:
    """Process 0 takes the lock and checks the config; every process learns the outcome."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = workdir_lib.acquire_lock(path)
            workdir_lib.record_config(path, config, latest is not None, latest or 0)
        except workdir_lib.WorkdirError as e:
            error = e
            if lock is not None:
                workdir_lib.release_lock(lock)
                lock = None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if int(failed) and error is None:
            error = workdir_lib.WorkdirError(f"Process 0 refused workdir {path}; see its log.")
    if error is not None:
        raise error
    return lock


def setup(config: ml_collections.ConfigDict, workdir_url: str) -> tuple[Run, Any]:
    """Validates, claims the workdir, builds model/state/steps/data, restores; (run, lock)."""
    from pcjax import data

    mesh = sharding.make_mesh()
    config_lib.validate(config, device_count=mesh.size, process_count=jax.process_count())
    config_lib.validate_data(config)
    path = workdir_lib.prepare(workdir_url)
    manager = checkpoint.create_manager(
        path, config.train.checkpoint_every_steps, config.train.max_checkpoints_to_keep
    )
    lock = _claim_workdir(config, path, manager.latest_step())
    try:
        return _build(config, path, mesh, manager, data), lock
    except BaseException:
        if lock is not None:
            workdir_lib.release_lock(lock)
        raise


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
    model = config_lib.build_model(config, backend=mesh.devices.flat[0].platform)
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


def _build(config, path, mesh, manager, data) -> Run:
    """The model, state, compiled steps and input of `setup`, once the workdir is claimed."""
    from clu import parameter_overview, periodic_actions

    writer = _events_writer(config, path)
    steps_per_epoch, num_steps, eval_every = _steps(
        config, data.num_train_examples(config.data.name, config.data.data_dir)
    )
    image_shape = data.image_shape(config.data.name, config.data.image_size)
    steps = build_steps(config, mesh, steps_per_epoch, image_shape)
    state = steps.init(jax.random.key(config.seed))
    state, loop_state, restored = checkpoint.restore_latest(manager, state)
    checkpoint.check_free_space(manager.directory, state)  # a full disk fails here, not later
    start_step = int(restored or 0)
    if start_step == 0:
        _write_hparams(config, writer)
        parameter_overview.log_parameter_overview(state.params)
    train_batches, eval_batches = input_pipelines(config, start_step, mesh)
    hooks = [
        periodic_actions.ReportProgress(
            num_train_steps=num_steps, writer=writer, every_steps=config.train.log_every_steps
        )
    ]
    if config.train.profile and jax.process_index() == 0:
        hooks.append(
            periodic_actions.Profile(logdir=_events_dir(config, path), num_profile_steps=5)
        )
    logging.info(
        "devices=%d processes=%d global_batch=%d steps=%d (%d/epoch), starting at step %d",
        mesh.size,
        jax.process_count(),
        config.data.global_batch_size,
        num_steps,
        steps_per_epoch,
        start_step,
    )
    return Run(
        config=config,
        workdir=path,
        mesh=mesh,
        state=state,
        start_step=start_step,
        num_steps=num_steps,
        eval_every=eval_every,
        train_step=steps.train_step,
        eval_step=steps.eval_step,
        train_batches=train_batches,
        eval_batches=eval_batches,
        manager=manager,
        writer=writer,
        loop_state=loop_state,
        hooks=hooks,
    )


def _events_dir(config: ml_collections.ConfigDict, path: Any) -> str:
    return config.train.events_dir or str(path)


def _events_writer(config: ml_collections.ConfigDict, path: Any) -> metric_writers.MetricWriter:
    """CLU's writer: TensorBoard events from process 0, in train.events_dir or the workdir.

    The events go through tf.summary, hence TensorFlow's own file systems, not etils.epath:
    where TensorFlow cannot write (its gs:// client ignores STORAGE_EMULATOR_HOST) this fails
    before anything compiles, in one line.
    """
    from clu import metric_writers

    events = _events_dir(config, path)
    try:
        return metric_writers.create_default_writer(events, just_logging=jax.process_index() > 0)
    except Exception as error:  # TensorFlow's errors: no credentials, unreachable endpoint...
        raise workdir_lib.WorkdirError(
            f"TensorBoard events cannot be written to {events} "
            f"({checkpoint.first_line(error)}). They go through TensorFlow (tf.summary), whose "
            "gs:// client always talks to storage.googleapis.com; set "
            "--config.train.events_dir to a folder or bucket TensorFlow can write."
        ) from None


def _write_hparams(config: ml_collections.ConfigDict, writer: metric_writers.MetricWriter):
    flat = {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in workdir_lib.flatten(config).items()
    }
    writer.write_hparams(flat)


class _Loop:
    """The step loop of one `Run`: step, check, log, evaluate, save, stop on SIGTERM."""

    def __init__(self, run: Run):
        self.run = run
        self.pending: list[dict[str, jax.Array]] = []
        self.tick = time.perf_counter()
        self.eval_metrics: dict[str, float] = dict(run.loop_state.get("eval", {}))
        t = run.config.train
        self.monitor = health.SpikeMonitor(
            window=t.spike_window,
            factor=t.spike_factor,
            patience=t.spike_patience,
            num_classes=datasets.num_classes(run.config.data.name),
            state=run.loop_state.get("health"),
        )
        self.deferred: int | None = None  # onset of the spike whose saves were held back
        self.last_metrics: dict = {"learning_rate": run.config.optim.learning_rate}

    def flush(self, step: int) -> None:
        """Fetches pending step metrics (the only host sync), checks them, writes them."""
        if not self.pending:
            return
        fetched = jax.device_get(self.pending)
        for i, m in enumerate(fetched):  # every step's loss and norms, in order
            verdict = self.monitor.observe(step - len(fetched) + i + 1, m)
            if verdict.diverged:
                self._diverged(verdict, m)
        self.last_metrics = fetched[-1]
        keys = [k for k in fetched[0] if k != "finite"]
        summary = {f"train/{k}": float(np.mean([m[k] for m in fetched])) for k in keys}
        elapsed = time.perf_counter() - self.tick
        batch = self.run.config.data.global_batch_size
        summary["perf/examples_per_sec"] = len(fetched) * batch / max(elapsed, 1e-9)
        self.run.writer.write_scalars(step, summary)
        self.pending, self.tick = [], time.perf_counter()

    def _diverged(self, verdict: health.Verdict, metrics_at: dict) -> None:
        """Sets aside the checkpoints written since the spike began; raises `Diverged`."""
        manager = self.run.manager
        with jax.transfer_guard("allow"):
            manager.wait_until_finished()
        manager.reload()
        tainted = health.tainted_steps(manager.all_steps(), verdict.onset)
        checkpoint.set_aside(manager, tainted, checkpoint.DIVERGED, "diverged")
        good = manager.latest_step()
        aside = (
            f"checkpoints {tainted} set aside in {manager.directory.parent / checkpoint.DIVERGED}; "
            if tainted
            else ""
        )
        if good is not None:
            where = (
                f"{aside}rerunning resumes from the last healthy checkpoint, step {good} "
                f"({manager.directory / str(good)})"
            )
        elif tainted:
            where = f"{aside}no healthy checkpoint is left, so a rerun starts afresh"
        else:
            where = f"no checkpoint was saved in {manager.directory}"
        raise Diverged(
            f"{verdict.reason[:1].upper()}{verdict.reason[1:]} (model "
            f"{self.run.config.model.name}, lr {float(metrics_at['learning_rate']):g}); the "
            f"blow-up began at step {verdict.onset}; {where}. Lower "
            "config.optim.learning_rate or check the input data."
        )

    def evaluate(self, step: int) -> None:
        run = self.run
        with jax.transfer_guard("allow"):  # intended: eval batches in, metric sums out
            self.eval_metrics = evaluate(
                run.eval_step, run.state, run.eval_batches(), run.mesh, run.config.train.eval_steps
            )
        best = max(run.loop_state.get("best_top1", 0.0), self.eval_metrics["top1"])
        run.loop_state.update(best_top1=best, eval=self.eval_metrics)
        scalars = {f"eval/{k}": v for k, v in self.eval_metrics.items()}
        run.writer.write_scalars(step, {**scalars, "eval/best_top1": best})
        self.tick = time.perf_counter()

    def save(self, step: int, stop: bool = False, evaluated: bool = False) -> None:
        """Saves `step`, unless a loss spike is open (a preemption saves anyway: the spike's
        onset travels in the checkpoint, and a divergence sets it aside later). `evaluated`:
        the eval metrics are those of `step` (they rank the checkpoint for keep-best)."""
        spike = self.monitor.spike
        if spike is not None and not stop:
            if self.deferred != spike["onset"]:
                logging.warning(
                    "Loss spike since step %d (%s): checkpoints wait until it ends.",
                    spike["onset"],
                    spike["reason"],
                )
                self.deferred = spike["onset"]
            return
        top1 = self.eval_metrics.get("top1") if evaluated else None
        self.run.loop_state["health"] = self.monitor.state()
        manager = self.run.manager
        checkpoint.check_free_space(manager.directory, self.run.state, step)
        try:
            with jax.transfer_guard("allow"):  # Orbax copies the state to the host itself
                checkpoint.save(manager, step, self.run.state, self.run.loop_state, True, top1)
        except Exception as error:  # this save, or the previous one still being written
            raise checkpoint.CheckpointError(
                f"Saving step {step} (or finishing the save before it) in {manager.directory} "
                f"failed: {checkpoint.first_line(error)}. The checkpoints before are intact; "
                "rerun to resume from the last one."
            ) from error

    def step_once(self, step: int, stop: bool) -> None:
        """Bookkeeping after the step that produced `step`: flush, eval, save as due."""
        t = self.run.config.train
        last = step == self.run.num_steps
        due_eval = (step % self.run.eval_every == 0 or last) and not stop
        due_ckpt = step % t.checkpoint_every_steps == 0 or stop or last
        if step % t.log_every_steps == 0 or due_ckpt or due_eval:
            self.flush(step)  # the state is checked finite before it is evaluated or saved
        if due_eval:
            self.evaluate(step)
        if due_ckpt:
            self.save(step, stop, evaluated=due_eval)


def train_loop(run: Run) -> dict[str, float]:
    """Steps `run` from its start to its end; returns the final eval metrics.

    Raises `Preempted` after saving when SIGTERM reached any process, `Diverged` when the
    loss or state blows up (pcjax.health), after setting aside what was saved since.
    """
    loop = _Loop(run)
    step, stop = run.start_step, False
    with _Stopper(run.mesh) as stopper, jax.transfer_guard("disallow"):
        while step < run.num_steps and not stop:
            batch = next(run.train_batches)  # global, already on the devices
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                run.state, step_metrics = run.train_step(run.state, batch)
            step += 1
            loop.pending.append(step_metrics)
            for hook in run.hooks:
                hook(step)
            stop = stopper.poll() and step < run.num_steps
            loop.step_once(step, stop)
    logging.info(
        "Spike monitor: largest loss/gradient/parameter-norm ratio to its running median %.3g "
        "(a spike opens above train.spike_factor = %g).",
        loop.monitor.peak,
        run.config.train.spike_factor,
    )
    if not stop and loop.monitor.open_spike:  # the run ended inside a spike (all flushed)
        loop._diverged(loop.monitor.confirm(), loop.last_metrics)
    with jax.transfer_guard("allow"):
        run.manager.wait_until_finished()
    run.writer.flush()
    if stop:
        raise Preempted(step, str(run.manager.directory))
    if not loop.eval_metrics:
        loop.evaluate(step)
    return loop.eval_metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` (a folder or a URL), resuming from its latest checkpoint.

    Writes config.json, TensorBoard events (process 0) and Orbax checkpoints (every process).
    Returns the final eval metrics; raises `Preempted` on SIGTERM (after saving) and `Diverged`
    on a non-finite loss or state (nothing non-finite is saved).
    """
    run, lock = setup(config, workdir)
    try:
        result = train_loop(run)
    finally:
        close = getattr(run.train_batches, "close", None)
        if close is not None:
            close()  # the prefetch thread must not outlive the run (see DevicePrefetcher.close)
        run.manager.close()
        if lock is not None:
            workdir_lib.release_lock(lock)
    logging.info("Finished at step %d: %s", run.num_steps, json.dumps(result))
    return result


class _QuietOrbax(std_logging.Filter):
    """Drops Orbax's INFO chatter (several lines per save); its warnings still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins a multi-process job: explicit coordinator/count/id, or the cluster's own (SLURM,
    Open MPI, Kubernetes, Cloud TPU) when all three are None."""
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given) and any(v is None for v in given):
        raise config_lib.ConfigError(
            f"Give all of coordinator_address={coordinator_address!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r}, or none of them "
            "(auto-detection from the cluster)."
        )
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    distributed: bool = False,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> dict[str, float]:
    """Entry point shared by the experiment mains: optional multi-process set-up, then training.

    With `distributed` (or an explicit coordinator), `jax.distributed.initialize` joins the
    other processes; every process then runs this same function. With
    `config.train.cpu_reuse_step_memory` (off by default) CPU runs reuse step memory
    (see `pcjax.host_memory`).
    """
    # Orbax logs every save step by step at INFO; keep its warnings, drop the chatter.
    logging.get_absl_handler().addFilter(_QuietOrbax())
    if distributed or coordinator_address is not None:
        initialize_distributed(coordinator_address, num_processes, process_id)
    if config.train.cpu_reuse_step_memory and host_memory.reuse_step_memory():
        logging.info("CPU steps run synchronously and reuse freed host memory.")
    logging.info(
        "process %d/%d, %d local / %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    return train_and_evaluate(config, workdir)
