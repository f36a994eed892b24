"""PyTorch's state API on compiled programs: load_state_dict's (missing, unexpected) keys, torch
tensors out, torch.optim's optimizer state dicts in and out (continued training against torch.optim,
the oracle), one compile signature, and DeviceProgram as a program that holds state but runs no step."""

import numpy as np
import pytest
import torch

import pockengine as pe
from conftest import MLP, make_batches
from pockengine.errors import NotRunnableHereError, TargetError
from pockengine.runtime import CompiledStep, DeviceProgram

BATCHES = make_batches((8, 32), 10, 6)


def mlp_program(optimizer=None, sparse_update=None):
    torch.manual_seed(0)
    x, y = BATCHES[0]
    job = pe.TrainingJob(MLP(), (x,), y, "cross_entropy", optimizer or pe.optim.SGD(lr=0.1, momentum=0.9),
                         sparse_update=sparse_update)
    return pe.compile(job)


@pytest.fixture(scope="module")
def host_program():
    return mlp_program()


def as_device_program(program, target="cortex-m7", family="cortex-m"):
    """The host program's step and state as if built for a microcontroller (no toolchain needed)."""
    return DeviceProgram({}, program.signature, program.state_arrays(), program.memory_report(),
                         dict(program.meta, target=target, family=family))


# ---------------------------------------------------------------------- DeviceProgram


def test_a_device_program_is_not_a_program_and_says_where_its_step_runs(host_program):
    device = as_device_program(host_program)
    assert isinstance(device, CompiledStep) and isinstance(host_program, CompiledStep)
    assert not isinstance(device, pe.Program) and isinstance(device, pe.DeviceProgram)
    x, y = BATCHES[0]
    for name in ("step", "time_step", "kernel_times", "threads"):
        assert not hasattr(device, name), name
        with pytest.raises(TargetError, match=rf"program.{name}: this program is built for cortex-m7 \(cortex-m\); "
                                              r"it cannot run in this process.*`pockengine run DIR`"):
            getattr(device, name)
    with pytest.raises(NotRunnableHereError):
        device.step(x, y)
    with pytest.raises(AttributeError, match="'DeviceProgram' object has no attribute 'stpe'"):
        device.stpe  # noqa: B018 - a typo is an ordinary AttributeError


def test_a_device_program_holds_state_and_exports_it(host_program, tmp_path):
    device = as_device_program(host_program)
    assert device.lr == host_program.lr
    device.lr = 0.25
    halves = {k: v / 2 for k, v in host_program.state_dict().items()}
    device.load_state_dict(halves)
    path = device.export(str(tmp_path / "device"))
    loaded = pe.load(path)
    assert type(loaded) is DeviceProgram and loaded.lr == 0.25
    for key, value in loaded.state_dict().items():
        np.testing.assert_array_equal(value, halves[key], err_msg=key)
    # its batch checks are the host's (`pockengine run` checks batches before a firmware runs them)
    x, y = BATCHES[0]
    with pytest.raises(pe.errors.NumericsError, match="batch 1"):
        loaded.check_batch([np.full_like(x.numpy(), np.nan), y.numpy()], "batch 1")


def test_the_program_classes_are_public():
    from pockengine import runtime

    assert {"Program", "DeviceProgram"} <= set(pe.__all__)
    assert pe.Program is runtime.Program and pe.DeviceProgram is runtime.DeviceProgram
    assert all(getattr(pe, name) is not None for name in pe.__all__)
