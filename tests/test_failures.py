"""Failures end in one line on stderr and exit 1: a typo in a config key, a data folder that
does not exist, an unexpected error (its traceback goes to a file the line names); and an
error whose message is a repr is reported by the error behind it."""

import os
import subprocess
import sys

import pytest

from pcjax.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(script, *args, code=None, **env_vars):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **env_vars}
    cmd = [sys.executable, script, *args] if code is None else [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _one_error_line(out) -> str:
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, out.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_an_unknown_config_key_is_one_line_with_the_valid_keys(tmp_path):
    for config in ([], ["--config=pcjax/configs/digits.py:smoke"]):  # the default, or named
        out = _cli(
            "experiments/quickstart.py", *config, f"--workdir={tmp_path}/w", "--config.optim.lrr=1"
        )
        line = _one_error_line(out)
        assert "Unknown config key 'optim.lrr'" in line and "'learning_rate'" in line
        assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_an_unknown_preset_or_flag_is_one_line(tmp_path):
    out = _cli(
        "experiments/quickstart.py",
        "--config=pcjax/configs/digits.py:nosuch",
        PYTHONPROFILEIMPORTTIME="1",  # every import, on stderr
    )
    line = _one_error_line(out)
    assert "Unknown preset 'nosuch'" in line and "'default'" in line
    # Answered before TensorFlow (seconds to import) is loaded.
    imported = {row.rsplit("|", 1)[-1].strip() for row in out.stderr.splitlines() if "|" in row}
    assert "pcjax.configs.schema" in imported and "tensorflow" not in imported
    out = _cli("experiments/quickstart.py", f"--workdir={tmp_path}/w", "--no_such_flag=1")
    assert "no_such_flag" in _one_error_line(out)
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_a_missing_data_folder_is_named_with_the_command_that_prepares_it(tmp_path):
    out = _cli(
        "experiments/cifar10.py", f"--workdir={tmp_path}/w", f"--config.data.data_dir={tmp_path}/no"
    )
    line = _one_error_line(out)
    assert f"is not in data_dir={tmp_path}/no (no folder {tmp_path}/no/cifar10/" in line
    assert "download_and_prepare()" in out.stderr and "TFRECORD" not in out.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_an_unexpected_error_is_one_line_and_its_traceback_a_file(tmp_path):
    code = (
        "import sys\n"
        "from pcjax.training import launch\n"
        "def broken(*args, **kwargs):\n"
        "    raise KeyError('something nobody expected')\n"
        "launch.run = broken\n"
        f"sys.argv = ['quickstart.py', '--workdir={tmp_path}/w']\n"
        "import runpy; runpy.run_path('experiments/quickstart.py', run_name='__main__')\n"
    )
    line = _one_error_line(_cli(None, code=code))
    assert line.startswith("error: KeyError: 'something nobody expected' (details: ")
    details = line.split("(details: ")[1].rstrip(")")
    with open(details) as f:
        assert "Traceback" in f.read()
    os.unlink(details)


def test_first_line_looks_past_a_repr_message():
    class Opaque(Exception):
        def __str__(self):
            return "<bound method pybind11_detail_function_record_v1 of <object at 0x1>>"

    try:
        try:
            raise ValueError("DATA_LOSS: Error reading byte range [0, 456)\nmore")
        except ValueError as cause:
            raise Opaque() from cause
    except Opaque as error:
        assert checkpoint.first_line(error) == (
            "ValueError: DATA_LOSS: Error reading byte range [0, 456)"
        )


def test_first_line_cuts_a_repr_at_the_end_of_a_message():
    try:
        try:
            raise ValueError("DATA_LOSS: Error reading byte range [0, 456)")
        except ValueError as cause:
            raise Exception(
                "Encountered error while reading array index: (slice(0, 4, 1),). See full "
                "TensorStore details: <bound method pybind11_detail_function_record_v1_system"
            ) from cause
    except Exception as error:
        assert checkpoint.first_line(error) == (
            "Exception: Encountered error while reading array index: (slice(0, 4, 1),) "
            "(ValueError: DATA_LOSS: Error reading byte range [0, 456))"
        )
