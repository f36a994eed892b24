"""plan_arena: one storage, no two live tensors overlap, and never more than TVM's own plan."""

import random

import torch
from tvm import relax

import pockengine as pe
from conftest import FAST_HOST, mobilenetv2
from pockengine import pipeline, targets
from pockengine.analysis.memory_plan import planned_storage
from pockengine.autodiff.step import STEP_FUNC
from pockengine.passes.plan_arena import ALIGNMENT, PLACEMENT_ORDERS, assign_offsets, first_fit, lifetimes, plan_arena
from pockengine.sparse import SparseUpdate
from pockengine.targets.host import CPU_LOWERING


def test_offsets_never_overlap_in_space_while_overlapping_in_time():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(1, 60)
        intervals, size = {}, {}
        for t in range(n):
            start = rng.randint(0, 100)
            intervals[t] = (start, start + rng.randint(0, 30))
            size[t] = rng.choice([1, 7, 64, 100, 4096, 10000])
        offsets, total = assign_offsets(intervals, size)
        for a in range(n):
            assert offsets[a] % ALIGNMENT == 0 and offsets[a] + size[a] <= total
            for b in range(a + 1, n):
                if intervals[a][0] <= intervals[b][1] and intervals[b][0] <= intervals[a][1]:
                    assert offsets[a] + size[a] <= offsets[b] or offsets[b] + size[b] <= offsets[a]
        live_peak = max(sum(size[t] for t in range(n) if intervals[t][0] <= i <= intervals[t][1])
                        for i in range(131))
        assert live_peak <= total


def test_the_smaller_of_largest_first_and_longest_lived_first():
    """Largest first puts the 8-unit tensor at the bottom and the long-lived one above it, which
    leaves no room for the last: 21 units. Longest-lived first reaches what is alive at once (15)."""
    unit = ALIGNMENT
    intervals = {"long": (2, 5), "first": (0, 1), "large": (3, 3), "middle": (1, 2)}
    size = {"long": 7 * unit, "first": 7 * unit, "large": 8 * unit, "middle": 7 * unit}
    assert first_fit(PLACEMENT_ORDERS[0](intervals, size), intervals, size)[1] == 21 * unit
    offsets, total = assign_offsets(intervals, size)
    assert total == 15 * unit and offsets["long"] == 0


def lowered(planners, model, x, scheme) -> list:
    """The step lowered up to memory planning once, then planned by each of `planners`."""
    job = pe.TrainingJob(model, (x,), torch.randint(0, 10, (x.shape[0],)), "cross_entropy",
                         pe.optim.SGD(lr=0.1, momentum=0.9), sparse_update=scheme)
    imported = job.import_model()
    step_mod, signature, _ = pipeline.derive_step(imported, job.optimizer, job.plan(imported))
    preset = targets.resolve(FAST_HOST)
    unplanned = pipeline.lower(step_mod, signature, preset, CPU_LOWERING, plan_memory=False).mod
    with preset.target():
        return [planner(unplanned)[STEP_FUNC] for planner in planners]


def test_one_arena_smaller_than_tvms_plan_on_mobilenet():
    x = torch.randn(2, 3, 32, 32)
    for scheme in (SparseUpdate.full(), SparseUpdate.bias_only()):
        ours, tvms = lowered([plan_arena(STEP_FUNC), relax.transform.StaticPlanBlockMemory()],
                             mobilenetv2(width_mult=0.35, num_classes=10), x, scheme)
        pool, storages, _ = planned_storage(ours)
        tvm_pool, tvm_storages, _ = planned_storage(tvms)
        assert storages == 1 and tvm_storages > 10
        assert 0 < pool <= tvm_pool


def test_lifetimes_follow_views_and_returned_tensors():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 4), "float32"))
    with bb.function("f", [x]):
        a = bb.emit(relax.op.builtin.alloc_tensor(relax.ShapeExpr([4, 4]), "float32", 0))
        view = bb.emit(relax.op.reshape(a, (16,)))
        b = bb.emit(relax.op.builtin.alloc_tensor(relax.ShapeExpr([16]), "float32", 0))
        c = bb.emit(relax.op.add(view, b))
        out = bb.emit(relax.op.builtin.alloc_tensor(relax.ShapeExpr([2]), "float32", 0))
        bb.emit_func_output(relax.Tuple([out, c]))
    func = bb.get()["f"]
    bindings = [b for block in func.body.blocks for b in block.bindings]
    intervals, size, escapes, _, _ = lifetimes(bindings, func.body.body)
    by_name = {v.name: v for v in size}
    assert intervals[by_name[a.name]] == (0, 3)  # alive until the add reads its reshape
    assert size[by_name[a.name]] == 64 and by_name[out.name] in escapes


def test_a_tuple_field_keeps_its_allocation_alive():
    """A multi-output kernel's results travel as a tuple; reading a field later is a use of that
    field's allocation (missing this once let the arena reuse a live gradient)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    with bb.function("f", [x]):
        a = bb.emit(relax.op.builtin.alloc_tensor(relax.ShapeExpr([4]), "float32", 0))
        b = bb.emit(relax.op.builtin.alloc_tensor(relax.ShapeExpr([4]), "float32", 0))
        pair = bb.emit(relax.Tuple([a, b]))
        bb.emit(relax.op.add(x, x))
        second = bb.emit(relax.TupleGetItem(pair, 1))
        out = bb.emit(relax.op.add(second, x))
        bb.emit_func_output(out)
    func = bb.get()["f"]
    bindings = [b for block in func.body.blocks for b in block.bindings]
    intervals, _, _, _, _ = lifetimes(bindings, func.body.body)
    by_name = {v.name: v for v in intervals}
    assert intervals[by_name[b.name]] == (1, 5)  # read through the tuple at 5
    assert intervals[by_name[a.name]][1] < 5  # the other field is not kept for it
