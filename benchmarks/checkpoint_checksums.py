"""Cost of the per-array checksums of a checkpoint, for the ImageNet preset's train state.

    JAX_PLATFORMS=cpu python -m benchmarks.checkpoint_checksums [--preset=mod/rho_psi] [--dir=/tmp]
    JAX_PLATFORMS=cpu python -m benchmarks.checkpoint_checksums --preset=mod/rho_psi,smoke

Builds the state's shapes with jax.eval_shape (no training), fills them with random numbers,
then times, best of --repeats: the checksums alone; a save (until written) with and without
them; a restore with and without verifying them. Prints one Markdown table row per quantity.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp

from benchmarks import common
from pcjax.training import checkpoint, checksums, sharding, train


def _state(preset: str):
    cfg, shape = common.load_config(f"imagenet:{preset}")
    steps = train.build_steps(cfg, sharding.make_mesh(), 1000, shape)  # the trainer's state
    abstract = jax.eval_shape(steps.init, jax.random.key(0))
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: jax.numpy.asarray(rng.standard_normal(s.shape).astype(s.dtype)), abstract
    )


def _best(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of `fn` (which waits for its own work)."""
    t = common.time_fn(fn, warmup=0, min_time=0, min_runs=repeats, max_runs=repeats, sync=id)
    return t.min_ms / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mod/rho_psi")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    state = _state(args.preset)
    arrays = {"params": state.params, "batch_stats": state.batch_stats, "opt": state.opt_state}
    size = checkpoint.state_bytes(arrays)
    root = tempfile.mkdtemp(dir=args.dir)
    try:
        rows = [
            (
                "checksums of the state (on the device)",
                _best(lambda: checksums.manifest(arrays), args.repeats),
            )
        ]
        for name, with_sums in (("save, plain", False), ("save, with checksums", True)):

            def save(with_sums=with_sums):
                path = os.path.join(root, "ckpt")
                shutil.rmtree(path, ignore_errors=True)
                items = {"state": ocp.args.StandardSave(arrays)}
                if with_sums:
                    items["checksums"] = ocp.args.JsonSave(checksums.manifest(arrays))
                with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
                    c.save(path, ocp.args.Composite(**items))

            rows.append((name, _best(save, args.repeats)))
        save()  # leaves a checkpoint with checksums
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, arrays)
        for name, verify in (("restore, plain", False), ("restore, verifying", True)):

            def restore(verify=verify):
                items = {"state": ocp.args.StandardRestore(abstract)}
                if verify:
                    items["checksums"] = ocp.args.JsonRestore()
                with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
                    out = c.restore(os.path.join(root, "ckpt"), ocp.args.Composite(**items))
                if verify:
                    checksums.verify(out["state"], out["checksums"])

            rows.append((name, _best(restore, args.repeats)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    leaves = len(jax.tree.leaves(arrays))
    print(
        common.header("checkpoint_checksums")
        + f"State of imagenet:{args.preset}: {leaves} arrays, {size / 2**20:.1f} MiB; best of "
        f"{args.repeats}.\n\n"
        + common.markdown_table(["operation", "seconds"], [[n, f"{s:.3f}"] for n, s in rows])
    )


if __name__ == "__main__":
    main()
