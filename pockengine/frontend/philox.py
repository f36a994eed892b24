"""Philox4x32-10 as Relax ops: the step's random numbers, computed in the graph.

The generator is pockengine/random.py's (its numpy twin is the reference the tests compare with),
written with elementwise uint64 ops only — 32x32->64-bit products, shifts, masks, xor — so it lowers
to plain integer arithmetic on every target (LLVM on x86 and aarch64, CUDA, TVM's C code for a
Cortex-M) and fuses into one elementwise kernel per random site. Its inputs are two int64 scalars of
the step's state, the seed and the step counter: a mask depends on no parameter, so autodiff hoists
its computation out of the differentiated graph and treats the mask as data.
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax import op as R

from ..errors import UnsupportedOpError
from ..random import MASK32, PHILOX_M, PHILOX_ROUNDS, PHILOX_W

U64 = "uint64"


def _u64(value: int):
    return relax.const(value, U64)


def _low(x):
    return R.bitwise_and(x, _u64(MASK32))


def _high(x):
    return R.right_shift(x, _u64(32))


def philox4x32(counter, key, rounds: int = PHILOX_ROUNDS) -> tuple:
    """Relax expressions of the 4 output words (uint64 holding 32 bits) of Philox4x32-`rounds` for
    4 counter words and 2 key words (uint64 expressions holding 32 bits, broadcast together)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:  # the key schedule: k + r*W mod 2^32, from the scalar key
            k0, k1 = (_low(R.add(k, _u64((r * w) & MASK32))) for k, w in zip(key, PHILOX_W))
        p0, p1 = R.multiply(_u64(PHILOX_M[0]), c0), R.multiply(_u64(PHILOX_M[1]), c2)
        c0, c1, c2, c3 = (R.bitwise_xor(R.bitwise_xor(_high(p1), c1), k0), _low(p1),
                          R.bitwise_xor(R.bitwise_xor(_high(p0), c3), k1), _low(p0))
    return c0, c1, c2, c3


def _element_index(shape, step):
    """The flat (row-major) index of each element of `shape`, as a uint64 tensor of that shape. Built from one small
    `arange` per axis, starting from a zero computed from the step counter: a single arange of the
    whole tensor has constant arguments only, and constant folding would store it — and every
    generator op after it that reads nothing else — in the library (8 bytes an element, in Flash on
    a microcontroller). This way the constants are the axes' ranges and the index is computed in
    the generator's kernel."""
    index = R.bitwise_and(step, _u64(0))
    for axis, size in enumerate(shape):
        along = [1] * len(shape)
        along[axis] = size
        index = R.add(R.multiply(index, _u64(size)), R.reshape(R.arange(0, size, 1, U64), along))
    return R.broadcast_to(index, shape)


class RandomSource:
    """Uniforms for the random operations of one imported graph, numbered in graph order (each call
    is a site of its own), from the step state's `seed` and `step` (int64 scalar Vars)."""

    def __init__(self, seed, step):
        self.seed, self.step = seed, step
        self.sites = 0

    def uniform(self, bb: relax.BlockBuilder, shape, dtype: str):
        """A tensor of uniforms in [0, 1) of `shape` and `dtype` (float32: 24 bits, float64: 53 bits)."""
        shape = [int(d) for d in shape]
        count = int(np.prod(shape, dtype=np.int64))
        if count >= 2 ** 32:
            raise UnsupportedOpError(f"a random tensor of {count} elements: the generator counts elements in 32 bits")
        if dtype not in ("float32", "float64"):
            raise UnsupportedOpError(f"random numbers are drawn as float32 or float64, not {dtype}")
        site, self.sites = self.sites, self.sites + 1
        seed, step = bb.emit(R.astype(self.seed, U64)), bb.emit(R.astype(self.step, U64))
        index = _element_index(shape, step)
        words = philox4x32((index, _u64(site), _low(step), _high(step)), (_low(seed), _high(seed)))
        if dtype == "float32":
            bits, scale = R.right_shift(words[0], _u64(8)), 2.0 ** -24
        else:
            bits = R.bitwise_or(R.left_shift(R.right_shift(words[0], _u64(5)), _u64(26)),
                                R.right_shift(words[1], _u64(6)))
            scale = 2.0 ** -53
        # Through a signed integer: exact (< 2^53), and a cheaper conversion than from uint64 on a
        # 32-bit microcontroller.
        signed = "int32" if dtype == "float32" else "int64"
        values = R.multiply(R.astype(R.astype(bits, signed), dtype), relax.const(scale, dtype))
        return bb.emit(values)
