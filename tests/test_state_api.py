"""PyTorch's state API on compiled programs: load_state_dict's (missing, unexpected) keys, torch
tensors out, torch.optim's optimizer state dicts in and out (continued training against torch.optim,
the oracle), one compile signature, and DeviceProgram as a program that holds state but runs no step."""

import numpy as np
import pytest
import torch
from torch import nn

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


# ---------------------------------------------------------------------- load_state_dict


def test_load_state_dict_reports_missing_and_unexpected_keys_like_torch():
    program = mlp_program()
    torch.manual_seed(1)
    model = MLP()
    reference = model.state_dict()
    assert repr(program.load_state_dict(reference)) == "<All keys matched successfully>"
    result = program.load_state_dict({"net.0.bias": torch.zeros(64), "head.weight": torch.zeros(3)}, strict=False)
    theirs = model.load_state_dict({"net.0.bias": torch.zeros(64), "head.weight": torch.zeros(3)}, strict=False)
    assert result == (sorted(set(reference) - {"net.0.bias"}, key=list(reference).index), ["head.weight"])
    assert (result.missing_keys, result.unexpected_keys) == (theirs.missing_keys, theirs.unexpected_keys)
    assert not program.state_dict()["net.0.bias"].any()  # what the program has is loaded, the rest ignored
    with pytest.raises(pe.errors.StateError, match=r"unexpected keys \['head.weight'\]; .*strict=False"):
        program.load_state_dict({**reference, "head.weight": torch.zeros(3)})
    # a wrong shape is an error with or without strict, and loads nothing
    before = program.state_dict()
    with pytest.raises(pe.errors.StateError, match=r"net.4.bias has shape \(3,\), the program expects \(10,\)"):
        program.load_state_dict({"net.0.bias": torch.ones(64), "net.4.bias": torch.zeros(3)}, strict=False)
    np.testing.assert_array_equal(program.state_dict()["net.0.bias"], before["net.0.bias"])


class TiedHead(nn.Module):
    """A language-model-like head sharing the embedding's weight (one parameter, two state_dict keys)."""

    def __init__(self, vocab=10, width=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids)))).mean(1)


def tied_batches(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 10, (8, 5), generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(steps)]


def test_a_tied_parameter_loads_under_either_name():
    torch.manual_seed(0)
    model = TiedHead()
    ids, labels = tied_batches(1)[0]
    program = pe.compile(pe.TrainingJob(model, (ids,), labels, "cross_entropy", pe.optim.SGD(lr=0.1)))
    weight = torch.randn(10, 16)
    result = program.load_state_dict({"head.weight": weight}, strict=False)
    assert result == model.load_state_dict({"head.weight": weight}, strict=False)  # torch: embed.weight is missing
    assert result.missing_keys == ["embed.weight", "mix.weight", "mix.bias"]
    np.testing.assert_array_equal(program.state_dict()["embed.weight"], weight.numpy())


def test_load_state_dict_keeps_partially_trained_weights():
    """A partially trained weight (two state tensors) given whole or as its parts; unexpected keys
    beside it are ignored without strict."""
    program = mlp_program(sparse_update=pe.SparseUpdate({"net.2.weight": 0.25, "net.4.*": "full"}))
    split = program.signature.partial["net.2.weight"]
    state = program.state_dict()
    doubled = {k: v * 2 for k, v in state.items()}
    assert program.load_state_dict({**doubled, "extra": np.zeros(1)}, strict=False) == ([], ["extra"])
    for key, value in program.state_dict().items():
        np.testing.assert_array_equal(value, doubled[key], err_msg=key)
    parts = {k: v for k, v in program.state_arrays().items() if k in (split.trained, split.frozen)}
    assert program.load_state_dict({**state, **parts}, strict=False).missing_keys == []
    result = program.load_state_dict({k: v for k, v in state.items() if k != "net.2.weight"} | parts)
    assert result == ([], [])  # a partially trained weight given as its two parts is not missing


# ---------------------------------------------------------------------- torch tensors


def test_state_dicts_come_out_as_torch_tensors(host_program):
    state = host_program.state_dict(as_torch=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    model = MLP()
    model.load_state_dict(state)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), host_program.state_dict()[key], err_msg=key)
    read_only = np.arange(3.0)
    read_only.flags.writeable = False
    nested = pe.to_torch({"a": read_only, "groups": [{"lr": 0.1, "betas": (0.9, 0.99), "step": np.float32(2)}]})
    assert torch.equal(nested["a"], torch.arange(3.0, dtype=torch.float64))
    assert nested["groups"][0]["lr"] == 0.1 and nested["groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(nested["groups"][0]["step"], torch.tensor(2.0))
