"""recompute_expansions: a kernel that expands small inputs into a large tensor is run inside each
kernel that reads that tensor, a piece at a time, instead of storing the tensor whole.

The gradient of a global average pooling is its output gradient broadcast over the pixels; through
the ReLU6 mask and the requantization scale of an int8 convolution it becomes a float tensor of
that convolution's full output. On MobileNetV2-0.35 at 128x128 that is [1, 1280, 4, 4] float32,
80 KiB, made from a 1280-float gradient and a 20 KiB mask, and read by two kernels: the bias's
gradient (a sum over the pixels) and the data gradient (a 1x1 convolution over the 1280 channels).
It was the step's SRAM peak on a Cortex-M (143 KiB of arena, 104 without it).

For a kernel whose output is at least EXPANSION times the bytes it reads, and is read only as an
argument of other kernels, each reader gets its own copy of the producer (TVM's FuseTIR merges the
two kernels into one, the tensor an intermediate buffer of it) computed under the reader's loops: the
reader's output loops the tensor's index does not depend on are moved innermost (a convolution's
input channels for its data gradient) and the producer is computed under the innermost loop it does
depend on (compute_at; TIR's buffer compaction then allocates only that piece: one pixel's 1280
values, 5 KiB). A reader where that would compute any element more than once (a 3x3 window reads
each pixel nine times) keeps the stored tensor: the producer is then kept for every reader, so
nothing is computed twice. The producer's inputs live until the last reader instead: that is why
the output must be EXPANSION times larger.

Every reader computes exactly the values it read before (the same expressions, in the same order),
so the step's results do not change. The pass is for targets whose memory is the constraint (the
Cortex-M family's Lowering asks for it): on a CPU with vector schedules the reordered reader would
lose its register tiling, for memory a CPU has.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, s_tir
from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

from ..ir import bindings_of, kernel_schedule, step_pass, tensor_bytes, tensor_elements, with_values
from .schedule_cpu import block_realize, loop_extent, loop_kind

EXPANSION = 2  # the producer's output is at least this many times the bytes of its inputs
MIN_BYTES = 4096  # smaller tensors are not worth a kernel more (the labels' one-hot, a loss's softmax)


@step_pass("RecomputeExpansions", drop_dead_code=True)
def recompute_expansions(func_name: str = "train_step"):
    def rewrite(mod, func):
        bindings = bindings_of(func)
        returned = set(relax.analysis.free_vars(func.body.body))
        readers = _readers(bindings)
        params = set(func.params)
        builder = relax.BlockBuilder(mod)
        values, rewritten = {}, set()
        for producer in bindings:
            uses = readers.get(producer.var)
            if not uses or producer.var in returned or producer.var in rewritten \
                    or not _expands(mod, producer, params):
                continue
            if any(reader is None or reader.var in rewritten for reader, _ in uses):
                continue  # read other than as a kernel's argument, or by a reader already merged
            merged = [_merged_kernel(mod, producer, reader, position) for reader, position in uses]
            if any(m is None for m in merged):
                continue  # kept for that reader: computing it in the others too would compute it twice
            for (reader, position), (kernel, name) in zip(uses, merged):
                args = _call_tir(reader.value)[1]
                args = args[:position] + _call_tir(producer.value)[1] + args[position + 1:]
                values[reader.var] = relax.call_tir(builder.add_func(kernel, name), args, reader.var.ty)
                rewritten.add(reader.var)
            rewritten.add(producer.var)
        if not values:
            return None
        new = builder.get()
        new[func_name] = with_values(func, values)
        return new

    return rewrite


def _call_tir(value):
    """(kernel GlobalVar, argument list) of a call_tir, or None."""
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.call_tir" \
            and isinstance(value.args[1], relax.Tuple):
        return value.args[0], list(value.args[1].fields)
    return None


def _readers(bindings) -> dict:
    """{var: [(binding reading it, argument position)]}; the binding is None for any use other than
    as a kernel's argument, and a kernel reading the var twice counts as such a use."""
    readers: dict = {}
    for b in bindings:
        call = _call_tir(b.value)
        if call is None:
            for v in relax.analysis.free_vars(b.value):
                readers.setdefault(v, []).append((None, None))
            continue
        args = call[1]
        for position, arg in enumerate(args):
            if isinstance(arg, relax.Var):
                twice = sum(a.same_as(arg) for a in args) > 1
                readers.setdefault(arg, []).append((None, None) if twice else (b, position))
    return readers


def _expands(mod, producer, params: set) -> bool:
    """An elementwise/broadcast kernel (no reduction) whose one output is EXPANSION times the bytes it
    reads of the step's intermediate tensors."""
    call = _call_tir(producer.value)
    if call is None or not isinstance(producer.var.ty, relax.TensorType):
        return False
    kernel = mod[call[0]]
    if not isinstance(kernel, tvm.tirx.PrimFunc) or _has_reduction(kernel):
        return False
    # What it reads of the step's own tensors: those now live until its last reader (the step's
    # parameters and buffers are alive throughout anyway).
    read = sum(tensor_bytes(a.ty) for a in dict.fromkeys(call[1]) if isinstance(a, relax.Var) and a not in params)
    written = tensor_bytes(producer.var.ty)
    return written >= MIN_BYTES and written >= EXPANSION * read


