"""schedule_cpu: untuned kernels get parallel outer loops and vectorized inner loops, and compute
exactly what the unscheduled kernels compute (each kernel run on random inputs both ways)."""

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from torch import nn

import pockengine as pe
from conftest import FAST_HOST, fused_step_module
from pockengine.passes.inline_elementwise import inline_elementwise
from pockengine.passes.schedule_cpu import MIN_PARALLEL_ELEMENTS, schedule_cpu

LANES, CORES = 8, 2


def job():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                          nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16), nn.Flatten(),
                          nn.Linear(16 * 8 * 8, 32), nn.GELU(), nn.Linear(32, 4))
    return pe.TrainingJob(model, (torch.randn(4, 3, 16, 16),), torch.randint(0, 4, (4,)), "cross_entropy",
                          pe.optim.SGD(lr=0.1, momentum=0.9))


@pytest.fixture(scope="module")
def modules():
    fused = fused_step_module(job())
    unscheduled = inline_elementwise(LANES)(fused)
    return unscheduled, schedule_cpu(LANES, CORES)(unscheduled)


def loop_kinds(func) -> set:
    kinds = set()
    tvm_ffi.structural_walk(func.body, (tvm.tirx.For, lambda loop: kinds.add(loop.kind)))
    return kinds


def kernels(mod):
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def test_heavy_kernels_get_threads_and_vectors(modules):
    _, scheduled = modules
    heavy = {name: f for name, f in kernels(scheduled).items() if "conv2d" in name or "matmul" in name}
    assert len(heavy) >= 6  # forward, data and weight gradients of the convolutions and linears
    for name, func in heavy.items():
        assert tvm.tirx.ForKind.PARALLEL in loop_kinds(func), name
    # Those whose output rows fill whole vectors (a 3x3 weight gradient has 3 columns: nothing to
    # vectorize) compute LANES outputs at a time.
    wide = [n for n, f in heavy.items() if int(f.params[-1].shape[-1]) % LANES == 0]
    assert len(wide) >= 6
    for name in wide:
        assert tvm.tirx.ForKind.VECTORIZED in loop_kinds(heavy[name]), name
    # Every kernel with enough outputs to share across the cores runs on all of them (waking the
    # thread pool for a handful of outputs costs more than it saves: those stay on one core).
    big = {n: f for n, f in kernels(scheduled).items()
           if int(np.prod([int(d) for d in f.params[-1].shape])) >= MIN_PARALLEL_ELEMENTS}
    assert len(big) >= 10
    for name, func in big.items():
        assert tvm.tirx.ForKind.PARALLEL in loop_kinds(func), name


class SpaceToDepth(nn.Module):
    """Strided slices with an offset (YOLO's Focus stem): their gradient spreads values apart."""

    def forward(self, x):
        return torch.cat([x[:, :, ::2, ::2], x[:, :, 1::2, ::2], x[:, :, ::2, 1::2], x[:, :, 1::2, 1::2]], 1)


