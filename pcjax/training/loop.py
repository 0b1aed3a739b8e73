"""The training loop: claim the workdir, build the steps, restore, then step, log, evaluate,
save and stop on SIGTERM or divergence; `train_and_evaluate(config, workdir)` is the whole run."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from absl import logging

from pcjax.configs import schema
from pcjax.data import datasets
from pcjax.training import checkpoint, health, prefetch, sharding
from pcjax.training import workdir as workdir_lib
from pcjax.training.preemption import Preempted, Stopper
from pcjax.training.train import Batch, TrainState, _steps, build_steps, evaluate

if TYPE_CHECKING:
    from clu import metric_writers


class Diverged(FloatingPointError):
    """The loss or the state blew up (non-finite, or a lasting spike); the checkpoints written
    since the spike began were set aside, so a rerun resumes from a healthy one."""


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
    train_batches: Iterator[Batch]  # global, on the devices (prefetch.DevicePrefetcher)
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
    from pcjax.data import input_pipeline  # TensorFlow: imported where used

    d = config.data
    train_batches = prefetch.create_train_iterator(config, start_step, mesh)

    def eval_batches() -> Iterator[dict[str, np.ndarray]]:
        ds, _ = input_pipeline.create_eval_dataset(
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

    mesh = sharding.make_mesh()
    schema.validate(config, device_count=mesh.size, process_count=jax.process_count())
    schema.validate_data(config)
    path = workdir_lib.prepare(workdir_url)
    manager = checkpoint.create_manager(
        path, config.train.checkpoint_every_steps, config.train.max_checkpoints_to_keep
    )
    lock = _claim_workdir(config, path, manager.latest_step())
    try:
        return _build(config, path, mesh, manager), lock
    except BaseException:
        if lock is not None:
            workdir_lib.release_lock(lock)
        raise


def _build(config, path, mesh, manager) -> Run:
    """The model, state, compiled steps and input of `setup`, once the workdir is claimed."""
    from clu import parameter_overview, periodic_actions

    from pcjax.data import input_pipeline

    writer = _events_writer(config, path)
    steps_per_epoch, num_steps, eval_every = _steps(
        config, input_pipeline.num_train_examples(config.data.name, config.data.data_dir)
    )
    image_shape = datasets.image_shape(config.data.name, config.data.image_size)
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
    loss or state blows up (pcjax.training.health), after setting aside what was saved since.
    """
    loop = _Loop(run)
    step, stop = run.start_step, False
    with Stopper(run.mesh) as stopper, jax.transfer_guard("disallow"):
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
            close()  # frees the batches queued on the devices and the host pipeline
        run.manager.close()
        if lock is not None:
            workdir_lib.release_lock(lock)
    logging.info("Finished at step %d: %s", run.num_steps, json.dumps(result))
    return result
