"""FLOP count of a training step (analysis): multiply-accumulates of conv2d, conv2d_transpose and
matmul, times two, split into forward (before the first `*_adjoint` binding of the Gradient pass,
frozen prefix included) and backward (gradients and the optimizer update); and of one fused TIR
kernel (kernel_flops), for per-kernel GFLOP/s."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from ..autodiff.step import backward_start
from ..frontend import quantized_ops, w4_ops, w8_ops
from ..ir import bindings_of, static_shape


def call_flops(call) -> int:
    """2 x multiply-accumulates of one call, 0 for ops that are not conv/matmul."""
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)):
        return 0
    op = call.op.name
    if op == "relax.nn.conv2d":  # each output element reduces over (C_in / groups) * kh * kw
        weight = static_shape(call.args[1])
        per_output = np.prod(weight) // weight[str(call.attrs.kernel_layout).index("O")]
        return int(2 * np.prod(static_shape(call)) * per_output)
    if op == "relax.nn.conv2d_transpose":  # each input element scatters into (C_out / groups) * kh * kw
        weight = static_shape(call.args[1])
        per_input = np.prod(weight) // weight[str(call.attrs.kernel_layout).index("I")]
        return int(2 * np.prod(static_shape(call.args[0])) * per_input)
    if op == "relax.matmul":
        return int(2 * np.prod(static_shape(call)) * static_shape(call.args[0])[-1])
    if op in (quantized_ops.CONV2D, quantized_ops.CONV2D_INPUT_GRAD):
        # A convolution's MACs: each output pixel (of every image) takes every weight once; its data
        # gradient the same. A split weight is its two parts.
        frozen_part = 6 if op == quantized_ops.CONV2D else 3  # where a split weight's frozen part is passed
        weights = [call.args[1]] + ([call.args[frozen_part]] if len(call.args) > frozen_part else [])
        grad_or_out = static_shape(call if op == quantized_ops.CONV2D else call.args[0])
        pixels = grad_or_out[0] * np.prod(grad_or_out[2:])
        return int(2 * pixels * sum(np.prod(static_shape(w)) for w in weights))
    if op in w4_ops.OPS + w8_ops.OPS:  # a quantized weight [N, K] times every row of x (or dy)
        return int(2 * np.prod(static_shape(call.args[0])[:-1]) * np.prod(_weight_shape(call)))
    if op == quantized_ops.CONV2D_WEIGHT_GRAD:  # each weight element sums over every output pixel
        grad = static_shape(call.args[1])
        return int(2 * np.prod(static_shape(call)) * grad[0] * np.prod(grad[2:]))
    return 0


def _weight_shape(call) -> list[int]:
    """[N, K] of the weight a quantized-weight matmul multiplies by (a packed 4-bit weight holds
    two values a byte: K is x's or dx's last axis)."""
    if call.op.name == w8_ops.W8A8_MATMUL_INT8_DOT:  # its weight interleaved and padded: N scales, x's K
        return [static_shape(call.args[2])[0], static_shape(call.args[0])[-1]]
    if call.op.name in w8_ops.OPS:
        return static_shape(call.args[1])
    rows = static_shape(call.args[1])[0]
    depth = static_shape(call)[-1] if call.op.name == w4_ops.MATMUL_INPUT_GRAD else static_shape(call.args[0])[-1]
    return [rows, depth]


def step_flops(step_func) -> dict:
    """{"forward": flops, "backward": flops} of a train_step (or any function) before lowering."""
    bindings = bindings_of(step_func)
    start = backward_start(bindings)
    return {
        "forward": sum(call_flops(b.value) for b in bindings[:start]),
        "backward": sum(call_flops(b.value) for b in bindings[start:]),
    }


@dataclass(frozen=True)
class MatmulShape:
    """out[batch..., M, N] = sum over K of a[..., M, K] * b[..., K, N] (b[..., N, K] if transposed_b)."""

    batch: int
    m: int
    k: int
    n: int
    transposed_b: bool


def kernel_flops(func) -> tuple[int, MatmulShape | None]:
    """(2 x multiply-accumulates, the matmul's shape or None) of a TIR kernel: every reduction block
    whose update is `acc + a * b` counts 2 x the product of its iterators' extents (a convolution's
    too). The shape is given when the kernel's one such block is a plain matmul (one reduction
    iterator, the last index of `a`, and of `b` or its second to last), e.g. to time the same matmul
    elsewhere. (0, None) when the kernel has symbolic extents."""
    from tvm import s_tir

    blocks = []
    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, blocks.append))
    flops, shapes = 0, []
    for block in blocks:
        reduced = [iv for iv in block.iter_vars if iv.iter_type == tvm.tirx.IterVar.CommReduce]
        store = block.body
        if not reduced or not isinstance(store, tvm.tirx.BufferStore):
            continue
        product = _accumulated_product(store)
        extents = [iv.dom.extent for iv in block.iter_vars]
        if product is None or not all(isinstance(e, tvm.tirx.IntImm) for e in extents):
            continue
        flops += 2 * int(np.prod([int(e) for e in extents]))
        shapes.append(_matmul_shape(block, store, product, reduced))
    return flops, (shapes[0] if len(shapes) == 1 else None)


_LOAD = tvm.ir.expr.TensorLoad  # a TIR buffer load (tvm.tirx.BufferLoad is its constructor, not a class)


def _accumulated_product(store):
    """The two loads of `acc[...] = acc[...] + a * b` (casts allowed around them), else None."""
    value = store.value
    if not isinstance(value, tvm.tirx.Add):
        return None
    for acc, term in ((value.a, value.b), (value.b, value.a)):
        if isinstance(acc, _LOAD) and acc.source.same_as(store.buffer) and isinstance(term, tvm.tirx.Mul):
            loads = [_strip_casts(term.a), _strip_casts(term.b)]
            if all(isinstance(load, _LOAD) for load in loads):
                return loads
    return None


def _strip_casts(expr):
    while isinstance(expr, tvm.tirx.Cast):
        expr = expr.value
    return expr


def _matmul_shape(block, store, loads, reduced) -> MatmulShape | None:
    if len(reduced) != 1 or len(store.indices) < 2:
        return None
    k = reduced[0].var
    extent = {iv.var: int(iv.dom.extent) for iv in block.iter_vars}
    i, j = store.indices[-2], store.indices[-1]
    if not (isinstance(i, tvm.tirx.Var) and isinstance(j, tvm.tirx.Var) and i in extent and j in extent):
        return None
    for a, b in (loads, loads[::-1]):
        if not (len(a.indices) >= 2 and a.indices[-1].same_as(k) and a.indices[-2].same_as(i)):
            continue
        if len(b.indices) < 2:
            continue
        last, before = b.indices[-1], b.indices[-2]
        transposed = last.same_as(k) and before.same_as(j)
        if transposed or (before.same_as(k) and last.same_as(j)):
            batch = int(np.prod([int(e) for e in (extent[v] for v in extent if not v.same_as(k)
                                                   and not v.same_as(i) and not v.same_as(j))]))
            return MatmulShape(batch, extent[i], extent[k], extent[j], transposed)
    return None
