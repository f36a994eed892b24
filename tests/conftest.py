"""Shared test helpers: reference models, a PyTorch-eager trainer (the numerical oracle) and comparisons."""

import copy
import importlib.util
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pockengine as pe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore", category=FutureWarning)

# `pytest -n N`: the workers share the cores, so each one's kernels (TVM's thread pool) and PyTorch's
# get an equal share of them. With a thread per core in every worker, a step's parallel kernel waits
# for a pool thread that the other worker's compile has descheduled (TVM's pool spins: device_runner.ThreadGovernor).
# Tests never assert timings; the benchmarks set their own thread counts.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _SHARE = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("TVM_NUM_THREADS", str(_SHARE))
    torch.set_num_threads(_SHARE)

# The host preset uses LLVM -O3, whose machine-code emission dominates builds of untuned graphs
# (~1 min for MobileNetV2). Tests of the big models use -O0: same IR, same kernels, faster builds.
FAST_HOST = {"kind": "llvm", "num-cores": os.cpu_count() or 1, "opt-level": 0}


def load_example_module(relpath: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: dataclasses and pickling look the module up there
    spec.loader.exec_module(module)
    return module


def mobilenetv2(**kw):
    return load_example_module("examples/mobilenetv2/mobilenetv2.py", "mobilenetv2").MobileNetV2(**kw)


def bn_eval(model):
    """BatchNorm in eval mode (statistics frozen), as TinyTL and MCUNetV3 fine-tune on microcontrollers."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


class MLP(nn.Module):
    def __init__(self, d_in=32, hidden=64, classes=10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


def TransformerClassifier(**kw):
    return load_example_module("examples/transformer/model.py", "transformer_model").TransformerClassifier(**kw)


# name -> (model factory, input shape, number of classes)
MODELS = {
    "mlp": (MLP, (8, 32), 10),
    "mobilenetv2": (lambda: mobilenetv2(width_mult=0.35, num_classes=10), (4, 3, 32, 32), 10),
    "transformer": (TransformerClassifier, (4, 8, 16), 5),
}


def calibrated(model, batches):
    """`model` in eval mode with the BatchNorm statistics of `batches` (their cumulative average): a
    random-initialised BatchNorm's are 0 and 1, a degenerate start for quantization (pe.quantize.int8
    folds them into the convolutions)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval()


def make_batches(shape, classes, steps, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g, dtype=dtype), torch.randint(0, classes, (shape[0],), generator=g))
            for _ in range(steps)]


def train_torch(model, optimizer: pe.optim.Optimizer, batches, loss_fn=nn.functional.cross_entropy):
    """PyTorch eager, the oracle: the same steps with torch.optim's implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer.to_torch(params)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(model(*x) if isinstance(x, tuple) else model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_adapters_train_like_pytorch(program, losses, base, scheme, batches, optimizer, loss_fn):
    """A LoRA program on a quantized `base` against PyTorch training the same adapters (add_lora,
    same seed) on `base` with its weight-only layers dequantized (pe.quantize.dequantized; W8A8 ones
    stay): `losses` (the program's, on `batches`) and the adapters after, float64, 1e-9."""
    from pockengine.lora import add_lora

    reference = copy.deepcopy(base)
    add_lora(reference, **scheme.lora_spec)
    reference = pe.quantize.dequantized(reference)
    for name, param in reference.named_parameters():
        param.requires_grad_(name.endswith(("lora_A", "lora_B")))
    np.testing.assert_allclose(losses, train_torch(reference, optimizer, batches, loss_fn=loss_fn), rtol=1e-9)
    state = program.state_dict()
    adapters = {k: v for k, v in reference.state_dict().items() if "lora_" in k}
    worst, where = max_scaled_diff({k: state[k] for k in adapters}, adapters)
    assert worst <= 1e-9, f"{where} differs by {worst:.3g}"


def compile_and_train(model, optimizer, batches, target="host", loss="cross_entropy"):
    """(program, losses): compile a copy of `model` (the original stays untouched for the oracle)."""
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], loss, optimizer)
    program = pe.compile(job, target=target)
    losses = [program.step(x, y) for x, y in batches]
    return program, losses


