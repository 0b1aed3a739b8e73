"""The same input stream and training on any topology: 2 processes x 4 CPU devices against 1 x 8.

Each run launches tests/topology_driver.py (jax.distributed on 127.0.0.1 for 2 processes).
(a) the global batches of the first steps are bitwise identical and the parameters after 2 steps
agree; (b) a run checkpointed at step 2 on 1 x 8 and resumed on 2 x 4 reaches the parameters of
the uninterrupted 1 x 8 run at step 4.
"""

import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from pcjax.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "topology_driver.py")
K = 2  # steps before the topology changes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, num_processes: int, num_steps: int, dump_batches: int = 0) -> None:
    """Runs the driver as `num_processes` processes sharing 8 CPU devices; fails on any error."""
    os.makedirs(workdir, exist_ok=True)
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                DRIVER,
                f"--process_id={p}",
                f"--num_processes={num_processes}",
                f"--local_devices={8 // num_processes}",
                f"--coordinator={coordinator}",
                f"--workdir={workdir}",
                f"--num_steps={num_steps}",
                f"--dump_batches={dump_batches}",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(num_processes)
    ]
    errors = [proc.communicate(timeout=600)[1] for proc in procs]
    for proc, err in zip(procs, errors, strict=True):
        assert proc.returncode == 0, err[-4000:]


def _params(workdir, step: int):
    """The parameters saved at `step`, restored onto one device whatever topology saved them."""
    state, at = checkpoint.restore_variables(workdir, step)
    assert at == step
    return jax.device_get(state["params"])


def _launch_all(root):
    one, two, switched = root / "1x8", root / "2x4", root / "1x8_then_2x4"
    _launch(str(one), 1, num_steps=2 * K, dump_batches=3)
    _launch(str(two), 2, num_steps=K, dump_batches=3)
    shutil.copytree(one / "checkpoints" / str(K), switched / "checkpoints" / str(K))
    _launch(str(switched), 2, num_steps=2 * K)
    return one, two, switched


@pytest.mark.slow
def test_two_processes_agree_with_one_and_a_run_resumes_on_the_other(tmp_path):
    """One test over the three launches: (a) the same global batches, (b) the same parameters
    after K steps, (c) a resume on the other topology continues the stream."""
    one, two, switched = _launch_all(tmp_path)

    # (a) bitwise: images and labels, in order.
    a, b = np.load(one / "batches.npz"), np.load(two / "batches.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) == 6
    for key in a.files:
        assert a[key].shape[0] == 32
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image_0"], a["image_1"])

    # (b) 1 x 8 against 2 x 4 devices: the gradient all-reduce and the batch statistics sum in
    # another order across processes, so the parameters agree to float32 rounding, not bitwise.
    want, got = _params(one, K), _params(two, K)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), want, got)
    initial_change = jax.tree.leaves(
        jax.tree.map(lambda x, y: np.abs(x - y).max(), want, _params(one, 2 * K))
    )
    assert max(initial_change) > 1e-3  # the steps moved the parameters

    # (c) checkpointed at K on 1 x 8, resumed on 2 x 4: the parameters of the straight run.
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
        _params(one, 2 * K),
        _params(switched, 2 * K),
    )
