"""fast_math: float32 exp, erf, tanh and sigmoid as polynomials the loop vectorizer keeps in SIMD.

LLVM lowers TIR's `exp`/`erf`/`tanh` on CPUs to libm calls, one element at a time even inside a
vectorized loop. Measured on 512Ki float32 elements, parallel and 8-wide (2 cores, AVX2): a multiply
0.10 ms; libm `exp` 1.26 ms, `tanh` 2.56 ms, `erf` 6.10 ms; the approximations here 0.32 (exp),
0.17 (tanh), 0.25 (erf) and 0.42 ms (sigmoid). GELU's backward (erf and exp) was the transformer
step's costliest kernel; the pass took that step from 181 to 124 ms.

exp (and sigmoid through it) is our own, below; erf and tanh are TVM's (topi.fast_erf, fast_tanh).
All agree with PyTorch's float64 result to 1e-6 relative over [-100, 100] (measured 3.3e-7; PyTorch's
own float32 functions: 6e-8), keep +-inf and nan, except `erf(nan)`, which is 1
(tests/passes/test_fast_math.py). float64 calls are left alone: float64 steps stay exact.

The pass rewrites the calls inside every kernel once it is scheduled, tuned ones included (the
tuner's builder applies it too, so tuning measures what runs). Not earlier: the approximation binds
its argument with a `let`, and inlining a stage into two consumers (inline_elementwise, softmax's
exp) would define that variable twice, which TVM rejects as ill-formed.
"""

from __future__ import annotations

import functools

import tvm
import tvm_ffi
from tvm import te, tirx, topi
from tvm.ir.expr import Call, TensorLoad, Var
from tvm.tirx.stmt import BufferStore

from ..ir import map_kernels

APPROXIMATED = ("exp", "erf", "tanh", "sigmoid")
TIR_OPS = {f"tirx.{name}" for name in APPROXIMATED}


@functools.cache
def _template(name: str) -> tuple:
    """(variable x, float32 expression of x) computing `name`(x) the fast way."""
    if name in ("exp", "sigmoid"):
        x = tirx.Var("x", "float32")
        return x, _exp(x) if name == "exp" else _f32(1.0) / (_f32(1.0) + _exp(-x))
    # erf, tanh: TVM's own approximation, written for a 0-d tensor, read back as an expression of
    # one scalar (its stages, e.g. fast_tanh's clamp, substituted into the last one).
    placeholder = te.placeholder((), "float32", "x")
    func = te.create_prim_func([placeholder, getattr(topi, f"fast_{name}")(placeholder)])
    stores = []
    tvm_ffi.structural_map(func.body, [(BufferStore, lambda s: stores.append(s) or s)])
    x = tirx.Var("x", "float32")
    values = {}  # stage buffer -> its value as an expression of x

    def load(expr):  # a stage's buffer, or else the one input
        return next((v for buf, v in values.items() if expr.source.same_as(buf)), x)

    for store in stores:  # in program order: each stage reads only earlier ones
        values[store.buffer] = tvm_ffi.structural_map(store.value, [(TensorLoad, load)])
    return x, values[stores[-1].buffer]


def _f32(value: float):
    return tirx.const(value, "float32")


def _exp(x):
    """e^x = 2^n e^r with n = round(x / ln 2) and |r| <= ln 2 / 2, e^r by Cephes' degree-7 polynomial.
    r is reduced in two steps (ln 2 = LN2_HI + LN2_LO, n * LN2_HI exact in float32): TVM's
    topi.fast_exp reduces in one, which loses 4e-6 relative at x = 70 unless the target contracts
    the multiply-add into an FMA. 2^n is applied as two powers built in the exponent bits, each in
    float32's range, so overflow gives inf and small results underflow gradually as they should."""
    ln2_hi, ln2_lo = 0.693359375, -2.12194440e-4
    # Beyond the clamp e^x is inf or 0 in float32 (it keeps n in int range). Written as selects on
    # x > bound, false for nan, so nan flows through (min/max would turn it into a bound).
    high = tirx.Select(x > _f32(89.0), _f32(89.0), x)
    clamped = tirx.Select(high < _f32(-104.0), _f32(-104.0), high)
    n = tirx.floor(clamped * _f32(1.44269504088896341) + _f32(0.5))
    r = clamped - n * _f32(ln2_hi) - n * _f32(ln2_lo)
    poly = _f32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        poly = poly * r + _f32(c)
    e_r = poly * r * r + r + _f32(1.0)
    half = tirx.floor(n * _f32(0.5))
    return e_r * _power_of_two(half) * _power_of_two(n - half)


def _power_of_two(k):
    """2^k for an integral float32 k in [-126, 127], from its exponent bits."""
    return tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", k) + 127, 23))


def approximate(call):
    """The fast expression for one float32 call: `let x = <argument> in <polynomial of x>`."""
    name = call.op.name.split(".")[-1]
    x, body = _template(name)
    fresh = tirx.Var("x", "float32")  # a let's variable is defined once per function
    return tirx.Let(fresh, call.args[0], tvm_ffi.structural_map(body, [(Var, lambda v: fresh if v.same_as(x) else v)]))


def _rewrite(call):
    if (isinstance(call.op, tvm.ir.Op) and call.op.name in TIR_OPS
            and isinstance(call.ty, tvm.ir.PrimType) and str(call.ty.dtype) == "float32"):
        return approximate(call)
    return call


def fast_math() -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="FastMath")
    def transform(mod, _ctx):
        def rewrite(kernel):
            new = tvm_ffi.structural_map(kernel, [(Call, _rewrite)])
            return None if new.same_as(kernel) else new

        return map_kernels(mod, rewrite, include_scheduled=True)

    return transform
