"""The int8 operators of a quantized training graph: pockengine/quantize.py puts them in a model
(as PyTorch custom operators), the frontend imports them as these Relax operators.

Every value between these operators is an integer: in the differentiated graph it is held in the
model's float dtype (a gradient flows through it, so it must be a float tensor, as in PyTorch);
passes/narrow_quantized.py then stores it as int8. The arithmetic is the integer arithmetic of
TFLite and CMSIS-NN whatever the storage dtype, so a float64 step, a float32 step, an int8 step and
the Cortex-M firmware compute the same integers:

    quantize(x, inv_scale, [zero, qmin, qmax])
        q = clip(round(x * inv_scale) + zero, qmin, qmax)                 round: half away from zero
    quantized_conv2d(x, w, b, multiplier, shift, [zero_x, zero_y, qmin, qmax, stride_h, stride_w,
                     pad_top, pad_left, pad_bottom, pad_right, dilation_h, dilation_w, groups])
        acc = conv2d(x - zero_x, round(w)) + round(b)                      int32 (padding: zero_x)
        y = clip(requantize(acc, multiplier[c], shift[c]) + zero_y, qmin, qmax)
    quantized_add(x1, x2, [zero_1, zero_2, zero_y, multiplier_1, multiplier_2, shift, qmin, qmax])
        y = clip(requantize((x1 - zero_1) * multiplier_1 + (x2 - zero_2) * multiplier_2, 1, shift)
                 + zero_y, qmin, qmax)                                      int64
    quantized_mean(x)      (global average pooling over H and W, keeping them as 1 x 1)
        y = (2 * sum(x) + H W) // (2 H W)                                  round half up

    requantize(acc, m, n) = (acc * m + 2^(n-1)) >> n                        int64, arithmetic shift

`requantize` is CMSIS-NN's single-rounding requantization (arm_nn_requantize with
CMSIS_NN_USE_SINGLE_ROUNDING): the effective scale s_x s_w / s_y is m / 2^n with m in [2^30, 2^31).
A fused ReLU or ReLU6 is the clip range [qmin, qmax]. Trained weights and biases are float values
rounded in the forward (MCUNetV3 keeps them so); frozen ones are integers already.

Gradients (autodiff/gradients.py) are MCUNetV3's: float, straight through every rounding, the
requantization's scale m / 2^n applied, zero outside the clip range.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx

from ..ir import operand_shape, register_operator, te_legalizer

QUANTIZE = "pockengine.quantize"
CONV2D = "pockengine.quantized_conv2d"
ADD = "pockengine.quantized_add"
MEAN = "pockengine.quantized_mean"
CONV2D_INPUT_GRAD = "pockengine.quantized_conv2d_input_grad"
CONV2D_WEIGHT_GRAD = "pockengine.quantized_conv2d_weight_grad"
OPS = (QUANTIZE, CONV2D, ADD, MEAN)  # the forward operators (a gradient rule each)
GRAD_OPS = (CONV2D_INPUT_GRAD, CONV2D_WEIGHT_GRAD)
INT8_MIN, INT8_MAX = -128, 127
STORAGE_DTYPE = "int8"

# Positions in the integer configuration of each operator (an int64 constant tensor argument).
CONV_ZERO_X, CONV_ZERO_Y, CONV_QMIN, CONV_QMAX = range(4)
ADD_ZERO_1, ADD_ZERO_2, ADD_ZERO_Y, ADD_MULTIPLIER_1, ADD_MULTIPLIER_2, ADD_SHIFT, ADD_QMIN, ADD_QMAX = range(8)
QUANTIZE_ZERO, QUANTIZE_QMIN, QUANTIZE_QMAX = range(3)
CONV_CONFIG_LENGTH, ADD_CONFIG_LENGTH, QUANTIZE_CONFIG_LENGTH = 13, 8, 3
# The attribute on quantized_conv2d's legalized PrimFunc: its configuration (gone once fused with others).
CONV2D_KERNEL_ATTR = "pockengine.quantized_conv2d"


def config_constant(values):
    return relax.const(np.asarray([int(v) for v in values], dtype="int64"), "int64")  # not narrowed to int32


def config_of(call, index: int) -> list[int]:
    """The integer configuration a call carries as argument `index`."""
    arg = call.args[index]
    if not isinstance(arg, tvm.ir.expr.Constant):
        raise ValueError(f"{call.op.name}: its configuration (argument {index}) must be a constant, got {arg}")
    return [int(v) for v in arg.value.numpy()]


def conv_attrs(config: list[int]) -> dict:
    """The convolution attributes in a quantized_conv2d configuration, as relax.nn.conv2d names them."""
    return {"strides": config[4:6], "padding": config[6:10], "dilation": config[10:12], "groups": config[12]}


def quantize(x, inv_scale, config) -> relax.Call:
    return relax.Call(tvm.ir.Op.get(QUANTIZE), [x, inv_scale, config])


def quantized_conv2d(x, weight, bias, multiplier, shift, config, frozen_weight=None) -> relax.Call:
    """`frozen_weight`: the weight is given in two parts, `weight` its first k channels (trained)
    and `frozen_weight` the rest (passes/prune_backward.py): input channels for a convolution of
    one group, output channels for a depthwise one."""
    extra = [] if frozen_weight is None else [frozen_weight]
    return relax.Call(tvm.ir.Op.get(CONV2D), [x, weight, bias, multiplier, shift, config, *extra])


def quantized_conv2d_input_grad(grad, weight, config, input_shape, frozen_weight=None) -> relax.Call:
    """The gradient of quantized_conv2d's input x (of `input_shape`) from the gradient of its
    integer accumulation `grad` (float): a transposed convolution reading the int8 weights as stored."""
    extra = [] if frozen_weight is None else [frozen_weight]
    config = config_constant(list(config) + list(input_shape))
    return relax.Call(tvm.ir.Op.get(CONV2D_INPUT_GRAD), [grad, weight, config, *extra])


def quantized_conv2d_weight_grad(x, grad, config, weight_shape) -> relax.Call:
    """The gradient of quantized_conv2d's weight (of `weight_shape`: the trained part of a split
    one) from x (int8 values as stored: the zero point and padding are applied inside) and `grad`."""
    return relax.Call(tvm.ir.Op.get(CONV2D_WEIGHT_GRAD), [x, grad, config_constant(list(config) + list(weight_shape))])


def quantized_add(x1, x2, config) -> relax.Call:
    return relax.Call(tvm.ir.Op.get(ADD), [x1, x2, config])


def quantized_mean(x) -> relax.Call:
    return relax.Call(tvm.ir.Op.get(MEAN), [x])


def is_quantized_op(call) -> bool:
    """A forward operator of a quantized graph or one of its gradient operators (both read int8 values)."""
    return isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name in OPS + GRAD_OPS


# ---------------------------------------------------------------- types


def _conv_output_shape(call) -> list[int]:
    x_shape = operand_shape(call.args[0], "x", CONV2D)
    w_shape = operand_shape(call.args[1], "weight", CONV2D)
    config = config_of(call, 5)
    if len(call.args) > 6:  # split weight: the parts together
        frozen = operand_shape(call.args[6], "frozen weight", CONV2D)
        axis = _split_axis(conv_attrs(config)["groups"])
        w_shape[axis] += frozen[axis]
    if len(config) != CONV_CONFIG_LENGTH or len(x_shape) != 4 or len(w_shape) != 4:
        raise ValueError(f"{CONV2D}: expects NCHW x, OIHW weight and {CONV_CONFIG_LENGTH} integers of "
                         f"configuration, got x {x_shape}, weight {w_shape}, {len(config)} integers")
    return [x_shape[0], w_shape[0], *conv_output_size(x_shape[2:], w_shape[2:], conv_attrs(config))]


def _infer_quantize(call, _builder):
    return relax.TensorType(call.args[0].ty.shape, call.args[0].ty.dtype)


def _infer_conv(call, _builder):
    return relax.TensorType(_conv_output_shape(call), call.args[0].ty.dtype)


def _infer_input_grad(call, _builder):
    return relax.TensorType(config_of(call, 2)[CONV_CONFIG_LENGTH:], call.args[0].ty.dtype)


def _infer_weight_grad(call, _builder):
    return relax.TensorType(config_of(call, 2)[CONV_CONFIG_LENGTH:], call.args[1].ty.dtype)


def _infer_add(call, _builder):
    return relax.TensorType(call.args[0].ty.shape, call.args[0].ty.dtype)


def _infer_mean(call, _builder):
    n, c, _, _ = operand_shape(call.args[0], "x", MEAN)
    return relax.TensorType([n, c, 1, 1], call.args[0].ty.dtype)


# ---------------------------------------------------------------- integer arithmetic (TE)


def round_half_away(value):
    """`value` rounded to the nearest integer, halves away from zero, exactly: trunc(v) plus the sign
    where |v - trunc(v)| >= 1/2 (v - trunc(v) is exact). Not tirx.round, which LLVM lowers to
    nearbyint (halves to even) and the C code generator to roundf (halves away): the host and the
    microcontroller would round a weight ending in .5 differently. Not floor(v + 1/2) either: the
    addition itself rounds (0.49999997f + 0.5f == 1.0f)."""
    dtype = _dtype_of(value)
    whole = tirx.trunc(value)
    fraction = value - whole  # no fabs: TVM's C code generator has no rule for it
    up = tirx.Select(fraction >= tirx.const(0.5, dtype), tirx.const(1, dtype), tirx.const(0, dtype))
    down = tirx.Select(fraction <= tirx.const(-0.5, dtype), tirx.const(-1, dtype), tirx.const(0, dtype))
    return whole + up + down


def _dtype_of(value) -> str:
    """A TIR expression's dtype (a tensor element read from TE has `.dtype`, an expression `.ty`)."""
    return str(value.dtype) if hasattr(value, "dtype") else str(value.ty.dtype)


