"""One run per workdir: reachability, the writer's lock, and the config it was started with.

A workdir is a local folder or a URL (`gs://bucket/run`); every file here goes through
`etils.epath`. Process 0 holds `workdir/lock` (pid and host) while it trains; a lock left by a
dead process of the same host is taken over. On resume the config is compared with
`config.json`: changes to the model, the data or the optimiser's state are refused, changes of
schedule and cadence are accepted and appended to `config_history.jsonl`.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from pcjax import checkpoint

LOCK, CONFIG, HISTORY = "lock", "config.json", "config_history.jsonl"

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


def acquire_lock(path: epath.Path) -> epath.Path:
    """Takes workdir/lock for this process; raises WorkdirError if a live run holds it."""
    lock = path / LOCK
    if lock.exists():
        try:
            holder = json.loads(lock.read_text())
        except (ValueError, OSError):
            holder = {}
        me = _owner()
        dead = holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1)))
        if not dead:
            raise WorkdirError(
                f"Workdir {path} is in use by process {holder.get('pid')} on host "
                f"{holder.get('host')} (since {holder.get('since')}). Use another workdir, or "
                f"delete {lock} if that run is gone."
            )
        logging.warning("Taking over %s from process %s, which is gone.", lock, holder.get("pid"))
    text = json.dumps({**_owner(), "since": _now()})
    if "://" in str(path):
        lock.write_text(text)
    else:  # local: an exclusive create, so two runs starting together cannot both win
        if lock.exists():
            lock.unlink()
        try:
            fd = os.open(os.fspath(lock), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise WorkdirError(f"Workdir {path} was locked by another run just now.") from None
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return lock


def release_lock(lock: epath.Path) -> None:
    """Removes the lock if this process still holds it."""
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
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
