"""Experiment configs: the default schema, validation before anything compiles, derived numbers.

Every experiment config (pcjax/configs/*.py) starts from `default_config()`, locked and typed (so
ml_collections refuses a new key or a value of another type), and writes its network and recipe.
`validate(config)` re-checks keys and types, then ranges, names and divisibility, and raises a
`ConfigError` that names the bad value and the valid choices, so a typo costs seconds, not a
compile or a queued pod slot. `build_model(config)` is the one way to build a network.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
from ml_collections import config_dict

from pcjax.data import datasets
from pcjax.nn import complex_ops, filters, layers, models, nonlinear, sampling, wavelets

DATASET_NAMES = datasets.DATASET_NAMES


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, out of range or inconsistent."""


def default_config() -> ml_collections.ConfigDict:
    """The full schema, locked and typed, with CIFAR-10's optimiser and input defaults.

    Holds no network (`model.widths` is empty) until a preset writes the `model` fields; the
    recipe defaults are docs/spec.md 4.1's.
    """
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0

    # The architecture, field by field: each preset (pcjax/configs/<dataset>.py) writes the
    # fields of its network, and each can then be overridden on the command line
    # (--config.model.num_angles=8). The network is built from these fields (`build_model`).
    cfg.model = ml_collections.ConfigDict()
    cfg.model.name = ""  # label of the preset that wrote the fields (not read back)
    cfg.model.arch = "phase_collapse"  # a key of pcjax.nn.models.ARCHS: phase_collapse|resnet18
    cfg.model.widths = ()  # channels per block (phase_collapse) or per stage (resnet18, 4)
    cfg.model.nonlinearity = "mod"  # phase_collapse: mod|cst|ms|mc|tanh|pow; resnet18: relu|...
    # Fields below apply to phase_collapse only.
    cfg.model.block_type = "rho_psi"  # "rho_psi" | "linear_plus_rho" (docs/spec.md 2.5)
    cfg.model.num_angles = 4  # L, wavelet orientations per block (the reference CIFAR-10 L)
    cfg.model.full_angles = False  # orientations over 2 pi and slant 8/L (docs/spec.md 1.3)
    cfg.model.num_standard_blocks = 0  # blocks with the standard bank before factorised ones
    # Initial values of the non-linearity's parameters (None: the paper's: cst threshold 0.1,
    # ms/pow gain 1 and bias 0); allowed only for a non-linearity that has the parameter.
    cfg.model.threshold_init = config_dict.placeholder(float)
    cfg.model.gain_init = config_dict.placeholder(float)
    cfg.model.bias_init = config_dict.placeholder(float)
    cfg.model.learn_nonlinearity = True  # False: the initial values stay fixed
    # "fft" | "spatial" | "matmul" | "pallas" | "auto" (same numbers; auto by size and backend)
    cfg.model.wavelet_method = "auto"
    # Every matmul of the model: "highest" (float32 products on every backend), "default" (the
    # backend's: TF32 on GPUs, one bf16 pass on TPUs) or "bf16" (bf16 operands, float32 sums).
    cfg.model.precision = "highest"
    # Phase-collapse nets: recompute each block in the backward pass (less memory, more FLOPs).
    cfg.model.remat = False

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
    cfg.train.max_checkpoints_to_keep = 3  # the newest k; the best eval top-1 is kept besides
    # Divergence (pcjax.training.health): a step whose loss, gradient norm or parameter norm exceeds
    # spike_factor x its median over the last spike_window healthy steps opens a spike; one
    # lasting spike_patience steps (or any non-finite step) stops the run and sets aside the
    # checkpoints written since it began.
    cfg.train.spike_window = 100
    cfg.train.spike_factor = 10.0
    cfg.train.spike_patience = 10
    cfg.train.profile = False  # capture a profile of a few steps with CLU's Profile hook
    cfg.train.events_dir = ""  # TensorBoard events (written by TensorFlow); "": the workdir
    cfg.lock()  # ml_collections refuses a new key; each field keeps its type (or placeholder's)
    return cfg


