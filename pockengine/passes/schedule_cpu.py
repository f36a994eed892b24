"""schedule_cpu: the default schedule of every kernel nobody tuned — outer loops on all cores,
innermost loops as SIMD vectors.

Legalized kernels are naive loop nests run by one thread, an order of magnitude behind PyTorch, and
dlight's CPU rules cover only GEMV and reductions. This pass gives each top-level loop nest of a
kernel:
  * `parallel` on its outer loops (the loops shared by every stage of the nest, spatial for all of
    them, fused into one so there is work for every core);
  * `vectorize` on each stage's innermost loop when it is spatial and short (the `vector_lanes`
    inner part inline_elementwise split off a reduction's output loop; an elementwise nest's
    innermost loop is split by `vector_lanes` here when it is a multiple of it (_schedule_vector_rows),
    else the nest is fused and split, or split by whole rows when they are shorter than a vector:
    see _schedule_short_rows). A reduction's initialisation is then split off
    (`decompose_reduction`) so its update loop is a plain vector of running sums;
  * transposes (an elementwise nest reading a full-size input along another axis than it writes)
    in TRANSPOSE_TILE x TRANSPOSE_TILE tiles, so each cache line read is used whole while it is
    hot: 1024x512 float32, 2 cores, 2.02 ms flat, 0.21 ms tiled (8: 0.41, 32: 0.61). The
    transformer's attention and weight-gradient transposes are such kernels;
  * matmuls without an epilogue in register tiles of rows x vectors (the transformer's
    untuned step: 404 -> 218 ms), inside cache blocks, the operand read along the vectors packed
    into tile-wide panels (the BLIS structure; SmolLM's LM head 16 -> 137 GFLOP/s, MKL ~100-110);
  * reductions along a row's contiguous innermost axis (softmax, norms, the loss) as vectors of
    partial sums, then the lanes added;
  * a convolution's tile of output rows (laid out by inline_elementwise: the tile's rows inside
    the reduction loops, then its vector) unrolled, one register of running sums per row;
  * a stage marked ir.PANEL_OPERAND (a 4-bit or int8 weight's dequantization, frontend/w4_ops.py)
    computed into the panels its matmul packs, one cache block at a time (the matmul is then packed
    however few its rows): read in place, each vector of it would be a gather of scalars. At
    512x576x1536 on 2 cores, 16 -> 95 GFLOP/s, the float matmul's speed.
Nothing more (no tiles for matmuls with a fused epilogue): that is what tuning (MetaSchedule) is for.
Every step is a TVM schedule primitive, which refuses a transformation that would change the
kernel's result; a refused step is skipped and the kernel keeps what was applied before it.
A block writing several buffers (an argmax's value and index: TVM's max-pool gradient) is not
vectorized: TVM 0.27 computes such a vectorized tuple reduction wrong (wrong maxima, on every target
and opt level; ResNet's max-pool stem trained 3% off PyTorch after one step).
Kernels already scheduled (`tirx.is_scheduled`, e.g. from a tuning database) are left alone.
"""

from __future__ import annotations

import math

import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

from ..ir import PANEL_OPERAND, kernel_schedule, map_kernels