def relax_round_half_away(value):
    """round_half_away as Relax operators (for the gradient rules, which see the same integers)."""
    whole = relax.op.trunc(value)
    fraction = relax.op.subtract(value, whole)
    half, zero = relax.const(0.5, str(value.ty.dtype)), relax.op.zeros_like(value)
    one = relax.op.ones_like(value)
    up = relax.op.where(relax.op.greater_equal(fraction, half), one, zero)
    down = relax.op.where(relax.op.less_equal(fraction, relax.op.negative(half)), relax.op.negative(one), zero)
    return relax.op.add(relax.op.add(whole, up), down)


def _to_int(value, dtype: str):
    """An integer held in `value` (float: rounded half away from zero; integer: widened) as `dtype`."""
    if "float" in _dtype_of(value):
        return round_half_away(value).astype(dtype)
    return value.astype(dtype)


def requantize(acc, multiplier, shift):
    """(acc * multiplier + 2^(shift-1)) >> shift in int64: CMSIS-NN's single rounding."""
    one = tirx.const(1, "int64")
    wide = acc.astype("int64") * multiplier.astype("int64")
    shift = shift.astype("int64")
    return tirx.shift_right(wide + tirx.shift_left(one, shift - one), shift)


def _clip_to(value, qmin: int, qmax: int, dtype: str):
    kind = _dtype_of(value)
    return tirx.max(tirx.min(value, tirx.const(qmax, kind)), tirx.const(qmin, kind)).astype(dtype)