def equivalence_jobs():
    """Training steps whose kernels TVM miscompiled once scheduled (the max-pool gradient's argmax)
    or that index with divisions (strided slices)."""
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(3, 2, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    focus = nn.Sequential(SpaceToDepth(), nn.Conv2d(12, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    jobs = {"mobilenet-like": job()}
    for name, model in (("max-pool stem (argmax)", stem), ("strided slices (slice_scatter)", focus)):
        jobs[name] = pe.TrainingJob(model, (torch.randn(2, 3, 8, 8),), torch.randint(0, 4, (2,)), "cross_entropy",
                                    pe.optim.SGD(lr=0.1))
    return jobs


@pytest.mark.parametrize("name", list(equivalence_jobs()))
def test_scheduled_kernels_compute_what_fusion_wrote(name):
    """Every kernel after inline_elementwise + schedule_cpu against the same kernel as FuseTIR wrote
    it, on random inputs (integer inputs small: they are indices and masks)."""
    assert compare_with_fused(fused_step_module(equivalence_jobs()[name])) >= 3


def compare_with_fused(fused, registers: int = 16) -> int:
    """Run each kernel of `fused` as FuseTIR wrote it and as scheduled; they must agree. -> kernels compared."""
    scheduled = schedule_cpu(LANES, CORES, registers)(inline_elementwise(LANES, registers)(fused))
    target, dev = tvm.target.Target(FAST_HOST), tvm.cpu()
    rng = np.random.default_rng(0)
    compared = 0
    for kernel, before in kernels(fused).items():
        after = kernels(scheduled)[kernel]
        if tvm_ffi.structural_equal(before, after):
            continue
        inputs = []
        for buf in before.params:
            shape, dtype = [int(d) for d in buf.shape], str(buf.dtype)
            data = rng.standard_normal(shape) if dtype.startswith("float") else rng.integers(0, 2, shape)
            inputs.append(np.asarray(data, dtype=dtype))
        results = []
        for func in (before, after):
            lib = tvm.compile(func.with_attr("global_symbol", "main"), target=target)
            args = [tvm.runtime.tensor(a.copy(), dev) for a in inputs]
            lib["main"](*args)
            results.append([a.numpy() for a in args])
        for a, b in zip(*results):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=kernel)
        compared += 1
    return compared


# in channels, out channels, kernel, stride, padding, input size, AVX2/AVX-512 register rows
CONVOLUTIONS = [
    (3, 16, 3, 2, 1, 16, (8, 16)),   # a stem: two tiles of 8 rows (AVX2), one of 16 (AVX-512)
    (16, 12, 3, 1, 1, 8, (4, 12)),   # three tiles of 4; all 12 rows when 16 fit
    (8, 6, 5, 2, 2, 16, (6, 6)),     # all 6 rows; 5x5, stride 2
    (4, 5, 7, 1, 3, 8, (5, 5)),      # all 5 rows, no tile of 2^k divides them
    (4, 9, 3, 1, 1, 8, (None, 9)),   # 9 rows: more than 8 fit, no tile divides them (AVX2)
    (8, 16, 1, 2, 0, 16, "matmul"),  # 1x1: one reduction loop, a matmul's register tiles
]


@pytest.mark.parametrize("registers", [16, 32])
@pytest.mark.parametrize("cin, cout, k, stride, pad, size, rows", CONVOLUTIONS)
def test_convolutions_get_register_rows_and_stay_exact(cin, cout, k, stride, pad, size, rows, registers):
    """A convolution (forward, data gradient, weight gradient) computes a tile of output channels
    per input vector, their sums in registers: a plain 4-conv CNN's step went from 17.3 to 3.3 ms
    (PyTorch eager 4.8 ms). Tiles of every size, and rows no tile divides, stay exact."""
    torch.manual_seed(0)
    out = (size + 2 * pad - k) // stride + 1
    model = nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad), nn.ReLU(), nn.Conv2d(cout, 8, 3, 1, 1),
                          nn.Flatten(), nn.Linear(8 * out * out, 4))
    job = pe.TrainingJob(model, (torch.randn(2, cin, size, size),), torch.randint(0, 4, (2,)), "cross_entropy",
                         pe.optim.SGD(lr=0.1, momentum=0.9))
    fused = fused_step_module(job)
    assert compare_with_fused(fused, registers) >= 6
    scheduled = schedule_cpu(LANES, CORES, registers)(inline_elementwise(LANES, registers)(fused))
    forward = [f for name, f in kernels(scheduled).items()
               if "conv2d" in name and "transpose" not in name and int(f.params[1].shape[0]) == cout]
    assert forward
    unrolled = {e for f in forward for e in loop_extents(f, tvm.tirx.ForKind.UNROLLED)}
    if rows != "matmul" and rows[registers == 32] is None:
        assert not unrolled - {1}
    elif rows != "matmul":
        assert rows[registers == 32] in unrolled


def scheduled_weight_gradient(conv: nn.Conv2d, size: int, compared: int):
    """The one kernel computing `conv`'s weight gradient in a small net's step, scheduled, after
    every kernel of the step was found exact against its fused form (at least `compared` of them)."""
    torch.manual_seed(0)
    out = (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(conv.out_channels * out * out, 4))
    job = pe.TrainingJob(model, (torch.randn(2, conv.in_channels, size, size),), torch.randint(0, 4, (2,)),
                         "cross_entropy", pe.optim.SGD(lr=0.1, momentum=0.9))
    fused = fused_step_module(job)
    assert compare_with_fused(fused) >= compared
    scheduled = schedule_cpu(LANES, CORES)(inline_elementwise(LANES)(fused))
    found = [f for name, f in kernels(scheduled).items()
             if "conv2d" in name and [int(d) for d in f.params[-1].shape] == list(conv.weight.shape)]
    assert len(found) == 1
    return found[0]


