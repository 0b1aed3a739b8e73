"""CIFAR-10 phase-collapse runs of the reference's run list (REFERENCE.md 3.8, 4.1).

One preset per run: "<non-linearity>/<block type>", non-linearity in {mod, cst, ms, mc, tanh}
(Table 2; `mod` rows are Table 1) and block type in {rho_psi, linear_plus_rho} (the reference's
`skip=True` / `skip=False`). Append ",smoke" for a 2-step check with tiny widths.

    python experiments/cifar10.py --config=pcjax/configs/cifar10.py:mod/linear_plus_rho \
        --workdir=workdirs/cifar10-mod-linear_plus_rho

Recipe: 8 blocks, L = 4, factorised filters from block 0, widths 64 128 256 512 512 512 512 512,
SGD lr 0.01 momentum 0.9 weight decay 1e-4, batch 128, 300 epochs, lr x0.1 every 70 epochs;
flip + pad-4 random crop; ImageNet mean/std. Hardware: the reference used an unknown number of
GPUs; any single modern GPU or TPU host fits batch 128. Expected accuracy: unknown (the paper's
tables could not be retrieved; no number is claimed here).
"""

import ml_collections

from pcjax import config_lib, layers, models

PRESETS = tuple(f"{rho}/{bt}" for rho in models.TABLE2_NONLINEARITIES for bt in layers.BLOCK_TYPES)


def get_config(preset: str = "mod/rho_psi") -> ml_collections.ConfigDict:
    """Presets: see `PRESETS`; a ",smoke" suffix shrinks the run to 2 steps."""
    name, smoke = config_lib.parse_preset(preset, PRESETS)
    cfg = config_lib.default_config()
    cfg.model.name = f"cifar10/{name}"
    cfg.data.name = "cifar10"
    cfg.data.global_batch_size = 128
    cfg.optim.learning_rate = 0.01
    cfg.optim.num_epochs = 300
    cfg.optim.lr_decay_epochs = 70
    cfg.train.checkpoint_every_steps = 2000
    if smoke:
        cfg.model.widths = (8, 8, 8, 8)
        config_lib.set_smoke(cfg, global_batch_size=16)
    return cfg
