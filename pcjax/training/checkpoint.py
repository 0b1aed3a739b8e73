"""Orbax checkpoints of a workdir that may be a local folder or a URL (`gs://...`).

Every path goes through `etils.epath`, which Orbax and TensorStore accept for local folders and
object stores alike. A checkpoint is a `Composite` of two items: "state" (the train state) and
"loop" (a small JSON dict: best eval top-1, last eval metrics, the spike monitor's statistics),
plus "checksums", the per-array checksums of the state (`training.checksums`). Restoring verifies
them and falls back from a damaged latest step to the newest one that restores and verifies.
The newest `max_to_keep` steps are kept, and the step of the best eval top-1 besides.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from pcjax.training import checksums

STATE, LOOP, CHECKSUMS = "state", "loop", "checksums"
DAMAGED, DIVERGED = "damaged_checkpoints", "diverged_checkpoints"


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir restores, or a workdir cannot be used."""


def workdir_path(workdir: str | epath.PathLike) -> epath.Path:
    """The workdir as an `epath.Path`: URLs kept as they are, local folders made absolute."""
    text = str(workdir)
    path = epath.Path(text)
    return path if "://" in text else path.expanduser().absolute()


def checkpoint_dir(workdir: str | epath.PathLike) -> epath.Path:
    return workdir_path(workdir) / "checkpoints"


def create_manager(
    workdir: str | epath.PathLike, every_steps: int, max_to_keep: int
) -> ocp.CheckpointManager:
    """A manager saving every `every_steps` steps under workdir/checkpoints, keeping the last k
    and the one of the best eval top-1 (saved with `metrics={"top1": ...}`)."""
    policies = checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every_steps,
        create=True,
        best_fn=_top1,
        best_mode="max",
        preservation_policy=policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=max_to_keep),
                policies.BestN(get_metric_fn=_top1, n=1, keep_checkpoints_without_metrics=False),
            ]
        ),
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


class DiskFullError(CheckpointError):
    """A local workdir has too little free space for the next checkpoint."""


def _free_bytes(path: Any) -> int | None:
    """Free bytes of the file system holding `path` (its nearest existing parent); None for a
    URL (object stores have no such limit)."""
    if "://" in str(path):
        return None
    path = os.path.abspath(os.fspath(path))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def _megabytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def disk_error(error: OSError, path: Any) -> str:
    """An OSError in one line; a full disk gets its free space named."""
    text = f"{type(error).__name__}: {error.strerror or error}"
    if error.errno == errno.ENOSPC:
        free = _free_bytes(path)
        text += f" ({_megabytes(free or 0)} free on the file system of {path})"
    return text


def state_bytes(state: Any) -> int:
    """Bytes of the arrays of `state` (what a checkpoint of it holds, before compression)."""
    return sum(
        int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "dtype")
    )


def check_free_space(directory: Any, state: Any, step: int | None = None) -> None:
    """Raises DiskFullError in one line if a local `directory` cannot hold one more
    checkpoint of `state` (with 10% and 1 MiB to spare); object stores always can."""
    free = _free_bytes(directory)
    needed = int(1.1 * state_bytes(state)) + 2**20
    if free is None or free >= needed:
        return
    what = f"Saving step {step}" if step is not None else "A checkpoint"
    raise DiskFullError(
        f"{what} needs about {_megabytes(needed)} in {directory}, which has "
        f"{_megabytes(free)} free; free at least {_megabytes(needed - free)} and rerun to "
        "resume from the last checkpoint."
    )


def _top1(metrics: dict) -> float:
    return float(metrics.get("top1", float("-inf")))


def first_line(error: BaseException, limit: int = 200) -> str:
    """The error as "Type: first line of its message", cut to `limit` characters. A message
    that is or ends in a repr (`<bound method ...>`, as TensorStore's are) is cut there, and
    the error it was raised from is named instead or after it."""
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    cause = error.__cause__ or error.__context__
    if "<bound method" in line or not line:
        line = line.split("<bound method")[0].rstrip(" :.")
        line = line.removesuffix("See full TensorStore details").rstrip(" :.")
        if cause is not None:
            inner = first_line(cause, limit)
            return inner if not line else f"{type(error).__name__}: {line[:limit]} ({inner})"
    return f"{type(error).__name__}: {line[:limit]}"


