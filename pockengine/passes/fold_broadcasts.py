"""fold_broadcasts: undo the tensor copies torch's decomposition leaves in an imported graph.

torch.export's core-ATen decomposition turns `x @ W` with a 3-D `x` (attention's in-projection,
whose input is transposed and not contiguous) into `bmm(expand(x), expand(W^T))`, and adds `expand`s
that change nothing. TVM imports each `expand` as a materialised `broadcast_to`:
    * a weight expanded over the batch is a batch-sized copy of it, and its gradient another one
      (three 24 MiB buffers in a d128 transformer at sequence 128);
    * a same-shape `broadcast_to` is a plain copy.
Rewrites:
    broadcast_to(x, shape(x))                 ->  x
    matmul(a[..., M, K], broadcast_to(W[K, N]))  ->  reshape(matmul(reshape(a, [-1, K]), W), [..., M, N])
The second is an ordinary 2-D matmul whose weight gradient needs no batch-sized intermediates.
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax import op as R

from ..ir import Substitute, bindings_of, static_shape, step_pass


@step_pass("FoldBroadcasts", single_block=True, drop_dead_code=True)  # the folded broadcasts
def fold_broadcasts(func_name: str):
    return lambda _mod, func: _fold(func, func_name)


def _is_broadcast(value) -> bool:
    return isinstance(value, relax.Call) and hasattr(value.op, "name") and value.op.name == "relax.broadcast_to"


def _fold(func, name):
    bindings = bindings_of(func)
    value_of = {b.var: b.value for b in bindings}
    rename = {}  # identity broadcast var -> its source
    bb = relax.BlockBuilder()
    with bb.function(name, list(func.params), attrs=dict(func.attrs)):
        with bb.dataflow():
            for b in bindings:
                value = Substitute(rename).visit_expr(b.value) if rename else b.value
                if (_is_broadcast(value) and static_shape(value.args[0]) == static_shape(b.var)
                        and isinstance(value.args[0], relax.Var)):
                    if isinstance(b.var, relax.DataflowVar):  # an output var must stay bound
                        rename[b.var] = value.args[0]
                        continue
                folded = _fold_matmul(bb, value, value_of)
                if folded is not None:
                    bb.emit_normalized(relax.VarBinding(b.var, bb.normalize(folded)))
                else:
                    bb.emit_normalized(relax.VarBinding(b.var, bb.normalize(value)))
            outputs = Substitute(rename).visit_expr(func.body.body) if rename else func.body.body
        bb.emit_func_output(outputs)
    return bb.get()[name]


def _fold_matmul(bb, value, value_of):
    """matmul(a, broadcast_to(W 2-D)) -> 2-D matmul on a flattened `a`, or None if not that pattern."""
    if not (isinstance(value, relax.Call) and hasattr(value.op, "name") and value.op.name == "relax.matmul"):
        return None
    a, b = value.args
    source = value_of.get(b)
    if not (_is_broadcast(source) and len(static_shape(source.args[0])) == 2 and len(static_shape(a)) >= 3):
        return None
    weight = source.args[0]
    k, n = static_shape(weight)
    out = static_shape(a)[:-1] + [n]
    if static_shape(value) != out or static_shape(a)[-1] != k:
        return None
    rows = int(np.prod(static_shape(a)[:-1]))
    flat = bb.emit(R.reshape(a, [rows, k]))
    product = bb.emit(R.matmul(flat, weight, out_dtype=value.attrs.out_dtype))
    return R.reshape(product, out)
