"""fuse_variance: compute a batch variance in one reduction instead of through two activation copies.

Training-mode BatchNorm is imported as arithmetic: `var = mean((x - mean(x))^2)`. TVM's FuseOps does
not fuse the elementwise `(x - m)^2` into the following `mean`, so the step materialises both
`x - m` and its square, two activation-sized tensors alive at once at the layer where the forward
peaks. Relax's `variance` op computes the same two-pass value (sum of squared deviations from the
mean, divided by the count) as one kernel that stores neither. The rewrite runs after autodiff:
the backward keeps reading the same values, only the forward's way of computing `var` changes.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..ir import bindings_of, bound_values, step_pass, with_values


@step_pass("FuseVariance", drop_dead_code=True)  # the squares nobody reads now
def fuse_variance(func_name: str = "train_step"):
    def rewrite(_mod, func):
        value = bound_values(func)
        rewrites = {}
        for b in bindings_of(func):
            source = _variance_of(b.value, value)
            if source is not None:
                rewrites[b.var] = relax.op.variance(source, b.value.attrs.axis, keepdims=b.value.attrs.keepdims)
        return with_values(func, rewrites) if rewrites else None

    return rewrite


def _op(expr, value, name):
    """The call bound to `expr` if it is op `name`."""
    call = value.get(expr) if isinstance(expr, relax.Var) else expr
    return call if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == name else None


def _variance_of(expr, value):
    """x when expr is mean((x - mean(x))^2) over the same axes, else None."""
    outer = _op(expr, value, "relax.mean")
    square = _op(outer.args[0], value, "relax.multiply") if outer is not None else None
    if square is None or not square.args[0].same_as(square.args[1]):
        return None
    deviation = _op(square.args[0], value, "relax.subtract")
    inner = _op(deviation.args[1], value, "relax.mean") if deviation is not None else None
    if inner is None or not inner.args[0].same_as(deviation.args[0]) or not bool(inner.attrs.keepdims):
        return None
    same_axes = [int(a) for a in outer.attrs.axis] == [int(a) for a in inner.attrs.axis]
    return deviation.args[0] if same_axes else None
