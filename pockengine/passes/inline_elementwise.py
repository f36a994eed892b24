"""inline_elementwise: compute each fused kernel's elementwise stages inside the stage that uses them.

FuseTIR turns a fused group into one PrimFunc whose stages still write whole intermediate buffers:
BatchNorm's apply (`x - mean`, `* rstd`, `* gamma`, `+ beta`, `clip`) becomes five loop nests over
four activation-sized buffers that the kernel allocates every time it runs. Those buffers are real
memory the step's plan cannot see, and five passes over memory where one suffices. This pass inlines
every stage that can be (TVM's `compute_inline`, then `reverse_compute_inline`, as dlight's default
GPU schedule does), so such a kernel is one loop nest; a reduction absorbs its elementwise prologue
(the variance's `(x - mean)^2` is summed without being stored).

An epilogue cannot be inlined into a reduction (a convolution followed by its bias, BatchNorm or
ReLU mask): there the epilogue, when it writes a tensor of the reduction's shape (not a pad of it:
see _same_domain), is moved under the reduction's spatial loops (`reverse_compute_at`),
so each group of `vector_lanes` output points is finished right after its sums and the
convolution's result is that many scalars instead of a whole activation (TIR's buffer compaction
shrinks it when the kernel is built). With `vector_lanes` > 1 one output loop of the reduction
(the innermost one a multiple of it long, else the longest such) is split by it and its inner part
moved inside the reduction loops, so a CPU schedule can vectorize it (one vector of running sums);
the loop order is all this pass decides.
TVM's schedule primitives check that the move preserves the kernel's meaning; a move they refuse
(the epilogue reads other points of the sum, as a softmax does) is not made.

Kernels are otherwise left as they are; tuned kernels (from a tuning log) and kernels that cannot be
analysed are kept unchanged.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir import dlight

from ..ir import kernel_schedule, map_kernels
from .schedule_cpu import loop_extent, runs_repeatedly


def inline_elementwise(vector_lanes: int = 1) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="InlineElementwise")
    def transform(mod, _ctx):
        return map_kernels(mod, lambda func: _inline(func, vector_lanes))

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
    for buf in _allocations(compacted.body):
        try:
            n = 1
            for d in buf.shape:
                n *= int(d)
        except TypeError:
            continue
        total += n * tvm.DataType(str(buf.dtype)).bits // 8
    return total


def _allocations(stmt) -> list:
    found = []
    tvm_ffi.structural_walk(stmt, (s_tir.SBlock, lambda block: found.extend(block.alloc_buffers)))
    return found


def _inline(func, vector_lanes: int):
    try:
        sch = kernel_schedule(func)
        blocks = dlight.normalize_prim_func(sch)
        if blocks is None:
            return None
        dlight.try_inline(sch, blocks)
        sch = _epilogues_at_reductions(sch, vector_lanes)
        return sch.mod["main"].with_attrs(func.attrs) if func.attrs is not None else sch.mod["main"]
    except Exception:  # noqa: BLE001 - keep the kernel as FuseTIR wrote it
        return None


# The narrowest output row taken whole as a (partial) vector when it is shorter than a full one.
MIN_NARROW_VECTOR = 4


def _vector_axis(sch, spatial_loops, vector_lanes: int):
    """(which output loop to compute a vector of points of at a time, how many): the innermost
    whose extent is a multiple of `vector_lanes`; else an innermost loop shorter than a vector that
    divides it, whole (LoRA's rank-8 projections: 8 contiguous outputs in half a register, where a
    vector across rows would gather every load: 5.6 GFLOP/s); else the longest multiple (a
    convolution over 4x4 pixels vectorizes its channels). None when none is, or vectors are off."""
    if vector_lanes <= 1:
        return None
    extents = [loop_extent(sch, loop) for loop in spatial_loops]
    fits = [i for i, e in enumerate(extents) if e and e % vector_lanes == 0]
    innermost = extents[-1] if extents else 0
    if fits and fits[-1] == len(extents) - 1:
        return fits[-1], vector_lanes
    if MIN_NARROW_VECTOR <= innermost < vector_lanes and vector_lanes % innermost == 0:
        return len(extents) - 1, innermost
    if not fits:
        return None
    return max(fits, key=lambda i: (extents[i], i)), vector_lanes


def _epilogues_at_reductions(sch, vector_lanes: int):
    """Split an output loop of each reduction by `vector_lanes` (inner part innermost), then
    move every non-reduction stage that reads a reduction's result under that reduction's spatial
    loops (the loops outside its reduction loops), when TVM's checks allow it. Returns the schedule
    (a copy of `sch` when a move was tried on one)."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    # Loops are one per block iterator in order here (normalize_prim_func), so kinds can be read off.
    kinds = {i: [it.kind for it in dlight.analysis.get_sblock_info(sch, b).iters] for i, b in enumerate(blocks)}
    tile_loop = {}  # reduction block index -> the loop its epilogue goes under
    for i, block in enumerate(blocks):
        k = kinds[i]
        if "R" not in k:
            continue
        spatial = k.index("R")
        if spatial == 0 or set(k[spatial:]) != {"R"}:
            continue
        loops = sch.get_loops(block)
        chosen = _vector_axis(sch, loops[:spatial], vector_lanes)
        if chosen is None:
            tile_loop[i] = loops[spatial - 1]
            continue
        vector, width = chosen
        outer, lanes = sch.split(loops[vector], [None, width])
        # reorder() permutes the loops it is given among their own positions: list every loop from
        # the split on, so the spatial ones keep their place and the reduction loops stay inside them.
        sch.reorder(*loops[vector + 1:], lanes)
        # The epilogue goes under the innermost spatial loop left outside the reduction loops.
        tile_loop[i] = outer if vector == spatial - 1 else loops[spatial - 1]
    for i, block in enumerate(blocks):
        if i in tile_loop:
            continue
        for producer in sch.get_producers(block):
            j = next((j for j, b in enumerate(blocks) if sch.get(b).same_as(sch.get(producer))), None)
            if j not in tile_loop or not _same_domain(sch, block, producer):
                continue
            moved = _reverse_compute_at_once(sch, block, _loops_outward(sch, blocks[j], tile_loop[j]))
            if moved is None:  # the epilogue needs more than these points of the sum
                continue
            sch = moved
            break
    return sch


