"""Throughput of the full jitted train step, the eval forward pass and the input pipeline.

    python benchmarks/train_step.py                  # CPU table -> docs/benchmarks/train_step.md
    python benchmarks/train_step.py --quick          # small batches, smoke run
    python benchmarks/train_step.py --rows cifar_b   # one row
    python benchmarks/train_step.py --host-memory hugepages  # or default: see below
    python benchmarks/train_step.py --reference CHECKOUT --reference-python TORCH_PYTHON

Speed-ups (`--reference`): each row is followed by the same row of the authors' PyTorch code
(`benchmarks/reference_step.py`, run by a Python with torch from a local checkout, never
vendored) under the equivalent host-memory setting, and ratios are printed against those
figures only. Without it, the reference columns are absolute figures recorded earlier
(`REFERENCE`), printed with their date and machine and never divided into a ratio: runs of one
setting on one machine moved by up to 38 % between sessions.

Host memory (`--host-memory`): XLA:CPU allocates a step's temporaries afresh on every call
(2.5 GB for the CIFAR variant-B train step), and glibc maps them anew each time, so with 4 KiB
pages the kernel takes about 615,000 page faults per step (docs/benchmarks/README.md, "Host
memory"). `reuse` (the default, as `launch.run` runs on CPU) keeps freed memory mapped
and runs CPU steps synchronously (`pcjax.training.host_memory`), so each step reuses the last one's
pages; `hugepages` runs each row's process with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 instead
(transparent huge pages: about two thousand faults per step); `default` is glibc's default.
Each setting writes its own table.

Each row runs in its own subprocess so its peak RSS is its own. Train rows are the median of
`--steps` timed steps after `WARMUP_STEPS` untimed ones. The train step is exactly
`train.train_step` (forward, loss, backward, SGD with momentum and weight decay, donated
state) on random data; eval is `pcjax.training.train.eval_step`; the input pipeline is
`input_pipeline.create_train_dataset` (CIFAR-10 rows: the digits stream at 32x32 stands in, since
CIFAR-10 cannot be downloaded here; ImageNet rows: synthetic 500x375 JPEGs through the same
preprocessing function, see `_imagenet_input_ips`). FLOPs come
from XLA's cost analysis of the compiled step (as executed), and "useful" FLOPs count each
complex 1x1 projection naively, as 8 real FLOPs per complex multiply-add (4 multiplications,
4 additions), real inputs promoted to complex as the reference does; a train step counts 3x
that (forward, input gradient, weight gradient). The executed count is lower where pcjax does
fewer FLOPs for the same maths (real segments projected with 2 multiplications, not 4).
Also writes the rows as CSV next to the Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # for `timing` when run as a script
from timing import compiled_flops, matmul_peak_gflops  # noqa: E402

# The authors' PyTorch implementation (PhaseCollapse @ 693647f, unmodified), torch 2.13.0 CPU,
# 2 threads, random data, one SGD step as its training loop does (momentum 0.9, weight decay
# 1e-4), models built by its own `main_block` from the command lines of its `run.py`; mean of
# 3 timed steps after a warm-up, one process per row for the peak RSS.
# Measured side by side with this script on this 2-core machine, 2026-11-24/25, under the
# equivalent host-memory setting (keyed by --host-memory): "reuse" ran the reference with
# GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=<SIZE_MAX>:
# glibc.malloc.arena_max=1, the settings `pcjax.training.host_memory.keep_freed_memory` makes (eager
# PyTorch has no asynchronous dispatch to turn off). Allocation speeds the reference up too,
# so each setting has its own figures.
REFERENCE = {
    "reuse": {
        "cifar_b": {"train_ips": 8.46, "eval_ips": 22.39, "rss_gib": 10.75},
        "cifar_a": {"train_ips": 13.85, "eval_ips": 31.95, "rss_gib": 5.85},
        # Its train step was killed for memory on this 24 GiB machine (without the arena
        # setting: freed memory is never returned to the kernel, and its heap outgrew the
        # machine). Peak RSS is the eval's.
        "imagenet_b": {"train_ips": None, "eval_ips": 1.59, "rss_gib": 6.44},
    },
    "hugepages": {
        "cifar_b": {"train_ips": 5.08, "eval_ips": 19.49, "rss_gib": 6.09},
        "cifar_a": {"train_ips": 7.80, "eval_ips": 25.24, "rss_gib": 4.08},
        "imagenet_b": {"train_ips": 0.37, "eval_ips": 0.95, "rss_gib": 12.51},
    },
    "default": {
        "cifar_b": {"train_ips": 3.14, "eval_ips": 12.08, "rss_gib": 6.02},
        "cifar_a": {"train_ips": 4.69, "eval_ips": 15.58, "rss_gib": 4.10},
        "imagenet_b": {"train_ips": 0.18, "eval_ips": 0.88, "rss_gib": 12.45},
    },
}
# When and where REFERENCE was measured: absolute figures, printed as such (a ratio against
# them would mix two sessions of a machine whose speed moves by up to 38 %).
REFERENCE_DATE = "2026-11-24/25"
REFERENCE_MACHINE = "the 2-core development CPU machine"
# The same measurement taken earlier on another 2-core machine of this type (its fp32 matmul
# peak was about 2x this one's), kept for comparison.
REFERENCE_EARLIER = {
    "cifar_b": {"train_ips": 5.7, "eval_ips": 33.4, "rss_gib": 6.2},
    "cifar_a": {"train_ips": 8.0, "eval_ips": 37.0, "rss_gib": 4.2},
    "imagenet_b": {"train_ips": 0.30, "eval_ips": 1.46, "rss_gib": 12.6},
}
# Untimed train steps before the timed ones.
WARMUP_STEPS = 3
# Speed-up targets over the reference timed in the same run.
TRAIN_TARGET, EVAL_TARGET = 4.0, 3.0
# glibc tunables that give the reference's process what `training.host_memory.keep_freed_memory`
# gives pcjax's ("reuse"; eager PyTorch has no asynchronous dispatch to turn off).
KEEP_FREED_TUNABLES = (
    "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615:"
    "glibc.malloc.arena_max=1"
)
ROWS = {
    "cifar_b": ("cifar10/mod/linear_plus_rho", 128),
    "cifar_a": ("cifar10/mod/rho_psi", 128),
    "imagenet_b": ("imagenet/mod/linear_plus_rho", 16),
}


def peak_bound_ips(gflop_per_img: float, peak_gflops: float) -> float:
    """Images/s if every executed FLOP of a step ran at `peak_gflops` (the roofline)."""
    return peak_gflops / gflop_per_img


def _useful_projection_flops(model_name: str, image_shape: tuple[int, int, int]) -> float:
    """Real FLOPs of the complex 1x1 projections per image, counted naively (see module doc)."""
    import jax
    import jax.numpy as jnp

    from pcjax.nn import models

    spec = models.get_model_spec(model_name)
    model = spec.build()
    x = jnp.zeros((1, *image_shape))

    def run(x):
        return model.init_with_output(
            jax.random.key(0),
            x,
            train=False,
            capture_intermediates=True,
            mutable=["params", "batch_stats", "intermediates"],
        )

    _, variables = jax.eval_shape(run, x)
    total = 0.0
    inter = variables["intermediates"]
    for b in range(len(spec.kwargs["widths"])):
        kernel = variables["params"][f"block{b}"]["proj"]["kernel"]
        u = inter[f"block{b}"]["__call__"][0]
        pixels = u.shape[1] * u.shape[2]
        c_in, c_out = kernel.shape[0], kernel.shape[1]
        total += 8.0 * pixels * c_in * c_out
    return total


def _imagenet_input_ips(batch: int, num_images: int = 256) -> float:
    """Host preprocessing rate of the ImageNet train pipeline on synthetic 500x375 JPEGs.

    The real dataset cannot be downloaded here; the JPEGs go through the same per-example
    function (`imagenet_train_preprocess`: crop-window decode, resize, flip, normalise),
    parallel map, batching and prefetch as the TFDS pipeline.
    """
    import numpy as np
    import tensorflow as tf

    from pcjax.data import preprocessing

    rng = np.random.default_rng(0)
    jpegs = [
        tf.io.encode_jpeg(rng.integers(0, 256, (375, 500, 3), np.uint8)).numpy() for _ in range(32)
    ]
    ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().enumerate()
    ds = ds.map(
        lambda i, j: preprocessing.imagenet_train_preprocess(j, tf.stack([i, i + 1])),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    it = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
    next(it)
    n = num_images // batch
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * batch / (time.perf_counter() - t)


def measure(row: str, batch: int, steps: int, host_memory_setting: str) -> dict:
    """Runs in a subprocess: times train, eval and input for one model row."""
    from pcjax.training import host_memory

    # As pcjax.training.launch.run does on CPU, before the backend starts.
    if host_memory_setting == "reuse" and not host_memory.reuse_step_memory():
        raise RuntimeError("--host-memory reuse could not be applied (needs glibc on CPU)")
    import jax
    import numpy as np

    from pcjax.configs import schema
    from pcjax.nn import models
    from pcjax.training import sharding, train

    model_name, _ = ROWS[row]
    spec = models.get_model_spec(model_name)
    model = spec.build()
    cfg = schema.default_config()
    tx = train.create_optimizer(cfg, steps_per_epoch=100)
    lr_fn = train.learning_rate_schedule(cfg, 100)
    mesh = sharding.make_mesh()
    rep, bat = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    state = jax.jit(
        functools.partial(train.create_train_state, model, tx, image_shape=spec.image_shape),
        out_shardings=rep,
    )(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch_np = {
        "image": rng.standard_normal((batch, *spec.image_shape)).astype(np.float32),
        "label": rng.integers(0, spec.kwargs["num_classes"], batch).astype(np.int32),
    }
    data = sharding.shard_batch(batch_np, mesh)

    step = jax.jit(
        functools.partial(train.train_step, learning_rate_fn=lr_fn),
        in_shardings=(rep, bat),
        out_shardings=(rep, rep),
        donate_argnums=0,
    )
    t = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t
    train_flops = compiled_flops(compiled) / batch
    # Warm-up: the first steps also settle the host heap (training.host_memory), which can grow
    # once by a whole temporary buffer before every later step reuses it.
    for _ in range(WARMUP_STEPS):
        state, m = compiled(state, data)
        jax.block_until_ready(m)
    times = []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, data)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    train_s = float(np.median(times))
    after = resource.getrusage(resource.RUSAGE_SELF)
    # Page faults and kernel time show whether the step's temporaries are mapped afresh.
    faults_per_step = (after.ru_minflt - usage.ru_minflt) / steps
    sys_s_per_step = (after.ru_stime - usage.ru_stime) / steps

    ev = jax.jit(train.eval_step, in_shardings=(rep, bat), out_shardings=rep)
    eval_data = {
        **data,
        "mask": sharding.shard_batch({"mask": np.ones(batch, np.float32)}, mesh)["mask"],
    }
    ev_c = ev.lower(state, eval_data).compile()
    eval_flops = compiled_flops(ev_c) / batch
    jax.block_until_ready(ev_c(state, eval_data))
    times = []
    for _ in range(max(steps, 3)):
        t = time.perf_counter()
        jax.block_until_ready(ev_c(state, eval_data))
        times.append(time.perf_counter() - t)
    eval_s = float(np.median(times))

    input_ips = float("nan")
    if row.startswith("imagenet"):
        input_ips = _imagenet_input_ips(batch)
    if row.startswith("cifar"):
        from pcjax.data import input_pipeline

        it = input_pipeline.create_train_dataset(
            "digits", global_batch_size=batch, seed=0, image_size=32
        ).as_numpy_iterator()
        next(it)
        t = time.perf_counter()
        n = 20
        for _ in range(n):
            next(it)
        input_ips = n * batch / (time.perf_counter() - t)

    return {
        "row": row,
        "model": model_name,
        "batch": batch,
        "compile_s": compile_s,
        "train_ips": batch / train_s,
        "eval_ips": batch / eval_s,
        "input_ips": input_ips,
        "train_gflop_per_img": train_flops / 1e9,
        "eval_gflop_per_img": eval_flops / 1e9,
        "useful_fwd_proj_gflop_per_img": _useful_projection_flops(model_name, spec.image_shape)
        / 1e9,
        "train_gflops": train_flops * batch / train_s / 1e9,
        "eval_gflops": eval_flops * batch / eval_s / 1e9,
        "train_page_faults_per_step": faults_per_step,
        "train_sys_s_per_step": sys_s_per_step,
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
    }


HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
# --host-memory settings: the table each writes under docs/benchmarks/, and how it is described.
HOST_MEMORY = {
    "reuse": (
        "train_step.md",
        "freed memory kept mapped and CPU steps run synchronously (pcjax.training.host_memory)",
    ),
    "hugepages": (
        "train_step_hugepages.md",
        f"each row's process ran with GLIBC_TUNABLES={HUGEPAGE_TUNABLE}",
    ),
    "default": ("train_step_default_malloc.md", "glibc's default allocation"),
}


def child_environment(host_memory_setting: str, reference: bool = False) -> dict[str, str]:
    """Environment of a row's process: ours, plus glibc's huge-page tunable for `hugepages`,
    and for the reference's process under `reuse` the tunables of `KEEP_FREED_TUNABLES`.

    glibc reads tunables only at process start, which is one reason rows run in subprocesses.
    Other tunables already set are kept; on other C libraries or with THP disabled in the
    kernel the setting is inert.
    """
    env = dict(os.environ)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    tunables = [t for t in tunables if not t.startswith("glibc.malloc.hugetlb=")]
    if host_memory_setting == "hugepages":
        tunables.append(HUGEPAGE_TUNABLE)
    if host_memory_setting == "reuse" and reference:
        tunables += KEEP_FREED_TUNABLES.split(":")
    if tunables:
        env["GLIBC_TUNABLES"] = ":".join(tunables)
    else:
        env.pop("GLIBC_TUNABLES", None)
    return env


def _run_process(cmd: list[str], env: dict[str, str], what: str) -> dict:
    """Runs `cmd`, returns the JSON of its last stdout line plus its own peak RSS (from wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if returncode != 0:
            raise RuntimeError(f"{what} failed (exit {returncode}):\n{err.read()[-3000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    result["rss_gib"] = usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    return result


def _run_row(row: str, batch: int, steps: int, host_memory_setting: str) -> dict:
    """Measures one pcjax row in a fresh subprocess."""
    cmd = [sys.executable, __file__, "--_child", row, "--batch", str(batch), "--steps", str(steps)]
    cmd += ["--host-memory", host_memory_setting]
    result = _run_process(cmd, child_environment(host_memory_setting), row)
    result["host_memory"] = host_memory_setting
    return result


def _run_reference_row(
    row: str, batch: int, steps: int, host_memory_setting: str, reference: Reference
) -> dict:
    """Measures the same row of the authors' code in a fresh subprocess of `reference.python`."""
    cmd = [reference.python, os.path.join(ROOT, "benchmarks", "reference_step.py")]
    cmd += [reference.checkout, "--row", row, "--batch", str(batch), "--steps", str(steps)]
    cmd += ["--warmup", str(WARMUP_STEPS), "--memory-limit-gib", str(reference.memory_gib)]
    env = child_environment(host_memory_setting, reference=True)
    return _run_process(cmd, env, f"reference {row}")


@dataclasses.dataclass(frozen=True)
class Reference:
    """Where the authors' code is and how to run it (`--reference*` flags)."""

    checkout: str
    python: str
    memory_gib: float


def check_reference(checkout: str, python: str, memory_gib: float) -> Reference:
    """A `Reference`, or SystemExit naming what is missing, before any row is timed."""
    checkout = os.path.abspath(checkout)
    if not os.path.isfile(os.path.join(checkout, "main_block.py")):
        raise SystemExit(
            f"--reference {checkout}: no main_block.py there; pass a checkout of "
            "FlorentinGuth/PhaseCollapse (docs/spec.md 7.1 lists the two fixes it needs)."
        )
    try:
        probe = subprocess.run(
            [python, "-c", "import torch, scipy"], capture_output=True, text=True, check=False
        )
        problem = probe.stderr.strip().splitlines()[-1] if probe.returncode else ""
    except OSError as e:
        problem = str(e)
    if problem:
        raise SystemExit(
            f"--reference-python {python} cannot import torch and scipy ({problem}); "
            "pass a Python that has them."
        )
    return Reference(checkout, python, memory_gib)


def reference_figures(r: dict) -> tuple[dict, bool]:
    """(train/eval img/s and peak RSS of the reference for row `r`, measured in this run?)."""
    if "ref" in r:
        return r["ref"], True
    return REFERENCE[r["host_memory"]][r["row"]], False


def _fmt_ips(x: float | None) -> str:
    return "out of memory" if x is None else f"{x:.2f}"


def _ratio(ours: float, ref: float | None) -> str:
    return "-" if ref is None else f"{ours / ref:.1f}x"


def _throughput_table(results: list[dict]) -> list[str]:
    same_run = [reference_figures(r)[1] for r in results]
    if all(same_run):
        lines = [
            "Throughput. Reference: the authors' code timed in this run, right after each row, "
            "under the equivalent host-memory setting.",
            "",
            "| model | batch | train img/s | ref train | train speed-up | eval img/s | ref eval "
            "| eval speed-up | input img/s | peak RSS GiB | ref RSS GiB | compile s "
            "| page faults / train step | kernel CPU s / train step |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            ref = r["ref"]
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['train_ips']:.2f} | "
                f"{_fmt_ips(ref['train_ips'])} | {_ratio(r['train_ips'], ref['train_ips'])} | "
                f"{r['eval_ips']:.2f} | {_fmt_ips(ref['eval_ips'])} | "
                f"{_ratio(r['eval_ips'], ref['eval_ips'])} | {r['input_ips']:.0f} | "
                f"{r['rss_gib']:.1f} | {ref['rss_gib']:.1f} | {r['compile_s']:.0f} | "
                f"{r['train_page_faults_per_step']:,.0f} | {r['train_sys_s_per_step']:.2f} |"
            )
        return lines
    if any(same_run):
        raise ValueError("Either every row or none has a same-run reference.")
    lines = [
        "Throughput. The reference columns are absolute figures of the authors' code measured "
        f"on {REFERENCE_DATE} ({REFERENCE_MACHINE}) / on an earlier machine of the same type, "
        "not in this run, so no ratio is printed: runs of one setting on this machine moved by "
        "up to 38 % between sessions. `--reference CHECKOUT` times it in the same run.",
        "",
        "| model | batch | train img/s | ref train (absolute) | eval img/s | ref eval (absolute) "
        "| input img/s | peak RSS GiB | ref RSS GiB | compile s "
        "| page faults / train step | kernel CPU s / train step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ref, old = REFERENCE[r["host_memory"]][r["row"]], REFERENCE_EARLIER[r["row"]]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['train_ips']:.2f} | "
            f"{_fmt_ips(ref['train_ips'])} / {old['train_ips']} | "
            f"{r['eval_ips']:.2f} | {ref['eval_ips']} / {old['eval_ips']} | "
            f"{r['input_ips']:.0f} | {r['rss_gib']:.1f} | "
            f"{ref['rss_gib']} / {old['rss_gib']} | {r['compile_s']:.0f} | "
            f"{r['train_page_faults_per_step']:,.0f} | {r['train_sys_s_per_step']:.2f} |"
        )
    return lines


def _target_table(results: list[dict], peak: float) -> list[str]:
    """Speed-up targets over the same-run reference, against each row's matmul-peak bound."""
    if not all(reference_figures(r)[1] for r in results):
        return [
            "No speed-up target is checked: that needs the reference timed in the same run "
            "(`--reference CHECKOUT`)."
        ]
    lines = [
        f"Targets (train {TRAIN_TARGET:g}x, eval {EVAL_TARGET:g}x the reference of this run) "
        "against the bound:",
        "",
        "| model | train target img/s | train bound | train met | eval target img/s "
        "| eval bound | eval met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = []
        for kind, factor in (("train", TRAIN_TARGET), ("eval", EVAL_TARGET)):
            bound = peak_bound_ips(r[f"{kind}_gflop_per_img"], peak)
            ref_ips = r["ref"][f"{kind}_ips"]
            if ref_ips is None:
                cells += ["- (reference out of memory)", f"{bound:.1f}", "-"]
                continue
            target = factor * ref_ips
            met = "yes" if r[f"{kind}_ips"] >= target else "no"
            if met == "no" and bound < target:
                met = "no (target above the bound)"
            cells += [f"{target:.2f}", f"{bound:.1f}", met]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return lines


def _table(results: list[dict], peak: float) -> str:
    lines = [
        *_throughput_table(results),
        "",
        f"FLOPs (fp32 4096x4096 matmul peak measured in the same run: {peak:.0f} GFLOP/s):",
        "",
        "| model | train GFLOP/img executed | useful | train GFLOP/s executed | useful "
        "| % of peak (executed) | train img/s bound | eval GFLOP/img executed | useful "
        "| eval GFLOP/s executed | useful | % of peak (executed) | eval img/s bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        useful = r["useful_fwd_proj_gflop_per_img"]
        lines.append(
            f"| {r['model']} | {r['train_gflop_per_img']:.2f} | {3 * useful:.2f} | "
            f"{r['train_gflops']:.0f} | {3 * useful * r['train_ips']:.0f} | "
            f"{100 * r['train_gflops'] / peak:.0f}% | "
            f"{peak_bound_ips(r['train_gflop_per_img'], peak):.1f} | "
            f"{r['eval_gflop_per_img']:.2f} | "
            f"{useful:.2f} | {r['eval_gflops']:.0f} | {useful * r['eval_ips']:.0f} | "
            f"{100 * r['eval_gflops'] / peak:.0f}% | "
            f"{peak_bound_ips(r['eval_gflop_per_img'], peak):.1f} |"
        )
    lines += [
        "",
        "Executed: XLA's cost analysis of the compiled programs. Useful: the complex 1x1 "
        "projections counted naively (8 real FLOPs per complex multiply-add, real inputs "
        "promoted to complex as in the reference; a train step counts 3x the forward). "
        "Bound: the img/s if every executed FLOP ran at that 4096x4096 matmul rate (smaller "
        "matmuls can run somewhat faster; see docs/benchmarks/README.md).",
        "",
        *_target_table(results, peak),
    ]
    return "\n".join(lines)


def _write_csv(results: list[dict], path: str, peak: float) -> None:
    import csv

    fields = sorted({k for r in results for k in r} - {"ref"})
    extra = [
        "ref_train_ips",
        "ref_eval_ips",
        "ref_rss_gib",
        "ref_same_run",
        "matmul_peak_gflops",
        "train_bound_ips",
        "eval_bound_ips",
    ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*fields, *extra])
        w.writeheader()
        for r in results:
            ref, same_run = reference_figures(r)
            w.writerow(
                {
                    **{k: v for k, v in r.items() if k != "ref"},
                    "ref_train_ips": ref["train_ips"],
                    "ref_eval_ips": ref["eval_ips"],
                    "ref_rss_gib": ref["rss_gib"],
                    "ref_same_run": same_run,
                    "matmul_peak_gflops": peak,
                    "train_bound_ips": peak_bound_ips(r["train_gflop_per_img"], peak),
                    "eval_bound_ips": peak_bound_ips(r["eval_gflop_per_img"], peak),
                }
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--quick", action="store_true", help="batch 8, 2 steps")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--out", help="Markdown table path (default: docs/benchmarks/, named by --host-memory)"
    )
    parser.add_argument("--batch", type=int)
    parser.add_argument(
        "--host-memory",
        choices=list(HOST_MEMORY),
        default="reuse",
        help="how each row's process gets host memory (see the docstring; default: reuse)",
    )
    parser.add_argument(
        "--reference",
        metavar="CHECKOUT",
        help="also time the authors' code from this checkout after each row, and print ratios",
    )
    parser.add_argument(
        "--reference-python",
        default=sys.executable,
        help="a Python with torch and scipy for --reference (default: this one)",
    )
    parser.add_argument(
        "--reference-memory-gib",
        type=float,
        default=0.85 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        help="address-space limit of the reference's process, so that a step that does not "
        "fit fails with an error instead of the machine swapping (default: 85%% of RAM)",
    )
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(measure(args._child, args.batch, args.steps, args.host_memory)))
        return
    reference = None
    if args.reference:
        reference = check_reference(
            args.reference, args.reference_python, args.reference_memory_gib
        )
    import jax

    results = []
    for row in args.rows:
        batch = 8 if args.quick else (args.batch or ROWS[row][1])
        steps = 2 if args.quick else args.steps
        results.append(_run_row(row, batch, steps, args.host_memory))
        if reference is not None:
            results[-1]["ref"] = _run_reference_row(row, batch, steps, args.host_memory, reference)
        print(json.dumps(results[-1]), flush=True)
    peak = matmul_peak_gflops()
    cpu = platform.processor() or platform.machine()
    header = (
        f"Command: `python benchmarks/train_step.py {' '.join(sys.argv[1:])}`  \n"
        f"Date: {datetime.date.today()}; jax {jax.__version__}; device "
        f"{results[0]['device']}; {os.cpu_count()} CPU cores ({cpu}).  \n"
        f"Host memory: {HOST_MEMORY[args.host_memory][1]} (see the script's docstring).\n"
        + (
            "Reference: the authors' PyTorch code from a local checkout, torch "
            f"{results[0]['ref']['torch']} CPU, {results[0]['ref']['threads']} threads, timed in "
            "this run (benchmarks/reference_step.py).\n"
            if reference is not None
            else "Reference: the authors' PyTorch code, torch 2.13 CPU, 2 threads, figures "
            "recorded earlier (see `REFERENCE` in the script for how they were measured).\n"
        )
    )
    table = header + "\n" + _table(results, peak) + "\n"
    print(table)
    if not args.quick:
        out = args.out or os.path.join(ROOT, "docs", "benchmarks", HOST_MEMORY[args.host_memory][0])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            f.write("# Train-step benchmark\n\n" + table)
        _write_csv(results, os.path.splitext(out)[0] + ".csv", peak)


if __name__ == "__main__":
    main()
