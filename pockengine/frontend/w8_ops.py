"""The int8-weight operators (pockengine/smoothquant.py's W8Linear), as Relax operators.

    w8a8_matmul(x, q_w, s_w)         y[t, n] = (sum_k q_x[t, k] q_w[n, k]) * s_t * s_w[n]    (int32 sums)
                                     s_t = max(max_k |x[t, k]|, 1e-5) / 127,
                                     q_x[t, k] = clip(round(x[t, k] / s_t), -127, 127)     (halves away)
    w8_matmul(x, q_w, s_w)           y[t, n] = sum_k x[t, k] q_w[n, k] s_w[n]
    w8_matmul_input_grad(dy, q_w, s_w)  dx[t, k] = sum_n dy[t, n] q_w[n, k] s_w[n]

(t: every axis of x but the last.) The first is SmoothQuant's W8A8 with per-token dynamic activation
scales: the same float operations in the same order as the torch operator, so its outputs are the
torch operator's bit for bit. The weight is read as stored (int8); in the two float ones its
dequantization is a PANEL_OPERAND stage, computed a panel at a time into the matmul's packed
operand on CPUs (as frontend/w4_ops.py's). Weights have no gradient (a W8 weight is frozen).
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx

from ..ir import PANEL_OPERAND, operand_shape, register_operator, te_legalizer
from .quantized_ops import round_half_away

W8A8_MATMUL = "pockengine.w8a8_matmul"
W8_MATMUL = "pockengine.w8_matmul"
W8_MATMUL_INPUT_GRAD = "pockengine.w8_matmul_input_grad"
OPS = (W8A8_MATMUL, W8_MATMUL, W8_MATMUL_INPUT_GRAD)
INT8_MAX = 127
TOKEN_SCALE_FLOOR = 1e-5


def w8a8_matmul(x, weight, scales) -> relax.Call:
    return relax.Call(tvm.ir.Op.get(W8A8_MATMUL), [x, weight, scales])


def w8_matmul(x, weight, scales) -> relax.Call:
    return relax.Call(tvm.ir.Op.get(W8_MATMUL), [x, weight, scales])


def w8_matmul_input_grad(grad, weight, scales) -> relax.Call:
    return relax.Call(tvm.ir.Op.get(W8_MATMUL_INPUT_GRAD), [grad, weight, scales])


def _infer_forward(call, _builder):
    op = call.op.name
    x = operand_shape(call.args[0], "x", op)
    rows, depth = operand_shape(call.args[1], "int8 weight", op, 2)
    if depth != x[-1] or operand_shape(call.args[2], "weight scales", op) != [rows]:
        raise ValueError(f"{op}: x's last axis {x[-1]} needs an int8 weight [N, {x[-1]}] and N scales, got "
                         f"{[rows, depth]} and {operand_shape(call.args[2], 'weight scales', op)}")
    return relax.TensorType([*x[:-1], rows], call.args[0].ty.dtype)


def _infer_input_grad(call, _builder):
    grad = operand_shape(call.args[0], "dy", W8_MATMUL_INPUT_GRAD)
    _, depth = operand_shape(call.args[1], "int8 weight", W8_MATMUL_INPUT_GRAD, 2)
    return relax.TensorType([*grad[:-1], depth], call.args[0].ty.dtype)


def _dequantized(weight, scales, dtype: str):
    return te.compute(weight.shape, lambda n, k: weight[n, k].astype(dtype) * scales[n].astype(dtype),
                      name="dequantize_w8", attrs={PANEL_OPERAND: 1})


def _w8_matmul_te(x, weight, scales):
    *lead, depth = (int(d) for d in x.shape)
    dequantized = _dequantized(weight, scales, x.dtype)
    k = te.reduce_axis((0, depth), name="k")
    return te.compute((*lead, int(weight.shape[0])),
                      lambda *i: te.sum(x[(*i[:-1], k)] * dequantized[i[-1], k], axis=k), name="w8_matmul")


def _input_grad_te(grad, weight, scales):
    *lead, rows = (int(d) for d in grad.shape)
    dequantized = _dequantized(weight, scales, grad.dtype)
    n = te.reduce_axis((0, rows), name="n")
    return te.compute((*lead, int(weight.shape[1])),
                      lambda *i: te.sum(grad[(*i[:-1], n)] * dequantized[n, i[-1]], axis=n),
                      name="w8_matmul_input_grad")


def _w8a8_matmul_te(x, weight, scales):
    *lead, depth = (int(d) for d in x.shape)
    dtype = x.dtype
    k = te.reduce_axis((0, depth), name="k")
    largest = te.compute(lead, lambda *t: te.max(tirx.max(x[(*t, k)], -x[(*t, k)]), axis=k), name="token_max")
    token_scale = te.compute(lead, lambda *t: tirx.max(largest(*t), tirx.const(TOKEN_SCALE_FLOOR, dtype))
                             / tirx.const(INT8_MAX, dtype), name="token_scale")
    quantized = te.compute(x.shape, lambda *i: tirx.max(tirx.min(round_half_away(x(*i) / token_scale(*i[:-1])),
                                                                 tirx.const(INT8_MAX, dtype)),
                                                        tirx.const(-INT8_MAX, dtype)).astype("int8"),
                           name="quantize_tokens")
    j = te.reduce_axis((0, depth), name="j")
    total = te.compute((*lead, int(weight.shape[0])),
                       lambda *i: te.sum(quantized[(*i[:-1], j)].astype("int32") * weight[i[-1], j].astype("int32"),
                                         axis=j), name="int8_matmul")
    return te.compute(total.shape, lambda *i: total(*i).astype(dtype) * token_scale(*i[:-1])
                      * scales[i[-1]].astype(dtype), name="w8a8_matmul")


for _name, _infer, _legalize in ((W8A8_MATMUL, _infer_forward, te_legalizer(_w8a8_matmul_te, "w8a8_matmul")),
                                 (W8_MATMUL, _infer_forward, te_legalizer(_w8_matmul_te, "w8_matmul")),
                                 (W8_MATMUL_INPUT_GRAD, _infer_input_grad,
                                  te_legalizer(_input_grad_te, "w8_matmul_input_grad"))):
    register_operator(_name, _infer, _legalize)
