"""One writer per workdir (lock, stale-lock recovery) and config checks on resume."""

import json
import os
import socket
import subprocess
import sys

import pytest
from etils import epath

from pcjax.configs import digits as digits_config
from pcjax.training import workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_lock(path, pid, host):
    (path / workdir.LOCK).write_text(json.dumps({"pid": pid, "host": host, "since": "then"}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    path = epath.Path(tmp_path)
    lock = workdir.acquire_lock(path)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    with pytest.raises(workdir.WorkdirError, match=f"in use by process {os.getpid()}"):
        workdir.acquire_lock(path)
    workdir.release_lock(lock)
    assert not lock.exists()

    # A live process of this host (the test runner's parent) holds it: refused.
    _write_lock(path, os.getppid(), socket.gethostname())
    with pytest.raises(workdir.WorkdirError, match="Use another workdir"):
        workdir.acquire_lock(path)
    # Another host's process: cannot be checked from here, so refused too.
    _write_lock(path, _dead_pid(), "some-other-host")
    with pytest.raises(workdir.WorkdirError, match="some-other-host"):
        workdir.acquire_lock(path)
    # A dead process of this host (a killed run): taken over without a manual step.
    _write_lock(path, _dead_pid(), socket.gethostname())
    lock = workdir.acquire_lock(path)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    workdir.release_lock(lock)


def _config(**changes):
    cfg = digits_config.get_config("smoke")
    for key, value in changes.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def test_resume_refuses_model_and_data_changes_listing_them(tmp_path):
    path = epath.Path(tmp_path)
    workdir.record_config(path, _config(), resuming=False)
    changed = _config(**{"model.widths": (4, 8), "data.global_batch_size": 32})
    with pytest.raises(workdir.WorkdirError) as error:
        workdir.record_config(path, changed, resuming=True, step=4)
    message = str(error.value)
    assert "model.widths: [8, 16] -> [4, 8]" in message
    assert "data.global_batch_size: 64 -> 32" in message
    assert "optim" not in message
    assert not (path / workdir.HISTORY).exists()
    # Before any checkpoint exists, a new config simply replaces the old one.
    workdir.record_config(path, changed, resuming=False)
    assert json.loads((path / workdir.CONFIG).read_text())["model"]["widths"] == [4, 8]


def test_resume_accepts_schedule_changes_and_keeps_their_history(tmp_path):
    path = epath.Path(tmp_path)
    workdir.record_config(path, _config(), resuming=False)
    first = _config(**{"optim.learning_rate": 0.01, "train.num_steps": 40})
    workdir.record_config(path, first, resuming=True, step=4)
    second = _config(**{"optim.learning_rate": 0.01, "train.num_steps": 80})
    workdir.record_config(path, second, resuming=True, step=40)
    history = [json.loads(line) for line in (path / workdir.HISTORY).read_text().splitlines()]
    assert history[0]["step"] == 4 and history[0]["changes"] == {
        "optim.learning_rate": [0.05, 0.01],
        "train.num_steps": [4, 40],
    }
    assert history[1]["step"] == 40 and history[1]["changes"] == {"train.num_steps": [40, 80]}
    assert json.loads((path / workdir.CONFIG).read_text())["train"]["num_steps"] == 80


def test_unreachable_object_store_fails_fast_without_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(workdir.WorkdirError, match="gs://pcjax-no-such-bucket/run is not reach"):
        workdir.prepare("gs://pcjax-no-such-bucket/run")
    assert os.listdir(tmp_path) == []
