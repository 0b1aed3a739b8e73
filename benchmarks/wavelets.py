"""`wavelets.wavelet_transform`, "fft" against "spatial", on every block input of the paper's nets.

    python -m benchmarks.wavelets                        # -> docs/benchmarks/wavelets.md
    python -m benchmarks.wavelets --quick                # batch 8, a few blocks, no file

Times the jit-compiled one-scale transform on every block input of the CIFAR-10 and ImageNet
phase-collapse networks (docs/spec.md 3.7) with each method, plus kymatio's JAX `Scattering2D`
(J=1, first order; the `bench` extra) on the real block-0 images as a comparable-work row.
Compilation is excluded (its own column); each call blocks until phi and psi are ready, and
the methods of one input are timed in alternating rounds. Ends with the faster method per block
against `pcjax.nn.wavelets.SPATIAL_MAX_PIXELS`, the threshold of `method="auto"`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from benchmarks import common
from pcjax.nn import filters, wavelets

SPATIAL_BENCH_MAX_PIXELS = 32 * 32  # the dense operator's cost and memory grow as (h w)^2
TIE_MARGIN = 0.10  # methods within this relative margin are a tie
# (h, w, channels) of each block input (docs/spec.md 3.7); block 0 is the real image.
SUITES = {  # name: (inputs, L, standard-filter blocks, batch, blocks run with --quick)
    "CIFAR-10": (
        [(32, 32, 3), (32, 32, 64), (16, 16, 128), (16, 16, 256)] + [(8, 8, 512)] * 2
        + [(4, 4, 512)] * 2, 4, 0, 128, (0, 2, 4, 6),
    ),
    "ImageNet": (
        [(224, 224, 3), (112, 112, 32), (112, 112, 64), (56, 56, 64), (56, 56, 128),
         (28, 28, 256), (28, 28, 512), (14, 14, 512), (14, 14, 512), (7, 7, 512), (6, 6, 512)],
        8, 1, 16, (0, 7, 10),
    ),
}  # fmt: skip
QUICK_BATCH = 8
TIMING = {
    "full": {"rounds": 3, "min_time": 2.0, "min_runs": 6},
    "quick": {"rounds": 2, "min_time": 0.0, "min_runs": 1},
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One block input."""

    suite: str
    block: int
    batch: int
    h: int
    w: int
    channels: int
    mode: str
    num_angles: int

    def input(self, layout: str = "NHWC") -> jax.Array:
        """Random block input: float32 for block 0, complex64 after; NHWC or NCHW (kymatio)."""
        shape = (self.batch, self.h, self.w, self.channels)
        if layout == "NCHW":
            shape = (self.batch, self.channels, self.h, self.w)
        kr, ki = jax.random.split(jax.random.key(self.block))
        x = jax.random.normal(kr, shape, jnp.float32)
        if self.block > 0:
            x = jax.lax.complex(x, jax.random.normal(ki, shape, jnp.float32))
        return jax.block_until_ready(x)


def make_cases(quick: bool) -> list[Case]:
    """Block inputs of both networks (a subset at batch 8 with `quick`)."""
    cases = []
    for suite, (inputs, num_angles, standard, batch, quick_blocks) in SUITES.items():
        modes = filters.block_filter_modes(len(inputs), standard)
        for b, ((h, w, c), mode) in enumerate(zip(inputs, modes, strict=True)):
            if not quick or b in quick_blocks:
                batch_b = QUICK_BATCH if quick else batch
                cases.append(Case(suite, b, batch_b, h, w, c, mode, num_angles))
    return cases


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def kymatio_fn(case: Case):
    """kymatio's JAX `Scattering2D(J=1, max_order=1)` for the case (or None) and a note."""
    try:
        import kymatio
        from kymatio.jax import Scattering2D

        fn = Scattering2D(J=1, shape=(case.h, case.w), L=case.num_angles, max_order=1)
    except Exception as e:  # not installed, or incompatible: a row that says so
        return None, f"kymatio unavailable: {_error(e)}"
    return fn, (
        f"kymatio {kymatio.__version__} Scattering2D(J=1, L={case.num_angles}, max_order=1) "
        "on NCHW: comparable work, not the same operator (own filters and padding; modulus then "
        "a second low-pass; 1+L real maps per channel at h/2)"
    )


def bench_case(case: Case, timing: dict) -> list[dict]:
    """A row per method ("fft", "spatial", and kymatio for real inputs) on one block input."""
    auto = wavelets.choose_method(case.h, case.w, "auto")
    base = dataclasses.asdict(case) | {"auto_picks": auto}
    rows = {m: base | {"method": m, "notes": ""} for m in ("fft", "spatial")}
    x = case.input()
    candidates = {
        m: (functools.partial(wavelets.wavelet_transform, num_angles=case.num_angles,
                              mode=case.mode, method=m), x)
        for m in ("fft", "spatial")
    }  # fmt: skip
    if case.h * case.w > SPATIAL_BENCH_MAX_PIXELS:
        rows["spatial"]["notes"] = "n/a (dense operator too large)"
        del candidates["spatial"]
    if case.block == 0:
        fn, note = kymatio_fn(case)
        rows["kymatio"] = base | {"method": "kymatio", "auto_picks": "-", "notes": note}
        if fn is not None:
            candidates["kymatio"] = (fn, case.input("NCHW"))
    compiled = {}
    for name, (fn, arg) in candidates.items():
        try:
            c, rows[name]["compile_s"] = common.compile_fn(fn, arg)
            jax.block_until_ready(c(arg))  # warm-up, and checks that it runs
            compiled[name] = (c, (arg,))
        except Exception as e:  # a failed row must not stop the benchmark
            rows[name]["notes"] = f"failed: {_error(e)}"
    for name, t in common.time_interleaved(compiled, **timing).items():
        rows[name] |= {"median_ms": t.median_ms, "min_ms": t.min_ms, "runs": t.runs}
        rows[name]["images_per_s"] = case.batch / (t.median_ms / 1e3)
    return list(rows.values())


