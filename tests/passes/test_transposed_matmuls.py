"""transposed_matmuls: no step transposes a weight to multiply by it; the numbers stay the same."""

import collections
import copy

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.script import relax as R

import pockengine as pe
from conftest import FAST_HOST, max_scaled_diff
from pockengine.passes.transposed_matmuls import transposed_matmuls


def op_counts(mod):
    counts = collections.Counter()
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, lambda e: isinstance(e, relax.Call) and (
                counts.update([e.op.name]) if isinstance(e.op, tvm.ir.Op) else None))
    return counts


@tvm.script.ir_module
class LinearAndItsGradient:
    @R.function
    def main(x: R.Tensor((2, 5, 6), "float32"), w: R.Tensor((4, 6), "float32"), dy: R.Tensor((2, 5, 4), "float32"),
             a: R.Tensor((3, 4, 5), "float32")):
        with R.dataflow():
            wt = R.permute_dims(w, axes=[1, 0])
            wt_copy = wt  # autodiff's alias of a value crossing blocks
            y = R.matmul(x, wt_copy)  # nn.Linear: x @ W^T
            w_again = R.permute_dims(wt_copy, axes=[1, 0])
            dx = R.matmul(dy, w_again)  # its data gradient: dy @ (W^T)^T
            back = R.permute_dims(R.permute_dims(a, axes=[2, 0, 1]), axes=[1, 2, 0])  # a cycle of 3 axes, undone
            turned = R.permute_dims(R.permute_dims(a, axes=[2, 0, 1]), axes=[2, 0, 1])  # twice: [1, 2, 0]
            R.output(y, dx, back, turned, wt)
        return (y, dx, back, turned, wt)


def test_transposes_of_weights_fold_into_the_matmuls_and_cancel():
    after = transposed_matmuls()(LinearAndItsGradient)
    counts = op_counts(after)
    # one transpose left: `turned` (a real permutation); the weight's transposes go, except the one
    # the function returns (`wt`), which stays for that output only
    assert counts["relax.permute_dims"] == 2, after.script()
    assert counts["relax.matmul"] == 1  # dx: dy @ W, a plain matmul
    assert any(gv.name_hint.startswith("matmul_nt") for gv in after.functions)
    rng = np.random.default_rng(0)
    shapes = [(2, 5, 6), (4, 6), (2, 5, 4), (3, 4, 5)]
    args = [rng.standard_normal(s).astype("float32") for s in shapes]
    outputs = []
    for mod in (LinearAndItsGradient, after):
        exe = tvm.compile(mod, target=tvm.target.Target(FAST_HOST))
        vm = relax.VirtualMachine(exe, tvm.cpu())
        outputs.append([o.numpy() for o in vm["main"](*[tvm.runtime.tensor(a) for a in args])])
    x, w, dy, a = args
    expected = [x @ w.T, dy @ w, a, np.transpose(a, (1, 2, 0)), w.T]
    for before, now, reference in zip(*outputs, expected):
        np.testing.assert_allclose(before, reference, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(now, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_a_language_model_head_trains_at_parity_without_transposing_its_weight(tied):
    """A tied (or untied) LM head over a frozen embedding, a trained block between: no kernel of
    the step copies the head's weight transposed, and the weights after 3 SGD-momentum steps are
    PyTorch's (float64, scaled difference < 1e-10)."""
    from pockengine import pipeline, targets
    from pockengine.targets.host import CPU_LOWERING

    torch.manual_seed(0)

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(40, 16)
            self.block = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 16))
            self.head = torch.nn.Linear(16, 40, bias=False)
            if tied:
                self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.block(self.embed(ids)))

    def loss(out, y):
        return torch.nn.functional.cross_entropy(out.reshape(-1, 40), y.reshape(-1))

    model = TinyLM().double()
    batches = [(torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(i)),) * 2 for i in range(3)]
    optimizer = pe.optim.SGD(lr=0.5, momentum=0.9)
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1].clone(), loss, optimizer,
                         sparse_update=pe.SparseUpdate({"block.*": "full"}))
    fused = pipeline.fused_step(job, targets.resolve(FAST_HOST), CPU_LOWERING)
    kernels = [f for f in fused.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    copies = [f for f in kernels if [tuple(int(d) for d in p.ty.shape) for p in f.params] == [(40, 16), (16, 40)]]
    assert not copies, "a kernel transposes the head's weight"
    program = pe.compile(job, target=FAST_HOST)
    for x, y in batches:
        program.step(x, y.clone())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.block.parameters():
        p.requires_grad_(True)
    opt = optimizer.to_torch(list(model.block.parameters()))
    for x, y in batches:
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict())
    assert worst < 1e-10, where
