"""Two processes x four CPU devices on 127.0.0.1, launched with explicit coordinator flags:
train, checkpoint, collective preemption (SIGTERM to one process, then to both), exact resume."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from pcjax.training import checkpoint, preemption
from tests.support import xla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
    "--config=pcjax/configs/digits.py:smoke",
    "--config.model.widths=(4,8)",
    "--config.data.global_batch_size=16",
    "--config.train.checkpoint_every_steps=2",
    "--config.train.log_every_steps=1",
    "--config.train.eval_every_steps=100000",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, num_steps, logs):
    """Starts processes 0 and 1 of one job; the coordinator is process 0 on a free port."""
    env = {**os.environ, "XLA_FLAGS": xla.xla_flags(4)}
    port = _free_port()
    procs = []
    for i in range(2):
        log = open(logs / f"{workdir.name}-{i}.log", "w")  # noqa: SIM115 (closed in _wait)
        cmd = [
            sys.executable,
            "experiments/quickstart.py",
            *ARGS,
            f"--workdir={workdir}",
            f"--config.train.num_steps={num_steps}",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        proc.log = log
        procs.append(proc)
    return procs


def _wait(procs):
    """(exit status, log) of each process; all are killed if one does not end in 10 min."""
    out = []
    try:
        for proc in procs:
            rc = proc.wait(timeout=600)
            proc.log.close()
            out.append((rc, open(proc.log.name).read()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return out


def _steps(workdir):
    ckpts = workdir / "checkpoints"
    return (
        sorted(int(p.name) for p in ckpts.glob("*") if p.name.isdigit()) if ckpts.exists() else []
    )


def _wait_for_checkpoint(procs, workdir, step: int = 2) -> None:
    """Returns once a checkpoint of `step` or later exists; fails if a process ends first (a
    hang is left to the test timeout)."""
    while not any(s >= step for s in _steps(workdir)):
        if any(p.poll() is not None for p in procs):
            results = _wait(procs)
            raise AssertionError(f"no checkpoint: {[log[-2000:] for _, log in results]}")
        time.sleep(0.2)


def _preempt(procs, workdir, targets, resumed_from: int | None = None) -> int:
    """SIGTERM to `targets` once a new checkpoint exists; both processes save the same step and
    exit 143 (having started from `resumed_from`, if given). Returns that step."""
    start = max(_steps(workdir), default=0)
    _wait_for_checkpoint(procs, workdir, start + 2)
    for proc in targets:
        proc.send_signal(signal.SIGTERM)
    results = _wait(procs)
    saved = _steps(workdir)[-1]
    for rc, log in results:
        assert rc == preemption.PREEMPTED_EXIT_CODE, log[-3000:]
        assert f"Preempted: saved step {saved} " in log and "Finished" not in log
        assert "processes=2" in log or "process 1/2" in log
        assert resumed_from is None or f"starting at step {resumed_from}" in log
    return saved


@pytest.mark.slow
def test_two_processes_preempt_together_and_resume_exactly(tmp_path):
    """SIGTERM to one process stops both at the same saved step; the rerun resumes there, and
    SIGTERM to both at once does the same; the final parameters equal an uninterrupted run's."""
    wd = tmp_path / "wd"
    procs = _launch(wd, 100000, tmp_path)  # never ends by itself
    first = _preempt(procs, wd, procs[1:])  # one process only
    procs = _launch(wd, 100000, tmp_path)
    second = _preempt(procs, wd, procs, resumed_from=first)  # every process at once
    assert second > first
    end = second + 2
    for rc, log in _wait(_launch(wd, end, tmp_path)):
        assert rc == 0, log[-3000:]
        assert f"starting at step {second}" in log
    straight = tmp_path / "straight"
    for rc, log in _wait(_launch(straight, end, tmp_path)):
        assert rc == 0, log[-3000:]
    a = checkpoint.restore_variables(straight, end)[0]
    b = checkpoint.restore_variables(wd, end)[0]
    # Same two processes x four devices on both sides: the resume is bit-identical.
    jax.tree.map(np.testing.assert_array_equal, a, b)