def results_table(rows: list[dict]) -> str:
    cols = ["suite", "block", "input (b x h x w x c)", "dtype", "mode", "L", "method"]
    cols += ["auto picks", "compile (s)", "ms/batch (median)", "images/s", "notes"]
    cells = []
    for r in rows:
        ms = r.get("median_ms")
        cells.append(
            [r["suite"], r["block"], f"{r['batch']}x{r['h']}x{r['w']}x{r['channels']}",
             "complex64" if r["block"] else "float32", r["mode"], r["num_angles"], r["method"],
             r["auto_picks"], common.fmt(r.get("compile_s"), ".2f"),
             r["notes"] or "n/a" if ms is None else f"{ms:.2f}",
             common.fmt(r.get("images_per_s"), ".0f"), "" if ms is None else r["notes"]]
        )  # fmt: skip
    return common.markdown_table(cols, cells)


def recommendations(rows: list[dict]) -> str:
    """Per block: the faster method, the speed ratio, and whether `auto` agrees."""
    cols = ["suite", "block", "h x w (pixels)", "mode", "fft ms", "spatial ms", "faster"]
    cols += ["fft/spatial (median)", "fft/spatial (min)", "auto picks", "agrees"]
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["suite"], r["block"]), {})[r["method"]] = r
    cells, wins, disagree = [], {"spatial": set(), "fft": set()}, 0
    for methods in by_case.values():
        fft, spatial = methods["fft"], methods["spatial"]
        if "median_ms" not in fft:
            continue
        pixels = fft["h"] * fft["w"]
        ratio = min_ratio = "n/a"
        if "median_ms" not in spatial:
            faster = "fft (spatial not run)"
            wins["fft"].add(pixels)
        else:
            r = fft["median_ms"] / spatial["median_ms"]
            ratio, min_ratio = f"{r:.2f}", f"{fft['min_ms'] / spatial['min_ms']:.2f}"
            faster = f"tie (within {TIE_MARGIN:.0%})" if abs(r - 1) < TIE_MARGIN else None
            if faster is None:
                faster = "spatial" if r > 1 else "fft"
                wins[faster].add(pixels)
        agrees = "yes" if faster.startswith("tie") or faster.startswith(fft["auto_picks"]) else "no"
        disagree += agrees == "no"
        cells.append(
            [fft["suite"], fft["block"], f"{fft['h']}x{fft['w']} ({pixels})", fft["mode"],
             f"{fft['median_ms']:.2f}", common.fmt(spatial.get("median_ms"), ".2f"), faster,
             ratio, min_ratio, fft["auto_picks"], agrees]
        )  # fmt: skip
    threshold = wavelets.SPATIAL_MAX_PIXELS
    last_spatial, first_fft = max(wins["spatial"], default=0), min(wins["fft"], default=None)
    lines = [
        common.markdown_table(cols, cells),
        "",
        f"Spatial was faster at pixel counts {sorted(wins['spatial']) or 'none'}; fft at "
        f"{sorted(wins['fft']) or 'none'} (ties excluded).",
    ]
    if first_fft is not None and last_spatial < first_fft:
        ok = last_spatial <= threshold < first_fft
        lines.append(
            f"Measured crossover: spatial wins up to {last_spatial} pixels, fft from {first_fft}; "
            f"SPATIAL_MAX_PIXELS = {threshold} is {'' if ok else 'in'}consistent with it."
        )
    else:
        lines.append(f"No clean pixel-count crossover; SPATIAL_MAX_PIXELS = {threshold}.")
    lines.append(f"`auto` picks the slower method on {disagree} of the {len(cells)} blocks.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="batch 8, fewer sizes, no file")
    p.add_argument("--out", help="Markdown path (default: docs/benchmarks/wavelets.md)")
    args = p.parse_args(argv)
    timing = TIMING["quick" if args.quick else "full"]
    # Pay JAX's one-time start-up costs before the first timed row.
    jax.block_until_ready(jax.jit(lambda v: jnp.fft.fft2(v * 2))(jnp.ones((4, 4), jnp.complex64)))
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    text = common.header("wavelets") + (
        f"XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`; load average at start {load}.  \n"
        f"Timing: 1 warm-up call, then at least {timing['min_runs']} calls and "
        f"{timing['min_time']} s per method in {timing['rounds']} alternating rounds; median wall "
        "time per batch. Inputs random normal (complex64 from block 1 on); spatial skipped above "
        f"{SPATIAL_BENCH_MAX_PIXELS} pixels. `auto`: spatial iff h*w <= SPATIAL_MAX_PIXELS = "
        f"{wavelets.SPATIAL_MAX_PIXELS}.\n"
    )
    print(text, flush=True)
    rows = []
    for case in make_cases(args.quick):
        rows += bench_case(case, timing)
        print(rows[-1], flush=True)
    text += f"\n## Results\n\n{results_table(rows)}\n\n## fft vs spatial\n\n{recommendations(rows)}"
    print(text)
    if args.out or not args.quick:
        out = args.out or common.DOCS / "wavelets.md"
        common.write_report(out, "Wavelet transform benchmark", text, rows)


if __name__ == "__main__":
    main()
