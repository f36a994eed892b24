"""legalize_ops: the module TVM's LegalizeOps builds, with each distinct call legalized once; calls
that only look alike (x*x and x*y, different constants or attributes) keep their own kernels."""

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax

import pockengine as pe
from conftest import FAST_HOST, mobilenetv2
from pockengine import pipeline
from pockengine.passes.legalize_ops import _call_key, legalize_ops


def both(mod):
    with tvm.target.Target(FAST_HOST):
        return relax.transform.LegalizeOps()(mod), legalize_ops()(mod)


def step_module(model, x, y, optimizer):
    job = pe.TrainingJob(model, (x,), y, "cross_entropy", optimizer)
    imported = pipeline.import_model(job)
    return pipeline.derive_step(imported, job.optimizer, job.plan(imported))[0]


def test_lookalike_calls_keep_their_own_kernels():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3, 4), "float32"))
    y = relax.Var("y", relax.TensorType((3, 4), "float32"))
    table = relax.const(np.arange(12, dtype="float32").reshape(3, 4))
    other_table = relax.const(np.ones((3, 4), "float32"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            calls = [relax.op.multiply(x, y), relax.op.multiply(y, x), relax.op.multiply(x, x),  # x*y and y*x: one
                     relax.op.multiply(x, relax.const(0.5)), relax.op.multiply(x, relax.const(2.0)),
                     relax.op.add(x, table), relax.op.add(y, other_table),
                     relax.op.sum(x, axis=[0], keepdims=True), relax.op.sum(x, axis=[1], keepdims=True),
                     relax.op.sum(y, axis=[1], keepdims=True)]  # the same kernel as the one before it
            values = [bb.emit(c) for c in calls]
            keys = [_call_key(bb.normalize(c)) for c in calls]
            out = bb.emit_output(relax.Tuple(values))
        bb.emit_func_output(out)
    assert keys[0] == keys[1] and keys[-2] == keys[-1]
    assert len({keys[0], keys[2]}) == 2 and len({keys[7], keys[8]}) == 2
    tvm_legalized, ours = both(bb.get())
    tvm.ir.assert_structural_equal(ours, tvm_legalized)
    # and the kernels compute what they should
    vm = relax.VirtualMachine(relax.build(ours, target=tvm.target.Target(FAST_HOST)), tvm.cpu())
    a, b = np.random.default_rng(0).standard_normal((2, 3, 4)).astype("float32")
    got = [v.numpy() for v in vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b))]
    expected = [a * b, b * a, a * a, a * 0.5, a * 2.0, a + np.arange(12).reshape(3, 4), b + 1,
                a.sum(0, keepdims=True), a.sum(1, keepdims=True), b.sum(1, keepdims=True)]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-6)


@pytest.mark.parametrize("model", ["mobilenetv2", "llama"])
def test_training_steps_legalize_to_tvms_module(model):
    """A CNN step (BatchNorm and depthwise backward, momentum) and a LLaMA step (attention, RMSNorm,
    rotary, AdamW): the same module as LegalizeOps'."""
    torch.manual_seed(0)
    if model == "mobilenetv2":
        mod = step_module(mobilenetv2(width_mult=0.35, num_classes=10).double(),
                          torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,)),
                          pe.optim.SGD(lr=0.1, momentum=0.9))
    else:
        transformers = pytest.importorskip("transformers")
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, use_cache=False)

        class Logits(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lm = transformers.LlamaForCausalLM(config)

            def forward(self, ids):
                return self.lm(input_ids=ids).logits.reshape(-1, 64)

        mod = step_module(Logits(), torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (16,)), pe.optim.AdamW(lr=1e-3))
    tvm_legalized, ours = both(mod)
    assert tvm_ffi.structural_equal(ours, tvm_legalized), tvm_ffi.get_first_structural_mismatch(ours, tvm_legalized)
