"""switch_backend: heavy ops on PyTorch's kernels (forced or by measurement) give the same training as
TVM's kernels and as PyTorch eager; each library kernel computes exactly the Relax op it replaces."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import pockengine as pe
from conftest import FAST_HOST, MODELS, ROOT, make_batches, max_scaled_diff, mobilenetv2, train_torch
from pockengine import pipeline, torch_kernels
from pockengine.autodiff.step import STEP_FUNC
from pockengine.passes.switch_backend import heavy_ops, switch_backend
from pockengine.targets import resolve
from pockengine.targets.host import measure_backends

# float64, as tests/test_parity.py: rounding cannot hide a wrong kernel there (relative to each tensor's size)
FLOAT64_TOL = 1e-9
KERNEL_TOL = 1e-4


def op_cases():
    nn = relax.op.nn
    x = lambda *s: relax.Var("x", relax.TensorType(s, "float32"))
    w = lambda *s: relax.Var("w", relax.TensorType(s, "float32"))
    return {
        "matmul batched, broadcast": lambda: (relax.op.matmul, (x(2, 3, 5, 7), w(7, 4)), {}),
        "conv2d stride 2 pad 1": lambda: (nn.conv2d, (x(2, 6, 9, 9), w(4, 6, 3, 3)), dict(strides=2, padding=1)),
        "conv2d depthwise dilated": lambda: (nn.conv2d, (x(2, 6, 9, 9), w(6, 1, 3, 3)),
                                             dict(padding=2, dilation=2, groups=6)),
        "conv2d asymmetric pad": lambda: (nn.conv2d, (x(1, 3, 8, 8), w(2, 3, 3, 3)), dict(padding=(0, 1, 1, 2))),
        "conv2d weight-gradient layout": lambda: (nn.conv2d, (x(2, 6, 9, 9), w(2, 4, 5, 5)),
                                                  dict(padding=1, dilation=2, data_layout="CNHW",
                                                       kernel_layout="IOHW", out_layout="CNHW")),
        "conv2d weight-gradient layout, depthwise": lambda: (nn.conv2d, (x(12, 1, 9, 9), w(2, 6, 7, 7)),
                                                             dict(padding=1, groups=6, data_layout="CNHW",
                                                                  kernel_layout="IOHW", out_layout="CNHW")),
        "conv2d_transpose stride 2": lambda: (nn.conv2d_transpose, (x(2, 4, 5, 5), w(4, 6, 3, 3)),
                                              dict(strides=2, padding=1, output_padding=1)),
        "conv2d_transpose grouped": lambda: (nn.conv2d_transpose, (x(2, 6, 5, 5), w(6, 1, 3, 3)),
                                             dict(padding=1, groups=6)),
    }


@pytest.mark.parametrize("case", list(op_cases()))
def test_library_kernel_computes_the_relax_op(case):
    op, params, attrs = op_cases()[case]()
    bb = relax.BlockBuilder()
    with bb.function("main", list(params)):
        out = bb.emit(op(*params, **attrs))
        bb.emit_func_output(out)
    mod = bb.get()
    call = mod["main"].body.blocks[0].bindings[0].value
    name = torch_kernels.kernel_name(call)
    assert name is not None
    rng = np.random.default_rng(0)
    args = [rng.standard_normal([int(d) for d in p.ty.shape]).astype("float32") for p in params]
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(FAST_HOST)), tvm.cpu())
    expected = vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
    out = torch.empty(expected.shape)
    torch_kernels.implementation(name)(*[torch.from_numpy(a) for a in args], out)
    np.testing.assert_allclose(out.numpy(), expected, rtol=KERNEL_TOL, atol=KERNEL_TOL)


def test_ops_without_a_library_kernel_stay_on_tvm():  # PyTorch has no CPU half matmul kernel worth calling
    x = relax.Var("x", relax.TensorType((4, 4), "float16"))
    assert torch_kernels.kernel_name(relax.BlockBuilder().normalize(relax.op.matmul(x, x))) is None


def step_module(model, shape, classes):
    x, y = make_batches(shape, classes, 1)[0]
    job = pe.TrainingJob(copy.deepcopy(model), (x,), y, "cross_entropy", pe.optim.SGD(lr=0.01, momentum=0.9))
    imported = pipeline.import_model(job)
    return pipeline.derive_step(imported, job.optimizer, job.plan(imported))[0]


def test_forced_library_rewrites_every_heavy_op_and_forced_tvm_none():
    model, shape, classes = MODELS["mobilenetv2"]
    step = step_module(model(), shape, classes)
    func = step[STEP_FUNC]
    ops = heavy_ops(func)
    kinds = {kernel.split(":")[0].rsplit(".", 1)[-1] for kernel, _ in ops}
    assert kinds == {"matmul", "conv2d", "conv2d_cnhw", "conv2d_transpose"}
    preset = resolve(FAST_HOST)
    for mode, expected in (("library", sum(len(c) for c in ops.values())), ("tvm", 0)):
        after = switch_backend(measure_backends(func, preset, mode), STEP_FUNC)(step)[STEP_FUNC]
        packed = []
        relax.analysis.post_order_visit(after.body, lambda e: isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op)
                                        and e.op.name == "relax.call_dps_packed"
                                        and packed.append(e))  # noqa: B023 - called within this iteration
        assert len(packed) == expected
        assert len(heavy_ops(after)) == (0 if mode == "library" else len(ops))


def train_with(mode, model, batches, lr):
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], "cross_entropy",
                         pe.optim.SGD(lr=lr, momentum=0.9))
    program = pe.compile(job, FAST_HOST, backend=mode)
    for x, y in batches:
        program.step(x, y)
    return program


@pytest.mark.parametrize("model_name", ["transformer", "mobilenetv2"])
def test_switching_keeps_parity_with_pytorch(model_name):
    if model_name == "mobilenetv2":  # the regime where PyTorch agrees with itself (see tests/test_parity.py)
        model, shape, classes, lr = mobilenetv2(width_mult=0.35, num_classes=10), (8, 3, 48, 48), 10, 3e-4
    else:
        factory, shape, classes = MODELS[model_name]
        model, lr = factory(), 0.01
    model = model.double()
    batches = make_batches(shape, classes, 5, dtype=torch.float64)
    reference = copy.deepcopy(model)
    train_torch(reference, pe.optim.SGD(lr=lr, momentum=0.9), batches)
    # MobileNetV2 runs every convolution and its gradients on the library; the auto decision (per op,
    # then the whole step) is checked on the transformer: on MobileNetV2 it measures ~60 ops and
    # builds twice, a minute of CI for no path the transformer does not take.
    for mode in ("library", "auto") if model_name == "transformer" else ("library",):
        program = train_with(mode, model, batches, lr)
        backend = program.meta["backend"]
        if mode == "library":
            assert backend["library_kernels"] and all(c["backend"] == "library" for c in backend["choices"])
        else:  # every op was measured both ways and the faster one taken, if that made the step faster
            assert all(c["tvm_ms"] > 0 and c["library_ms"] > 0 for c in backend["choices"])
            per_op = all(c["backend"] == ("library" if c["library_ms"] < c["tvm_ms"] else "tvm")
                         for c in backend["choices"])
            if "step_ms" in backend:  # some op was faster on the library: the whole step decided
                times = backend["step_ms"]
                kept_switched = times["switched"] < times["tvm"]
                assert per_op if kept_switched else all(c["backend"] == "tvm" for c in backend["choices"])
            else:
                assert per_op and not backend["library_kernels"]
        worst, where = max_scaled_diff(program.state_dict(), reference.state_dict())
        assert worst < FLOAT64_TOL, (mode, worst, where)


def test_exported_artifact_with_library_kernels_runs_in_a_fresh_process(tmp_path):
    factory, shape, classes = MODELS["transformer"]
    model = factory()
    batches = make_batches(shape, classes, 3)
    program = train_with("library", model, batches[:1], 0.01)
    program.export(str(tmp_path / "art"))
    np.savez(tmp_path / "data.npz", **{s.name: np.stack([b[i].numpy() for b in batches[1:]])
                                        for i, s in enumerate(program.signature.batch)})
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    r = subprocess.run([sys.executable, "-m", "pockengine.cli", "run", str(tmp_path / "art"), "--steps", "2",
                        "--data", str(tmp_path / "data.npz")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    expected = [program.step(x, y) for x, y in batches[1:]]
    losses = [float(line.split()[3]) for line in r.stdout.splitlines() if line.startswith("step")]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    r = subprocess.run([sys.executable, "-m", "pockengine.cli", "inspect", str(tmp_path / "art")],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert "heavy op calls on library kernels" in r.stdout
    manifest = json.load(open(tmp_path / "art" / "manifest.json"))
    assert manifest["backend"]["library_kernels"] == program.meta["backend"]["library_kernels"]


def test_unknown_backend_is_a_clear_error():
    from pockengine.errors import InputError

    factory, shape, classes = MODELS["mlp"]
    x, y = make_batches(shape, classes, 1)[0]
    job = pe.TrainingJob(factory(), (x,), y, "cross_entropy", pe.optim.SGD(lr=0.01))
    with pytest.raises(InputError, match="tvm, library, auto"):
        pe.compile(job, FAST_HOST, backend="onednn")


def test_library_kernels_run_on_one_pytorch_thread_unless_openmp_threads_sleep(monkeypatch):
    """With OpenMP's default wait policy its idle threads would spin on TVM's cores after each
    library kernel (torch_kernels' docstring): the kernel then runs on one PyTorch thread, and
    PyTorch's thread count is as it was afterwards."""
    seen, matmul = [], torch.matmul
    monkeypatch.setattr(torch, "matmul",
                        lambda *args, **kw: (seen.append(torch.get_num_threads()), matmul(*args, **kw)))
    x, w, out = torch.randn(4, 3), torch.randn(3, 5), torch.empty(4, 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        torch_kernels.implementation("pockengine.torch.matmul")(x, w, out)
        monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
        torch_kernels.implementation("pockengine.torch.matmul")(x, w, out)
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out, x @ w)
