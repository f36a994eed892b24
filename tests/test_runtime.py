"""Program and artifacts: step() input checks, state dicts, learning rate, export / load, corruption."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import pockengine as pe
from conftest import MLP, ROOT, make_batches, max_scaled_diff, train_torch
from pockengine.autodiff.guards import compiled_without_checks
from pockengine.errors import ArtifactError, InputError, StateError

BATCHES = make_batches((8, 32), 10, 6)


def make_program():
    torch.manual_seed(0)
    model = MLP()
    job = pe.TrainingJob(model, (BATCHES[0][0],), BATCHES[0][1], "cross_entropy", pe.optim.Adam(lr=1e-2))
    return pe.compile(job), model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A program trained 3 steps and exported; the same program trained 3 more steps in-process."""
    program, _ = make_program()
    for x, y in BATCHES[:3]:
        program.step(x, y)
    path = str(tmp_path_factory.mktemp("art") / "mlp")
    program.export(path)
    for x, y in BATCHES[3:]:
        program.step(x, y)
    return path, program.state_dict(), program.optimizer_state_dict()


def test_an_exported_program_runs_from_the_command_line_without_data(artifact, tmp_path):
    """export() writes the example batch the program was compiled for; `pockengine run` uses it and a
    reloaded program exports it again."""
    path, _, _ = artifact
    with np.load(os.path.join(path, "example.npz")) as npz:
        assert sorted(npz.files) == ["target", "x"] and npz["x"].shape == BATCHES[0][0].shape
    again = pe.load(path).export(str(tmp_path / "again"))
    assert os.path.isfile(os.path.join(again, "example.npz"))
    cli = os.path.join(os.path.dirname(sys.executable), "pockengine")
    ran = subprocess.run([cli, "run", again, "--steps", "2"], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert sum(line.startswith("step") for line in ran.stdout.splitlines()) == 2


def copy_artifact(path, tmp_path):
    dest = str(tmp_path / "copy")
    shutil.copytree(path, dest)
    return dest


# A fresh interpreter in which `import torch` fails: what a device without PyTorch sees.
NO_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is not available on this device")
    sys.meta_path.insert(0, NoTorch())
""")


def test_export_then_load_in_fresh_process_without_torch_continues_identically(artifact, tmp_path):
    path, expected_state, expected_optimizer = artifact
    batches = tmp_path / "batches.npz"
    np.savez(batches, **{f"x{i}": x.numpy() for i, (x, _) in enumerate(BATCHES[3:])},
             **{f"y{i}": y.numpy() for i, (_, y) in enumerate(BATCHES[3:])})
    out = tmp_path / "state.npz"
    script = NO_TORCH + textwrap.dedent(f"""
        import numpy as np
        import pockengine as pe
        program = pe.load({path!r})
        data = np.load({str(batches)!r})
        for i in range(3):
            program.step(data[f"x{{i}}"], data[f"y{{i}}"])
        assert "torch" not in sys.modules
        np.savez({str(out)!r}, **program.state_dict(), **program.optimizer_state_dict())
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    with np.load(out) as saved:
        for k, v in {**expected_state, **expected_optimizer}.items():
            np.testing.assert_array_equal(saved[k], v, err_msg=k)


def test_manifest_describes_the_step(artifact):
    path, _, _ = artifact
    with open(os.path.join(path, "manifest.json")) as f:
        m = json.load(f)
    assert m["format"] == "pockengine-artifact" and m["target"] == "host"
    assert [b["name"] for b in m["signature"]["batch"]] == ["x", "target"]
    assert [p["name"] for p in m["parameters"]] == [n for n, _ in MLP().named_parameters()]
    assert m["tvm_target"]["kind"] == "llvm" and m["versions"]["tvm"].startswith("0.27")
    assert m["optimizer"]["kind"] == "Adam" and m["memory"]["peak_bytes"] > 0


def test_truncated_library_is_reported(artifact, tmp_path):
    path = copy_artifact(artifact[0], tmp_path)
    lib = os.path.join(path, "train_step.so")
    with open(lib, "r+b") as f:
        f.truncate(os.path.getsize(lib) // 2)
    with pytest.raises(ArtifactError, match="train_step.so is corrupt or truncated"):
        pe.load(path)


def test_corrupt_manifest_is_reported(artifact, tmp_path):
    path = copy_artifact(artifact[0], tmp_path)
    with open(os.path.join(path, "manifest.json"), "w") as f:
        f.write('{"format": "pockengine-artifact", "signat')
    with pytest.raises(ArtifactError, match="manifest.json is corrupt or truncated"):
        pe.load(path)


def test_truncated_state_is_reported(artifact, tmp_path):
    path = copy_artifact(artifact[0], tmp_path)
    state = os.path.join(path, "state.npz")
    with open(state, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ArtifactError, match="state.npz is corrupt or truncated"):
        pe.load(path)


def test_missing_artifact_is_reported(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        pe.load(str(tmp_path / "nothing"))


def test_export_replaces_an_artifact_and_a_failed_export_keeps_the_old_one(artifact, tmp_path, monkeypatch):
    path = copy_artifact(artifact[0], tmp_path)
    program = pe.load(path)
    program.step(*BATCHES[0])
    program.export(path)  # over an existing artifact
    np.testing.assert_array_equal(pe.load(path).state_dict()["net.0.weight"], program.state_dict()["net.0.weight"])
    before = open(os.path.join(path, "state.npz"), "rb").read()
    program.step(*BATCHES[1])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pockengine.runtime._write_json", crash)
    with pytest.raises(OSError, match="disk full"):
        program.export(path)
    assert open(os.path.join(path, "state.npz"), "rb").read() == before
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n], "temporary directory left behind"
    pe.load(path)


def test_step_rejects_wrong_shape_dtype_and_count():
    program, _ = make_program()
    x, y = BATCHES[0]
    with pytest.raises(InputError, match=r"input 0 \(x\): expected shape \(8, 32\) dtype float32, got shape \(4, 32\)"):
        program.step(x[:4], y)
    with pytest.raises(InputError,
                       match=r"input 0 \(x\): expected shape \(8, 32\) dtype float32, got .* dtype float64"):
        program.step(x.double(), y)
    with pytest.raises(InputError, match=r"input 1 \(target\).*dtype int64, got shape \(8,\) dtype int32"):
        program.step(x, y.int())
    with pytest.raises(InputError, match=r"step\(\) takes 2 arrays \(x, target\), got 1"):
        program.step(x)
    assert program.steps_taken == 0


def test_the_library_called_directly_still_checks_what_enters_the_step(artifact):
    """The kernels are built without TIR's argument checks (ir.without_kernel_argument_checks);
    the step's entry keeps its own: an application calling train_step through TVM's VM with a wrong
    shape or dtype gets an error, not a step on misread memory."""
    import tvm
    from tvm import relax

    path, _, _ = artifact
    vm = relax.VirtualMachine(tvm.runtime.load_module(os.path.join(path, "train_step.so")), tvm.cpu())
    with np.load(os.path.join(path, "state.npz")) as saved:
        state = [tvm.runtime.tensor(saved[s.name]) for s in pe.load(path).signature.state]
    x, y = (t.numpy() for t in BATCHES[0])
    loss = vm["train_step"](tvm.runtime.tensor(x), tvm.runtime.tensor(y), *state)[0]
    assert np.isfinite(loss.numpy())
    for bad_x, bad_y, fault in ((x[:4], y, "shape"), (x.astype("float64"), y, "dtype"), (x, y[:4], "shape")):
        with pytest.raises(Exception, match=f"match_cast error|expect Tensor with {fault}"):
            vm["train_step"](tvm.runtime.tensor(bad_x), tvm.runtime.tensor(bad_y), *state)


class RemembersItsInput(torch.nn.Module):
    """A buffer the forward reads, then sets to the batch: the step returns a tensor with the input's
    shape and dtype that may be the input tensor itself."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(32, 10)
        self.register_buffer("last", torch.zeros(8, 32))

    def forward(self, x):
        out = self.fc(x + self.last)
        self.last.copy_(x)
        return out


class RemembersItsInputFlat(RemembersItsInput):
    """The same through a reshape (a view of the input where the VM does not copy)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("last", torch.zeros(256))

    def forward(self, x):
        out = self.fc(x + self.last.reshape(8, 32))
        self.last.copy_(x.flatten())
        return out


@pytest.mark.parametrize("checked", [True, False], ids=["checked", "compiled without checks"])
@pytest.mark.parametrize("model", [MLP, RemembersItsInput, RemembersItsInputFlat])
def test_batches_of_successive_steps_do_not_mix(model, checked):
    """Each batch is copied into input tensors the program keeps (Program._batch_buffers), unless the
    step returns one of them as state. Three different batches, at PyTorch's values; the inputs are
    handed over as strided views (every other element of a wider tensor), copied as they are. The
    step's own checks gate every new value (autodiff/guards.py), a copy: only a step compiled
    without them returns its input."""
    torch.manual_seed(0)
    reference = model().double()
    batches = [(x.double(), y) for x, y in BATCHES[:3]]
    ours = model().double()
    ours.load_state_dict(reference.state_dict())
    job = pe.TrainingJob(ours, (batches[0][0],), batches[0][1], "cross_entropy", pe.optim.SGD(lr=0.1, momentum=0.9))
    with contextlib.nullcontext() if checked else compiled_without_checks():
        program = pe.compile(job, {"kind": "llvm", "opt-level": 0})
    strided = [torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0] for x, _ in batches]
    assert not strided[0].is_contiguous() and torch.equal(strided[0], batches[0][0])
    losses = [program.step(x, y) for x, (_, y) in zip(strided, batches)]
    assert (program._batch_buffers is None) == (model is not MLP and not checked)
    expected = train_torch(reference, pe.optim.SGD(lr=0.1, momentum=0.9), batches)
    np.testing.assert_allclose(losses, expected, rtol=1e-10)
    worst, where = max_scaled_diff(program.state_dict(), reference.state_dict())
    assert worst < 1e-10, where


def test_time_step_trains_nothing():
    program, _ = make_program()
    x, y = BATCHES[0]
    before = program.state_dict()
    assert program.time_step(x, y, repeats=3) > 0
    assert program.steps_taken == 0
    for k, v in program.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    with pytest.raises(InputError, match=r"input 0 \(x\)"):
        program.time_step(x[:4], y)


def test_state_dict_round_trip_and_errors():
    program, model = make_program()
    sd = {k: v.numpy() * 0.5 for k, v in model.state_dict().items()}
    program.load_state_dict(sd)
    for k, v in program.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
    with pytest.raises(StateError, match=r"unexpected keys \['net.9.weight'\]"):
        program.load_state_dict({**sd, "net.9.weight": np.zeros(3)})
    with pytest.raises(StateError, match=r"missing keys \['net.4.bias'\]"):
        program.load_state_dict({k: v for k, v in sd.items() if k != "net.4.bias"})
    program.load_state_dict({"net.4.bias": torch.zeros(10)}, strict=False)  # torch tensors too
    with pytest.raises(StateError, match=r"net.0.weight has shape \(3, 3\), the program expects \(64, 32\)"):
        program.load_state_dict({"net.0.weight": np.zeros((3, 3))}, strict=False)


def test_learning_rate_schedule_matches_torch_scheduler():
    program, model = make_program()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for x, y in BATCHES:
        program.step(x, y)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        program.lr = sched.get_last_lr()[0]
    assert program.lr == pytest.approx(1e-2 * 0.5 ** 3)
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict())
    assert worst < 1e-5, where


def test_program_runs_its_kernels_on_all_the_available_cpus():
    """TVM's thread pool would otherwise take half the CPUs on x86 (one on a 2-core machine); the
    step's governor starts from all of them (tests/test_threads.py: the rest of the pool settings)."""
    script = textwrap.dedent("""
        import os, torch, tvm, pockengine as pe
        from torch import nn
        job = pe.TrainingJob(nn.Linear(4, 2), (torch.randn(8, 4),), torch.randint(0, 2, (8,)), "cross_entropy",
                             pe.optim.SGD(lr=0.1))
        program = pe.compile(job, target={"kind": "llvm", "num-cores": 2})
        program.step(torch.randn(8, 4), torch.randint(0, 2, (8,)))
        print(program._governor.counts[0])
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split()[-1] == str(len(os.sched_getaffinity(0)))
