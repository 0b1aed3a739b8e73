"""--compile_for: the trainer's steps compiled for TPU slices (and GPUs) this machine lacks.

TPU programs compile with libtpu on the CPU; a missing libtpu fails these tests with the
install line. The programs are the smallest that show each behaviour. Whatever compiles for an
accelerator is marked slow (the lane to run while editing keeps target names, meshes, lowering
and `local`).
"""

import os
import subprocess
import sys

import jax
import pytest

from pcjax.accelerators import batch_search, compile_only, compile_report, targets
from pcjax.configs import cifar10, digits, schema
from pcjax.data import datasets
from pcjax.training import checkpoint, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tpu_devices(name: str) -> list:
    try:
        return targets.devices(targets.get_target(name))
    except targets.MissingCompiler as error:
        pytest.fail(str(error))


def _tiny_digits(widths=(4,), image_size=8) -> object:
    """The digits net with one narrow block on 8x8 images: a program that compiles in seconds."""
    config = digits.get_config("smoke")
    config.model.widths = widths
    config.data.image_size = image_size
    return config


def _tiny_result(name: str) -> compile_only.Result:
    _tpu_devices(name)  # a missing libtpu fails here, with the install line
    return compile_only.run(_tiny_digits(), name)


def _assert_report_positive(result: compile_only.Result) -> None:
    for which, r in result.reports.items():
        for field in ("argument_bytes", "output_bytes", "flops", "bytes_accessed"):
            assert getattr(r, field) > 0, (which, field)
        assert r.temp_bytes > 0 or which == "eval"  # a tiny eval step may need none
        assert r.compile_seconds > 0
        assert r.per_device_batch * result.setup.mesh.size == r.global_batch
        # Arguments hold at least the replicated state and this device's share of the batch.
        structs = compile_only.batch_structs(
            result.config, result.setup.mesh, r.global_batch, which == "eval"
        )
        batch_bytes = sum(x.size * x.dtype.itemsize for x in structs.values()) // r.global_batch
        assert r.argument_bytes >= result.param_bytes + batch_bytes * r.per_device_batch
        seconds, _ = compile_report.step_seconds(
            r, result.setup.chip, result.config.model.precision
        )
        assert seconds > 0
    text = result.table()
    labels = ("HBM per chip", "temporaries", "GFLOP per image", "arithmetic intensity",
              "img/s per chip / per slice", "all-reduced per step", "compile seconds")  # fmt: skip
    for label in labels:
        assert label in text, label


def test_every_target_name_is_a_topology_libtpu_accepts():
    for name, target in targets.all_targets().items():
        if target.chip.platform != "tpu":
            continue
        devices = _tpu_devices(name)
        assert len(devices) == target.num_devices, name
        assert {d.device_kind for d in devices} == {target.chip.device_kind}, name
        assert len({d.process_index for d in devices}) == target.hosts, name
    # Cloud TPU names: v4/v5p count TensorCores (two per chip), v5e/v6e count chips.
    assert targets.get_target("v4-32").chips == 16
    assert targets.get_target("v5p-128").chips == 64
    assert targets.get_target("v5e-256").hosts == 64
    assert targets.get_target("v5e-8").hosts == targets.get_target("v6e-8").hosts == 1
    assert targets.get_target("v5litepod-16") == targets.get_target("v5e-16")


def test_unknown_target_lists_the_valid_names():
    with pytest.raises(ValueError, match="v9z-8") as caught:
        targets.get_target("v9z-8")
    line = str(caught.value)
    assert "\n" not in line
    for name in ("v5e-{1,4,8,", ",256}", "v4-{8,16,32,", "v5p-{8,", ",128,", "v6e-", "h200-{1,"):
        assert name in line, name


def test_mesh_spans_every_host_in_runtime_order():
    devices = _tpu_devices("v5e-16")
    mesh = sharding.make_mesh(devices)
    assert mesh.size == 16 and list(mesh.devices.flat) == devices
    # Each host's chips are one contiguous block of the "data" axis, host by host.
    hosts = [d.process_index for d in mesh.devices.flat]
    assert hosts == sorted(hosts) and len(set(hosts)) == 4


