"""Trainer: sharded step equivalence, exact resume, preemption/SIGKILL recovery, exact eval,
config validation, TensorBoard events, NaN guard, and the real CLIs on mocked TFDS data."""

import functools
import glob
import os
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from clu import metric_writers

from pcjax.configs import digits as digits_config
from pcjax.configs import schema
from pcjax.data import datasets, digits, input_pipeline
from pcjax.training import (
    checkpoint,
    launch,
    loop,
    metrics,
    preemption,
    prefetch,
    sharding,
    train,
    workdir,
)
from tests.support import xla

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
    model = schema.build_model(cfg)
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


@pytest.mark.slow
def test_step_compiles_once():
    mesh = sharding.make_mesh()
    cfg = _tiny_config()
    model = schema.build_model(cfg)
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


@pytest.mark.slow
def test_exact_eval_on_non_multiple_set():
    """450 test digits with a batch of 64: masked padding, exact top-1/top-5."""
    mesh = sharding.make_mesh()
    cfg = _tiny_config()
    state, _ = _setup(mesh, cfg)
    p_eval = jax.jit(train.eval_step)
    ds, n = input_pipeline.create_eval_dataset("digits", global_batch_size=64)
    got = train.evaluate(p_eval, state, ds.as_numpy_iterator(), mesh)
    images, labels = digits.load_digits_split(16)["test"]
    assert n == len(labels) == 450
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    want = metrics.finalize(jax.device_get(metrics.classification_sums(logits, labels)))
    assert got["top1"] == pytest.approx(want["top1"], abs=1e-9)
    assert got["top5"] == pytest.approx(want["top5"], abs=1e-9)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)


def _restore(workdir, step):
    return checkpoint.restore_variables(workdir, step)[0]


