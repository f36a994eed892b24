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


# ---------------------------------------------------------------------- optimizer state in torch.optim's layout

# Continued training against torch.optim (the oracle), float64: weights within this scaled error
# (each tensor's max |difference| over max(|w|.max(), 1e-2)), as the model zoo's parity checks.
TOLERANCE = 1e-9
DOUBLE_BATCHES = make_batches((8, 32), 10, 6, dtype=torch.float64)

OPTIMIZER_CASES = {
    "sgd momentum dampening": (pe.optim.SGD(lr=0.05, momentum=0.9, dampening=0.2), None),
    "adamw": (pe.optim.AdamW(lr=1e-2, weight_decay=0.05), None),
    "sgd momentum, frozen layers": (pe.optim.SGD(lr=0.05, momentum=0.9),
                                    pe.SparseUpdate({"net.2.bias": "full", "net.4.*": "full"})),
    "adam amsgrad, frozen and partially trained": (pe.optim.Adam(lr=1e-2, amsgrad=True),
                                                   pe.SparseUpdate({"net.2.weight": 0.25, "net.4.*": "full"})),
}


def torch_steps(model, optimizer, batches):
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def compiled_with_torch_twin(case):
    """(program, its PyTorch twin, the twin's torch.optim over model.parameters()): the same
    weights, the same parameters frozen (a gradient mask on partially trained ones)."""
    import copy

    from conftest import FAST_HOST

    optimizer, scheme = OPTIMIZER_CASES[case]
    torch.manual_seed(0)
    model = MLP().double()
    x, y = DOUBLE_BATCHES[0]
    job = pe.TrainingJob(copy.deepcopy(model), (x,), y, "cross_entropy", optimizer, sparse_update=scheme)
    program = pe.compile(job, FAST_HOST)
    pe.sparse.apply_to_torch(model, program.plan)
    return program, model, optimizer.to_torch(model.parameters())


def assert_same_training_state(program, model, torch_optimizer):
    from conftest import max_scaled_diff

    worst, where = max_scaled_diff(program.state_dict(), model.state_dict(), floor=1e-2)
    assert worst < TOLERANCE, f"{where}: {worst:.3g}"
    ours, theirs = program.optimizer_state_dict(as_torch=True), torch_optimizer.state_dict()
    assert ours["param_groups"][0]["params"] == theirs["param_groups"][0]["params"]
    assert sorted(ours["state"]) == sorted(theirs["state"])  # frozen parameters have none
    for index, entry in theirs["state"].items():
        assert sorted(ours["state"][index]) == sorted(entry)
        for slot, value in entry.items():
            scale = max(float(value.abs().max()), 1e-2)
            assert float((ours["state"][index][slot].double() - value.double()).abs().max()) / scale < TOLERANCE, \
                (index, slot)


@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_training_continues_from_a_torch_optimizers_state(case):
    program, model, torch_optimizer = compiled_with_torch_twin(case)
    torch_steps(model, torch_optimizer, DOUBLE_BATCHES[:3])
    program.load_state_dict(model.state_dict())
    program.load_optimizer_state_dict(torch_optimizer.state_dict())
    assert int(program.optimizer_state_dict()["step"]) == 3 or not program.meta["optimizer"]["kind"].startswith("Adam")
    for x, y in DOUBLE_BATCHES[3:]:
        program.step(x, y)
    torch_steps(model, torch_optimizer, DOUBLE_BATCHES[3:])
    assert_same_training_state(program, model, torch_optimizer)


@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_torch_optim_continues_from_the_programs_state(case):
    program, model, torch_optimizer = compiled_with_torch_twin(case)
    for x, y in DOUBLE_BATCHES[:3]:
        program.step(x, y)
    model.load_state_dict(program.state_dict(as_torch=True))
    torch_optimizer.load_state_dict(program.optimizer_state_dict(as_torch=True))
    for x, y in DOUBLE_BATCHES[3:]:
        program.step(x, y)
    torch_steps(model, torch_optimizer, DOUBLE_BATCHES[3:])
    assert_same_training_state(program, model, torch_optimizer)


def test_a_torch_optimizer_of_the_trained_parameters_only_or_of_named_ones_loads_too():
    program, model, _ = compiled_with_torch_twin("sgd momentum, frozen layers")
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for torch_optimizer in (torch.optim.SGD(trained.values(), lr=0.05, momentum=0.9),
                            torch.optim.SGD(model.named_parameters(), lr=0.02, momentum=0.9)):
        torch_steps(model, torch_optimizer, DOUBLE_BATCHES[:2])
        program.load_optimizer_state_dict(torch_optimizer.state_dict())
        ours = program.optimizer_state_dict()
        assert program.lr == torch_optimizer.param_groups[0]["lr"]
        for name, p in trained.items():
            np.testing.assert_array_equal(ours[f"optimizer.momentum_buffer.{name}"],
                                          torch_optimizer.state[p]["momentum_buffer"].numpy(), err_msg=name)
    assert "param_names" in torch_optimizer.state_dict()["param_groups"][0]


