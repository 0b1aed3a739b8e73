"""Experiment configs: the default schema, validation before anything compiles, derived numbers.

Every experiment config (experiments/configs/*.py) starts from `default_config()` and changes a
few fields. `validate(config)` re-checks keys, types, ranges, names and divisibility and raises a
`ConfigError` that names the bad value and the valid choices, so a typo costs seconds, not a
compile or a queued pod slot.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
from ml_collections import config_dict

from pcjax import complex_ops, filters, models, wavelets

# Datasets of `pcjax.data.DATASETS`, repeated here so validating a config does not import
# TensorFlow; a test checks the two lists agree.
DATASET_NAMES = ("imagenet2012", "cifar10", "digits", "digits_canvas")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, out of range or inconsistent."""


def default_config() -> ml_collections.ConfigDict:
    """The full schema with CIFAR-10 phase-collapse defaults (REFERENCE.md 4.1)."""
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0

    cfg.model = ml_collections.ConfigDict()
    cfg.model.name = "cifar10/mod/rho_psi"  # a key of pcjax.models.MODELS
    cfg.model.widths = config_dict.placeholder(tuple)  # override the registry's block widths
    cfg.model.wavelet_method = "auto"  # "fft" | "spatial" | "matmul" | "auto" (same numbers)
    # Every matmul of the model: "highest" (float32 products on every backend), "default" (the
    # backend's: TF32 on GPUs, one bf16 pass on TPUs) or "bf16" (bf16 operands, float32 sums).
    cfg.model.precision = "highest"

    cfg.data = ml_collections.ConfigDict()
    cfg.data.name = "cifar10"
    cfg.data.data_dir = config_dict.placeholder(str)  # TFDS data dir (None: TFDS default)
    cfg.data.image_size = config_dict.placeholder(int)  # None: the dataset's own size
    cfg.data.global_batch_size = 128
    cfg.data.eval_global_batch_size = config_dict.placeholder(int)  # None: global_batch_size

    cfg.optim = ml_collections.ConfigDict()
    cfg.optim.learning_rate = 0.01
    cfg.optim.momentum = 0.9
    cfg.optim.nesterov = False
    cfg.optim.weight_decay = 1e-4  # coupled L2 on every parameter, as torch.optim.SGD
    cfg.optim.num_epochs = 300
    cfg.optim.lr_decay_epochs = 70  # lr *= lr_decay_factor every lr_decay_epochs epochs
    cfg.optim.lr_decay_factor = 0.1

    cfg.train = ml_collections.ConfigDict()
    cfg.train.num_steps = config_dict.placeholder(int)  # None: num_epochs * steps_per_epoch
    cfg.train.log_every_steps = 100
    cfg.train.eval_every_steps = config_dict.placeholder(int)  # None: once per epoch
    cfg.train.eval_steps = config_dict.placeholder(int)  # None: the whole eval split (exact)
    cfg.train.checkpoint_every_steps = 1000
    cfg.train.max_checkpoints_to_keep = 3
    cfg.train.profile = False  # capture a profile of a few steps with CLU's Profile hook
    # CPU runs through `pcjax.train.run`: steps run one at a time and reuse the last step's host
    # memory instead of page-faulting fresh memory in (pcjax.host_memory). No effect on GPU/TPU.
    cfg.train.cpu_reuse_step_memory = True
    return cfg


def parse_preset(preset: str, presets: tuple[str, ...]) -> tuple[str, bool]:
    """Splits "<name>[,smoke]" into (name, smoke); ValueError lists the valid presets."""
    name, _, modifier = preset.partition(",")
    if name not in presets or modifier not in ("", "smoke"):
        raise ValueError(
            f"Unknown preset {preset!r}; valid choices: {presets} "
            "(optionally followed by ',smoke')."
        )
    return name, modifier == "smoke"


def set_smoke(cfg: ml_collections.ConfigDict, global_batch_size: int) -> None:
    """Shrinks a run to 2 train steps and 1 eval step, logging and saving at every chance."""
    cfg.data.global_batch_size = global_batch_size
    cfg.train.num_steps = 2
    cfg.train.log_every_steps = 1
    cfg.train.eval_steps = 1
    cfg.train.checkpoint_every_steps = 2


def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _field_type(cfg: ml_collections.ConfigDict, path: str) -> type | None:
    node = cfg
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    ref = node.get_ref(leaf)
    return ref.get_type()


