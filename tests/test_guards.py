"""The guarded step: no training on NaN batches, out-of-range labels or ids, or a diverged state, and
never a non-finite state saved (autodiff/guards.py, runtime.Program.step)."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import pockengine as pe
from conftest import FAST_HOST, max_scaled_diff, train_torch
from pockengine.autodiff.guards import compiled_without_checks
from pockengine.errors import InputError, NumericsError
from pockengine.targets import device_runner

FAST = {"kind": "llvm", "opt-level": 0}
CLI = os.path.join(os.path.dirname(sys.executable), "pockengine")


def relu_mlp_program(classes=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, classes))
    x, y = torch.randn(6, 8), torch.randint(0, classes, (6,))
    program = pe.compile(pe.TrainingJob(model, (x,), y, "cross_entropy", pe.optim.SGD(lr=0.1, momentum=0.9)), FAST)
    return program, model, x, y


@pytest.fixture(scope="module")
def mlp():
    return relu_mlp_program()


def state_bytes(program) -> dict:
    return {k: v.tobytes() for k, v in {**program.state_dict(), **program.optimizer_state_dict()}.items()}


def test_a_nan_in_a_batch_is_refused_before_it_trains(mlp):
    """The issue's case: TVM's ReLU maps NaN to 0, so the loss stayed finite while weights went NaN."""
    program, _, x, y = mlp
    program.step(x, y)
    before = state_bytes(program)
    for bad in (float("nan"), float("inf")):
        x_bad = x.clone()
        x_bad[2, 3] = bad
        with pytest.raises(NumericsError, match=r"input x holds 1 NaN or infinite values.*index \(2, 3\)"):
            program.step(x_bad, y)
    assert state_bytes(program) == before and program.steps_taken == 1
    program.step(x, y)  # the program goes on with good data


@pytest.mark.parametrize("label", [4, 100, -1])
def test_labels_out_of_range_are_refused_like_pytorch(mlp, label):
    program, _, x, y = mlp
    y_bad = y.clone()
    y_bad[4] = label
    with pytest.raises(IndexError):
        nn.functional.cross_entropy(torch.zeros(6, 4), y_bad)  # PyTorch refuses them too
    before = state_bytes(program)
    with pytest.raises(InputError, match=rf"input target: {label} \(at index \(4,\)\) is out of range.*\[0, 4\)"):
        program.step(x, y_bad)
    assert state_bytes(program) == before


def test_ignore_index_labels_train_like_pytorch():
    program, model, x, y = relu_mlp_program()
    y_ignored = y.clone()
    y_ignored[[1, 4]] = -100
    expected = nn.functional.cross_entropy(model(x), y_ignored).item()
    assert program.step(x, y_ignored) == pytest.approx(expected, rel=1e-5)


def test_token_ids_outside_the_vocabulary_are_refused():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(7, 4), nn.Linear(4, 3)

        def forward(self, ids):
            return self.head(self.embed(ids).mean(1))

    ids, y = torch.randint(0, 7, (4, 5)), torch.randint(0, 3, (4,))
    program = pe.compile(pe.TrainingJob(Bag(), (ids,), y, "cross_entropy", pe.optim.SGD(lr=0.1)), FAST)
    name = program.signature.batch[0].name
    assert {(r.input, r.size) for r in program.signature.index_ranges} == {(name, 7), ("target", 3)}
    ids_bad = ids.clone()
    ids_bad[1, 2] = 7
    with pytest.raises(InputError, match=rf"input {name}: 7 \(at index \(1, 2\)\) .*embed.*\[0, 7\)"):
        program.step(ids_bad, y)
    program.step(ids, y)


def test_a_diverged_update_is_reported_and_never_saved(tmp_path):
    program, _, x, y = relu_mlp_program()
    path = program.export(str(tmp_path / "art"))
    saved = open(os.path.join(path, "state.npz"), "rb").read()
    program.lr = 1e36  # finite, accepted; the update overflows float32
    with pytest.raises(NumericsError, match=r"step \d: \d+ values of .* are NaN or infinite"):
        for _ in range(3):
            program.step(x, y)
    for write in (lambda: program.save_state(path), lambda: program.export(path)):
        with pytest.raises(NumericsError, match="not saving"):
            write()
    assert open(os.path.join(path, "state.npz"), "rb").read() == saved
    with pytest.raises(NumericsError, match="not finite"):
        program.step(x, y)
    finite = pe.load(path)
    program.load_state_dict({**finite.state_dict(), **finite.optimizer_state_dict()}, strict=False)
    program.lr = 0.1
    assert np.isfinite(program.step(x, y))  # a finite state loaded: it trains again


class BatchNormNet(nn.Module):
    """State of every kind a refused batch must leave alone: parameters, Adam's two moments and
    step counter, BatchNorm's running statistics and batch count."""

    def __init__(self):
        super().__init__()
        # No conv bias: BatchNorm cancels it, its true gradient is 0 and Adam would amplify rounding noise.
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_a_refused_batch_changes_no_state_and_training_goes_on_as_if_it_never_came():
    """The step checks its batch itself and gates every new value on that check: after a NaN batch
    and a batch with a label out of range (raised, or returned as a NaN loss with check=False), the
    program trains on exactly as PyTorch does on the good batches alone (float64)."""
    torch.manual_seed(0)
    model = BatchNormNet().double()
    good = [(torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(3)]
    x, y = good[0]
    job = pe.TrainingJob(BatchNormNet().double().requires_grad_(True), (x,), y, "cross_entropy",
                         pe.optim.AdamW(lr=0.01))
    job.model.load_state_dict(model.state_dict())
    program = pe.compile(job, FAST_HOST)
    x_nan, y_bad = x.clone(), y.clone()
    x_nan[1, 2, 3, 4] = float("nan")
    y_bad[3] = 3
    losses = [program.step(*good[0])]
    before = state_bytes(program)
    with pytest.raises(NumericsError, match=r"step 2: input x holds 1 NaN.*the state is unchanged"):
        program.step(x_nan, y)
    with pytest.raises(InputError, match=r"step 2: input target: 3 .*the state is unchanged"):
        program.step(x, y_bad)
    assert np.isnan(program.step(x_nan, y, check=False)) and np.isnan(program.step(x, y_bad, check=False))
    assert state_bytes(program) == before and program.steps_taken == 1
    losses += [program.step(*batch) for batch in good[1:]]
    expected = train_torch(model, pe.optim.AdamW(lr=0.01), good)
    np.testing.assert_allclose(losses, expected, rtol=1e-10)
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict(), floor=1e-2)
    assert worst < 1e-10, (worst, where)
    assert int(program.optimizer_state_dict()["step"]) == 3


