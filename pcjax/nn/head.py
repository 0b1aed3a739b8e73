"""The networks' head: (Re, Im) interleaved, batch-normalised, flattened, then a linear map.

Its initialisation is PyTorch's, so weights port one-to-one from the authors' code.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pcjax.nn import complex_ops
from pcjax.nn.layers import BatchStandardize


def torch_linear_init(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default for Linear weights and biases."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Classifier(nn.Module):
    """Head: interleave (Re, Im) -> BatchNorm (affine) -> flatten -> Linear with bias.

    Flattening follows the reference's (channel, h, w) order so weights port one-to-one; there is
    no pooling, so the classifier is position-dependent. The Linear layer's matmul follows the
    `precision` policy (`complex_ops.PRECISIONS`).
    """

    num_classes: int
    precision: str = "highest"

    @nn.compact
    def __call__(self, u: jax.Array, train: bool = False) -> jax.Array:
        x = complex_ops.interleave_real_imag(u)
        x = BatchStandardize(affine=True, name="bn")(x, use_running_average=not train)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        init = torch_linear_init(x.shape[-1])
        return nn.Dense(
            self.num_classes,
            kernel_init=init,
            bias_init=init,
            dot_general=_policy_dot_general(self.precision),
            name="linear",
        )(x)


def _policy_dot_general(policy: str):
    """`lax.dot_general` for flax's Dense under the precision policy (float32 result)."""
    complex_ops.check_precision(policy)

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision, preferred_element_type  # set by the policy
        lhs, rhs, lax_precision = complex_ops.dot_operands(lhs, rhs, policy)
        return jax.lax.dot_general(
            lhs, rhs, dimension_numbers, lax_precision, preferred_element_type=jnp.float32
        )

    return dot_general
