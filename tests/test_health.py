"""Divergence: spike detection on synthetic loss traces, the best checkpoint kept, and a run
that blows up (finite or not) leaving only healthy checkpoints for its rerun."""

import json
import math
import os
import re

import jax
import numpy as np
import pytest

from pcjax.configs import digits as digits_config
from pcjax.training import checkpoint, health, loop


def _trace(rng, n, blow_up_at=None, rate=1.5):
    """Per-step metrics: a decaying noisy loss, then (from `blow_up_at`) geometric growth."""
    steps = []
    for s in range(1, n + 1):
        loss = (0.3 + 2.0 * math.exp(-s / 40)) * math.exp(0.35 * rng.standard_normal())
        grad = 1.0 * math.exp(0.3 * rng.standard_normal())
        param = 30.0 + 0.01 * s
        if blow_up_at is not None and s >= blow_up_at:
            k = s - blow_up_at + 1
            loss, grad, param = loss * rate**k, grad * rate**k, param * 1.02**k
        steps.append({"loss": loss, "grad_norm": grad, "param_norm": param, "finite": 1.0})
    return steps


def _monitor(state=None):
    return health.SpikeMonitor(window=100, factor=10.0, patience=10, num_classes=10, state=state)


def test_noise_never_triggers_and_the_margin_is_recorded():
    rng = np.random.default_rng(0)
    for _ in range(5):
        monitor = _monitor()
        for s, m in enumerate(_trace(rng, 600), start=1):
            assert not monitor.observe(s, m).diverged
        assert 1.0 < monitor.peak < 5.0  # the largest ratio seen: noise stays below the factor


def test_a_finite_blow_up_is_dated_back_to_its_start():
    rng = np.random.default_rng(1)
    for start in (150, 233, 401):
        monitor = _monitor()
        for s, m in enumerate(_trace(rng, start + 60, blow_up_at=start), start=1):
            verdict = monitor.observe(s, m)
            if verdict.diverged:
                break
        assert verdict.diverged and "loss spike" in verdict.reason
        # Every checkpoint from the one before the blow-up on is tainted, none much earlier.
        assert start - 12 <= verdict.onset <= start, (start, verdict.onset)
        assert health.tainted_steps([start - 20, start - 1, start + 3], verdict.onset) == [
            start - 1,
            start + 3,
        ]


def test_transient_spike_is_forgiven_and_non_finite_stops_at_once():
    rng = np.random.default_rng(2)
    trace = _trace(rng, 300)
    for s in (120, 121, 122):  # three wild batches, then back to normal
        trace[s - 1] = {**trace[s - 1], "loss": 50.0, "grad_norm": 40.0}
    trace[250] = {**trace[250], "loss": float("nan"), "finite": 0.0}
    monitor = _monitor()
    for s, m in enumerate(trace, start=1):
        verdict = monitor.observe(s, m)
        assert not monitor.open_spike or 120 <= s <= 122
        if verdict.diverged:
            break
    assert s == 251 and verdict.onset == 251 and "non-finite" in verdict.reason


def test_the_statistics_survive_a_resume_through_json():
    rng = np.random.default_rng(3)
    trace = _trace(rng, 200, blow_up_at=160)
    straight, resumed = _monitor(), _monitor()
    out = [[], []]
    for s, m in enumerate(trace, start=1):
        if s == 150:  # a checkpoint: the state goes through JSON and a new monitor
            resumed = _monitor(json.loads(json.dumps(resumed.state())))
        for i, monitor in enumerate((straight, resumed)):
            v = monitor.observe(s, m)
            out[i].append((v.diverged, v.onset))
    assert out[0] == out[1] and any(d for d, _ in out[0])


def test_the_best_checkpoint_is_not_rotated_away(tmp_path):
    state = {"w": jax.numpy.ones((3,))}
    top1 = {1: 0.2, 2: 0.9, 3: None, 4: 0.5, 5: 0.4, 6: None}
    with checkpoint.create_manager(tmp_path, 1, 2) as manager:
        for step, value in top1.items():
            checkpoint.save(manager, step, state, force=True, top1=value)
        manager.wait_until_finished()
        assert manager.all_steps() == [2, 5, 6]
    with checkpoint.create_manager(tmp_path, 1, 2) as manager:  # the metric is on disk
        checkpoint.save(manager, 7, state, force=True, top1=0.1)
        manager.wait_until_finished()
        assert manager.all_steps() == [2, 6, 7]


def _config(num_steps, lr):
    cfg = digits_config.get_config("smoke")
    cfg.model.widths = (4, 8)
    cfg.data.global_batch_size = 16
    cfg.optim.learning_rate = lr
    cfg.train.num_steps = num_steps
    cfg.train.checkpoint_every_steps = 5
    cfg.train.log_every_steps = 5
    cfg.train.eval_every_steps = 10
    return cfg


def _norm(wd, step):
    params = checkpoint.restore_variables(wd, step)[0]["params"]
    return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(params))))


@pytest.mark.slow
@pytest.mark.parametrize("lr", [1.0, 1e9])  # a finite blow-up, and one to NaN
def test_a_blow_up_sets_aside_its_checkpoints_and_the_rerun_resumes_healthy(tmp_path, lr):
    wd = str(tmp_path)
    loop.train_and_evaluate(_config(20, 0.05), wd)
    healthy = _norm(wd, 20)
    with pytest.raises(loop.Diverged) as error:
        loop.train_and_evaluate(_config(65, lr), wd)
    message = str(error.value)
    assert "\n" not in message
    onset = int(re.search(r"the blow-up began at step (\d+)", message).group(1))
    good = int(re.search(r"resumes from the last healthy checkpoint, step (\d+)", message)[1])
    assert 20 < onset <= 25 and good < onset - 1 and good in (15, 20)
    kept = sorted(int(n) for n in os.listdir(os.path.join(wd, "checkpoints")))
    assert max(kept) == good
    aside = os.path.join(wd, checkpoint.DIVERGED)
    assert all(int(n) >= onset - 1 for n in (os.listdir(aside) if os.path.isdir(aside) else []))
    for step in kept:  # every checkpoint left holds weights of the healthy run
        assert _norm(wd, step) < 2 * healthy
    result = loop.train_and_evaluate(_config(good + 5, 0.05), wd)
    assert result["top1"] > 0.2  # the rerun at a sane lr trains on


def test_vanishing_gradients_near_zero_loss_are_not_a_spike():
    """A fitted training set: loss ~1e-3, gradient norms ~3e-6, and harder batches with 1e4
    times larger gradients (what the quick start shows in its last epoch)."""
    rng = np.random.default_rng(4)
    monitor = _monitor()
    for s in range(1, 400):
        grad = 3e-6 * math.exp(0.3 * rng.standard_normal())
        if s % 7 < 3:
            grad = 0.06
        m = {"loss": 1e-3 * (1 + rng.random()), "grad_norm": grad, "param_norm": 30.0}
        assert not monitor.observe(s, {**m, "finite": 1.0}).diverged
        assert not monitor.open_spike, s
