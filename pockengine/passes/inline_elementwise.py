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
moved inside the reduction loops, so a CPU schedule can vectorize it (one vector of running sums),
except in a reduction along each output's own contiguous row (softmax, norms: see _row_reduction);
the loop order is all this pass decides.
TVM's schedule primitives check that the move preserves the kernel's meaning; a move they refuse
(the epilogue reads other points of the sum, as a softmax does) is not made. A matmul that
schedule_cpu will tile for registers keeps its epilogue apart (see _register_tiled_matmul).

A convolution (a reduction over several loops: channels and kernel positions) is also tiled for
registers: a tile of output rows that the vector operand does not depend on (the output channels)
goes inside the reduction loops, before the vector, so each input vector loaded feeds a tile of
running sums (schedule_cpu unrolls it: one register each). Its padded input, instead of being
inlined (a bounds test per load), is computed per tile under the loops outside it (a few input rows
of every channel), or, for a weight gradient whose vectors run across input channels, once for the
whole kernel with the channels made contiguous (channels-last). A plain 4-conv CNN (test_schedule_cpu): 17.3 ->
3.3 ms per step (its convolutions 9-13 -> 50-110 GFLOP/s).

Kernels are otherwise left as they are; tuned kernels (from a tuning log) and kernels that cannot be
analysed are kept unchanged.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir import dlight

from ..ir import PANEL_OPERAND, kernel_schedule, map_kernels
from .schedule_cpu import loop_extent, register_tile, register_tiles, runs_repeatedly, uses_var


def inline_elementwise(vector_lanes: int = 1, vector_registers: int = 16) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="InlineElementwise")
    def transform(mod, _ctx):
        return map_kernels(mod, lambda func: _inline(func, vector_lanes, vector_registers))

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


def _inline(func, vector_lanes: int, vector_registers: int):
    try:
        sch = kernel_schedule(func)
        blocks = dlight.normalize_prim_func(sch)
        if blocks is None:
            return None
        padded = _padded_inputs(sch, blocks)
        panel_operands = {b.name for b in blocks if PANEL_OPERAND in sch.get(b.block_rv).annotations}
        dlight.try_inline(sch, [b for b in blocks if b.name not in padded | panel_operands])
        sch = _epilogues_at_reductions(sch, vector_lanes, vector_registers, padded)
        return sch.mod["main"].with_attrs(func.attrs) if func.attrs is not None else sch.mod["main"]
    except Exception:  # noqa: BLE001 - keep the kernel as FuseTIR wrote it
        return None


def _padded_inputs(sch, blocks) -> set:
    """Names of the blocks that pad (an `if_then_else` of an input or zero) the input of a
    convolution (a reduction over more than one loop): placed per tile of output rows rather than
    inlined, when that window is small (see _place_padded_input)."""
    found = set()
    for info in blocks:
        if info.dom_kind().count("R") < 2:
            continue
        for read in sch.get(info.block_rv).reads:
            producer = next((b for b in blocks if "R" not in b.dom_kind()
                             and any(w.source.same_as(read.source) for w in sch.get(b.block_rv).writes)), None)
            if producer is not None and _is_pad(sch.get(producer.block_rv)):
                found.add(producer.name)
    return found


def _is_pad(block) -> bool:
    value = block.body.value if isinstance(block.body, tvm.tirx.BufferStore) else None
    return isinstance(value, tvm.ir.expr.Call) and value.op.same_as(tvm.ir.Op.get("prim.if_then_else"))


# The narrowest output row taken whole as a (partial) vector when it is shorter than a full one.
MIN_NARROW_VECTOR = 4


def _vector_axis(sch, spatial_loops, vector_lanes: int):
    """(which output loop to compute a vector of points of at a time, how many): the innermost
    whose extent is a multiple of `vector_lanes`; else an innermost loop shorter than a vector that
    divides it, whole (LoRA's rank-8 projections: 8 contiguous outputs in half a register, where a
    vector across rows would gather every load: 5.6 GFLOP/s); else the longest multiple (a
    convolution over 4x4 pixels vectorizes its channels). None when none is, or vectors are off."""
    choices = _vector_axes(sch, spatial_loops, vector_lanes)
    return choices[0] if choices else None


