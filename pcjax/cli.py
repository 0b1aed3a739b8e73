"""Command-line entry shared by the experiment mains: flags, logging, then `train.run`.

Each main is `cli.main(default_config)`; anything a notebook needs is `pcjax.train.run` or
`pcjax.train.train_and_evaluate`, not this module.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from pcjax import train


def main(default_config: str) -> None:
    """Defines --config (file[:preset]), --workdir and --distributed, trains, prints the eval."""
    config = config_flags.DEFINE_config_file(
        "config", default_config, "Experiment config (file[:preset]).", lock_config=True
    )
    workdir = flags.DEFINE_string(
        "workdir", None, "Checkpoints, events and config.json go here.", required=True
    )
    distributed = flags.DEFINE_bool(
        "distributed",
        os.environ.get("PCJAX_DISTRIBUTED", "0") == "1",
        "Multi-host job: call jax.distributed.initialize() first (or set PCJAX_DISTRIBUTED=1).",
    )

    def run(argv: list[str]) -> None:
        del argv
        logging.set_verbosity(logging.INFO)
        result = train.run(config.value, workdir.value, distributed.value)
        print(f"final eval: {json.dumps(result)}")

    app.run(run)
