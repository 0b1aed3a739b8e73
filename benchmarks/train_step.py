"""Images/s of the trainer's own train and eval steps on random data, their FLOPs, host memory.

    python -m benchmarks.train_step                     # -> docs/benchmarks/train_step.md
    python -m benchmarks.train_step --quick             # smoke widths, batch 8, no file
    python -m benchmarks.train_step --rows cifar_b --host-memory hugepages
    python -m benchmarks.train_step --reference CHECKOUT --reference-python TORCH_PYTHON

Each row (`ROWS`) is a preset of `pcjax.configs`, whose programs are those the trainer runs
(`train.build_steps`: forward, loss, backward, SGD with momentum and weight decay, donated state;
eval with running statistics), fed random images of the pipeline's dtype, in a subprocess of its
own so that its peak RSS is its own. Train: median of --steps steps after WARMUP_STEPS; eval:
median of max(--steps, 3) calls. FLOPs "executed": XLA's cost analysis; "useful": the complex
1x1 projections counted naively, 8 real FLOPs per complex multiply-add with real inputs promoted
to complex as the reference does, a train step as 3x the forward; "bound": the img/s if every
executed FLOP ran at the fp32 4096x4096 matmul rate measured in the same run.

`--host-memory` (CPU): `reuse` applies `benchmarks.host_memory` in each row's process;
`hugepages` starts it with GLIBC_TUNABLES=glibc.malloc.hugetlb=1; `default` is glibc's default.
`--reference`: after each row, the same row of the authors' PyTorch code (`benchmarks.reference
step`, under the equivalent glibc setting), and speed-ups against those figures of this run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile

from benchmarks import common

ROWS = {  # name: (dataset:preset, batch); the names are those of authors_code.PAPER_MODELS
    "cifar_b": ("cifar10:mod/linear_plus_rho", 128),
    "cifar_a": ("cifar10:mod/rho_psi", 128),
    "imagenet_b": ("imagenet:mod/linear_plus_rho", 16),
}
WARMUP_STEPS = 3  # untimed train steps; the first ones also settle the host heap
TRAIN_TARGET, EVAL_TARGET = 4.0, 3.0  # speed-up targets over the reference of the same run
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
# What `host_memory.keep_freed_memory` does, as glibc tunables for the reference's process
# (eager PyTorch has no asynchronous dispatch to turn off).
KEEP_FREED_TUNABLES = (
    "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615:"
    "glibc.malloc.arena_max=1"
)
HOST_MEMORY = {  # --host-memory: (table under docs/benchmarks/, description)
    "reuse": ("train_step.md", "freed memory kept mapped, CPU steps synchronous"),
    "hugepages": ("train_step_hugepages.md", f"GLIBC_TUNABLES={HUGEPAGE_TUNABLE}"),
    "default": ("train_step_default_malloc.md", "glibc's default allocation"),
}


def useful_projection_gflop(model, image_shape) -> float:
    """GFLOP per image of the complex 1x1 projections counted naively (NaN for a ResNet)."""
    import jax
    import jax.numpy as jnp

    if not hasattr(model, "block_kwargs"):
        return math.nan

    def run(x):
        return model.init_with_output(
            jax.random.key(0), x, train=False, capture_intermediates=True,
            mutable=["params", "batch_stats", "intermediates"],
        )  # fmt: skip

    _, variables = jax.eval_shape(run, jnp.zeros((1, *image_shape)))
    total = 0.0
    for b in range(len(model.widths)):
        c_in, c_out = variables["params"][f"block{b}"]["proj"]["kernel"].shape[:2]
        u = variables["intermediates"][f"block{b}"]["__call__"][0]
        total += 8.0 * u.shape[1] * u.shape[2] * c_in * c_out
    return total / 1e9


def measure(spec: str, batch: int, steps: int, setting: str, precision: str | None) -> dict:
    """In a row's subprocess: compiles and times the trainer's steps for one preset."""
    from benchmarks import host_memory

    # Before JAX starts its backends; on GPU/TPU there is nothing to apply.
    if setting == "reuse" and host_memory.cpu_only() and not host_memory.reuse_step_memory():
        raise RuntimeError("--host-memory reuse could not be applied (needs glibc)")
    import jax
    import numpy as np

    from pcjax.data import datasets
    from pcjax.training import sharding, train

    config, shape = common.load_config(spec)
    if precision:
        config.model.precision = precision
    mesh = sharding.make_mesh()
    steps_ = train.build_steps(config, mesh, steps_per_epoch=100, image_shape=shape)
    state = steps_.init(jax.random.key(0))
    dataset = datasets.DATASETS[config.data.name]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, *shape), np.uint8)  # as the TFDS pipelines yield
    if not dataset.tfds:  # in-memory sets are standardised on the host
        images = rng.standard_normal((batch, *shape)).astype(np.float32)
    labels = rng.integers(0, dataset.num_classes, batch).astype(np.int32)
    data = sharding.shard_batch({"image": images, "label": labels}, mesh)
    eval_data = sharding.shard_batch(
        {"image": images, "label": labels, "mask": np.ones(batch, np.float32)}, mesh
    )
    train_c, compile_s = common.compile_fn(steps_.train_step, state, data)
    eval_c = steps_.eval_step.lower(state, eval_data).compile()
    holder = [state]

    def train_step():
        holder[0], metrics = train_c(holder[0], data)
        return metrics

    for _ in range(WARMUP_STEPS):
        jax.block_until_ready(train_step())
    before = resource.getrusage(resource.RUSAGE_SELF)
    t_train = common.time_fn(train_step, warmup=0, min_time=0, min_runs=steps, max_runs=steps)
    after = resource.getrusage(resource.RUSAGE_SELF)
    t_eval = common.time_fn(
        lambda: eval_c(holder[0], eval_data), min_time=0, min_runs=max(steps, 3), max_runs=99
    )
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    train_s, eval_s = t_train.median_ms / 1e3, t_eval.median_ms / 1e3
    return {
        "batch": batch,
        "compile_s": compile_s,
        "train_ips": batch / train_s,
        "eval_ips": batch / eval_s,
        # XLA's cost analysis counts one device's share of the partitioned program.
        "train_gflop_per_img": common.compiled_flops(train_c) * mesh.size / batch / 1e9,
        "eval_gflop_per_img": common.compiled_flops(eval_c) * mesh.size / batch / 1e9,
        "useful_fwd_proj_gflop_per_img": useful_projection_gflop(steps_.model, shape),
        # Page faults and kernel time show whether the step's temporaries are mapped afresh.
        "train_page_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
        "train_sys_s_per_step": (after.ru_stime - before.ru_stime) / steps,
        "device_peak_gib": None if peak is None else peak / 2**30,
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
    }


def child_environment(setting: str, reference: bool = False) -> dict[str, str]:
    """Environment of a row's process: ours, plus glibc's huge-page tunable for `hugepages`, and
    for the reference's process under `reuse` the tunables of `KEEP_FREED_TUNABLES`.

    glibc reads tunables only at process start, one reason rows run in subprocesses. Other
    tunables already set are kept; without glibc or with THP off in the kernel they are inert.
    """
    env = dict(os.environ)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    tunables = [t for t in tunables if not t.startswith("glibc.malloc.hugetlb=")]
    if setting == "hugepages":
        tunables.append(HUGEPAGE_TUNABLE)
    if setting == "reuse" and reference:
        tunables += KEEP_FREED_TUNABLES.split(":")
    if tunables:
        env["GLIBC_TUNABLES"] = ":".join(tunables)
    else:
        env.pop("GLIBC_TUNABLES", None)
    return env


def run_process(cmd: list[str], env: dict[str, str], what: str) -> dict:
    """Runs `cmd` from the repository root; the JSON of its last stdout line and its peak RSS."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=common.ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{what} failed:\n{err.read()[-3000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    result["rss_gib"] = usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    return result


