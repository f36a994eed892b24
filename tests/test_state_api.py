"""PyTorch's state API on compiled programs: load_state_dict's (missing, unexpected) keys, torch
tensors out, torch.optim's optimizer state dicts in and out (continued training against torch.optim,
the oracle), one compile signature, and DeviceProgram as a program that holds state but runs no step."""

import pockengine as pe


def test_the_program_classes_are_public():
    from pockengine import runtime

    assert {"Program", "DeviceProgram"} <= set(pe.__all__)
    assert pe.Program is runtime.Program and pe.DeviceProgram is runtime.DeviceProgram
    assert all(getattr(pe, name) is not None for name in pe.__all__)
