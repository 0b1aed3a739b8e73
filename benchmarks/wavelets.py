"""Benchmark of `wavelets.wavelet_transform`: "fft" vs "spatial" on the paper's block inputs.

Times the jit-compiled one-scale wavelet transform on every block input of the CIFAR-10 and
ImageNet phase-collapse networks (docs/spec.md 3.7), with each method, plus kymatio's
JAX `Scattering2D` (J=1, first order) on the real block-0 images as a comparable-work row. Prints
a Markdown table, writes it with a CSV next to it, and ends with a per-size recommendation that
is checked against `pcjax.nn.wavelets.SPATIAL_MAX_PIXELS` (the threshold of `method="auto"`).

Usage (from the repository root):
    .venv/bin/python benchmarks/wavelets.py [--quick] [--out docs/benchmarks/wavelets.md]

Timings exclude compilation (functions are compiled ahead of time; compile time is reported in
its own column), and each call blocks until both outputs (phi and psi) are ready.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `timing` when run as a script
from timing import compile_fn, time_interleaved  # noqa: E402

from pcjax.nn import filters, wavelets  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks" / "wavelets.md"
DEFAULT_QUICK_OUT = REPO_ROOT / "docs" / "benchmarks" / "wavelets_quick.md"
# The dense spatial operator is (h w) x (h' w' (L + 1)): its cost and memory grow as (h w)^2.
SPATIAL_BENCH_MAX_PIXELS = 32 * 32
# Methods whose times differ by less than this relative margin are reported as a tie.
TIE_MARGIN = 0.10
NA = "n/a"


@dataclasses.dataclass(frozen=True)
class Case:
    """One block input to benchmark."""

    suite: str  # "CIFAR-10" or "ImageNet"
    block: int
    batch: int
    h: int
    w: int
    channels: int
    complex_input: bool
    mode: str
    num_angles: int

    @property
    def dtype(self) -> str:
        return "complex64" if self.complex_input else "float32"

    @property
    def shape_str(self) -> str:
        return f"{self.batch}x{self.h}x{self.w}x{self.channels}"


@dataclasses.dataclass
class Row:
    """One line of the results table."""

    case: Case
    method: str
    auto_picks: str
    compile_s: float | None = None
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    runs: int = 0
    notes: str = ""

    @property
    def images_per_s(self) -> float | None:
        if self.median_ms is None:
            return None
        return self.case.batch / (self.median_ms / 1e3)


# (h, w, channels) of each block input (docs/spec.md 3.7); block 0 is the real image.
CIFAR_INPUTS = [
    (32, 32, 3),
    (32, 32, 64),
    (16, 16, 128),
    (16, 16, 256),
    (8, 8, 512),
    (8, 8, 512),
    (4, 4, 512),
    (4, 4, 512),
]
IMAGENET_INPUTS = [
    (224, 224, 3),
    (112, 112, 32),
    (112, 112, 64),
    (56, 56, 64),
    (56, 56, 128),
    (28, 28, 256),
    (28, 28, 512),
    (14, 14, 512),
    (14, 14, 512),
    (7, 7, 512),
    (6, 6, 512),
]
CIFAR_L, IMAGENET_L = 4, 8
CIFAR_STANDARD_BLOCKS, IMAGENET_STANDARD_BLOCKS = 0, 1  # `--factorize-filters F`
CIFAR_BATCH, IMAGENET_BATCH, QUICK_BATCH = 128, 16, 8
QUICK_CIFAR_BLOCKS = (0, 2, 4, 6)
QUICK_IMAGENET_BLOCKS = (0, 7, 10)


def make_cases(quick: bool) -> list[Case]:
    """Block inputs of both networks (a subset at batch 8 with `quick`)."""
    cases = []
    suites = [
        ("CIFAR-10", CIFAR_INPUTS, CIFAR_L, CIFAR_STANDARD_BLOCKS, CIFAR_BATCH, QUICK_CIFAR_BLOCKS),
        (
            "ImageNet",
            IMAGENET_INPUTS,
            IMAGENET_L,
            IMAGENET_STANDARD_BLOCKS,
            IMAGENET_BATCH,
            QUICK_IMAGENET_BLOCKS,
        ),
    ]
    for suite, inputs, num_angles, num_standard, batch, quick_blocks in suites:
        modes = filters.block_filter_modes(len(inputs), num_standard)
        for block, ((h, w, c), mode) in enumerate(zip(inputs, modes, strict=True)):
            if quick and block not in quick_blocks:
                continue
            cases.append(
                Case(
                    suite,
                    block,
                    QUICK_BATCH if quick else batch,
                    h,
                    w,
                    c,
                    block > 0,
                    mode,
                    num_angles,
                )
            )
    return cases


def make_input(case: Case, layout: str = "NHWC") -> jax.Array:
    """Random block input, float32 or complex64, NHWC (ours) or NCHW (kymatio)."""
    shape = (case.batch, case.h, case.w, case.channels)
    if layout == "NCHW":
        shape = (case.batch, case.channels, case.h, case.w)
    kr, ki = jax.random.split(jax.random.key(case.block))
    x = jax.random.normal(kr, shape, jnp.float32)
    if case.complex_input:
        x = jax.lax.complex(x, jax.random.normal(ki, shape, jnp.float32))
    return jax.block_until_ready(x)


def short_error(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def kymatio_fn(case: Case) -> tuple[Callable[[jax.Array], Any] | None, str]:
    """kymatio's JAX `Scattering2D(J=1, max_order=1)` for the case, or None and why not."""
    try:
        import kymatio
        from kymatio.jax import Scattering2D
    except Exception as e:  # any import problem becomes a row, not a crash
        return None, f"kymatio unavailable: {short_error(e)}"
    try:
        scattering = Scattering2D(J=1, shape=(case.h, case.w), L=case.num_angles, max_order=1)
    except Exception as e:  # e.g. an incompatible jax version
        return None, f"kymatio setup failed: {short_error(e)}"
    return scattering, (
        f"kymatio {kymatio.__version__} Scattering2D(J=1, L={case.num_angles}, max_order=1) "
        "on NCHW: comparable work, not the same operator (own filters and padding; "
        "modulus then a second low-pass; 1+L real maps per channel at h/2)"
    )


