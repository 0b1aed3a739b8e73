"""One run per workdir: reachability, the writer's lock, and the config it was started with.

A workdir is a local folder or a URL (`gs://bucket/run`); every file here goes through
`etils.epath`. Process 0 holds `workdir/lock` (pid and host) while it trains; a lock left by a
dead process of the same host is taken over. Taking and taking over the lock are atomic (see
`acquire_lock`). On resume the config is compared with
`config.json`: changes to the model, the data or the optimiser's state are refused, changes of
schedule and cadence are accepted and appended to `config_history.jsonl`.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from pcjax.training import checkpoint

LOCK, GUARD = "lock", "lock.guard"
CONFIG, HISTORY = "config.json", "config_history.jsonl"

# Keys whose change on resume keeps the run meaningful: schedule, cadence, where data is read
# from, evaluation batch. Every other key (model, dataset, image size, global batch, seed,
# momentum) changes the model, the data stream or the optimizer state's structure.
RESUMABLE_PREFIXES = ("train.",)
RESUMABLE_KEYS = (
    "optim.learning_rate",
    "optim.num_epochs",
    "optim.lr_decay_epochs",
    "optim.lr_decay_factor",
    "optim.weight_decay",
    "data.data_dir",
    "data.eval_global_batch_size",
)


class WorkdirError(RuntimeError):
    """The workdir is unreachable, locked by another run, or holds an incompatible run."""


def prepare(workdir: str) -> epath.Path:
    """Creates the workdir (a folder or an object-store prefix); one clear error if unreachable."""
    path = checkpoint.workdir_path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        path.exists()
    except Exception as error:  # object store down, no credentials, no such bucket...
        raise WorkdirError(
            f"Workdir {workdir} is not reachable ({checkpoint.first_line(error)}). Check the "
            "bucket name, the network and the credentials "
            "(gcloud auth application-default login)."
        ) from None
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _holder(text: bytes | str) -> dict[str, Any] | None:
    """The lock's {pid, host, since}, or None if it is empty or not a lock (never written
    whole: every lock is written atomically, so such a file is no run's)."""
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and "pid" in holder else None


def _refuse_unless_dead(path: epath.Path, lock: Any, holder: dict[str, Any] | None) -> None:
    """Raises WorkdirError unless `holder` is gone: a dead process of this host, or no holder."""
    if holder is None:
        logging.warning("Replacing %s, which holds no run (empty or unreadable).", lock)
        return
    me = _owner()
    if holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1))):
        logging.warning("Taking over %s from process %s, which is gone.", lock, holder["pid"])
        return
    raise WorkdirError(
        f"Workdir {path} is in use by process {holder.get('pid')} on host "
        f"{holder.get('host')} (since {holder.get('since')}). Use another workdir, or "
        f"delete {lock} if that run is gone."
    )


def acquire_lock(path: epath.Path) -> epath.Path:
    """Takes workdir/lock for this process; raises WorkdirError if a live run holds it.

    Atomic on both kinds of workdir, so two runs starting together (or taking over the same
    stale lock together) never both win: on a local disk every change of the lock happens
    under an flock of `lock.guard`; on gs:// (through gcsfs) the lock object is written only
    if it does not exist (generation precondition 0), and a stale one is deleted only if it
    is still the generation that was read.
    """
    if "://" in str(path):
        return _acquire_in_store(path)
    lock = path / LOCK
    with _guard(path):
        if lock.exists():
            _refuse_unless_dead(path, lock, _holder(lock.read_text()))
        _write_atomically(lock, json.dumps({**_owner(), "since": _now()}))
    return lock


