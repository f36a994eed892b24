"""inline_elementwise: compute each fused kernel's elementwise stages inside the stage that uses them.

FuseTIR turns a fused group into one PrimFunc whose stages still write whole intermediate buffers:
BatchNorm's apply (`x - mean`, `* rstd`, `* gamma`, `+ beta`, `clip`) becomes five loop nests over
four activation-sized buffers that the kernel allocates every time it runs. Those buffers are real
memory the step's plan cannot see, and five passes over memory where one suffices. This pass inlines
every stage that can be (TVM's `compute_inline`, then `reverse_compute_inline`, as dlight's default
GPU schedule does), so such a kernel is one loop nest; a reduction absorbs its elementwise prologue
(the variance's `(x - mean)^2` is summed without being stored).

An epilogue cannot be inlined into a reduction (a convolution followed by its bias, BatchNorm or
ReLU mask): there the epilogue is moved under the reduction's spatial loops (`reverse_compute_at`),
so each output point is finished right after its sum and the convolution's result is one scalar
instead of a whole activation (TIR's buffer compaction shrinks it when the kernel is built).
TVM's schedule primitives check that the move preserves the kernel's meaning; a move they refuse
(the epilogue reads other points of the sum, as a softmax does) is not made.

Kernels are otherwise left as they are (tuning is another matter); a kernel that cannot be
analysed is kept unchanged.
"""

from __future__ import annotations

import tvm
from tvm import s_tir
from tvm.s_tir import dlight


def inline_elementwise() -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="InlineElementwise")
    def transform(mod, _ctx):
        updates = {}
        for gv, func in mod.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc) and intermediate_bytes(func):
                inlined = _inline(func)
                if inlined is not None:
                    updates[gv] = inlined
        if not updates:
            return mod
        mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return transform


# The part of TVM's TIR lowering that places each allocation at the innermost loop using it and
# shrinks it to the region used there: what the built kernel really allocates.
_COMPACT = (s_tir.transform.LowerInitBlock, s_tir.transform.PlanAndUpdateBufferAllocationLocation,
            s_tir.transform.ConvertBlocksToOpaque, s_tir.transform.CompactBufferAllocation)


def intermediate_bytes(func) -> int:
    """Bytes of the buffers a kernel allocates for itself (its stages' intermediates), as built."""
    try:
        compacted = tvm.transform.Sequential([p() for p in _COMPACT])(tvm.IRModule({"main": func}))["main"]
    except Exception:  # noqa: BLE001 - not a block-structured kernel
        return 0
    total = 0
    for buf in _allocations(compacted.body, []):
        try:
            n = 1
            for d in buf.shape:
                n *= int(d)
        except TypeError:
            continue
        total += n * tvm.DataType(str(buf.dtype)).bits // 8
    return total


def _allocations(stmt, found: list) -> list:
    if stmt is None:
        return found
    found.extend(getattr(stmt, "alloc_buffers", None) or [])
    for field in ("body", "block", "then_case", "else_case", "init"):
        _allocations(getattr(stmt, field, None), found)
    for child in getattr(stmt, "seq", None) or []:
        _allocations(child, found)
    return found


def _inline(func):
    try:
        sch = s_tir.Schedule(func)
        blocks = dlight.normalize_prim_func(sch)
        if blocks is None:
            return None
        dlight.try_inline(sch, blocks)
        _epilogues_at_reductions(sch)
        return sch.mod["main"].with_attrs(func.attrs) if func.attrs is not None else sch.mod["main"]
    except Exception:  # noqa: BLE001 - keep the kernel as FuseTIR wrote it
        return None


def _epilogues_at_reductions(sch) -> None:
    """Move every non-reduction stage that reads a reduction's result under that reduction's spatial
    loops (the loops outside its reduction loops), when TVM's checks allow it."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if dlight.analysis.get_sblock_info(sch, block).is_reduction():
            continue
        for producer in sch.get_producers(block):
            kinds = [it.kind for it in dlight.analysis.get_sblock_info(sch, producer).iters]
            if "R" not in kinds:
                continue
            spatial = kinds.index("R")
            if spatial == 0 or set(kinds[spatial:]) != {"R"}:
                continue
            try:
                sch.reverse_compute_at(block, sch.get_loops(producer)[spatial - 1], preserve_unit_loops=True)
            except s_tir.schedule.ScheduleError:  # the epilogue needs more than this point of the sum
                continue
            break