NONLINEARITY_PARAMS = ("threshold", "gain", "bias")  # fields `<param>_init` of config.model


def parse_preset(preset: str, presets: tuple[str, ...]) -> tuple[str, bool]:
    """Splits "<name>[,smoke]" into (name, smoke); ValueError lists the valid presets.

    The one preset syntax of every config file (`--config=pcjax/configs/<file>.py:<preset>`);
    "smoke" alone means the first preset, shrunk to a few steps.
    """
    if preset == "smoke":
        preset = f"{presets[0]},smoke"
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


def _check_schema(config: ml_collections.ConfigDict) -> None:
    """Keys and types of `config` against the locked, typed schema, by ml_collections itself.

    Catches what assignment to a locked config cannot: a section replaced or an unlocked config.
    """
    try:
        default_config().update(config.to_dict())
    except (KeyError, AttributeError, TypeError) as error:
        message = error.args[0] if error.args else error
        raise ConfigError(
            f"config does not fit pcjax.configs.schema.default_config: {message}"
        ) from None


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
    _check_schema(config)
    m, d, o, t = config.model, config.data, config.optim, config.train
    _require(config.seed >= 0, f"config.seed={config.seed} must be >= 0.")
    _choice("data.name", d.name, DATASET_NAMES)
    _check_model(m)
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
        "spike_window",
        "spike_patience",
    ):
        value = t[path]
        _require(value is None or value > 0, f"config.train.{path}={value} must be > 0.")
    _require(
        t.spike_factor > 1,
        f"config.train.spike_factor={t.spike_factor} must be > 1 (a huge value turns spike "
        "detection off; non-finite steps still stop the run).",
    )
    if d.image_size is not None:
        _require(d.image_size >= 8, f"config.data.image_size={d.image_size} must be >= 8.")
    _check_geometry(config)


def _check_model(m: ml_collections.ConfigDict) -> None:
    """The architecture fields: names, ranges and the combinations that cannot be built."""
    _choice("model.arch", m.arch, tuple(models.ARCHS))
    _require(
        len(m.widths) > 0 and all(isinstance(w, int) and w > 0 for w in m.widths),
        f"config.model.widths={m.widths!r} must be a non-empty tuple of positive ints.",
    )
    if m.arch == "resnet18":
        _choice("model.nonlinearity", m.nonlinearity, models.RESNET_NONLINEARITIES)
        _require(
            len(m.widths) == 4,
            f"config.model.widths={m.widths!r}: resnet18 has 4 stages, so 4 widths.",
        )
        _require(
            not m.full_angles,
            "config.model.full_angles=True is for phase_collapse nets, not resnet18.",
        )
        _require(not m.remat, "config.model.remat=True is for phase_collapse nets, not resnet18.")
        for p in NONLINEARITY_PARAMS:
            _require(
                m[f"{p}_init"] is None,
                f"config.model.{p}_init={m[f'{p}_init']!r}: resnet18's non-linearities have no "
                "configurable initial value (thresh is fixed at 1, as in the reference).",
            )
        return
    _choice("model.nonlinearity", m.nonlinearity, tuple(nonlinear.COMPLEX_NONLINEARITIES))
    _choice("model.block_type", m.block_type, layers.BLOCK_TYPES)
    _choice("model.wavelet_method", m.wavelet_method, wavelets.METHODS)
    _choice("model.precision", m.precision, complex_ops.PRECISIONS)
    _require(m.num_angles >= 1, f"config.model.num_angles={m.num_angles} must be >= 1.")
    _require(
        0 <= m.num_standard_blocks <= len(m.widths),
        f"config.model.num_standard_blocks={m.num_standard_blocks} must lie in "
        f"[0, len(config.model.widths)={len(m.widths)}].",
    )
    modes = filters.block_filter_modes(len(m.widths), m.num_standard_blocks)
    slant = filters.default_slant(m.num_angles, m.full_angles)
    _require(
        "factorized_odd" not in modes or slant < 2,
        f"config.model.num_angles={m.num_angles} with config.model.full_angles="
        f"{m.full_angles} gives slant {slant:g}; the factorised odd wavelet needs a slant < 2, "
        f"so num_angles > {4 if m.full_angles else 2}.",
    )
    params = nonlinear.COMPLEX_NONLINEARITIES[m.nonlinearity]
    for p in NONLINEARITY_PARAMS:
        value = m[f"{p}_init"]
        if value is None:
            continue
        _require(
            p in params,
            f"config.model.{p}_init={value!r}: config.model.nonlinearity={m.nonlinearity!r} has "
            f"no {p}; non-linearities with one: "
            f"{tuple(n for n, ps in nonlinear.COMPLEX_NONLINEARITIES.items() if p in ps)}.",
        )
        _require(
            p != "threshold" or value >= 0,
            f"config.model.threshold_init={value} must be >= 0.",
        )


