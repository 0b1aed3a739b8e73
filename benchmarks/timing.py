"""Small timing helpers for JAX benchmarks: compile once, then time complete executions."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call wall times in milliseconds, with their median and spread."""

    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def max_ms(self) -> float:
        return max(self.samples_ms)

    @property
    def runs(self) -> int:
        return len(self.samples_ms)


def compile_fn(fn: Callable[..., Any], *args: Any) -> tuple[Callable[..., Any], float]:
    """Jit-compiles `fn` for `args` ahead of time; returns (compiled, seconds to trace+compile)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_fn(
    fn: Callable[..., Any],
    *args: Any,
    warmup: int = 1,
    min_time: float = 1.0,
    min_runs: int = 3,
    max_runs: int = 100,
) -> Timing:
    """Wall times of `fn(*args)`, blocking until every output leaf is ready.

    Runs `warmup` untimed calls, then timed calls until both `min_runs` calls and `min_time`
    seconds are done (or `max_runs` is reached). `fn` should already be compiled (see
    `compile_fn`) so that compilation is excluded from the timings. Use `.median_ms`.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples: list[float] = []
    total = 0.0
    while len(samples) < max_runs and (len(samples) < min_runs or total < min_time):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        elapsed = time.perf_counter() - start
        samples.append(elapsed * 1e3)
        total += elapsed
    return Timing(tuple(samples))


def time_interleaved(
    fns: dict[str, tuple[Callable[..., Any], Sequence[Any]]],
    rounds: int = 3,
    warmup: int = 1,
    min_time: float = 1.0,
    min_runs: int = 3,
) -> dict[str, Timing]:
    """Times several `(fn, args)` in alternating rounds so they see the same machine load.

    Each function gets `warmup` untimed calls, then `rounds` rounds of `time_fn` with a share
    of `min_time` and `min_runs`; the samples of all rounds are pooled per function.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn, args in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    for _ in range(rounds):
        for name, (fn, args) in fns.items():
            t = time_fn(
                fn,
                *args,
                warmup=0,
                min_time=min_time / rounds,
                min_runs=math.ceil(min_runs / rounds),
            )
            samples[name].extend(t.samples_ms)
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def matmul_peak_gflops(n: int = 4096, calls: int = 10) -> float:
    """Best fp32 n x n matmul throughput of `calls` calls, in GFLOP/s: the benchmarks' roofline."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    t = time_fn(f, a, min_runs=calls, min_time=0.0, max_runs=calls)
    return 2 * n**3 / (t.min_ms / 1e3) / 1e9


def compiled_flops(compiled: Any) -> float:
    """FLOPs of a compiled program by XLA's cost analysis (NaN where the backend gives none)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))