def test_a_stem_weight_gradient_reads_y_grad_channels_last():
    """A 3-channel 7x7 stem's weight gradient vectorizes its output channels, which y_grad holds
    one plane apart: y_grad is copied channels-last, and the kernel's 7 columns are the rows of
    the register tile (ResNet-18's stem weight gradient, 128x128 b1: 8.6 GFLOP/s before)."""
    weight_gradient = scheduled_weight_gradient(nn.Conv2d(3, 16, 7, 2, 3), 16, compared=4)
    assert 7 in loop_extents(weight_gradient, tvm.tirx.ForKind.UNROLLED)
    # on every core, though the tile's outer loop over the kernel's 7 columns is a unit loop
    # (ResNet-18's stem weight gradient, 128x128 b8, ran on one: 21 -> 10 ms)
    assert loop_extents(weight_gradient, tvm.tirx.ForKind.PARALLEL)


def test_a_strided_weight_gradient_tiles_output_channels():
    """A stride-2 weight gradient with more output channels than input ones (ResNet's downsampling
    3x3, 64 -> 128) vectorizes its input channels with tiles of 8 output channels, not its output
    channels over the kernel's 3 columns (3 sums per vector loaded): 8.8 -> 6.1 ms at 128x128 b8."""
    weight_gradient = scheduled_weight_gradient(nn.Conv2d(16, 32, 3, 2, 1), 16, compared=3)
    assert 8 in loop_extents(weight_gradient, tvm.tirx.ForKind.UNROLLED)


def loop_extents(func, kind=None) -> list[int]:
    found = []
    tvm_ffi.structural_walk(func.body, (tvm.tirx.For, lambda loop: found.append(int(loop.extent))
                                        if kind is None or loop.kind == kind else None))
    return found


@pytest.mark.parametrize("shape, axes", [((1024, 512), (1, 0)), ((2, 4, 32, 48), (0, 1, 3, 2)),
                                         ((64, 3, 32), (2, 1, 0))])
def test_transposes_are_tiled_and_exact(shape, axes):
    """A transpose reads along one axis and writes along another: both are tiled, so every cache
    line read is used whole (measured 10x on 1024x512)."""
    from tvm import te, topi

    from pockengine.passes.schedule_cpu import TRANSPOSE_TILE, schedule_kernel

    x = te.placeholder(shape, "float32", "x")
    func = te.create_prim_func([x, topi.transpose(x, axes)])
    scheduled = schedule_kernel(func, LANES, CORES)
    extents = loop_extents(scheduled)
    assert extents.count(TRANSPOSE_TILE) == 1 and LANES in loop_extents(scheduled, tvm.tirx.ForKind.VECTORIZED)
    assert loop_extents(scheduled, tvm.tirx.ForKind.PARALLEL)
    data = np.random.default_rng(0).standard_normal(shape).astype("float32")
    lib = tvm.compile(scheduled.with_attr("global_symbol", "main"), target=tvm.target.Target(FAST_HOST))
    out = tvm.runtime.tensor(np.zeros(np.transpose(data, axes).shape, "float32"))
    lib["main"](tvm.runtime.tensor(data), out)
    np.testing.assert_array_equal(out.numpy(), np.transpose(data, axes))


def test_broadcast_operands_do_not_make_a_transpose():
    """out[i, j] = x[i, j] + b[i]: b is read along i, but it is small; the kernel stays one flat
    vectorized loop."""
    from tvm import te

    from pockengine.passes.schedule_cpu import TRANSPOSE_TILE, schedule_kernel

    x, b = te.placeholder((64, 256), "float32", "x"), te.placeholder((64,), "float32", "b")
    func = te.create_prim_func([x, b, te.compute((64, 256), lambda i, j: x[i, j] + b[i])])
    assert TRANSPOSE_TILE not in loop_extents(schedule_kernel(func, LANES, CORES))


