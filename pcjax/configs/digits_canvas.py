"""Class-separation experiment: phase-collapse nets on digits pasted on 32x32 canvases (offline).

    python experiments/separation.py --workdir=workdirs/separation
    python experiments/separation.py --workdir=/tmp/s --nonlinearities=mod,cst \
        --config=pcjax/configs/digits_canvas.py:smoke

Hardware: 2 CPU cores. scikit-learn's 1,797 8x8 digits, upsampled to 16x16 and pasted at a
random position (fixed per example) of a blank 32x32 canvas; 1,347 train / 450 test (the
stratified split of the "digits" quick start). Four factorised blocks (L = 8,
32 -> 32 -> 16 -> 16 -> 8), widths (16, 32, 32, 64), the reference's optimiser (SGD, lr 0.01,
momentum 0.9, weight decay 1e-4, step decay), 5 epochs, no augmentation. Every non-linearity
trains the same architecture with the same recipe. The separation study overrides the widths,
canvas size and learning rate (grid on a validation split); its exact command, budget and results:
docs/separation/README.md.
"""

import ml_collections

from pcjax.configs import digits, schema

# Four factorised blocks on 32x32 canvases (32 -> 32 -> 16 -> 16 -> 8), L = 8; narrow enough
# for 5 runs on 2 CPU cores.
WIDTHS = (16, 32, 32, 64)
PRESETS = ("default",)  # append ",smoke" (or use "smoke") for tiny widths and a few steps


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    """Presets: "default" (the experiment); "smoke": tiny widths, a few steps, for tests.

    `model.name` is "digits_canvas/mod/rho_psi"; experiments/separation.py replaces the
    non-linearity (and block type) before training each network.
    """
    cfg = digits.get_config()  # the quick start's network, four blocks wide for the canvases
    cfg.model.update(name="digits_canvas/mod/rho_psi", widths=WIDTHS)
    cfg.data.name = "digits_canvas"
    # The reference's CIFAR-10 value (the separation study chooses its own on validation data).
    cfg.optim.learning_rate = 0.01
    cfg.optim.num_epochs = 5
    cfg.optim.lr_decay_epochs = 4
    cfg.train.log_every_steps = 21
    cfg.train.checkpoint_every_steps = 105
    cfg.train.max_checkpoints_to_keep = 1
    _, smoke = schema.parse_preset(preset, PRESETS)
    if smoke:
        cfg.model.widths = (4, 8)
        cfg.data.global_batch_size = 32
        cfg.train.num_steps = 3
        cfg.train.log_every_steps = 3
        cfg.train.checkpoint_every_steps = 3
    return cfg
