"""The workdir lock under contention: runs started at the same instant, or taking over the
same stale lock at the same instant, never both win, and the loser gets one line."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from etils import epath

from pcjax.training import workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def race(base: str, trials: int, sync, env=None, contenders: int = 2) -> list[list[str]]:
    """Runs `contenders` processes of tests/lock_contender.py; per trial, their outcomes."""
    sync.mkdir(exist_ok=True)
    env = env or dict(os.environ, PYTHONPATH=ROOT)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(ROOT, "tests", "lock_contender.py"),
                base,
                str(trials),
                str(i),
                str(sync),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(contenders)
    ]
    try:
        for k in range(trials):
            while not all((sync / f"ready_{k}_{i}").exists() for i in range(contenders)):
                assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
                time.sleep(0.001)
            (sync / f"go_{k}").touch()
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [["" for _ in range(contenders)] for _ in range(trials)]
    for i, (out, _) in enumerate(outs):
        for line in out.splitlines():
            k, outcome = line.split(" ", 1)
            results[int(k)][i] = outcome
    return results


def assert_one_winner(results: list[list[str]]) -> None:
    for k, outcomes in enumerate(results):
        won = [o for o in outcomes if o == "won"]
        refused = [o for o in outcomes if o.startswith("refused ")]
        assert len(won) == 1 and len(refused) == len(outcomes) - 1, (k, outcomes)
        for line in refused:
            assert "\n" not in line and ("in use by process" in line or "just now" in line)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_simultaneous_takeovers_of_a_stale_lock_have_one_winner(tmp_path):
    trials = 30
    base = tmp_path / "runs"
    stale = json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "since": "then"})
    for k in range(trials):
        (base / f"t{k}").mkdir(parents=True)
        (base / f"t{k}" / workdir.LOCK).write_text(stale)
    assert_one_winner(race(str(base), trials, tmp_path / "sync"))


def test_a_lock_that_holds_no_run_is_replaced_and_no_temporary_file_stays(tmp_path):
    """An empty lock (what a full disk left before locks were written atomically)."""
    path = epath.Path(tmp_path)
    (path / workdir.LOCK).write_text("")
    lock = workdir.acquire_lock(path)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert sorted(os.listdir(tmp_path)) == [workdir.LOCK, workdir.GUARD]
    workdir.release_lock(lock)
    assert not lock.exists()
