"""What every benchmark script shares: timing (compile once, then the median of complete calls),
the `dataset:preset` configs they run, and the report (header, Markdown table, CSV).

Imports nothing but the standard library at module level, so that the PyTorch side
(`benchmarks.reference`, run by a Python without JAX) can time its steps the same way.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import importlib
import importlib.metadata
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks"


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call wall times in milliseconds."""

    samples_ms: tuple[float, ...]
    median_ms = property(lambda self: statistics.median(self.samples_ms))
    min_ms = property(lambda self: min(self.samples_ms))
    runs = property(lambda self: len(self.samples_ms))


def _block_until_ready(out: Any) -> Any:
    import jax

    return jax.block_until_ready(out)


def time_fn(
    fn: Callable[..., Any],
    *args: Any,
    warmup: int = 1,
    min_time: float = 1.0,
    min_runs: int = 3,
    max_runs: int = 100,
    sync: Callable[[Any], Any] = _block_until_ready,
) -> Timing:
    """Wall times of `fn(*args)`, each call waited for by `sync` (JAX: every output leaf ready).

    `warmup` untimed calls, then timed calls until both `min_runs` calls and `min_time` seconds
    are done (or `max_runs`). Compile `fn` first (`compile_fn`) to keep compilation out.
    """
    for _ in range(warmup):
        sync(fn(*args))
    samples: list[float] = []
    total = 0.0
    while len(samples) < max_runs and (len(samples) < min_runs or total < min_time):
        start = time.perf_counter()
        sync(fn(*args))
        elapsed = time.perf_counter() - start
        samples.append(elapsed * 1e3)
        total += elapsed
    return Timing(tuple(samples))


def time_interleaved(
    fns: Mapping[str, tuple[Callable[..., Any], Sequence[Any]]],
    rounds: int = 3,
    min_time: float = 1.0,
    min_runs: int = 3,
) -> dict[str, Timing]:
    """Times several `(fn, args)` in alternating rounds so that they see the same machine load;
    each round has a share of `min_time` and `min_runs`, and the samples are pooled."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, args) in fns.items():
            t = time_fn(
                fn, *args, warmup=0, min_time=min_time / rounds, min_runs=-(-min_runs // rounds)
            )
            samples[name].extend(t.samples_ms)
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def compile_fn(fn: Callable[..., Any], *args: Any) -> tuple[Callable[..., Any], float]:
    """`fn` (jitted here unless it already is) compiled ahead of time for `args`, and the seconds
    to trace and compile it."""
    import jax

    start = time.perf_counter()
    compiled = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args).compile()
    return compiled, time.perf_counter() - start


def compiled_flops(compiled: Any) -> float:
    """FLOPs of a compiled program by XLA's cost analysis (NaN where the backend gives none)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", math.nan))


def matmul_peak_gflops(n: int = 4096, calls: int = 10) -> float:
    """Best fp32 n x n matmul rate of `calls` calls, GFLOP/s: the roofline the tables use
    (float32 products on every backend, not TF32 or bf16 passes)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: jnp.matmul(a, a, precision=jax.lax.Precision.HIGHEST))
    t = time_fn(f, a, min_runs=calls, min_time=0.0, max_runs=calls)
    return 2 * n**3 / (t.min_ms / 1e3) / 1e9


def load_config(spec: str) -> tuple[Any, tuple[int, int, int]]:
    """The config of "dataset:preset" (`pcjax.configs.<dataset>.get_config(preset)`; the
    module's default preset without ":preset") and the shape of its images."""
    from pcjax.data import datasets

    dataset, _, preset = spec.partition(":")
    module = importlib.import_module(f"pcjax.configs.{dataset}")
    config = module.get_config(preset) if preset else module.get_config()
    return config, datasets.image_shape(config.data.name, config.data.image_size)


def command(module: str, argv: Sequence[str] | None = None) -> str:
    """The command line that ran `benchmarks.<module>`, as it is run from the repository root."""
    return shlex.join(
        ["python", "-m", f"benchmarks.{module}", *(sys.argv[1:] if argv is None else argv)]
    )


def versions(*dists: str) -> str:
    """ "name version" of each installed distribution, comma-separated."""
    out = []
    for d in dists:
        try:
            out.append(f"{d} {importlib.metadata.version(d)}")
        except importlib.metadata.PackageNotFoundError:  # e.g. tensorflow as tensorflow-cpu
            try:
                out.append(f"{d} {importlib.import_module(d.replace('-', '_')).__version__}")
            except ImportError:
                out.append(f"{d} not installed")
    return ", ".join(out)


def machine(device: bool = True) -> str:
    """The JAX device (with `device`) and the host's CPUs."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{os.cpu_count()} CPU cores ({cpu})"
    if device:
        import jax

        d = jax.devices()[0]
        text = f"{jax.device_count()} x {d.platform}:{d.device_kind}; {text}"
    return text


def header(module: str, dists: Sequence[str] = ("jax", "jaxlib"), device: bool = True) -> str:
    """The lines above every table: command, date, versions, machine."""
    return (
        f"Command: `{command(module)}`  \n"
        f"Date: {datetime.date.today()}; {versions(*dists)}; {machine(device)}.  \n"
    )


def fmt(value: float | None, spec: str) -> str:
    """`format(value, spec)`, or "n/a" for None and NaN."""
    return "n/a" if value is None or value != value else format(value, spec)


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; cells are `str`-ed, with "|" replaced so that it cannot split one."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
    return "\n".join(lines)


def write_report(path: str | Path, title: str, text: str, rows: Sequence[dict] = ()) -> None:
    """Writes "# title" and `text` to `path`, and `rows` (dicts) as a CSV next to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n{text.rstrip()}\n")
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with open(path.with_suffix(".csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    print(f"wrote {path}", flush=True)