def _same_domain(sch, block, producer) -> bool:
    """Does the epilogue write a tensor of the shape its reduction writes? One wider than it (a pad
    of the reduction's result: a sliced weight's data gradient padded back to all channels) has
    points no iteration of the reduction covers, and TVM's reverse_compute_at drops them."""
    def shapes(b):
        return [[int(d) for d in region.source.shape] for region in sch.get(b).writes]

    return shapes(block) == shapes(producer)


def _loops_outward(sch, block, loop) -> list:
    """`loop` (one of the block's loops), then the loops around it, innermost first."""
    loops = sch.get_loops(block)
    at = next(i for i, other in enumerate(loops) if sch.get(other).same_as(sch.get(loop)))
    return loops[at::-1]


def _reverse_compute_at_once(sch, block, loops):
    """The schedule with `block` moved under the first of `loops` where TVM accepts the move and
    the block then runs once per instance; else under the first where TVM accepts it (it repeats
    there); None when TVM accepts none. An epilogue reading its reduction at fixed indices along an
    inner loop (a 1x1 weight gradient's `dw[o, c, 0, 0]` out of the 2x2 points a stride-2
    convolution's gradient of an even-sized input computes) would run once per iteration of that
    loop: redundant work, and a repeated update where the output is written over the old value
    (update_in_place, which then keeps a copy). It goes under the loop outside instead."""
    fallback = None
    for loop in loops:
        trial = sch.copy()
        try:
            trial.reverse_compute_at(block, loop, preserve_unit_loops=True)
        except s_tir.schedule.ScheduleError:
            continue
        if not runs_repeatedly(trial, block):
            return trial
        if fallback is None:
            fallback = trial
    return fallback
