"""fuse_variance: BatchNorm's batch variance becomes one `variance` op; the values stay the same."""

import collections

import numpy as np
import torch
import tvm
from torch import nn
from tvm import relax

import pockengine as pe
from pockengine.autodiff.step import STEP_FUNC, build_train_step
from pockengine.passes.fuse_variance import fuse_variance


def step_module(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(dtype)
    job = pe.TrainingJob(model, (torch.randn(2, 3, 8, 8, dtype=dtype),), torch.randint(0, 3, (2,)), "cross_entropy",
                         pe.optim.SGD(lr=0.1))
    imported = job.import_model()
    return build_train_step(imported, job.optimizer, job.plan(imported))


def ops(mod):
    counts = collections.Counter()
    relax.analysis.post_order_visit(mod[STEP_FUNC].body, lambda e: isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) and counts.update([e.op.name]))
    return counts


def test_each_batchnorm_variance_becomes_one_op():
    before, _, _ = step_module()
    after = fuse_variance(STEP_FUNC)(before)
    b, a = ops(before), ops(after)
    assert b["relax.variance"] == 0 and a["relax.variance"] == 2
    assert a["relax.mean"] == b["relax.mean"] - 2  # the mean of the squares is gone
    assert a["relax.multiply"] < b["relax.multiply"]  # and so are the squares


def test_values_unchanged():
    before, signature, state = step_module(torch.float64)
    after = fuse_variance(STEP_FUNC)(before)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s.shape).astype(s.dtype) if s.dtype.startswith("float")
            else np.zeros(s.shape, s.dtype) for s in signature.batch]
    args += [state[s.name] if s.name in state else rng.standard_normal(s.shape).astype(s.dtype)
             for s in signature.state]
    args[1] = np.array([0, 2], dtype="int64")
    outs = []
    for mod in (before, after):
        ex = relax.build(mod, target="llvm")
        vm = relax.VirtualMachine(ex, tvm.cpu())
        outs.append([o.numpy() for o in vm[STEP_FUNC](*[tvm.runtime.tensor(a) for a in args])])
    for x, y in zip(*outs):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)
