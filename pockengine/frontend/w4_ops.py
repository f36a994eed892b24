"""The 4-bit weight operators (pockengine/awq.py's W4Linear), as Relax operators.

    w4_matmul(x, packed, scales, zeros, [group_size])             y[..., n] = sum_k x[..., k] W[n, k]
    w4_matmul_input_grad(dy, packed, scales, zeros, [group_size]) dx[..., k] = sum_n dy[..., n] W[n, k]
    w4_take(ids, packed, scales, zeros, [group_size, dim])      y[..., k] = W[ids[...], k]   (a 4-bit embedding)

    W[n, k] = (q[n, k] - zeros[n, k / g]) * scales[n, k / g]
    q[n, k] = (packed[n, k / 2] >> 4 (k % 2)) & 15            two 4-bit values a byte, low nibble first

Both read the packed weight as it is stored and dequantize inside their reduction: no float copy of
a 4-bit weight is ever made, in the forward or in the backward (whose data gradient is the second
operator). The weight has no gradient: a W4 weight is frozen (autodiff/gradients.py).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx

from ..ir import PANEL_OPERAND, operand_shape, register_operator, te_legalizer

MATMUL = "pockengine.w4_matmul"
MATMUL_INPUT_GRAD = "pockengine.w4_matmul_input_grad"
TAKE = "pockengine.w4_take"
OPS = (MATMUL, MATMUL_INPUT_GRAD)  # the matmuls
CONFIG_INDEX = 4  # the integer configuration [group_size] is the last argument


def _config(group_size: int) -> relax.Constant:
    return relax.const(np.asarray([int(group_size)], dtype="int64"), "int64")


def group_size_of(call) -> int:
    arg = call.args[CONFIG_INDEX]
    if not isinstance(arg, tvm.ir.expr.Constant):
        raise ValueError(f"{call.op.name}: its group size (argument {CONFIG_INDEX}) must be a constant, got {arg}")
    return int(arg.value.numpy()[0])


def w4_matmul(x, packed, scales, zeros, group_size: int) -> relax.Call:
    return relax.Call(tvm.ir.Op.get(MATMUL), [x, packed, scales, zeros, _config(group_size)])


def w4_matmul_input_grad(grad, packed, scales, zeros, group_size: int, in_features: int) -> relax.Call:
    """dx of w4_matmul from dy: its last axis is `in_features` long (the packed width may hold one more)."""
    config = relax.const(np.asarray([int(group_size), int(in_features)], dtype="int64"), "int64")
    return relax.Call(tvm.ir.Op.get(MATMUL_INPUT_GRAD), [grad, packed, scales, zeros, config])


def w4_take(ids, packed, scales, zeros, group_size: int, dim: int) -> relax.Call:
    config = relax.const(np.asarray([int(group_size), int(dim)], dtype="int64"), "int64")
    return relax.Call(tvm.ir.Op.get(TAKE), [ids, packed, scales, zeros, config])


def _infer_take(call, _builder):
    ids = operand_shape(call.args[0], "ids", TAKE)
    dim = int(call.args[CONFIG_INDEX].value.numpy()[1])
    return relax.TensorType([*ids, dim], call.args[2].ty.dtype)


def _infer_matmul(call, _builder):
    x = operand_shape(call.args[0], "x", MATMUL)
    rows, width = operand_shape(call.args[1], "packed weight", MATMUL)
    groups = operand_shape(call.args[2], "scales", MATMUL)
    group_size = group_size_of(call)
    if width != -(-x[-1] // 2) or groups != [rows, -(-x[-1] // group_size)]:
        raise ValueError(f"{MATMUL}: x's last axis {x[-1]} needs a packed weight of {-(-x[-1] // 2)} bytes a row "
                         f"and scales [{rows}, {-(-x[-1] // group_size)}] (groups of {group_size}), got "
                         f"{[rows, width]} and {groups}")
    return relax.TensorType([*x[:-1], rows], call.args[0].ty.dtype)


def _infer_input_grad(call, _builder):
    grad = operand_shape(call.args[0], "dy", MATMUL_INPUT_GRAD)
    in_features = int(call.args[CONFIG_INDEX].value.numpy()[1])
    return relax.TensorType([*grad[:-1], in_features], call.args[0].ty.dtype)


def weight_element(packed, scales, zeros, group_size: int, dtype: str):
    """(n, k) -> W[n, k] in `dtype`, read from the packed bytes, the zero points and the scales."""
    def value(n, k):
        byte = packed[n, tirx.floordiv(k, 2)].astype("int32")
        nibble = tirx.bitwise_and(tirx.shift_right(byte, tirx.floormod(k, 2) * 4), tirx.const(15, "int32"))
        group = tirx.floordiv(k, group_size)
        return (nibble - zeros[n, group].astype("int32")).astype(dtype) * scales[n, group].astype(dtype)
    return value


def _dequantized(packed, scales, zeros, group_size: int, in_features: int, dtype: str):
    """W [N, K] as a stage of the kernel marked PANEL_OPERAND: a CPU schedule computes it a panel at
    a time into the matmul's packed operand (schedule_cpu), never whole; unscheduled (or on a GPU,
    whose default schedule inlines it) it is read element by element inside the reduction."""
    element = weight_element(packed, scales, zeros, group_size, dtype)
    return te.compute((int(packed.shape[0]), in_features), element, name="dequantize_w4",
                      attrs={PANEL_OPERAND: 1})


def _matmul_te(x, packed, scales, zeros, *, config):
    (group_size,) = config
    *lead, depth = (int(d) for d in x.shape)
    weight = _dequantized(packed, scales, zeros, group_size, depth, x.dtype)
    k = te.reduce_axis((0, depth), name="k")
    return te.compute((*lead, int(packed.shape[0])),
                      lambda *i: te.sum(x[(*i[:-1], k)] * weight[i[-1], k], axis=k), name="w4_matmul")


def _input_grad_te(grad, packed, scales, zeros, *, config):
    group_size, in_features = config
    *lead, rows = (int(d) for d in grad.shape)
    weight = _dequantized(packed, scales, zeros, group_size, in_features, grad.dtype)
    n = te.reduce_axis((0, rows), name="n")
    return te.compute((*lead, in_features),
                      lambda *i: te.sum(grad[(*i[:-1], n)] * weight[n, i[-1]], axis=n), name="w4_matmul_input_grad")


def _take_te(ids, packed, scales, zeros, *, config):
    group_size, dim = config
    rows = int(packed.shape[0])
    weight = weight_element(packed, scales, zeros, group_size, scales.dtype)
    # an id outside the table reads row 0 rather than memory past it (torch raises; the step's
    # input checks refuse such ids before any kernel runs)
    return te.compute((*ids.shape, dim), lambda *i: weight(tirx.max(tirx.min(ids(*i[:-1]).astype("int32"), rows - 1),
                                                                      0), i[-1]), name="w4_take")


for _name, _infer, _legalize in ((TAKE, _infer_take, te_legalizer(_take_te, "w4_take", CONFIG_INDEX)),
                                 (MATMUL, _infer_matmul, te_legalizer(_matmul_te, "w4_matmul", CONFIG_INDEX)),
                                 (MATMUL_INPUT_GRAD, _infer_input_grad,
                                  te_legalizer(_input_grad_te, "w4_matmul_input_grad", CONFIG_INDEX))):
    register_operator(_name, _infer, _legalize)
