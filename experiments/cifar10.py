"""CIFAR-10 training of the phase-collapse nets of Tables 1 and 2.

    python experiments/cifar10.py --config=experiments/configs/cifar10.py:cst/linear_plus_rho \
        --workdir=workdirs/cifar-cst-b
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pcjax import train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "configs", "cifar10.py:mod/rho_psi"),
    "Experiment config (file[:preset]).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints, events and config.json go here.", required=True
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    os.environ.get("PCJAX_DISTRIBUTED", "0") == "1",
    "Multi-host job: call jax.distributed.initialize() first (or set PCJAX_DISTRIBUTED=1).",
)


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    result = train.run(_CONFIG.value, _WORKDIR.value, _DISTRIBUTED.value)
    print(f"final eval: {json.dumps(result)}")


if __name__ == "__main__":
    app.run(main)