def _quantize_te(x, inv_scale, *, config):
    zero, qmin, qmax = config
    return te.compute(
        x.shape,
        lambda *i: _clip_to(round_half_away(x(*i) * inv_scale()).astype("int32") + zero, qmin, qmax, x.dtype),
        name="quantize")


def _split_axis(groups: int) -> int:
    """The axis a split weight is split along: input channels (1) for a convolution of one group,
    output channels (0) for a depthwise one (prune_backward's convention)."""
    return 1 if groups == 1 else 0


def _weight_reader(weight, frozen, groups: int):
    """(o, c, ky, kx) -> the integer weight as int32, from one tensor or from its two parts."""
    if frozen is None:
        return lambda o, c, ky, kx: _to_int(weight[o, c, ky, kx], "int32")
    axis = _split_axis(groups)
    k = int(weight.shape[axis])

    def read(o, c, ky, kx):
        index = [o, c]
        first, rest = list(index), list(index)
        first[axis] = tirx.min(index[axis], k - 1)
        rest[axis] = tirx.max(index[axis] - k, 0)
        return tirx.if_then_else(index[axis] < k, _to_int(weight[first[0], first[1], ky, kx], "int32"),
                                 _to_int(frozen[rest[0], rest[1], ky, kx], "int32"))

    return read