def _is_closed_loop_callback(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _drop_closed_loop_callbacks() -> None:
    """Silences TensorStore's late callbacks after a failed restore.

    When one read of a restore fails, Orbax closes its event loop while other reads are still
    in flight; their completions then try to wake the closed loop, and TensorStore prints that
    RuntimeError ("Event loop is closed") with a traceback as an unraisable error. It says
    nothing about the checkpoint; every other error still reaches the previous hook.
    """
    if getattr(sys.unraisablehook, "_pcjax", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_closed_loop_callback(unraisable.exc_value):
            previous(unraisable)

    hook._pcjax = True
    sys.unraisablehook = hook


def _restore_step(manager: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    step_dir = manager.directory / str(step)
    items = {STATE: ocp.args.StandardRestore(abstract), LOOP: ocp.args.JsonRestore()}
    verified = (step_dir / CHECKSUMS).exists()  # checkpoints written before checksums: not
    if verified:
        items[CHECKSUMS] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    if verified:
        checksums.verify(restored[STATE], restored[CHECKSUMS])
    return restored[STATE], dict(restored[LOOP] or {})


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> tuple[Any, dict, int | None]:
    """Restores the newest step that restores into `target`'s structure, shapes and shardings.

    A step that fails (truncated file, missing metadata, empty folder, a checksum that does not
    match) is set aside with one warning line, once an older one restores. Returns (state,
    loop_state, step), or (target, {}, None) when the workdir has no checkpoint. Raises
    `CheckpointError` when none restores.
    """
    _drop_closed_loop_callbacks()
    steps = sorted(manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
        try:
            state, loop = _restore_step(manager, step, target)
        except Exception as error:  # any damage: try the previous step
            failures.append((step, first_line(error)))
            continue
        for bad, reason in failures:  # one line per damaged step
            logging.warning(
                "Checkpoint step %d at %s does not restore (%s); it moves to %s/%d and the run "
                "resumes from step %d.",
                bad,
                manager.directory / str(bad),
                reason,
                manager.directory.parent / DAMAGED,
                bad,
                step,
            )
        set_aside(manager, [s for s, _ in failures], DAMAGED, None)
        return state, loop, step
    if failures:
        raise CheckpointError(
            f"No checkpoint in {manager.directory} restores "
            f"({'; '.join(f'step {s}: {r}' for s, r in failures)}). Move the "
            "folder away to start afresh."
        )
    return target, {}, None


def set_aside(
    manager: ocp.CheckpointManager, steps: list[int], folder: str, what: str | None
) -> None:
    """Moves step folders to workdir/`folder`, so their steps can be saved again while their
    bytes stay for inspection (a step set aside twice keeps both, the later one suffixed); logs
    each move unless `what` is None (the caller said it)."""
    if jax.process_index() == 0 and steps:
        aside = manager.directory.parent / folder
        aside.mkdir(parents=True, exist_ok=True)
        for step in steps:
            source = manager.directory / str(step)
            if source.exists():
                dest, n = aside / str(step), 1
                while dest.exists():
                    dest, n = aside / f"{step}.{n}", n + 1
                source.rename(dest)
                if what is not None:
                    logging.warning("Moved %s checkpoint %s to %s.", what, source, dest)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"pcjax_set_aside_{folder}")
    if steps:  # the manager's list of steps changed
        manager.reload()


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    loop: dict | None = None,
    force: bool = False,
    top1: float | None = None,
) -> bool:
    """Saves asynchronously if `step` is due (or `force`), with the state's checksums and, when
    it was just evaluated, its eval `top1` (the best one is kept); whether a save started."""
    args = ocp.args.Composite(
        **{
            STATE: ocp.args.StandardSave(state),
            LOOP: ocp.args.JsonSave(dict(loop or {})),
            CHECKSUMS: ocp.args.JsonSave(checksums.manifest(state)),
        }
    )
    metrics = {} if top1 is None else {"top1": float(top1)}
    return manager.save(step, args=args, force=force, metrics=metrics)


def restore_variables(workdir: str | epath.PathLike, step: int | None = None) -> tuple[Any, int]:
    """(state as nested dicts of arrays on this host's first device, step) of a checkpoint.

    For reading a trained model outside the trainer (pcjax.analysis), whatever the topology it
    was saved from (one or many processes); `step=None` is the latest. Raises
    FileNotFoundError when the workdir has no checkpoint.
    """
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(f"No checkpoint directory {directory}.")
    if step is None:
        options = ocp.CheckpointManagerOptions(read_only=True)
        with ocp.CheckpointManager(directory, options=options) as manager:
            step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"No checkpoint under {directory}.")
    item = directory / str(step) / STATE
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(item)
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree
        )
        return checkpointer.restore(item, target), step
