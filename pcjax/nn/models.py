"""The paper's networks: phase-collapse nets (both block types, every non-linearity) and the
bias-free ResNet-18 baselines.

The networks of the paper are described once, by the experiment presets
(pcjax/configs/<dataset>.py), which write the constructor fields into `config.model`;
`pcjax.configs.schema.build_model(config)` builds the network from them, and `ARCHS` maps
`config.model.arch` to the class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pcjax.nn import filters, head, layers, nonlinear


class PhaseCollapseNet(nn.Module):
    """Stack of `PhaseCollapseBlock`s followed by the `Classifier` head.

    Input: float32[batch, h, w, channels] (normalised images). Block b uses the standard filter
    bank if b < `num_standard_blocks`, then factorised banks alternating even/odd
    (docs/spec.md 1.3); each block's output is a unit-norm complex tensor of `widths[b]` channels.
    """

    widths: Sequence[int]
    num_classes: int
    num_angles: int = 8
    full_angles: bool = False
    num_standard_blocks: int = 0
    block_type: str = "rho_psi"
    nonlinearity: str = "mod"
    nonlinearity_init: Mapping[str, float] | None = None
    learn_nonlinearity: bool = True
    wavelet_method: str = "auto"
    precision: str = "highest"  # matmul policy, one of layers.PRECISIONS
    backend: str | None = None  # platform wavelet_method="auto" resolves for (None: the host's)
    mesh: Any = None  # jax.sharding.Mesh the batch is split over (kernels split themselves)
    # Recompute each block's forward pass in the backward pass instead of keeping its
    # intermediates: the step keeps only the block inputs (less memory, one more forward pass).
    remat: bool = False

    def block_kwargs(self) -> list[dict[str, Any]]:
        """Constructor arguments of each `PhaseCollapseBlock`, in order (also for benchmarks)."""
        modes = filters.block_filter_modes(len(self.widths), self.num_standard_blocks)
        return [
            dict(
                features=width,
                num_angles=self.num_angles,
                full_angles=self.full_angles,
                filter_mode=mode,
                block_type=self.block_type,
                nonlinearity=self.nonlinearity,
                nonlinearity_init=self.nonlinearity_init,
                learn_nonlinearity=self.learn_nonlinearity,
                wavelet_method=self.wavelet_method,
                precision=self.precision,
                backend=self.backend,
                mesh=self.mesh,
            )
            for width, mode in zip(self.widths, modes, strict=True)
        ]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        block = layers.PhaseCollapseBlock
        if self.remat:
            block = nn.remat(block, static_argnums=(2,))  # (self, x, train): train is static
        for b, kwargs in enumerate(self.block_kwargs()):
            x = block(**kwargs, name=f"block{b}")(x, train)
        return head.Classifier(self.num_classes, self.precision, name="head")(x, train)


# --- Bias-free ResNet-18 baselines (docs/spec.md 3.9) -------------------------------------------

# Kaiming-normal, fan_out, ReLU gain: PyTorch's ResNet conv initialisation.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class NonLin(nn.Module):
    """Real point-wise non-linearity of the ResNet baselines.

    `thresh` uses a fixed per-channel threshold (init 1): in the reference its `requires_grad`
    is False because of a typo, so the Table-3 threshold is never trained; we match that.
    """

    name_: str
    threshold: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.name_ == "thresh":
            return nonlinear.soft_threshold(x, jnp.full((x.shape[-1],), self.threshold, x.dtype))
        return nonlinear.apply_real_nonlinearity(self.name_, x)


class BasicBlock(nn.Module):
    """ResNet basic block, bias-free convolutions, non-affine BatchNorm, `NonLin` activations."""

    features: int
    strides: int
    nonlinearity: str

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda name: layers.BatchStandardize(name=name)  # noqa: E731
        conv = lambda f, k, s, name: nn.Conv(  # noqa: E731
            f,
            (k, k),
            (s, s),
            padding=[(k // 2, k // 2)] * 2,
            use_bias=False,
            kernel_init=_conv_init,
            name=name,
        )
        y = conv(self.features, 3, self.strides, "conv1")(x)
        y = NonLin(self.nonlinearity, name="act1")(bn("bn1")(y, not train))
        y = bn("bn2")(conv(self.features, 3, 1, "conv2")(y), not train)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = bn("downsample_bn")(
                conv(self.features, 1, self.strides, "downsample")(x), not train
            )
        return NonLin(self.nonlinearity, name="act2")(y + x)


class ResNet18(nn.Module):
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]) with no biases but the classifier's.

    Every BatchNorm is non-affine (`--no-bias`), every ReLU is replaced by `nonlinearity`.
    """

    num_classes: int = 1000
    nonlinearity: str = "relu"
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(
            self.widths[0],
            (7, 7),
            (2, 2),
            padding=[(3, 3), (3, 3)],
            use_bias=False,
            kernel_init=_conv_init,
            name="conv1",
        )(x)
        x = NonLin(self.nonlinearity, name="act1")(
            layers.BatchStandardize(name="bn1")(x, not train)
        )
        x = nn.max_pool(x, (3, 3), (2, 2), padding=[(1, 1), (1, 1)])
        for s, (n, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for i in range(n):
                strides = 2 if (s > 0 and i == 0) else 1
                x = BasicBlock(width, strides, self.nonlinearity, name=f"layer{s + 1}_{i}")(
                    x, train
                )
        x = jnp.mean(x, axis=(1, 2))
        init = head.torch_linear_init(x.shape[-1])
        return nn.Dense(self.num_classes, kernel_init=init, bias_init=init, name="fc")(x)


# Non-linearities of the paper's Table 2 (phase-collapse nets) and of the ResNet baselines.
TABLE2_NONLINEARITIES = ("mod", "cst", "ms", "mc", "tanh")
RESNET_NONLINEARITIES = ("relu", "abs", "thresh", "tanh", "powfixed")
# `config.model.arch` -> network class.
ARCHS: dict[str, type[nn.Module]] = {"phase_collapse": PhaseCollapseNet, "resnet18": ResNet18}


def count_params(params: Any) -> int:
    """Number of real scalars in a parameter pytree (complex weights are stored as pairs)."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
