"""Trainer: sharded step equivalence, exact resume, preemption/SIGKILL recovery, exact eval,
config validation, TensorBoard events, NaN guard, and the real CLIs on mocked TFDS data."""

import functools
import glob
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pcjax import config_lib, data, metrics, models, sharding, train
from pcjax.configs import digits as digits_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = (4, 8)


def _tiny_config(**train_overrides):
    cfg = digits_config.get_config("smoke")
    cfg.model.widths = TINY
    cfg.data.global_batch_size = 16
    for k, v in train_overrides.items():
        cfg.train[k] = v
    return cfg


def _setup(mesh, cfg):
    model = models.build_model(cfg.model.name, widths=TINY)
    tx = train.create_optimizer(cfg, steps_per_epoch=10)
    rep = sharding.replicated(mesh)
    state = jax.jit(
        functools.partial(train.create_train_state, model, tx, image_shape=(16, 16, 1)),
        out_shardings=rep,
    )(jax.random.key(0))
    step = jax.jit(
        functools.partial(train.train_step, learning_rate_fn=train.learning_rate_schedule(cfg, 10)),
        in_shardings=(rep, sharding.batch_sharded(mesh)),
        out_shardings=(rep, rep),
    )
    return state, step


def _batch(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((n, 16, 16, 1)).astype(np.float32),
        "label": rng.integers(0, 10, n).astype(np.int32),
    }


def test_eight_device_step_equals_one_device_step():
    assert jax.device_count() == 8
    cfg = _tiny_config()
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.make_mesh(devices)
        state, step = _setup(mesh, cfg)
        for i in range(2):
            state, m = step(state, sharding.shard_batch(_batch(i), mesh))
        results.append(jax.device_get((state.params, state.batch_stats, m)))
    # Same global batch, same maths; only the reduction order differs (float32 round-off).
    chex.assert_trees_all_close(results[0], results[1], rtol=2e-4, atol=2e-5)


def test_step_compiles_once():
    mesh = sharding.make_mesh()
    cfg = _tiny_config()
    model = models.build_model(cfg.model.name, widths=TINY)
    tx = train.create_optimizer(cfg, steps_per_epoch=10)
    state = train.create_train_state(model, tx, jax.random.key(0), (16, 16, 1))
    state = sharding.replicate(state, mesh)
    lr = train.learning_rate_schedule(cfg, 10)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, batch):
        return train.train_step(state, batch, lr)

    for i in range(3):
        state, _ = step(state, sharding.shard_batch(_batch(i), mesh))
    assert int(state.step) == 3


def test_learning_rate_schedule_and_sgd_semantics():
    cfg = _tiny_config()
    cfg.optim.learning_rate, cfg.optim.lr_decay_epochs = 0.5, 2
    lr = train.learning_rate_schedule(cfg, steps_per_epoch=3)
    assert [float(lr(s)) for s in (0, 5, 6, 11, 12)] == pytest.approx([0.5, 0.5, 0.05, 0.05, 0.005])
    # torch.optim.SGD: d = g + wd p; buf = m buf + d; p -= lr buf.
    cfg.optim.weight_decay, cfg.optim.momentum = 0.1, 0.9
    tx = train.create_optimizer(cfg, steps_per_epoch=100)
    p, g = jnp.array([1.0, -2.0]), jnp.array([0.3, 0.4])
    s = tx.init(p)
    u1, s = tx.update(g, s, p)
    d1 = g + 0.1 * p
    np.testing.assert_allclose(u1, -0.5 * d1, rtol=1e-6)
    p2 = p + u1
    u2, _ = tx.update(g, s, p2)
    np.testing.assert_allclose(u2, -0.5 * (0.9 * d1 + g + 0.1 * p2), rtol=1e-6)


def test_exact_eval_on_non_multiple_set():
    """450 test digits with a batch of 64: masked padding, exact top-1/top-5."""
    mesh = sharding.make_mesh()
    cfg = _tiny_config()
    state, _ = _setup(mesh, cfg)
    p_eval = jax.jit(train.eval_step)
    ds, n = data.create_eval_dataset("digits", global_batch_size=64)
    got = train.evaluate(p_eval, state, ds.as_numpy_iterator(), mesh)
    images, labels = data.load_digits_split(16)["test"]
    assert n == len(labels) == 450
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    want = metrics.finalize(jax.device_get(metrics.classification_sums(logits, labels)))
    assert got["top1"] == pytest.approx(want["top1"], abs=1e-9)
    assert got["top5"] == pytest.approx(want["top5"], abs=1e-9)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)


def _restore(workdir, step):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mngr:
        assert step in mngr.all_steps()
        return mngr.restore(step, args=ocp.args.StandardRestore())