def _vector_axes(sch, spatial_loops, vector_lanes: int) -> list:
    """Every choice of _vector_axis, the one it makes first, then the other multiples, longest first."""
    if vector_lanes <= 1:
        return []
    extents = [loop_extent(sch, loop) for loop in spatial_loops]
    fits = [i for i, e in enumerate(extents) if e and e % vector_lanes == 0]
    innermost = extents[-1] if extents else 0
    others = [(i, vector_lanes) for i in sorted(fits, key=lambda i: (extents[i], i), reverse=True)]
    if fits and fits[-1] == len(extents) - 1:
        return [(fits[-1], vector_lanes)] + [c for c in others if c[0] != fits[-1]]
    if MIN_NARROW_VECTOR <= innermost < vector_lanes and vector_lanes % innermost == 0:
        return [(len(extents) - 1, innermost)] + others
    return others


def _epilogues_at_reductions(sch, vector_lanes: int, vector_registers: int = 16, padded=frozenset()):
    """Split an output loop of each reduction by `vector_lanes` (inner part innermost), tile a
    convolution's output rows (_tile_rows), then move every non-reduction stage that reads a
    reduction's result under that reduction's spatial loops (the loops outside its reduction
    loops), when TVM's checks allow it, and place the padded inputs left (_place_padded_input).
    Returns the schedule (a copy of `sch` when a move was tried on one)."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    # Loops are one per block iterator in order here (normalize_prim_func), so kinds can be read off.
    kinds = {i: [it.kind for it in dlight.analysis.get_sblock_info(sch, b).iters] for i, b in enumerate(blocks)}
    tile_loop = {}  # reduction block index -> the loop its epilogue goes under
    placements = {}  # padded input's buffer -> (loop to compute it under, or None; axis to make contiguous, or None)
    inputs_to_transpose = []  # (reduction block, kernel input, axis to make contiguous)
    for i, block in enumerate(blocks):
        k = kinds[i]
        if "R" not in k:
            continue
        spatial = k.index("R")
        if spatial == 0 or set(k[spatial:]) != {"R"}:
            continue
        loops = sch.get_loops(block)
        choices = [] if _row_reduction(sch, block) else _vector_axes(sch, loops[:spatial], vector_lanes)
        if not choices:
            tile_loop[i] = loops[spatial - 1]
            continue
        vector, width = choices[0]
        operand = rows = None
        if len(k) - spatial >= 2:
            # A convolution: the vector axis that leaves the largest tile of rows (the first such).
            # A stride-2 weight gradient vectorized its 128 output channels (y_grad channels-last)
            # over rows of 3 kernel columns, 3 sums per vector loaded (31 GFLOP/s); its 64 input
            # channels leave tiles of 8 output channels.
            best = 0
            for vector_choice, width_choice in choices:
                found = _vector_operand(sch, block, vector_choice, padded)
                rows_choice = _rows_axis(sch, block, spatial, vector_choice, found[0]) if found else None
                size = _row_tile(sch, loops[rows_choice], vector_registers) if rows_choice is not None else None
                if size and size > best:
                    vector, width, operand, rows, best = vector_choice, width_choice, found, rows_choice, size
        outer, lanes = sch.split(loops[vector], [None, width])
        # reorder() permutes the loops it is given among their own positions: list every loop from
        # the split on, so the spatial ones keep their place and the reduction loops stay inside them.
        sch.reorder(*loops[vector + 1:], lanes)
        if _register_tiled_matmul(sch, loops, spatial, vector, outer, len(k) - spatial, vector_lanes,
                                  vector_registers):
            continue  # its epilogue stays a loop nest of its own, after it
        # The epilogue goes under the innermost spatial loop left outside the reduction loops.
        tile_loop[i] = outer if vector == spatial - 1 else loops[spatial - 1]
        relayout = operand[1] if operand else None
        tiled = _tile_rows(sch, loops, spatial, rows, vector, outer, lanes, vector_registers, relayout is None)
        if tiled is not None:
            tile_loop[i], rows_outside = tiled
            source = operand[0].source
            if relayout is None:  # a window of the padded input under the loops outside the tile
                placements[source] = (rows_outside, None)
            elif any(sch.get(b).name_hint in padded and sch.get(b).writes[0].source.same_as(source) for b in blocks):
                placements[source] = (None, relayout)  # the whole padded input, vector's axis last
            else:  # an input of the kernel: a copy with the vector's axis last
                inputs_to_transpose.append((block, source, relayout))
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
    for block, source, axis in inputs_to_transpose:
        sch = _transposed_input(sch, block, source, axis)
    for block in blocks:
        if sch.get(block).name_hint in padded:
            written = sch.get(block).writes[0].source
            placement = next((v for buf, v in placements.items() if buf.same_as(written)), None)
            sch = _place_padded_input(sch, block, placement)
    return sch


def _row_reduction(sch, block) -> bool:
    """Is the block a reduction of each output's own row along its contiguous axis (a softmax's
    max and sum of exps, a norm's sum of squares): one reduction iterator, every read it indexes
    indexed by it in its last dimension and by every output iterator? No value is shared between
    outputs, so a vector across outputs only gathers (a 9 x 256 x 256 softmax: 0.73 ms); schedule_cpu
    vectorizes such a row along itself instead (_vector_partial_sums). A matmul reads an operand
    shared by a row of outputs."""
    stmt = sch.get(block)
    reduced = [iv.var for iv in stmt.iter_vars if iv.iter_type == tvm.tirx.IterVar.CommReduce]
    spatial = [iv.var for iv in stmt.iter_vars if iv.iter_type != tvm.tirx.IterVar.CommReduce]
    if len(reduced) != 1:
        return False
    indexed = [read for read in stmt.reads if any(uses_var(r.min, reduced[0]) for r in read.region)]
    return bool(indexed) and all(
        read.region[-1].min.same_as(reduced[0])
        and all(any(uses_var(r.min, var) for r in read.region) for var in spatial)
        for read in indexed)


def _register_tiled_matmul(sch, loops, spatial, vector, outer, reduction_loops, vector_lanes, vector_registers):
    """Will schedule_cpu give this reduction register tiles inside cache blocks (a matmul: one
    reduction loop, the vectors along the last output axis, a tile that divides rows and vectors)?
    Its epilogue (a bias, an activation) is then left out of it: finished per vector inside the
    reduction, it keeps the whole reduction under each vector and no tile is possible (Qwen2's
    q/k/v projections with their biases ran at 20 GFLOP/s, the same matmul without at 130). The
    epilogue becomes an elementwise pass over the result, which the kernel holds whole (counted
    as its workspace)."""
    if reduction_loops != 1 or vector != spatial - 1 or spatial < 2 or vector_lanes < 2:
        return False
    rows, vectors = loop_extent(sch, loops[spatial - 2]), loop_extent(sch, outer)
    return register_tile(rows, vectors, register_tiles(vector_registers)) is not None


# Output rows per register tile of a convolution when they do not all fit: the most that divides
# them, one vector of sums each in at most half the target's vector registers (the rest hold the
# operands).
ROW_TILES = (16, 8, 4, 2)
# A convolution's padded input is kept per tile of output rows (a few input rows of every channel,
# cache-resident) when it is at most this large; else it is inlined (its bounds tested per load).
PADDED_WINDOW_BYTES = 64 * 1024
# A weight gradient's padded input or y_grad, whose vectors run across channels, is copied
# channels-last (once per kernel call) when the kernel's workspace stays at most this large; else
# its vectors are gathered.
TRANSPOSED_INPUT_BYTES = 8 * 1024 * 1024


def _vector_operand(sch, block, vector: int, padded):
    """The read a convolution's vector of outputs loads a vector of: (read region, None) when its
    contiguous (last) index follows the vector loop; (region, axis) for a padded input or an input
    of the kernel the vector loop indexes along another axis (a weight gradient's input channels,
    or a stem's output channels in y_grad), which can be laid out with that axis last; None
    otherwise."""
    stmt = sch.get(block)
    vector_var = stmt.iter_vars[vector].var
    for read in stmt.reads:
        if read.region and uses_var(read.region[-1].min, vector_var):
            return read, None
    writers = {sch.get(b).name_hint: sch.get(b).writes[0].source for b in sch.get_child_blocks(sch.get_sblock("root"))}
    for read in stmt.reads:
        axes = [d for d, r in enumerate(read.region) if uses_var(r.min, vector_var)]
        padded_input = any(buf.same_as(read.source) for name, buf in writers.items() if name in padded)
        kernel_input = not any(buf.same_as(read.source) for buf in writers.values())
        if len(axes) == 1 and (padded_input or kernel_input):
            return read, axes[0]
    return None


def _rows_axis(sch, block, spatial: int, vector: int, vector_read):
    """The spatial loop (index) of a convolution to tile as register rows: one the vector operand
    does not depend on and another read does, the innermost such (the output channels: one input
    vector then feeds a tile of channels' sums, their weights broadcast). None when there is none."""
    stmt = sch.get(block)
    iter_vars = [iv.var for iv in stmt.iter_vars]
    vector_var = iter_vars[vector]

    def uses(region, var):
        return any(uses_var(r.min, var) for r in region)

    candidates = [i for i in range(spatial) if i != vector and not uses(vector_read.region, iter_vars[i])
                  and any(uses(r.region, iter_vars[i]) and not uses(r.region, vector_var) for r in stmt.reads)]
    return candidates[-1] if candidates else None


def _tile_rows(sch, loops, spatial, rows, vector, outer, lanes, vector_registers, others_outside=True):
    """Tile the rows loop: loops (others..., rows_outer, vector_outer, reductions..., rows_inner,
    lanes), so each vector of the input read in the reduction feeds a tile of rows' running sums,
    held in registers. With `others_outside` False the other spatial loops go inside the tile's
    (rows_outer, vector_outer, others...): a weight gradient's kernel positions, whose outputs are
    interleaved in memory, are then finished together. Returns (the loop epilogues go under, the
    loop outside the tile of rows), or None (nothing changed) when no tile fits (_row_tile)."""
    size = _row_tile(sch, loops[rows], vector_registers) if rows is not None else None
    if size is None:
        return None
    rows_outer, rows_inner = sch.split(loops[rows], [None, size])
    others = [loop for i, loop in enumerate(loops[:spatial]) if i not in (rows, vector)]
    if others_outside or not others:
        sch.reorder(*others, rows_outer, outer, *loops[spatial:], rows_inner, lanes)
        return outer, (others[-1] if others else None)
    sch.reorder(rows_outer, outer, *others, *loops[spatial:], rows_inner, lanes)
    return others[-1], None


def _row_tile(sch, loop, vector_registers: int):
    """The rows per register tile for this rows loop: all of it when it fits, else the first of
    ROW_TILES that divides it and fits; None when none does."""
    extent = loop_extent(sch, loop)
    if 2 <= extent <= vector_registers // 2:
        return extent  # the whole loop (a 7x7 kernel's columns, 5 output channels)
    return next((t for t in ROW_TILES if t <= vector_registers // 2 and extent and extent % t == 0), None)


def _transposed_input(sch, block, source, axis: int):
    """The schedule with a copy of kernel input `source`, laid out with `axis` last, read by
    `block` in its place (a stem's y_grad channels-last, so its weight gradient's vectors of output
    channels are loads, not gathers), when the kernel's workspace stays within
    TRANSPOSED_INPUT_BYTES; else `sch` unchanged."""
    trial = sch.copy()
    try:
        index = next(i for i, r in enumerate(trial.get(block).reads) if r.source.same_as(source))
        copy = trial.cache_read(block, index, "global")
        trial.transform_layout(copy, ("write", 0), _axis_last(len(source.shape), axis))
    except (StopIteration, s_tir.schedule.ScheduleError):
        return sch
    return trial if intermediate_bytes(trial.mod["main"]) <= TRANSPOSED_INPUT_BYTES else sch


def _axis_last(rank: int, axis: int):
    """The index map moving `axis` of a rank-`rank` buffer last (channels-last for axis 1 of NCHW)."""
    order = [d for d in range(rank) if d != axis] + [axis]
    return lambda *idx: [idx[d] for d in order]


def _place_padded_input(sch, block, placement):
    """A tiled convolution's padded input: computed under the loop outside its tile of output rows
    (a window of input rows, reused by every tile of rows there) when that is at most
    PADDED_WINDOW_BYTES; or, when its vectors run along another axis, computed whole with that
    axis made contiguous, when at most TRANSPOSED_INPUT_BYTES. Otherwise inlined, as before."""
    if placement is not None:
        loop, axis = placement
        trial = sch.copy()
        try:
            if axis is not None:
                trial.transform_layout(block, ("write", 0),
                                       _axis_last(len(trial.get(block).writes[0].source.shape), axis))
                limit = TRANSPOSED_INPUT_BYTES
            elif loop is not None:
                trial.compute_at(block, loop, preserve_unit_loops=True)
                limit = PADDED_WINDOW_BYTES
            else:
                limit = -1
            if intermediate_bytes(trial.mod["main"]) <= limit:
                return trial
        except s_tir.schedule.ScheduleError:
            pass
    _try_inline(sch, block)
    return sch


def _try_inline(sch, block) -> None:
    try:
        sch.compute_inline(block)
    except s_tir.schedule.ScheduleError:
        pass


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