@contextlib.contextmanager
def _guard(path: epath.Path):
    """An exclusive flock on workdir/lock.guard (never deleted, released by the kernel when
    its holder dies), serialising lock changes between the runs sharing the folder."""
    guard = os.fspath(path / GUARD)
    try:
        fd = os.open(guard, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as error:
        raise WorkdirError(
            f"Cannot create {guard}: {checkpoint.disk_error(error, guard)}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomically(lock: epath.Path, text: str) -> None:
    """Writes a temporary file and renames it over `lock`: the lock is whole or absent."""
    tmp = lock.parent / f"{LOCK}.{os.getpid()}.tmp"
    try:
        with open(os.fspath(tmp), "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.fspath(tmp), os.fspath(lock))
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(os.fspath(tmp))
        raise WorkdirError(
            f"Cannot write the lock {lock}: {checkpoint.disk_error(error, lock)}"
        ) from None


def _bucket(path: Any) -> tuple[Any, str, str]:
    """(gcsfs file system, bucket, object name) of a gs:// path."""
    try:
        import gcsfs
    except ImportError:
        raise WorkdirError(
            f"A {str(path).split('://')[0]}:// workdir needs gcsfs for its lock "
            "(pip install gcsfs)."
        ) from None
    bucket, _, name = str(path).split("://", 1)[1].partition("/")
    return gcsfs.GCSFileSystem(), bucket, name


def _acquire_in_store(path: epath.Path) -> epath.Path:
    """Create-only write of the lock object (precondition generation 0); a stale lock is first
    deleted on the condition that it is still the generation that was read."""
    fs, bucket, name = _bucket(path / LOCK)
    text = json.dumps({**_owner(), "since": _now()}).encode()
    try:
        try:
            generation = fs.info(f"{bucket}/{name}")["generation"]
        except FileNotFoundError:
            generation = None
        if generation is not None:
            _refuse_unless_dead(path, path / LOCK, _holder(fs.cat_file(f"{bucket}/{name}")))
            with contextlib.suppress(FileNotFoundError):  # another run removed it first
                fs.call("DELETE", "b/{}/o/{}", bucket, name, ifGenerationMatch=generation)
        fs.invalidate_cache()
        fs.pipe_file(f"{bucket}/{name}", text, mode="create")
    except FileExistsError:  # HTTP 412: a precondition failed, another run wrote it first
        fs.invalidate_cache()
        try:
            holder = _holder(fs.cat_file(f"{bucket}/{name}")) or {}
        except OSError:
            holder = {}
        raise WorkdirError(
            f"Workdir {path} was locked just now by process {holder.get('pid')} on host "
            f"{holder.get('host')}. Use another workdir, or wait for that run to end."
        ) from None
    except OSError as error:
        raise WorkdirError(
            f"Cannot take the lock {path / LOCK} ({checkpoint.first_line(error)})."
        ) from None
    return path / LOCK


def release_lock(lock: epath.Path) -> None:
    """Removes the lock if this process still holds it."""
    me = _owner()
    try:
        if "://" in str(lock):
            fs, bucket, name = _bucket(lock)
            generation = fs.info(f"{bucket}/{name}")["generation"]
            holder = _holder(fs.cat_file(f"{bucket}/{name}"))
            if holder and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                fs.call("DELETE", "b/{}/o/{}", bucket, name, ifGenerationMatch=generation)
            return
        with _guard(lock.parent):
            holder = _holder(lock.read_text())
            if holder and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                lock.unlink()
    except (OSError, ValueError, WorkdirError):
        pass


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} for every leaf; tuples become lists, as in JSON."""
    out = {}
    for key, value in config.items():
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def _resumable(key: str) -> bool:
    return key.startswith(RESUMABLE_PREFIXES) or key in RESUMABLE_KEYS


def config_changes(saved: dict, config: ml_collections.ConfigDict) -> dict[str, list]:
    """{key: [saved, now]} for every key whose value differs."""
    old, new = flatten(saved), flatten(json.loads(config.to_json_best_effort()))
    return {
        k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
    }


def record_config(
    path: epath.Path, config: ml_collections.ConfigDict, resuming: bool, step: int = 0
) -> None:
    """Writes config.json, or on resume (`resuming`) checks the config against it.

    Raises WorkdirError listing the keys when a change would alter the model or data (see the
    module docstring); accepted changes are logged and appended to config_history.jsonl.
    """
    saved_file = path / CONFIG
    text = config.to_json_best_effort(indent=2)
    if not resuming or not saved_file.exists():
        saved_file.write_text(text)
        return
    changes = config_changes(json.loads(saved_file.read_text()), config)
    refused = {k: v for k, v in changes.items() if not _resumable(k)}
    if refused:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise WorkdirError(
            f"Workdir {path} holds a run with a different model or data: {listed}. Use a new "
            "workdir, or restore these values to resume."
        )
    if changes:
        logging.warning("Resuming at step %d with config changes: %s", step, changes)
        history = path / HISTORY
        previous = history.read_text() if history.exists() else ""
        entry = json.dumps({"step": step, "time": _now(), "changes": changes})
        history.write_text(previous + entry + "\n")
        saved_file.write_text(text)
