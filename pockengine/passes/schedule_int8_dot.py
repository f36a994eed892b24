"""schedule_int8_dot: the int8 dot products of W8A8 layers (ir.INT8_DOT blocks, frontend/w8_ops.py)
as the CPU's dot-product instructions (AVX-512 VNNI's vpdpbusd, aarch64's sdot), in register tiles
on every core.

The block computes sums[r, no, ni] = sum over (ko, ki) of the tokens' bytes tokens[r, 4 ko + ki]
times the weight's weight[no, ko, ni, ki]: its (ni, ki) loops are exactly one instruction (16 int32
sums, each adding four byte products; sdot: 4 sums). The schedule:
  * splits the rows and the vectors into the register tile the legalization chose (rows x vectors
    of sums, which it padded the matmul to), the reduction over ko outside the tile: each step of
    ko loads the tile's weight vectors once and broadcasts each row's four bytes once;
  * orders the tiles column block first, so a block's weights (vectors x lanes rows of the weight,
    the whole depth) stay in cache while every row tile passes over them, and runs them on all cores;
  * tensorizes (ni, ki) with the instruction (register_intrinsic: our own, for vpdpbusd and sdot);
  * computes the epilogue (the offset's correction and the scales), when fusion put it in the
    kernel, inside the same column block while its sums are in cache.
The kernel is then marked scheduled: the generic CPU schedules leave it alone. A kernel TVM refuses
to schedule so is left to them (its loops are still the same integers).
"""

from __future__ import annotations

import tvm
from tvm import s_tir
from tvm.script import tirx as T

from ..frontend import w8_ops
from ..ir import INT8_DOT, kernel_schedule, map_kernels


def register_intrinsic(form: w8_ops.Int8Dot) -> str:
    """Register `form`'s instruction as a TensorIntrin (once; its name is form.intrinsic): `lanes` int32
    sums, each adding the four products of the token's bytes (broadcast) and one weight row's four.
    Ours for both instructions: TVM's VNNI intrinsic passes the bytes as 16 x int32, which this LLVM's
    signature refuses, and importing tvm.s_tir.tensor_intrin for its sdot one parses every intrinsic
    TVM has (CUDA's included): 2.5 minutes of every process that imported this module."""
    if s_tir.TensorIntrin.get(form.intrinsic, allow_missing=True) is not None:
        return form.intrinsic
    lanes, depth, tokens = form.lanes, w8_ops.DOT_DEPTH, form.token_dtype
    byte_vector, sum_vector = f"int8x{lanes * depth}", f"int32x{lanes}"
    instruction = form.llvm_intrinsic

    @T.prim_func(s_tir=True)
    def description(a: T.Buffer((depth,), tokens, offset_factor=1),
                    b: T.Buffer((lanes, depth), "int8", offset_factor=1),
                    c: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:depth], b[0:lanes, 0:depth])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, depth):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def implementation(a: T.Buffer((depth,), tokens, offset_factor=1),
                       b: T.Buffer((lanes, depth), "int8", offset_factor=1),
                       c: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:depth], b[0:lanes, 0:depth])
            T.writes(c[0:lanes])
            four_bytes = T.reinterpret(a.vload([0], f"{tokens}x{depth}"), dtype="int32")
            c[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(instruction), c.vload([0], dtype=sum_vector),
                T.reinterpret(T.broadcast(four_bytes, lanes), dtype=byte_vector), b.vload([0, 0], dtype=byte_vector),
                dtype=sum_vector)

    s_tir.TensorIntrin.register(form.intrinsic, description, implementation)
    return form.intrinsic


def schedule_int8_dot(cores: int) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="ScheduleInt8Dot")
    def transform(mod, _ctx):
        form = w8_ops.int8_dot()  # the current target's (w8_ops makes INT8_DOT blocks only for it)
        if form is None:
            return mod
        intrinsic = register_intrinsic(form)
        return map_kernels(mod, lambda func: schedule_kernel(func, cores, intrinsic))

    return transform


def schedule_kernel(func, cores: int, intrinsic: str):
    sch = kernel_schedule(func)
    try:
        dots = [block for block in sch.get_child_blocks(sch.get_sblock("root"))
                if INT8_DOT in sch.get(block).annotations]
    except s_tir.schedule.ScheduleError:  # not a block-structured kernel
        return None
    if len(dots) != 1:
        return None
    dot = dots[0]
    rows, vectors = (int(v) for v in sch.get(dot).annotations[INT8_DOT])
    try:
        consumers = sch.get_consumers(dot)  # the epilogue, when fused (tensorizing replaces the block)
        row, column, lane, depth, quad = sch.get_loops(dot)
        row_tiles, tile_row = sch.split(row, [None, rows])
        column_blocks, tile_vector = sch.split(column, [None, vectors])
        sch.reorder(column_blocks, row_tiles, depth, tile_row, tile_vector, lane, quad)
        # In parallel before tensorizing (TVM refuses it over the tensorized block).
        shared = _extent(sch, column_blocks) < cores  # too few column blocks: the row tiles share them
        outer = sch.fuse(column_blocks, row_tiles) if shared else column_blocks
        sch.parallel(outer)
        init = sch.decompose_reduction(dot, depth)
        sch.tensorize(lane, intrinsic)
        sch.unroll(tile_row)
        sch.unroll(tile_vector)
        sch.vectorize(sch.get_loops(init)[-1])
        for consumer in consumers:
            if shared:  # the epilogue runs after, on its own
                sch.parallel(sch.get_loops(consumer)[0])
            else:  # inside each column block, while its sums are in cache
                sch.reverse_compute_at(consumer, outer)
            _vectorize_innermost(sch, consumer)
    except s_tir.schedule.ScheduleError:
        return None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _vectorize_innermost(sch, block) -> None:
    loops = sch.get_loops(block)
    if loops:
        try:
            sch.vectorize(loops[-1])
        except s_tir.schedule.ScheduleError:
            pass  # a loop TVM will not vectorize (a tail): it runs as a loop


def _extent(sch, loop) -> int:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tvm.tirx.IntImm) else 0
