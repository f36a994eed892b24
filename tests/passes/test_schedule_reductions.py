"""schedule_reductions: after fusion, every reduction of a big tensor runs right after its inputs."""

import torch
from tvm import relax

import pockengine as pe
from conftest import fused_step_module, mobilenetv2
from pockengine.autodiff.step import STEP_FUNC
from pockengine.passes.schedule_reductions import SHRINK, schedule_reductions, value_bytes
from pockengine.sparse import SparseUpdate


def fused_step():
    return fused_step_module(pe.TrainingJob(
        mobilenetv2(width_mult=0.35, num_classes=10), (torch.randn(2, 3, 32, 32),), torch.randint(0, 10, (2,)),
        "cross_entropy", pe.optim.SGD(lr=0.1, momentum=0.9), sparse_update=SparseUpdate.bias_only()))


def waits(mod):
    """For each binding whose output is at most 1/SHRINK of its largest input: how many other
    bindings (not such reductions themselves) run between its last input and it."""
    bindings = [b for block in mod[STEP_FUNC].body.blocks for b in block.bindings]
    position = {b.var: i for i, b in enumerate(bindings)}
    early, last_input = set(), {}
    for i, b in enumerate(bindings):
        inputs = [v for v in relax.analysis.free_vars(b.value) if v in position]
        largest = max((value_bytes(v.ty) for v in relax.analysis.free_vars(b.value)), default=0)
        if inputs and value_bytes(b.var.ty) * SHRINK <= largest:
            early.add(i)
            last_input[i] = max(position[v] for v in inputs)
    return [sum(1 for j in range(last_input[i] + 1, i) if j not in early) for i in sorted(early)]


def test_reductions_follow_their_inputs_after_fusion():
    fused = fused_step()
    before = waits(fused)
    after = waits(schedule_reductions(STEP_FUNC)(fused))
    assert max(before) >= 5, before  # fusion's re-sorting: some gradient reductions wait for many kernels
    assert len(after) == len(before) and max(after) == 0, after


def test_the_step_is_the_same_computation():
    fused = fused_step()
    after = schedule_reductions(STEP_FUNC)(fused)
    def bindings(m):
        return sorted(str(b.value) for block in m[STEP_FUNC].body.blocks for b in block.bindings)
    assert bindings(fused) == bindings(after)


def test_an_update_runs_after_every_other_reader_of_the_value_it_replaces():
    """FuseOps' re-sort can put the kernel returning a new weight before a kernel reading the old one
    (the data gradient); update_in_place could then not write the new value over the old. Given that
    order, the pass moves the reader first; an update that must read its own result first (a cycle)
    keeps the given order."""
    from tvm.relax import op as R

    from pockengine.passes.schedule_reductions import schedule

    weight = relax.Var("weight", relax.TensorType((4, 4), "float32"))
    grad = relax.Var("grad", relax.TensorType((4, 4), "float32"))
    out_grad = relax.Var("out_grad", relax.TensorType((2, 4), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("f", [weight, grad, out_grad]):
        with bb.dataflow():
            new = bb.emit(R.subtract(weight, grad), "new_weight")
            data_grad = bb.emit(R.matmul(out_grad, weight), "data_grad")
            out = bb.emit_output(relax.Tuple([new, data_grad]))
        bb.emit_func_output(out)
    bindings = list(bb.get()["f"].body.blocks[0].bindings)
    returned = {new, data_grad}
    assert [b.var.name for b in schedule(bindings, returned)] == ["data_grad", "new_weight", out.name]
    assert [b.var.name for b in schedule(bindings)] == ["new_weight", "data_grad", out.name]  # nothing returned

    bb = relax.BlockBuilder()
    with bb.function("g", [weight, grad]):
        with bb.dataflow():
            new = bb.emit(R.subtract(weight, grad), "new_weight")
            both = bb.emit(R.add(new, weight), "reads_old_and_new")  # cannot run before `new`
            out = bb.emit_output(relax.Tuple([new, both]))
        bb.emit_func_output(out)
    bindings = list(bb.get()["g"].body.blocks[0].bindings)
    assert [b.var.name for b in schedule(bindings, {new, both})] == ["new_weight", "reads_old_and_new", out.name]
