"""FLOP count of a training step (analysis): multiply-accumulates of conv2d, conv2d_transpose and
matmul, times two, split into forward (before the first `*_adjoint` binding of the Gradient pass,
frozen prefix included) and backward (gradients and the optimizer update)."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..autodiff.step import backward_start
from ..ir import static_shape


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
    return 0


def step_flops(step_func) -> dict:
    """{"forward": flops, "backward": flops} of a train_step (or any function) before lowering."""
    bindings = [b for block in step_func.body.blocks for b in block.bindings]
    start = backward_start(bindings)
    return {
        "forward": sum(call_flops(b.value) for b in bindings[:start]),
        "backward": sum(call_flops(b.value) for b in bindings[start:]),
    }
