"""drop_unit_reductions: a reduction over one element becomes a plain assignment.

A weight gradient at batch 1 is an outer product: legalized, `dW = dy^T @ x` is a matmul whose
reduction loop has extent 1, still written as a reduction block (`init: C = 0`, body:
`C = C + a * b`). dlight's normalisation, used by inline_elementwise and by dlight's GPU rules,
drops the unit reduction axis, after which TVM's `reverse_compute_inline` accepts the block as if it
were elementwise and inlines the optimizer's update into it while keeping the `init`. The result
reads back its own output: `W - lr * (W + g)` instead of `W - lr * g` (measured: a batch-1 step
zeroed the classifier's weights at lr 1 and shrank them by lr at any other rate).

So every reduction block whose reduction iterators all have extent 1 is rewritten before any
schedule sees it: those iterators become spatial ones, their single value replaces them in the
body, and the block computes `C = <body with C read as its init value>`, without an init. It is
then elementwise in fact as well as in form, and the inlining is correct.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad, Var
from tvm.tirx.stmt import BufferStore

from ..ir import map_kernels


def drop_unit_reductions() -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="DropUnitReductions")
    def transform(mod, _ctx):
        def rewrite(kernel):
            new = tvm_ffi.structural_map(kernel, [(s_tir.SBlockRealize, _as_assignment)])
            return None if new.same_as(kernel) else new

        return map_kernels(mod, rewrite)

    return transform


def _is_unit_reduction(iter_var) -> bool:
    extent = iter_var.dom.extent
    return int(iter_var.iter_type) == tirx.IterVar.CommReduce and isinstance(extent, tirx.IntImm) and int(extent) == 1


def _as_assignment(realize):
    block = realize.block
    if block.init is None:
        return realize
    reduce = [iv for iv in block.iter_vars if int(iv.iter_type) == tirx.IterVar.CommReduce]
    init, body = block.init, block.body
    if (not reduce or not all(_is_unit_reduction(iv) for iv in reduce)
            or not isinstance(init, BufferStore) or not isinstance(body, BufferStore)
            or not init.buffer.same_as(body.buffer)
            or not tvm_ffi.structural_equal(list(init.indices), list(body.indices))):
        return realize
    single = {iv.var: iv.dom.min for iv in reduce}

    def fixed(var):
        return single.get(var, var)

    def read_as_init(load):
        if load.source.same_as(body.buffer) and tvm_ffi.structural_equal(list(load.indices), list(body.indices)):
            return init.value
        return load

    value = tvm_ffi.structural_map(tvm_ffi.structural_map(body.value, [(TensorLoad, read_as_init)]), [(Var, fixed)])
    reads = [tvm_ffi.structural_map(r, [(Var, fixed)]) for r in block.reads if not r.source.same_as(body.buffer)]
    # The unit iterators stay, as spatial ones (their loops stay bound; nothing reads them now).
    iter_vars = [tirx.IterVar(iv.dom, iv.var, tirx.IterVar.DataPar) if any(iv.same_as(r) for r in reduce) else iv
                 for iv in block.iter_vars]
    new_block = s_tir.SBlock(iter_vars, reads, list(block.writes), block.name_hint,
                             BufferStore(body.buffer, value, list(body.indices)), None, list(block.alloc_buffers),
                             list(block.match_buffers), dict(block.annotations))
    return s_tir.SBlockRealize(list(realize.iter_values), realize.predicate, new_block)