MAX_VECTOR = 64  # longest innermost loop turned into one vector
# Waking the thread pool costs microseconds: an elementwise kernel smaller than this runs on one core.
MIN_PARALLEL_ELEMENTS = 4096
TRANSPOSE_TILE = 16
# A row reduction keeps this many vectors of running sums (independent additions in flight).
PARTIAL_SUM_VECTORS = 4
# A matmul's register tile: rows x vectors of outputs, the first of these that divides the matmul and
# whose accumulators, one vector of the packed operand per column and the broadcast row value fit
# the target's vector registers. AVX2 (16 registers): 4 x 3 (12 accumulators; 256x576x1536: 72 ->
# 78 GFLOP/s on one core against 4 x 2), 6 x 2 when the vectors are not a multiple of 3; AVX-512
# and aarch64 (32): 8 x 2 (512x688x256: 252 -> 311 GFLOP/s here). 8 x 1 is for vectors that do not
# pair up: LLaMA's MLP width 688 is 43 vectors of 16 (AVX-512), and untiled its matmuls ran at 67
# GFLOP/s against 240 for their 256-wide neighbours.
REGISTER_TILES = ((8, 2), (4, 3), (6, 2), (4, 2), (8, 1), (2, 2), (4, 1), (2, 1))
# Cache blocking around the register tiles (the BLIS/oneDNN structure). A block of the reduction
# at most PANEL_DEPTH deep: one register tile's columns of the packed operand (PANEL_DEPTH x 3
# vectors: 24 KiB on AVX2) stay in L1 while every row tile of the block passes over them. The rows
# operand's block (rows x depth) and the packed operand's panel (depth x columns) are each at most
# BLOCK_BYTES, so both stay in a 512 KiB L2 (this host's per core; a Jetson Orin's Cortex-A78AE has
# 256 KiB with an L3 behind it: not measured there). Measured 2 cores AVX2, against MKL
# (torch.matmul) on the same shapes: the LM head of SmolLM (256x576 @ 576x49152) 16 -> 137
# GFLOP/s (MKL 99-110), its gradient (256x49152 @ 49152x576) 23 -> 129 (MKL 156-164);
# 128x896 @ 896x4864 42 -> 115 (MKL 114-136).
PANEL_DEPTH = 256
MIN_PANEL_DEPTH = 64  # a reduction with no divisor between this and PANEL_DEPTH is not split
BLOCK_BYTES = 256 * 1024
# The packed operand's panel is reused by the block's row tiles: packing it pays from this many on.
MIN_ROW_TILES_TO_PACK = 4


def register_tiles(vector_registers: int) -> tuple:
    return tuple((r, v) for r, v in REGISTER_TILES if r * v + v + 1 <= vector_registers)


def register_tile(rows: int, vectors: int, tiles) -> tuple | None:
    """The first of `tiles` (best first) that divides `rows` rows and `vectors` vectors of outputs."""
    return next(((r, v) for r, v in tiles if rows % r == 0 and vectors % v == 0), None)


def column_panel_width(rows: int, columns: int, depth: int, batch: int, vector_lanes: int, cores: int,
                       vector_registers: int = 16, itemsize: int = 4) -> int | None:
    """The width of the panels a matmul of `batch` x `rows` x `depth` by `depth` x `columns`
    copies its column operand into (see _schedule_register_tiles and _pack_columns), or None when
    its default schedule reads that operand in place. Prepared panels of this width
    (passes/pack_frozen_weights.py) are read with the same register tile."""
    if columns % vector_lanes:
        return None
    vectors = columns // vector_lanes
    tile = register_tile(rows, vectors, register_tiles(vector_registers))
    if tile is None:
        return None
    _, block_rows, _ = _cache_blocks((rows, vectors, depth, vector_lanes), tile, cores, batch, itemsize)
    return tile[1] * vector_lanes if block_rows // tile[0] >= MIN_ROW_TILES_TO_PACK else None


def schedule_cpu(vector_lanes: int, cores: int, vector_registers: int = 16) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="ScheduleCPU")
    def transform(mod, _ctx):
        return map_kernels(mod, lambda func: schedule_kernel(func, vector_lanes, cores, vector_registers))

    return transform


def schedule_kernel(func, vector_lanes: int, cores: int, vector_registers: int = 16):
    if _has_empty_loop(func):  # a tensor with no entries (a zero-width slice): nothing to schedule,
        return None            # and fusing its loops divides by their zero extent
    # A step TVM refuses: schedule the kernel again without packed operands, then without tiles.
    for tiles, pack in ((True, True), (True, False), (False, False)):
        try:
            sch = kernel_schedule(func)
            root = sch.get_sblock("root")
        except Exception:  # noqa: BLE001 - not a block-structured kernel
            return None
        try:
            nests = _nests(sch, root)
            panel_operands = [nest[0] for nest in nests if len(nest) == 1 and _is_panel_operand(sch, nest[0])]
            for nest in nests:
                if not (len(nest) == 1 and _is_panel_operand(sch, nest[0])):
                    _schedule_nest(sch, nest, vector_lanes, cores, register_tiles(vector_registers) if tiles else None,
                                   pack, always_pack=bool(panel_operands))
            for block in panel_operands:
                # Into the panels the matmul packed (or, unpacked, into the matmul itself).
                try:
                    sch.compute_inline(block)
                except s_tir.schedule.ScheduleError:
                    _schedule_nest(sch, [block], vector_lanes, cores, None)
        except s_tir.schedule.ScheduleError:
            continue
        scheduled = sch.mod["main"]
        return scheduled.with_attrs(func.attrs) if func.attrs is not None else scheduled
    return None


