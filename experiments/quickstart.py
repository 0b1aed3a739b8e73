"""Quick start: trains a phase-collapse net on the digits bundled with scikit-learn (offline).

    python experiments/quickstart.py --workdir=workdirs/quickstart

Rerunning the same command resumes from the last checkpoint in the workdir.
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
    os.path.join(os.path.dirname(__file__), "configs", "digits.py"),
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
