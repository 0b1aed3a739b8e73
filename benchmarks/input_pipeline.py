"""Images/s per host core of the trainer's input pipelines, on synthetic TFDS data.

    python -m benchmarks.input_pipeline          # -> docs/benchmarks/input_pipeline.md
    python -m benchmarks.input_pipeline --quick  # few images, no file

Data: synthetic TFDS cifar10 and imagenet2012 (`tests.support.synthetic_tfds`: the real
builders, array_record files in a temporary directory). ImageNet images are smooth colour fields
with pixel noise, sized around ImageNet's mean 350 x 400 (normal, sd 70 x 90, clipped to
120..800), JPEG-encoded by TFDS. Pipelines: `pcjax.data.input_pipeline.create_train_dataset` and
`create_eval_dataset`, as the trainer builds them for one process.

Images/s per host core = images / CPU seconds of this process (`time.process_time`, all
threads), so the figure does not depend on how many cores the machine lends; wall-clock images/s
is printed too. Each figure is the median of 3 runs (24 ImageNet / 40 CIFAR batches each, after 2
warm-up batches). Host cores to feed one accelerator = an assumed train rate / images/s per core.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from benchmarks import common  # noqa: E402
from pcjax.data import input_pipeline, preprocessing  # noqa: E402
from tests.support import synthetic_tfds  # noqa: E402

# Assumed train-step rates of one accelerator (images/s), for the "cores to feed" table.
# (1) pcjax's ImageNet phase-collapse net: 138 useful GFLOP per image per train step
# (docs/benchmarks/train_step.md) at 50% of a V100's 15.7 fp32 TFLOP/s: 57 img/s.
# (2) A fast-network bound: ResNet-18 on one V100-class GPU in mixed precision, about
# 1,300 img/s (commonly reported; not measured here).
ASSUMED_RATES = {"phase-collapse net on a V100": 57.0, "ResNet-18 on a V100 (AMP)": 1300.0}
REPEATS = 3


def _measure(ds, batch: int, num_batches: int) -> dict:
    """Images per CPU second and per wall second over `num_batches`, after 2 warm-up batches."""
    it = ds.as_numpy_iterator()
    first = next(it)
    next(it)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(num_batches):
        next(it)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    images = num_batches * batch
    image = first["image"]
    return {"per_core": images / cpu, "wall": images / wall, "bytes": image.nbytes / batch,
            "dtype": str(image.dtype)}  # fmt: skip


def run(quick: bool) -> tuple[list[dict], float]:
    """A row per dataset and mode, and the mean size of the synthetic ImageNet JPEGs."""
    sizes = {"imagenet2012": 64 if quick else 256, "cifar10": 512 if quick else 2048}
    batches = {"imagenet2012": 16 if quick else 32, "cifar10": 128 if quick else 256}
    num_batches = {"imagenet2012": 4 if quick else 24, "cifar10": 4 if quick else 40}
    rows = []
    with tempfile.TemporaryDirectory() as data_dir:
        for name, n in sizes.items():
            eval_split = "validation" if name == "imagenet2012" else "test"
            synthetic_tfds.prepare(name, data_dir, [("train", n), (eval_split, n // 2)])
        source = tfds.data_source(
            "imagenet2012", split="train", data_dir=data_dir, download=False,
            decoders={"image": tfds.decode.SkipDecoding()},
        )  # fmt: skip
        jpeg_bytes = float(np.mean([len(source[i]["image"]) for i in range(64)]))
        for name, batch in batches.items():
            size = 224 if name == "imagenet2012" else None
            kwargs = dict(global_batch_size=batch, data_dir=data_dir, image_size=size,
                          process_index=0, process_count=1)  # fmt: skip
            cases = {
                "train": input_pipeline.create_train_dataset(name, seed=0, **kwargs),
                "eval": input_pipeline.create_eval_dataset(name, **kwargs)[0].repeat(),
            }
            for mode, ds in cases.items():
                runs = [_measure(ds, batch, num_batches[name]) for _ in range(REPEATS)]
                median = sorted(runs, key=lambda m: m["per_core"])[REPEATS // 2]
                rows.append({"dataset": name, "mode": mode, "batch": batch} | median)
                print(rows[-1], flush=True)
    return rows, jpeg_bytes


def to_markdown(rows: list[dict], jpeg_bytes: float, seconds: float) -> str:
    cols = ["dataset", "mode", "batch", "img/s/core", "wall img/s", "bytes/image to the device"]
    cells = [
        [r["dataset"], r["mode"], r["batch"], f"{r['per_core']:.0f}", f"{r['wall']:.0f}",
         f"{r['bytes']:.0f} ({r['dtype']})"]
        for r in rows
    ]  # fmt: skip
    feed = [
        [r["dataset"], *(f"{rate / r['per_core']:.2f}" for rate in ASSUMED_RATES.values())]
        for r in rows
        if r["mode"] == "train"
    ]
    return (
        common.header("input_pipeline", ("tensorflow", "tensorflow-datasets"), device=False)
        + f"Run time {seconds:.0f} s. Synthetic ImageNet JPEGs: {jpeg_bytes / 1024:.0f} KiB on "
        "average (real ImageNet: about 110 KiB). Images/s per host core = images / CPU seconds "
        "of the process (all threads); wall images/s depends on the cores free at the time.\n\n"
        + common.markdown_table(cols, cells)
        + "\n\nHost cores to feed one accelerator (assumed train rate, `ASSUMED_RATES`, not "
        "measured here / train img/s/core):\n\n"
        + common.markdown_table(
            ["dataset", *(f"{k} ({v:.0f} img/s)" for k, v in ASSUMED_RATES.items())], feed
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few images, no file")
    parser.add_argument("--out", help="Markdown path (default: docs/benchmarks/input_pipeline.md)")
    args = parser.parse_args()
    preprocessing.hide_accelerators_from_tf()
    start = time.perf_counter()
    rows, jpeg_bytes = run(args.quick)
    text = to_markdown(rows, jpeg_bytes, time.perf_counter() - start)
    print(text)
    if args.out or not args.quick:
        out = args.out or common.DOCS / "input_pipeline.md"
        common.write_report(out, "Input-pipeline benchmark", text, rows)


if __name__ == "__main__":
    main()
