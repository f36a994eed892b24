"""drop_unit_reductions: a reduction block over one element (a weight gradient at batch 1, a
BatchNorm-bias gradient over a 1x1 map) becomes an assignment, and the step trains like PyTorch at
batch 1 — before it, inline_elementwise folded the optimizer's update into such a block while it
kept its init, and the updated weight read back its own output (W - lr * (W + g))."""

import copy

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from torch import nn
from tvm import s_tir, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu

import pockengine as pe
from conftest import FAST_HOST, MLP, make_batches, max_scaled_diff, mobilenetv2, train_torch
from pockengine import pipeline
from pockengine.passes.drop_unit_reductions import drop_unit_reductions
from pockengine.sparse import apply_to_torch


def legalized_and_fused(job):
    """The job's step after TVM's legalisation and fusion, without drop_unit_reductions."""
    imported = pipeline.import_model(job)
    step_mod = pipeline.derive_step(imported, job.optimizer, job.plan(imported))[0]
    target = tvm.target.Target(FAST_HOST)
    with target:
        return tvm.transform.Sequential(cpu.library_dispatch_passes(target) + cpu.legalize_passes(target))(step_mod)


def reduction_blocks(func) -> list:
    """(block name, [iterator extents of its reduction axes]) of every block with an init."""
    found = []

    def visit(block):
        if block.init is not None:
            found.append((block.name_hint, [int(iv.dom.extent) for iv in block.iter_vars
                                            if int(iv.iter_type) == tirx.IterVar.CommReduce]))

    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, visit))
    return found


def kernels(mod):
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def test_unit_reductions_become_assignments_and_others_stay():
    job = pe.TrainingJob(MLP(), (torch.randn(1, 32),), torch.randint(0, 10, (1,)), "cross_entropy",
                         pe.optim.SGD(lr=0.1))
    before = legalized_and_fused(job)
    after = drop_unit_reductions()(before)
    unit_before = {name for name, f in kernels(before).items()
                   if any(extents and all(e == 1 for e in extents) for _, extents in reduction_blocks(f))}
    assert len(unit_before) >= 3  # the three weight gradients at batch 1: (out, 1) @ (1, in)
    for name, f in kernels(after).items():
        blocks = reduction_blocks(f)
        assert not any(extents and all(e == 1 for e in extents) for _, extents in blocks), name
        # Reductions over more than one element keep their init (the input gradients' matmuls,
        # the loss's sums).
        assert [b for b in reduction_blocks(kernels(before)[name]) if any(e > 1 for e in b[1])] == blocks
    untouched = set(kernels(before)) - unit_before
    assert all(kernels(after)[n].same_as(kernels(before)[n]) for n in untouched)


@pytest.mark.parametrize("optimizer", [pe.optim.SGD(lr=0.5, momentum=0.9), pe.optim.Adam(lr=0.05)],
                         ids=["sgd_momentum", "adam"])
def test_batch_one_mlp_trains_like_pytorch(optimizer):
    torch.manual_seed(0)
    model = MLP().double()
    batches = make_batches((1, 32), 10, 6, dtype=torch.float64)
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], "cross_entropy", optimizer)
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(x, y) for x, y in batches]
    theirs = train_torch(model, optimizer, batches)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict())
    assert worst <= 1e-10, f"{where} differs by {worst:.3g}"


def test_batch_one_sparse_mobilenetv2_with_frozen_batchnorm_trains_like_pytorch():
    """The microcontroller set-up: batch 1, BatchNorm frozen, biases and the classifier trained
    (the BN-bias gradients of the last stages sum over one pixel)."""
    torch.manual_seed(0)
    model = mobilenetv2(width_mult=0.35, num_classes=10).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    batches = make_batches((1, 3, 32, 32), 10, 4, dtype=torch.float64)
    optimizer = pe.optim.SGD(lr=0.05)
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], "cross_entropy", optimizer,
                         sparse_update=pe.SparseUpdate.mcunetv3(12, "52", "1"))
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(x, y) for x, y in batches]
    theirs = train_torch(apply_to_torch(model, program.plan), optimizer, batches)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict())
    assert worst <= 1e-10, f"{where} differs by {worst:.3g}"