@pytest.mark.parametrize("batch, rows, columns, registers, tile", [
    (None, 64, 2 * LANES * 3, 16, (4, 3)), (3, 64, 2 * LANES * 3, 16, (4, 3)), (None, 64, 2 * LANES * 3, 32, (8, 2)),
    (None, 48, 2 * LANES * 2, 16, (6, 2)), (None, 64, 2 * LANES * 2, 16, (4, 2)),
    (None, 64, LANES * 5, 16, (8, 1)), (None, 64, LANES // 2, 16, (8, 1))])
def test_matmuls_get_register_tiles_and_stay_exact(batch, rows, columns, registers, tile):
    """Rows x vectors of outputs per reduction step, so each loaded value feeds several
    multiply-adds: the transformer's untuned step went from 404 to 218 ms. An odd number of output
    vectors (LLaMA's MLP width 688 = 43 x 16) takes 8 rows x 1 vector, still 8 accumulators; a row
    narrower than a vector (LoRA's rank) is one short vector, not a vector gathered across rows. The
    accumulators, the operand's vectors and the broadcast value fit the vector registers: 12 + 3 + 1
    with SSE/AVX2's 16 (4 x 3, else 6 x 2, else 4 x 2), 16 + 2 + 1 with AVX-512's 32."""
    from tvm import te

    from pockengine.passes.schedule_cpu import REGISTER_TILES

    assert tile in REGISTER_TILES
    lead = () if batch is None else (batch,)
    a = te.placeholder(lead + (rows, 48), "float32", "a")
    b = te.placeholder(lead + (48, columns), "float32", "b")
    k = te.reduce_axis((0, 48), "k")
    c = te.compute(lead + (rows, columns), lambda *i: te.sum(a[i[:-1] + (k,)] * b[i[:-2] + (k, i[-1])], axis=k),
                   name="c")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b, c])})
    scheduled = schedule_cpu(LANES, CORES, registers)(inline_elementwise(LANES)(mod))["main"]
    assert {e for e in loop_extents(scheduled, tvm.tirx.ForKind.UNROLLED) if e > 1} == {e for e in tile if e > 1}
    assert loop_extents(scheduled, tvm.tirx.ForKind.PARALLEL)
    assert min(columns, LANES) in loop_extents(scheduled, tvm.tirx.ForKind.VECTORIZED)
    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal(lead + s).astype("float32") for s in ((rows, 48), (48, columns)))
    lib = tvm.compile(scheduled.with_attr("global_symbol", "main"), target=tvm.target.Target(FAST_HOST))
    out = tvm.runtime.tensor(np.zeros(lead + (rows, columns), "float32"))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y), out)
    np.testing.assert_allclose(out.numpy(), x @ y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch, rows, depth, columns, transposed, blocks", [
    # the columns halved for 2 cores; a reduction split 576 = 3 x 192, 2 column blocks of 24 vectors
    (None, 64, 48, 96, False, (48, 64, 6)), (None, 64, 576, 384, False, (192, 64, 24)),
    # rows in 2 blocks (384 x 192 floats > BLOCK_BYTES); a reduction with no divisor in [64, 256] kept whole
    (None, 384, 576, 48, False, (192, 192, 6)), (None, 32, 514, 48, False, (514, 32, 3)),
    # a batch (attention's heads); an operand stored [columns, depth] (x @ W.T), 9 vectors: 3 blocks
    # would leave a core idle, so one
    (3, 32, 320, 48, False, (160, 32, 3)), (None, 64, 320, 72, True, (160, 64, 9))])