def test_a_fresh_torch_optimizer_starts_the_programs_optimizer_afresh():
    program, model, torch_optimizer = compiled_with_torch_twin("adamw")
    assert program.optimizer_state_dict(as_torch=True)["state"] == {}  # as torch.optim's before its first step
    program.step(*DOUBLE_BATCHES[0])
    assert len(program.optimizer_state_dict(as_torch=True)["state"]) == 6
    torch_optimizer.param_groups[0]["lr"] = 3e-3
    program.load_optimizer_state_dict(torch_optimizer.state_dict())
    state = program.optimizer_state_dict()
    assert int(state["step"]) == 0 and program.lr == 3e-3
    assert not any(value.any() for name, value in state.items() if name.startswith("optimizer."))


def test_the_programs_own_optimizer_layout_loads_back(host_program):
    program = mlp_program()
    program.step(*BATCHES[0])
    host_program.load_optimizer_state_dict(program.optimizer_state_dict())
    for name, value in host_program.optimizer_state_dict().items():
        np.testing.assert_array_equal(value, program.optimizer_state_dict()[name], err_msg=name)
    with pytest.raises(pe.errors.StateError, match=r"\['net.0.bias'\] are not optimizer state.*load_state_dict"):
        host_program.load_optimizer_state_dict({"net.0.bias": np.zeros(64)})
    with pytest.raises(pe.errors.StateError, match=r"optimizer.momentum_buffer.net.0.bias has shape \(3,\)"):
        host_program.load_optimizer_state_dict({"optimizer.momentum_buffer.net.0.bias": np.zeros(3)})


def test_an_optimizer_state_that_does_not_fit_is_refused_naming_what():
    import copy

    program, model, torch_optimizer = compiled_with_torch_twin("sgd momentum, frozen layers")
    torch_steps(model, torch_optimizer, DOUBLE_BATCHES[:1])
    state = torch_optimizer.state_dict()
    before = program.optimizer_state_dict()

    def refused(change, message):
        bad = copy.deepcopy(state)
        change(bad)
        with pytest.raises(pe.errors.StateError, match=message):
            program.load_optimizer_state_dict(bad)

    refused(lambda s: s["param_groups"][0].update(momentum=0.5),
            r"param_groups\[0\] has momentum=0.5, the program is compiled with SGD\(momentum=0.9\).*"
            r"pe.optim.SGD\(momentum=0.5\)")
    refused(lambda s: s["param_groups"][0].update(betas=(0.9, 0.999)), "betas: it is another optimizer's state")
    refused(lambda s: s["state"].pop(3), r"no state for \['net.2.bias'\] while 2 other trained parameters have one")
    refused(lambda s: s["state"][4].update(momentum_buffer=torch.zeros(3)),
            r"momentum_buffer of net.4.weight has shape \(3,\), the parameter's is \(10, 64\)")
    refused(lambda s: s["param_groups"][0].update(params=[0, 1]), "list 2 parameters; the model has 6 \\(3 trained")
    refused(lambda s: s["param_groups"].append({**s["param_groups"][0], "lr": 1.0, "params": []}),
            r"learning rates \[0.05, 1.0\]")
    adam = torch.optim.Adam(model.parameters())
    torch_steps(model, adam, DOUBLE_BATCHES[:1])
    with pytest.raises(pe.errors.StateError, match="another optimizer's state than the program's SGD"):
        program.load_optimizer_state_dict(adam.state_dict())
    after = program.optimizer_state_dict()
    assert all(np.array_equal(after[name], value) for name, value in before.items())  # nothing was loaded


# ---------------------------------------------------------------------- one compile signature


def test_compile_has_one_signature_and_reports_progress():
    import inspect

    from pockengine import build, pipeline

    public, internal = inspect.signature(pe.compile).parameters, inspect.signature(build.compile).parameters
    assert list(public) == [*internal, "verbose"]
    for name, parameter in internal.items():
        assert (public[name].default, public[name].kind) == (parameter.default, parameter.kind), name
    x, y = BATCHES[0]
    job = pe.TrainingJob(MLP(), (x,), y, "cross_entropy", pe.optim.SGD(lr=0.1))
    with pytest.raises(TypeError):
        pe.compile(job, "host", True)  # everything after the target is named
    with pytest.raises(pe.errors.InputError, match=r"pass verbose=True .* or progress=.*, not both"):
        pe.compile(job, verbose=True, progress=print)
    heard = []
    pe.compile(job, progress=lambda index, total, name, seconds: heard.append((name, seconds is None)))
    assert heard == [(name, starts) for name in pipeline.STAGES for starts in (True, False)]
