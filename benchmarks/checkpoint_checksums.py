"""Cost of the per-array checksums of a checkpoint, for the ImageNet preset's train state.

    JAX_PLATFORMS=cpu python benchmarks/checkpoint_checksums.py [--preset=mod/rho_psi] [--dir=/tmp]

Builds the state's shapes with jax.eval_shape (no training), fills them with random numbers,
then times, best of --repeats: the checksums alone; a save (until written) with and without
them; a restore with and without verifying them. Prints one Markdown table row per quantity.
"""

import argparse
import os
import shutil
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from pcjax.configs import imagenet
from pcjax.data import datasets
from pcjax.training import checkpoint, checksums, sharding, train


def _state(preset: str):
    cfg = imagenet.get_config(preset)
    shape = datasets.image_shape(cfg.data.name, cfg.data.image_size)
    steps = train.build_steps(cfg, sharding.make_mesh(), 1000, shape)  # the trainer's state
    abstract = jax.eval_shape(steps.init, jax.random.key(0))
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: jax.numpy.asarray(rng.standard_normal(s.shape).astype(s.dtype)), abstract
    )


def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
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
        f"imagenet.py:{args.preset}: {leaves} arrays, {size / 2**20:.1f} MiB, "
        f"backend {jax.default_backend()}, best of {args.repeats}"
    )
    print("| operation | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
