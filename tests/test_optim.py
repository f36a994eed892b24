"""Each optimizer option against torch.optim, in float64, weights after 6 steps of a small MLP."""

import copy

import pytest
import torch

import pockengine as pe
from conftest import MLP, compile_and_train, make_batches, max_scaled_diff, train_torch
from pockengine.errors import OptimizerError

CASES = {
    "sgd": pe.optim.SGD(lr=0.1),
    "sgd momentum dampening": pe.optim.SGD(lr=0.05, momentum=0.9, dampening=0.3),
    "sgd nesterov weight decay": pe.optim.SGD(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-2),
    "sgd maximize": pe.optim.SGD(lr=0.01, momentum=0.5, maximize=True),
    "adam": pe.optim.Adam(lr=1e-2),
    "adam amsgrad weight decay": pe.optim.Adam(lr=1e-2, amsgrad=True, weight_decay=1e-2),
    "adam low beta1 (lerp's other branch)": pe.optim.Adam(lr=1e-2, betas=(0.3, 0.9), eps=1e-6),
    "adam maximize": pe.optim.Adam(lr=1e-3, maximize=True),
    "adamw": pe.optim.AdamW(lr=1e-2),
    "adamw amsgrad": pe.optim.AdamW(lr=1e-2, weight_decay=0.1, amsgrad=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_optimizer_matches_torch(name):
    optimizer = CASES[name]
    model = MLP().double()
    batches = make_batches((8, 32), 10, 6, dtype=torch.float64)
    program, losses = compile_and_train(copy.deepcopy(model), copy.deepcopy(optimizer), batches)
    torch_losses = train_torch(model, optimizer, batches)
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict())
    assert worst <= 1e-12, f"{where}: {worst:.3g}"
    assert max(abs(a - b) for a, b in zip(losses, torch_losses)) <= 1e-12
    assert int(program.optimizer_state_dict()["step"]) == 6


def test_optimizer_state_matches_torch_state():
    model = MLP().double()
    batches = make_batches((8, 32), 10, 3, dtype=torch.float64)
    program, _ = compile_and_train(copy.deepcopy(model), pe.optim.Adam(lr=1e-2, amsgrad=True), batches)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    ours = program.optimizer_state_dict()
    for name, p in model.named_parameters():
        for slot in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            theirs = opt.state[p][slot].numpy()
            assert abs(ours[f"optimizer.{slot}.{name}"] - theirs).max() <= 1e-12 * max(abs(theirs).max(), 1)


@pytest.mark.parametrize("bad, message", [
    (lambda: pe.optim.SGD(lr=-1), "Invalid learning rate"),
    (lambda: pe.optim.SGD(momentum=-0.1), "Invalid momentum"),
    (lambda: pe.optim.SGD(lr=0.1, nesterov=True), "Nesterov momentum requires"),
    (lambda: pe.optim.Adam(betas=(1.0, 0.9)), "Invalid beta parameter at index 0"),
    (lambda: pe.optim.AdamW(weight_decay=-1), "Invalid weight_decay"),
])
def test_invalid_hyperparameters(bad, message):
    with pytest.raises(OptimizerError, match=message):
        bad()


def test_defaults_are_torchs():
    import inspect

    for ours, theirs in [(pe.optim.SGD(), torch.optim.SGD), (pe.optim.Adam(), torch.optim.Adam),
                         (pe.optim.AdamW(), torch.optim.AdamW)]:
        params = inspect.signature(theirs).parameters
        for field, value in vars(ours).items():
            if field in params:
                default = params[field].default
                expected = tuple(default) if isinstance(default, tuple) else default
                assert value == expected, f"{theirs.__name__}.{field}"
