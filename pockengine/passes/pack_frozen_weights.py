"""pack_frozen_weights: a frozen weight that only ever multiplies forward is held in the panels its
matmul reads, made once when the state is loaded instead of in every step.

A CPU matmul `x @ W^T` (nn.Linear; transposed_matmuls reads W[N, K] as stored) copies W into panels
`[N / width, K, width]` each call, so that its register tiles read `width` columns contiguously
(schedule_cpu._pack_columns). For a trained weight that copy is part of the price; for a frozen one
it is the same copy every step. Measured on 2 cores AVX2: Qwen2-0.5B's 128 x 896 @ (4864 x 896)^T
repeated (W in cache) takes 10 ms packing W and 6.8 ms reading prepared panels (MKL 8.2 ms); in the
step, where each weight comes from DRAM once, its last-2-blocks step went 1294 -> 1251 ms (154
weights packed), SmolLM-135M's 701 -> 678 ms (196).
Rewrites, in `func_name`, for each state tensor of `widths`:
    param W[N, K]                        ->  param W[N / width, K, width]   (StepSignature.packed)
    call_tir(matmul_nt, x, W)            ->  call_tir(matmul_panels, x, W):
                                                 out[..., i, j] = sum_k x[..., i, k] W[j / width, k, j % width]
The runtime makes and unmakes the panels (autodiff.step.Panels); a state_dict() is in the model's
layout. `panel_widths` chooses the weights: frozen (whole, not a part of a partially trained one),
every use such a matmul, all wanting the same width (schedule_cpu.column_panel_width). A weight the
backward also reads (its data gradient `dy @ W` reads it along the other axis) is left alone: a
second, transposed copy of it would double the frozen weights' memory.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, te

from ..autodiff.step import FROZEN, Panels, StepSignature
from ..ir import bindings_of, op_name, with_new_params
from .schedule_cpu import column_panel_width
from .transposed_matmuls import MATMUL_NT


def panel_widths(func, signature: StepSignature, vector_lanes: int, cores: int, vector_registers: int) -> dict:
    """{state name: panel width} of the frozen weights of `func` (a train_step after
    transposed_matmuls) worth holding in panels; see the module docstring."""
    n_batch = len(signature.batch)
    param_of = {param: spec.name for param, spec in zip(func.params[n_batch:], signature.state)}
    wanted: dict = {}  # param -> set of widths its uses want (None: a use that is not a matmul's column operand)
    for binding in bindings_of(func):
        width = _matmul_width(binding.value, vector_lanes, cores, vector_registers)
        column = _matmul_nt_operands(binding.value)[1] if width is not None else None
        for var in relax.analysis.free_vars(binding.value):
            if var in param_of:
                wanted.setdefault(var, set()).add(width if var.same_as(column) else None)
    for var in relax.analysis.free_vars(func.body.body):
        wanted.setdefault(var, set()).add(None)
    return {param_of[var]: widths.pop() for var, widths in wanted.items()
            if var in param_of and len(widths) == 1 and None not in widths
            and signature.categories.get(param_of[var]) == FROZEN and signature.owner(param_of[var]) == param_of[var]}


def _matmul_nt_operands(value) -> tuple | None:
    """(x, W) of a `call_tir(matmul_nt, x, W)` (transposed_matmuls' kernel), else None."""
    if op_name(value) != "relax.call_tir" or not value.args[0].name_hint.startswith(MATMUL_NT):
        return None
    return tuple(value.args[1].fields)


def _matmul_width(value, vector_lanes: int, cores: int, vector_registers: int) -> int | None:
    """The panel width a floating-point `call_tir(matmul_nt, x, W)` wants for W, else None."""
    operands = _matmul_nt_operands(value)
    if operands is None:
        return None
    x, weight = operands
    dtype = tvm.DataType(str(weight.ty.dtype))
    if dtype.type_code != tvm.DataTypeCode.FLOAT or str(x.ty.dtype) != str(weight.ty.dtype):
        return None
    shape = [int(d) for d in x.ty.shape]
    columns, depth = (int(d) for d in weight.ty.shape)
    return column_panel_width(shape[-2], columns, depth, math.prod(shape[:-2]), vector_lanes, cores,
                              vector_registers, dtype.bits // 8)


def pack_frozen_weights(widths: dict, signature: StepSignature, func_name: str) -> tvm.transform.Pass:
    """widths: {state name: panel width} (panel_widths). `signature` is the step's before packing."""
    @tvm.transform.module_pass(opt_level=0, name="PackFrozenWeights")
    def transform(mod, _ctx):
        if not widths:
            return mod
        func = mod[func_name]
        n_batch = len(signature.batch)
        packed = {}  # old param -> (new param, width)
        for param, spec in zip(func.params[n_batch:], signature.state):
            if spec.name in widths:
                width = widths[spec.name]
                shape = Panels(width).packed_shape(tuple(int(d) for d in param.ty.shape))
                packed[param] = (relax.Var(param.name, relax.TensorType(shape, param.ty.dtype)), width)
        new_params = {param: panels for param, (panels, _) in packed.items()}
        mod = with_new_params(mod, func_name, new_params, _Rewriter(mod, packed))
        return relax.transform.DeadCodeElimination()(mod)

    return transform


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, packed: dict):
        super().__init__(mod)
        self.packed = packed

    def visit_call_(self, call):
        operands = _matmul_nt_operands(call)
        if operands is not None:
            x, weight = operands
            if weight in self.packed:
                panels, width = self.packed[weight]
                return self.builder_.call_te(_matmul_panels, self.visit_expr(x), panels, width,
                                             primfunc_name_hint="matmul_panels")
        return super().visit_call_(call)


def _matmul_panels(x: te.Tensor, panels: te.Tensor, width: int) -> te.Tensor:
    """x[..., M, K] times the transpose of the weight W[N, K] held as panels[N / width, K, width]."""
    k = te.reduce_axis((0, x.shape[-1]), name="k")
    return te.compute((*x.shape[:-1], panels.shape[0] * width),
                      lambda *i: te.sum(x[(*i[:-1], k)] * panels[i[-1] // width, k, i[-1] % width], axis=k),
                      name="matmul")
