"""CIFAR-10 training of the phase-collapse nets of Tables 1 and 2.

    python experiments/cifar10.py --config=pcjax/configs/cifar10.py:cst/linear_plus_rho \
        --workdir=workdirs/cifar-cst-b
"""

import os

from pcjax import cli

if __name__ == "__main__":
    cli.main(
        os.path.join(os.path.dirname(__file__), "..", "pcjax", "configs", "cifar10.py:mod/rho_psi")
    )
