"""The compile-only report: per-device memory, HBM traffic, time estimates and img/s, as text.

Time per step is the compiler's own estimate where it gives a positive one, else a roofline
estimate from the datasheet (`accelerators.targets.Chip`): max(FLOPs / peak FLOP/s at the model's
matmul precision, bytes accessed / HBM bandwidth). Both ignore the overlap of the gradient
all-reduce with compute, and the input pipeline.
"""

from __future__ import annotations

from collections.abc import Callable

from pcjax.accelerators import targets
from pcjax.accelerators.compile_only import Result, StepReport


def roofline_seconds(report: StepReport, chip: targets.Chip, precision: str) -> tuple[float, float]:
    """(compute-bound, HBM-bound) seconds per step of one device."""
    return report.flops / chip.peak_flops[precision], report.bytes_accessed / chip.hbm_bandwidth


def step_seconds(
    report: StepReport, chip: targets.Chip | None, precision: str
) -> tuple[float | None, str]:
    """(estimated seconds per step or None, which estimate)."""
    if report.compiler_seconds:
        return report.compiler_seconds, "compiler's estimate"
    if chip is None:
        return None, "no datasheet for this device"
    compute, memory = roofline_seconds(report, chip, precision)
    return max(compute, memory), "roofline, " + ("compute" if compute >= memory else "HBM")


def _size(n: float | None) -> str:
    """Bytes in GiB, MiB or KiB, whichever keeps the number at or above 1."""
    if n is None:
        return "?"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3g} ms"


def rows(result: Result) -> list[tuple[str, list[str]]]:
    """(label, one cell per step) rows of the report."""
    setup, precision = result.setup, result.config.model.precision
    chip = setup.chip
    per = "TensorCore" if setup.target and setup.target.devices_per_chip > 1 else "chip"
    out: list[tuple[str, list[str]]] = []

    def row(label: str, cell: Callable[[StepReport], str]) -> None:
        out.append((label, [cell(r) for r in result.reports.values()]))

    usable = targets.usable_bytes(chip) if chip else None

    def share(r: StepReport) -> str:
        return f" ({100 * r.total_bytes / usable:.0f}%)" if chip else ""

    def roofline(r: StepReport) -> str:
        if chip is None:
            return "n/a (no datasheet)"
        compute, memory = roofline_seconds(r, chip, precision)
        return f"{_ms(compute)} / {_ms(memory)}"

    def rate(r: StepReport) -> str:
        seconds, how = step_seconds(r, chip, precision)
        if seconds is None:
            return "n/a"
        return f"{r.per_device_batch / seconds:,.0f} / {r.global_batch / seconds:,.0f} ({how})"

    row(f"global batch / per {per}", lambda r: f"{r.global_batch} / {r.per_device_batch}")
    row(f"HBM per {per}: arguments", lambda r: _size(r.argument_bytes))
    row("outputs (of which donated inputs)", lambda r: f"{_size(r.output_bytes)} "
        f"({_size(r.alias_bytes)})")  # fmt: skip
    row("temporaries", lambda r: _size(r.temp_bytes))
    capacity = f" of {_size(usable)}" if chip else ""
    if chip and usable != chip.hbm_bytes:
        capacity += f" usable ({100 * usable / chip.hbm_bytes:.0f}% of {_size(chip.hbm_bytes)})"
    row(f"total{capacity}", lambda r: _size(r.total_bytes) + share(r))
    row("GFLOP per image", lambda r: f"{r.flops / r.per_device_batch / 1e9:.3g}")
    row("HBM GB accessed per image", lambda r: f"{r.bytes_accessed / r.per_device_batch / 1e9:.3g}")
    row("arithmetic intensity (FLOP/byte)", lambda r: f"{r.flops / max(r.bytes_accessed, 1):.2f}")
    row("compiler's time estimate", lambda r: _ms(r.compiler_seconds) if r.compiler_seconds
        else "none (not positive)")  # fmt: skip
    row("roofline time: compute / HBM", roofline)
    row(f"est. img/s per {per} / per slice", rate)
    if any(r.measured_seconds for r in result.reports.values()):
        row("measured: time per step (img/s per slice)", lambda r: (
            f"{_ms(r.measured_seconds)} ({r.global_batch / r.measured_seconds:,.0f})"
            if r.measured_seconds else "not run"))  # fmt: skip
    row("all-reduced per step (HLO all-reduce results)", lambda r: _size(r.allreduce_bytes))
    row("compile seconds (this machine)", lambda r: f"{r.compile_seconds:.1f}")
    return out


def header(result: Result) -> list[str]:
    """Context lines above the table: model, target, datasheet figures, cost source."""
    setup, precision, chip = result.setup, result.config.model.precision, result.setup.chip
    lines = [
        f"{result.config.model.name} ({result.config.data.name}) on {setup.label}; "
        f"mesh data={setup.mesh.size} over {setup.hosts} process(es)",
        f"parameters {_size(result.param_bytes)} (their float32 gradients are all-reduced every "
        f"step); matmul precision={precision}",
    ]
    if chip is not None:
        how = ""
        if chip.platform == "tpu" and precision == "highest":
            how = " = bf16 peak / 6 (float32 products as six bf16 passes)"
        lines.append(
            f"roofline: peak {chip.peak_flops[precision] / 1e12:.1f} TFLOP/s{how}, "
            f"HBM {chip.hbm_bandwidth / 1e9:,.0f} GB/s, {_size(chip.hbm_bytes)} ({chip.source})"
        )
    lines.append(f"FLOPs and bytes: {next(iter(result.reports.values())).cost_source}")
    return lines


def format_report(result: Result) -> str:
    """The report: context lines, then a markdown table with one column per step."""
    names = list(result.reports)
    lines = header(result) + [
        "",
        "| | " + " | ".join(f"{n} step" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows(result)]
    return "\n".join(lines)
