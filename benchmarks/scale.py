"""The paper presets compiled for TPU slices (and H200s) on this machine: docs/scale.md.

    python -m benchmarks.scale                       # every preset x target below
    python -m benchmarks.scale --preset=cifar10:mod/rho_psi --targets=v5e-8,v4-32

For each preset and target: the train step compiled at the paper's global batch (does it fit,
HBM per chip, roofline img/s per chip and per slice, wall time for the paper's epochs, host
cores to feed that rate at the input pipeline's measured img/s per core), and the largest
per-chip batch of that chip generation, found by compiling on the generation's one-host slice
(the per-chip program is the same on every slice of a generation but for its all-reduce).

Every compile is cached in docs/scale.csv under the target and a hash of the lowered program:
a rerun compiles only programs that changed or were not reached (stop it any time, rerun to
resume), and `--fresh` starts over. The markdown is rewritten from the CSV after every row;
`--nocompile` rewrites it from the CSV alone, a row not compiled yet saying so.
"""

from __future__ import annotations

import csv
import datetime
import os
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from benchmarks import common  # noqa: E402
from pcjax.accelerators import batch_search, compile_only, compile_report, targets  # noqa: E402
from pcjax.configs import cifar10, imagenet  # noqa: E402
from pcjax.data import datasets  # noqa: E402

PRESETS = (
    "cifar10:mod/rho_psi",
    "cifar10:mod/linear_plus_rho",
    "imagenet:mod/rho_psi",
    "imagenet:mod/linear_plus_rho",
    "imagenet:resnet18/relu",
)
TARGETS = ("v5e-8", "v5e-256", "v4-32", "v5p-128", "v6e-8", "h200-8")
SEARCH_ON = {"v5e": "v5e-8", "v6e": "v6e-8", "v4": "v4-8", "v5p": "v5p-8", "h200": "h200-8"}
# Training images/s per host core of pcjax's input pipeline (docs/benchmarks/input_pipeline.md).
PIPELINE_PER_CORE = {"cifar10": 6446, "imagenet2012": 385}
# One row per compile. `fits` is the compiler's answer; a GPU row's program is held against the
# usable memory (`targets.usable_bytes`) each time it is read, so it may still not fit.
FIELDS = (
    "target", "key", "preset", "per_chip_batch", "fits", "argument_bytes", "output_bytes",
    "alias_bytes", "temp_bytes", "code_bytes", "flops", "bytes_accessed", "compiler_seconds",
    "allreduce_bytes", "compile_seconds", "required_bytes", "available_bytes", "date",
)  # fmt: skip

_PRESETS = flags.DEFINE_multi_string("preset", list(PRESETS), "FILE:PRESET (repeatable).")
_TARGETS = flags.DEFINE_list("targets", list(TARGETS), "Target names (pcjax.accelerators.targets).")
_LARGEST = flags.DEFINE_bool("largest", True, "Search the largest per-chip batch.")
_FRESH = flags.DEFINE_bool("fresh", False, "Discard the cached compiles.")
_COMPILE = flags.DEFINE_bool("compile", True, "Compile what the cache lacks (else: say so).")
_CSV = flags.DEFINE_string("csv", str(ROOT / "docs" / "scale.csv"), "Compile cache.")
_OUT = flags.DEFINE_string("out", str(ROOT / "docs" / "scale.md"), "Markdown report.")


class NotCompiled(Exception):
    """A program the cache lacks, under --nocompile."""


class CsvCache:
    """compile_only's cache, one CSV row per compiled program and target; with `compile_missing`
    False, a miss raises NotCompiled instead of letting the program be compiled."""

    def __init__(self, path: str, target: str, preset: str, fresh: bool, compile_missing=True):
        self.path, self.target, self.preset = path, target, preset
        self.compile_missing = compile_missing
        if fresh and os.path.exists(path):
            os.remove(path)

    def rows(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def get(self, key: str):
        for row in self.rows():
            if row["target"] == self.target and row["key"] == key:
                return _from_row(row)
        if not self.compile_missing:
            raise NotCompiled(key)
        return None

    def put(self, key: str, value) -> None:
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(_to_row(self.target, key, self.preset, value))


def _to_row(target: str, key: str, preset: str, value) -> dict:
    row = {"target": target, "key": key, "preset": preset, "date": datetime.date.today()}
    if isinstance(value, compile_only.DoesNotFit):
        required, available, batch = value.args
        n = targets.get_target(target).num_devices
        return {**row, "per_chip_batch": batch // n, "fits": 0, "required_bytes": required,
                "available_bytes": available}  # fmt: skip
    return {**row, "per_chip_batch": value.per_device_batch, "fits": 1,
            **{f: getattr(value, f) for f in FIELDS if hasattr(value, f)}}  # fmt: skip


def _num(text: str) -> float | None:
    return float(text) if text not in ("", "None") else None


def _from_row(row: dict):
    n = targets.get_target(row["target"]).num_devices
    batch = int(row["per_chip_batch"])
    if row["fits"] == "0":
        required, available = _num(row["required_bytes"]), _num(row["available_bytes"])
        return compile_only.DoesNotFit(required, available, batch * n)
    ints = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "code_bytes")
    return compile_only.StepReport(
        name="train",
        global_batch=batch * n,
        per_device_batch=batch,
        **{f: int(row[f]) for f in ints},
        flops=float(row["flops"]),
        bytes_accessed=float(row["bytes_accessed"]),
        cost_source="cached",
        compiler_seconds=_num(row["compiler_seconds"]),
        allreduce_bytes=int(row["allreduce_bytes"]),
        compile_seconds=float(row["compile_seconds"]),
    )