def _conv_te(x, weight, bias, multiplier, shift, frozen=None, *, config):
    """One reduction reading x and the weight as they are stored (the zero point, the padding and the
    widening to int32 happen inside it: no centred, padded or widened copy is ever made) and the
    requantization after it."""
    zero_x, zero_y, qmin, qmax = config[:4]
    attrs = conv_attrs(config)
    (stride_h, stride_w), (top, left, _, _) = attrs["strides"], attrs["padding"]
    (dil_h, dil_w), groups = attrs["dilation"], attrs["groups"]
    _, _, in_h, in_w = (int(d) for d in x.shape)
    c_out, c_per_group, k_h, k_w = _full_weight_shape(weight, frozen, groups)
    out_shape = [int(x.shape[0]), c_out] + conv_output_size(x.shape[2:], (k_h, k_w), attrs)
    read_weight = _weight_reader(weight, frozen, groups)
    out_per_group = c_out // groups
    rc = te.reduce_axis((0, c_per_group), name="rc")
    ry = te.reduce_axis((0, k_h), name="ry")
    rx = te.reduce_axis((0, k_w), name="rx")

    def tap(b, o, h, w):
        row, col = h * stride_h + ry * dil_h - top, w * stride_w + rx * dil_w - left
        inside = tirx.all(row >= 0, row < in_h, col >= 0, col < in_w)
        channel = o // out_per_group * c_per_group + rc
        value = tirx.if_then_else(inside, _to_int(x[b, channel, row, col], "int32") - zero_x, tirx.const(0, "int32"))
        return value * read_weight(o, rc, ry, rx)

    acc = te.compute(out_shape, lambda b, o, h, w: te.sum(tap(b, o, h, w), axis=[rc, ry, rx]), name="accumulate")
    return te.compute(
        out_shape,
        lambda b, o, h, w: _clip_to(
            requantize(acc[b, o, h, w] + _to_int(bias[o], "int32"), multiplier[o], shift[o]) + zero_y,
            qmin, qmax, x.dtype),
        name="requantize")


def _full_weight_shape(weight, frozen, groups: int) -> list[int]:
    shape = [int(d) for d in weight.shape]
    if frozen is not None:
        shape[_split_axis(groups)] += int(frozen.shape[_split_axis(groups)])
    return shape