def test_auto_wavelets_resolve_for_the_target_platform_not_the_host():
    """A 32x32 block: "auto" is fft on this CPU host, matmul on TPU (choose_method's rule)."""
    config = cifar10.get_config("mod/rho_psi,smoke")
    shape = datasets.image_shape("cifar10")
    texts = {}
    for platform, devices in (("cpu", jax.devices()[:4]), ("tpu", _tpu_devices("v5e-4"))):
        mesh = sharding.make_mesh(devices)
        steps = train.build_steps(config, mesh, 10, shape)
        assert steps.model.backend == platform
        state = compile_only.state_struct(steps, mesh)
        batch = compile_only.batch_structs(config, mesh, 8, eval_batch=True)
        texts[platform] = steps.eval_step.lower(state, batch).as_text()
    assert "fft" in texts["cpu"] and "fft" not in texts["tpu"]


@pytest.mark.slow
def test_tiny_net_report_on_a_v5e_slice():
    result = _tiny_result("v5e-4")
    _assert_report_positive(result)
    train_report = result.reports["train"]
    # Data parallel: every float32 gradient crosses the all-reduce; eval reduces only sums.
    assert train_report.allreduce_bytes >= result.param_bytes
    assert result.reports["eval"].allreduce_bytes < result.param_bytes
    assert train_report.alias_bytes > 0  # the donated state is updated in place


# Its search compiles programs just under a v5e's 16 GiB (45 minutes on a 2-core CPU shared with
# other compiles): outside `make test`, run by `make test-heavy`.
@pytest.mark.heavy
@pytest.mark.timeout(7200)
def test_out_of_memory_is_one_line_with_a_batch_that_fits():
    _tpu_devices("v5e-1")
    config = _tiny_digits()
    far_too_large = 1 << 22  # the channel-major matmul path fits 1 << 20 of these in 14 GiB
    config.data.global_batch_size = far_too_large
    with pytest.raises(compile_only.OutOfMemory) as caught:
        compile_only.run(config, "v5e-1")
    line = str(caught.value)
    assert "\n" not in line and "TPU v5 lite" in line and "GiB" in line
    best = int(line.split("largest per-device batch that fits is ")[1].split()[0])
    assert 1 < best < far_too_large
    setup = compile_only.setup_target("v5e-1")
    report, _, _ = compile_only.compile_step(config, setup, "train", per_device_batch=best)
    assert report.total_bytes <= targets.CHIPS["v5e"].hbm_bytes
    with pytest.raises(compile_only.DoesNotFit):
        compile_only.compile_step(
            config, setup, "train", per_device_batch=best + batch_search.margin(best)
        )


def test_local_devices_compile_and_run_the_step():
    """--compile_for=local: the same path on the test's 8 CPU devices, step measured."""
    result = compile_only.run(_tiny_digits(), compile_only.LOCAL, repeats=2)
    assert result.setup.real and result.setup.mesh.size == jax.device_count()
    assert result.reports["train"].measured_seconds > 0
    assert "measured: time per step" in result.table()


def _cli(*args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **env_vars)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900
    )


def test_cli_unknown_target_is_one_line():
    out = _cli("experiments/quickstart.py", "--compile_for=v9z-8")
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert "v9z-8" in last and "v5e-{1,4,8" in last and "tensorflow" not in out.stderr.lower()