def test_matmul_cache_blocks_pack_the_column_operand_and_stay_exact(batch, rows, depth, columns, transposed, blocks):
    """Blocks around the register tiles (BLIS structure): the reduction in blocks of at most
    PANEL_DEPTH, the rows and columns in blocks whose operands fit BLOCK_BYTES, each dividing its
    dimension, so no block has a remainder; the column operand copied per reduction block into
    panels one tile wide. The LM head of SmolLM (256x576 @ 576x49152) went from 16 to 137 GFLOP/s
    on 2 cores. Exact (float32 rounding) against NumPy on each of these layouts."""
    from tvm import te

    from pockengine.passes.inline_elementwise import _allocations
    from pockengine.passes.schedule_cpu import _cache_blocks, register_tiles

    lead = () if batch is None else (batch,)
    a = te.placeholder(lead + (rows, depth), "float32", "a")
    b = te.placeholder(lead + ((columns, depth) if transposed else (depth, columns)), "float32", "b")
    k = te.reduce_axis((0, depth), "k")

    def product(*i):
        column = b[i[:-2] + (i[-1], k)] if transposed else b[i[:-2] + (k, i[-1])]
        return te.sum(a[i[:-1] + (k,)] * column, axis=k)

    c = te.compute(lead + (rows, columns), product, name="c")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b, c])})
    tile = (4, 3) if columns % (3 * LANES) == 0 else (4, 2) if columns % (2 * LANES) == 0 else (8, 1)
    assert _cache_blocks((rows, columns // LANES, depth, LANES), tile, CORES, batch or 1) == blocks
    scheduled = schedule_cpu(LANES, CORES, 16)(inline_elementwise(LANES)(mod))["main"]
    assert tile == next(t for t in register_tiles(16) if rows % t[0] == 0 and columns // LANES % t[1] == 0)
    panels = [buf for buf in _allocations(scheduled.body) if buf.name.startswith("b")]
    width = tile[1] * LANES
    assert [tuple(int(d) for d in buf.shape)[-2:] for buf in panels] == [(depth, width)], "one packed panel"
    # the copy into panels stores whole panel rows as vectors, from either layout (a transposed
    # operand copied value by value cost 15% of the 128x896 @ (4864x896)^T matmul)
    assert width in loop_extents(scheduled, tvm.tirx.ForKind.VECTORIZED)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(lead + (rows, depth)).astype("float32")
    y = rng.standard_normal(lead + ((columns, depth) if transposed else (depth, columns))).astype("float32")
    lib = tvm.compile(scheduled.with_attr("global_symbol", "main"), target=tvm.target.Target(FAST_HOST))
    out = tvm.runtime.tensor(np.zeros(lead + (rows, columns), "float32"))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y), out)
    expected = x.astype("float64") @ np.swapaxes(y, -1, -2).astype("float64") if transposed else x.astype("float64") @ y
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4 * np.sqrt(depth))


@pytest.mark.parametrize("rows, columns, epilogue", [
    (64, 2 * LANES * 3, "bias"), (32, 2 * LANES * 2, "bias+relu"), (7, 3 * LANES, "bias")])
def test_a_matmul_with_an_epilogue_keeps_its_register_tiles_and_stays_exact(rows, columns, epilogue):
    """A linear layer's bias (and activation) is applied in a pass of its own after the tiled matmul
    (Qwen2's q/k/v projections: 20 -> 130 GFLOP/s); where no tile divides the rows (7) the epilogue
    is finished per vector inside the reduction as before."""
    from tvm import s_tir, te, tirx

    from pockengine.passes.schedule_cpu import _nests

    a, b = te.placeholder((rows, 48), "float32", "a"), te.placeholder((48, columns), "float32", "b")
    bias = te.placeholder((columns,), "float32", "bias")
    k = te.reduce_axis((0, 48), "k")
    c = te.compute((rows, columns), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
    d = te.compute((rows, columns), lambda i, j: c[i, j] + bias[j], name="d")
    if epilogue == "bias+relu":
        d = te.compute((rows, columns), lambda i, j: tirx.max(d[i, j], tirx.const(0, "float32")), name="e")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b, bias, d])})
    scheduled = schedule_cpu(LANES, CORES, 16)(inline_elementwise(LANES)(mod))["main"]
    tiled = rows % 4 == 0
    assert bool({e for e in loop_extents(scheduled, tvm.tirx.ForKind.UNROLLED) if e > 1}) == tiled
    sch = s_tir.Schedule(scheduled)
    assert (len(_nests(sch, sch.get_sblock("root"))) > 1) == tiled  # the epilogue after the matmul, or inside it
    rng = np.random.default_rng(0)
    x, y, z = (rng.standard_normal(s).astype("float32") for s in ((rows, 48), (48, columns), (columns,)))
    lib = tvm.compile(scheduled.with_attr("global_symbol", "main"), target=tvm.target.Target(FAST_HOST))
    out = tvm.runtime.tensor(np.zeros((rows, columns), "float32"))
    lib["main"](*(tvm.runtime.tensor(v) for v in (x, y, z)), out)
    expected = x @ y + z
    np.testing.assert_allclose(out.numpy(), np.maximum(expected, 0) if epilogue == "bias+relu" else expected,
                               rtol=1e-5, atol=1e-5)