def _has_reduction(kernel) -> bool:
    found = []
    tvm_ffi.structural_walk(kernel.body, (s_tir.SBlock, lambda b: found.extend(
        iv for iv in b.iter_vars if iv.iter_type != tvm.tirx.IterVar.DataPar)))
    return bool(found)


def _merged_kernel(mod, producer, reader, position):
    """(kernel, name): the reader's kernel with the producer computed inside it, reading the
    producer's arguments in place of its `position`-th; None when the reader's kernel cannot take
    it without computing an element twice."""
    (producer_kernel, producer_args), (reader_kernel, reader_args) = _call_tir(producer.value), _call_tir(reader.value)
    if not isinstance(reader.var.ty, relax.TensorType) or not isinstance(mod[reader_kernel], tvm.tirx.PrimFunc):
        return None
    try:
        kernel = _fused(mod[producer_kernel], mod[reader_kernel], producer_args, reader_args, position,
                        producer.var.ty, reader.var.ty)
        kernel = _placed(kernel, _root_blocks(mod[producer_kernel]), tensor_elements(producer.var.ty))
    except Exception:  # noqa: BLE001 - FuseTIR or a primitive refused: the reader keeps the stored tensor
        return None
    return None if kernel is None else (kernel, f"{reader_kernel.name_hint}_with_{producer_kernel.name_hint}")


def _fused(producer, reader, producer_args, reader_args, position, mid_ty, out_ty):
    """One PrimFunc computing the producer into an intermediate buffer, then the reader: TVM's
    FuseTIR merging a group of the two calls (what it does for FuseOps' groups)."""
    bb = relax.BlockBuilder()
    producer_gv, reader_gv = bb.add_func(producer, "producer"), bb.add_func(reader, "reader")
    outer = reader_args[:position] + producer_args + reader_args[position + 1:]
    params = [relax.Var(f"a{i}", a.ty) for i, a in enumerate(outer)]
    split = position + len(producer_args)
    inner_producer = params[position:split]
    with bb.function("merged", params, {"Primitive": True}, private=True):
        with bb.dataflow():
            mid = bb.emit(relax.call_tir(producer_gv, inner_producer, mid_ty))
            out = bb.emit_output(relax.call_tir(reader_gv, params[:position] + [mid] + params[split:], out_ty))
        bb.emit_func_output(out)
    group = bb.get().get_global_var("merged")
    caller = [relax.Var(f"c{i}", a.ty) for i, a in enumerate(outer)]
    with bb.function("main", caller):
        with bb.dataflow():
            result = bb.emit_output(relax.Call(group, caller))
        bb.emit_func_output(result)
    fused = relax.transform.FuseTIR()(bb.get())
    kernels = [f for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 1, "FuseTIR left more than the merged kernel"
    return kernels[0].with_attrs(reader.attrs) if reader.attrs is not None else kernels[0]


def _root_blocks(kernel) -> int:
    sch = kernel_schedule(kernel)
    return len(sch.get_child_blocks(sch.get_sblock("root")))


def _placed(kernel, producer_blocks: int, elements: int):
    """The merged kernel with the producer computed under the reader's loops, each element once;
    None when no placement does that."""
    sch = kernel_schedule(kernel)
    root = sch.get_sblock("root")
    for block in reversed(sch.get_child_blocks(root)[: producer_blocks - 1]):  # the producer's stages, into its last
        sch.compute_inline(block)
    writer, *rest = sch.get_child_blocks(root)
    mid = sch.get(writer).writes[0].source
    readers = [b for b in rest if any(r.source.same_as(mid) for r in sch.get(b).reads)]
    if len(readers) != 1:
        return None
    reader = readers[0]
    read = next(r for r in sch.get(reader).reads if r.source.same_as(mid))
    index_vars = {v for r in read.region for v in collect_vars_used_in_prim_expr(r.min)}
    realize = block_realize(sch, reader)
    driving = [v for iv, value in zip(realize.block.iter_vars, realize.iter_values)
               if iv.var in index_vars for v in collect_vars_used_in_prim_expr(value)]
    loops = sch.get_loops(reader)
    spatial = []
    for loop in loops:  # the output loops above the first reduction loop
        if loop_kind(sch, reader, loop) == "R":
            break
        spatial.append(loop)
    if not spatial:
        return None
    depends = [any(sch.get(loop).loop_var.same_as(v) for v in driving) for loop in spatial]
    order = [loop for loop, d in zip(spatial, depends) if d] + [loop for loop, d in zip(spatial, depends) if not d]
    if any(not a.same_as(b) for a, b in zip(order, spatial)):
        sch.reorder(*order)
    dependent = sum(depends)
    if dependent == 0:
        return None  # the whole tensor under no loop: nothing gained
    sch.compute_at(writer, order[dependent - 1], preserve_unit_loops=True)
    computed = 1
    for loop in sch.get_loops(writer):
        computed *= loop_extent(sch, loop) or elements + 1
    return sch.mod["main"] if computed <= elements else None