def parity(model, batches, optimizer, loss="cross_entropy", loss_fn=nn.functional.cross_entropy):
    """Train a compiled copy of `model` and `model` itself (PyTorch eager) on `batches`; the losses must
    agree (1e-10 relative in float64, 1e-5 in float32). -> (program, (worst scaled difference, tensor))."""
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], loss, optimizer)
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(x, y) for x, y in batches]
    theirs = train_torch(model, optimizer, batches, loss_fn)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10 if batches[0][0].dtype == torch.float64 else 1e-5)
    return program, max_scaled_diff(program.state_dict(), model.state_dict())


def snapshot(directory) -> dict:
    """Every file under `directory` (relative path -> bytes)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def max_scaled_diff(ours: dict, theirs: dict, floor: float = 1.0) -> tuple[float, str]:
    """Largest |ours - theirs| / max(|theirs|_max, floor) over all tensors: relative for tensors of
    magnitude >= floor, absolute below (a tensor whose true value is ~0 has no meaningful relative error)."""
    worst, where = 0.0, ""
    assert set(ours) == set(theirs), f"keys differ: {set(ours) ^ set(theirs)}"
    for k, v in theirs.items():
        v = v.detach().numpy() if hasattr(v, "detach") else np.asarray(v)
        diff = float(np.abs(ours[k].astype(np.float64) - v.astype(np.float64)).max(initial=0.0))
        scaled = diff / max(float(np.abs(v).max(initial=0.0)), floor)
        if scaled > worst:
            worst, where = scaled, k
    return worst, where


def trains_on_device_like_the_host(program, job, batches, directory: str) -> dict:
    """Export `program` (`job` built for a device) to `directory`, train it on `batches` with
    `pockengine run` (under qemu-aarch64 here) and check the losses and the trained state against
    the host build's (the same kernels for another ISA: 1e-5). Returns the device's state_dict()."""
    import subprocess
    import sys

    out = program.export(os.path.join(directory, "device"))
    data = os.path.join(directory, "batches.npz")
    np.savez(data, x=np.stack([x.numpy() for x, _ in batches]), target=np.stack([y.numpy() for _, y in batches]))
    cli = os.path.join(os.path.dirname(sys.executable), "pockengine")
    ran = subprocess.run([cli, "run", out, "--steps", str(len(batches)), "--data", data, "--save"],
                         capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    losses = [float(line.split()[3]) for line in ran.stdout.splitlines() if line.startswith("step")]
    host = pe.compile(job, target=FAST_HOST)
    np.testing.assert_allclose(losses, [host.step(x, y) for x, y in batches], rtol=1e-5)
    device = pe.load(out).state_dict()
    worst, where = max_scaled_diff(device, host.state_dict())
    assert worst <= 1e-5, f"{where} differs from the host build by {worst:.3g}"
    return device


@pytest.fixture(scope="module")
def sysroot():
    """The aarch64 Python + TVM runtime run under qemu-aarch64 (fetched once, then cached)."""
    import shutil

    from pockengine.targets import aarch64_sysroot

    for tool, package in (("qemu-aarch64", "qemu-user"), ("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {package})")
    return aarch64_sysroot.ensure_sysroot()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def fused_step_module(job):
    """The job's train_step after TVM's legalisation and fusion (FuseOps, FuseTIR), before our
    post-fusion passes: what those passes receive."""
    import tvm

    from pockengine import pipeline
    from pockengine.targets.host import CPU_LOWERING

    imported = job.import_model()
    step_mod, _, _ = pipeline.derive_step(imported, job.optimizer, job.plan(imported))
    target = tvm.target.Target(FAST_HOST)
    with target:
        return tvm.transform.Sequential(pipeline.fusion_passes(CPU_LOWERING, target))(step_mod)