def _assert_bitwise_equal(a, b) -> None:
    """Every leaf equal to the bit (NaN-free trees; same structure)."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_two_plus_two_steps_equal_four(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    loop.train_and_evaluate(_tiny_config(num_steps=4), straight)
    loop.train_and_evaluate(_tiny_config(num_steps=2), resumed)
    loop.train_and_evaluate(_tiny_config(num_steps=4), resumed)  # restarts from step 2
    a, b = _restore(straight, 4), _restore(resumed, 4)
    # Same machine, same devices, same compiled step: the resumed run is bit-identical.
    _assert_bitwise_equal(
        (a["params"], a["batch_stats"], a["opt_state"]),
        (b["params"], b["batch_stats"], b["opt_state"]),
    )
    # Artefacts a researcher expects in the workdir.
    assert os.path.exists(os.path.join(straight, "config.json"))
    assert not os.path.exists(os.path.join(straight, "lock"))  # released at the end
    # The loop's own state is in the checkpoint: best_top1 survives the resume.
    saved = _loop_state(resumed, 4)
    assert 0.0 <= saved["best_top1"] <= 1.0 and saved["best_top1"] >= saved["eval"]["top1"]
    assert saved["best_top1"] == pytest.approx(
        max(_loop_state(resumed, 2)["best_top1"], saved["eval"]["top1"])
    )
    # A resume that would change the model is refused, naming the key, before any restore.
    with pytest.raises(workdir.WorkdirError, match=r"model.widths: \[4, 8\] -> \[4, 4\]"):
        changed = _tiny_config(num_steps=6)
        changed.model.widths = (4, 4)
        loop.train_and_evaluate(changed, resumed)
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


def _loop_state(workdir_path, step):
    import orbax.checkpoint as ocp

    directory = checkpoint.checkpoint_dir(workdir_path)
    with ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True)
    ) as m:
        return m.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))["loop"]


def _event_tags(paths):
    from tensorboard.backend.event_processing import event_file_loader

    tags = set()
    for path in paths:
        for event in event_file_loader.EventFileLoader(path).Load():
            for value in event.summary.value:
                tags.add(value.tag)
    return tags


def _all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


@pytest.mark.slow
def test_divergence_never_reaches_a_checkpoint(tmp_path, caplog):
    """lr=1e9 after good checkpoints: Diverged, naming a checkpoint that exists and is finite;
    rerunning at a sane lr resumes from it."""
    wd = str(tmp_path)
    loop.train_and_evaluate(_tiny_config(num_steps=4, checkpoint_every_steps=2), wd)
    bad = _tiny_config(num_steps=60, checkpoint_every_steps=1, max_checkpoints_to_keep=2)
    bad.optim.learning_rate = 1e9
    with pytest.raises(loop.Diverged) as error:
        loop.train_and_evaluate(bad, wd)
    found = re.search(r"last healthy checkpoint, step (\d+) \((\S+)\)", str(error.value))
    assert found, str(error.value)
    step, path = int(found.group(1)), found.group(2)
    assert step >= 4 and os.path.isdir(path) and path.endswith(f"checkpoints/{step}")
    state, at = checkpoint.restore_variables(wd, step)
    assert at == step and _all_finite(state)
    assert not os.path.exists(os.path.join(wd, "lock"))
    # Every checkpoint left is finite.
    for name in os.listdir(os.path.join(wd, "checkpoints")):
        assert _all_finite(checkpoint.restore_variables(wd, int(name))[0]), name
    # A rerun at a sane lr starts from it (at lr=1e9 the step-4 state was already far off, so
    # only the restore and the evaluation of the named state are asserted here).
    with caplog.at_level("INFO"):
        result = loop.train_and_evaluate(_tiny_config(num_steps=step), wd)
    assert any(f"starting at step {step}" in r.getMessage() for r in caplog.records)
    assert set(result) == {"loss", "top1", "top5"}


class _Recorder(metric_writers.LoggingWriter):
    """A logging writer that also keeps every scalar it writes."""

    def __init__(self):
        super().__init__()
        self.scalars: list[tuple[int, str, float]] = []

    def write_scalars(self, step, scalars):
        self.scalars += [(step, key, float(value)) for key, value in scalars.items()]
        super().write_scalars(step, scalars)


def _hand_built_run(tmp_path, cfg, num_steps):
    """A `loop.Run` over in-memory batches: the loop needs no dataset library."""
    mesh = sharding.make_mesh()
    state, step = _setup(mesh, cfg)
    eval_set = _batch(99, 32)
    return loop.Run(
        config=cfg,
        workdir=tmp_path,
        mesh=mesh,
        state=state,
        start_step=0,
        num_steps=num_steps,
        eval_every=1,
        train_step=step,
        eval_step=jax.jit(train.eval_step),
        train_batches=(sharding.shard_batch(_batch(i), mesh) for i in range(num_steps)),
        eval_batches=lambda: iter([eval_set]),
        manager=checkpoint.create_manager(tmp_path, cfg.train.checkpoint_every_steps, 2),
        writer=_Recorder(),
    )


@pytest.mark.slow
def test_loop_evaluates_and_saves_only_finite_states(tmp_path):
    cfg = _tiny_config(num_steps=3, checkpoint_every_steps=1)
    run = _hand_built_run(tmp_path / "good", cfg, 3)
    result = loop.train_loop(run)
    assert set(result) == {"loss", "top1", "top5"}
    evals = [(s, v) for s, k, v in run.writer.scalars if k == "eval/top1"]
    assert [s for s, _ in evals] == [1, 2, 3]
    assert run.loop_state["best_top1"] == max(v for _, v in evals)
    best = max(evals, key=lambda e: e[1])[0]  # the newest two and the best are kept
    assert run.manager.all_steps() == sorted({2, 3, best})

    cfg = _tiny_config(num_steps=6, checkpoint_every_steps=100)
    cfg.optim.learning_rate = 1e30
    run = _hand_built_run(tmp_path / "bad", cfg, 6)
    with pytest.raises(loop.Diverged, match="no checkpoint was saved") as error:
        loop.train_loop(run)
    bad_step = int(re.search(r"after step (\d+)", str(error.value)).group(1))
    evaluated = [s for s, k, _ in run.writer.scalars if k == "eval/top1"]
    assert all(s < bad_step for s in evaluated)  # no state was evaluated unchecked
    assert run.manager.all_steps() == []


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.optim.__setattr__("lr", 0.1), "lr"),
        (
            lambda c: c.__setattr__(
                "optim", ml_collections.ConfigDict({**c.optim.to_dict(), "learning_rate": "fast"})
            ),
            "'learning_rate'.*fast.*float",
        ),
        (lambda c: c.optim.__setattr__("momentum", 1.5), "momentum=1.5"),
        (lambda c: c.data.__setattr__("global_batch_size", 12), "divisible by the device count 8"),
        (lambda c: c.data.__setattr__("name", "mnist"), "'mnist'.*valid choices"),
        (lambda c: c.model.__setattr__("nonlinearity", "relu"), "nonlinearity.*valid choices"),
        (lambda c: c.model.__setattr__("wavelet_method", "dct"), "'dct'.*valid choices"),
        (lambda c: c.model.__setattr__("widths", (8,) * 7), "2x2"),
        (lambda c: c.__setattr__("seed", -3), "seed=-3 must be >= 0"),
    ],
)
def test_bad_configs_fail_before_compiling(tmp_path, change, message):
    cfg = digits_config.get_config()
    cfg.unlock()
    change(cfg)
    with pytest.raises(schema.ConfigError, match=message):
        loop.train_and_evaluate(cfg, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")  # raised before the workdir or a model existed


def test_dataset_names_agree():
    assert set(schema.DATASET_NAMES) == set(datasets.DATASETS)


def _run_cli(script, args, mock=False, timeout=600):
    env = {**os.environ, "XLA_FLAGS": xla.xla_flags(8)}
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
    assert (tmp_path / "checkpoints" / "2").exists()


def _start_cli(script, args, log_path):
    env = {**os.environ, "XLA_FLAGS": xla.xla_flags(8)}
    log = open(log_path, "w")  # noqa: SIM115 (closed by _finish)
    proc = subprocess.Popen(
        [sys.executable, script, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    proc.log = log
    return proc


def _wait_for_checkpoint(proc, ckpts, at_least):
    """Waits until a committed checkpoint step >= at_least exists (the run is then past it)."""
    deadline = time.time() + 600
    while time.time() < deadline:
        done = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
        if any(s >= at_least for s in done):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no checkpoint >= {at_least}: {open(proc.log.name).read()[-3000:]}")


def _finish(proc):
    rc = proc.wait(timeout=600)
    proc.log.close()
    return rc, open(proc.log.name).read()


def _steps_saved(ckpts):
    return sorted(int(p.name) for p in ckpts.glob("*") if p.name.isdigit())


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_exactly(tmp_path):
    """SIGTERM: saves, skips the final eval, exits 143 without "Finished". SIGKILL: the lock
    it leaves is taken over. The rerun resumes and ends where an uninterrupted run ends."""
    script, wd = "experiments/quickstart.py", tmp_path / "wd"
    args = [
        "--config=pcjax/configs/digits.py:smoke",
        f"--workdir={wd}",
        "--config.model.widths=(4,8)",
        "--config.data.global_batch_size=16",
        "--config.train.checkpoint_every_steps=2",
        "--config.train.log_every_steps=1",
        "--config.train.eval_every_steps=100000",
    ]
    ckpts = wd / "checkpoints"
    endless = [*args, "--config.train.num_steps=100000"]  # never ends by itself
    proc = _start_cli(script, endless, tmp_path / "a.log")
    _wait_for_checkpoint(proc, ckpts, 2)
    proc.send_signal(signal.SIGTERM)
    rc, log = _finish(proc)
    assert rc == preemption.PREEMPTED_EXIT_CODE == 143, log[-3000:]
    assert "Preempted: saved step" in log and "Finished" not in log and "final eval" not in log
    assert "eval/top1" not in log  # the final evaluation was skipped
    saved = _steps_saved(ckpts)[-1]
    assert f"Preempted: saved step {saved} " in log

    proc = _start_cli(script, endless, tmp_path / "b.log")
    _wait_for_checkpoint(proc, ckpts, saved + 2)
    proc.send_signal(signal.SIGKILL)
    _finish(proc)
    assert (wd / "lock").exists()  # left by the killed run
    killed_at = _steps_saved(ckpts)[-1]

    out = _run_cli(script, [*args, f"--config.train.num_steps={killed_at + 2}"])
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"starting at step {killed_at}" in out.stderr and "Taking over" in out.stderr
    straight = tmp_path / "straight"
    cfg = _tiny_config(num_steps=killed_at + 2, log_every_steps=1, eval_every_steps=100000)
    loop.train_and_evaluate(cfg, str(straight))
    a, b = _restore(straight, killed_at + 2), _restore(wd, killed_at + 2)
    _assert_bitwise_equal(a, b)  # same machine and device count as the straight run


@pytest.mark.slow
def test_cli_hides_accelerators_from_tensorflow_before_it_starts():
    """Importing a main's CLI module starts no TensorFlow; `cli.main` hides accelerators
    before it trains, before anything starts TF's runtime (the event writer, the pipeline)."""
    code = (
        "import sys\n"
        "from pcjax import cli\n"
        "assert 'tensorflow' not in sys.modules\n"
        "from pcjax.data import preprocessing\n"
        "preprocessing.hide_accelerators_from_tf()\n"
        "import tensorflow as tf\n"
        "print(sorted({d.device_type for d in tf.config.get_visible_devices()}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-1] == "['CPU']"


def test_partial_coordinator_flags_are_refused():
    with pytest.raises(schema.ConfigError, match="num_processes=None"):
        launch.initialize_distributed("127.0.0.1:1234", None, 0)


@pytest.mark.slow
def test_help_lists_flags_presets_and_overrides():
    out = _run_cli("experiments/cifar10.py", ["--help"])
    assert out.returncode == 0, out.stderr[-3000:]
    for text in (
        "--workdir",
        "--coordinator_address",
        "--num_processes",
        "--process_id",
        "cst/rho_psi",
        "--config.train.num_steps",
        "143",
    ):
        assert text in out.stdout, (text, out.stdout[-3000:])


@pytest.mark.slow
def test_train_and_evaluate_closes_its_input(tmp_path, monkeypatch):
    """Training, and the rerun of the finished run (which takes no step), both let go of the
    host pipeline and the batches queued on the devices when they return."""
    made = []

    def recording(*args, **kwargs):
        made.append(create(*args, **kwargs))
        return made[-1]

    create = prefetch.create_train_iterator
    monkeypatch.setattr(prefetch, "create_train_iterator", recording)
    for _ in range(2):
        loop.train_and_evaluate(_tiny_config(num_steps=2), str(tmp_path / "wd"))
    assert len(made) == 2 and all(p.closed and not p._ahead for p in made)
