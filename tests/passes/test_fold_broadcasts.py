"""fold_broadcasts: the IR loses its broadcast copies, the numbers stay PyTorch's."""

import collections
import copy

import torch
import tvm
from tvm import relax

import pockengine as pe
from conftest import FAST_HOST, TransformerClassifier, make_batches, max_scaled_diff, train_torch
from pockengine.frontend import FUNC_NAME
from pockengine.passes.fold_broadcasts import fold_broadcasts


def op_counts(func):
    counts = collections.Counter()
    relax.analysis.post_order_visit(
        func.body, lambda e: isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and counts.update([e.op.name]))
    return counts


def test_weight_expansion_and_identity_broadcasts_are_folded():
    model = TransformerClassifier(d_model=32, heads=4, layers=1)
    job = pe.TrainingJob(model, (torch.randn(2, 8, 16),), torch.randint(0, 5, (2,)), "cross_entropy", pe.optim.SGD())
    before = job.import_model().mod
    after = fold_broadcasts(FUNC_NAME)(before)
    b, a = op_counts(before[FUNC_NAME]), op_counts(after[FUNC_NAME])
    assert b["relax.broadcast_to"] >= 3 and a["relax.broadcast_to"] == 0
    assert a["relax.matmul"] == b["relax.matmul"]
    # the in-projection weight is no longer expanded over the batch: one more matmul takes a 2-D
    # weight directly (the remaining 3-D ones are attention's q @ k^T and attn @ v)
    assert rank2_weight_matmuls(after[FUNC_NAME]) == rank2_weight_matmuls(before[FUNC_NAME]) + 1


def rank2_weight_matmuls(func):
    found = []
    relax.analysis.post_order_visit(func.body, lambda e: isinstance(e, relax.Call) and hasattr(e.op, "name")
                                    and e.op.name == "relax.matmul" and len(e.args[1].ty.shape) == 2
                                    and found.append(e))
    return len(found)


def test_folded_transformer_trains_like_pytorch():
    torch.manual_seed(0)
    model = TransformerClassifier(d_model=32, heads=4, layers=2).double()
    batches = make_batches((4, 8, 16), 5, 5, dtype=torch.float64)
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], "cross_entropy", pe.optim.Adam(lr=1e-3))
    program = pe.compile(job, target=FAST_HOST)
    for x, y in batches:
        program.step(x, y)
    train_torch(model, pe.optim.Adam(lr=1e-3), batches)
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict())
    assert worst <= 1e-9, where