def bench_case(case: Case, timing: dict[str, Any]) -> list[Row]:
    """Rows for "fft", "spatial" and (real inputs only) kymatio on one block input.

    The methods are compiled first, then timed in alternating rounds so that they share
    whatever load the machine has.
    """
    auto = wavelets.choose_method(case.h, case.w, "auto")
    rows = {m: Row(case, m, auto) for m in ("fft", "spatial")}
    x = make_input(case)
    candidates: dict[str, tuple[Callable[..., Any], jax.Array]] = {}
    for method in ("fft", "spatial"):
        candidates[method] = (
            functools.partial(
                wavelets.wavelet_transform,
                num_angles=case.num_angles,
                mode=case.mode,
                method=method,
            ),
            x,
        )
    if case.h * case.w > SPATIAL_BENCH_MAX_PIXELS:
        rows["spatial"].notes = "n/a (dense operator too large)"
        del candidates["spatial"]
    if not case.complex_input:
        rows["kymatio"] = Row(case, "kymatio", "-")
        fn, rows["kymatio"].notes = kymatio_fn(case)
        if fn is not None:
            candidates["kymatio"] = (fn, make_input(case, layout="NCHW"))

    compiled: dict[str, tuple[Callable[..., Any], Sequence[Any]]] = {}
    for name, (fn, arg) in candidates.items():
        try:
            compiled_fn, rows[name].compile_s = compile_fn(fn, arg)
            for _ in range(timing["warmup"]):  # also checks that it runs
                jax.block_until_ready(compiled_fn(arg))
            compiled[name] = (compiled_fn, (arg,))
        except Exception as e:  # a failed row must not stop the benchmark
            rows[name].notes = f"failed: {short_error(e)}"
    results = time_interleaved(
        compiled,
        rounds=timing["rounds"],
        warmup=0,
        min_time=timing["min_time"],
        min_runs=timing["min_runs"],
    )
    for name, t in results.items():
        r = rows[name]
        r.median_ms, r.min_ms, r.max_ms, r.runs = t.median_ms, t.min_ms, t.max_ms, t.runs
    return list(rows.values())


def fmt(value: float | None, spec: str) -> str:
    return NA if value is None else format(value, spec)


