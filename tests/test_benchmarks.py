"""The benchmark package: shared report, per-row process environment, tables, quick modes."""

import csv
import os
import subprocess
import sys

import pytest

from benchmarks import blocks, common, wavelets
from benchmarks import train_step as bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table_rows(text: str, after: str = "") -> list[list[str]]:
    """Cells of the data rows of the first Markdown table after `after`."""
    rows = []
    for line in text.split(after, 1)[1].splitlines() if after else text.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # without the header and the separator


def test_markdown_table_and_report_files(tmp_path):
    table = common.markdown_table(["a", "b"], [[1, "x|y"], [None, 2.5]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x/y |", "| None | 2.5 |"]
    assert common.fmt(None, ".2f") == common.fmt(float("nan"), ".2f") == "n/a"
    common.write_report(tmp_path / "r.md", "Title", "text\n", [{"a": 1}, {"a": 2, "b": 3}])
    assert (tmp_path / "r.md").read_text() == "# Title\n\ntext\n"
    assert (tmp_path / "r.csv").read_text().splitlines() == ["a,b", "1,", "2,3"]


def test_command_is_the_module_invocation(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/x.py", "--rows", "a b"])
    assert common.command("train_step") == "python -m benchmarks.train_step --rows 'a b'"
    assert common.command("blocks", []) == "python -m benchmarks.blocks"


def test_configs_load_by_dataset_and_preset():
    config, shape = common.load_config("cifar10:mod/linear_plus_rho")
    assert (config.model.block_type, shape) == ("linear_plus_rho", (32, 32, 3))
    config, shape = common.load_config("imagenet:mod/rho_psi,smoke")
    assert shape == (64, 64, 3)
    assert common.load_config("digits")[1] == (16, 16, 1)
    for spec, _ in bench.ROWS.values():
        common.load_config(spec)


def test_the_pytorch_side_imports_without_jax():
    """`benchmarks.reference` runs under a Python with torch and maybe no JAX."""
    code = "import sys; sys.modules['jax'] = None; import benchmarks.reference"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_child_environment_adds_and_removes_the_tunable(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=0")
    on = bench.child_environment("hugepages")["GLIBC_TUNABLES"].split(":")
    assert on == ["glibc.malloc.tcache_count=0", "glibc.malloc.hugetlb=1"]
    for setting in ("reuse", "default"):  # reuse is set inside the process (host_memory)
        off = bench.child_environment(setting)["GLIBC_TUNABLES"].split(":")
        assert off == ["glibc.malloc.tcache_count=0"]
    # The reference's process gets the glibc equivalent of benchmarks.host_memory under "reuse".
    ref = bench.child_environment("reuse", reference=True)["GLIBC_TUNABLES"].split(":")
    assert ref == ["glibc.malloc.tcache_count=0", *bench.KEEP_FREED_TUNABLES.split(":")]
    assert "glibc.malloc.arena_max=1" in ref and "glibc.malloc.mmap_max=0" in ref
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert bench.child_environment("hugepages")["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert "GLIBC_TUNABLES" not in bench.child_environment("default")
    assert "GLIBC_TUNABLES" not in bench.child_environment("default", reference=True)
    assert len({table for table, _ in bench.HOST_MEMORY.values()}) == len(bench.HOST_MEMORY)


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


@pytest.mark.slow  # a fresh interpreter touching 256 MiB, as tests/test_host_memory.py's
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


def _result(row: str, train_ips: float, eval_ips: float, train_gflop: float, eval_gflop: float):
    return {
        "row": row,
        "preset": bench.ROWS[row][0],
        "batch": bench.ROWS[row][1],
        "host_memory": "reuse",
        "compile_s": 1.0,
        "train_ips": train_ips,
        "eval_ips": eval_ips,
        "rss_gib": 1.0,
        "device_peak_gib": None,
        "train_gflop_per_img": train_gflop,
        "eval_gflop_per_img": eval_gflop,
        "useful_fwd_proj_gflop_per_img": eval_gflop,
        "train_page_faults_per_step": 0.0,
        "train_sys_s_per_step": 0.0,
    }


def _same_run(result: dict, train_ips: float | None, eval_ips: float) -> dict:
    """`result` with reference figures "measured in the same run"."""
    ref = {"train_ips": train_ips, "eval_ips": eval_ips, "rss_gib": 2.0, "torch": "2", "threads": 2}
    return {**result, "ref": ref}


def test_target_table_compares_each_row_with_the_same_run_reference_and_its_bound(monkeypatch):
    monkeypatch.setattr(common, "machine", lambda device=True: "a machine")
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
    text = bench.report(results, peak, "reuse")
    targets = {r[0]: r for r in _table_rows(text, "Targets")}
    assert targets["cifar_a"].count("yes") == 2
    assert targets["cifar_b"].count("no (target above the bound)") == 2
    assert targets["cifar_a"][2] == f"{2 * a_train:.1f}"
    assert targets["imagenet_b"][1] == "- (reference out of memory)"
    assert targets["imagenet_b"][4:] == [f"{bench.EVAL_TARGET * 0.4:.2f}", "200.0", "no"]
    assert bench.bound_ips(100.0, peak) == 2.0
    # Speed-ups are ratios of this run's figures.
    speed = {r[0]: r for r in _table_rows(text)}
    assert speed["cifar_a"][5] == f"{1.1 * a_train / ref_a_train:.1f}x"
    assert speed["imagenet_b"][4:6] == ["out of memory", "-"]
    row = bench.csv_rows(results, peak)[2]
    assert row["ref_train_ips"] is None and row["matmul_peak_gflops"] == peak
    assert len(row) == len(results[2]) - 1 + 5 + 1  # "ref" flattened into 5 columns, the peak


def test_without_a_same_run_reference_there_is_no_reference_column(monkeypatch):
    monkeypatch.setattr(common, "machine", lambda device=True: "a machine")
    results = [_result("cifar_a", 30.0, 90.0, 1.0, 1.0), _result("cifar_b", 15.0, 45.0, 1.0, 1.0)]
    text = bench.report(results, 200.0, "reuse")
    assert "Targets" not in text and "ref" not in text.split("FLOPs")[0].split("\n\n", 1)[1]
    assert [r[:4] for r in _table_rows(text)] == [
        ["cifar_a", "cifar10:mod/rho_psi", "128", "30.00"],
        ["cifar_b", "cifar10:mod/linear_plus_rho", "128", "15.00"],
    ]
    assert _table_rows(text, "FLOPs")[0][5] == f"{100 * 30 / 200:.0f}%"  # executed / peak
    with pytest.raises(ValueError, match="every row or none"):
        bench.throughput_table([_same_run(results[0], 1.0, 1.0), results[1]])


def test_reference_flags_are_checked_before_anything_is_timed(tmp_path):
    with pytest.raises(SystemExit, match="no main_block.py"):
        bench.check_reference(str(tmp_path), sys.executable)
    (tmp_path / "main_block.py").write_text("")
    missing = str(tmp_path / "no-such-python")
    with pytest.raises(SystemExit, match="--reference-python .*no-such-python"):
        bench.check_reference(str(tmp_path), missing)


@pytest.mark.slow
def test_block_benchmark_times_every_block_and_sums_them():
    rows = blocks.measure_blocks("digits", batch=2, min_runs=1)
    assert [r["block"] for r in rows] == [0, 1, 2]
    # Each block is fed the previous block's output (16 -> 16 -> 8 -> 8 pixels).
    assert [r["input"] for r in rows] == ["16x16x1", "16x16x32c", "8x8x64c"]
    assert [r["output"] for r in rows] == ["16x16x32c", "8x8x64c", "8x8x64c"]
    for r in rows:
        assert 0 < r["fwd_gflop"] < r["fwd_bwd_gflop"]
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
    total = blocks.format_table(rows, peak=100.0).splitlines()[-1]
    assert total.startswith("| all |")
    assert f"| {sum(r['fwd_bwd_ms'] for r in rows):.0f} |" in total
    assert f"| {sum(r['fwd_bwd_gflop'] for r in rows) * 10:.0f} |" in total  # ms at 100 GFLOP/s


def _wavelet_rows(block: int, pixels_side: int, fft_ms: float, spatial_ms: float | None):
    base = {"suite": "S", "block": block, "batch": 1, "h": pixels_side, "w": pixels_side}
    base |= {"channels": 1, "mode": "m", "num_angles": 4, "notes": ""}
    auto = wavelets.wavelets.choose_method(pixels_side, pixels_side, "auto")
    fft = base | {"method": "fft", "auto_picks": auto, "median_ms": fft_ms, "min_ms": fft_ms}
    spatial = base | {"method": "spatial", "auto_picks": auto}
    if spatial_ms is not None:
        spatial |= {"median_ms": spatial_ms, "min_ms": spatial_ms}
    return [fft, spatial]


def test_wavelet_recommendation_checks_the_auto_threshold():
    rows = _wavelet_rows(0, 4, 2.0, 1.0) + _wavelet_rows(1, 16, 1.0, 3.0)
    rows += _wavelet_rows(2, 8, 1.0, 1.05) + _wavelet_rows(3, 64, 1.0, None)
    text = wavelets.recommendations(rows)
    faster = [r[6] for r in _table_rows(text)]
    assert faster == ["spatial", "fft", "tie (within 10%)", "fft (spatial not run)"]
    assert "spatial wins up to 16 pixels, fft from 256" in text
    assert "is consistent" in text and "slower method on 0 of the 4 blocks" in text
    (row,) = _table_rows(wavelets.recommendations(_wavelet_rows(0, 4, 1.0, 2.0)))
    assert (row[6], row[-2], row[-1]) == ("fft", "spatial", "no")  # auto picked the slower one


def _run_module(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout


@pytest.mark.slow
def test_train_step_quick_times_the_trainers_step():
    text = _run_module("benchmarks.train_step", "--quick", "--rows", "cifar_a")
    (row,) = _table_rows(text.split("Command:", 1)[1])
    assert row[:3] == ["cifar_a", "cifar10:mod/rho_psi,smoke", "8"]
    assert float(row[3]) > 0 and float(row[4]) > 0  # train and eval images/s
    assert len(row) == 9  # no reference columns
    (flops,) = _table_rows(text, "FLOPs")
    assert 0 < float(flops[7]) < float(flops[1])  # eval executes fewer FLOPs than training


@pytest.mark.slow
def test_accuracy_quick_table():
    """One row per precision and block, errors at float32 / bf16 round-off."""
    from benchmarks import accuracy

    rows = _table_rows(accuracy.main(["--quick", "--precision", "highest", "bf16"]))
    want = [(p, str(b)) for p in ("highest", "bf16") for b in range(4)]
    assert [(r[0], r[1]) for r in rows] == want
    for r in rows:
        bound = 1e-5 if r[0] == "highest" else 3e-2
        assert 0 < float(r[2]) < bound and 0 < float(r[3]) < bound, r


@pytest.mark.slow
def test_input_pipeline_and_wavelet_quick_modes():
    text = _run_module("benchmarks.input_pipeline", "--quick")
    rows = _table_rows(text.split("Command:", 1)[1])
    assert [(r[0], r[1]) for r in rows] == [
        (d, m) for d in ("imagenet2012", "cifar10") for m in ("train", "eval")
    ]
    assert all(float(r[3]) > 0 and r[5].endswith("(uint8)") for r in rows)
    text = _run_module("benchmarks.wavelets", "--quick")
    assert len(_table_rows(text, "## Results")) == 16
    assert "slower method on" in text


def test_scale_cache_round_trips_and_nocompile_reports_a_miss(tmp_path):
    """docs/scale.csv keeps every compiled figure; --nocompile turns a miss into a table row."""
    from benchmarks import scale
    from pcjax.accelerators import compile_only

    path = str(tmp_path / "scale.csv")
    report = compile_only.StepReport(
        name="train", global_batch=128, per_device_batch=16, argument_bytes=11,
        output_bytes=12, alias_bytes=10, temp_bytes=13, code_bytes=14, flops=1.5e12,
        bytes_accessed=2.5e11, cost_source="compiler", compiler_seconds=None,
        allreduce_bytes=15, compile_seconds=3.25,
    )  # fmt: skip
    cache = scale.CsvCache(path, "v5e-8", "imagenet:mod/rho_psi", fresh=False)
    assert cache.get("k1") is None  # compiling allowed: a miss is None
    cache.put("k1", report)
    cache.put("k2", compile_only.DoesNotFit(20 * 2**30, 16 * 2**30, 256))
    back = cache.get("k1")
    for field in ("per_device_batch", "argument_bytes", "temp_bytes", "flops", "compile_seconds"):
        assert getattr(back, field) == getattr(report, field), field
    oom = cache.get("k2")
    assert isinstance(oom, compile_only.DoesNotFit) and oom.args == (20 * 2**30, 16 * 2**30, 256)
    assert scale.CsvCache(path, "v6e-8", "x", False).get("k1") is None  # per target
    frozen = scale.CsvCache(path, "v5e-8", "x", False, compile_missing=False)
    assert frozen.get("k1").flops == report.flops
    with pytest.raises(scale.NotCompiled):
        frozen.get("k3")


def test_scale_reads_the_largest_batch_off_its_cache(tmp_path, monkeypatch):
    """The table's largest batch is a cached fitting compile next to one at most 1 % larger
    that does not, whatever order they were compiled in; rows compiled from other code (their
    hash not found for this program) are passed over."""
    from benchmarks import scale

    path = str(tmp_path / "scale.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, scale.FIELDS)
        writer.writeheader()
        for batch, fits in [(500, 1), (990, 1), (1000, 0), (980, 1), (989, 0), (700, 1)]:
            writer.writerow({"target": "v5e-8", "key": f"k{batch}", "preset": "p",
                             "per_chip_batch": batch, "fits": fits})  # fmt: skip
    stale = {990}  # compiled from other code: this program's hash is not in the cache

    def fits_function(config, setup, which, cache):
        def fits(b):
            if b in stale:
                raise scale.NotCompiled(b)
            return b in (500, 700, 980), None, None

        return fits

    monkeypatch.setattr(scale.compile_only, "fits_function", fits_function)
    cache = scale.CsvCache(path, "v5e-8", "p", fresh=False, compile_missing=False)
    assert scale._cached_largest(None, None, cache) == 980  # 989 does not fit; 990 is stale
    stale.add(989)
    assert scale._cached_largest(None, None, cache) is None  # no pair within 1 % is left