def check_reference(checkout: str, python: str) -> str:
    """The checkout's absolute path, or SystemExit naming what is missing, before any timing."""
    checkout = os.path.abspath(checkout)
    if not os.path.isfile(os.path.join(checkout, "main_block.py")):
        raise SystemExit(
            f"--reference {checkout}: no main_block.py there; pass a checkout of "
            "FlorentinGuth/PhaseCollapse (docs/spec.md 7.1 lists the two fixes it needs)."
        )
    try:
        probe = subprocess.run([python, "-c", "import torch, scipy"], capture_output=True)
        problem = probe.returncode and probe.stderr.decode().strip().splitlines()[-1]
    except OSError as e:
        problem = str(e)
    if problem:
        raise SystemExit(f"--reference-python {python} cannot import torch and scipy ({problem}).")
    return checkout


def bound_ips(gflop_per_img: float, peak_gflops: float) -> float:
    """Images/s if every executed FLOP of a step ran at `peak_gflops` (the roofline)."""
    return peak_gflops / gflop_per_img


def throughput_table(results: list[dict]) -> str:
    """Images/s, memory and compile time per row; reference columns only for a same-run one."""
    if len({"ref" in r for r in results}) > 1:
        raise ValueError("Either every row or none has a same-run reference.")
    device = any(r["device_peak_gib"] is not None for r in results)
    rows = []
    for r in results:
        q = r.get("ref")
        c = {"row": r["row"], "preset": r["preset"], "batch": r["batch"]}
        for kind in ("train", "eval"):
            c[f"{kind} img/s"] = f"{r[f'{kind}_ips']:.2f}"
            if q:
                ref = q[f"{kind}_ips"]
                c[f"ref {kind}"] = "out of memory" if ref is None else f"{ref:.2f}"
                c[f"{kind} speed-up"] = "-" if ref is None else f"{r[f'{kind}_ips'] / ref:.1f}x"
        c["peak RSS GiB"] = f"{r['rss_gib']:.1f}"
        if q:
            c["ref RSS GiB"] = f"{q['rss_gib']:.1f}"
        if device:
            c["device peak GiB"] = common.fmt(r["device_peak_gib"], ".2f")
        c["compile s"] = f"{r['compile_s']:.0f}"
        c["page faults / train step"] = f"{r['train_page_faults_per_step']:,.0f}"
        c["kernel CPU s / train step"] = f"{r['train_sys_s_per_step']:.2f}"
        rows.append(c)
    return common.markdown_table(list(rows[0]), [list(c.values()) for c in rows])