def test_two_plus_two_steps_equal_four(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.train_and_evaluate(_tiny_config(num_steps=4), straight)
    train.train_and_evaluate(_tiny_config(num_steps=2), resumed)
    train.train_and_evaluate(_tiny_config(num_steps=4), resumed)  # restarts from step 2
    a, b = _restore(straight, 4), _restore(resumed, 4)
    chex.assert_trees_all_close(
        (a["params"], a["batch_stats"], a["opt_state"]),
        (b["params"], b["batch_stats"], b["opt_state"]),
        rtol=1e-5,
        atol=1e-6,
    )
    # Artefacts a researcher expects in the workdir.
    assert os.path.exists(os.path.join(straight, "config.json"))
    events = glob.glob(os.path.join(straight, "events.out.tfevents.*"))
    assert events
    tags = _event_tags(events)
    for tag in (
        "train/loss",
        "train/top1",
        "eval/top1",
        "eval/top5",
        "perf/examples_per_sec",
        "train/learning_rate",
        "train/grad_norm",
        "train/param_norm",
    ):
        assert tag in tags, (tag, sorted(tags))


def _event_tags(paths):
    from tensorboard.backend.event_processing import event_file_loader

    tags = set()
    for path in paths:
        for event in event_file_loader.EventFileLoader(path).Load():
            for value in event.summary.value:
                tags.add(value.tag)
    return tags


def test_non_finite_loss_stops_with_clear_error(tmp_path):
    cfg = _tiny_config(num_steps=6, checkpoint_every_steps=2, log_every_steps=1)
    cfg.optim.learning_rate = 1e30
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train.train_and_evaluate(cfg, str(tmp_path))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.optim.__setattr__("lr", 0.1), "lr"),
        (
            lambda c: c.__setattr__(
                "optim", ml_collections.ConfigDict({**c.optim.to_dict(), "learning_rate": "fast"})
            ),
            "learning_rate='fast'.*float",
        ),
        (lambda c: c.optim.__setattr__("momentum", 1.5), "momentum=1.5"),
        (lambda c: c.data.__setattr__("global_batch_size", 12), "divisible by the device count 8"),
        (lambda c: c.data.__setattr__("name", "mnist"), "'mnist'.*valid choices"),
        (lambda c: c.model.__setattr__("nonlinearity", "relu"), "nonlinearity.*valid choices"),
        (lambda c: c.model.__setattr__("wavelet_method", "dct"), "'dct'.*valid choices"),
        (lambda c: c.model.__setattr__("widths", (8,) * 7), "2x2"),
    ],
)
def test_bad_configs_fail_before_compiling(tmp_path, change, message):
    cfg = digits_config.get_config()
    cfg.unlock()
    change(cfg)
    start = time.perf_counter()
    with pytest.raises(config_lib.ConfigError, match=message):
        train.train_and_evaluate(cfg, str(tmp_path / "w"))
    assert time.perf_counter() - start < 30  # validation only: no model is built or compiled
    assert not os.path.exists(tmp_path / "w")  # nothing was written or compiled


def test_dataset_names_agree():
    assert set(config_lib.DATASET_NAMES) == set(data.DATASETS)


def _run_cli(script, args, mock=False, timeout=600):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    if mock:
        code = (
            "import runpy, sys, tensorflow_datasets as tfds\n"
            f"sys.argv = {[script, *args]!r}\n"
            "with tfds.testing.mock_data(num_examples=24):\n"
            f"    runpy.run_path({script!r}, run_name='__main__')\n"
        )
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,preset",
    [
        ("experiments/imagenet.py", "mod/linear_plus_rho,smoke"),
        ("experiments/imagenet.py", "resnet18/thresh,smoke"),
        ("experiments/cifar10.py", "cst/rho_psi,smoke"),
    ],
)
def test_cli_end_to_end_on_mock_tfds(tmp_path, script, preset):
    config = script.replace("experiments/", "pcjax/configs/")
    out = _run_cli(script, [f"--config={config}:{preset}", f"--workdir={tmp_path}"], mock=True)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "eval/top1" in out.stderr and "train/loss" in out.stderr
    assert "reuse freed host memory" in out.stderr  # config.train.cpu_reuse_step_memory
    assert (tmp_path / "checkpoints" / "2").exists()


@pytest.mark.slow
def test_sigkill_mid_training_resumes_through_same_command(tmp_path):
    script = "experiments/quickstart.py"
    args = [
        "--config=pcjax/configs/digits.py:smoke",
        f"--workdir={tmp_path}",
        "--config.train.num_steps=100",
        "--config.train.checkpoint_every_steps=5",
        "--config.train.log_every_steps=5",
        "--config.train.eval_every_steps=1000",
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.Popen(
        [sys.executable, script, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = tmp_path / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
        if any(s >= 10 for s in done):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name) for p in ckpts.glob("*") if p.name.isdigit())
    assert 10 <= killed_at < 100
    out = _run_cli(script, args)
    assert out.returncode == 0, out.stderr[-4000:]
    resumed = [line for line in out.stderr.splitlines() if "starting at step" in line]
    assert resumed and int(resumed[0].rsplit(" ", 1)[-1]) >= killed_at
    assert (ckpts / "100").exists()
