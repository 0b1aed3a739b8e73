"""Synthetic stand-ins for TFDS's cifar10 and imagenet2012, prepared in any file format.

Real TFDS builders (same names, features, versions and file layout) whose examples are generated
here, so tests and benchmarks read real array_record (or TFRecord) files without the downloads.
`natural_image` draws smooth images that compress like photographs (a noise image would make
JPEGs several times larger and slower to decode than ImageNet's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# ImageNet's training JPEGs average about 400 x 350 pixels (height x width vary widely).
IMAGENET_MEAN_HEIGHT, IMAGENET_MEAN_WIDTH = 350, 400


def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8[height, width, 3]: a bilinearly upsampled 8x8 colour field plus mild pixel noise."""
    coarse = rng.uniform(0, 255, (8, 8, 3))
    rows = np.linspace(0, 7, height)
    cols = np.linspace(0, 7, width)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, 7), np.minimum(c0 + 1, 7)
    fr, fc = (rows - r0)[:, None, None], (cols - c0)[None, :, None]
    top = coarse[r0][:, c0] * (1 - fc) + coarse[r0][:, c1] * fc
    bottom = coarse[r1][:, c0] * (1 - fc) + coarse[r1][:, c1] * fc
    image = top * (1 - fr) + bottom * fr + rng.normal(0, 8, (height, width, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def imagenet_size(rng: np.random.Generator, small: bool = False) -> tuple[int, int]:
    """(height, width) around ImageNet's mean size, or 40..90 pixels when `small` (tests)."""
    if small:
        height, width = rng.integers(40, 90, 2)
        return int(height), int(width)
    height = rng.normal(IMAGENET_MEAN_HEIGHT, 70)
    width = rng.normal(IMAGENET_MEAN_WIDTH, 90)
    return int(np.clip(height, 120, 800)), int(np.clip(width, 120, 800))


def cifar_example(rng: np.random.Generator, i: int, small: bool = False) -> dict[str, Any]:
    """A cifar10 example: a random uint8 32x32 image and label i % 10."""
    del small
    return {"id": f"x{i}", "image": rng.integers(0, 256, (32, 32, 3), np.uint8), "label": i % 10}


def imagenet_example(rng: np.random.Generator, i: int, small: bool = False) -> dict[str, Any]:
    """An imagenet2012 example: a natural-looking image of ImageNet's size range, label i % 7."""
    height, width = imagenet_size(rng, small)
    return {"file_name": f"x{i}.JPEG", "image": natural_image(rng, height, width), "label": i % 7}


EXAMPLES: dict[str, Callable[..., dict[str, Any]]] = {
    "cifar10": cifar_example,
    "imagenet2012": imagenet_example,
}


def prepare(
    name: str,
    data_dir: str,
    splits: Sequence[tuple[str, int]],
    file_format: str = "array_record",
    small: bool = False,
) -> Any:
    """Prepares synthetic `name` in `data_dir` with `splits` [(split, num_examples)]; returns
    the builder. Split i draws its examples from `np.random.default_rng(i)`."""
    import tensorflow_datasets as tfds

    make_example = EXAMPLES[name]

    base = tfds.builder_cls(name)

    class Synthetic(base, skip_registration=True):
        MANUAL_DOWNLOAD_INSTRUCTIONS = "synthetic examples; nothing to download"
        code_path = None  # no checksum files to look up next to the code

        def _split_generators(self, dl_manager):
            return {split: self._examples(seed, n) for seed, (split, n) in enumerate(splits)}

        def _examples(self, seed, n):
            rng = np.random.default_rng(seed)
            for i in range(n):
                yield f"{seed}-{i}", make_example(rng, i, small)

    Synthetic.name = name
    builder = Synthetic(data_dir=data_dir, file_format=file_format)
    manual = tfds.download.DownloadConfig(manual_dir=f"{data_dir}/manual")
    builder.download_and_prepare(download_config=manual)
    return builder
