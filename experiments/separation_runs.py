"""One run of the separation study: a network trained by the trainer's loop on the fit split.

The run's workdir is a trainer workdir (config.json, Orbax checkpoints), plus `metrics.jsonl`
(the loop's metric lines) and, once finished, `result.json`. Only the input differs from
`pcjax.training.loop.train_and_evaluate`: the loop trains on the fit split and evaluates on
the validation split carved from the training set (`input_pipeline` streams over in-memory
sources), so that the learning rate is chosen without the test set.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pcjax.configs import schema
from pcjax.data import datasets, input_pipeline, sampler
from pcjax.training import checkpoint, loop, sharding, train
from pcjax.training import workdir as workdir_lib

SPLITS = ("fit", "val", "test")
_STEPS: dict[tuple, train.Steps] = {}


def run_config(base: Any, rho: str, block_type: str, lr: float, seed: int, num_fit: int) -> Any:
    """`base` with the non-linearity, block type, learning rate and seed of one run.

    Whole epochs of the fit split, each ended by the trainer's evaluation (of the validation
    split) and one metrics line; one checkpoint, at the end.
    """
    config = base.copy_and_resolve_references()
    config.model.name = f"{config.data.name}/{rho}/{block_type}"
    config.model.nonlinearity, config.model.block_type = rho, block_type
    config.optim.learning_rate = float(lr)
    config.seed = int(seed)
    per_epoch = train.steps_per_epoch(config, num_fit)
    t = config.train
    t.num_steps = config.optim.num_epochs * per_epoch
    t.eval_every_steps = t.log_every_steps = per_epoch
    t.checkpoint_every_steps = t.num_steps
    t.eval_steps = None
    schema.validate(config)
    return config


def run_name(rho: str, block_type: str, lr: float, seed: int) -> str:
    return f"{block_type}/{rho}/lr{lr:g}/seed{seed}"


def eval_batches(config: Any, images: np.ndarray, labels: np.ndarray) -> Iterator[dict]:
    """One pass over (images, labels) as the trainer evaluates: fixed-shape batches, the last
    one padded with masked zeros (`input_pipeline.create_eval_dataset`)."""
    ds, _ = input_pipeline.create_eval_dataset(
        config.data.name,
        global_batch_size=config.data.eval_global_batch_size or config.data.global_batch_size,
        image_size=config.data.image_size,
        source=sampler.ArraySource(images, labels),
    )
    return ds.as_numpy_iterator()


def _train_batches(config: Any, fit: tuple, start_step: int, mesh: Any) -> Iterator[dict]:
    """The trainer's training stream over the fit split (a fresh permutation per epoch, whole
    batches), from `start_step`, as global arrays on the mesh."""
    ds = input_pipeline.create_train_dataset(
        config.data.name,
        global_batch_size=config.data.global_batch_size,
        seed=config.seed,
        image_size=config.data.image_size,
        start_step=start_step,
        source=sampler.ArraySource(*fit),
    )
    for batch in ds.as_numpy_iterator():
        yield sharding.shard_batch(batch, mesh)


class MetricsFile:
    """The trainer's metric writer for one run: each write appended as a JSON line to a file
    of the run's workdir, so the per-epoch curve outlives an interrupted invocation."""

    def __init__(self, path: Path):
        self.path = path

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        line = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def flush(self) -> None:
        pass

    def curve(self, steps_per_epoch: int) -> list[dict[str, float]]:
        """Per epoch: mean training loss and top-1 over its steps, validation top-1."""
        rows: dict[int, dict] = {}
        for line in self.path.read_text().splitlines():
            row = json.loads(line)
            rows.setdefault(row["step"], {}).update(row)
        return [
            {
                "epoch": step // steps_per_epoch,
                "train_loss": r["train/loss"],
                "train_top1_running": r["train/top1"],
                "val_top1": r["eval/top1"],
            }
            for step, r in sorted(rows.items())
            if step % steps_per_epoch == 0 and "eval/top1" in r
        ]


def _build_steps(config: Any, mesh: Any, steps_per_epoch: int, shape: tuple) -> train.Steps:
    """`train.build_steps`, shared by the runs that differ only in their seed (compiled once)."""
    key = (json.dumps({**config.to_dict(), "seed": None}, default=str), mesh, steps_per_epoch)
    if key not in _STEPS:
        if len(_STEPS) >= 4:
            _STEPS.pop(next(iter(_STEPS)))
        _STEPS[key] = train.build_steps(config, mesh, steps_per_epoch, shape)
    return _STEPS[key]


def _trainer_run(config: Any, path: Any, splits: Mapping[str, Any], mesh: Any, manager: Any):
    """The trainer's `Run` of one network: its steps, restored state and the study's input."""
    num_steps, per_epoch = config.train.num_steps, config.train.eval_every_steps
    shape = datasets.image_shape(config.data.name, config.data.image_size)
    steps = _build_steps(config, mesh, per_epoch, shape)
    state = steps.init(jax.random.key(config.seed))
    state, loop_state, restored = checkpoint.restore_latest(manager, state)
    start = int(restored or 0)
    return loop.Run(
        config=config,
        workdir=path,
        mesh=mesh,
        state=state,
        start_step=start,
        num_steps=num_steps,
        eval_every=per_epoch,
        train_step=steps.train_step,
        eval_step=steps.eval_step,
        train_batches=_train_batches(config, splits["fit"], start, mesh),
        eval_batches=lambda: eval_batches(config, *splits["val"]),
        manager=manager,
        writer=MetricsFile(Path(path) / "metrics.jsonl"),
        loop_state=loop_state,
    )


def train_one(
    config: Any, splits: Mapping[str, Any], run_dir: Path, train_missing: bool = True
) -> dict[str, Any] | None:
    """Trains one network on the fit split with the trainer's loop; its summary.

    The run's workdir holds the trainer's files (config.json, checkpoints) and, once the run
    has finished, `result.json`: final accuracy on the fit, validation and test sets
    (evaluation mode), the per-epoch curve, steps and time. A run with `result.json` is not
    retrained; one without resumes from its latest checkpoint.
    """
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    if not train_missing:
        return None
    tick = time.perf_counter()
    mesh = sharding.make_mesh()
    schema.validate(config, device_count=mesh.size)
    path = workdir_lib.prepare(str(run_dir))
    t = config.train
    manager = checkpoint.create_manager(path, t.checkpoint_every_steps, t.max_checkpoints_to_keep)
    lock = workdir_lib.acquire_lock(path)
    try:
        latest = manager.latest_step()
        workdir_lib.record_config(path, config, latest is not None, latest or 0)
        run = _trainer_run(config, path, splits, mesh, manager)
        loop.train_loop(run)
        result = {
            f"{split}_top1": train.evaluate(
                run.eval_step, run.state, eval_batches(config, *splits[split]), mesh
            )["top1"]
            for split in SPLITS
        }
    finally:
        manager.close()
        workdir_lib.release_lock(lock)
    result.update(
        curve=run.writer.curve(t.eval_every_steps),
        steps=int(run.state.step),
        train_seconds=time.perf_counter() - tick,
    )
    done.write_text(json.dumps(result, indent=1))
    return result
