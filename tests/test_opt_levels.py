"""Reported wrong-gradient cases, one SGD step in float64 against PyTorch, at the host preset's
optimisation level and at opt-level 0: a target option changes speed, never results.

  * max pooling with overlapping windows (ResNet's stem, 3/2/1), stride 1, ceil_mode: TVM vectorized
    the argmax of its max-pool gradient wrong (schedule_cpu no longer vectorizes multi-output blocks);
  * a 1x1 stride-2 convolution of an even-sized input (ResNet's downsample shortcut): its weight
    update ran once per point of the 2x2 gradient it is sliced from, in place, so at opt-level 0
    the weight moved stride^2 = 4 times (inline_elementwise places such an update outside that loop;
    update_in_place refuses a kernel that would repeat it).
"""

import copy

import pytest
import torch
from torch import nn

import pockengine as pe
from conftest import FAST_HOST, compile_and_train, make_batches, max_scaled_diff, train_torch

TOL = 1e-12
TARGETS = {"host": "host", "opt-level 0": FAST_HOST}


def pooled(pool, size):
    features = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), pool, nn.Flatten())
    return nn.Sequential(*features, nn.Linear(features(torch.zeros(1, 3, size, size)).shape[1], 10))


def strided_1x1(size):
    features = nn.Sequential(nn.Conv2d(3, 8, 1, stride=2, bias=False), nn.Flatten())
    return nn.Sequential(*features, nn.Linear(features(torch.zeros(1, 3, size, size)).shape[1], 10))


CASES = {
    "MaxPool2d(3, 2, 1)": (lambda: pooled(nn.MaxPool2d(3, 2, 1), 8), 8),
    "MaxPool2d(3, 1, 1)": (lambda: pooled(nn.MaxPool2d(3, 1, 1), 8), 8),
    "MaxPool2d(3, 2, 0, ceil_mode)": (lambda: pooled(nn.MaxPool2d(3, 2, 0, ceil_mode=True), 8), 8),
    "MaxPool2d(2, 2)": (lambda: pooled(nn.MaxPool2d(2, 2), 8), 8),
    "1x1 stride-2 conv, 8x8": (lambda: strided_1x1(8), 8),
    "1x1 stride-2 conv, 32x32": (lambda: strided_1x1(32), 32),
    "1x1 stride-2 conv, 9x9": (lambda: strided_1x1(9), 9),
}


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("case", list(CASES))
def test_one_step_matches_pytorch(case, target):
    factory, size = CASES[case]
    torch.manual_seed(0)
    model = factory().double()
    batches = make_batches((2, 3, size, size), 10, 2, dtype=torch.float64)
    program, losses = compile_and_train(copy.deepcopy(model), pe.optim.SGD(lr=0.1), batches, target=TARGETS[target])
    torch_losses = train_torch(model, pe.optim.SGD(lr=0.1), batches)
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict())
    assert worst <= TOL, f"{where} is {worst:.3g} off PyTorch"
    assert max(abs(a - b) for a, b in zip(losses, torch_losses)) <= TOL