def test_a_matmul_initialises_its_tiles_in_one_loop():
    """The zeroing of the output tiles is one serial loop over tile columns and rows: as two loops,
    LLVM -O3 fully unrolled the 32 row tiles of a 128-row matmul and took 4 s to emit that one
    kernel (Qwen2-0.5B's build spent 25 s there)."""
    from tvm import s_tir, te

    a, b = te.placeholder((128, 1536), "float32", "a"), te.placeholder((1536, 896), "float32", "b")
    k = te.reduce_axis((0, 1536), "k")
    c = te.compute((128, 896), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b, c])})
    scheduled = schedule_cpu(LANES, CORES, 16)(inline_elementwise(LANES)(mod))["main"]
    sch = s_tir.Schedule(scheduled)
    init, update = sch.get_sblock("c_init"), sch.get_sblock("c_update")
    shared = {str(sch.get(loop)) for loop in sch.get_loops(update)}
    own = [sch.get(loop) for loop in sch.get_loops(init) if str(sch.get(loop)) not in shared]
    serial = [loop for loop in own if loop.kind == tvm.tirx.ForKind.SERIAL]
    assert [int(loop.extent) for loop in serial] == [14 * 32]  # per column block: 14 column tiles x 32 row tiles


@pytest.mark.parametrize("case", ["log_softmax", "sum", "max", "rms_norm", "odd_row", "log_softmax_16_rows"])
def test_row_reductions_keep_vectors_of_partial_sums_and_stay_exact(case):
    """A reduction along the contiguous innermost axis (softmax's max and sum of exps, a norm's sum
    of squares, the loss's sums over the vocabulary) runs PARTIAL_SUM_VECTORS vectors of running
    sums per row, then adds the lanes: 255 x 49152 log-softmax 68 -> 18 ms, 256 x 576 RMSNorm 10.7
    -> 0.1 ms. A row that is no multiple of a vector (odd_row) stays a scalar loop. Rows that are a
    multiple of a vector (16) are not made a vector across rows, which gathers every value (an
    attention's 9 x 256 x 256 softmax: 0.73 -> 0.55 ms)."""
    from tvm import te, topi

    from pockengine.passes.schedule_cpu import PARTIAL_SUM_VECTORS

    columns = 8 * LANES * PARTIAL_SUM_VECTORS + (3 if case == "odd_row" else 0)
    rows = 2 * LANES if case.endswith("_16_rows") else 6
    case = case.removesuffix("_16_rows")
    x = te.placeholder((rows, columns), "float32", "x")
    g = te.placeholder((columns,), "float32", "g")
    k = te.reduce_axis((0, columns), "k")
    if case == "log_softmax":
        args, reference = [x, topi.nn.log_softmax(x)], lambda a: a - np.log(np.exp(a).sum(1, keepdims=True))
    elif case in ("sum", "odd_row"):
        args, reference = [x, topi.sum(x, axis=1, keepdims=True)], lambda a: a.sum(1, keepdims=True)
    elif case == "max":
        args, reference = [x, topi.max(x, axis=1)], lambda a: a.max(1)
    else:
        squares = te.compute((rows,), lambda i: te.sum(x[i, k] * x[i, k], axis=k), name="squares")
        out = te.compute((rows, columns), lambda i, j: x[i, j] * te.rsqrt(squares[i] / columns + 1e-6) * g[j],
                         name="out")
        args, reference = [x, g, out], lambda a: a / np.sqrt((a * a).mean(1, keepdims=True) + 1e-6) * np.arange(columns)
    mod = tvm.IRModule({"main": te.create_prim_func(args)})
    scheduled = schedule_cpu(LANES, CORES)(inline_elementwise(LANES)(mod))["main"]
    widths = loop_extents(scheduled, tvm.tirx.ForKind.VECTORIZED)
    assert (LANES * PARTIAL_SUM_VECTORS in widths) == (case != "odd_row")
    data = np.random.default_rng(0).standard_normal((rows, columns)).astype("float32")
    lib = tvm.compile(scheduled.with_attr("global_symbol", "main"), target=tvm.target.Target(FAST_HOST))
    inputs = [tvm.runtime.tensor(data)] + ([tvm.runtime.tensor(np.arange(columns, dtype="float32"))]
                                           if case == "rms_norm" else [])
    expected = reference(data.astype("float64"))
    out = tvm.runtime.tensor(np.zeros(expected.shape, "float32"))
    lib["main"](*inputs, out)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("shape, vector", [((16, 8, 3, 3), 72), ((4, 3, 7, 7), 49), ((12, 3, 3), 9)])
