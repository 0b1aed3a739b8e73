"""A Flax module's initial variables computed by one compiled program.

Eager `init` of a whole network dispatches its forward pass op by op, several times slower
on CPU than the same forward compiled; the values are identical.
"""

import functools

import jax


def init(module, x, seed: int = 0, impl: str = "threefry2x32", **kwargs) -> dict:
    """`module.init(jax.random.key(seed, impl=impl), x, **kwargs)`, jitted (`kwargs` are static).

    `impl="rbg"` where a test needs random parameters but not the default generator's values:
    XLA:CPU compiles a ResNet-18's initialisation about 5x faster with it (threefry's rounds
    are unrolled once per parameter).
    """
    key = jax.random.key(seed, impl=impl)
    return jax.jit(functools.partial(module.init, **kwargs))(key, x)
