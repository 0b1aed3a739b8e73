"""Process set-up shared by the experiment mains and notebooks: join a multi-process job, quiet
Orbax's INFO lines, then `loop.train_and_evaluate`."""

from __future__ import annotations

import logging as std_logging

import jax
import ml_collections
from absl import logging

from pcjax.configs import schema
from pcjax.training.loop import train_and_evaluate


class _QuietOrbax(std_logging.Filter):
    """Drops Orbax's INFO chatter (several lines per save); its warnings still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins a multi-process job: explicit coordinator/count/id, or the cluster's own (SLURM,
    Open MPI, Kubernetes, Cloud TPU) when all three are None."""
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given) and any(v is None for v in given):
        raise schema.ConfigError(
            f"Give all of coordinator_address={coordinator_address!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r}, or none of them "
            "(auto-detection from the cluster)."
        )
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    distributed: bool = False,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> dict[str, float]:
    """Entry point shared by the experiment mains: optional multi-process set-up, then training.

    With `distributed` (or an explicit coordinator), `jax.distributed.initialize` joins the
    other processes; every process then runs this same function.
    """
    # Orbax logs every save step by step at INFO; keep its warnings, drop the chatter.
    logging.get_absl_handler().addFilter(_QuietOrbax())
    if distributed or coordinator_address is not None:
        initialize_distributed(coordinator_address, num_processes, process_id)
    logging.info(
        "process %d/%d, %d local / %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    return train_and_evaluate(config, workdir)
