"""Per-array checksums of a state, computed on the devices, written with every checkpoint.

Each array's bits are read as unsigned 32-bit words (narrower dtypes widened) and reduced to
two sums modulo 2**32: the plain sum and the sum weighted by the odd numbers 2i + 1. A single
flipped bit changes one word by +-2**k, hence each sum by an odd multiple of 2**k, which is
never 0 modulo 2**32: every single-bit error is detected. Integer sums do not depend on the
reduction order, so the numbers are the same on every backend, topology and sharding; the
arrays never leave the devices and every process gets the same manifest.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class ChecksumError(ValueError):
    """A restored array does not match the checksum written when it was saved."""


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as a flat uint32 vector (8-byte elements give two words each)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size == 4 or size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).reshape(-1).astype(jnp.uint32)


def _sums(x: jax.Array) -> jax.Array:
    w = _words(x)
    odd = jnp.arange(w.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * odd, dtype=jnp.uint32)])


@jax.jit
def _all_sums(leaves: list[jax.Array]) -> jax.Array:
    if not leaves:
        return jnp.zeros((0, 2), jnp.uint32)
    return jnp.stack([_sums(x) for x in leaves])


def _paths(tree: Any) -> tuple[list[str], list[Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(p) for p, _ in flat], [x for _, x in flat]


def manifest(tree: Any) -> dict[str, dict[str, Any]]:
    """{leaf path: {"sum", "weighted", "shape", "dtype"}} of every array leaf of `tree`."""
    names, leaves = _paths(tree)
    sums = np.asarray(jax.device_get(_all_sums(leaves)))
    return {
        name: {
            "sum": int(s[0]),
            "weighted": int(s[1]),
            "shape": list(np.shape(x)),
            "dtype": str(jnp.asarray(x).dtype) if not hasattr(x, "dtype") else str(x.dtype),
        }
        for name, x, s in zip(names, leaves, sums, strict=True)
    }


def verify(tree: Any, expected: dict[str, dict[str, Any]]) -> None:
    """Raises ChecksumError naming the first array whose bits differ from `expected`."""
    got = manifest(tree)
    missing = sorted(set(expected) ^ set(got))
    if missing:
        raise ChecksumError(f"the arrays {missing[:3]} are not those the checksums list")
    for name, want in expected.items():
        have = got[name]
        if (have["sum"], have["weighted"]) != (want["sum"], want["weighted"]):
            raise ChecksumError(
                f"array {name} {tuple(have['shape'])} {have['dtype']} does not match the "
                "checksum written when it was saved"
            )
