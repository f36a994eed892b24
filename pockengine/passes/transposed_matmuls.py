"""transposed_matmuls: matmuls read a transposed weight as it is stored, and transposes of transposes
cancel.

An nn.Linear is `x @ permute_dims(W)`, and its data gradient, as autodiff writes it,
`dy @ permute_dims(permute_dims(W))`. Legalized op by op, each is a transpose kernel that copies the
weight every step (frozen or not) and then a matmul over the copy: SmolLM-135M's step transposed its
49152 x 576 tied embedding twice (38 + 37 ms of an 840 ms step) and every block's seven weights
(~20 ms more). TVM's FuseTransposeMatmul does the first rewrite but groups with FuseOpsByPattern,
which rejects a step where the transposed weight has other users ("cyclic dependency").
Rewrites, on every Relax function of the module:
    permute_dims(permute_dims(w, a), b)  ->  permute_dims(w, a then b), or w when that is no permutation
    matmul(x[..., M, K], permute_dims(W[N, K]))  ->  call_tir(matmul_nt, x, W):
                                                         out[..., i, j] = sum_k x[..., i, k] W[j, k]
The matmul's CPU schedule packs W from either layout (schedule_cpu._pack_columns). A transpose
left without users is removed (DeadCodeElimination).
"""

from __future__ import annotations

import tvm
from tvm import relax, te

from ..ir import op_name

# The name of the kernels this pass writes (pack_frozen_weights finds them by it).
MATMUL_NT = "matmul_nt"


def transposed_matmuls() -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="TransposedMatmuls")
    def transform(mod, _ctx):
        rewriter = _Rewriter(mod)
        changed = False
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                new = rewriter.visit_expr(func)
                if not new.same_as(func):
                    rewriter.builder_.update_func(gvar, new)
                    changed = True
        if not changed:
            return mod
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())

    return transform


def _axes(call) -> list[int]:
    """A permute_dims call's permutation (None in the call: all axes reversed)."""
    ndim = call.args[0].ty.ndim
    return list(range(ndim))[::-1] if call.attrs.axes is None else [int(a) for a in call.attrs.axes]


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def _through_transposes(self, expr):
        """(the tensor under a chain of permute_dims bindings ending at `expr`, the chain's composed
        permutation, the chain's length)."""
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
        if isinstance(value, relax.Var):  # an alias (`lv_1 = lv`: autodiff's copies across blocks)
            return self._through_transposes(value)
        if op_name(value) != "relax.permute_dims" or value.args[0].ty.ndim < 0:
            return expr, None, 0
        base, inner, depth = self._through_transposes(value.args[0])
        outer = _axes(value)
        return base, outer if inner is None else [inner[a] for a in outer], depth + 1

    def visit_call_(self, call):
        call = super().visit_call_(call)
        name = op_name(call)
        if name == "relax.permute_dims":
            base, axes, depth = self._through_transposes(call)
            if depth > 1:
                return base if axes == sorted(axes) else relax.op.permute_dims(base, axes)
        if name == "relax.matmul":
            x, operand = call.args
            base, axes, depth = self._through_transposes(operand)
            if depth == 0 or x.ty.ndim < 2:
                return call
            if axes == sorted(axes):
                return relax.op.matmul(x, base, out_dtype=call.attrs.out_dtype)
            dtype = str(call.ty.dtype)
            if (base.ty.ndim == 2 and axes == [1, 0] and str(x.ty.dtype) == dtype and str(base.ty.dtype) == dtype
                    and _static(x) and _static(base)):
                return self.builder_.call_te(_matmul_nt, x, base, primfunc_name_hint=MATMUL_NT)
        return call


def _static(expr) -> bool:
    shape = expr.ty.shape
    return shape is not None and all(isinstance(d, tvm.tirx.IntImm) for d in shape)


def _matmul_nt(x: te.Tensor, weight: te.Tensor) -> te.Tensor:
    """x[..., M, K] times the transpose of weight[N, K]."""
    k = te.reduce_axis((0, x.shape[-1]), name="k")
    return te.compute((*x.shape[:-1], weight.shape[0]),
                      lambda *i: te.sum(x[(*i[:-1], k)] * weight[i[-1], k], axis=k), name="matmul")
