"""Layout guard: one phase-collapse block's compiled TPU traffic per image stays where it is.

Compiles (never runs) one block's forward and backward pass for a compile-only TPU v5e chip,
through libtpu's topology description, and bounds XLA's own count of the bytes the program
accesses. A layout change that adds round trips of the block's largest arrays through HBM
fails here. Without libtpu it fails with the install line.
"""

import jax
import jax.numpy as jnp
import pytest

from pcjax.accelerators import targets
from pcjax.nn import layers

# XLA:TPU bytes accessed per image of the block below (forward + backward, batch 8, jax 0.12.0.1
# with libtpu 0.0.50.1): 53.9 MB measured, plus 20 %. Compiled at precision "bf16" (one MXU pass
# per product), a third of the compile time of "highest" (66.9 MB/img there, its six passes
# adding operands of their own). The same block through the channels-last FFT path moves
# 107.9 MB/img at "bf16": the kind of change this catches.
BYTES_PER_IMAGE_BOUND = 1.2 * 53.9e6
# A `rho_psi` block on a 32x32x32 complex input, `wavelet_method="auto"` resolved for a TPU:
# the Pallas kernel (`nn.wavelet_kernel`), 79.5 MB/img at "bf16" (92.4 at "highest"); the
# `matmul` path on the same block moves 139.2.
KERNEL_BYTES_PER_IMAGE_BOUND = 1.2 * 79.5e6
# A `rho_psi` block on a 16x16x128 complex input (128 features), `auto` for a TPU: the kernel
# with channels on the lanes (`nn.moduli_kernel`), 17.4 MB/img at "bf16"; `matmul` moves 74.1.
LANES_BYTES_PER_IMAGE_BOUND = 1.2 * 17.4e6
BATCH = 8


def _tpu_device():
    """One compile-only v5e chip; a missing libtpu fails with the install line."""
    return targets.devices(targets.get_target("v5e-4"))[0]


def block_bytes_per_image(device, block: layers.PhaseCollapseBlock, shape, batch: int) -> float:
    """XLA's bytes accessed per image of `block`'s forward + backward pass compiled for `device`."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((batch, *shape), jnp.complex64)
    variables = jax.eval_shape(lambda x: block.init(jax.random.key(0), x, True), x)
    y = jax.eval_shape(
        lambda v, x: block.apply(v, x, True, mutable=["batch_stats"])[0], variables, x
    )

    def loss(v, x, ct):
        out = block.apply(v, x, True, mutable=["batch_stats"])[0]
        return jnp.real(jnp.vdot(ct, out))

    def place(tree):
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree
        )

    compiled = (
        jax.jit(jax.grad(loss, argnums=(0, 1)))
        .lower(place(variables), place(x), place(y))
        .compile()
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["bytes accessed"] / batch


@pytest.mark.slow
@pytest.mark.parametrize(
    "block_type,method,shape,features,bound",
    [
        ("linear_plus_rho", "matmul", (16, 16, 32), 64, BYTES_PER_IMAGE_BOUND),
        # The block `auto` gives the Pallas kernel on a TPU: the kernels' declared traffic and
        # XLA's count of the rest.
        ("rho_psi", "auto", (32, 32, 32), 64, KERNEL_BYTES_PER_IMAGE_BOUND),
        ("rho_psi", "auto", (16, 16, 128), 128, LANES_BYTES_PER_IMAGE_BOUND),
    ],
    ids=["matmul", "kernel", "lanes-kernel"],
)
def test_block_tpu_bytes_per_image_stay_bounded(
    monkeypatch, block_type, method, shape, features, bound
):
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another process may hold libtpu
    device = _tpu_device()
    block = layers.PhaseCollapseBlock(
        features=features,
        num_angles=4,
        filter_mode="factorized_even",
        block_type=block_type,
        wavelet_method=method,
        precision="bf16",
        backend="tpu",
    )
    got = block_bytes_per_image(device, block, shape, BATCH)
    assert 0 < got <= bound, got
