"""The random numbers of the compiled step, in numpy: the reference the tests hold the step to.

The step draws from Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011), a counter-based generator: each output is a pure function of a 128-bit counter and a
64-bit key, so every element of a dropout mask is computed independently, in any order, by the same
elementwise code on every target, and a mask is reproduced from (seed, step, site) alone — nothing
but the seed and the step counter is state.

    counter = (flat element index, random site index, step low 32 bits, step high 32 bits)
    key     = (seed low 32 bits, seed high 32 bits)

`step` is the number of steps taken before the one drawing (the optimizer's `step` state as the step
reads it), `site` numbers the model's random operations in graph order (each dropout, each
`bernoulli`/`rand` of a stochastic depth). A uniform in [0, 1) is the top 24 bits of the counter's
first output word times 2^-24 (float32) or 53 bits of the first two words times 2^-53 (float64).
"""

from __future__ import annotations

import numpy as np

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key bumps (golden ratio, sqrt(3) - 1)
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF


def philox4x32(counter, key, rounds: int = PHILOX_ROUNDS) -> tuple:
    """Philox4x32-`rounds` of (4 uint32 counter words, 2 uint32 key words), each an integer or an
    array (broadcast together) -> the 4 output words as uint32 arrays.

    One round: (hi0, lo0) = M0 * c0, (hi1, lo1) = M1 * c2 (64-bit products),
    c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0); the key is bumped by W before every round but the first.
    """
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & np.uint64(MASK32) for c in counter)
    k0, k1 = (np.uint64(int(k) & MASK32) for k in key)
    m0, m1, mask = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1]), np.uint64(MASK32)
    shift = np.uint64(32)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + np.uint64(PHILOX_W[0])) & mask, (k1 + np.uint64(PHILOX_W[1])) & mask
        p0, p1 = m0 * c0, m1 * c2  # < 2^64: no wrap-around
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ k0, p1 & mask, (p0 >> shift) ^ c3 ^ k1, p0 & mask
    return tuple(np.asarray(c, dtype=np.uint32) for c in np.broadcast_arrays(c0, c1, c2, c3))


def uniform(seed: int, step: int, site: int, shape, dtype: str = "float32") -> np.ndarray:
    """The uniforms in [0, 1) the step draws at random site `site` of step number `step` (0 for the
    first step), shaped `shape`, as float32 (24 bits) or float64 (53 bits)."""
    shape = tuple(int(d) for d in shape)
    index = np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.uint64)
    words = philox4x32((index, site, step & MASK32, (step >> 32) & MASK32), (seed & MASK32, (seed >> 32) & MASK32))
    if np.dtype(dtype) == np.float32:
        values = (words[0] >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)
    elif np.dtype(dtype) == np.float64:
        high, low = words[0].astype(np.uint64) >> np.uint64(5), words[1].astype(np.uint64) >> np.uint64(6)
        bits = high << np.uint64(26) | low
        values = bits.astype(np.float64) * 2.0 ** -53
    else:
        raise ValueError(f"uniforms are float32 or float64, not {dtype}")
    return values.reshape(shape)


def dropout_keep_mask(seed: int, step: int, site: int, shape, p: float, dtype: str = "float32") -> np.ndarray:
    """Which elements dropout keeps (bool): those whose uniform is >= p, so each is kept with
    probability 1 - p, as PyTorch keeps them (p == 1 keeps none)."""
    return uniform(seed, step, site, shape, dtype) >= np.asarray(p, dtype=dtype)


def bernoulli(seed: int, step: int, site: int, shape, p: float, dtype: str = "float32") -> np.ndarray:
    """1 with probability p, else 0 (`torch.bernoulli`, `Tensor.bernoulli_(p)`), in `dtype`."""
    return (uniform(seed, step, site, shape, dtype) < np.asarray(p, dtype=dtype)).astype(dtype)
