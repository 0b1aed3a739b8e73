"""SIGTERM to every process of a two-process job at once: all stop after the same step, save
it, exit 143 promptly, and the rerun resumes from it."""

import signal
import time

import pytest
from test_multiprocess import _launch, _steps, _wait, _wait_for_checkpoint

from pcjax.training import preemption


@pytest.mark.slow
def test_sigterm_to_every_process_at_once(tmp_path):
    wd = tmp_path / "wd"
    procs = _launch(wd, 100000, tmp_path)
    _wait_for_checkpoint(procs, wd)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    results = _wait(procs)
    elapsed = time.monotonic() - sent
    saved = _steps(wd)[-1]
    for rc, log in results:
        assert rc == preemption.PREEMPTED_EXIT_CODE, log[-3000:]
        assert f"Preempted: saved step {saved} " in log and "Finished" not in log
    print(f"both processes exited {elapsed:.1f} s after SIGTERM")
    resumed = _wait(_launch(wd, saved + 2, tmp_path))
    for rc, log in resumed:
        assert rc == 0, log[-3000:]
        assert f"starting at step {saved}" in log