def test_elementwise_rows_shorter_than_a_vector_stay_whole(shape, vector):
    """An update of 3x3 kernels' weights: lanes straddling its rows had indices TVM does not
    simplify (ResNet's 512x512x3x3 SGD step: 4.5 ms, now under 1). Vectors are whole rows: 72 =
    8 rows of 9 and 9 vectors of 8; 49 (7x7) alone; 9 when 72 does not divide the nest."""
    from tvm import te

    from pockengine.passes.schedule_cpu import schedule_kernel

    w, m = te.placeholder(shape, "float32", "w"), te.placeholder(shape, "float32", "m")
    out = te.compute(shape, lambda *i: w[i] - 0.1 * m[i], name="out")
    scheduled = schedule_kernel(te.create_prim_func([w, m, out]), LANES, CORES)
    assert loop_extents(scheduled, tvm.tirx.ForKind.VECTORIZED) == [vector]
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(shape).astype("float32") for _ in range(2))
    lib = tvm.compile(scheduled.with_attr("global_symbol", "main"), target=tvm.target.Target(FAST_HOST))
    result = tvm.runtime.tensor(np.zeros(shape, "float32"))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), result)
    np.testing.assert_allclose(result.numpy(), a - np.float32(0.1) * b, rtol=1e-6)


@pytest.mark.parametrize("shape", [(6, 5 * LANES), (3, 4, 2 * LANES), (5, LANES)])
def test_elementwise_vectors_run_along_rows_and_stay_exact(shape):
    """A nest whose rows are whole vectors is vectorized along its innermost loop, not as one flat
    loop split in vectors: the row of each lane must not depend on the lane, or LLVM computes it lane
    by lane as 64-bit divisions (the gradient of Qwen2's 128 x 151936 log-softmax: 70 -> 8.8 ms).
    Here the kernel reads a per-row value, as that gradient reads each row's log-sum-exp."""
    from tvm import te

    from pockengine.passes.schedule_cpu import schedule_kernel, uses_var

    x, rows = te.placeholder(shape, "float32", "x"), te.placeholder(shape[:-1], "float32", "rows")
    out = te.compute(shape, lambda *i: te.exp(x[i] - rows[i[:-1]]), name="out")
    scheduled = schedule_kernel(te.create_prim_func([x, rows, out]), LANES, CORES)
    assert loop_extents(scheduled, tvm.tirx.ForKind.VECTORIZED) == [LANES]
    vector = []
    tvm_ffi.structural_walk(scheduled.body, (tvm.tirx.For, lambda loop: vector.append(loop.loop_var)
                                             if loop.kind == tvm.tirx.ForKind.VECTORIZED else None))
    realizes = []
    tvm_ffi.structural_walk(scheduled.body, (tvm.s_tir.SBlockRealize, realizes.append))
    *row_indices, column = realizes[0].iter_values
    assert uses_var(column, vector[0]) and not any(uses_var(i, vector[0]) for i in row_indices)
    rng = np.random.default_rng(0)
    a, r = rng.standard_normal(shape).astype("float32"), rng.standard_normal(shape[:-1]).astype("float32")
    lib = tvm.compile(scheduled.with_attr("global_symbol", "main"), target=tvm.target.Target(FAST_HOST))
    result = tvm.runtime.tensor(np.zeros(shape, "float32"))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(r), result)
    np.testing.assert_allclose(result.numpy(), np.exp(a - r[..., None]), rtol=1e-6)


def test_a_kernel_over_an_empty_tensor_is_left_alone():
    """A zero-width slice (Phi-3's pass-through of a fully rotated head) has loops of extent 0:
    fusing them divided by zero."""
    from tvm import te

    from pockengine.passes.schedule_cpu import schedule_kernel

    x = te.placeholder((4, 0), "float32", "x")
    y = te.compute((4, 0), lambda i, j: x[i, j] * 2, name="y")
    assert schedule_kernel(te.create_prim_func([x, y]), LANES, CORES) is None
