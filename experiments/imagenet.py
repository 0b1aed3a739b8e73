"""ImageNet (ILSVRC-2012) training: phase-collapse nets and bias-free ResNet-18 baselines.

    python experiments/imagenet.py --config=pcjax/configs/imagenet.py:mod/rho_psi \
        --workdir=gs://bucket/pc-imagenet-a --config.data.data_dir=/path/to/tfds

ImageNet must be prepared for TFDS beforehand (manual download). See the config for presets.
"""

import os

from pcjax import cli

if __name__ == "__main__":
    cli.main(
        os.path.join(os.path.dirname(__file__), "..", "pcjax", "configs", "imagenet.py:mod/rho_psi")
    )