def _config(preset: str):
    module, name = preset.split(":", 1)
    return {"cifar10": cifar10, "imagenet": imagenet}[module].get_config(name)


def _setups(cache: dict, name: str) -> compile_only.Setup:
    if name not in cache:
        cache[name] = compile_only.setup_target(name)
    return cache[name]


def measure(preset: str, target_name: str, setups: dict) -> dict:
    """One table row: the paper batch on the target, the generation's largest batch."""
    config = _config(preset)
    target = targets.get_target(target_name)
    paper = config.data.global_batch_size
    row = {"preset": preset, "target": target_name, "paper_batch": paper}
    try:
        if paper % target.num_devices:
            row["fits"] = f"no: {paper} images over {target.num_devices} chips"
        else:
            setup = _setups(setups, target_name)
            cache = CsvCache(_CSV.value, target_name, preset, False, _COMPILE.value)
            try:
                report, _, _ = compile_only.compile_step(config, setup, "train", cache=cache)
                row.update(fits="yes", report=report)
            except compile_only.DoesNotFit as oom:
                row.update(fits="no (out of memory)", required=oom.args[0])
            except NotCompiled:
                row["fits"] = "not compiled yet (rerun without --nocompile)"
        if _LARGEST.value:
            try:
                row["largest"] = _largest(config, preset, target, setups)
            except NotCompiled:
                row["largest"] = "not searched yet"
    except targets.MissingCompiler as error:
        row["fits"] = f"not compiled: {str(error).split('; ')[-1]}"
    return row


