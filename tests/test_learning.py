"""Training learns: the shipped train step lowers the loss and teaches the running statistics.

These guard what every accuracy figure in the README rests on. They fail if the parameter update
has the wrong sign, if the learning rate never reaches the parameters, or if batch statistics
are frozen (evaluation then normalises with the initial statistics and collapses).
"""

import functools

import jax
import numpy as np

from pcjax.configs import digits as digits_config
from pcjax.data import digits
from pcjax.training import loop, sharding, train

BATCH = 64
STEPS = 25


def _config():
    cfg = digits_config.get_config("default")
    cfg.model.widths = (8, 8)  # two blocks: seconds to compile, enough to fit a digits batch
    cfg.data.global_batch_size = BATCH
    return cfg


@functools.lru_cache(maxsize=1)
def _fit_fixed_batch():
    """STEPS train steps on one fixed batch of real digits, through the trainer's own step builder
    (`train.build_steps`: optimizer, schedule, shardings, donation); (metrics per step, eval
    metrics on that batch, initial and final batch statistics)."""
    cfg = _config()
    images, labels = digits.load_split("digits", "train")
    batch = {"image": images[:BATCH], "label": labels[:BATCH]}
    mesh = sharding.make_mesh()
    steps = train.build_steps(cfg, mesh, steps_per_epoch=20, image_shape=images.shape[1:])
    state = steps.init(jax.random.key(cfg.seed))
    init_stats = jax.device_get(state.batch_stats)
    sharded = sharding.shard_batch(batch, mesh)
    history = []
    for _ in range(STEPS):
        state, metrics = steps.train_step(state, sharded)
        history.append(jax.device_get(metrics))
    evaluated = jax.device_get(steps.eval_step(state, sharded))
    return history, evaluated, init_stats, jax.device_get(state.batch_stats)


def test_shipped_train_step_lowers_the_loss_on_a_fixed_digits_batch():
    history, _, _, _ = _fit_fixed_batch()
    losses = np.array([float(m["loss"]) for m in history])
    assert np.isfinite(losses).all()
    # Chance is log(10) = 2.30; a working step fits 64 digits within a few steps. Half the
    # first loss leaves a wide margin yet fails a sign flip (the loss then grows without bound)
    # or an update that never reaches the parameters (the loss stays flat).
    assert losses[-1] < 0.5 * losses[0], losses
    assert losses[-5:].mean() < losses[:5].mean(), losses
    assert float(history[-1]["top1"]) >= 0.9, history[-1]


def test_running_statistics_learn_so_evaluation_matches_training():
    """Evaluation normalises with the running statistics the train steps accumulated: on the
    batch it was fitted on, eval top-1 must be high. With frozen statistics nothing moves, and
    evaluation normalises with the initial ones."""
    history, evaluated, init_stats, stats = _fit_fixed_batch()
    moved = [
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(init_stats), jax.tree.leaves(stats), strict=True)
    ]
    assert moved and min(moved) > 0, moved  # every statistic was updated
    top1 = float(evaluated["top1"]) / float(evaluated["count"])
    assert top1 >= 0.8, (top1, history[-1])


def test_a_short_digits_run_reaches_a_stated_accuracy(tmp_path):
    """train_and_evaluate end to end, 3 epochs of the quick start at reduced width: >= 90% test
    top-1; chance is 10%. A sign flip gives 10%, frozen batch statistics about 40%."""
    cfg = _config()
    cfg.optim.num_epochs = 3
    cfg.train.checkpoint_every_steps = 1000
    result = loop.train_and_evaluate(cfg, str(tmp_path / "wd"))
    assert result["top1"] >= 0.9, result
