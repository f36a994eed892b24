"""Gradient rules that TVM's Relax lacks (or gets different from PyTorch), one per operator.

Each rule is `rule(orig_var, orig_call, output_grad, ctx) -> [grad of each argument]`, the signature of
Relax's `FPrimalGradient`. A rule's docstring gives the forward form and the backward formula, so the
table reads as the math. `install()` registers the whole table once; the step builder calls it before
running `relax.transform.Gradient`.

Rules that *override* TVM's own do so because TVM's disagrees with torch.autograd, our numerical
oracle (tests/autodiff/test_rule_audit.py checks every rule either side registered, over the
attributes each op accepts): relu and abs at the kink, maximum/minimum at ties, cumsum's
`exclusive`, where's and split's shapes, triu's arity, dilated conv2d, max_pool2d's out-of-bounds
reads, avg_pool2d's ceil-mode divisor. Each docstring says what TVM's rule got wrong.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.op import (
    add,
    astype,
    broadcast_to,
    collapse_sum_to,
    concat,
    cumsum,
    equal,
    erf,
    exp,
    flip,
    greater,
    less,
    log,
    logical_and,
    matmul,
    multiply,
    permute_dims,
    power,
    reshape,
    scatter_elements,
    sign,
    strided_slice,
    subtract,
    tanh,
    triu,
    where,
    zeros,
    zeros_like,
)
from tvm.relax.op.grad import max_pool2d_backward, no_grad, take_backward
from tvm.relax.op.nn import conv2d, conv2d_transpose

from ..frontend import quantized_ops, w4_ops, w8_ops
from . import linear_log_prob

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


def _sum_to(grad, grad_shape: list[int], like):
    """Undo numpy broadcasting: sum `grad` (of the broadcast shape) down to the shape of `like`."""
    return grad if grad_shape == _shape(like) else collapse_sum_to(grad, like.ty.shape)


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
    return [multiply(output_grad, multiply(_const(2 / math.sqrt(math.pi), x),
                                           exp(multiply(_const(-1, x), multiply(x, x)))))]


@rule("relax.power")
def power_grad(orig_var, orig_call, output_grad, ctx):
    """z = x ** y  ->  x_grad = y * x^(y - 1) * z_grad,  y_grad = z * ln(x) * z_grad (x > 0), each summed
    to its operand's shape

    TVM's rule is this math, but for a constant exponent c it still computes x^(c - 1) with a libm
    `pow` per element, the exponent a runtime tensor: RMSNorm's `x.pow(2)` cost 0.8 ms per layer in
    SmolLM's backward (256 x 576). Here a scalar constant c gives c * x^(c - 1), the power written
    out as products for c - 1 in {0, 1, 2}, and no gradient for the constant.
    """
    x, y = orig_call.args
    out_shape = _shape(orig_var)
    exponent = _scalar_constant(y)
    if exponent is None:
        one = _const(1, y)
        return [_sum_to(multiply(output_grad, multiply(y, power(x, subtract(y, one)))), out_shape, x),
                _sum_to(multiply(output_grad, multiply(orig_var, log(x))), out_shape, y)]
    lower = exponent - 1
    if lower == 0:
        derivative = _const(exponent, x)
    elif lower in (1, 2):
        derivative = multiply(_const(exponent, x), x if lower == 1 else multiply(x, x))
    else:
        derivative = multiply(_const(exponent, x), power(x, _const(lower, x)))
    return [_sum_to(multiply(output_grad, derivative), out_shape, x), no_grad(y)]


def _scalar_constant(expr):
    """The value of a one-element float constant, else None."""
    if isinstance(expr, tvm.ir.expr.Constant):
        value = expr.value.numpy()
        if value.size == 1 and value.dtype.kind == "f":
            return float(value.reshape(()))
    return None


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
    """y = x[begin:end:stride] along `axes`  ->  x_grad = y_grad spread into zeros(shape(x))

    Per sliced axis, innermost slice first: y_grad's m entries are spread `stride` apart (a zero
    axis of stride - 1 appended to each and the two merged), then zero-padded to x's extent. Only
    pads, reshapes and slices: TVM's slice_scatter gathers its source at out-of-range indices (its
    clamp is the slice's end, not the source's extent), which TVM lowers wrong once the kernel's
    loops are fused.
    """
    x, axes, begins, ends = orig_call.args[:4]
    axes, begins, ends = _ints(axes), _ints(begins), _ints(ends)
    strides = _ints(orig_call.args[4]) if len(orig_call.args) > 4 else [1] * len(axes)
    shape = _shape(x)
    steps = []  # (axis, start, stride, extent before this cut, extent after)
    for axis, begin, end, stride in zip(axes, begins, ends, strides):
        if stride <= 0:
            raise NotImplementedError("strided_slice gradient: only positive strides are supported")
        axis = axis % len(shape)
        start, stop, _ = slice(begin, end, stride).indices(shape[axis])
        count = len(range(start, stop, stride))
        steps.append((axis, start, stride, shape[axis], count))
        shape[axis] = count
    grad = output_grad
    for axis, start, stride, extent, count in reversed(steps):
        grad = _spread(grad, shape, axis, start, stride, extent, count)
        shape[axis] = extent
    return [grad] + [no_grad(arg) for arg in orig_call.args[1:]]


def _spread(grad, shape: list, axis: int, start: int, stride: int, extent: int, count: int):
    """grad (of `shape`, `count` long on `axis`) at positions start, start + stride, ... of a zero
    tensor `extent` long on `axis`."""
    if stride > 1 and count > 0:  # [a, b] -> [a, 0, .., b, 0, ..] (stride - 1 zeros after each)
        split = shape[:axis + 1] + [1] + shape[axis + 1:]
        pad = [0] * (2 * len(split))
        pad[2 * (axis + 1) + 1] = stride - 1
        grad = relax.op.nn.pad(reshape(grad, split), pad)
        spread = shape[:axis] + [count * stride] + shape[axis + 1:]
        grad = reshape(grad, spread)
    length = count * stride
    after = extent - start - length  # negative: the trailing zeros of the last entry run past x
    if after < 0:
        grad = strided_slice(grad, [axis], [0], [length + after])
        after = 0
    widths = [0] * (2 * len(shape))
    widths[2 * axis], widths[2 * axis + 1] = start, after
    return relax.op.nn.pad(grad, widths) if start or after else grad


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
        grad = take_backward(flat, _like(reshape(x, [-1])), reshape(index, [-1]), 0)
        return [reshape(grad, x.ty.shape), no_grad(index)]
    axis = axis % len(_shape(x))
    shape = _shape(x)
    count = int(np.prod(_shape(index), dtype=np.int64))
    grad_shape = shape[:axis] + [count] + shape[axis + 1:]
    grad = take_backward(reshape(output_grad, grad_shape), _like(x), reshape(index, [count]), axis)
    return [grad, no_grad(index)]


def _like(x):
    """x for an operator that reads only its type (take_backward's x): zeros of x's shape and dtype
    when x is a forward intermediate, which passing x would keep alive until the backward as a saved
    activation (a decomposed bilinear interpolation's four gathered corners, each the output's
    size); x itself when it is the step's input or state (an embedding table), alive anyway."""
    return zeros(x.ty.shape, x.ty.dtype) if isinstance(x, relax.DataflowVar) else x


@rule("relax.gather_elements")
def gather_elements_grad(orig_var, orig_call, output_grad, ctx):
    """y = gather_elements(x, index, axis)  ->  x_grad = scatter_add(zeros(shape(x)), index, y_grad, axis)"""
    x, index = orig_call.args
    axis = int(orig_call.attrs.axis)
    # zeros from x's type, not zeros_like(x): that would keep the forward's x alive for the backward
    return [scatter_elements(zeros(x.ty.shape, x.ty.dtype), index, output_grad, axis, "add"), no_grad(index)]


@rule(linear_log_prob.OP_NAME)
def linear_log_prob_grad(orig_var, orig_call, output_grad, ctx):
    """y[i] = log_softmax(x @ W^T)[i, labels[i]]  ->  d = y_grad[:, None] * (onehot(labels) - softmax(x @ W^T)),
    x_grad = d @ W, W_grad = d^T @ x

    One operator for both gradients, bound once (a tuple: the logits are computed again for it, in
    chunks, by passes/chunk_linear_log_prob.py; DCE drops the gradient nobody trains).
    """
    x, weight, labels, *w4_operands = orig_call.args
    grads = ctx.emit(linear_log_prob.linear_log_prob_grad(orig_call, output_grad))
    if w4_operands:  # a 4-bit head is frozen: x's gradient only (read packed, as the forward reads it)
        return [relax.TupleGetItem(grads, 0), no_grad(weight), no_grad(labels), *map(no_grad, w4_operands)]
    return [relax.TupleGetItem(grads, 0), relax.TupleGetItem(grads, 1), no_grad(labels)]


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
    return [_separable_pool_grad(output_grad, _adaptive_pool_matrix(h, oh), _adaptive_pool_matrix(w, ow), x)]


def _separable_pool_grad(output_grad, rows: np.ndarray, cols: np.ndarray, x):
    """x_grad[n, c] = rows^T y_grad[n, c] cols for a pooling y[n, c] = rows x[n, c] cols^T."""
    dtype = _dtype(x)
    return matmul(matmul(relax.const(rows.T.astype(dtype), dtype), output_grad), relax.const(cols.astype(dtype), dtype))


# ---------------------------------------------------------------- gradient barriers


@rule("relax.grad.no_grad")
def no_grad_grad(orig_var, orig_call, output_grad, ctx):
    """y = no_grad(x) (the identity)  ->  x_grad = none: the frontend's gradient barrier (the rows
    of an nn.Embedding's padding_idx, which PyTorch never updates)."""
    return [no_grad(orig_call.args[0])]


# ---------------------------------------------------------------- binary


def _select_grad(orig_var, orig_call, output_grad, x_wins):
    """Gradients of z = x if x_wins(x, y) else y, split evenly at ties, summed to each operand's shape."""
    x, y = orig_call.args
    shape, zero = _shape(orig_var), _const(0, x)
    half = multiply(output_grad, _const(0.5, x))
    tie = equal(x, y)
    x_grad = where(x_wins(x, y), output_grad, where(tie, half, zero))
    y_grad = where(x_wins(y, x), output_grad, where(tie, half, zero))
    return [_sum_to(x_grad, shape, x), _sum_to(y_grad, shape, y)]


@rule("relax.maximum")
def maximum_grad(orig_var, orig_call, output_grad, ctx):
    """z = maximum(x, y)  ->  x_grad = sum_to_x(g * (x > y) + g/2 * (x == y)),
    y_grad = sum_to_y(g * (y > x) + g/2 * (x == y))

    At ties PyTorch splits the gradient evenly; TVM gives all of it to x (and none to y).
    """
    return _select_grad(orig_var, orig_call, output_grad, greater)


@rule("relax.minimum")
def minimum_grad(orig_var, orig_call, output_grad, ctx):
    """z = minimum(x, y)  ->  x_grad = sum_to_x(g * (x < y) + g/2 * (x == y)),
    y_grad = sum_to_y(g * (y < x) + g/2 * (x == y))

    At ties PyTorch splits the gradient evenly; TVM gives all of it to y (and none to x).
    """
    return _select_grad(orig_var, orig_call, output_grad, less)


# ---------------------------------------------------------------- unary


@rule("relax.abs")
def abs_grad(orig_var, orig_call, output_grad, ctx):
    """y = abs(x)  ->  x_grad = sign(x) * y_grad   (0 at x == 0, as PyTorch; TVM gives +y_grad there)"""
    return [multiply(output_grad, sign(orig_call.args[0]))]


# ---------------------------------------------------------------- statistical


@rule("relax.cumsum")
def cumsum_grad(orig_var, orig_call, output_grad, ctx):
    """y = cumsum(x, axis, exclusive)  ->  x_grad = flip(cumsum(flip(y_grad), axis, exclusive))

    The reversed cumulative sum, exclusive when the forward is. TVM's rule ignores `exclusive` (it
    returns the inclusive reversed sum, i.e. adds y_grad once too often) and computes the reversed
    sum as sum - cumsum + y_grad. axis=None is over the flattened input.
    """
    x = orig_call.args[0]
    exclusive = bool(orig_call.attrs.exclusive) if orig_call.attrs.exclusive is not None else False
    axis = orig_call.attrs.axis
    grad = output_grad
    if axis is None:
        grad = reshape(flip(cumsum(flip(grad, 0), 0, exclusive=exclusive), 0), x.ty.shape)
    else:
        axis = int(axis)
        grad = flip(cumsum(flip(grad, axis), axis, exclusive=exclusive), axis)
    if _dtype(orig_var) != _dtype(x):
        grad = astype(grad, _dtype(x))
    return [grad]


# ---------------------------------------------------------------- selection and manipulation


@rule("relax.where")
def where_grad(orig_var, orig_call, output_grad, ctx):
    """y = where(cond, a, b)  ->  a_grad = sum_to_a(where(cond, y_grad, 0)),
    b_grad = sum_to_b(where(cond, 0, y_grad))

    TVM's rule returns the broadcast (output-shaped) gradients: wrong shape for a broadcast branch
    (a (1, n) bias, a scalar fill value) or a condition broadcast over the branches.
    """
    cond, a, b = orig_call.args
    shape = _shape(orig_var)
    a_grad = where(cond, output_grad, _const(0, a))
    b_grad = where(cond, _const(0, b), output_grad)
    return [no_grad(cond), _sum_to(a_grad, shape, a), _sum_to(b_grad, shape, b)]


@rule("relax.triu")
def triu_grad(orig_var, orig_call, output_grad, ctx):
    """y = triu(x, k)  ->  x_grad = triu(y_grad, k)

    TVM's rule returns one partial for triu's two arguments (x and the PrimValue k), which the
    Gradient pass rejects ("partials number != inputs number").
    """
    x, k = orig_call.args
    return [triu(output_grad, k), no_grad(k)]


@rule("relax.split")
def split_grad(orig_var, orig_call, output_grad, ctx):
    """(y_1, ..., y_n) = split(x, indices_or_sections, axis)  ->  x_grad = concat(y_grads, axis)

    Relax's split into one section is the tensor itself, not a 1-tuple: then x_grad = y_grad. TVM's
    rule calls concat on that tensor and fails.
    """
    if not isinstance(orig_var.ty, relax.TupleType):
        return [output_grad]
    return [concat(output_grad, int(orig_call.attrs.axis))]


# ---------------------------------------------------------------- convolution and pooling


@rule("relax.nn.conv2d")
def conv2d_grad(orig_var, orig_call, output_grad, ctx):
    """y = conv2d(x, w, strides, padding, dilation, groups)  (NCHW / OIHW)
    ->  x_grad = conv2d_transpose(y_grad, w, strides, padding, output_padding, dilation, groups)
                 (strided without dilation: one stride-1 transposed convolution per phase, see
                 _strided_data_grad),
        w_grad = conv2d(x, y_grad) with strides and dilation swapped (in CNHW / IOHW), over the input
                 rows and columns some window reaches (so it comes out at w's size)

    TVM's rule computes output_padding as if the kernel were undilated ((k - 1) * d + 1 is its
    extent): for dilation > 1 output_padding comes out >= stride and conv2d_transpose rejects it.
    TVM's weight gradient is computed over the whole padded input and then cut to the kernel's size.
    The rest is TVM's rule.
    """
    attrs = orig_call.attrs
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        raise NotImplementedError("conv2d gradient: only NCHW data / OIHW kernel layouts")
    data, weight = orig_call.args
    batch, _, grad_h, grad_w = _shape(orig_var)
    _, in_channel, in_h, in_w = _shape(data)
    _, _, filter_h, filter_w = _shape(weight)
    pad_top, pad_left, pad_bottom, pad_right = [int(p) for p in attrs.padding]
    stride_h, stride_w = [int(s) for s in attrs.strides]
    dilation_h, dilation_w = [int(d) for d in attrs.dilation]
    groups = int(attrs.groups)

    if (stride_h, stride_w) != (1, 1) and (dilation_h, dilation_w) == (1, 1):
        data_grad = _strided_data_grad(output_grad, weight, orig_var, data, attrs, groups)
    else:
        out_h = (grad_h - 1) * stride_h - pad_top - pad_bottom + (filter_h - 1) * dilation_h + 1
        out_w = (grad_w - 1) * stride_w - pad_left - pad_right + (filter_w - 1) * dilation_w + 1
        data_grad = conv2d_transpose(
            output_grad, weight, attrs.strides, attrs.padding, (in_h - out_h, in_w - out_w), attrs.dilation,
            groups, "NCHW", "IOHW", "NCHW", attrs.out_dtype,
        )

    if groups != 1:
        data = reshape(data, (batch, groups, in_channel // groups, in_h, in_w))
        data = permute_dims(data, [1, 0, 2, 3, 4])
        data = reshape(data, (batch * groups, in_channel // groups, in_h, in_w))
    # The input rows and columns after the last one a window reaches (a stride-2 convolution of an
    # even-sized input never reads its last padded row) would make the weight gradient larger than
    # the kernel (4x4 for a 3x3: 16/9 of the work, then cut). They are left out: the trailing padding
    # shrinks, or the input is cut where there is not enough padding.
    excess_h = (in_h - (grad_h - 1) * stride_h - 1 + pad_top + pad_bottom) // dilation_h + 1 - filter_h
    excess_w = (in_w - (grad_w - 1) * stride_w - 1 + pad_left + pad_right) // dilation_w + 1 - filter_w
    pad_bottom -= excess_h * dilation_h
    pad_right -= excess_w * dilation_w
    if pad_bottom < 0 or pad_right < 0:
        data = strided_slice(data, [2, 3], [0, 0], [in_h + min(pad_bottom, 0), in_w + min(pad_right, 0)])
        pad_bottom, pad_right = max(pad_bottom, 0), max(pad_right, 0)
    weight_grad = conv2d(
        data, output_grad, strides=attrs.dilation, padding=(pad_top, pad_left, pad_bottom, pad_right),
        dilation=attrs.strides, groups=groups,
        out_dtype=attrs.out_dtype, data_layout="CNHW", kernel_layout="IOHW", out_layout="CNHW",
    )
    return [data_grad, weight_grad]


def _strided_data_grad(output_grad, weight, orig_var, data, attrs, groups):
    """x_grad of a stride-(s_h, s_w) convolution without dilation, phase by phase: the input rows
    y = s_h Y + q_h (and columns alike) receive only the kernel taps k = r_h, r_h + s_h, ... where
    r_h = (q_h + pad_top) % s_h, so each of the s_h x s_w phases is a stride-1 transposed convolution
    of y_grad with that slice of the kernel, its output rows starting at (q_h + pad_top) // s_h:
        x_grad[n, c, s_h Y + q_h, s_w X + q_w] = conv2d_transpose(y_grad, w[:, :, r_h::s_h, r_w::s_w])
                                                 [n, c, Y + (q_h + pad_top) // s_h, X + ...]
    and the phases are interleaved. conv2d_transpose with the stride computes the same over y_grad
    with s - 1 zeros between its entries: s_h x s_w times the multiply-adds (4x for a stride-2
    convolution), most of them by zero."""
    batch, _, grad_h, grad_w = _shape(orig_var)
    _, in_channel, in_h, in_w = _shape(data)
    _, _, filter_h, filter_w = _shape(weight)
    stride_h, stride_w = [int(v) for v in attrs.strides]
    pad_top, pad_left = int(attrs.padding[0]), int(attrs.padding[1])
    rows, cols = -(-in_h // stride_h), -(-in_w // stride_w)  # each phase's extent (the last ones cut)
    phase_rows = []
    for q_h in range(stride_h):
        phases = []
        for q_w in range(stride_w):
            r_h, r_w = (q_h + pad_top) % stride_h, (q_w + pad_left) % stride_w
            taps_h, taps_w = len(range(r_h, filter_h, stride_h)), len(range(r_w, filter_w, stride_w))
            if taps_h == 0 or taps_w == 0:  # a kernel smaller than the stride: these inputs are never read
                phases.append(relax.op.zeros((batch, in_channel, rows, cols), _dtype(orig_var)))
                continue
            taps = strided_slice(weight, [2, 3], [r_h, r_w], [filter_h, filter_w], [stride_h, stride_w])
            phases.append(_transposed_window(output_grad, taps, groups, attrs.out_dtype,
                                             ((q_h + pad_top) // stride_h, rows, grad_h + taps_h - 1, taps_h),
                                             ((q_w + pad_left) // stride_w, cols, grad_w + taps_w - 1, taps_w)))
        phase_rows.append(relax.op.stack(phases, axis=4))  # (N, C, rows, cols, s_w)
    interleaved = reshape(relax.op.stack(phase_rows, axis=3), (batch, in_channel, rows * stride_h, cols * stride_w))
    if (rows * stride_h, cols * stride_w) == (in_h, in_w):
        return interleaved
    return strided_slice(interleaved, [2, 3], [0, 0], [in_h, in_w])


def _transposed_window(output_grad, taps, groups, out_dtype, window_h, window_w):
    """Rows [start, start + count) (and columns alike) of the stride-1 transposed convolution of
    y_grad with `taps`, whose full output has `extent` rows (zero past them); window_h and
    window_w: (start, count, extent, taps). The cut is the transposed convolution's own padding
    where that is one (at most taps - 1 on each side), else a slice; rows past the extent are zeros."""
    def own_padding(start, count, extent, n_taps):
        after = extent - start - count
        return (start, max(after, 0)) if start <= n_taps - 1 and after <= n_taps - 1 else (0, 0)

    (top, bottom), (left, right) = own_padding(*window_h), own_padding(*window_w)
    phase = conv2d_transpose(output_grad, taps, (1, 1), (top, left, bottom, right), (0, 0), (1, 1), groups,
                             "NCHW", "IOHW", "NCHW", out_dtype)
    (start_h, count_h, extent_h, _), (start_w, count_w, extent_w, _) = window_h, window_w
    extent_h, extent_w = extent_h - top - bottom, extent_w - left - right
    start_h, start_w = start_h - top, start_w - left
    end_h, end_w = min(start_h + count_h, extent_h), min(start_w + count_w, extent_w)
    if (start_h, start_w, end_h, end_w) != (0, 0, extent_h, extent_w):
        phase = strided_slice(phase, [2, 3], [start_h, start_w], [end_h, end_w])
    if end_h - start_h < count_h or end_w - start_w < count_w:
        phase = relax.op.nn.pad(phase, [0, 0, 0, 0, 0, count_h - (end_h - start_h), 0, count_w - (end_w - start_w)])
    return phase


def _avg_pool_matrix(in_size, out_size, kernel, stride, pad_before, pad_after, count_include_pad):
    """(out_size, in_size) matrix of avg_pool's weights along one axis (PyTorch's and Relax's forward):
    window i covers [i * stride - pad_before, + kernel) clipped to [0, in); its divisor factor is the
    window's extent clipped to [-pad_before, in + pad_after) with count_include_pad, else the clipped
    extent inside the input."""
    m = np.zeros((out_size, in_size))
    for i in range(out_size):
        start = i * stride - pad_before
        end = min(start + kernel, in_size + pad_after)
        lo, hi = max(start, 0), min(end, in_size)
        divisor = (end - start) if count_include_pad else (hi - lo)
        if hi > lo:
            m[i, lo:hi] = 1.0 / divisor
    return m


@rule("relax.nn.avg_pool2d")
def avg_pool2d_grad(orig_var, orig_call, output_grad, ctx):
    """y = avg_pool2d(x) is linear and separable (the divisor is a product of per-axis extents, with or
    without count_include_pad): y[n, c] = P_h x[n, c] P_w^T  ->  x_grad[n, c] = P_h^T y_grad[n, c] P_w

    TVM's avg_pool2d_backward (topi pool_grad) disagrees with its own forward for ceil_mode windows
    that run past the padded input with count_include_pad: it divides by the full kernel area, the
    forward (and PyTorch) by the window's extent inside the padded input.
    """
    attrs = orig_call.attrs
    x = orig_call.args[0]
    if attrs.layout != "NCHW" or (attrs.out_layout is not None and attrs.out_layout != "NCHW"):
        raise NotImplementedError("avg_pool2d gradient: only NCHW layout")
    if any(int(d) != 1 for d in attrs.dilation):
        raise NotImplementedError("avg_pool2d gradient: dilation is not supported")
    kh, kw = [int(k) for k in attrs.pool_size]
    sh, sw = [int(s) for s in attrs.strides]
    pt, pl, pb, pr = [int(p) for p in attrs.padding]
    cip = bool(attrs.count_include_pad)
    _, _, h, w = _shape(x)
    _, _, oh, ow = _shape(orig_var)
    return [_separable_pool_grad(output_grad, _avg_pool_matrix(h, oh, kh, sh, pt, pb, cip),
                                 _avg_pool_matrix(w, ow, kw, sw, pl, pr, cip), x)]


# ---------------------------------------------------------------- max pooling


@rule("relax.nn.max_pool2d")
def max_pool2d_grad(orig_var, orig_call, output_grad, ctx):
    """y[n, c, a, b] = max over (i, j) of x_pad[n, c, a*s_h + i*d_h, b*s_w + j*d_w]  (padding -inf)
    ->  x_grad = y_grad routed to each window's FIRST maximum in row-major order, summed over windows

    PyTorch's rule. TVM's pool_grad kernel is used where it is right: it reads its argmax and y_grad
    out of bounds when input rows or columns lie past the last window (garbage at the default opt
    level: kernel 2, stride 2 on 5x7) and cannot be lowered with dilation. There, each of the kh*kw
    window offsets is a strided view of the padded input; an offset takes the gradient where it
    equals the window's maximum and no earlier offset did, and its share is spread back to the
    positions it reads (pads and reshapes only). (That form is kept to those cases: after our CPU
    schedule it computed ResNet's stem — 7x7/2 conv, ReLU, 3/2/1 pool on 16x16 — wrong, which
    TVM's kernel does not; not yet explained.)
    """
    x = orig_call.args[0]
    attrs = orig_call.attrs
    if attrs.layout != "NCHW" or (attrs.out_layout or "NCHW") != "NCHW":
        raise NotImplementedError(f"max_pool2d gradient: only NCHW layout is supported, got {attrs.layout}")
    kh, kw = (int(v) for v in attrs.pool_size)
    sh, sw = (int(v) for v in attrs.strides)
    dh, dw = (int(v) for v in attrs.dilation)
    top, left, bottom, right = (int(v) for v in attrs.padding)
    n, c, h, w = _shape(x)
    oh, ow = _shape(orig_var)[2:]
    # How far the windows reach into the padded input, along each axis.
    span_h, span_w = (oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1
    if (dh, dw) == (1, 1) and span_h - top >= h and span_w - left >= w:
        return [max_pool2d_backward(output_grad, x, attrs.pool_size, attrs.strides, attrs.padding, attrs.dilation,
                                    attrs.ceil_mode, attrs.count_include_pad, attrs.layout, attrs.out_layout)]
    # Pad with -inf far enough for every window (ceil_mode windows may run past the stated padding).
    bottom, right = max(bottom, span_h - h - top), max(right, span_w - w - left)
    padded = relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right], pad_value=float("-inf"))
    ph, pw = h + top + bottom, w + left + right
    taken = grad = None
    for i in range(kh):
        for j in range(kw):
            window = strided_slice(padded, [2, 3], [i * dh, j * dw],
                                   [i * dh + (oh - 1) * sh + 1, j * dw + (ow - 1) * sw + 1], [sh, sw])
            is_max = equal(window, orig_var)
            first = is_max if taken is None else logical_and(is_max, relax.op.logical_not(taken))
            taken = is_max if taken is None else relax.op.logical_or(taken, is_max)
            share = where(first, output_grad, _const(0, x))
            share = _spread(share, [n, c, oh, ow], 3, j * dw, sw, pw, ow)
            share = _spread(share, [n, c, oh, pw], 2, i * dh, sh, ph, oh)
            grad = share if grad is None else add(grad, share)
    return [strided_slice(grad, [2, 3], [top, left], [top + h, left + w])]


# ---------------------------------------------------------------- int8 operators (MCUNetV3)


def _inside_clip(y, low: int, high: int):
    """Where an integer output was not clipped: strictly inside [low, high], as torch's relu and
    hardtanh (ReLU6) pass a gradient. MCUNetV3 tests the value before clipping, inclusive; the
    output alone cannot tell a value that reached a bound from one clipped to it, and a fused ReLU
    is the clip, so the output decides here."""
    return logical_and(greater(y, _const(low, y)), less(y, _const(high, y)))


def _requantize_scale(multiplier, shift, like):
    """m / 2^n per channel, in the gradient's dtype (exact in float64)."""
    dtype = _dtype(like)
    power = astype(relax.op.left_shift(relax.const(1, "int64"), astype(shift, "int64")), dtype)
    return relax.op.divide(astype(multiplier, dtype), power)


@rule(quantized_ops.QUANTIZE)
def quantize_grad(orig_var, orig_call, output_grad, ctx):
    """q = clip(round(x * inv_scale) + zero, qmin, qmax)
    ->  x_grad = q_grad * inv_scale where q is inside the clip range (straight through the rounding)."""
    x, inv_scale, config = orig_call.args
    _, qmin, qmax = quantized_ops.config_of(orig_call, 2)
    grad = where(_inside_clip(orig_var, qmin, qmax), output_grad, zeros_like(output_grad))
    return [multiply(grad, astype(inv_scale, _dtype(x))), no_grad(inv_scale), no_grad(config)]


@rule(quantized_ops.CONV2D)
def quantized_conv2d_grad(orig_var, orig_call, output_grad, ctx):
    """y = clip(requantize(conv2d(x - zero_x, round(w)) + round(b), m, n) + zero_y, qmin, qmax)
    ->  g = y_grad * (m / 2^n)[c] where y is inside the clip range (MCUNetV3's _QuantizedConv2dFunc:
        straight through both roundings),
        b_grad = sum of g over N, H, W,
        x_grad = conv2d_transpose(g, round(w)), w_grad = conv2d(x - zero_x, g) over the windows,
        as quantized_conv2d_input_grad / _weight_grad: they read x and w as stored (int8 once
        narrow_quantized ran), never a float copy of them.
    A weight in two parts (prune_backward: trained first channels, frozen rest) gets the gradient
    of its trained part only."""
    x, weight, bias, multiplier, shift, config = orig_call.args[:6]
    frozen = orig_call.args[6] if len(orig_call.args) > 6 else None
    values = quantized_ops.config_of(orig_call, 5)
    scale = reshape(ctx.emit(_requantize_scale(multiplier, shift, orig_var)), (1, -1, 1, 1))
    inside = _inside_clip(orig_var, values[quantized_ops.CONV_QMIN], values[quantized_ops.CONV_QMAX])
    grad = ctx.emit(multiply(where(inside, output_grad, zeros_like(output_grad)), scale))
    x_grad = quantized_ops.quantized_conv2d_input_grad(grad, weight, values, _shape(x), frozen)
    w_grad = quantized_ops.quantized_conv2d_weight_grad(x, grad, values, _shape(weight))
    b_grad = relax.op.sum(grad, axis=[0, 2, 3])
    grads = [x_grad, w_grad, b_grad, no_grad(multiplier), no_grad(shift), no_grad(config)]
    return grads + ([no_grad(frozen)] if frozen is not None else [])


@rule(quantized_ops.ADD)
def quantized_add_grad(orig_var, orig_call, output_grad, ctx):
    """y = clip(requantize((x1 - z1) m1 + (x2 - z2) m2, 1, n) + zero_y, qmin, qmax)
    ->  x1_grad = y_grad * m1 / 2^n, x2_grad = y_grad * m2 / 2^n where y is inside the clip range."""
    x1, x2, config = orig_call.args
    _, _, _, m1, m2, shift, qmin, qmax = quantized_ops.config_of(orig_call, 2)
    grad = ctx.emit(where(_inside_clip(orig_var, qmin, qmax), output_grad, zeros_like(output_grad)))
    return [multiply(grad, _const(m1 / 2.0 ** shift, orig_var)), multiply(grad, _const(m2 / 2.0 ** shift, orig_var)),
            no_grad(config)]


@rule(quantized_ops.MEAN)
def quantized_mean_grad(orig_var, orig_call, output_grad, ctx):
    """y = round(mean of x over H, W)  ->  x_grad = y_grad / (H W), spread over H, W (MCUNetV3's
    _QuantizedAvgPoolFunc: straight through the rounding)."""
    x = orig_call.args[0]
    _, _, h, w = _shape(x)
    return [broadcast_to(multiply(output_grad, _const(1.0 / (h * w), orig_var)), x.ty.shape)]


# ---------------------------------------------------------------- 4-bit weights (AWQ)


@rule(w4_ops.MATMUL)
def w4_matmul_grad(orig_var, orig_call, output_grad, ctx):
    """y = x W^T, W dequantized from 4 bits  ->  x_grad = y_grad W (w4_matmul_input_grad: read packed,
    as the forward reads it); the packed weight, its scales and zero points are frozen: no gradient."""
    x, packed, scales, zeros, config = orig_call.args
    x_grad = w4_ops.w4_matmul_input_grad(output_grad, packed, scales, zeros, w4_ops.group_size_of(orig_call),
                                         _shape(x)[-1])
    return [x_grad, no_grad(packed), no_grad(scales), no_grad(zeros), no_grad(config)]


@rule(w8_ops.W8_MATMUL)
@rule(w8_ops.W8A8_MATMUL)
def w8_matmul_grad(orig_var, orig_call, output_grad, ctx):
    """y = x (q_w s_w)^T (W8), or its W8A8 form with x rounded per token  ->  x_grad = y_grad (q_w s_w)
    (w8_matmul_input_grad, reading the int8 weight), straight through the rounding of x as
    SmoothQuant's fake quantization is; the int8 weight and its scales are frozen: no gradient."""
    _, weight, scales = orig_call.args
    return [w8_ops.w8_matmul_input_grad(output_grad, weight, scales), no_grad(weight), no_grad(scales)]


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
    except Exception:  # noqa: BLE001 - not an operator at all (e.g. a call_tir target)
        return False