def validate_data(config: ml_collections.ConfigDict) -> None:
    """Checks that `config.data` names a prepared dataset (TFDS: array_record); `ConfigError`.

    Looks at the files (`pcjax.data.prepared`, no TensorFlow); the error carries the command that
    prepares the dataset. Separate from `validate`, which needs no data directory.
    """
    from pcjax.data import prepared

    try:
        prepared.check_prepared(datasets.spec(config.data.name), config.data.data_dir)
    except prepared.DataNotPreparedError as error:
        raise ConfigError(f"config.data.name={config.data.name!r}: {error}") from error


def _check_geometry(config: ml_collections.ConfigDict) -> None:
    """Every block of a phase-collapse net must see at least 3x3 pixels (reflect padding)."""
    m = config.model
    if m.arch != "phase_collapse":
        return
    size = config.data.image_size or datasets.DATASETS[config.data.name].image_size
    modes = filters.block_filter_modes(len(m.widths), m.num_standard_blocks)
    for b, mode in enumerate(modes):
        _require(
            size >= 3,
            f"Block {b} of config.model.widths={tuple(m.widths)} would see a {size}x{size} "
            f"input (< 3x3): use fewer blocks (config.model.widths) or larger "
            f"images (config.data.image_size).",
        )
        size = sampling.output_size(size, filters.mode_subsamples(mode))
    _require(size >= 1, f"config.model.widths={tuple(m.widths)} reduces the images to nothing.")


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Constructor arguments of `pcjax.nn.models.ARCHS[config.model.arch]`, all but num_classes."""
    m = config.model
    if m.arch == "resnet18":
        return {"widths": tuple(m.widths), "nonlinearity": m.nonlinearity}
    init = {p: m[f"{p}_init"] for p in NONLINEARITY_PARAMS if m[f"{p}_init"] is not None}
    return {
        "widths": tuple(m.widths),
        "num_angles": m.num_angles,
        "full_angles": m.full_angles,
        "num_standard_blocks": m.num_standard_blocks,
        "block_type": m.block_type,
        "nonlinearity": m.nonlinearity,
        "nonlinearity_init": init or None,
        "learn_nonlinearity": m.learn_nonlinearity,
        "wavelet_method": m.wavelet_method,
        "precision": m.precision,
        "remat": bool(m.remat),
    }


def build_model(
    config: ml_collections.ConfigDict, backend: str | None = None, mesh: Any = None
) -> Any:
    """The network of `config.model` for `config.data`'s classes (validate the config first).

    `backend`: the platform of the devices it will run on, which wavelet_method="auto"
    resolves for (None: the host's default backend). `mesh`: the devices a batch is split
    over, which a kernel XLA cannot partition (`nn.wavelet_kernel`) splits itself over.
    """
    cls = models.ARCHS[config.model.arch]
    kwargs = model_kwargs(config)
    if backend is not None and config.model.arch == "phase_collapse":
        kwargs["backend"] = backend
    if mesh is not None and config.model.arch == "phase_collapse":
        kwargs["mesh"] = mesh
    return cls(num_classes=datasets.DATASETS[config.data.name].num_classes, **kwargs)
