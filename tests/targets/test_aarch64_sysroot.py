"""aarch64: a training step cross-compiled for a Cortex-A72, run under qemu-aarch64 in the fetched
sysroot, gives the host's results. The first run downloads the sysroot (~130 MB, ~30 s)."""

import re
import subprocess
import textwrap
import time

import numpy as np
import pytest
import tvm
from tvm import relax

from pockengine.errors import TargetError, ToolchainError
from pockengine.targets import aarch64_sysroot

A72 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"], "num-cores": 4}
SHAPES = {"x": (8, 16), "w1": (16, 32), "b1": (32,), "w2": (32, 10)}

# Runs inside the emulated aarch64 Python. With TVM_USE_RUNTIME_LIB=1 `tvm.relax` is not importable
# (it registers compiler ops); the VM lives in tvm.runtime.vm.
GUEST = textwrap.dedent("""
    import sys, time
    started = time.perf_counter()
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine
    imported = time.perf_counter()
    vm = VirtualMachine(tvm.runtime.load_module(sys.argv[1]), tvm.cpu())
    inputs = np.load(sys.argv[2])
    args = [tvm.runtime.tensor(inputs[name]) for name in sys.argv[4:]]
    loss, grads = vm["main_adjoint"](*args)
    ran = time.perf_counter()
    np.savez(sys.argv[3], loss=loss.numpy(), **{f"grad{i}": g.numpy() for i, g in enumerate(grads)})
    print(f"guest: import {imported - started:.2f} s, load + run {ran - imported:.2f} s")
""")


def training_step():
    """Loss and gradients of a 2-layer MLP with cross-entropy: matmul, add, relu, log_softmax, nll_loss
    forward and their gradients, with an integer input (labels) next to the float ones."""
    bb = relax.BlockBuilder()
    params = {name: relax.Var(name, relax.TensorType(shape, "float32")) for name, shape in SHAPES.items()}
    labels = relax.Var("labels", relax.TensorType((8,), "int64"))
    x, w1, b1, w2 = params.values()
    with bb.function("main", [*params.values(), labels]):
        with bb.dataflow():
            hidden = bb.emit(relax.op.nn.relu(relax.op.add(relax.op.matmul(x, w1), b1)))
            logits = bb.emit(relax.op.matmul(hidden, w2))
            loss = bb.emit_output(relax.op.nn.nll_loss(relax.op.nn.log_softmax(logits), labels))
        bb.emit_func_output(loss)
    return relax.transform.Gradient("main", require_grads=[w1, b1, w2])(bb.get())


def test_step_under_qemu_matches_host(sysroot, tmp_path):
    mod = training_step()
    library = tmp_path / "step.so"
    relax.build(mod, target=tvm.target.Target(A72)).export_library(
        str(library), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++"))
    assert library.read_bytes()[18:20] == (183).to_bytes(2, "little"), "not an AArch64 ELF"

    rng = np.random.default_rng(0)
    inputs = {name: rng.standard_normal(shape).astype("float32") for name, shape in SHAPES.items()}
    inputs["labels"] = rng.integers(0, 10, 8).astype("int64")
    np.savez(tmp_path / "inputs.npz", **inputs)
    (tmp_path / "guest.py").write_text(GUEST)

    started = time.perf_counter()
    done = subprocess.run(sysroot.command([str(tmp_path / "guest.py"), str(library), str(tmp_path / "inputs.npz"),
                                           str(tmp_path / "outputs.npz"), *inputs]),
                          env=sysroot.environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout.strip(), f"(whole emulated process {time.perf_counter() - started:.1f} s)")

    vm = relax.VirtualMachine(relax.build(mod, target="llvm"), tvm.cpu())
    loss, grads = vm["main_adjoint"](*[tvm.runtime.tensor(a) for a in inputs.values()])
    guest = np.load(tmp_path / "outputs.npz")
    np.testing.assert_allclose(guest["loss"], loss.numpy(), rtol=1e-5, atol=1e-5)
    assert len(grads) == 3
    for i, grad in enumerate(grads):
        np.testing.assert_allclose(guest[f"grad{i}"], grad.numpy(), rtol=1e-5, atol=1e-5)


def test_second_call_uses_the_cache(sysroot):
    started = time.perf_counter()
    again = aarch64_sysroot.ensure_sysroot(progress=None)
    assert again == sysroot and time.perf_counter() - started < 1.0
    assert not list(sysroot.root.parent.parent.glob(f".{sysroot.root.parent.name}.tmp-*")), "temporary build left"


def test_missing_qemu_is_a_target_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without qemu-aarch64
    with pytest.raises(ToolchainError, match="apt-get install qemu-user"):
        aarch64_sysroot.ensure_sysroot(progress=None)


def test_network_failure_names_the_url(tmp_path):
    url = "http://127.0.0.1:9/debian/dists/bookworm/InRelease"  # the discard port: connection refused
    with pytest.raises(TargetError, match=re.escape(url)):
        aarch64_sysroot._download(url, tmp_path / "InRelease", progress=None)
