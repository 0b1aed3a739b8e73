"""Quick start: a phase-collapse network on scikit-learn's bundled handwritten digits (offline).

    python experiments/quickstart.py --workdir=workdirs/quickstart
    python experiments/quickstart.py --config=pcjax/configs/digits.py:smoke --workdir=/tmp/q

Hardware: 2 CPU cores. The 1,797 8x8 digits are upsampled to 16x16; 1,347 train / 450 test
(fixed stratified split). Three blocks (factorised filters, L = 8, modulus on the wavelet
coefficients, 16 -> 16 -> 8 -> 8) and the reference's optimiser, 15 epochs (315 steps).
Expected: 99.1-99.3% test top-1 in about 1.5 min of training on 2 CPU cores (measured; README.md).
"""

import ml_collections

from pcjax.configs import schema

# Three factorised blocks on 16x16 digits (16 -> 16 -> 8 -> 8), L = 8.
WIDTHS = (32, 64, 64)
PRESETS = ("default",)  # append ",smoke" (or use "smoke") for a few steps on tiny widths


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    """Presets: "default" (the quick start); "default,smoke" or "smoke": a few steps, for tests."""
    cfg = schema.default_config()
    cfg.model.update(
        name="digits/mod/rho_psi",
        arch="phase_collapse",
        widths=WIDTHS,
        nonlinearity="mod",
        block_type="rho_psi",
        num_angles=8,
        full_angles=False,
        num_standard_blocks=0,
    )
    cfg.data.name = "digits"
    cfg.data.global_batch_size = 64
    cfg.data.eval_global_batch_size = 128
    cfg.optim.learning_rate = 0.05
    cfg.optim.num_epochs = 15
    cfg.optim.lr_decay_epochs = 10
    cfg.train.log_every_steps = 20
    cfg.train.checkpoint_every_steps = 100
    _, smoke = schema.parse_preset(preset, PRESETS)
    if smoke:
        cfg.model.widths = (8, 16)
        cfg.train.num_steps = 4
        cfg.train.log_every_steps = 2
        cfg.train.checkpoint_every_steps = 2
    return cfg
