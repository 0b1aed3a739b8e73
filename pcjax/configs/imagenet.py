"""ImageNet runs: phase-collapse nets (Table 1) and bias-free ResNet-18 baselines (Table 3).

Presets:
  * "<non-linearity>/<block type>" for the 11-block phase-collapse nets (docs/spec.md 3.7, 4.1):
    "mod/rho_psi" and "mod/linear_plus_rho" are the paper's runs; cst/ms/mc/tanh also build.
    Recipe: L = 8, standard filters in block 0 then factorised, widths
    32 64 64 128 256 512 512 512 512 512 256, SGD lr 0.01 momentum 0.9 wd 1e-4, batch 128,
    150 epochs, lr x0.1 every 45 epochs.
  * "resnet18/<non-linearity>", non-linearity in {relu, abs, thresh, tanh, powfixed}
    (docs/spec.md 3.9, 4.2): batch 256, lr 0.1, 90 epochs, lr x0.1 every 30 epochs.
  Append ",smoke" for a 2-step check on tiny widths and 64x64 crops.

    python experiments/imagenet.py --config=pcjax/configs/imagenet.py:mod/rho_psi \
        --config.data.data_dir=/path/to/tensorflow_datasets --workdir=gs://bucket/imagenet-mod-a

Augmentation: RandomResizedCrop(224) + flip; eval resize 256 + centre crop 224; ImageNet
mean/std. Hardware: meant for a TPU/GPU host or pod (batch split over every device; on several
hosts add --distributed).

Expected error (%), `EXPECTED_ERROR` as (top-1, top-5): the paper's Table 1 from the authors'
ICLR 2022 poster for mod/rho_psi (LScat) and mod/linear_plus_rho (LScat + skip); "unknown" for
every other preset (Table 2's ImageNet rows and Table 3 were not retrieved). Table 1's ResNet
column (30.2, 10.9) equals torchvision's ResNet-18 with biases and affine BatchNorm, not the
bias-free resnet18/* baselines here, whose numbers are unknown. Table 1's Scat column (fixed
projections: 73.0, 54.1) has no preset.
"""

import ml_collections

from pcjax.configs import schema
from pcjax.nn import layers, models

# The paper's ImageNet network (docs/spec.md 3.7): channels of its 11 blocks.
WIDTHS = (32, 64, 64, 128, 256, 512, 512, 512, 512, 512, 256)

PHASE_COLLAPSE_PRESETS = tuple(
    f"{rho}/{bt}" for rho in models.TABLE2_NONLINEARITIES for bt in layers.BLOCK_TYPES
)
RESNET_PRESETS = tuple(f"resnet18/{rho}" for rho in models.RESNET_NONLINEARITIES)
PRESETS = PHASE_COLLAPSE_PRESETS + RESNET_PRESETS

_POSTER = "Guth, Zarka, Mallat, ICLR 2022 poster, Table 1"
_KNOWN = {
    "mod/rho_psi": ((35.9, 15.2), f"{_POSTER}, LScat"),
    "mod/linear_plus_rho": ((30.1, 11.0), f"{_POSTER}, LScat + skip"),
}
# preset -> ((top-1 error %, top-5 error %) or None for unknown, source)
EXPECTED_ERROR: dict[str, tuple[tuple[float, float] | None, str]] = {
    p: _KNOWN.get(p, (None, "unknown: not retrieved")) for p in PRESETS
}


def get_config(preset: str = "mod/rho_psi") -> ml_collections.ConfigDict:
    """Presets: see `PRESETS`; a ",smoke" suffix shrinks the run to 2 steps."""
    name, smoke = schema.parse_preset(preset, PRESETS)
    cfg = schema.default_config()
    cfg.data.name = "imagenet2012"
    if name in RESNET_PRESETS:
        cfg.model.update(
            name=name,
            arch="resnet18",
            widths=models.ResNet18.widths,  # ResNet-18's stage widths (docs/spec.md 3.9)
            nonlinearity=name.removeprefix("resnet18/"),
        )
        cfg.data.global_batch_size = 256
        cfg.optim.learning_rate = 0.1
        cfg.optim.num_epochs = 90
        cfg.optim.lr_decay_epochs = 30
    else:
        rho, block_type = name.split("/")
        cfg.model.update(
            name=f"imagenet/{name}",
            arch="phase_collapse",
            widths=WIDTHS,
            nonlinearity=rho,
            block_type=block_type,
            num_angles=8,
            full_angles=False,
            num_standard_blocks=1,
        )
        cfg.data.global_batch_size = 128
        cfg.optim.learning_rate = 0.01
        cfg.optim.num_epochs = 150
        cfg.optim.lr_decay_epochs = 45
    cfg.train.log_every_steps = 100
    cfg.train.checkpoint_every_steps = 5000
    if smoke:
        # Tiny widths; five phase-collapse blocks, as many as 64x64 crops allow.
        cfg.model.widths = (8,) * (4 if name in RESNET_PRESETS else 5)
        cfg.data.image_size = 64
        schema.set_smoke(cfg, global_batch_size=8)
    return cfg
