"""One process of a multi-process CPU run, for tests/test_input_topology.py.

    python tests/topology_driver.py --process_id=P --num_processes=N --local_devices=D \
        --coordinator=127.0.0.1:PORT --workdir=DIR --num_steps=S [--dump_batches=K]

Joins the other processes with `jax.distributed.initialize` (explicit arguments), writes the
first K global training batches (gathered from every process) to DIR/batches.npz (process 0),
then trains the tiny digits config to step S through `loop.train_and_evaluate`, resuming from
DIR's checkpoint if there is one.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(num_steps: int):
    """Digits at 16x16, a two-block net of widths (8, 8), batch 32; checkpoints every step."""
    from pcjax.configs import digits

    cfg = digits.get_config("smoke")
    cfg.model.widths = (8, 8)
    cfg.data.global_batch_size = 32
    cfg.data.eval_global_batch_size = 64
    cfg.train.num_steps = num_steps
    cfg.train.log_every_steps = 1
    cfg.train.eval_every_steps = 10_000
    cfg.train.eval_steps = 1
    cfg.train.checkpoint_every_steps = 1
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--local_devices", type=int, required=True)
    parser.add_argument("--coordinator", default="")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_steps", type=int, default=0)
    parser.add_argument("--dump_batches", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from tests.support import xla

    os.environ["XLA_FLAGS"] = xla.xla_flags(args.local_devices)
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np

    if args.num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    from jax.experimental import multihost_utils

    from pcjax.training import loop, prefetch, sharding

    config = tiny_config(args.num_steps)
    if args.dump_batches:
        mesh = sharding.make_mesh()
        batches = prefetch.create_train_iterator(config, 0, mesh)
        out = {}
        for step in range(args.dump_batches):
            batch = next(batches)
            for key, value in batch.items():
                out[f"{key}_{step}"] = multihost_utils.process_allgather(value, tiled=True)
        batches.close()
        if jax.process_index() == 0:
            np.savez(os.path.join(args.workdir, "batches.npz"), **out)
    if args.num_steps:
        loop.train_and_evaluate(config, args.workdir)


if __name__ == "__main__":
    main()