TABLE_HEADER = (
    "| suite | block | input (b x h x w x c) | dtype | mode | L | method | auto picks "
    "| compile (s) | ms/batch (median) | images/s | notes |"
)


def table_line(row: Row) -> str:
    c = row.case
    ms = fmt(row.median_ms, ".2f") if row.median_ms is not None else (row.notes or NA)
    notes = "" if row.median_ms is None else row.notes  # else the notes are in the ms column
    cells = [
        c.suite,
        str(c.block),
        c.shape_str,
        c.dtype,
        c.mode,
        str(c.num_angles),
        row.method,
        row.auto_picks,
        fmt(row.compile_s, ".2f"),
        ms,
        fmt(row.images_per_s, ".0f"),
        notes,
    ]
    return "| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |"


def markdown_table(rows: list[Row]) -> str:
    sep = "|" + "---|" * (TABLE_HEADER.count("|") - 1)
    return "\n".join([TABLE_HEADER, sep] + [table_line(r) for r in rows])


def write_csv(rows: list[Row], path: Path) -> None:
    fields = [
        "suite",
        "block",
        "batch",
        "h",
        "w",
        "channels",
        "dtype",
        "mode",
        "num_angles",
        "method",
        "auto_picks",
        "compile_s",
        "median_ms",
        "min_ms",
        "max_ms",
        "runs",
        "images_per_s",
        "notes",
    ]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for r in rows:
            c = r.case
            writer.writerow(
                [
                    c.suite,
                    c.block,
                    c.batch,
                    c.h,
                    c.w,
                    c.channels,
                    c.dtype,
                    c.mode,
                    c.num_angles,
                    r.method,
                    r.auto_picks,
                    r.compile_s,
                    r.median_ms,
                    r.min_ms,
                    r.max_ms,
                    r.runs,
                    r.images_per_s,
                    r.notes,
                ]
            )