def _has_empty_loop(func) -> bool:
    empty = []
    tvm_ffi.structural_walk(func.body, (tvm.tirx.For, lambda loop: empty.append(loop)
                                        if isinstance(loop.extent, tvm.tirx.IntImm) and int(loop.extent) == 0
                                        else None))
    return bool(empty)


def _nests(sch, root) -> list[list]:
    """The root's blocks grouped by their outermost loop (blocks outside any loop are skipped)."""
    nests: list[tuple[object, list]] = []
    for block in sch.get_child_blocks(root):
        loops = sch.get_loops(block)
        if not loops:
            continue
        top = sch.get(loops[0])
        for stmt, members in nests:
            if stmt.same_as(top):
                members.append(block)
                break
        else:
            nests.append((top, [block]))
    return [members for _, members in nests]


def _try(primitive, *args, **kwargs):
    try:
        return primitive(*args, **kwargs)
    except s_tir.schedule.ScheduleError:
        return None


def _is_panel_operand(sch, block) -> bool:
    return PANEL_OPERAND in sch.get(block).annotations


def _schedule_nest(sch, blocks, vector_lanes: int, cores: int, tiles, pack: bool = True,
                   always_pack: bool = False) -> None:
    """tiles: the matmul register tiles to try, best first; None for no tiling at all. pack: copy
    the column operand of a tiled matmul into panels (see _schedule_register_tiles); `always_pack`
    even for few rows (a PANEL_OPERAND is computed there: read in place it would be gathered)."""
    if len(blocks) == 1 and not is_reduction(sch, blocks[0]):
        _schedule_elementwise(sch, blocks[0], vector_lanes, cores, tiles is not None)
        return
    if tiles and len(blocks) == 1 and _schedule_register_tiles(sch, blocks[0], vector_lanes, cores, tiles, pack,
                                                               always_pack):
        return
    blocks = _vector_partial_sums(sch, blocks, vector_lanes)
    # Annotate while the reductions still carry their initialisation (TVM only proves a loop
    # parallel or vectorizable for a complete reduction block), then split the initialisation off.
    _vectorize_innermost(sch, blocks)
    _parallel_outer(sch, blocks, cores)
    for block in blocks:
        if is_reduction(sch, block):
            tiled = _register_rows(sch, block)
            first_reduction = next((loop for loop in sch.get_loops(block)
                                    if loop_kind(sch, block, loop) == "R"), None)
            init = _try(sch.decompose_reduction, block, first_reduction) if first_reduction is not None else None
            if init is not None:
                _vectorize_innermost(sch, [init])
                if tiled:
                    _try(sch.unroll, sch.get_loops(init)[-2])
            if tiled:
                _try(sch.unroll, sch.get_loops(block)[-2])


