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

On a CPU with an int8 dot-product instruction (Int8Dot: AVX-512 VNNI's `vpdpbusd`, Armv8.2's
`sdot`), w8a8_matmul is legalized in the instruction's form: it adds four byte products into each
of 16 (4) int32 sums, so the tokens are quantized once (rows padded to the register tile, depth to
4), the weight is laid out as [N/16, K/4, 16, 4] (N padded to a tile of columns, with zero rows) and
the sums are scaled as before: the same integers, so the same bits. vpdpbusd multiplies unsigned by
signed bytes: the tokens are stored as q_x + 128 and 128 times each weight row's sum is subtracted
from the sums. The row sums come out of the same dot product, from one more row of tokens, all ones:
a kernel of their own read the whole weight again in every step, 10% of Qwen2-0.5B's W8A8 step at
128 tokens (97 of 1005 ms), against 1/17 more rows of the tuned dot product. The dot product is an
INT8_DOT block that passes/schedule_int8_dot.py tiles and tensorizes. A step whose W8A8 weights are
frozen holds them laid out (passes/interleave_int8_weights.py: w8a8_matmul_int8_dot).
"""

from __future__ import annotations

import dataclasses
import math

import tvm
from tvm import relax, te, tirx

from ..ir import INT8_DOT, PANEL_OPERAND, operand_shape, register_operator, te_legalizer
from .quantized_ops import round_half_away

W8A8_MATMUL = "pockengine.w8a8_matmul"
W8_MATMUL = "pockengine.w8_matmul"
W8_MATMUL_INPUT_GRAD = "pockengine.w8_matmul_input_grad"
# w8a8_matmul reading its weight already in the dot product's layout (passes/interleave_int8_weights.py)
W8A8_MATMUL_INT8_DOT = "pockengine.w8a8_matmul_int8_dot"
OPS = (W8A8_MATMUL, W8_MATMUL, W8_MATMUL_INPUT_GRAD, W8A8_MATMUL_INT8_DOT)
INT8_MAX = 127
TOKEN_SCALE_FLOOR = 1e-5


def w8a8_matmul(x, weight, scales) -> relax.Call:
    return relax.Call(tvm.ir.Op.get(W8A8_MATMUL), [x, weight, scales])


def w8_matmul(x, weight, scales) -> relax.Call:
    return relax.Call(tvm.ir.Op.get(W8_MATMUL), [x, weight, scales])


def w8_matmul_input_grad(grad, weight, scales) -> relax.Call:
    return relax.Call(tvm.ir.Op.get(W8_MATMUL_INPUT_GRAD), [grad, weight, scales])


def w8a8_matmul_int8_dot(x, interleaved, scales) -> relax.Call:
    return relax.Call(tvm.ir.Op.get(W8A8_MATMUL_INT8_DOT), [x, interleaved, scales])


def _infer_forward(call, _builder):
    op = call.op.name
    x = operand_shape(call.args[0], "x", op)
    rows, depth = operand_shape(call.args[1], "int8 weight", op, 2)
    if depth != x[-1] or operand_shape(call.args[2], "weight scales", op) != [rows]:
        raise ValueError(f"{op}: x's last axis {x[-1]} needs an int8 weight [N, {x[-1]}] and N scales, got "
                         f"{[rows, depth]} and {operand_shape(call.args[2], 'weight scales', op)}")
    return relax.TensorType([*x[:-1], rows], call.args[0].ty.dtype)


def _infer_int8_dot(call, _builder):
    op = call.op.name
    x = operand_shape(call.args[0], "x", op)
    (rows,) = operand_shape(call.args[2], "weight scales", op)
    given = operand_shape(call.args[1], "interleaved int8 weight", op, 4)
    expected = list(interleaved_shape(rows, x[-1], given[2])) if given[2] in (VNNI.lanes, SDOT.lanes) else None
    if given != expected:
        raise ValueError(f"{op}: x's last axis {x[-1]} and {rows} scales need an interleaved weight {expected}, got "
                         f"{operand_shape(call.args[1], 'interleaved int8 weight', op)}")
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


DOT_ROWS, DOT_DEPTH = 8, 4  # register tiles of 8 rows; each instruction adds 4 byte products per sum
UINT8_OFFSET = 128


@dataclasses.dataclass(frozen=True)
class Int8Dot:
    """A CPU's int8 dot-product instruction, which sums 4 byte products into each of `lanes` int32
    sums: the weight's 4 bytes of `lanes` rows side by side, the token's 4 bytes broadcast.
    `offset`: added to the tokens' int8 values when the instruction wants them unsigned (128 for
    vpdpbusd, which multiplies unsigned by signed bytes; its sums then lose 128 x each weight row's
    sum). `vectors`: vectors of sums in a register tile beside DOT_ROWS rows."""
    name: str
    lanes: int
    offset: int
    vectors: int
    llvm_intrinsic: str  # the instruction: (int32 x lanes sums, the tokens' bytes, the weight's bytes) -> sums

    @property
    def token_dtype(self) -> str:
        return "uint8" if self.offset else "int8"

    @property
    def intrinsic(self) -> str:
        """The TensorIntrin passes/schedule_int8_dot.py registers and tensorizes with."""
        return f"pockengine_{self.name}_{self.lanes}x{DOT_DEPTH}"


# AVX-512 VNNI: 8 rows x 2 vectors of 16 sums, 16 of the 32 registers (the dot alone at 256x576x1536 on 2
# cores, znver4: 942 GOP/s; 8 x 3 698, 4 x 4 633). Armv8.2 dotprod (sdot, signed x signed: no offset):
# 8 x 4 vectors of 4 sums, 32 accumulators would be every register: 8 x 3 (untuned: only QEMU here).
VNNI = Int8Dot("avx512-vnni", lanes=16, offset=UINT8_OFFSET, vectors=2, llvm_intrinsic="llvm.x86.avx512.vpdpbusd.512")
SDOT = Int8Dot("aarch64-sdot", lanes=4, offset=0, vectors=3, llvm_intrinsic="llvm.aarch64.neon.sdot.v4i32.v16i8")


def int8_dot(target=None) -> Int8Dot | None:
    """The int8 dot-product instruction of the target (default: the current one), or None."""
    from tvm.target import codegen

    target = target or tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return None
    if "aarch64" in str(target.attrs.get("mtriple", "")):
        return SDOT if codegen.target_has_features("dotprod", target) else None
    return VNNI if codegen.target_has_features("avx512vnni", target) else None


def interleaved_shape(outputs: int, depth: int, lanes: int) -> tuple:
    """The dot product's layout of an int8 weight [outputs, depth] for `lanes` sums per instruction:
    [N' / lanes, K' / 4, lanes, 4], N padded to a whole register tile of columns, K to a multiple of 4."""
    column_tile = _form_of(lanes).vectors * lanes
    padded_outputs = -(-outputs // column_tile) * column_tile
    return (padded_outputs // lanes, -(-depth // DOT_DEPTH), lanes, DOT_DEPTH)


def _form_of(lanes: int) -> Int8Dot:
    return next(form for form in (VNNI, SDOT) if form.lanes == lanes)


def _legalize_w8a8_matmul(builder, call):
    x, weight, scales = call.args
    form = int8_dot()
    if form is not None:
        return _w8a8_matmul_int8_dot(builder, form, x, scales, weight=weight)
    return builder.call_te(_w8a8_matmul_te, x, weight, scales, primfunc_name_hint="w8a8_matmul")


def _legalize_int8_dot(builder, call):
    x, interleaved, scales = call.args
    return _w8a8_matmul_int8_dot(builder, _form_of(int(interleaved.ty.shape[2])), x, scales, interleaved=interleaved)


def _w8a8_matmul_int8_dot(builder, form: Int8Dot, x, scales, weight=None, interleaved=None):
    """w8a8_matmul in the form of the dot-product instruction `form` (see the module docstring),
    from the weight as stored or already interleaved: the tokens' scales and (offset) values, the
    weight's layout when it is not (a step whose int8 weights are frozen has it in its state), its
    rows' sums when the tokens are offset, the dot product and the scaling."""
    *lead, depth = (int(d) for d in x.ty.shape)
    outputs = int(scales.ty.shape[0])
    rows = math.prod(lead)
    # With an offset, row `rows` of the dot product is the tokens' row of ones: the weight's row sums.
    dot_rows = rows + 1 if form.offset else rows
    tile_rows = min(DOT_ROWS, dot_rows)
    padded_rows = -(-dot_rows // tile_rows) * tile_rows
    lanes = form.lanes
    blocks, quads, _, _ = interleaved_shape(outputs, depth, lanes)
    padded_depth = quads * DOT_DEPTH
    dtype = str(x.ty.dtype)
    offset = tirx.const(form.offset, dtype)

    def token_scales(x):
        k = te.reduce_axis((0, depth), name="k")
        largest = te.compute((rows,), lambda r: te.max(tirx.max(x[(*_unflatten(r, lead), k)],
                                                                -x[(*_unflatten(r, lead), k)]), axis=k),
                             name="token_max")
        return te.compute((rows,), lambda r: tirx.max(largest[r], tirx.const(TOKEN_SCALE_FLOOR, dtype))
                          / tirx.const(INT8_MAX, dtype), name="token_scale")

    def quantize(x, token_scale):
        def value(r, k):
            inside = tirx.all(r < rows, k < depth)
            # padding: the offset (a zero token); the row of ones is one over the depth only
            outside = tirx.Select(tirx.all(r == rows, k < depth), tirx.const(1, dtype), offset) \
                if form.offset else offset
            r, k = tirx.min(r, rows - 1), tirx.min(k, depth - 1)
            q = tirx.max(tirx.min(round_half_away(x[(*_unflatten(r, lead), k)] / token_scale[r]),
                                  tirx.const(INT8_MAX, dtype)), tirx.const(-INT8_MAX, dtype))
            return tirx.Select(inside, q + offset, outside)
        return te.compute((padded_rows, padded_depth), lambda r, k: value(r, k).astype(form.token_dtype),
                          name="quantize_tokens")

    def interleave(weight):
        def value(no, ko, ni, ki):
            n, k = no * lanes + ni, ko * DOT_DEPTH + ki
            return tirx.Select(tirx.all(n < outputs, k < depth),
                               weight[tirx.min(n, outputs - 1), tirx.min(k, depth - 1)], tirx.const(0, "int8"))
        return te.compute((blocks, quads, lanes, DOT_DEPTH), value, name="interleave_int8_weight")

    def dot(quantized, interleaved):
        ko = te.reduce_axis((0, padded_depth // DOT_DEPTH), name="ko")
        ki = te.reduce_axis((0, DOT_DEPTH), name="ki")
        return te.compute((padded_rows, blocks, lanes),
                          lambda r, no, ni: te.sum(quantized[r, ko * DOT_DEPTH + ki].astype("int32")
                                                   * interleaved[no, ko, ni, ki].astype("int32"), axis=[ko, ki]),
                          name="int8_dot", attrs={INT8_DOT: [tile_rows, form.vectors]})

    def rescale(sums, token_scale, scales):
        def value(*i):
            r = _flatten(i[:-1], lead)
            n = i[-1]
            total = sums[r, n // lanes, n % lanes]
            if form.offset:  # the tokens' offset times the weight row's sum (the row of ones)
                total = total - tirx.const(form.offset, "int32") * sums[rows, n // lanes, n % lanes]
            return total.astype(dtype) * token_scale[r] * scales[n].astype(dtype)
        return te.compute((*lead, outputs), value, name="w8a8_matmul")

    token_scale = builder.emit_te(token_scales, x, primfunc_name_hint="token_scales")
    quantized = builder.emit_te(quantize, x, token_scale, primfunc_name_hint="quantize_tokens")
    if interleaved is None:
        interleaved = builder.emit_te(interleave, weight, primfunc_name_hint="interleave_int8_weight")
    sums = builder.emit_te(dot, quantized, interleaved, primfunc_name_hint="int8_dot")
    return builder.call_te(rescale, sums, token_scale, scales, primfunc_name_hint="w8a8_matmul")


def _unflatten(row, lead: list) -> tuple:
    """The indices of `lead`'s axes of flat row `row`."""
    index = []
    for extent in reversed(lead[1:]):
        index.append(row % extent)
        row = row // extent
    return (row, *reversed(index)) if lead else ()


def _flatten(index, lead: list):
    row = 0
    for i, extent in zip(index, lead):
        row = row * extent + i
    return row


for _name, _infer, _legalize in ((W8A8_MATMUL, _infer_forward, _legalize_w8a8_matmul),
                                 (W8_MATMUL, _infer_forward, te_legalizer(_w8_matmul_te, "w8_matmul")),
                                 (W8_MATMUL_INPUT_GRAD, _infer_input_grad,
                                  te_legalizer(_input_grad_te, "w8_matmul_input_grad")),
                                 (W8A8_MATMUL_INT8_DOT, _infer_int8_dot, _legalize_int8_dot)):
    register_operator(_name, _infer, _legalize)
