"""inline_elementwise: fused kernels stop allocating activation-sized intermediates (elementwise
chains inlined, epilogues finished per output point of their reduction), and what is left is
reported as kernel workspace."""

import torch
import tvm
from torch import nn

import pockengine as pe
from conftest import FAST_HOST, fused_step_module
from pockengine.passes.inline_elementwise import inline_elementwise, intermediate_bytes


def job():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), nn.Flatten(),
                          nn.Linear(8 * 64, 4))
    return pe.TrainingJob(model, (torch.randn(4, 3, 8, 8),), torch.randint(0, 4, (4,)), "cross_entropy",
                          pe.optim.SGD(lr=0.1))


def workspaces(mod):
    return {gv.name_hint: intermediate_bytes(f) for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def test_elementwise_chains_become_single_loop_nests():
    before = fused_step_module(job())
    after = inline_elementwise()(before)
    b, a = workspaces(before), workspaces(after)
    activation = 4 * 8 * 8 * 8 * 4  # one (4, 8, 8, 8) float32 tensor
    # BatchNorm's apply chain (subtract, multiply, multiply, add, clip) stored 4 such buffers.
    assert max(b.values()) >= 3 * activation
    # A convolution's or matmul's epilogue now runs per output point right after its sum, so no
    # kernel keeps more than a few scalars (a reduction's running value, BatchNorm's per-row sums).
    assert max(a.values()) <= 64
    epilogued = [name for name in b
                 if name.startswith("fused_") and ("conv2d" in name or "matmul" in name) and b[name] > 64]
    assert len(epilogued) >= 2  # a convolution and a matmul stored their whole result before the epilogue
    assert set(a) == set(b)


def test_report_counts_what_kernels_still_allocate():
    report = pe.compile(job(), target=FAST_HOST).memory_report()
    # The largest kernel's own buffers: a tile of running sums (here 3 rows of 8: 96 bytes), the
    # convolution's padded input window per tile of output channels (3 channels x 3 rows x 10
    # columns: 360 bytes, where the whole padded input is 4.8 KB), or, the largest, the weight
    # gradient's copy of y_grad channels-last (its vectors run across the output channels:
    # 4 x 8 x 8 x 8 float32, 8 KB) beside its tile of sums.
    assert 0 < report.by_category["kernel_workspace"] <= 4 * 8 * 8 * 8 * 4 + 96
    assert report.peak_bytes == sum(report.by_category.values())


def test_epilogues_run_only_on_complete_sums():
    """An epilogue placed inside a reduction loop would run on partial sums (and an in-place update
    would then read a value it had already overwritten)."""
    from tvm import s_tir

    from pockengine.passes.schedule_cpu import is_reduction, loop_kind

    after = inline_elementwise(8)(fused_step_module(job()))
    placed = 0
    for gv, func in after.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        sch = s_tir.Schedule(func)
        try:
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
        except s_tir.schedule.ScheduleError:  # a kernel written without blocks (not ours to place)
            continue
        for block in blocks:
            if is_reduction(sch, block):
                continue
            for producer in sch.get_producers(block):
                if is_reduction(sch, producer) and len(sch.get_loops(block)) > 1:
                    placed += 1
                    for loop in sch.get_loops(block):
                        assert loop_kind(sch, producer, loop) != "R", gv.name_hint
    assert placed >= 5