def test_a_step_without_its_own_checks_is_checked_from_python(tmp_path):
    """An artifact built before steps checked themselves (its manifest says nothing of it) gets the
    same checks from the runtime: the batch before the step, the trained parameters after it."""
    with compiled_without_checks():
        program, _, x, y = relu_mlp_program()
    assert not program.signature.checks_in_step
    path = program.export(str(tmp_path / "old"))
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    del manifest["signature"]["checks_in_step"]  # as an older PockEngine wrote it
    json.dump(manifest, open(os.path.join(path, "manifest.json"), "w"))
    old = pe.load(path)
    old.step(x, y)
    before = state_bytes(old)
    x_bad = x.clone()
    x_bad[2, 3] = float("nan")
    with pytest.raises(NumericsError, match=r"step 2: input x holds 1 NaN"):
        old.step(x_bad, y)
    assert state_bytes(old) == before and old.steps_taken == 1
    old.lr = 1e38
    with pytest.raises(NumericsError, match=r"step 2: \d+ values of .* are NaN or infinite"):
        for _ in range(3):
            old.step(100 * x, y)


def test_a_parameter_the_update_makes_non_finite_is_caught_though_the_loss_stays_finite(tmp_path):
    """The step's loss is computed before its update: an update that overflows (large gradients, a
    huge but finite learning rate) leaves it finite, as PyTorch's is. The step's check of the new
    parameters makes it NaN, so the step that did it raises, naming the parameter."""
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    x, y = 100 * torch.randn(6, 8), torch.randint(0, 4, (6,))
    job = pe.TrainingJob(copy.deepcopy(model), (x,), y, "cross_entropy", pe.optim.SGD(lr=1e38))
    torch_losses = train_torch(model, pe.optim.SGD(lr=1e38), [(x, y)])
    assert np.isfinite(torch_losses).all() and not torch.isfinite(model.weight).all()  # what PyTorch does
    program = pe.compile(job, FAST)
    with pytest.raises(NumericsError, match=r"step 1: \d+ values of weight are NaN or infinite"):
        program.step(x, y)
    with pytest.raises(NumericsError, match="not finite"):
        program.step(x, y)
    unchecked = pe.compile(job, FAST)
    assert np.isnan(unchecked.step(x, y, check=False))  # the loss says so, where PyTorch's does not
    assert np.isnan(unchecked.step(x, y, check=False))  # and check=False steps on, without raising
    with pytest.raises(NumericsError, match="not saving"):
        unchecked.export(str(tmp_path / "art"))


def test_the_cli_and_the_device_runner_refuse_a_nan_batch_and_save_nothing(mlp, tmp_path):
    program, _, x, y = mlp
    path = program.export(str(tmp_path / "art"))
    saved = open(os.path.join(path, "state.npz"), "rb").read()
    x_bad = x.numpy().copy()
    x_bad[0, 0] = np.nan
    data = str(tmp_path / "bad.npz")
    np.savez(data, x=np.stack([x.numpy(), x_bad]), target=np.stack([y.numpy(), y.numpy()]))
    result = subprocess.run([CLI, "run", path, "--steps", "3", "--data", data, "--save"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: step 2: input x holds 1 NaN")
    with pytest.raises(ValueError, match="step 2: input x holds 1 NaN.*nothing was saved"):
        device_runner.run(path, 3, data, save=True, out=open(os.devnull, "w"))
    assert open(os.path.join(path, "state.npz"), "rb").read() == saved


def test_the_finiteness_check_tells_overflowing_sums_from_non_finite_values():
    """first_non_finite sums the tensors (small ones in one array) and tests the total once: a total
    that overflows (large finite float32 values) is confirmed value by value."""
    big = np.full(4, 3e38, "float32")  # finite; its float32 sum is inf
    labels = np.array([0, 2**31 - 1], "int32")  # integers are not checked
    assert device_runner.first_non_finite([("a", big), ("b", big.astype("float64")), ("y", labels)]) is None
    with_nan = np.ones(5, "float32")
    with_nan[[1, 3]] = np.nan
    cancelling = np.array([np.inf, -np.inf], "float64")  # their sum is NaN, each value infinite
    assert device_runner.first_non_finite([("a", big), ("b", with_nan)]) == ("b", 2)
    assert device_runner.first_non_finite([("c", cancelling), ("b", with_nan)]) == ("c", 2)
    large = np.zeros(device_runner.SUMMED_TOGETHER + 1, "float32")  # summed on its own, not copied
    assert device_runner.first_non_finite([("a", big), ("large", large), ("scalar", np.array(1.0))]) is None
    large[-1] = -np.inf
    assert device_runner.first_non_finite([("a", big), ("large", large), ("b", with_nan)]) == ("large", 1)
