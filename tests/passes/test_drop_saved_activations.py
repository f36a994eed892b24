"""drop_saved_activations: what the backward keeps of the forward, before and after, and the same
weights as PyTorch afterwards."""

import copy

import torch
import tvm
from torch import nn

import pockengine as pe
from conftest import FAST_HOST, make_batches, max_scaled_diff, train_torch
from pockengine.analysis.memory_plan import saved_activations
from pockengine.autodiff.step import STEP_FUNC, build_train_step
from pockengine.passes.drop_saved_activations import drop_saved_activations
from pockengine.sparse import SparseUpdate, apply_to_torch

ACTIVATION_SHAPE = (4, 8, 16, 16)


def conv_bn_relu6(bn_eval=False):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    if bn_eval:  # TinyTL / MCUNetV3 style: BatchNorm statistics frozen
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    return model


def step_before_after(model, scheme=None):
    job = pe.TrainingJob(model, (torch.randn(*ACTIVATION_SHAPE[:1], 3, 16, 16),), torch.randint(0, 10, (4,)),
                         "cross_entropy", pe.optim.SGD(lr=0.1, momentum=0.9), sparse_update=scheme)
    imported = job.import_model()
    before, _, _ = build_train_step(imported, job.optimizer, job.plan(imported))
    after = drop_saved_activations(STEP_FUNC)(before)
    return before, after


def saved_by_producer(mod):
    """[(producing op, dtype)] of the activation-sized tensors the backward keeps."""
    func = mod[STEP_FUNC]
    value = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    out = []
    for var in saved_activations(func):
        if [int(d) for d in var.ty.shape] == list(ACTIVATION_SHAPE):
            v = value[var]
            op = v.args[0].name_hint if v.op.name == "relax.call_tir" else v.op.name
            out.append((op, str(var.ty.dtype)))
    return sorted(out)


def test_full_update_keeps_only_the_conv_outputs():
    before, after = step_before_after(conv_bn_relu6())
    kept_before = saved_by_producer(before)
    # BatchNorm keeps x - mean, the normalised x and its output; ReLU6 feeds the next conv.
    assert len(kept_before) >= 7, kept_before
    assert saved_by_producer(after) == [("relax.nn.conv2d", "float32")] * 2
    assert sum(saved_activations(after[STEP_FUNC]).values()) < sum(saved_activations(before[STEP_FUNC]).values()) / 3


def test_bias_only_with_frozen_statistics_keeps_masks_not_activations():
    before, after = step_before_after(conv_bn_relu6(bn_eval=True), SparseUpdate.bias_only())
    assert all(dtype == "float32" for _, dtype in saved_by_producer(before))
    kept = saved_by_producer(after)
    assert kept and all(dtype == "bool" for _, dtype in kept), kept
    assert all(op.startswith("keep_for_backward") for op, _ in kept)  # opaque copies fusion cannot move
    ratio = sum(saved_activations(after[STEP_FUNC]).values()) / sum(saved_activations(before[STEP_FUNC]).values())
    assert ratio < 0.26  # a bool per float; the loss's few small tensors stay as they are


def test_masks_stay_separate_kernels_after_fusion():
    _, after = step_before_after(conv_bn_relu6(bn_eval=True), SparseUpdate.bias_only())
    with tvm.target.Target({"kind": "llvm"}):
        from tvm.relax.backend.cpu_generic import pipeline as cpu

        fused = tvm.transform.Sequential(cpu.legalize_passes(tvm.target.Target.current()))(after)
    names = [gv.name_hint for gv in fused.get_global_vars()]
    assert any(n.startswith("keep_for_backward") for n in names)
    assert not any("keep_for_backward" in n and n.startswith("fused") for n in names)


def test_weights_match_pytorch_with_frozen_statistics_and_masks():
    model = conv_bn_relu6(bn_eval=True).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    batches = make_batches((4, 3, 16, 16), 10, steps=10, dtype=torch.float64)
    optimizer = pe.optim.SGD(lr=0.05, momentum=0.9)
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], "cross_entropy", optimizer,
                         sparse_update=SparseUpdate.bias_only())
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(x, y) for x, y in batches]
    reference = apply_to_torch(model, program.plan)
    theirs = train_torch(reference, optimizer, batches)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-9
    worst, where = max_scaled_diff(program.state_dict(), reference.state_dict())
    assert worst < 1e-9, where


class CausalAttention(nn.Module):
    """One attention head through torch's scaled_dot_product_attention, whose math decomposition
    (safe softmax) zeroes fully masked rows with a `where` against a tensor of zeros."""

    def __init__(self, width=16):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, 10)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        return self.out(nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).mean(dim=1))


def test_constant_tensors_are_filled_again_not_saved():
    torch.manual_seed(0)
    tokens = 12
    job = pe.TrainingJob(CausalAttention().double(), (torch.randn(4, tokens, 16, dtype=torch.float64),),
                         torch.randint(0, 10, (4,)), "cross_entropy", pe.optim.SGD(lr=0.1))
    imported = job.import_model()
    before, _, _ = build_train_step(imported, job.optimizer, job.plan(imported))
    after = drop_saved_activations(STEP_FUNC)(before)

    def probability_sized(mod):
        """The saved (batch, tokens, tokens) tensors, by producing op."""
        value = {b.var: b.value for block in mod[STEP_FUNC].body.blocks for b in block.bindings}
        return sorted(value[v].op.name for v in saved_activations(mod[STEP_FUNC])
                      if tuple(int(d) for d in v.ty.shape) == (4, tokens, tokens))

    # The backward reads the softmax (its own rule) and the `where` after it (the matmul with V,
    # through a broadcast). Recomputing the `where` reads a zero tensor as large as it: filled again.
    assert probability_sized(before) == ["relax.broadcast_to", "relax.nn.softmax"]
    assert probability_sized(after) == ["relax.nn.softmax"]
    # the same weights as PyTorch after a few steps
    batches = make_batches((4, tokens, 16), 10, steps=4, dtype=torch.float64)
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(x, y) for x, y in batches]
    reference = copy.deepcopy(job.model)
    theirs = train_torch(reference, job.optimizer, batches)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-9
    worst, where = max_scaled_diff(program.state_dict(), reference.state_dict())
    assert worst < 1e-9, where
