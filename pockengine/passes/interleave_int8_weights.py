"""interleave_int8_weights: a frozen int8 weight of a W8A8 layer is held in the layout the VNNI
dot product reads, made once when the state is loaded instead of in every step.

On a CPU with an int8 dot product (AVX-512 VNNI, aarch64's sdot), w8a8_matmul lays its int8 weight
W[N, K] out as [N' / 16, K' / 4, 16, 4] (sdot: 4 rows) each call (frontend/w8_ops.py): four bytes
of 16 consecutive rows side by side, the operand of one vpdpbusd. A W8A8 layer runs before the
first trained one, so its weight is frozen: the step reads it prepared
(autodiff.step.Int8DotLayout) and calls w8a8_matmul_int8_dot instead. SmolLM-135M's
MLP weight (1536 x 576): 0.35 ms of the layer's 1.15 ms at 256 tokens on 2 cores was that copy.
Rewrites, in `func_name`, for each state tensor of `layouts`:
    param W[N, K]                     ->  param W[N' / lanes, K' / 4, lanes, 4]   (StepSignature.packed)
    w8a8_matmul(x, W, s)              ->  w8a8_matmul_int8_dot(x, W, s)
`int8_dot_weights` chooses the weights: frozen (W8Linear's buffers, which no step writes), whole, and
read by w8a8_matmul calls only.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..autodiff.step import BUFFER, FROZEN, Int8DotLayout, StepSignature
from ..frontend import w8_ops
from ..ir import bindings_of, op_name, with_new_params


def int8_dot_weights(func, signature: StepSignature, form: w8_ops.Int8Dot) -> dict:
    """{state name: Int8DotLayout} of the frozen weights of `func` that only w8a8_matmul reads, for
    the target's dot-product instruction `form`."""
    n_batch = len(signature.batch)
    param_of = {param: spec for param, spec in zip(func.params[n_batch:], signature.state)}
    uses: dict = {}  # param -> whether every use so far is a w8a8_matmul's weight
    for binding in bindings_of(func):
        value = binding.value
        is_w8a8 = op_name(value) == w8_ops.W8A8_MATMUL
        for var in relax.analysis.free_vars(value):
            if var in param_of:
                uses[var] = uses.get(var, True) and is_w8a8 and value.args[1].same_as(var) \
                    and not value.args[0].same_as(var)
    for var in relax.analysis.free_vars(func.body.body):
        uses[var] = False
    # W8Linear holds its int8 weight as a buffer: one the step never writes is as frozen as a parameter
    written = set(signature.outputs)
    return {spec.name: Int8DotLayout(*spec.shape, form.lanes) for var, only in uses.items()
            if only and (spec := param_of.get(var)) is not None and len(spec.shape) == 2
            and signature.categories.get(spec.name) in (FROZEN, BUFFER) and spec.name not in written
            and signature.owner(spec.name) == spec.name}


def interleave_int8_weights(layouts: dict, signature: StepSignature, func_name: str) -> tvm.transform.Pass:
    """layouts: {state name: Int8DotLayout} (int8_dot_weights). `signature` is the step's before."""
    @tvm.transform.module_pass(opt_level=0, name="InterleaveInt8Weights")
    def transform(mod, _ctx):
        if not layouts:
            return mod
        func = mod[func_name]
        n_batch = len(signature.batch)
        interleaved = {param: relax.Var(param.name, relax.TensorType(layouts[spec.name].packed_shape(), "int8"))
                       for param, spec in zip(func.params[n_batch:], signature.state) if spec.name in layouts}
        return with_new_params(mod, func_name, interleaved, _Rewriter(mod, interleaved))

    return transform


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, interleaved: dict):
        super().__init__(mod)
        self.interleaved = interleaved

    def visit_call_(self, call):
        if op_name(call) == w8_ops.W8A8_MATMUL and call.args[1] in self.interleaved:
            x, _, scales = call.args
            return w8_ops.w8a8_matmul_int8_dot(self.visit_expr(x), self.interleaved[call.args[1]],
                                               self.visit_expr(scales))
        return super().visit_call_(call)
