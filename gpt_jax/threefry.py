"""`jax.random.bernoulli`, bit for bit, in one fused pass: the dropout masks without the rolled loop.

On CPU, JAX lowers its threefry2x32 hash as a 5-iteration `while` loop (it compiles faster), so XLA makes
five passes over every mask-sized intermediate: one shakespeare_char layer's attention-dropout mask (25M
draws) took 155 ms, and dropout as a whole 18% of a training step. The same hash written out in `jnp`
operations fuses into one elementwise loop (12 ms for that mask). The bits are those of JAX's own
partitionable threefry (the default since JAX 0.5): the counter of element i is the 64-bit index i split
into two uint32 words, the output word is the xor of the hash's two words, and the float is built from the
top 23 bits as `jax.random.uniform` builds it. tests/test_model.py checks that the masks equal
`jax.random.bernoulli`'s for several keys and shapes. Anything else (another key implementation,
`jax_threefry_partitionable` off, 2^32 elements or more) falls back to `jax.random.bernoulli`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KS_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: jax.Array, r: int) -> jax.Array:
    return lax.shift_left(x, np.uint32(r)) | lax.shift_right_logical(x, np.uint32(32 - r))


def threefry2x32(k1: jax.Array, k2: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 hash (20 rounds) of the counter words (x0, x1) under the key (k1, k2), unrolled."""
    ks = (k1, k2, k1 ^ k2 ^ _KS_PARITY)
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ _rotate_left(x1, r)
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _exact_fast_path(key: jax.Array, shape: tuple[int, ...]) -> bool:
    partitionable = bool(getattr(jax.config, "jax_threefry_partitionable", True))
    return (str(jax.random.key_impl(key)) == "threefry2x32" and partitionable and key.shape == ()
            and math.prod(shape) < 2**32)


def bernoulli(key: jax.Array, p: float, shape: tuple[int, ...], *, full_shape: tuple[int, ...] | None = None,
              start: tuple[int, ...] | None = None) -> jax.Array:
    """Boolean array of `shape`, True with probability p: equal to `jax.random.bernoulli(key, p, shape)`.

    With `full_shape` and `start`, the result is the block of `jax.random.bernoulli(key, p, full_shape)` that
    begins at index `start` and has `shape`: a piece of a mask, drawn without drawing the rest.
    """
    shape = tuple(shape)
    full_shape, start = tuple(full_shape or shape), tuple(start or (0,) * len(shape))
    if not _exact_fast_path(key, full_shape):
        return lax.slice(jax.random.bernoulli(key, p, full_shape), start, tuple(map(sum, zip(start, shape))))
    k1, k2 = jax.random.key_data(key)
    strides = [math.prod(full_shape[d + 1:]) for d in range(len(shape))]
    zeros = jnp.zeros(shape, jnp.uint32)
    index = sum(((lax.broadcasted_iota(jnp.uint32, shape, d) + np.uint32(start[d])) * np.uint32(strides[d])
                 for d in range(len(shape))), zeros)  # flat index in full_shape: the counter's low word
    b1, b2 = threefry2x32(k1, k2, zeros, index)  # the high word is 0 below 2^32 elements
    mantissa = lax.shift_right_logical(b1 ^ b2, np.uint32(32 - 23))
    uniform = lax.bitcast_convert_type(mantissa | np.uint32(0x3F800000), jnp.float32) - np.float32(1.0)  # [0, 1)
    return uniform < np.float32(p)