def _vector_partial_sums(sch, blocks, vector_lanes: int) -> list:
    """The nest's blocks, each reduction along its innermost loop (a row's max, sum of exps or of
    squares: softmax, log-softmax, RMSNorm; a matrix-vector product) split in two: a vector of
    running sums, one per lane, over the row read contiguously (`rfactor`; vectorized by the
    caller), then those lanes summed, under the same outer loops. Computed one element at a time,
    the log-softmax of SmolLM's 255 x 49152 logits took 68 ms. PARTIAL_SUM_VECTORS vectors of sums
    when the row is a multiple of them, so consecutive additions do not wait for each other. Other
    blocks are returned as they are."""
    if vector_lanes <= 1:
        return blocks
    result = []
    for block in blocks:
        loops = sch.get_loops(block)
        kinds = [loop_kind(sch, block, loop) for loop in loops]
        innermost = loop_extent(sch, loops[-1]) if loops else 0
        if (not is_reduction(sch, block) or len(sch.get(block).writes) != 1 or kinds[-1:] != ["R"]
                or innermost < 2 * vector_lanes or innermost % vector_lanes):
            result.append(block)
            continue
        first_reduction = kinds.index("R")
        if "S" in kinds[first_reduction:]:
            result.append(block)  # a spatial loop inside the reduction: not a row reduction
            continue
        width = next(w * vector_lanes for w in (PARTIAL_SUM_VECTORS, 1) if innermost % (w * vector_lanes) == 0)
        lanes = sch.split(loops[-1], [None, width])[1]
        partial = _try(sch.rfactor, lanes, len(sch.get(block).writes[0].source.shape))
        if partial is None:
            result.append(block)
            continue
        if first_reduction:  # the lanes' sum under the row's loops, right after its partial sums
            sch.reverse_compute_at(block, sch.get_loops(partial)[first_reduction - 1])
        result += [partial, block]
    return result


def _register_rows(sch, block) -> bool:
    """Is the block a reduction tiled by inline_elementwise for registers: loops (...,
    reductions..., rows, vector lanes), the rows unrolled so each row's sums are a register?"""
    loops = sch.get_loops(block)
    return (len(loops) >= 3 and [loop_kind(sch, block, loop) for loop in loops[-3:]] == ["R", "S", "S"]
            and 1 < loop_extent(sch, loops[-2]) <= 16)


def _vectorize_innermost(sch, blocks) -> None:
    for block in blocks:
        loops = sch.get_loops(block)
        if (loops and loop_kind(sch, block, loops[-1]) == "S" and 1 < loop_extent(sch, loops[-1]) <= MAX_VECTOR
                and len(sch.get(block).writes) == 1):
            _try(sch.vectorize, loops[-1])


def _schedule_elementwise(sch, block, vector_lanes: int, cores: int, tiles: bool = True) -> None:
    loops = sch.get_loops(block)
    if any(loop_kind(sch, block, loop) != "S" for loop in loops):
        return
    read_axis = _transposed_read_axis(sch, block, loops) if tiles else None
    if read_axis is not None and _schedule_transpose(sch, loops, read_axis, vector_lanes, cores):
        return
    if _schedule_short_rows(sch, loops, vector_lanes, cores):
        return
    if _schedule_vector_rows(sch, loops, vector_lanes, cores):
        return
    fused = _try(sch.fuse, *loops) if len(loops) > 1 else loops[0]
    if fused is None:
        return
    extent = loop_extent(sch, fused)
    threaded = cores > 1 and extent >= MIN_PARALLEL_ELEMENTS
    if extent >= 2 * vector_lanes and extent % vector_lanes == 0 and vector_lanes > 1:
        outer, inner = sch.split(fused, [None, vector_lanes])
        _try(sch.vectorize, inner)
        if threaded:
            _try(sch.parallel, outer)
    elif threaded:
        _try(sch.parallel, fused)


def _schedule_vector_rows(sch, loops, vector_lanes: int, cores: int) -> bool:
    """An elementwise nest of several loops whose innermost extent is a multiple of the vector:
    vectors along the innermost loop, every other loop and the vectors' loop fused and run in
    parallel. Fused whole and then split, each lane's row and column would be a division and a
    remainder of the flat index, which TVM does not prove constant across a vector: LLVM computes
    them lane by lane as 64-bit divisions (the gradient of Qwen2's 128 x 151936 log-softmax:
    70 ms, 8.8 ms split along its rows). False (nothing changed) for other nests."""
    inner = loop_extent(sch, loops[-1])
    if vector_lanes <= 1 or len(loops) < 2 or not inner or inner % vector_lanes:
        return False
    elements = _elements(sch, loops)
    outer, vector = sch.split(loops[-1], [None, vector_lanes])
    _try(sch.vectorize, vector)
    rest = _try(sch.fuse, *loops[:-1], outer)
    if rest is not None and cores > 1 and elements >= MIN_PARALLEL_ELEMENTS:
        _try(sch.parallel, rest)
    return True