def recommendations(rows: list[Row]) -> list[str]:
    """Per block: faster method, speed ratio, and whether `choose_method(..., "auto")` agrees."""
    lines = [
        "| suite | block | h x w (pixels) | mode | fft ms | spatial ms | faster "
        "| fft/spatial (median) | fft/spatial (min) | auto picks | agrees |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    spatial_wins: list[int] = []
    fft_wins: list[int] = []
    disagreements = 0
    by_case: dict[Case, dict[str, Row]] = {}
    for r in rows:
        by_case.setdefault(r.case, {})[r.method] = r
    for case, methods in by_case.items():
        fft, spatial = methods.get("fft"), methods.get("spatial")
        if fft is None or fft.median_ms is None:
            continue
        pixels = case.h * case.w
        auto = wavelets.choose_method(case.h, case.w, "auto")
        if spatial is None or spatial.median_ms is None:
            faster, ratio, min_ratio = "fft (spatial not run)", NA, NA
            agrees = "yes" if auto == "fft" else "no"
            fft_wins.append(pixels)
        else:
            r = fft.median_ms / spatial.median_ms
            ratio = f"{r:.2f}"
            min_ratio = f"{fft.min_ms / spatial.min_ms:.2f}"
            if abs(r - 1) < TIE_MARGIN:
                faster, agrees = f"tie (within {TIE_MARGIN:.0%})", "yes"
            else:
                faster = "spatial" if r > 1 else "fft"
                agrees = "yes" if auto == faster else "no"
                (spatial_wins if faster == "spatial" else fft_wins).append(pixels)
        disagreements += agrees == "no"
        spatial_ms = fmt(spatial.median_ms, ".2f") if spatial is not None else NA
        lines.append(
            f"| {case.suite} | {case.block} | {case.h}x{case.w} ({pixels}) | {case.mode} "
            f"| {fft.median_ms:.2f} | {spatial_ms} | {faster} | {ratio} | {min_ratio} "
            f"| {auto} | {agrees} |"
        )
    compared = len(lines) - 2
    threshold = wavelets.SPATIAL_MAX_PIXELS
    largest_spatial = max(spatial_wins, default=0)
    smallest_fft = min(fft_wins, default=None)
    lines += [
        "",
        f"Spatial was faster at pixel counts {sorted(set(spatial_wins)) or 'none'}; "
        f"fft was faster at {sorted(set(fft_wins)) or 'none'} (ties excluded).",
    ]
    advice = ""
    if smallest_fft is not None and largest_spatial < smallest_fft:
        consistent = largest_spatial <= threshold < smallest_fft
        lines.append(
            f"Measured crossover: spatial wins up to {largest_spatial} pixels, fft from "
            f"{smallest_fft}; any SPATIAL_MAX_PIXELS in [{largest_spatial}, {smallest_fft}) fits. "
            f"Current SPATIAL_MAX_PIXELS = {threshold}: "
            f"{'consistent' if consistent else 'inconsistent'} with these measurements."
        )
        if not consistent:
            advice = f" Consider SPATIAL_MAX_PIXELS = {largest_spatial} on this device."
    else:
        lines.append(
            "No clean pixel-count crossover (the winner also depends on mode, channels and "
            f"batch). Current SPATIAL_MAX_PIXELS = {threshold}."
        )
    lines.append(
        f"Recommendation: `auto` picks the slower method on {disagreements} of the {compared} "
        f"blocks above (ties count as agreeing).{advice}"
    )
    return lines


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return NA


def header(args: argparse.Namespace, timing: dict[str, Any]) -> list[str]:
    device = jax.devices()[0]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        "# Wavelet transform benchmark" + (" (quick)" if args.quick else ""),
        "",
        f"- command: `{command}`",
        f"- date: {now}",
        f"- jax {jax.__version__}, jaxlib {jaxlib.__version__}, backend {jax.default_backend()}",
        f"- device: {device.device_kind} (platform {device.platform}), {jax.device_count()} "
        f"device(s); CPU: {cpu_model()}, {os.cpu_count()} CPUs ({usable} usable)",
        f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`; load average at start "
        f"{load_average()} (other processes on the CPUs inflate and scatter the timings)",
        f"- timing: jit compiled ahead of time (compile column = trace + compile, including "
        f"building filter banks / the dense operator); then {timing['warmup']} warm-up call(s) "
        f"and at least {timing['min_runs']} timed calls and {timing['min_time']} s per method, "
        f"in {timing['rounds']} rounds alternating between the methods of one input; median "
        "wall time per batch, blocking on phi and psi",
        f"- batch: CIFAR-10 {QUICK_BATCH if args.quick else CIFAR_BATCH}, ImageNet "
        f"{QUICK_BATCH if args.quick else IMAGENET_BATCH}; inputs random normal "
        "(complex64 from block 1 on); spatial skipped when h*w > "
        f"{SPATIAL_BENCH_MAX_PIXELS}",
        f"- `auto` rule: spatial iff h*w <= SPATIAL_MAX_PIXELS = {wavelets.SPATIAL_MAX_PIXELS}",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 8, fewer sizes (< 1 min)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"Markdown output (default {DEFAULT_OUT.relative_to(REPO_ROOT)}, "
        f"or {DEFAULT_QUICK_OUT.relative_to(REPO_ROOT)} with --quick); "
        "a CSV is written next to it",
    )
    args = parser.parse_args(argv)
    out = args.out or (DEFAULT_QUICK_OUT if args.quick else DEFAULT_OUT)
    if args.quick:
        timing = {"warmup": 1, "rounds": 2, "min_time": 0.2, "min_runs": 2}
    else:
        timing = {"warmup": 1, "rounds": 3, "min_time": 2.0, "min_runs": 6}

    # Pay JAX's one-time start-up costs before the first timed row.
    jax.block_until_ready(jax.jit(lambda v: jnp.fft.fft2(v * 2))(jnp.ones((4, 4), jnp.complex64)))

    lines = header(args, timing)
    print("\n".join(lines), flush=True)
    rows: list[Row] = []
    for case in make_cases(args.quick):
        for row in bench_case(case, timing):
            rows.append(row)
            print(table_line(row), file=sys.stderr, flush=True)  # progress

    table = markdown_table(rows)
    rec = recommendations(rows)
    text = "\n".join(lines + ["## Results", "", table, "", "## fft vs spatial", ""] + rec) + "\n"
    print(text[len("\n".join(lines)) + 1 :])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    write_csv(rows, out.with_suffix(".csv"))
    print(f"Wrote {out} and {out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
