"""Audit of every gradient rule Relax's Gradient pass can use, against torch.autograd in float64.

After `gradients.install()` an operator's `FPrimalGradient` is either TVM's own rule (52 of them) or
one of ours (pockengine/autodiff/gradients.py). For every such operator this file builds small
graphs `loss = sum_k sum(out_k * w_k)` over the attribute grid the operator accepts, differentiates
them with `relax.transform.Gradient` w.r.t. every float input, and compares both the loss (the
forward, so that a gradient mismatch is not a forward mismatch in disguise) and every gradient with
torch.autograd on the equivalent PyTorch expression. Every case runs at llvm opt-level 0 (what the
zoo and parity tests build with) and the first case of each operator also at the default "llvm"
(-O3, the host preset's): results must not depend on the opt level. (Compiling every case at -O3
took ~70 s, twice the rest of the audit; tests/test_opt_levels.py covers whole models at both.)

Operators with no meaningful float gradient (the comparisons, zeros/ones/full and their *_like
forms) still get cases: they must not crash, and their contribution to the float inputs' gradient
must be zero (PyTorch's `None` grad is read as zeros).

Compiling one module per case would dominate the runtime, so the selected cases are differentiated
one by one (a failing Gradient pass fails only its own case, and the adjoints are shared by both
targets) and then compiled CHUNK at a time per target; a chunk that fails to compile is bisected
down to the failing case(s).
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import quantized_reference
import torch
import torch.nn.functional as F
import tvm
from tvm import relax
from tvm.relax import op as R
from tvm.relax.op.grad import no_grad

from pockengine import awq, smoothquant
from pockengine.autodiff import gradients
from pockengine.autodiff.linear_log_prob import linear_log_prob
from pockengine.frontend import quantized_ops, w4_ops, w8_ops
from pockengine.ir import without_kernel_argument_checks

TOL = 1e-10  # scaled by max(1, max |expected|)

TARGETS = {
    "llvm": "llvm",
    "llvm-O0": {"kind": "llvm", "opt-level": 0},
}


@dataclass
class Case:
    op: str  # the operator whose rule is audited ("relax.nn.conv2d")
    attrs: str  # readable attributes, part of the test id
    build: Callable  # (*relax vars) -> Relax expr or list of exprs
    torch_fn: Callable  # (*torch tensors) -> tensor or list of tensors
    inputs: list  # numpy arrays, each a function parameter differentiated by both sides
    tol: float = TOL
    w: list = field(default_factory=list)  # cotangents, filled in lazily

    @property
    def id(self) -> str:
        return f"{self.op}[{self.attrs}]"


CASES: list[Case] = []
_seed = itertools.count(100)


def rand(*shape, low=None, kinks=(), dtype="float64"):
    """Normal values (or uniform in [low, low + 2) when low is given), some set exactly to the kinks."""
    rng = np.random.default_rng(next(_seed))
    x = np.asarray(rng.standard_normal(shape) if low is None else rng.uniform(low, low + 2, shape))
    flat = x.reshape(-1)
    for i, v in enumerate(kinks):
        flat[i::len(kinks) + 2] = v
    return x.astype(dtype)


def ties(*shape, levels=3):
    """Small integers: many exact ties inside pooling windows and between binary operands."""
    return np.random.default_rng(next(_seed)).integers(0, levels, shape).astype("float64")


def ints(*shape, high, low=0, dtype="int64"):
    return np.random.default_rng(next(_seed)).integers(low, high, shape).astype(dtype)


def case(op, attrs, build, torch_fn, *inputs, tol=TOL):
    CASES.append(Case(op, attrs, build, torch_fn, list(inputs), tol=tol))


def c(arr):
    arr = np.asarray(arr)
    return relax.const(arr, str(arr.dtype))  # relax.const alone narrows float64 / int64


def t(arr):
    return torch.tensor(arr)


def shp(s):
    return "x".join(map(str, s)) if len(s) else "scalar"


# ------------------------------------------------------------------ elementwise binary

BROADCAST_SHAPES = [((3, 4), (3, 4)), ((3, 4), (4,)), ((4,), (3, 4)), ((2, 1, 4), (3, 1)), ((3, 4), ()),
                    ((), (3, 4))]
BINARY = {
    "relax.add": (R.add, torch.add),
    "relax.subtract": (R.subtract, torch.sub),
    "relax.multiply": (R.multiply, torch.mul),
    "relax.divide": (R.divide, torch.div),
    "relax.power": (R.power, torch.pow),
    "relax.maximum": (R.maximum, torch.maximum),
    "relax.minimum": (R.minimum, torch.minimum),
}
for op, (rop, top) in BINARY.items():
    for sa, sb in BROADCAST_SHAPES:
        if op == "relax.power":
            a, b = rand(*sa, low=0.5), rand(*sb)
        elif op == "relax.divide":
            a, b = rand(*sa), rand(*sb, low=0.5) * np.where(rand(*sb) > 0, 1, -1)
        else:
            a, b = rand(*sa), rand(*sb)
        case(op, f"{shp(sa)},{shp(sb)}", rop, top, a, b)
for op in ("relax.maximum", "relax.minimum"):
    rop, top = BINARY[op]
    case(op, "ties,3x4,3x4", rop, top, ties(3, 4), ties(3, 4))
    case(op, "ties,3x4,4", rop, top, ties(3, 4), ties(4))
    case(op, "ties,same-input", lambda x, rop=rop: rop(x, x), lambda x, top=top: top(x, x), rand(3, 4))
for exponent in (2.0, 1.0, 3.0, 0.5, -1.5):  # written out as products for 2 and 3, a power otherwise
    case("relax.power", f"x-to-{exponent}-const", lambda x, e=exponent: R.power(x, c(np.float64(e))),
         lambda x, e=exponent: x ** e, rand(3, 4, low=0.5))
case("relax.power", "x-to-2.0-const,float32", lambda x: R.power(x, c(np.float32(2.0))), lambda x: x ** 2.0,
     rand(3, 4, dtype="float32"))
case("relax.power", "3x4-to-const-vector", lambda x: R.power(x, c(np.array([2.0, 1.0, 3.0, 0.5]))),
     lambda x: x ** torch.tensor([2.0, 1.0, 3.0, 0.5], dtype=torch.float64), rand(3, 4, low=0.5))
case("relax.divide", "x/x", lambda x: R.divide(x, x), lambda x: x / x, rand(3, 4, low=0.5))
case("relax.multiply", "x*x", lambda x: R.multiply(x, x), lambda x: x * x, rand(3, 4))
case("relax.subtract", "x-x", lambda x: R.subtract(x, x), lambda x: x - x, rand(3, 4))

# ------------------------------------------------------------------ elementwise unary

UNARY = {
    "relax.sqrt": (R.sqrt, torch.sqrt, dict(low=0.2)),
    "relax.log": (R.log, torch.log, dict(low=0.2)),
    "relax.exp": (R.exp, torch.exp, {}),
    "relax.tanh": (R.tanh, torch.tanh, {}),
    "relax.sigmoid": (R.sigmoid, torch.sigmoid, {}),
    "relax.nn.silu": (R.nn.silu, F.silu, {}),
    "relax.sin": (R.sin, torch.sin, {}),
    "relax.cos": (R.cos, torch.cos, {}),
    "relax.abs": (R.abs, torch.abs, {}),
    "relax.negative": (R.negative, torch.neg, {}),
    "relax.nn.relu": (R.nn.relu, F.relu, {}),
    "relax.nn.relu6": (R.nn.relu6, F.relu6, {}),
    "relax.nn.gelu": (R.nn.gelu, F.gelu, {}),
    "relax.nn.gelu_tanh": (R.nn.gelu_tanh, lambda x: F.gelu(x, approximate="tanh"), {}),
    "relax.rsqrt": (R.rsqrt, torch.rsqrt, dict(low=0.2)),
    "relax.erf": (R.erf, torch.erf, {}),
}
for op, (rop, top, kw) in UNARY.items():
    case(op, "2x3x5", rop, top, rand(2, 3, 5, **kw) * (3 if not kw else 1))
for op in ("relax.abs", "relax.nn.relu", "relax.nn.silu", "relax.tanh", "relax.sin", "relax.sigmoid", "relax.nn.gelu",
           "relax.nn.gelu_tanh", "relax.erf", "relax.exp", "relax.negative", "relax.cos"):
    rop, top, _ = UNARY[op]
    case(op, "zeros", rop, top, rand(3, 4, kinks=(0.0,)))
case("relax.nn.relu6", "kinks-0-6", R.nn.relu6, F.relu6, rand(3, 4, kinks=(0.0, 6.0)) * 4)
case("relax.sqrt", "tiny", R.sqrt, torch.sqrt, rand(3, 4, low=1e-3) * 1e-2, tol=1e-8)
# Oracle: hardtanh (ReLU6 is hardtanh(0, 6)), zero gradient at the bounds, which is our rule's
# convention. torch.clamp instead passes the gradient at the bounds: clip imported from a
# torch.clamp differs at exact bound values (not audited here, see test_gradients.py).
for lo, hi in [(0.0, 6.0), (-1.0, 1.0), (-0.5, 2.0)]:
    case("relax.clip", f"{lo},{hi}", lambda x, lo=lo, hi=hi: R.clip(x, lo, hi),
         lambda x, lo=lo, hi=hi: F.hardtanh(x, lo, hi), rand(3, 5, kinks=(lo / 2, hi / 2)) * 2)
for alpha in (0.01, 0.2):
    case("relax.nn.leakyrelu", f"alpha={alpha}", lambda x, a=alpha: R.nn.leakyrelu(x, a),
         lambda x, a=alpha: F.leaky_relu(x, a), rand(3, 5, kinks=(0.0,)))

# ------------------------------------------------------------------ reductions

for op, rop, top in [
    ("relax.sum", R.sum, lambda x, a, k: x.sum(dim=a, keepdim=k)),
    ("relax.mean", R.mean, lambda x, a, k: x.mean(dim=a, keepdim=k)),
    ("relax.variance", R.variance,
     lambda x, a, k: torch.var(x, dim=a, keepdim=k, unbiased=False)),
]:
    for axis, keepdims in itertools.product([None, 1, -1, [0, 2], [-1, -3]], [False, True]):
        torch_axis = axis if axis is not None else [0, 1, 2]
        case(op, f"axis={axis},keepdims={keepdims}",
             lambda x, a=axis, k=keepdims, rop=rop: rop(x, a, k),
             lambda x, a=torch_axis, k=keepdims, top=top: top(x, a, k), rand(2, 3, 4))

for op, rop, top in [("relax.nn.softmax", R.nn.softmax, torch.softmax),
                     ("relax.nn.log_softmax", R.nn.log_softmax, torch.log_softmax)]:
    for axis in (0, 1, 2, -1, -2):
        case(op, f"axis={axis}", lambda x, a=axis, rop=rop: rop(x, a),
             lambda x, a=axis, top=top: top(x, a), rand(2, 3, 4) * 2)


def torch_cumsum(x, axis, exclusive, dtype=None):
    x_ = x.reshape(-1) if axis is None else x
    a = 0 if axis is None else axis
    y = torch.cumsum(x_, a, dtype=dtype)
    return y - x_.to(y.dtype) if exclusive else y


for axis, exclusive in itertools.product([None, 0, 1, -1], [False, True]):
    case("relax.cumsum", f"axis={axis},exclusive={exclusive}",
         lambda x, a=axis, e=exclusive: R.cumsum(x, a, exclusive=e),
         lambda x, a=axis, e=exclusive: torch_cumsum(x, a, e), rand(2, 3, 4))
case("relax.cumsum", "axis=1,dtype=float64-from-float32", lambda x: R.cumsum(x, 1, dtype="float64"),
     lambda x: torch_cumsum(x, 1, False, torch.float64), rand(3, 4, dtype="float32"))
case("relax.cumsum", "axis=None,dtype=float32-from-float64", lambda x: R.cumsum(x, None, dtype="float32"),
     lambda x: torch_cumsum(x, None, False, torch.float32), rand(3, 4), tol=1e-6)

# ------------------------------------------------------------------ linear algebra

MATMUL_SHAPES = [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((3, 4), (2, 4, 5)), ((2, 3, 4), (2, 4, 5)),
                 ((2, 1, 3, 4), (3, 4, 5)), ((1, 3, 4), (2, 4, 5)), ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (4,)),
                 ((4,), (2, 4, 5)), ((2, 3, 4), (4,))]
for sa, sb in MATMUL_SHAPES:
    case("relax.matmul", f"{shp(sa)}@{shp(sb)}", R.matmul, torch.matmul, rand(*sa), rand(*sb))
case("relax.matmul", "x@x", lambda x: R.matmul(x, x), lambda x: x @ x, rand(3, 3))

# ------------------------------------------------------------------ shape manipulation

for axes in (None, [1, 0, 2], [2, 0, 1], [0, 2, 1], [-1, 0, 1]):
    case("relax.permute_dims", f"axes={axes}", lambda x, a=axes: R.permute_dims(x, a),
         lambda x, a=axes: x.permute(*(a if a is not None else [2, 1, 0])), rand(2, 3, 4))
case("relax.permute_dims", "2d-axes=None", lambda x: R.permute_dims(x), lambda x: x.T, rand(3, 4))
for shape in ((6, 4), (24,), (4, -1, 2), (1, 2, 12)):
    case("relax.reshape", f"to={shape}", lambda x, s=shape: R.reshape(x, s), lambda x, s=shape: x.reshape(s),
         rand(2, 3, 4))
for axis in (0, -1, 1, [0, 2], [-1, -3], [0, 1]):
    def t_expand(x, a=axis):
        out_ndim = x.dim() + (len(a) if isinstance(a, list) else 1)
        for ax in sorted(d % out_ndim for d in (a if isinstance(a, list) else [a])):
            x = x.unsqueeze(ax)
        return x
    case("relax.expand_dims", f"axis={axis}", lambda x, a=axis: R.expand_dims(x, a), t_expand, rand(3, 4))
for src, dst in [((3, 1), (2, 3, 4)), ((4,), (2, 3, 4)), ((), (2, 3)), ((1, 3, 1), (2, 3, 4)), ((3, 4), (3, 4))]:
    case("relax.broadcast_to", f"{shp(src)}->{shp(dst)}", lambda x, d=dst: R.broadcast_to(x, d),
         lambda x, d=dst: x.broadcast_to(d), rand(*src))
for axis in (0, 1, -1):
    case("relax.concat", f"2-inputs,axis={axis}", lambda a, b, ax=axis: R.concat([a, b], ax),
         lambda a, b, ax=axis: torch.cat([a, b], ax),
         rand(2, 3, 4), rand(*[s if d != axis % 3 else s + 1 for d, s in enumerate((2, 3, 4))]))
case("relax.concat", "3-inputs,axis=1,uneven", lambda a, b, d: R.concat([a, b, d], 1),
     lambda a, b, d: torch.cat([a, b, d], 1), rand(2, 1, 4), rand(2, 3, 4), rand(2, 2, 4))
case("relax.concat", "3-inputs,axis=-1,uneven", lambda a, b, d: R.concat([a, b, d], -1),
     lambda a, b, d: torch.cat([a, b, d], -1), rand(2, 3), rand(2, 1), rand(2, 4))
case("relax.concat", "same-input-twice", lambda a: R.concat([a, a], 0), lambda a: torch.cat([a, a], 0), rand(2, 3))


def split_parts(x, ios, axis, keep):
    if ios == 1:  # Relax's split into one section is the tensor itself, not a 1-tuple
        return [R.split(x, ios, axis)]
    return [relax.TupleGetItem(R.split(x, ios, axis), i) for i in keep]


def torch_split(x, ios, axis, keep):
    n = x.shape[axis]
    if isinstance(ios, int):
        bounds = list(range(0, n + 1, n // ios))
    else:
        bounds = [0, *ios, n]
    parts = [x.narrow(axis, bounds[i], bounds[i + 1] - bounds[i]) for i in range(len(bounds) - 1)]
    return [parts[i] for i in keep]


for ios, axis, keep in [(2, 0, [0, 1]), (3, -1, [0, 1, 2]), ([1, 3], 1, [0, 1, 2]), ([2], -1, [0, 1]),
                        (3, 1, [1]), ([1, 4], 1, [0, 2]), (1, 0, [0])]:
    case("relax.split", f"ios={ios},axis={axis},used={keep}",
         lambda x, i=ios, a=axis, k=keep: split_parts(x, i, a, k),
         lambda x, i=ios, a=axis, k=keep: torch_split(x, i, a, k), rand(4, 6, 6))

# ------------------------------------------------------------------ indexing and selection

for dtype, axis, index in [
    ("int64", 0, [2, 0, 2]), ("int32", 0, [2, 0, 2]), ("int64", 1, [3, 3, 0, 1]), ("int32", -1, [4, 0, 4]),
    ("int64", -2, [1]), ("int32", 1, 2), ("int64", 0, [[1, 2], [2, 2]]),
]:
    idx = np.array(index, dtype=dtype)

    def t_take(x, a=axis, i=idx):
        it = torch.tensor(i.astype("int64"))
        if a is None:
            return x.reshape(-1)[it]
        return torch.index_select(x, a, it.reshape(-1)).reshape(
            *x.shape[:a % x.dim()], *it.shape, *x.shape[a % x.dim() + 1:])
    case("relax.take", f"{dtype},axis={axis},index={shp(idx.shape)}",
         lambda x, a=axis, i=idx: R.take(x, c(i), a), t_take, rand(3, 4, 5))
for dtype in ("int32", "int64"):  # axis=None: Relax takes it only for 1-D data
    idx = np.array([0, 5, 5, 2], dtype=dtype)
    case("relax.take", f"{dtype},axis=None,1-D", lambda x, i=idx: R.take(x, c(i)),
         lambda x, i=idx: x[torch.tensor(i.astype("int64"))], rand(6))

for axis in (0, 1, -1):
    gidx = ints(3, 4, 5, high=[3, 4, 5][axis])
    case("relax.gather_elements", f"axis={axis}", lambda x, a=axis, i=gidx: R.gather_elements(x, c(i), a),
         lambda x, a=axis, i=gidx: torch.gather(x, a, torch.tensor(i)), rand(3, 4, 5))

# Ours (autodiff/linear_log_prob.py): a vocabulary head's label log-probabilities; labels include
# the first and last class and repeats. Its gradient is one operator, legalized unchunked here
# (passes/chunk_linear_log_prob.py's chunks are tested against PyTorch in tests/passes).
for rows, vocab, hidden in [(7, 11, 5), (1, 3, 4)]:
    labels = np.concatenate([[0, vocab - 1], ints(rows, high=vocab)])[:rows]
    case("pockengine.linear_log_prob", f"{rows}x{hidden},vocab={vocab}",
         lambda x, w, y=labels: linear_log_prob(x, w, c(y)),
         lambda x, w, y=labels: torch.log_softmax(x @ w.T, -1).gather(1, t(y)[:, None]).squeeze(1),
         rand(rows, hidden), rand(vocab, hidden))

# Ours (frontend/quantized_ops.py): the int8 operators of a quantized model, against the fake-quant
# reference (tests/quantized_reference.py: PyTorch's operators, roundings straight through). Values
# are integers (trained weights and biases carry fractions, rounded in the forward); clip ranges are
# narrow enough that some outputs are clipped.
def _int_valued(*shape, low=-128, high=128, fractions=False):
    values = ints(*shape, low=low, high=high).astype("float64")
    return values + (rand(*shape, low=-0.5) * 0.45 if fractions else 0.0)


def _fixed_point(channels, bits=(34, 38)):
    return ints(channels, low=1 << 30, high=1 << 31), ints(channels, low=bits[0], high=bits[1])


for c_in, c_out, k, stride, pad, dil, groups, size in [(3, 4, 3, 2, 1, 1, 1, 7), (4, 4, 3, 1, 1, 1, 4, 6),
                                                        (4, 6, 1, 1, 0, 1, 1, 5), (4, 4, 3, 1, 2, 2, 2, 6),
                                                        (2, 2, 5, 2, 2, 1, 2, 7)]:
    multiplier, shift = _fixed_point(c_out)
    qconfig = [-3, 5, -90, 100, stride, stride, pad, pad, pad, pad, dil, dil, groups]
    case("pockengine.quantized_conv2d", f"k{k}s{stride}p{pad}d{dil}g{groups}",
         lambda x, w, b, m=multiplier, n=shift, cfg=qconfig: quantized_ops.quantized_conv2d(
             x, w, b, c(m), c(n), quantized_ops.config_constant(cfg)),
         lambda x, w, b, m=multiplier, n=shift, cfg=qconfig: quantized_reference.conv2d(x, w, b, t(m), t(n), cfg),
         _int_valued(2, c_in, size, size), _int_valued(c_out, c_in // groups, k, k, low=-127, fractions=True),
         _int_valued(c_out, low=-3000, high=3000, fractions=True))
# a weight split into trained first channels and a frozen rest (prune_backward): input channels of a
# 1x1 conv, output channels of a depthwise one; the frozen part is a constant
for c_in, c_out, k, groups, trained in [(6, 4, 1, 1, 2), (4, 4, 3, 4, 1)]:
    multiplier, shift = _fixed_point(c_out)
    qconfig = [2, -1, -100, 110, 1, 1, k // 2, k // 2, k // 2, k // 2, 1, 1, groups]
    axis = 1 if groups == 1 else 0
    whole = _int_valued(c_out, c_in // groups, k, k, low=-127)
    frozen_part = np.take(whole, range(trained, whole.shape[axis]), axis=axis)
    case("pockengine.quantized_conv2d", f"split-k{k}g{groups}",
         lambda x, w, b, m=multiplier, n=shift, cfg=qconfig, f=frozen_part: quantized_ops.quantized_conv2d(
             x, w, b, c(m), c(n), quantized_ops.config_constant(cfg), c(f)),
         lambda x, w, b, m=multiplier, n=shift, cfg=qconfig, f=frozen_part, a=axis: quantized_reference.conv2d(
             x, torch.cat([w, t(f)], a), b, t(m), t(n), cfg),
         _int_valued(1, c_in, 5, 5),
         _int_valued(*[trained if i == axis else s for i, s in enumerate((c_out, c_in // groups, k, k))],
                     low=-127, fractions=True),
         _int_valued(c_out, low=-3000, high=3000, fractions=True))
for add_config in ([3, -7, 2, 1 << 30, 3 << 29, 31, -128, 127], [0, 0, -128, 1 << 30, 1 << 30, 30, -128, 0]):
    case("pockengine.quantized_add", f"m=({add_config[3]},{add_config[4]}),clip=({add_config[6]},{add_config[7]})",
         lambda a, b, cfg=add_config: quantized_ops.quantized_add(a, b, quantized_ops.config_constant(cfg)),
         lambda a, b, cfg=add_config: quantized_reference.add(a, b, cfg),
         _int_valued(2, 3, 4, 4), _int_valued(2, 3, 4, 4))
case("pockengine.quantized_mean", "3x5", quantized_ops.quantized_mean, quantized_reference.mean,
     _int_valued(2, 4, 3, 5))
for quant_config in ([0, -128, 127], [-20, -128, 40]):
    case("pockengine.quantize", f"zero={quant_config[0]},clip=({quant_config[1]},{quant_config[2]})",
         lambda x, cfg=quant_config: quantized_ops.quantize(x, c(np.float64(7.5)), quantized_ops.config_constant(cfg)),
         lambda x, cfg=quant_config: quantized_reference.quantize_ref(x, 7.5, cfg), rand(3, 8) * 10)

# Ours (frontend/w4_ops.py): a 4-bit weight (pockengine/awq.py's format) read packed; only x has a
# gradient. Shapes cover a batch of sequences, an odd in_features (the last byte half used) and a
# shorter last group; PyTorch's side dequantizes with pockengine.awq and multiplies.
for lead, n_out, k_in, group in [((2, 3), 6, 40, 16), ((5,), 4, 33, 8), ((1,), 3, 16, 16)]:
    codes = ints(n_out, k_in, high=16, dtype="uint8")
    groups = -(-k_in // group)
    w4_scales, w4_zeros = rand(n_out, groups, low=0.01), ints(n_out, groups, high=16, dtype="uint8")
    w4_packed = awq.pack_int4(t(codes)).numpy()
    case("pockengine.w4_matmul", f"{shp(lead)}x{k_in},out={n_out},group={group}",
         lambda x, p=w4_packed, s=w4_scales, z=w4_zeros, g=group: w4_ops.w4_matmul(x, c(p), c(s), c(z), g),
         lambda x, q=codes, s=w4_scales, z=w4_zeros, g=group: x @ awq.dequantize_groups(t(q), t(s), t(z), g).T,
         rand(*lead, k_in))

# The fused vocabulary loss on a 4-bit head (the LM head tied to a 4-bit embedding): only x has a
# gradient; an odd hidden size and a shorter last group, labels at both ends of the vocabulary.
for rows, vocab, hidden, group in [(7, 11, 9, 4), (3, 5, 16, 16)]:
    codes = ints(vocab, hidden, high=16, dtype="uint8")
    groups = -(-hidden // group)
    w4_scales, w4_zeros = rand(vocab, groups, low=0.01), ints(vocab, groups, high=16, dtype="uint8")
    w4_packed = awq.pack_int4(t(codes)).numpy()
    labels = np.concatenate([[0, vocab - 1], ints(rows, high=vocab)])[:rows]
    case("pockengine.linear_log_prob", f"4-bit head {rows}x{hidden},vocab={vocab},group={group}",
         lambda x, p=w4_packed, s=w4_scales, z=w4_zeros, g=group, y=labels: linear_log_prob(
             x, c(p), c(y), (c(s), c(z), g)),
         lambda x, q=codes, s=w4_scales, z=w4_zeros, g=group, y=labels: torch.log_softmax(
             x @ awq.dequantize_groups(t(q), t(s), t(z), g).T, -1).gather(1, t(y)[:, None]).squeeze(1),
         rand(rows, hidden))

# Ours (frontend/w8_ops.py): int8 weights; W8A8 rounds x per token (straight through, as
# pockengine/smoothquant.py's operator: its torch autograd is the reference).
for lead, n_out, k_in in [((2, 3), 6, 40), ((5,), 4, 33)]:
    w8_weight = ints(n_out, k_in, low=-127, high=128, dtype="int8")
    w8_scales = rand(n_out, low=0.001) * 0.01
    case("pockengine.w8_matmul", f"{shp(lead)}x{k_in},out={n_out}",
         lambda x, w=w8_weight, s=w8_scales: w8_ops.w8_matmul(x, c(w), c(s)),
         lambda x, w=w8_weight, s=w8_scales: smoothquant.w8_matmul_op(x, t(w), t(s)), rand(*lead, k_in))
    case("pockengine.w8a8_matmul", f"{shp(lead)}x{k_in},out={n_out}",
         lambda x, w=w8_weight, s=w8_scales: w8_ops.w8a8_matmul(x, c(w), c(s)),
         lambda x, w=w8_weight, s=w8_scales: smoothquant.w8a8_matmul_op(x, t(w), t(s)), rand(*lead, k_in))

for name, cshape, ashape, bshape in [
    ("same-shapes", (3, 4), (3, 4), (3, 4)), ("branch-broadcast-1x4", (3, 4), (1, 4), (3, 4)),
    ("branch-scalar", (3, 4), (3, 4), ()), ("cond-broadcast-3x1", (3, 1), (3, 4), (3, 4)),
    ("both-branches-broadcast", (3, 4), (3, 1), (4,)),
]:
    cond = np.random.default_rng(next(_seed)).random(cshape) > 0.5
    case("relax.where", name, lambda a, b, k=cond: R.where(c(k), a, b),
         lambda a, b, k=cond: torch.where(torch.tensor(k), a, b), rand(*ashape), rand(*bshape))
case("relax.where", "cond-from-input", lambda a, b: R.where(R.greater(a, b), a, b),
     lambda a, b: torch.where(a > b, a, b), rand(3, 4), rand(3, 4))

for axes, begin, end, strides in [([1], [1], [3], [1]), ([0, 2], [0, -4], [2, 100], [1, 2]),
                                  ([1, 2, 3], [1, -5, 0], [3, 100, 5], [1, 2, 2]), ([3], [1], [6], [3]),
                                  ([-1], [-4], [-1], [2])]:
    sl = [slice(None)] * 4
    for a, b_, e, s in zip(axes, begin, end, strides):
        sl[a] = slice(b_, e, s)
    case("relax.strided_slice", f"axes={axes},begin={begin},end={end},strides={strides}",
         lambda x, a=axes, b_=begin, e=end, s=strides: R.strided_slice(x, a, b_, e, s),
         lambda x, sl=tuple(sl): x[sl], rand(2, 4, 7, 6))
for axis, shape in [(None, (3, 1, 4, 1)), ([1], (3, 1, 4, 1)), ([-1], (3, 1, 4, 1)), ([1, 3], (3, 1, 4, 1))]:
    case("relax.squeeze", f"axis={axis}", lambda x, a=axis: R.squeeze(x, a),
         lambda x, a=axis: x.squeeze() if a is None else x.squeeze(tuple(a)), rand(*shape))
case("relax.flatten", "2x3x4", R.flatten, torch.flatten, rand(2, 3, 4))
case("relax.flatten", "x*flatten(x)", lambda x: R.multiply(R.flatten(x), R.flatten(x)),
     lambda x: torch.flatten(x) ** 2, rand(3, 2))
for widths, value in [([0, 0, 1, 2, 3, 0], 0.0), ([1, 1, 0, 0, 2, 2], 0.0), ([0, 0, 1, 1, 1, 1], 1.5)]:
    torch_pad = sum(([widths[2 * i], widths[2 * i + 1]] for i in reversed(range(3))), [])
    case("relax.nn.pad", f"widths={widths},value={value}", lambda x, w=widths, v=value: R.nn.pad(x, w, "constant", v),
         lambda x, p=torch_pad, v=value: F.pad(x, p, value=v), rand(2, 3, 4))

for k in (0, 1, -1, 2):
    case("relax.triu", f"k={k},3x4", lambda x, k=k: R.triu(x, k), lambda x, k=k: torch.triu(x, k), rand(3, 4))
case("relax.triu", "k=1,batched-2x4x4", lambda x: R.triu(x, 1), lambda x: torch.triu(x, 1), rand(2, 4, 4))

for src, dst in [("float64", "float32"), ("float32", "float64"), ("float64", "float64")]:
    x = rand(3, 4, dtype=src)
    case("relax.astype", f"{src}->{dst}", lambda x, d=dst: R.astype(x, d),
         lambda x, d=dst: x.to(getattr(torch, d)), x, tol=1e-6 if "float32" in (src, dst) else TOL)

# ------------------------------------------------------------------ losses

for reduction, weighted, ignore, spatial in [*itertools.product(["mean", "sum", "none"], [False, True], [False, True],
                                                                [False]),
                                             ("mean", True, True, True), ("none", False, True, True)]:
    n, ncls = 4, 5
    shape = (n, ncls, 3) if spatial else (n, ncls)
    target = ints(*((n, 3) if spatial else (n,)), high=ncls)
    ignore_index = int(target.reshape(-1)[0]) if ignore else -100
    weight = np.random.default_rng(next(_seed)).uniform(0.5, 2, ncls) if weighted else None

    def r_nll(p, tg=target, wt=weight, red=reduction, ii=ignore_index):
        return R.nn.nll_loss(p, c(tg), c(wt) if wt is not None else None, red, ii)

    def t_nll(p, tg=target, wt=weight, red=reduction, ii=ignore_index):
        return F.nll_loss(p, torch.tensor(tg), torch.tensor(wt) if wt is not None else None, ignore_index=ii,
                          reduction=red)
    case("relax.nn.nll_loss", f"{reduction},weights={weighted},ignore_index={ignore_index},{shp(shape)}", r_nll,
         t_nll, torch.log_softmax(torch.tensor(rand(*shape)), 1).numpy())
for reduction in ("mean", "sum", "none"):
    tg = np.array(3, dtype="int64")
    case("relax.nn.nll_loss", f"{reduction},no-batch", lambda p, r=reduction, tg=tg: R.nn.nll_loss(p, c(tg), None, r),
         lambda p, r=reduction, tg=tg: F.nll_loss(p, torch.tensor(tg), reduction=r), rand(5))


def t_xent(x, y):
    loss = -(x * y).sum()
    return loss / x.shape[0] if x.dim() > 1 else loss


for shape in ((4, 5), (5,), (2, 3, 4)):
    case("relax.nn.cross_entropy_with_logits", shp(shape), R.nn.cross_entropy_with_logits, t_xent,
         torch.log_softmax(torch.tensor(rand(*shape)), -1).numpy(), rand(*shape))

# ------------------------------------------------------------------ convolution


def t_conv(x, w, strides, padding, dilation, groups):
    top, left, bottom, right = padding
    return F.conv2d(F.pad(x, (left, right, top, bottom)), w, None, strides, 0, dilation, groups)


CONV = [  # (N, Cin, H, W), (Cout, Cin/groups, kh, kw), strides, padding (t, l, b, r), dilation, groups
    ((1, 2, 5, 5), (3, 2, 3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    ((2, 2, 6, 6), (3, 2, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((1, 2, 6, 6), (3, 2, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    ((1, 2, 7, 7), (3, 2, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    ((1, 2, 6, 7), (3, 2, 3, 3), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    ((1, 2, 8, 8), (2, 2, 3, 3), (3, 3), (0, 0, 0, 0), (1, 1), 1),
    ((1, 2, 6, 6), (3, 2, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    ((1, 2, 6, 6), (3, 2, 1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    ((1, 2, 6, 5), (3, 2, 2, 2), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    ((1, 2, 6, 7), (3, 2, 3, 2), (2, 1), (1, 0, 1, 0), (1, 1), 1),
    ((1, 2, 6, 6), (3, 2, 3, 3), (1, 1), (1, 2, 0, 1), (1, 1), 1),
    ((1, 2, 7, 6), (3, 2, 3, 3), (2, 2), (0, 1, 2, 0), (1, 1), 1),
    ((1, 2, 7, 7), (3, 2, 3, 3), (1, 1), (0, 0, 0, 0), (2, 2), 1),
    ((1, 2, 8, 8), (3, 2, 3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1),
    ((1, 2, 9, 8), (3, 2, 3, 3), (2, 2), (1, 1, 1, 1), (2, 2), 1),
    ((1, 2, 7, 7), (3, 2, 3, 3), (1, 1), (0, 0, 0, 0), (2, 1), 1),
    ((1, 4, 6, 6), (6, 2, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),
    ((1, 4, 7, 7), (4, 2, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 2),
    ((2, 3, 6, 6), (3, 1, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3),
    ((1, 3, 7, 7), (3, 1, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 3),
    ((1, 3, 6, 6), (6, 1, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3),
    ((1, 3, 8, 8), (3, 1, 3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 3),
    ((1, 3, 8, 8), (3, 1, 5, 5), (2, 2), (2, 2, 2, 2), (1, 1), 3),
    # strided data gradients are computed phase by phase: kernels of every size against the stride
    ((2, 2, 9, 9), (3, 2, 7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1),  # ResNet's stem, odd input
    ((1, 2, 8, 8), (3, 2, 4, 4), (4, 4), (0, 0, 0, 0), (1, 1), 1),  # patch embedding (kernel = stride)
    ((1, 2, 7, 7), (3, 2, 1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),  # 1x1 downsampling, odd input
    ((1, 2, 8, 7), (3, 2, 3, 3), (3, 2), (1, 0, 2, 1), (1, 1), 1),  # stride 3 x 2, uneven padding
    ((1, 4, 9, 6), (4, 1, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 4),  # depthwise
]
for xs, ws, strides, padding, dilation, groups in CONV:
    case("relax.nn.conv2d",
         f"x={shp(xs)},w={shp(ws)},s={strides[0]}{strides[1]},p={''.join(map(str, padding))},"
         f"d={dilation[0]}{dilation[1]},g={groups}",
         lambda x, w, s=strides, p=padding, d=dilation, g=groups: R.nn.conv2d(x, w, s, p, d, g),
         lambda x, w, s=strides, p=padding, d=dilation, g=groups: t_conv(x, w, s, p, d, g),
         rand(*xs), rand(*ws))

# ------------------------------------------------------------------ pooling

POOL = [  # kernel, stride, padding (t, l, b, r), dilation, ceil_mode, (H, W)
    ((2, 2), (2, 2), (0, 0, 0, 0), (1, 1), False, (6, 6)),
    ((2, 2), (2, 2), (0, 0, 0, 0), (1, 1), False, (5, 7)),
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), False, (6, 6)),
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), False, (7, 7)),
    ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), False, (5, 5)),
    ((2, 2), (1, 1), (0, 0, 0, 0), (1, 1), False, (4, 5)),
    ((3, 3), (2, 2), (0, 0, 0, 0), (1, 1), True, (6, 6)),
    ((2, 2), (2, 2), (0, 0, 0, 0), (1, 1), True, (5, 5)),
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), True, (6, 6)),
    ((2, 3), (1, 2), (1, 1, 1, 1), (1, 1), False, (5, 6)),
    ((3, 3), (3, 3), (0, 0, 0, 0), (1, 1), False, (7, 7)),
    ((3, 3), (2, 2), (0, 0, 0, 0), (1, 1), False, (6, 6)),  # overlapping, last row/column in no window
    ((2, 2), (3, 3), (0, 0, 0, 0), (1, 1), False, (7, 8)),  # gaps between windows
]
MAXPOOL_ONLY = [
    ((2, 2), (1, 1), (0, 0, 0, 0), (2, 2), False, (6, 6)),
    ((3, 3), (2, 2), (1, 1, 1, 1), (2, 2), False, (7, 7)),
]


def pool_id(kernel, stride, padding, dilation, ceil_mode, hw):
    return (f"k={kernel[0]}{kernel[1]},s={stride[0]}{stride[1]},p={''.join(map(str, padding))},"
            f"d={dilation[0]}{dilation[1]},ceil={int(ceil_mode)},in={hw[0]}x{hw[1]}")


for kernel, stride, padding, dilation, ceil_mode, hw in POOL + MAXPOOL_ONLY:
    # one shape for the three inputs: identical kernels, compiled once
    for data, tag in [(rand(1, 2, *hw), "random"), (ties(1, 2, *hw), "ties"), (-np.abs(rand(1, 2, *hw)), "negative")]:
        case("relax.nn.max_pool2d", pool_id(kernel, stride, padding, dilation, ceil_mode, hw) + f",{tag}",
             lambda x, k=kernel, s=stride, p=padding, d=dilation, cm=ceil_mode: R.nn.max_pool2d(x, k, s, p, d, cm),
             lambda x, k=kernel, s=stride, p=padding, d=dilation, cm=ceil_mode: F.max_pool2d(
                 x, k, s, p[:2], d, cm),
             data)
for kernel, stride, padding, dilation, ceil_mode, hw in POOL:
    for cip in (False, True):
        if padding == (0, 0, 0, 0) and cip:
            continue
        case("relax.nn.avg_pool2d",
             pool_id(kernel, stride, padding, dilation, ceil_mode, hw) + f",count_include_pad={int(cip)}",
             lambda x, k=kernel, s=stride, p=padding, cm=ceil_mode, cip=cip: R.nn.avg_pool2d(x, k, s, p, 1, cm, cip),
             lambda x, k=kernel, s=stride, p=padding, cm=ceil_mode, cip=cip: F.avg_pool2d(x, k, s, p[:2], cm, cip),
             rand(1, 2, *hw))
case("relax.nn.max_pool2d", "k=22,s=22,p=0000,in=1x1x5x7,negative",  # last row/column in no window
     lambda x: R.nn.max_pool2d(x, 2, 2), lambda x: F.max_pool2d(x, 2, 2), -np.abs(rand(1, 1, 5, 7)))
case("relax.nn.max_pool2d", "k=22,s=22,p=0101(asymmetric),in=5x5",
     lambda x: R.nn.max_pool2d(x, 2, 2, (0, 1, 0, 1)),
     lambda x: F.max_pool2d(F.pad(x, (1, 1, 0, 0), value=-np.inf), 2, 2), rand(1, 2, 5, 5))
case("relax.nn.avg_pool2d", "k=33,s=22,p=1021(asymmetric),count_include_pad=1,in=6x6",
     lambda x: R.nn.avg_pool2d(x, 3, 2, (1, 0, 2, 1), count_include_pad=True),
     lambda x: F.avg_pool2d(F.pad(x, (0, 1, 1, 2)), 3, 2), rand(1, 2, 6, 6))
for out, hw in [((1, 1), (5, 7)), ((2, 3), (5, 7)), ((3, 3), (7, 5)), ((4, 4), (4, 4)), ((3, 2), (6, 6))]:
    case("relax.nn.adaptive_avg_pool2d", f"out={shp(out)},in={shp(hw)}",
         lambda x, o=out: R.nn.adaptive_avg_pool2d(x, o), lambda x, o=out: F.adaptive_avg_pool2d(x, o),
         rand(2, 2, *hw))

# ------------------------------------------------------------------ operators without a float gradient
# Each output feeds the loss through a float path too, so the case checks the rule is called (the
# comparison/creation result is on the path to the loss) and that its contribution is exactly zero.

COMPARE = {
    "relax.equal": (R.equal, torch.eq), "relax.not_equal": (R.not_equal, torch.ne),
    "relax.greater": (R.greater, torch.gt), "relax.greater_equal": (R.greater_equal, torch.ge),
    "relax.less": (R.less, torch.lt), "relax.less_equal": (R.less_equal, torch.le),
}
for op, (rop, top) in COMPARE.items():
    a, b = ties(3, 4), ties(3, 4)
    case(op, "x+astype(cmp(x,y))", lambda x, y, rop=rop: R.add(x, R.astype(rop(x, y), "float64")),
         lambda x, y, top=top: x + top(x, y).double(), a, b)
    case(op, "where(cmp(x,y),x,y),broadcast", lambda x, y, rop=rop: R.where(rop(x, y), x, R.broadcast_to(y, (3, 4))),
         lambda x, y, top=top: torch.where(top(x, y), x, y.broadcast_to((3, 4))), ties(3, 4), ties(4))

case("relax.grad.no_grad", "x*x+no_grad(x)", lambda x: R.add(R.multiply(x, x), no_grad(x)),
     lambda x: x * x + x.detach(), rand(3, 4))
case("relax.grad.no_grad", "no_grad(x)*x", lambda x: R.multiply(no_grad(x), x), lambda x: x.detach() * x, rand(3, 4))
case("relax.zeros", "x+zeros", lambda x: R.add(x, R.zeros((3, 4), "float64")), lambda x: x + torch.zeros(3, 4),
     rand(3, 4))
case("relax.ones", "x*ones", lambda x: R.multiply(x, R.ones((3, 4), "float64")), lambda x: x * torch.ones(3, 4),
     rand(3, 4))
case("relax.full", "x*full(2.5)", lambda x: R.multiply(x, R.full((3, 4), c(np.float64(2.5)), "float64")),
     lambda x: x * torch.full((3, 4), 2.5, dtype=torch.float64), rand(3, 4))
case("relax.full", "x*full(v),v-is-input", lambda x, v: R.multiply(x, R.full((3, 4), v, "float64")),
     lambda x, v: x * torch.full((3, 4), v.item(), dtype=torch.float64), rand(3, 4), rand())
case("relax.zeros_like", "x+zeros_like(x)", lambda x: R.add(x, R.zeros_like(x)), lambda x: x + torch.zeros_like(x),
     rand(3, 4))
case("relax.zeros_like", "zeros_like(x)-only", lambda x: [R.zeros_like(x)], lambda x: [torch.zeros_like(x)],
     rand(3, 4))
case("relax.ones_like", "x*ones_like(x)", lambda x: R.multiply(x, R.ones_like(x)),
     lambda x: x * torch.ones_like(x), rand(3, 4))
case("relax.full_like", "x*full_like(x,v),v-is-input", lambda x, v: R.multiply(x, R.full_like(x, v)),
     lambda x, v: x * torch.full_like(x, v.item()), rand(3, 4), rand())


# ------------------------------------------------------------------ machinery


def _as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _cotangents(case_: Case, outs) -> list[np.ndarray]:
    if not case_.w:
        rng = np.random.default_rng(zlib.crc32(case_.id.encode()))
        case_.w = [rng.standard_normal(tuple(o.shape)).astype(str(o.dtype).replace("torch.", "")) for o in outs]
    return case_.w


def torch_reference(case_: Case):
    xs = [torch.tensor(x, requires_grad=True) for x in case_.inputs]
    outs = _as_list(case_.torch_fn(*xs))
    ws = _cotangents(case_, outs)
    loss = sum((o * torch.tensor(w)).sum() for o, w in zip(outs, ws))
    grads = torch.autograd.grad(loss, xs, allow_unused=True) if loss.requires_grad else [None] * len(xs)
    grads = [np.zeros_like(x) if g is None else g.detach().numpy() for x, g in zip(case_.inputs, grads)]
    return loss.detach().numpy(), grads


def adjoint_function(case_: Case, name: str) -> relax.Function:
    """Relax `name(*inputs) -> sum_k sum(out_k * w_k)`, differentiated w.r.t. every input."""
    torch_reference(case_)  # fixes the cotangents
    params = [relax.Var(f"x{i}", relax.TensorType(x.shape, str(x.dtype))) for i, x in enumerate(case_.inputs)]
    bb = relax.BlockBuilder()
    with bb.function(name, params):
        with bb.dataflow():
            outs = [bb.emit(o) for o in _as_list(case_.build(*params))]
            terms = [bb.emit(R.sum(R.multiply(o, c(w)))) for o, w in zip(outs, case_.w)]
            loss = terms[0]
            for term in terms[1:]:
                loss = bb.emit(R.add(loss, R.astype(term, _dtype(loss)) if _dtype(term) != _dtype(loss) else term))
            loss = bb.emit_output(loss)
        bb.emit_func_output(loss)
    gradients.install()
    mod = relax.transform.Gradient(name)(bb.get())
    return mod[f"{name}_adjoint"].with_attr("global_symbol", f"{name}_adjoint")


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


CHUNK = 48  # cases per compiled module (fewer, larger modules compile faster; a failing one is bisected)


class Results:
    """Per target: case id -> (loss, grads) or the exception that building/running the case raised."""

    def __init__(self):
        self.by_target: dict[str, dict] = {}
        self.adjoints: dict[str, object] = {}  # case id -> adjoint function or exception (target-free)

    def adjoint(self, cs: Case):
        if cs.id not in self.adjoints:
            try:
                self.adjoints[cs.id] = adjoint_function(cs, f"case{CASES.index(cs)}")
            except Exception as err:  # noqa: BLE001 - reported by that case's test
                self.adjoints[cs.id] = err
        return self.adjoints[cs.id]

    def get(self, target_name: str, wanted: list[Case]):
        done = self.by_target.setdefault(target_name, {})
        todo = [cs for cs in wanted if cs.id not in done]
        ok = []
        for cs in todo:
            fn = self.adjoint(cs)
            if isinstance(fn, Exception):
                done[cs.id] = fn
            else:
                ok.append((cs, fn))
        for i in range(0, len(ok), CHUNK):
            done.update(_compile_and_run(ok[i:i + CHUNK], TARGETS[target_name]))
        return done


def _compile_and_run(items, target) -> dict:
    """Compile the adjoints together and run them; a failing compile is bisected down to the culprit."""
    mod = tvm.IRModule({})
    for _cs, fn in items:
        name = fn.attrs["global_symbol"]
        mod[name] = fn
    try:
        with without_kernel_argument_checks():  # as the step's build does: half the code to emit
            vm = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target(target)), tvm.cpu())
    except Exception as err:  # noqa: BLE001 - the failure is the result, bisected to its case
        if len(items) == 1:
            return {items[0][0].id: err}
        half = len(items) // 2
        return {**_compile_and_run(items[:half], target), **_compile_and_run(items[half:], target)}
    res = {}
    for cs, fn in items:
        try:
            loss, grads = vm[fn.attrs["global_symbol"]](*[tvm.runtime.tensor(x) for x in cs.inputs])
            res[cs.id] = (loss.numpy(), [g.numpy() for g in grads])
        except Exception as err:  # noqa: BLE001 - the failure is the case's result
            res[cs.id] = err
    return res


_RESULTS = Results()
CASE_BY_ID = {cs.id: cs for cs in CASES}
assert len(CASE_BY_ID) == len(CASES), "duplicate case ids"


FIRST_CASE_OF_OP = {cs.op: cs.id for cs in reversed(CASES)}
AUDITED = [(cs.id, "llvm-O0") for cs in CASES] + [(cs.id, "llvm") for cs in CASES if FIRST_CASE_OF_OP[cs.op] == cs.id]


@pytest.fixture(scope="module")
def selected_cases(request):
    """{target name: the cases this session runs there} (so `-k` does not compile the whole table)."""
    wanted = {(item.callspec.params["case_id"], item.callspec.params["target_name"]) for item in request.session.items
              if hasattr(item, "callspec") and "case_id" in item.callspec.params}
    return {target: [cs for cs in CASES if (cs.id, target) in wanted] for target in TARGETS}


def _check(actual, expected, tol, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != torch's {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    if np.float32 in (actual.dtype, expected.dtype):
        tol = max(tol, 1e-6)
    err = float(np.max(np.abs(actual.astype("float64") - expected.astype("float64")), initial=0.0))
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} (scale {scale:.3g})"


@pytest.mark.parametrize("case_id, target_name", [pytest.param(c, t, id=f"{c}-{t}") for c, t in AUDITED])
def test_rule_matches_torch(case_id, target_name, selected_cases):
    cs = CASE_BY_ID[case_id]
    result = _RESULTS.get(target_name, selected_cases[target_name] or [cs])[case_id]
    if isinstance(result, Exception):
        raise result
    loss, grads = result
    ref_loss, ref_grads = torch_reference(cs)
    _check(loss, ref_loss, cs.tol, "forward (loss)")
    assert len(grads) == len(ref_grads)
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        _check(g, rg, cs.tol, f"gradient w.r.t. input {i}")


def test_every_registered_rule_is_audited():
    gradients.install()
    registered = {name for name in tvm.ir.Op.list_op_names()
                  if tvm.ir.Op.get(name).get_attr("FPrimalGradient") is not None}
    audited = {cs.op for cs in CASES}
    assert set(gradients.RULES) <= registered
    assert not registered - audited, f"operators with a gradient rule but no audit case: {sorted(registered - audited)}"
    assert not audited - registered, f"audited operators without a rule: {sorted(audited - registered)}"