def _check_keys_and_types(config: ml_collections.ConfigDict) -> None:
    schema = default_config()
    have, want = _flatten(config), _flatten(schema)
    unknown = sorted(set(have) - set(want))
    if unknown:
        raise ConfigError(f"Unknown config key(s) {unknown}; valid keys: {sorted(want)}.")
    missing = sorted(set(want) - set(have))
    if missing:
        raise ConfigError(f"Missing config key(s) {missing}.")
    for path, value in have.items():
        expected = _field_type(schema, path)
        if value is None or expected is None:
            continue
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(
                f"config.{path}={value!r} has type {type(value).__name__}; "
                f"expected {expected.__name__}."
            )


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _choice(path: str, value: Any, choices: tuple) -> None:
    _require(value in choices, f"config.{path}={value!r} is not valid; valid choices: {choices}.")


def validate(
    config: ml_collections.ConfigDict, device_count: int = 1, process_count: int = 1
) -> None:
    """Checks a config before anything is built or compiled; raises `ConfigError`.

    Args:
        config: the experiment config.
        device_count: number of devices the batch is split over (all processes).
        process_count: number of processes (hosts) reading input.
    """
    _check_keys_and_types(config)
    m, d, o, t = config.model, config.data, config.optim, config.train
    _choice("model.name", m.name, models.MODEL_NAMES)
    _choice("data.name", d.name, DATASET_NAMES)
    _choice("model.wavelet_method", m.wavelet_method, wavelets.METHODS)
    _choice("model.precision", m.precision, complex_ops.PRECISIONS)
    if m.widths is not None:
        _require(
            len(m.widths) > 0 and all(isinstance(w, int) and w > 0 for w in m.widths),
            f"config.model.widths={m.widths!r} must be a non-empty tuple of positive ints.",
        )
        _require(
            not m.name.startswith("resnet18/"),
            f"config.model.widths is for phase-collapse nets, not {m.name!r}.",
        )
    for path, value in [
        ("data.global_batch_size", d.global_batch_size),
        ("data.eval_global_batch_size", d.eval_global_batch_size),
    ]:
        if value is None:
            continue
        _require(value > 0, f"config.{path}={value} must be positive.")
        for n, what in [(device_count, "device count"), (process_count, "process count")]:
            _require(
                value % n == 0,
                f"config.{path}={value} is not divisible by the {what} {n}; use a multiple "
                f"of {math.lcm(device_count, process_count)}.",
            )
    _require(o.learning_rate > 0, f"config.optim.learning_rate={o.learning_rate} must be > 0.")
    _require(0 <= o.momentum < 1, f"config.optim.momentum={o.momentum} must lie in [0, 1).")
    _require(o.weight_decay >= 0, f"config.optim.weight_decay={o.weight_decay} must be >= 0.")
    _require(o.num_epochs > 0, f"config.optim.num_epochs={o.num_epochs} must be > 0.")
    _require(
        o.lr_decay_epochs > 0, f"config.optim.lr_decay_epochs={o.lr_decay_epochs} must be > 0."
    )
    _require(
        0 < o.lr_decay_factor <= 1,
        f"config.optim.lr_decay_factor={o.lr_decay_factor} must lie in (0, 1].",
    )
    for path in (
        "num_steps",
        "log_every_steps",
        "eval_every_steps",
        "eval_steps",
        "checkpoint_every_steps",
        "max_checkpoints_to_keep",
    ):
        value = t[path]
        _require(value is None or value > 0, f"config.train.{path}={value} must be > 0.")
    if d.image_size is not None:
        _require(d.image_size >= 8, f"config.data.image_size={d.image_size} must be >= 8.")
    _check_geometry(config)


def _check_geometry(config: ml_collections.ConfigDict) -> None:
    """Every block of a phase-collapse net must see at least 3x3 pixels (reflect padding)."""
    spec = models.get_model_spec(config.model.name)
    if spec.module is not models.PhaseCollapseNet:
        return
    kwargs = dict(spec.kwargs)
    widths = config.model.widths or kwargs["widths"]
    size = config.data.image_size or _default_image_size(config.data.name)
    modes = filters.block_filter_modes(len(widths), kwargs["num_standard_blocks"])
    for b, mode in enumerate(modes):
        _require(
            size >= 3,
            f"Block {b} of {config.model.name!r} would see a {size}x{size} "
            f"input (< 3x3): use fewer blocks (config.model.widths) or larger "
            f"images (config.data.image_size).",
        )
        size = wavelets.output_size(size, filters.mode_subsamples(mode))
    _require(size >= 1, f"{config.model.name!r} reduces the images to nothing.")


def _default_image_size(dataset: str) -> int:
    return {"imagenet2012": 224, "cifar10": 32, "digits": 16, "digits_canvas": 32}[dataset]


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Constructor overrides for `pcjax.models.build_model` implied by the config."""
    spec = models.get_model_spec(config.model.name)
    if spec.module is not models.PhaseCollapseNet:
        return {}
    kwargs: dict[str, Any] = {"wavelet_method": config.model.wavelet_method}
    if config.model.widths is not None:
        kwargs["widths"] = tuple(config.model.widths)
    kwargs["precision"] = config.model.precision
    return kwargs