def _schedule_short_rows(sch, loops, vector_lanes: int, cores: int) -> bool:
    """An elementwise nest whose innermost extent is not a multiple of the vector (a 3x3 kernel's
    weights, (512, 512, 3, 3)): fused whole and split by `vector_lanes`, the lanes of a vector
    straddle rows and each lane's index is a division TVM does not simplify away (the SGD update of
    ResNet's 512x512x3x3 weights: 4.5 ms, 0.8 ms as one flat row). The vector is instead a whole
    number of rows and of `vector_lanes`: the least common multiple of the trailing loops' extents
    (those whose product is at most MAX_VECTOR: 3 x 3) and the lanes (72 = 9 AVX2 vectors), or
    those rows alone when that is over 2 MAX_VECTOR or does not divide the nest (7 x 7: 49); the
    rest runs in parallel.
    False (nothing changed) for other nests."""
    inner = loop_extent(sch, loops[-1])
    if vector_lanes <= 1 or len(loops) < 2 or not inner or inner % vector_lanes == 0:
        return False
    first, rows = len(loops), 1
    while first > 0 and loop_extent(sch, loops[first - 1]) and rows * loop_extent(sch, loops[first - 1]) <= MAX_VECTOR:
        first -= 1
        rows *= loop_extent(sch, loops[first])
    elements = _elements(sch, loops)
    if first == 0 or rows < 2 or not elements:
        return False
    threaded = cores > 1 and elements >= MIN_PARALLEL_ELEMENTS
    width = math.lcm(rows, vector_lanes)
    if width <= 2 * MAX_VECTOR and elements % width == 0 and elements > width:
        fused = _try(sch.fuse, *loops)
        if fused is None:
            return False
        outer, vector = sch.split(fused, [None, width])
    else:
        vector = _try(sch.fuse, *loops[first:]) if len(loops) - first > 1 else loops[-1]
        outer = _try(sch.fuse, *loops[:first]) if first > 1 else loops[0]
        if vector is None or outer is None:
            return False
    _try(sch.vectorize, vector)
    if threaded:
        _try(sch.parallel, outer)
    return True


