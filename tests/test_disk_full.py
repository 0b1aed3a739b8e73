"""A full disk, for real: a small tmpfs mounted in a user namespace (`unshare -rm`).

At start (no room for the lock, or for one checkpoint) and during a run (the checkpoints fill
it): one line naming the path and the space needed, exit 1, no lock left behind, and the
checkpoints already written intact.
"""

import os
import shlex
import subprocess
import sys

import pytest

from tests.support import xla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
    "--config=pcjax/configs/digits.py:smoke",
    "--config.model.widths=(4,8)",
    "--config.data.global_batch_size=16",
    "--config.train.log_every_steps=1",
    "--config.train.eval_every_steps=100000",
]


def _namespaces_work() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


def _in_small_disk(mount, size: str, script: str) -> subprocess.CompletedProcess:
    """Runs the shell `script` with a `size` tmpfs mounted on `mount` (only it sees it)."""
    mount.mkdir()
    body = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mount))} && {script}"
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = xla.xla_flags(1)
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", body],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _cli(workdir, *flags) -> str:
    cmd = [sys.executable, "experiments/quickstart.py", *ARGS, f"--workdir={workdir}", *flags]
    return " ".join(shlex.quote(c) for c in cmd)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
@pytest.mark.skipif(not _namespaces_work(), reason="user namespaces (unshare -rm) unavailable")
def test_a_full_disk_fails_in_one_line_and_keeps_the_checkpoints(tmp_path):
    disk = tmp_path / "disk"
    wd = disk / "wd"
    # The run saves every step and keeps them all, until 2.5 MiB are full; then the rerun.
    run = _cli(
        wd,
        "--config.train.num_steps=100000",
        "--config.train.checkpoint_every_steps=1",
        "--config.train.max_checkpoints_to_keep=100000",
    )
    out = _in_small_disk(
        disk,
        "2560k",
        f"{run}; echo rc=$? >&2; {run}; echo rc=$? >&2; ls {wd} >&2; "
        # Then a disk with no room left at all: the lock cannot be written.
        f"mkdir {disk}/full && (cat /dev/zero > {disk}/filler 2>/dev/null; true); "
        f"{_cli(disk / 'full')}; echo rc=$? >&2; ls -a {disk}/full >&2; "
        f"{sys.executable} -c 'from pcjax.training import checkpoint; import sys; "
        f'print("restored", checkpoint.restore_variables(sys.argv[1])[1])\' {wd} >&2',
    )
    err = out.stderr
    assert out.returncode == 0, err[-3000:]
    assert err.count("rc=1") == 3, err[-3000:]
    first, again, full = _errors(err)
    assert "Traceback" not in err, err[-3000:]
    assert (
        first.startswith("error: DiskFullError: Saving step ") and f"in {wd}/checkpoints" in first
    )
    assert "MiB free; free at least" in first
    assert again.startswith("error: DiskFullError: A checkpoint needs about") and str(wd) in again
    assert full.startswith(f"error: WorkdirError: Cannot write the lock {disk}/full/lock")
    assert "No space left on device" in full
    assert "lock.guard" in err and "\nlock\n" not in err  # no lock left behind, empty or not
    failed_at = int(first.split("Saving step ")[1].split()[0])
    restored = int(err.split("restored ")[1].split()[0])
    assert restored == failed_at - 1  # every step before the failure was saved and verifies
    print("\n".join(_errors(err)))
