"""update_in_place: the optimizer writes each new parameter (and optimizer state, running statistic)
into the buffer of the old one — the step's outputs alias its inputs.

Without it the step returns a second copy of everything it updates: for a fully trained network,
parameters plus optimizer state twice over. With reorder_updates the kernel that produces a new
value runs after every other reader of the old one, so writing in place is safe when, in addition:
  * the kernel reads the old value only at the element it writes (elementwise: `p - lr * g`,
    Adam's moments). Checked on the kernel's TIR: every block that reads the old buffer writes the
    output at exactly the indices it reads; no other block reads it;
  * each such element is read and written once: the check runs on the scheduled kernel, where an
    epilogue moved under a reduction's output loops (inline_elementwise) can sit inside a loop it
    does not depend on and run again for each of its iterations (a stride-2 weight gradient of
    an even-sized input: 2x2 times). That is harmless while the output has its own buffer, but in
    place each repetition applies the update again to the value the last one wrote;
  * nothing after the kernel reads the old value.
Otherwise the new value keeps its own buffer. Runs after CallTIRRewrite, where each output is an
explicit `R.builtin.alloc_tensor` passed to its kernel; that allocation becomes the input itself.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax

from ..ir import bindings_of, kernel_schedule, same_tensor_type, step_pass, viewed, with_values
from .schedule_cpu import runs_repeatedly


@step_pass("UpdateInPlace")
def update_in_place(aliases: dict, func_name: str = "train_step"):
    """aliases: {position in the returned tuple: index of the function parameter it replaces}."""
    return lambda mod, func: rewrite(mod, func, aliases)[0]


def rewrite(mod, func, aliases: dict):
    """(new function or None, {output position: True if written in place})."""
    alloc_op = tvm.ir.Op.get("relax.builtin.alloc_tensor")
    bindings = bindings_of(func)
    value_of = {b.var: b.value for b in bindings}
    position = {b.var: i for i, b in enumerate(bindings)}
    result = func.body.body
    while isinstance(result, relax.Var) and isinstance(value_of.get(result), relax.Var):
        result = value_of[result]
    fields = value_of.get(result) if isinstance(result, relax.Var) else result
    if not isinstance(fields, relax.Tuple):
        return None, {}

    def alloc_of(var):
        while isinstance(value_of.get(var), relax.Var):
            var = value_of[var]
        value = value_of.get(var)
        return var if isinstance(value, relax.Call) and value.op.same_as(alloc_op) else None

    readers = {}  # var -> binding positions reading it
    for i, b in enumerate(bindings):
        for v in relax.analysis.free_vars(b.value):
            readers.setdefault(v, []).append(i)
    views = {}
    for var, root in _view_roots(bindings).items():
        views.setdefault(root, []).append(var)
    replace, done = {}, {}
    for out_pos, param_index in aliases.items():
        param = func.params[param_index]
        field = fields.fields[out_pos]
        alloc = alloc_of(field) if isinstance(field, relax.Var) else None
        done[out_pos] = False
        if alloc is None or not same_tensor_type(alloc.ty, param.ty):
            continue
        writer = next((i for i in readers.get(alloc, []) if _kernel_call(bindings[i].value) is not None), None)
        if writer is None:
            continue
        callee, args = _kernel_call(bindings[writer].value)
        # Reshapes of the old value share its memory: reading one later reads the new value too.
        later_reads = [i for v in [param] + views.get(param, []) for i in readers.get(v, [])
                       if i > writer and i != position.get(result)]
        if later_reads or param not in args or not isinstance(mod[callee], tvm.tirx.PrimFunc):
            continue
        if elementwise_in_place(mod[callee], args.index(param), args.index(alloc)):
            replace[alloc] = param
            done[out_pos] = True
    if not replace:
        return None, done
    return with_values(func, replace), done


def _view_roots(bindings) -> dict:
    """{var: the var whose buffer it shares} for aliases and reshapes (they are views, not copies)."""
    root = {}
    for b in bindings:
        src = b.value if isinstance(b.value, relax.Var) else viewed(b.value)
        if isinstance(src, relax.Var):
            root[b.var] = root.get(src, src)
    return root




def _kernel_call(value):
    """(GlobalVar, args) of a destination-passing kernel call, else None."""
    if isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar):
        return value.op, list(value.args)
    return None


def elementwise_in_place(prim_func, read_index: int, write_index: int) -> bool:
    """Can buffer `write_index` share memory with buffer `read_index`?

    Yes when the kernel is elementwise over their shape: every block that reads a buffer of that
    shape (the old value, or an intermediate computed from it) reads exactly the element the block
    writes, one block writes the output, and no block after it reads the old value (it would find
    the new one). Each output element then depends on the same element of the input only, and a
    schedule that later inlines the stages keeps it so.
    """
    params = list(prim_func.params)
    if max(read_index, write_index) >= len(params):
        return False
    shape = _shape(params[write_index])
    if shape != _shape(params[read_index]):
        return False
    try:
        sch = kernel_schedule(prim_func)
        block_refs = sch.get_child_blocks(sch.get_sblock("root"))
        blocks = [sch.get(b) for b in block_refs]
    except Exception:  # noqa: BLE001 - a kernel of unusual structure: keep the copy
        return False
    src, dst = params[read_index], params[write_index]
    writers = [i for i, block in enumerate(blocks) if any(w.source.same_as(dst) for w in block.writes)]
    if len(writers) != 1:
        return False
    # In place, a block that reads the old value and writes the new one must run once per element:
    # a repeated read-modify-write updates the element again (the kernel's `tirx.noalias` then lies
    # to LLVM, which hides it by keeping the old value in a register, except at opt-level 0).
    for i, block in enumerate(blocks):
        touches = i == writers[0] or any(r.source.same_as(src) for r in block.reads)
        if touches and runs_repeatedly(sch, block_refs[i]):
            return False
    for i, block in enumerate(blocks):
        writes = [w for w in block.writes if _shape(w.source) == shape]
        for r in block.reads:
            if _shape(r.source) == shape and not (len(writes) == 1 and _same_point(r, writes[0])):
                return False
            if i > writers[0] and r.source.same_as(src):
                return False
    return True


def _shape(buffer) -> list:
    try:
        return [int(d) for d in buffer.shape]
    except TypeError:
        return None


def _same_point(a, b) -> bool:
    if len(a.region) != len(b.region):
        return False
    for ra, rb in zip(a.region, b.region):
        if not (_is_one(ra.extent) and _is_one(rb.extent) and tvm_ffi.structural_equal(ra.min, rb.min)):
            return False
    return True


def _is_one(expr) -> bool:
    try:
        return int(expr) == 1
    except TypeError:
        return False