def _schedule_register_tiles(sch, block, vector_lanes: int, cores: int, tiles, pack: bool = True,
                             always_pack: bool = False) -> bool:
    """A matmul-like reduction as inline_elementwise leaves it — loops (batch..., i, j, k, lanes):
    rows i, vectors j of `lanes` outputs, reduction k — computed a register tile (the first of
    `tiles` that divides it) of output vectors at a time, k outside them: each loaded input value
    then feeds several multiply-adds and the tile's running sums stay in registers. Around the
    tiles, cache blocks (see PANEL_DEPTH): loops (batch, row blocks, column blocks) in parallel,
    then reduction blocks, the tile columns, the tile rows, the reduction within the block, the
    tile. With `pack`, the operand read along the vectors is copied per reduction block into panels
    one tile wide (`[columns / tile width, depth, tile width]`), so the tile reads it contiguously:
    read in place its rows lie a whole matrix row apart, and at a power-of-two width (the LM head's
    49152 columns) all in the same L1 set. False (nothing changed) for any other shape."""
    loops = sch.get_loops(block)
    kinds = [loop_kind(sch, block, loop) for loop in loops]
    if len(loops) < 4 or kinds[-4:] != ["S", "S", "R", "S"] or any(k != "S" for k in kinds[:-4]):
        return False
    rows, vectors, reduce, lanes = loops[-4:]
    extents = [loop_extent(sch, loop) for loop in (rows, vectors, reduce, lanes)]
    narrow = extents[3] < vector_lanes and vector_lanes % extents[3] == 0 if extents[3] else False
    if 0 in extents or not (extents[3] == vector_lanes or narrow):
        return False  # symbolic extents, or not a vector (or a whole short row) of outputs innermost
    tile = register_tile(extents[0], extents[1], tiles)
    if tile is None:
        return False  # no tile divides it
    itemsize = tvm.DataType(str(sch.get(block).writes[0].source.dtype)).bits // 8
    depth, block_rows, block_vectors = _cache_blocks(
        extents, tile, cores, math.prod(loop_extent(sch, loop) for loop in loops[:-4]), itemsize)
    row_blocks, row_tiles, tile_rows = sch.split(rows, [None, block_rows // tile[0], tile[0]])
    column_blocks, column_tiles, tile_vectors = sch.split(vectors, [None, block_vectors // tile[1], tile[1]])
    reduce_blocks, reduce_inner = sch.split(reduce, [None, depth])
    sch.reorder(row_blocks, column_blocks, reduce_blocks, column_tiles, row_tiles, reduce_inner,
                tile_rows, tile_vectors, lanes)
    sch.vectorize(lanes)
    sch.unroll(tile_rows)
    sch.unroll(tile_vectors)
    if cores > 1:
        sch.parallel(sch.fuse(*loops[:-4], row_blocks, column_blocks))
    if pack and (always_pack or block_rows // tile[0] >= MIN_ROW_TILES_TO_PACK):
        _pack_columns(sch, block, reduce_blocks, tile[1] * extents[3])
    init = sch.decompose_reduction(block, reduce_blocks)
    _vectorize_innermost(sch, [init])
    # The initialisation's column-tile and row-tile loops as one: LLVM -O3 fully unrolls a 32-trip
    # loop of tile stores and then spends seconds on the straight-line code (4 s per 128-row matmul
    # kernel, 25 s of Qwen2-0.5B's build; 0.04 s fused). Same stores, same order.
    shared = [sch.get(loop) for loop in sch.get_loops(block)]
    own = [loop for loop in sch.get_loops(init) if not any(sch.get(loop).same_as(s) for s in shared)]
    serial = [loop for loop in own if sch.get(loop).kind == tvm.tirx.ForKind.SERIAL]
    if len(serial) > 1:
        sch.fuse(*serial)
    return True


def _cache_blocks(extents, tile, cores: int, batch: int, itemsize: int = 4) -> tuple:
    """(reduction depth, rows, vectors) of a matmul's cache block (see PANEL_DEPTH), each dividing
    the matmul's extent (rows i, vectors j, reduction k, lanes), rows and vectors in whole tiles.
    Of the column blocks that fit, the widest that gives every core the same number of blocks (or
    many blocks each) is taken: 3 blocks on 2 cores left one core idle a third of the time."""
    rows, vectors, reduce, lanes = extents
    depth = reduce if reduce <= PANEL_DEPTH else next(
        (d for d in range(PANEL_DEPTH, MIN_PANEL_DEPTH - 1, -1) if reduce % d == 0), reduce)
    block_rows = max((r for r in range(tile[0], rows + 1, tile[0])
                      if rows % r == 0 and r * depth * itemsize <= BLOCK_BYTES), default=tile[0])
    widest = max(tile[1], BLOCK_BYTES // (depth * lanes * itemsize))
    widths = [w for w in range(tile[1], vectors + 1, tile[1]) if vectors % w == 0 and w <= widest] or [tile[1]]

    def balanced(width: int) -> bool:
        units = batch * rows // block_rows * vectors // width
        return units % cores == 0 or units >= 8 * cores

    return depth, block_rows, max(widths, key=lambda w: (balanced(w), w))


def _pack_columns(sch, block, reduce_blocks, width: int) -> None:
    """Copy the matmul's column operand (the read indexed by the output's innermost axis and the
    reduction) into panels `width` columns wide, one reduction block at a time, under
    `reduce_blocks`: `[..., k, n] -> [..., n // width, k, n % width]` (a transposed operand,
    `[..., n, k]`, the same way). Raises ScheduleError when the read is not such a plain view."""
    stmt = sch.get(block)
    spatial = [iv.var for iv in stmt.iter_vars if iv.iter_type != tvm.tirx.IterVar.CommReduce]
    reduced = [iv.var for iv in stmt.iter_vars if iv.iter_type == tvm.tirx.IterVar.CommReduce]
    if len(reduced) != 1 or len(spatial) < 2:
        raise s_tir.schedule.ScheduleError("not a matmul's iterators")
    column, row = spatial[-1], spatial[-2]
    for index, read in enumerate(stmt.reads):
        starts = [r.min for r in read.region]
        if len(starts) < 2 or any(uses_var(start, row) for start in starts):
            continue
        n_axes = [d for d, start in enumerate(starts) if start.same_as(column)]
        k_axes = [d for d, start in enumerate(starts) if start.same_as(reduced[0])]
        if len(n_axes) != 1 or len(k_axes) != 1:
            continue
        n_axis, k_axis = n_axes[0], k_axes[0]
        if {n_axis, k_axis} != {len(starts) - 1, len(starts) - 2}:
            continue
        packed = sch.cache_read(block, index, "global")
        sch.compute_at(packed, reduce_blocks)

        def panels(*idx):
            lead, n, k = idx[:-2], idx[n_axis], idx[k_axis]  # noqa: B023 - transform_layout calls it at once
            return (*lead, n // width, k, n % width)

        sch.transform_layout(block, ("read", index), panels)
        innermost = sch.get_loops(packed)[-1]
        if n_axis > k_axis and loop_extent(sch, innermost) % width == 0:  # read along its rows
            _try(sch.vectorize, sch.split(innermost, [None, width])[1])
        elif n_axis < k_axis and loop_extent(sch, sch.get_loops(packed)[-2]) % width == 0:
            # A transposed operand ([..., n, k]: nn.Linear's weight) is read along its rows and written
            # across panels; copied in that order it is one scalar store per value. Panel-wide
            # vectors of n under k read `width` rows at once and store whole panel rows: 128x896
            # times the transpose of 4864x896, 8.3 -> 7.0 ms (MKL 8.5); SmolLM's LM head 101 -> 92.
            n_loop, k_loop = sch.get_loops(packed)[-2:]
            outer, inner = sch.split(n_loop, [None, width])
            sch.reorder(outer, k_loop, inner)
            _try(sch.vectorize, inner)
        return
    raise s_tir.schedule.ScheduleError("no column operand to pack")


def _transposed_read_axis(sch, block, loops) -> int | None:
    """The loop (index) indexing the contiguous axis of a read as large as the output, when that is
    not the innermost loop (the one the write is contiguous along); None for other kernels."""
    if len(loops) < 2:
        return None
    realize = block_realize(sch, block)
    loop_vars = [sch.get(loop).loop_var for loop in loops]
    loop_of = {}  # block iterator -> the one loop driving it
    for iv, value in zip(realize.block.iter_vars, realize.iter_values):
        driving = [i for i, var in enumerate(loop_vars) if uses_var(value, var)]
        if len(driving) == 1:
            loop_of[iv.var] = driving[0]
    elements = _elements(sch, loops)
    for read in sch.get(block).reads:
        size = math.prod(int(d) if isinstance(d, tvm.tirx.IntImm) else 0 for d in read.source.shape)
        if size < elements:  # a broadcast operand (bias, statistics): read along any axis is cheap
            continue
        drivers = {loop_of[v] for v in collect_vars_used_in_prim_expr(read.region[-1].min) if v in loop_of}
        if drivers and len(loops) - 1 not in drivers:
            return max(drivers)
    return None


def _schedule_transpose(sch, loops, read_axis: int, vector_lanes: int, cores: int) -> bool:
    """Tile the read's contiguous loop and the write's (innermost) by TRANSPOSE_TILE; everything
    outside the tile in parallel, the write's tile loop as vectors. False (nothing changed) when
    an extent is not a multiple of the tile."""
    tile = TRANSPOSE_TILE
    read_loop, write_loop = loops[read_axis], loops[-1]
    if any(loop_extent(sch, loop) == 0 or loop_extent(sch, loop) % tile for loop in (read_loop, write_loop)):
        return False  # a symbolic extent, or one the tile does not divide
    elements = _elements(sch, loops)
    read_outer, read_inner = sch.split(read_loop, [None, tile])
    write_outer, write_inner = sch.split(write_loop, [None, tile])
    others = [loop for i, loop in enumerate(loops[:-1]) if i != read_axis]
    sch.reorder(*others, read_outer, write_outer, read_inner, write_inner)
    outer = _try(sch.fuse, *others, read_outer, write_outer)
    if outer is not None and cores > 1 and elements >= MIN_PARALLEL_ELEMENTS:
        _try(sch.parallel, outer)
    if vector_lanes > 1:
        lanes = min(vector_lanes, tile)
        _, vector = sch.split(write_inner, [None, lanes])
        _try(sch.vectorize, vector)
    return True


def _parallel_outer(sch, blocks, cores: int) -> None:
    """Fuse the leading loops every block of the nest shares (spatial for all, not vectorized) until
    there is work for each core, and run them in parallel."""
    if cores <= 1:
        return
    shared = sch.get_loops(blocks[0])
    for block in blocks[1:]:
        loops, n = sch.get_loops(block), 0
        while n < min(len(shared), len(loops)) and sch.get(shared[n]).same_as(sch.get(loops[n])):
            n += 1
        shared = shared[:n]
    chosen, work = [], 1
    for loop in shared:
        stmt = sch.get(loop)
        # A unit loop (a split's whole outer part) drives some blocks and not others: it is no
        # obstacle, and stopping at it left ResNet's 7x7 stem weight gradient on one core (21 ms).
        if stmt.kind != tvm.tirx.ForKind.SERIAL or any(loop_kind(sch, b, loop) not in ("S", "-") for b in blocks):
            break
        chosen.append(loop)
        work *= loop_extent(sch, loop)
        if work >= 4 * cores:
            break
    if not chosen or work < cores:
        return
    fused = _try(sch.fuse, *chosen) if len(chosen) > 1 else chosen[0]
    if fused is not None:
        _try(sch.parallel, fused)


def _elements(sch, loops) -> int:
    """The points a loop nest visits (0 when an extent is not a constant)."""
    return math.prod(loop_extent(sch, loop) for loop in loops)


def loop_extent(sch, loop) -> int:
    """A loop's constant trip count, 0 when it is not a constant."""
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tvm.tirx.IntImm) else 0


def is_reduction(sch, block) -> bool:
    return any(iv.iter_type == tvm.tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def loop_kind(sch, block, loop) -> str:
    """'R' if the loop drives one of the block's reduction iterators, 'S' if only spatial ones,
    '-' if it does not drive the block at all (a unit loop)."""
    var = sch.get(loop).loop_var
    realize = block_realize(sch, block)
    kinds = set()
    for iv, value in zip(realize.block.iter_vars, realize.iter_values):
        if uses_var(value, var):
            kinds.add("R" if iv.iter_type == tvm.tirx.IterVar.CommReduce else "S")
    if not kinds:
        return "-" if loop_extent(sch, loop) == 1 else "S"
    return "R" if "R" in kinds else "S"


def runs_repeatedly(sch, block) -> bool:
    """Is the block inside a loop (extent > 1) that drives none of its iterators, so that each of
    its instances runs once per iteration of that loop? reverse_compute_at leaves an epilogue so
    when it reads its producer at fixed indices along a loop it is moved under (a 1x1 weight
    gradient's `dw[o, c, 0, 0]` out of the 2x2 a stride-2 gradient of an even-sized input computes).
    Harmless while every output has its own buffer, wrong when an output is written over an input."""
    used = [v for value in block_realize(sch, block).iter_values for v in collect_vars_used_in_prim_expr(value)]
    return any(loop_extent(sch, loop) != 1 and not any(sch.get(loop).loop_var.same_as(v) for v in used)
               for loop in sch.get_loops(block))


def block_realize(sch, block):
    """The SBlockRealize of `block`: its iterators' values in terms of the loops around it."""
    target = sch.get(block)
    found = []
    tvm_ffi.structural_walk(sch.mod["main"].body,
                            (s_tir.SBlockRealize, lambda r: found.append(r) if r.block.same_as(target) else None))
    return found[0]


def uses_var(expr, var) -> bool:
    return any(v.same_as(var) for v in collect_vars_used_in_prim_expr(expr))