def _largest(config, preset: str, target: targets.Target, setups: dict) -> int:
    """The largest per-chip batch on the generation's one-host slice, from the paper's."""
    search = SEARCH_ON[target.chip.generation]
    setup = _setups(setups, search)
    cached = _cached_largest(config, setup, CsvCache(_CSV.value, search, preset, False, False))
    if cached is not None:
        return cached
    cache = CsvCache(_CSV.value, search, preset, False, _COMPILE.value)
    fits = compile_only.fits_function(config, setup, "train", cache)
    start = max(1, config.data.global_batch_size // setup.mesh.size)
    ok, used, available = fits(start)
    capacity = available or targets.usable_bytes(target.chip)
    if ok:
        return batch_search.largest_fitting_batch(fits, capacity, start, used)
    return batch_search.largest_fitting_batch(fits, capacity, hi=start, hi_bytes=used)


def _cached_largest(config, setup, cache: CsvCache) -> int | None:
    """The largest batch read off the cache, whatever path the search that compiled it took: a
    batch that fits next to one at most 1 % larger that does not, both compiled from this code
    (their lowered programs' hashes are in the cache); None if the cache holds no such pair."""
    fits = compile_only.fits_function(config, setup, "train", cache)
    rows = [r for r in cache.rows() if r["target"] == cache.target and r["preset"] == cache.preset]
    batches = {int(r["per_chip_batch"]) for r in rows}
    # Only a batch some compile fitted can be the answer: the others are not lowered again.
    for low in sorted({int(r["per_chip_batch"]) for r in rows if r["fits"] == "1"}, reverse=True):
        above = [b for b in batches if low < b <= low + batch_search.margin(low)]
        if not above:
            continue
        try:
            if fits(low)[0] and any(not fits(b)[0] for b in above):
                return low
        except NotCompiled:  # compiled from other code than this
            continue
    return None


def _duration(hours: float) -> str:
    """Hours to one decimal, or minutes under an hour."""
    return f"{hours:,.1f} h" if hours >= 1 else f"{hours * 60:.0f} min"


def _cells(row: dict) -> list[str]:
    config = _config(row["preset"])
    target = targets.get_target(row["target"])
    chip, report = target.chip, row.get("report")
    cells = [row["preset"], row["target"], str(row["paper_batch"]), row["fits"]]
    if report is None:
        cells += ["n/a"] * 4
    else:
        seconds, _ = compile_report.step_seconds(report, chip, config.model.precision)
        per_slice = report.global_batch / seconds
        epochs = config.optim.num_epochs * datasets.spec(config.data.name).num_train_examples
        hours = epochs / per_slice / 3600
        cores = per_slice / target.hosts / PIPELINE_PER_CORE[config.data.name]
        cells += [
            f"{report.total_bytes / 2**30:.2f} GiB "
            f"({100 * report.total_bytes / targets.usable_bytes(chip):.0f}%)",
            f"{report.per_device_batch / seconds:,.0f} / {per_slice:,.0f}",
            f"{_duration(hours)} ({config.optim.num_epochs} epochs)",
            f"{cores:.1f}",
        ]
    largest = row.get("largest")
    cells.append("not searched (--nolargest)" if largest is None else str(largest))
    return cells


def write_markdown(rows: list[dict], command: str) -> None:
    header = ("preset", "target", "paper global batch", "fits at the paper batch?",
              "HBM per chip (train)", "est. img/s per chip / per slice",
              "est. wall time, paper epochs", "host cores per host to feed it",
              "largest per-chip batch")  # fmt: skip
    lines = [
        "# Paper presets on TPU slices and GPUs, compiled without the devices",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today()}; {common.versions('jax', 'libtpu')}; "
        "compiled on a CPU machine with `--compile_for`'s code (`accelerators.compile_only`).",
        "",
        common.markdown_table(header, [_cells(r) for r in rows]),
        "",
        NOTES,
    ]
    out = Path(_OUT.value)
    # The per-block tables below (benchmarks.scale_blocks) are kept as they are.
    old = out.read_text() if out.exists() else ""
    kept = old[old.index(PER_BLOCK) :] if PER_BLOCK in old else ""
    out.write_text("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))


PER_BLOCK = "## Per block"


NOTES = """Estimated img/s: the compiler's estimate where positive (XLA's TPU estimate is not,
for these train steps), else the roofline max(FLOPs / peak, HBM bytes / bandwidth) per chip from
the datasheet (`accelerators.targets`: fp32 products at precision "highest" taken as six bf16
passes on TPUs, the float32 units on GPUs); no overlap, input or all-reduce time. Wall time: the
paper's epochs over the training set at that rate. Host cores: the slice's rate per host over
the input pipeline's training img/s per core (docs/benchmarks/input_pipeline.md: ImageNet 385,
CIFAR-10 6446). HBM per chip: the compiled program's arguments, outputs and temporaries, as a
share of what one process may use: a TPU's HBM, which its compiler checks; on a GPU, whose
compiler does not, JAX's default memory pool of 75 % of the datasheet's HBM (the share
`XLA_CLIENT_MEM_FRACTION` changes). Largest per-chip batch: a batch that compiles and fits that
memory while one at most 1 % larger does not (compiled memory is not quite monotone in the
batch: the largest such pair among the cached compiles), found by compiling on the generation's
one-host slice (v5e-8, v6e-8, v4-8, v5p-8,
h200-8; the per-chip program differs between slice sizes only in its all-reduce); "not searched
yet" where those compiles have not been run (4 to 9 per cell, each 1 to 30 minutes on a 2-core
machine). v4 and v5p names count TensorCores (two per chip), v5e and v6e names count chips. GPU
rows: the CUDA compiler reports no cost analysis, so XLA's HLO cost analysis counts the FLOPs on
the lowered program and the bytes on the GPU-optimised one; the rates measured on a real H200
("Measured on one H200" below) are the figures to plan with. Every compile is cached in
docs/scale.csv under a hash of its lowered program (less its Pallas kernels' source locations);
`--nocompile` rewrites this table from that cache alone. A Pallas kernel's FLOPs and bytes are
those it declares (its operands and results at their tiled sizes, its padded products)."""


def main(argv: list[str]) -> None:
    del argv
    for name in _TARGETS.value:  # a wrong name: one line with the valid ones, before compiling
        try:
            targets.get_target(name)
        except ValueError as error:
            raise app.UsageError(str(error)) from None
    if _FRESH.value and os.path.exists(_CSV.value):
        os.remove(_CSV.value)
    rows, setups = [], {}
    for preset in _PRESETS.value:
        for target in _TARGETS.value:
            rows.append(measure(preset, target, setups))
            write_markdown(rows, common.command("scale"))
            print(" | ".join(_cells(rows[-1])), flush=True)


if __name__ == "__main__":
    app.run(main)
