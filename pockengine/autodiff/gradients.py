"""Gradient rules that TVM's Relax lacks (or gets different from PyTorch), one per operator.

Each rule is `rule(orig_var, orig_call, output_grad, ctx) -> [grad of each argument]`, the signature of
Relax's `FPrimalGradient`. A rule's docstring gives the forward form and the backward formula, so the
table reads as the math. `install()` registers the whole table once; the step builder calls it before
running `relax.transform.Gradient`.

Rules that *override* TVM's own (relu) do so because PyTorch defines the derivative at the kink
differently, and PyTorch is our numerical oracle.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax
from tvm.relax.op import (
    add,
    broadcast_to,
    erf,
    exp,
    greater,
    less,
    logical_and,
    matmul,
    multiply,
    reshape,
    scatter_elements,
    slice_scatter,
    strided_slice,
    subtract,
    tanh,
    where,
    zeros,
    zeros_like,
)
from tvm.relax.op.grad import no_grad, take_backward

RULES: dict = {}


def rule(op_name: str):
    """Add the decorated function to the table as the gradient of `op_name`."""

    def add_rule(fn):
        RULES[op_name] = fn
        return fn

    return add_rule


# ---------------------------------------------------------------- helpers


def _dtype(expr) -> str:
    return str(expr.ty.dtype.dtype if hasattr(expr.ty.dtype, "dtype") else expr.ty.dtype)


def _shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def _const(value: float, like) -> relax.Constant:
    return relax.const(value, _dtype(like))


def _ints(tuple_expr) -> list[int]:
    """Python ints out of a Relax Tuple/ShapeExpr of static values (strided_slice's axes, begin, ...)."""
    values = tuple_expr.values if isinstance(tuple_expr, relax.ShapeExpr) else tuple_expr.fields
    return [int(v.value) if hasattr(v, "value") else int(v) for v in values]


# ---------------------------------------------------------------- activations


@rule("relax.nn.relu")
def relu_grad(orig_var, orig_call, output_grad, ctx):
    """y = relu(x)  ->  x_grad = where(x > 0, y_grad, 0)

    TVM passes the gradient through at x == 0; PyTorch (threshold_backward) does not. Zeros are common
    inputs (a ReLU after a ReLU or a max-pool of ReLU outputs), so the kink matters for parity.
    """
    x = orig_call.args[0]
    return [where(greater(x, _const(0, x)), output_grad, _const(0, x))]


@rule("relax.clip")
def clip_grad(orig_var, orig_call, output_grad, ctx):
    """y = clip(x, lo, hi)  (ReLU6 is clip(x, 0, 6))  ->  x_grad = where(lo < x < hi, y_grad, 0)

    Strict inequalities, as PyTorch's hardtanh_backward: at either bound the gradient is zero.
    """
    x, lo, hi = orig_call.args
    inside = logical_and(greater(x, _const(float(lo.value), x)), less(x, _const(float(hi.value), x)))
    return [where(inside, output_grad, _const(0, x)), no_grad(lo), no_grad(hi)]


@rule("relax.nn.relu6")
def relu6_grad(orig_var, orig_call, output_grad, ctx):
    """y = relu6(x) = clip(x, 0, 6)  ->  x_grad = where(0 < x < 6, y_grad, 0)"""
    x = orig_call.args[0]
    inside = logical_and(greater(x, _const(0, x)), less(x, _const(6, x)))
    return [where(inside, output_grad, _const(0, x))]


@rule("relax.nn.leakyrelu")
def leakyrelu_grad(orig_var, orig_call, output_grad, ctx):
    """y = leaky_relu(x, a)  ->  x_grad = where(x > 0, y_grad, a * y_grad)"""
    x = orig_call.args[0]
    alpha = _const(float(orig_call.attrs.alpha), x)
    return [where(greater(x, _const(0, x)), output_grad, multiply(alpha, output_grad))]


@rule("relax.nn.gelu")
def gelu_grad(orig_var, orig_call, output_grad, ctx):
    """y = x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2
    ->  x_grad = y_grad * (Phi(x) + x * exp(-x^2 / 2) / sqrt(2 pi))"""
    x = orig_call.args[0]
    cdf = multiply(_const(0.5, x), add(_const(1, x), erf(multiply(x, _const(math.sqrt(0.5), x)))))
    pdf = multiply(_const(1 / math.sqrt(2 * math.pi), x), exp(multiply(_const(-0.5, x), multiply(x, x))))
    return [multiply(output_grad, add(cdf, multiply(x, pdf)))]


@rule("relax.nn.gelu_tanh")
def gelu_tanh_grad(orig_var, orig_call, output_grad, ctx):
    """y = x/2 * (1 + tanh(u)), u = k (x + 0.044715 x^3), k = sqrt(2/pi)
    ->  x_grad = y_grad * ((1 + t) / 2 + x/2 * (1 - t^2) * k (1 + 3 * 0.044715 x^2)), t = tanh(u)"""
    x = orig_call.args[0]
    k, c = math.sqrt(2 / math.pi), 0.044715
    x2 = multiply(x, x)
    t = tanh(multiply(_const(k, x), add(x, multiply(_const(c, x), multiply(x2, x)))))
    du = multiply(_const(k, x), add(_const(1, x), multiply(_const(3 * c, x), x2)))
    half = _const(0.5, x)
    dy = add(
        multiply(half, add(_const(1, x), t)),
        multiply(multiply(half, x), multiply(subtract(_const(1, x), multiply(t, t)), du)),
    )
    return [multiply(output_grad, dy)]


@rule("relax.rsqrt")
def rsqrt_grad(orig_var, orig_call, output_grad, ctx):
    """y = 1 / sqrt(x)  ->  x_grad = -y^3 / 2 * y_grad"""
    y = orig_var
    return [multiply(output_grad, multiply(_const(-0.5, y), multiply(y, multiply(y, y))))]


@rule("relax.erf")
def erf_grad(orig_var, orig_call, output_grad, ctx):
    """y = erf(x)  ->  x_grad = 2 / sqrt(pi) * exp(-x^2) * y_grad"""
    x = orig_call.args[0]
    return [multiply(output_grad, multiply(_const(2 / math.sqrt(math.pi), x), exp(multiply(_const(-1, x), multiply(x, x)))))]


# ---------------------------------------------------------------- shape and indexing


@rule("relax.flatten")
def flatten_grad(orig_var, orig_call, output_grad, ctx):
    """y = flatten(x)  ->  x_grad = reshape(y_grad, shape(x))"""
    x = orig_call.args[0]
    return [reshape(output_grad, x.ty.shape)]


@rule("relax.squeeze")
def squeeze_grad(orig_var, orig_call, output_grad, ctx):
    """y = squeeze(x, axis)  ->  x_grad = reshape(y_grad, shape(x))"""
    x = orig_call.args[0]
    return [reshape(output_grad, x.ty.shape)]


@rule("relax.strided_slice")
def strided_slice_grad(orig_var, orig_call, output_grad, ctx):
    """y = x[begin:end:stride] along `axes`  ->  x_grad = y_grad scattered into zeros(shape(x))

    One slice_scatter per sliced axis, innermost slice first, each into the zero tensor of the shape
    the slice had before that axis was cut.
    """
    x, axes, begins, ends = orig_call.args[:4]
    axes, begins, ends = _ints(axes), _ints(begins), _ints(ends)
    strides = _ints(orig_call.args[4]) if len(orig_call.args) > 4 else [1] * len(axes)
    shape = _shape(x)
    steps = []  # (axis, start, stop, stride, shape before this cut)
    for axis, begin, end, stride in zip(axes, begins, ends, strides):
        if stride <= 0:
            raise NotImplementedError("strided_slice gradient: only positive strides are supported")
        start, stop, _ = slice(begin, end, stride).indices(shape[axis])
        steps.append((axis, start, stop, stride, list(shape)))
        shape[axis] = len(range(start, stop, stride))
    grad = output_grad
    for axis, start, stop, stride, before in reversed(steps):
        grad = slice_scatter(zeros(relax.ShapeExpr(before), _dtype(x)), grad, start, stop, stride, axis)
    return [grad] + [no_grad(arg) for arg in orig_call.args[1:]]


@rule("relax.take")
def take_grad(orig_var, orig_call, output_grad, ctx):
    """y = take(x, index, axis)  ->  x_grad = scatter-add of y_grad into zeros(shape(x)) at `index`

    TVM's own rule lowers only 1-D indices; a 0-d index (`x[1]`, attention's q/k/v `select`) or an
    N-d one (embeddings of a (batch, seq) token tensor) is flattened to 1-D first, with y_grad
    reshaped to match.
    """
    x, index = orig_call.args
    axis = int(orig_call.attrs.axis) if orig_call.attrs.axis is not None else None
    if axis is None:  # take over the flattened input
        flat = reshape(output_grad, [-1])
        grad = take_backward(flat, reshape(x, [-1]), reshape(index, [-1]), 0)
        return [reshape(grad, x.ty.shape), no_grad(index)]
    axis = axis % len(_shape(x))
    shape = _shape(x)
    count = int(np.prod(_shape(index), dtype=np.int64))
    grad_shape = shape[:axis] + [count] + shape[axis + 1:]
    grad = take_backward(reshape(output_grad, grad_shape), x, reshape(index, [count]), axis)
    return [grad, no_grad(index)]


@rule("relax.gather_elements")
def gather_elements_grad(orig_var, orig_call, output_grad, ctx):
    """y = gather_elements(x, index, axis)  ->  x_grad = scatter_add(zeros_like(x), index, y_grad, axis)"""
    x, index = orig_call.args
    axis = int(orig_call.attrs.axis)
    return [scatter_elements(zeros_like(x), index, output_grad, axis, "add"), no_grad(index)]


@rule("relax.nn.pad")
def pad_grad(orig_var, orig_call, output_grad, ctx):
    """y = pad(x, [(before_i, after_i)], constant)  ->  x_grad = y_grad[before_i : before_i + n_i]"""
    x = orig_call.args[0]
    if orig_call.attrs.pad_mode != "constant":
        raise NotImplementedError(f"pad gradient: only constant padding, got {orig_call.attrs.pad_mode!r}")
    widths = [int(w) for w in orig_call.attrs.pad_width]
    shape = _shape(x)
    axes = list(range(len(shape)))
    begin = [widths[2 * i] for i in axes]
    end = [widths[2 * i] + shape[i] for i in axes]
    return [strided_slice(output_grad, axes, begin, end)] + [no_grad(a) for a in orig_call.args[1:]]


# ---------------------------------------------------------------- pooling


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix whose rows average PyTorch's adaptive windows
    [floor(i * in / out), ceil((i + 1) * in / out))."""
    m = np.zeros((out_size, in_size))
    for i in range(out_size):
        start = (i * in_size) // out_size
        stop = -((-(i + 1) * in_size) // out_size)
        m[i, start:stop] = 1.0 / (stop - start)
    return m


@rule("relax.nn.adaptive_avg_pool2d")
def adaptive_avg_pool2d_grad(orig_var, orig_call, output_grad, ctx):
    """y = adaptive_avg_pool2d(x) is separable and linear: y[n, c] = P_h x[n, c] P_w^T with P the
    window-averaging matrices  ->  x_grad[n, c] = P_h^T y_grad[n, c] P_w.

    The global-pool case (output 1x1) is a broadcast of y_grad / (H * W).
    """
    x = orig_call.args[0]
    if orig_call.attrs.layout != "NCHW":
        raise NotImplementedError("adaptive_avg_pool2d gradient: only NCHW layout is supported")
    shape = _shape(x)
    h, w = shape[2], shape[3]
    oh, ow = _shape(orig_var)[2:]
    if (oh, ow) == (1, 1):
        return [broadcast_to(multiply(output_grad, _const(1.0 / (h * w), x)), x.ty.shape)]
    dtype = _dtype(x)
    ph_t = relax.const(_adaptive_pool_matrix(h, oh).T.astype(dtype), dtype)
    pw = relax.const(_adaptive_pool_matrix(w, ow).astype(dtype), dtype)
    return [matmul(matmul(ph_t, output_grad), pw)]


# ---------------------------------------------------------------- registration

_installed = False


def install() -> None:
    """Register every rule as its operator's FPrimalGradient (idempotent).

    Level 110 outranks TVM's built-in registrations (level 10), which is what the overrides need.
    """
    global _installed
    if _installed:
        return
    from tvm.relax.op import register_gradient

    for op_name, fn in RULES.items():
        register_gradient(op_name, fn, level=110)
    _installed = True


def has_gradient(op_name: str) -> bool:
    """True if Relax's Gradient pass can differentiate through `op_name` once `install()` ran."""
    import tvm

    if op_name in RULES:
        return True
    try:
        return tvm.ir.Op.get(op_name).get_attr("FPrimalGradient") is not None
    except Exception:  # not an operator at all (e.g. a call_tir target)
        return False
