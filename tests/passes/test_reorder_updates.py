"""reorder_updates: every parameter gradient dies at its update, and the step computes the same."""

import torch
from torch import nn
from tvm import relax

import pockengine as pe
from pockengine.autodiff.step import STEP_FUNC, backward_start, build_train_step
from pockengine.optim import UPDATE_PREFIX
from pockengine.passes.reorder_updates import reorder_updates, update_side


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def step_module(optimizer):
    job = pe.TrainingJob(cnn(), (torch.randn(2, 3, 8, 8),), torch.randint(0, 10, (2,)), "cross_entropy", optimizer)
    imported = job.import_model()
    mod, _, _ = build_train_step(imported, optimizer, job.plan(imported))
    return mod


def gradient_lifetimes(func):
    """{parameter gradient: (defined at, last used at, bindings in between that are not its own update)}"""
    bindings = [b for block in func.body.blocks for b in block.bindings]
    params = {p.name for p in func.params}
    side = update_side(bindings, backward_start(bindings), params)
    uses = {}
    for i, b in enumerate(bindings):
        for v in relax.analysis.free_vars(b.value):
            uses.setdefault(v, []).append(i)
    out = {}
    for i, b in enumerate(bindings):
        if b.var.name.endswith("_adjoint") and b.var.name[: -len("_adjoint")] in params:
            last = max(uses[b.var])
            update = next(j for j in range(last, len(bindings)) if bindings[j].var.name.startswith(UPDATE_PREFIX))
            out[b.var.name] = (i, last, [j for j in range(i + 1, update) if j not in side])
    return out, bindings


def test_each_gradient_dies_at_its_update():
    for optimizer in (pe.optim.SGD(lr=0.1, momentum=0.9), pe.optim.AdamW()):
        before = step_module(optimizer)
        after = reorder_updates(STEP_FUNC)(before)
        lifetimes_before, _ = gradient_lifetimes(before[STEP_FUNC])
        lifetimes, bindings = gradient_lifetimes(after[STEP_FUNC])
        assert set(lifetimes) == set(lifetimes_before) and len(lifetimes) == 8
        for name, (_start, _last, others) in lifetimes.items():
            # From the gradient to its parameter's update, nothing but that update's chain runs.
            assert not others, (name, [bindings[j].var.name for j in others])
        # Before, every gradient lived until the optimizer ran after the whole backward.
        spans_before = [last - start for start, last, _ in lifetimes_before.values()]
        spans_after = [last - start for start, last, _ in lifetimes.values()]
        assert sum(spans_after) < sum(spans_before) / 2


def test_a_weight_is_updated_only_after_its_last_reader():
    after = reorder_updates(STEP_FUNC)(step_module(pe.optim.SGD(lr=0.1, momentum=0.9)))
    func = after[STEP_FUNC]
    bindings = [b for block in func.body.blocks for b in block.bindings]
    returned = {f for b in bindings if isinstance(b.value, relax.Tuple) for f in b.value.fields}
    checked = 0
    for param in func.params:
        readers = [i for i, b in enumerate(bindings) if param in relax.analysis.free_vars(b.value)]
        # The new weight the step returns (p - lr * v, gated on the step's batch check, which reads
        # the old weight too): the data gradient that reads the old one runs first.
        writers = [i for i in readers if bindings[i].var in returned and bindings[i].var.name.startswith(UPDATE_PREFIX)]
        if writers:
            assert writers[0] == max(readers), param.name
            checked += 1
    assert checked == len(returned) - 1  # every new state value (parameters, momenta, step); not the loss