@pytest.mark.slow
def test_cli_prints_the_table_without_a_workdir(tmp_path):
    """Also: a compile-only executable never enters JAX's persistent compilation cache, which
    could not load it back."""
    _tpu_devices("v5e-4")
    cache = tmp_path / "jax-cache"
    out = _cli(
        "experiments/quickstart.py",
        "--config=pcjax/configs/digits.py:smoke",
        "--config.model.widths=(4,)",
        "--config.data.image_size=8",
        "--compile_for=v5e-4",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| HBM per chip: arguments |" in out.stdout and "v5e-4" in out.stdout
    written = [p.name for p in cache.iterdir()] if cache.exists() else []
    assert not [n for n in written if n.startswith(("jit_train_step", "jit_eval_step"))], written


@pytest.mark.slow
def test_notebook_config_fits_a_colab_v5e_chip():
    """The Colab notebook trains digits.get_config() on one chip (Colab's TPU runtime). Its
    train step is the larger program (it keeps activations for the backward pass), so only
    that one is compiled here; the eval step's compile is covered by the smaller tests."""
    _tpu_devices("v5e-1")
    config = digits.get_config()
    schema.validate(config, device_count=1)
    setup = compile_only.setup_target("v5e-1")
    report, _, steps = compile_only.compile_step(config, setup, "train")
    result = compile_only.Result(
        config,
        setup,
        {"train": report},
        checkpoint.state_bytes(compile_only.state_struct(steps, setup.mesh).params),
    )
    _assert_report_positive(result)
    assert report.total_bytes < targets.CHIPS["v5e"].hbm_bytes


@pytest.mark.slow
def test_cifar_smoke_preset_on_a_v5e_slice():
    """The CIFAR network on a v5e slice at precision bf16 (one MXU pass per product): a third
    of the compile time of "highest", whose six-pass products the notebook's test compiles."""
    _tpu_devices("v5e-4")
    config = cifar10.get_config("mod/rho_psi,smoke")
    config.model.precision = "bf16"
    result = compile_only.run(config, "v5e-4")
    _assert_report_positive(result)
    text = compile_report.format_report(result)
    assert "roofline" in text and "matmul precision=bf16" in text


@pytest.mark.slow
def test_gpu_compile_only_counts_flops_from_the_hlo():
    """H100s without a GPU: the CUDA plugin compiles; its executable reports no cost analysis,
    so FLOPs and bytes come from XLA's HLO cost analysis."""
    try:
        devices = targets.devices(targets.get_target("h100-8"))
    except targets.MissingCompiler as error:
        pytest.skip(str(error))
    assert len(devices) == 8 and devices[0].platform == "gpu"
    result = compile_only.run(_tiny_digits(), "h100-8")
    _assert_report_positive(result)
    assert result.reports["train"].cost_source.startswith("HLO cost analysis")
    assert result.reports["train"].allreduce_bytes >= result.param_bytes


def test_usable_memory_is_a_tpus_hbm_and_jaxs_default_pool_on_a_gpu():
    h200, v5e = targets.CHIPS["h200"], targets.CHIPS["v5e"]
    assert targets.usable_bytes(h200, {}) == 0.75 * h200.hbm_bytes
    assert targets.usable_bytes(h200, {"XLA_CLIENT_MEM_FRACTION": "0.9"}) == 0.9 * h200.hbm_bytes
    old_name = {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"}
    assert targets.usable_bytes(h200, old_name) == 0.5 * h200.hbm_bytes
    assert targets.usable_bytes(v5e, {"XLA_CLIENT_MEM_FRACTION": "0.5"}) == v5e.hbm_bytes
    for bad in ("1.5", "0", "most"):
        with pytest.raises(ValueError, match=f"XLA_CLIENT_MEM_FRACTION='{bad}'"):
            targets.usable_bytes(h200, {"XLA_CLIENT_MEM_FRACTION": bad})


@pytest.mark.slow  # a search: about eight compiles of seconds each
def test_gpu_out_of_memory_is_judged_against_the_pool_a_process_gets(monkeypatch):
    """No GPU compiler checks memory: the total is held against JAX's pool (75 % of HBM, or
    XLA_CLIENT_MEM_FRACTION), and a program over it gets the one line and a batch that fits."""
    try:
        targets.devices(targets.get_target("h100-1"))
    except targets.MissingCompiler as error:
        pytest.skip(str(error))
    config = _tiny_digits()
    config.data.global_batch_size = 16  # a short search: a few compiles of seconds each
    setup = compile_only.setup_target("h100-1")
    chip = targets.CHIPS["h100"]
    report, _, _ = compile_only.compile_step(config, setup, "train")
    assert report.total_bytes < targets.usable_bytes(chip)
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", str(0.6 * report.total_bytes / chip.hbm_bytes))
    usable = targets.usable_bytes(chip)
    with pytest.raises(compile_only.OutOfMemory) as caught:
        compile_only.run(config, "h100-1")
    line = str(caught.value)
    assert "\n" not in line and chip.device_kind in line
    best = int(line.split("largest per-device batch that fits is ")[1].split()[0])
    assert 1 <= best < config.data.global_batch_size
    fitting, _, _ = compile_only.compile_step(config, setup, "train", per_device_batch=best)
    assert fitting.total_bytes <= usable
    with pytest.raises(compile_only.DoesNotFit) as over:  # below 100, the margin is 1 image
        compile_only.compile_step(config, setup, "train", per_device_batch=best + 1)
    assert over.value.args[0] > usable == over.value.args[1]