def conv_output_size(in_size, kernel, attrs) -> list[int]:
    """(out_h, out_w) of a convolution of `kernel` (kh, kw) over an input of `in_size` (h, w)."""
    (stride_h, stride_w), (top, left, bottom, right) = attrs["strides"], attrs["padding"]
    dil_h, dil_w = attrs["dilation"]
    k_h, k_w = (int(k) for k in kernel)
    return [(int(in_size[0]) + top + bottom - dil_h * (k_h - 1) - 1) // stride_h + 1,
            (int(in_size[1]) + left + right - dil_w * (k_w - 1) - 1) // stride_w + 1]


def _input_grad_te(grad, weight, frozen=None, *, config):
    """x_grad[n, c, h, w] = sum over the outputs (o, oh, ow) whose window reads (h, w) with tap
    (ky, kx): grad[n, o, oh, ow] * W[o, c, ky, kx], oh = (h + top - ky dil) / stride when whole."""
    attrs, (c_in, in_h, in_w) = conv_attrs(config), config[CONV_CONFIG_LENGTH:][1:]
    (stride_h, stride_w), (top, left, _, _) = attrs["strides"], attrs["padding"]
    (dil_h, dil_w), groups = attrs["dilation"], attrs["groups"]
    c_out, c_per_group, k_h, k_w = _full_weight_shape(weight, frozen, groups)
    _, _, out_h, out_w = (int(d) for d in grad.shape)
    out_per_group = c_out // groups
    read_weight = _weight_reader(weight, frozen, groups)
    ro = te.reduce_axis((0, out_per_group), name="ro")
    ry, rx = te.reduce_axis((0, k_h), name="ry"), te.reduce_axis((0, k_w), name="rx")

    def term(n, c, h, w):
        o = c // c_per_group * out_per_group + ro
        row, col = h + top - ry * dil_h, w + left - rx * dil_w
        oh, ow = tirx.floordiv(row, stride_h), tirx.floordiv(col, stride_w)
        hit = tirx.all(row >= 0, col >= 0, tirx.floormod(row, stride_h) == 0, tirx.floormod(col, stride_w) == 0,
                       oh < out_h, ow < out_w)
        safe_h, safe_w = tirx.min(tirx.max(oh, 0), out_h - 1), tirx.min(tirx.max(ow, 0), out_w - 1)
        return tirx.if_then_else(hit, grad[n, o, safe_h, safe_w] * read_weight(o, c % c_per_group, ry, rx)
                                 .astype(grad.dtype), tirx.const(0, grad.dtype))

    shape = (int(grad.shape[0]), c_in, in_h, in_w)
    return te.compute(shape, lambda n, c, h, w: te.sum(term(n, c, h, w), axis=[ro, ry, rx]), name="input_grad")


def _weight_grad_te(x, grad, *, config):
    """w_grad[o, c, ky, kx] = sum over n, oh, ow of grad[n, o, oh, ow] (x - zero_x)[n, c', row, col]
    (zero in the padding): the first channels only when the weight is split (its trained part)."""
    attrs = conv_attrs(config)
    zero_x = config[CONV_ZERO_X]
    (stride_h, stride_w), (top, left, _, _) = attrs["strides"], attrs["padding"]
    (dil_h, dil_w), groups = attrs["dilation"], attrs["groups"]
    shape = config[CONV_CONFIG_LENGTH:]
    _, c_per_group, _, _ = shape
    n_batch, _, out_h, out_w = (int(d) for d in grad.shape)
    _, _, in_h, in_w = (int(d) for d in x.shape)
    c_out = int(grad.shape[1])
    out_per_group = c_out // groups
    rn, ry, rx = (te.reduce_axis((0, n_batch), name="rn"), te.reduce_axis((0, out_h), name="ry"),
                  te.reduce_axis((0, out_w), name="rx"))

    def term(o, c, ky, kx):
        row, col = ry * stride_h + ky * dil_h - top, rx * stride_w + kx * dil_w - left
        inside = tirx.all(row >= 0, row < in_h, col >= 0, col < in_w)
        channel = o // out_per_group * c_per_group + c
        value = tirx.if_then_else(inside, _to_int(x[rn, channel, tirx.min(tirx.max(row, 0), in_h - 1),
                                                   tirx.min(tirx.max(col, 0), in_w - 1)], "int32") - zero_x,
                                  tirx.const(0, "int32"))
        return grad[rn, o, ry, rx] * value.astype(grad.dtype)

    return te.compute(shape, lambda o, c, ky, kx: te.sum(term(o, c, ky, kx), axis=[rn, ry, rx]), name="weight_grad")


def _add_te(x1, x2, *, config):
    zero_1, zero_2, zero_y, m1, m2, shift, qmin, qmax = config

    def element(*i):
        wide = ((_to_int(x1(*i), "int64") - zero_1) * m1 + (_to_int(x2(*i), "int64") - zero_2) * m2)
        rounded = tirx.shift_right(wide + tirx.const(1 << (shift - 1), "int64"), tirx.const(shift, "int64"))
        return _clip_to(rounded + zero_y, qmin, qmax, x1.dtype)

    return te.compute(x1.shape, element, name="quantized_add")


def _mean_te(x):
    n, c, h, w = (int(d) for d in x.shape)
    ry, rx = te.reduce_axis((0, h), name="ry"), te.reduce_axis((0, w), name="rx")
    total = te.compute((n, c), lambda b, o: te.sum(_to_int(x[b, o, ry, rx], "int32"), axis=[ry, rx]), name="total")
    count = h * w
    return te.compute((n, c, 1, 1),
                      lambda b, o, _i, _j: tirx.floordiv(2 * total[b, o] + count, 2 * count).astype(x.dtype),
                      name="quantized_mean")


for _name, _infer, _legalize in ((QUANTIZE, _infer_quantize, te_legalizer(_quantize_te, "quantize", 2)),
                                 (CONV2D, _infer_conv,
                                  te_legalizer(_conv_te, "quantized_conv2d", 5, CONV2D_KERNEL_ATTR)),
                                 (ADD, _infer_add, te_legalizer(_add_te, "quantized_add", 2)),
                                 (MEAN, _infer_mean, te_legalizer(_mean_te, "quantized_mean")),
                                 (CONV2D_INPUT_GRAD, _infer_input_grad,
                                  te_legalizer(_input_grad_te, "quantized_conv2d_input_grad", 2)),
                                 (CONV2D_WEIGHT_GRAD, _infer_weight_grad,
                                  te_legalizer(_weight_grad_te, "quantized_conv2d_weight_grad", 2))):
    register_operator(_name, _infer, _legalize)
