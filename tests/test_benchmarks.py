"""The benchmark scripts: per-row process environment, target table, per-block timings."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_benchmark(name: str):
    """A script of benchmarks/ as a module (the directory is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark("train_step")


def test_child_environment_adds_and_removes_the_tunable(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=0")
    on = bench.child_environment("hugepages")["GLIBC_TUNABLES"].split(":")
    assert on == ["glibc.malloc.tcache_count=0", "glibc.malloc.hugetlb=1"]
    for setting in (
        "reuse",
        "default",
    ):  # reuse is set inside the process (pcjax.training.host_memory)
        off = bench.child_environment(setting)["GLIBC_TUNABLES"].split(":")
        assert off == ["glibc.malloc.tcache_count=0"]
    # The reference's process gets the glibc equivalent of pcjax.training.host_memory under "reuse".
    ref = bench.child_environment("reuse", reference=True)["GLIBC_TUNABLES"].split(":")
    assert ref == ["glibc.malloc.tcache_count=0", *bench.KEEP_FREED_TUNABLES.split(":")]
    assert "glibc.malloc.arena_max=1" in ref and "glibc.malloc.mmap_max=0" in ref
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert bench.child_environment("hugepages")["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert "GLIBC_TUNABLES" not in bench.child_environment("default")
    assert "GLIBC_TUNABLES" not in bench.child_environment("default", reference=True)


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unavailable"


# Through libc's malloc as XLA:CPU allocates (NumPy would madvise huge pages by itself).
_TOUCH = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
n = 256 * 2**20
p = libc.malloc(n)  # above glibc's mmap threshold: mapped afresh
ctypes.memset(p, 1, n)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or _thp_mode() not in ("always", "madvise"),
    reason="needs Linux with transparent huge pages enabled or on madvise",
)
def test_hugepage_tunable_cuts_page_faults_of_a_fresh_buffer():
    """256 MiB touched page by page: 65,536 faults with 4 KiB pages, a few hundred with 2 MiB."""

    def faults(setting: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _TOUCH],
            env=bench.child_environment(setting),
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout.strip())

    without, with_thp = faults("default"), faults("hugepages")
    assert without > 60_000
    assert with_thp < without / 20


def test_every_host_memory_setting_has_reference_figures_and_its_own_table():
    assert set(bench.REFERENCE) == set(bench.HOST_MEMORY)
    assert len({table for table, _ in bench.HOST_MEMORY.values()}) == len(bench.HOST_MEMORY)
    for figures in bench.REFERENCE.values():
        assert set(figures) == set(bench.ROWS)
        # None: the reference could not run that row under the setting (out of memory).
        assert all(v is None or v > 0 for row in figures.values() for v in row.values())
        assert all(row["eval_ips"] > 0 and row["rss_gib"] > 0 for row in figures.values())


def _result(row: str, train_ips: float, eval_ips: float, train_gflop: float, eval_gflop: float):
    return {
        "row": row,
        "model": bench.ROWS[row][0],
        "batch": bench.ROWS[row][1],
        "host_memory": "reuse",
        "compile_s": 1.0,
        "train_ips": train_ips,
        "eval_ips": eval_ips,
        "input_ips": 100.0,
        "rss_gib": 1.0,
        "train_gflop_per_img": train_gflop,
        "eval_gflop_per_img": eval_gflop,
        "useful_fwd_proj_gflop_per_img": eval_gflop,
        "train_gflops": train_gflop * train_ips,
        "eval_gflops": eval_gflop * eval_ips,
        "train_page_faults_per_step": 0.0,
        "train_sys_s_per_step": 0.0,
    }


def _same_run(result: dict, train_ips: float | None, eval_ips: float) -> dict:
    """`result` with reference figures "measured in the same run"."""
    return {**result, "ref": {"train_ips": train_ips, "eval_ips": eval_ips, "rss_gib": 2.0}}


def _rows(table: str, section: str) -> dict[str, str]:
    """Lines of the first table after `section` first occurs, keyed by model name."""
    lines = []
    for line in table.split(section, 1)[1].splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
    return {
        line.split(" | ")[0].lstrip("| "): line
        for line in lines
        if line.startswith("| cifar") or line.startswith("| imagenet")
    }


def test_target_table_compares_each_row_with_the_same_run_reference_and_its_bound():
    peak = 200.0
    ref_a_train, ref_a_eval = 3.0, 10.0
    a_train, a_eval = bench.TRAIN_TARGET * ref_a_train, bench.EVAL_TARGET * ref_a_eval
    results = [
        # Beats both targets.
        _same_run(
            _result(
                "cifar_a", 1.1 * a_train, 1.1 * a_eval, peak / (2 * a_train), peak / (2 * a_eval)
            ),
            ref_a_train,
            ref_a_eval,
        ),
        # Misses both; at 100 GFLOP per image even the peak gives 2 img/s, below either target.
        _same_run(_result("cifar_b", 1.0, 1.0, 100.0, 100.0), 1.0, 1.0),
        # Reference train step out of memory; misses eval although the bound is far above it.
        _same_run(_result("imagenet_b", 0.5, 0.5, 1.0, 1.0), None, 0.4),
    ]
    table = bench._table(results, peak)
    rows = _rows(table, "Targets")
    assert rows["cifar10/mod/rho_psi"].count("| yes |") == 2
    assert rows["cifar10/mod/linear_plus_rho"].count("no (target above the bound)") == 2
    assert f"| {2 * a_train:.1f} |" in rows["cifar10/mod/rho_psi"]
    imagenet = rows["imagenet/mod/linear_plus_rho"]
    assert "reference out of memory" in imagenet
    assert imagenet.endswith(f"| {bench.EVAL_TARGET * 0.4:.2f} | 200.0 | no |")
    assert bench.peak_bound_ips(100.0, peak) == 2.0
    # Speed-ups are ratios of this run's figures.
    speed = _rows(table, "Throughput")
    assert f"| {1.1 * a_train / ref_a_train:.1f}x |" in speed["cifar10/mod/rho_psi"]
    assert "| out of memory | - |" in speed["imagenet/mod/linear_plus_rho"]


def test_without_a_same_run_reference_no_ratio_or_target_is_printed():
    results = [_result("cifar_a", 30.0, 90.0, 1.0, 1.0), _result("cifar_b", 15.0, 45.0, 1.0, 1.0)]
    table = bench._table(results, 200.0)
    assert "Targets (" not in table and "No speed-up target is checked" in table
    assert bench.REFERENCE_DATE in table and "--reference CHECKOUT" in table
    rows = _rows(table, "Throughput")
    ref = bench.REFERENCE["reuse"]["cifar_a"]
    assert f"| {ref['eval_ips']} / " in rows["cifar10/mod/rho_psi"]
    assert not any("x |" in line for line in rows.values())
    with pytest.raises(ValueError, match="every row or none"):
        bench._table([_same_run(results[0], 1.0, 1.0), results[1]], 200.0)


def test_reference_flags_are_checked_before_anything_is_timed(tmp_path):
    with pytest.raises(SystemExit, match="no main_block.py"):
        bench.check_reference(str(tmp_path), sys.executable, 8.0)
    (tmp_path / "main_block.py").write_text("")
    missing = str(tmp_path / "no-such-python")
    with pytest.raises(SystemExit, match="--reference-python .*no-such-python"):
        bench.check_reference(str(tmp_path), missing, 8.0)


def test_block_benchmark_times_every_block_and_sums_them():
    blocks = _load_benchmark("blocks")
    rows = blocks.measure_blocks("digits/mod/rho_psi", batch=2, min_runs=1)
    assert [r["block"] for r in rows] == [0, 1, 2]
    # Each block is fed the previous block's output (16 -> 16 -> 8 -> 8 pixels).
    assert [r["input"] for r in rows] == ["16x16x1", "16x16x32c", "8x8x64c"]
    assert [r["output"] for r in rows] == ["16x16x32c", "8x8x64c", "8x8x64c"]
    for r in rows:
        assert 0 < r["fwd_gflop"] < r["fwd_bwd_gflop"]
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
    table = blocks.format_table(rows, peak=100.0)
    total = table.splitlines()[-1]
    assert total.startswith("| all |")
    assert f"| {sum(r['fwd_bwd_ms'] for r in rows):.0f} |" in total
    assert f"| {sum(r['fwd_bwd_gflop'] for r in rows) * 10:.0f} |" in total  # ms at 100 GFLOP/s


@pytest.mark.slow
def test_accelerator_quick_table_on_cpu():
    """`benchmarks/accelerator.py --quick` runs end to end and prints one row per model and
    precision with finite speeds and a one-block error at float32 / bf16 round-off."""
    accel = _load_benchmark("accelerator")
    table = accel.main(["--quick", "--precision", "highest", "bf16", "--repeats", "1"])
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| cifar")]
    assert [(r[0].strip(), r[2].strip()) for r in rows] == [
        (m, p) for m in ("cifar_a", "cifar_b") for p in ("highest", "bf16")
    ]
    for r in rows:
        assert float(r[4]) > 0 and float(r[5]) > 0  # train and eval images/s
        error = float(r[9])
        assert error < (1e-6 if r[2].strip() == "highest" else 1e-2), r


def test_accelerator_peaks_per_device_and_precision():
    accel = _load_benchmark("accelerator")
    assert accel.peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert accel.peak_tflops("TPU v5 lite", "highest") == pytest.approx(197.0 / 6)
    assert accel.peak_tflops("cpu", "highest") is None
