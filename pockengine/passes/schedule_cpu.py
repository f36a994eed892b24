"""schedule_cpu: the default schedule of every kernel nobody tuned — outer loops on all cores,
innermost loops as SIMD vectors.

Legalized kernels are naive loop nests run by one thread, an order of magnitude behind PyTorch, and
dlight's CPU rules cover only GEMV and reductions. This pass gives each top-level loop nest of a
kernel:
  * `parallel` on its outer loops (the loops shared by every stage of the nest, spatial for all of
    them, fused into one so there is work for every core);
  * `vectorize` on each stage's innermost loop when it is spatial and short (the `vector_lanes`
    inner part inline_elementwise split off a reduction's output loop; an elementwise nest is fused
    and split by `vector_lanes` here, or by whole rows when they are shorter than a vector and not
    a multiple of it: see _schedule_short_rows). A reduction's initialisation is then split off
    (`decompose_reduction`) so its update loop is a plain vector of running sums;
  * transposes (an elementwise nest reading a full-size input along another axis than it writes)
    in TRANSPOSE_TILE x TRANSPOSE_TILE tiles, so each cache line read is used whole while it is
    hot: 1024x512 float32, 2 cores, 2.02 ms flat, 0.21 ms tiled (8: 0.41, 32: 0.61). The
    transformer's attention and weight-gradient transposes are such kernels;
  * matmuls without an epilogue in register tiles of rows x vectors (the transformer's
    untuned step: 404 -> 218 ms; its pure matmul kernels then run as fast as tuned ones).
  * a convolution's tile of output rows (laid out by inline_elementwise: the tile's rows inside
    the reduction loops, then its vector) unrolled, one register of running sums per row.
Nothing more (no cache blocking, no tiles for matmuls with a fused epilogue): that is what tuning
(MetaSchedule) is for.
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

from ..ir import kernel_schedule, map_kernels

MAX_VECTOR = 64  # longest innermost loop turned into one vector
# Waking the thread pool costs microseconds: an elementwise kernel smaller than this runs on one core.
MIN_PARALLEL_ELEMENTS = 4096
TRANSPOSE_TILE = 16
# A matmul's register tile: rows x vectors of outputs, the first of these that divides the matmul and
# whose accumulators fill at most half the target's vector registers (the rest hold the operands).
# AVX2 (16 registers): 4 x 2; AVX-512 and aarch64 (32): 8 x 2 (512x688x256: 252 -> 311 GFLOP/s here).
# 8 x 1 is for vectors that do not pair up: LLaMA's MLP width 688 is 43 vectors of 16 (AVX-512), and
# untiled its matmuls ran at 67 GFLOP/s against 240 for their 256-wide neighbours.
REGISTER_TILES = ((8, 2), (4, 2), (8, 1), (2, 2), (4, 1), (2, 1))


def register_tiles(vector_registers: int) -> tuple:
    return tuple((r, v) for r, v in REGISTER_TILES if r * v <= vector_registers // 2)


def schedule_cpu(vector_lanes: int, cores: int, vector_registers: int = 16) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="ScheduleCPU")
    def transform(mod, _ctx):
        return map_kernels(mod, lambda func: schedule_kernel(func, vector_lanes, cores, vector_registers))

    return transform


def schedule_kernel(func, vector_lanes: int, cores: int, vector_registers: int = 16):
    if _has_empty_loop(func):  # a tensor with no entries (a zero-width slice): nothing to schedule,
        return None            # and fusing its loops divides by their zero extent
    for tiles in (True, False):  # a tiling TVM refuses: schedule the kernel again without tiles
        try:
            sch = kernel_schedule(func)
            root = sch.get_sblock("root")
        except Exception:  # noqa: BLE001 - not a block-structured kernel
            return None
        try:
            for nest in _nests(sch, root):
                _schedule_nest(sch, nest, vector_lanes, cores, register_tiles(vector_registers) if tiles else None)
        except s_tir.schedule.ScheduleError:
            continue
        scheduled = sch.mod["main"]
        return scheduled.with_attrs(func.attrs) if func.attrs is not None else scheduled
    return None


def _has_empty_loop(func) -> bool:
    empty = []
    tvm_ffi.structural_walk(func.body, (tvm.tirx.For, lambda loop: empty.append(loop)
                                        if isinstance(loop.extent, tvm.tirx.IntImm) and int(loop.extent) == 0 else None))
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


def _schedule_nest(sch, blocks, vector_lanes: int, cores: int, tiles) -> None:
    """tiles: the matmul register tiles to try, best first; None for no tiling at all."""
    if len(blocks) == 1 and not is_reduction(sch, blocks[0]):
        _schedule_elementwise(sch, blocks[0], vector_lanes, cores, tiles is not None)
        return
    if tiles and len(blocks) == 1 and _schedule_register_tiles(sch, blocks[0], vector_lanes, cores, tiles):
        return
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


def _schedule_register_tiles(sch, block, vector_lanes: int, cores: int, tiles) -> bool:
    """A matmul-like reduction as inline_elementwise leaves it — loops (batch..., i, j, k, lanes):
    rows i, vectors j of `lanes` outputs, reduction k — computed a tile (the first of `tiles` that
    divides it) of output vectors at a time, k outside them: each loaded input value then feeds several multiply-adds and
    the tile's running sums stay in registers. False (nothing changed) for any other shape."""
    loops = sch.get_loops(block)
    kinds = [loop_kind(sch, block, loop) for loop in loops]
    if len(loops) < 4 or kinds[-4:] != ["S", "S", "R", "S"] or any(k != "S" for k in kinds[:-4]):
        return False
    rows, vectors, reduce, lanes = loops[-4:]
    extents = [loop_extent(sch, loop) for loop in (rows, vectors, reduce, lanes)]
    narrow = extents[3] < vector_lanes and vector_lanes % extents[3] == 0 if extents[3] else False
    if 0 in extents or not (extents[3] == vector_lanes or narrow):
        return False  # symbolic extents, or not a vector (or a whole short row) of outputs innermost
    tile = next(((r, v) for r, v in tiles if extents[0] % r == 0 and extents[1] % v == 0), None)
    if tile is None:
        return False  # no tile divides it
    outer_rows, tile_rows = sch.split(rows, [None, tile[0]])
    outer_vectors, tile_vectors = sch.split(vectors, [None, tile[1]])
    sch.reorder(outer_rows, outer_vectors, reduce, tile_rows, tile_vectors, lanes)
    sch.vectorize(lanes)
    sch.unroll(tile_rows)
    sch.unroll(tile_vectors)
    if cores > 1:
        sch.parallel(sch.fuse(*loops[:-4], outer_rows) if len(loops) > 4 else outer_rows)
    init = sch.decompose_reduction(block, reduce)
    _vectorize_innermost(sch, [init])
    return True


def _transposed_read_axis(sch, block, loops) -> int | None:
    """The loop (index) indexing the contiguous axis of a read as large as the output, when that is
    not the innermost loop (the one the write is contiguous along); None for other kernels."""
    if len(loops) < 2:
        return None
    realize = _realize(sch, block)
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
        if stmt.kind != tvm.tirx.ForKind.SERIAL or any(loop_kind(sch, b, loop) != "S" for b in blocks):
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
    realize = _realize(sch, block)
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
    used = [v for value in _realize(sch, block).iter_values for v in collect_vars_used_in_prim_expr(value)]
    return any(loop_extent(sch, loop) != 1 and not any(sch.get(loop).loop_var.same_as(v) for v in used)
               for loop in sch.get_loops(block))


def _realize(sch, block):
    target = sch.get(block)
    found = []
    tvm_ffi.structural_walk(sch.mod["main"].body,
                            (s_tir.SBlockRealize, lambda r: found.append(r) if r.block.same_as(target) else None))
    return found[0]


def uses_var(expr, var) -> bool:
    return any(v.same_as(var) for v in collect_vars_used_in_prim_expr(expr))
