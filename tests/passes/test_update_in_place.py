"""update_in_place: new parameters and optimizer state are written over the old ones, only where
the kernel is elementwise over them; the weights stay PyTorch's."""

import copy

import numpy as np
import torch
from torch import nn
from tvm import te

import pockengine as pe
from conftest import FAST_HOST, MLP, make_batches, max_scaled_diff, train_torch
from pockengine.passes.update_in_place import elementwise_in_place


def prim(*stages):
    return te.create_prim_func(list(stages))


def test_kernel_check_accepts_elementwise_and_rejects_other_indices():
    a = te.placeholder((4, 4), "float32", name="a")
    g = te.placeholder((4, 4), "float32", name="g")
    lr = te.placeholder((), "float32", name="lr")
    sgd = te.compute((4, 4), lambda i, j: a[i, j] - lr[()] * g[i, j], name="new")
    assert elementwise_in_place(prim(a, g, lr, sgd), 0, 3)
    decayed = te.compute((4, 4), lambda i, j: a[i, j] * 0.9, name="decayed")  # two stages, same element
    momentum = te.compute((4, 4), lambda i, j: decayed[i, j] + g[i, j], name="momentum")
    assert elementwise_in_place(prim(a, g, momentum), 0, 2)
    # The output written first, the old value read by a later stage: it would read the new one.
    first = te.compute((4, 4), lambda i, j: g[i, j] * 2.0, name="first")
    later = te.compute((4, 4), lambda i, j: a[i, j] + first[i, j], name="later")
    assert not elementwise_in_place(prim(a, g, first, later), 0, 2)
    transposed = te.compute((4, 4), lambda i, j: a[j, i] + g[i, j], name="t")
    assert not elementwise_in_place(prim(a, g, transposed), 0, 2)
    k = te.reduce_axis((0, 4), name="k")
    matmul = te.compute((4, 4), lambda i, j: te.sum(a[i, k] * g[k, j], axis=k), name="mm")
    assert not elementwise_in_place(prim(a, g, matmul), 0, 2)


def trained_in_place(model, batches, optimizer):
    """Compile, check the new state is written over the old (no second copy: only the loss and a
    few scalars are new), train, and check losses and weights against PyTorch (float64)."""
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], "cross_entropy", optimizer)
    program = pe.compile(job, target=FAST_HOST)
    assert program.memory_report().by_category["new_state"] < 64, program.memory_report().by_category
    before = {k: v.copy() for k, v in program.state_dict().items()}
    losses = [program.step(x, y) for x, y in batches]
    reference = copy.deepcopy(model)
    theirs = train_torch(reference, optimizer, batches)
    assert max(abs(a - b) for a, b in zip(losses, theirs)) < 1e-9
    worst, where = max_scaled_diff(program.state_dict(), reference.state_dict())
    assert worst < 1e-9, where
    assert any(not np.array_equal(before[k], v) for k, v in program.state_dict().items())


def test_optimizer_writes_in_place_and_matches_pytorch():
    torch.manual_seed(0)
    model = MLP().double()
    batches = make_batches((8, 32), 10, steps=6, dtype=torch.float64)
    for optimizer in (pe.optim.SGD(lr=0.1, momentum=0.9, weight_decay=1e-3), pe.optim.Adam(lr=1e-2)):
        trained_in_place(model, batches, optimizer)


def test_strided_1x1_conv_weight_is_updated_once():
    """A 1x1 stride-2 convolution of an even-sized input: its weight gradient is computed on 2x2
    points and sliced to 1x1, and the update's epilogue must run once per weight, not once per
    point (in place, it applied the update 4 times; at opt-level 0 nothing masked it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1, stride=2, bias=False), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).double()
    trained_in_place(model, make_batches((2, 3, 8, 8), 10, steps=2, dtype=torch.float64), pe.optim.SGD(lr=0.1))