def flops_table(results: list[dict], peak: float) -> str:
    """Executed and useful FLOPs, achieved rate and the bound, for training and eval."""
    cols = ["row"]
    for kind in ("train", "eval"):
        cols += [f"{kind} GFLOP/img executed", "useful", f"{kind} GFLOP/s executed", "useful"]
        cols += ["% of peak (executed)", f"{kind} img/s bound"]
    rows = []
    for r in results:
        cells = [r["row"]]
        for kind, factor in (("train", 3), ("eval", 1)):
            executed, ips = r[f"{kind}_gflop_per_img"], r[f"{kind}_ips"]
            useful = factor * r["useful_fwd_proj_gflop_per_img"]
            cells += [f"{executed:.2f}", common.fmt(useful, ".2f"), f"{executed * ips:.0f}"]
            cells += [common.fmt(useful * ips, ".0f"), f"{100 * executed * ips / peak:.0f}%"]
            cells.append(f"{bound_ips(executed, peak):.1f}")
        rows.append(cells)
    return common.markdown_table(cols, rows)


def target_table(results: list[dict], peak: float) -> str:
    """Speed-up targets over the same-run reference, next to each row's bound."""
    cols = ["row", "train target img/s", "train bound", "train met"]
    cols += ["eval target img/s", "eval bound", "eval met"]
    rows = []
    for r in results:
        cells = [r["row"]]
        for kind, factor in (("train", TRAIN_TARGET), ("eval", EVAL_TARGET)):
            bound, ref_ips = bound_ips(r[f"{kind}_gflop_per_img"], peak), r["ref"][f"{kind}_ips"]
            if ref_ips is None:
                cells += ["- (reference out of memory)", f"{bound:.1f}", "-"]
                continue
            target = factor * ref_ips
            met = "yes" if r[f"{kind}_ips"] >= target else "no"
            met += " (target above the bound)" if met == "no" and bound < target else ""
            cells += [f"{target:.2f}", f"{bound:.1f}", met]
        rows.append(cells)
    return common.markdown_table(cols, rows)


def report(results: list[dict], peak: float, setting: str, peak_n: int = 4096) -> str:
    """The tables under the common header; `peak` is the fp32 `peak_n`-square matmul's rate."""
    ref = results[0].get("ref")
    text = common.header("train_step") + f"Host memory: {HOST_MEMORY[setting][1]}.  \n"
    text += (
        f"Reference: the authors' PyTorch code, torch {ref['torch']}, {ref['threads']} threads, "
        "timed in this run after each row (`benchmarks.reference step`).\n"
        if ref
        else "No reference: `--reference CHECKOUT` times the authors' code in the same run.\n"
    )
    text += "\n" + throughput_table(results) + "\n\n"
    text += (
        f"FLOPs (fp32 {peak_n}x{peak_n} matmul peak measured in the same run: "
        f"{peak:.0f} GFLOP/s):\n\n"
    )
    text += flops_table(results, peak) + "\n\n"
    text += (
        "Executed: XLA's cost analysis of the compiled programs. Useful: the complex 1x1 "
        "projections counted naively (see the module's docstring). Bound: the img/s if every "
        "executed FLOP ran at that matmul rate.\n"
    )
    if ref:
        text += f"\nTargets (train {TRAIN_TARGET:g}x, eval {EVAL_TARGET:g}x the reference):\n\n"
        text += target_table(results, peak) + "\n"
    return text


def csv_rows(results: list[dict], peak: float) -> list[dict]:
    """The results flat (the reference's figures as ref_*), with the peak of the run."""
    flat = [{k: v for k, v in r.items() if k != "ref"} for r in results]
    return [f | {f"ref_{k}": v for k, v in r.get("ref", {}).items()} | {"matmul_peak_gflops": peak}
            for f, r in zip(flat, results, strict=True)]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--quick", action="store_true", help="smoke widths, batch 8, 2 steps, no file")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, help="default: each row's")
    p.add_argument("--precision", help="model.precision (default: the preset's)")
    p.add_argument("--host-memory", choices=list(HOST_MEMORY), default="reuse")
    p.add_argument("--out", help="Markdown path (default: docs/benchmarks/, by --host-memory)")
    p.add_argument("--reference", metavar="CHECKOUT", help="also time the authors' code")
    p.add_argument("--reference-python", default=sys.executable, help="a Python with torch")
    p.add_argument(
        "--reference-memory-gib",
        type=float,
        default=0.85 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        help="address-space limit of the reference's process (default: 85%% of RAM)",
    )
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        result = measure(args._child, args.batch, args.steps, args.host_memory, args.precision)
        print(json.dumps(result))
        return
    if args.quick and args.reference:
        p.error("--quick times smoke-sized networks, which the reference has not")
    checkout = args.reference and check_reference(args.reference, args.reference_python)
    steps = 2 if args.quick else args.steps
    results = []
    for row in args.rows:
        spec, batch = ROWS[row]
        spec, batch = (spec + ",smoke", 8) if args.quick else (spec, args.batch or batch)
        cmd = [sys.executable, "-m", "benchmarks.train_step", "--_child", spec]
        cmd += ["--batch", str(batch), "--steps", str(steps), "--host-memory", args.host_memory]
        cmd += ["--precision", args.precision] if args.precision else []
        result = run_process(cmd, child_environment(args.host_memory), row)
        result |= {"row": row, "preset": spec, "host_memory": args.host_memory}
        if checkout:
            cmd = [args.reference_python, "-m", "benchmarks.reference", "step", checkout]
            cmd += ["--row", row, "--batch", str(batch), "--steps", str(steps)]
            cmd += ["--warmup", str(WARMUP_STEPS)]
            cmd += ["--memory-limit-gib", str(args.reference_memory_gib)]
            env = child_environment(args.host_memory, reference=True)
            result["ref"] = run_process(cmd, env, f"reference {row}")
        print(json.dumps(result), flush=True)
        results.append(result)
    peak_n = 1024 if args.quick else 4096  # --quick: a smoke run, not a figure to keep
    peak = common.matmul_peak_gflops(peak_n)
    text = report(results, peak, args.host_memory, peak_n)
    print(text)
    if not args.quick:
        out = args.out or common.DOCS / HOST_MEMORY[args.host_memory][0]
        common.write_report(out, "Train-step benchmark", text, csv_rows(results, peak))


if __name__ == "__main__":
    main()
