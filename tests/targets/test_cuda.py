"""CUDA target without a GPU: the whole training step (MLP and a MobileNetV2-style CNN) becomes GPU
kernels only, compiles to PTX/machine code for the Jetson Orin's sm_87 and exports for its aarch64
host; a kernel left for the host CPU is an error that names it; tuning records come before dlight."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import tvm

import pockengine as pe
from conftest import ROOT, mobilenetv2
from pockengine import build, tuning
from pockengine.autodiff.step import STEP_FUNC
from pockengine.errors import TargetError
from pockengine.job import load_job
from pockengine.analysis.memory_plan import planned_storage
from pockengine.targets import cuda

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not on PATH")

ELF_MACHINE = {b"\xb7\x00": "aarch64", b"\x3e\x00": "x86_64"}
CROSS = "aarch64-linux-gnu-g++"


def derived(job):
    imported = build.import_model(job)
    step_mod, signature, _ = build.derive_step(imported, job.optimizer, job.plan(imported))
    return step_mod, signature


@pytest.fixture(scope="module")
def mlp_step():
    return derived(load_job(os.path.join(ROOT, "examples", "mlp_digits", "train.py")))


@pytest.fixture(scope="module")
def mlp_build(mlp_step):
    return cuda.compile_step(*mlp_step, target=cuda.JETSON_ORIN)


def small_mobilenetv2_job():
    # The example's MobileNetV2 cut to its stem and first two stages (one inverted residual with a
    # skip connection among them): every kind of kernel of the full network (conv, depthwise conv,
    # BatchNorm, ReLU6, their gradients) at a build time a test can afford (the full network at
    # 64x64 takes ~70 s to lower and build on 2 cores).
    torch.manual_seed(0)
    model = mobilenetv2(width_mult=0.35, num_classes=10, stages=[(1, 16, 1, 1), (6, 24, 2, 2)], last_channel=128)
    return pe.TrainingJob(model, (torch.randn(2, 3, 32, 32),), torch.randint(0, 10, (2,)), "cross_entropy",
                          pe.optim.SGD(lr=0.05, momentum=0.9, weight_decay=4e-5), name="mobilenetv2_small")


def assert_all_gpu(result):
    kernels = [gv.name_hint for gv, f in result.lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert sorted(result.kernels) == sorted(kernels) and kernels
    assert cuda.host_kernels(result.lowered) == {}
    assert None not in result.schedules.schedules.values()
    module = cuda.cuda_module(result.executable)
    assert module.is_runnable()  # compiled kernels, not the CUDA source a runtime-less TVM embeds
    source = module.inspect_source("")
    for name in kernels:  # each kernel became (at least) one CUDA __global__ function
        assert f" {name}_kernel(" in source or f" {name}_kernel_" in source


def assert_ptx_for_sm87(ptx: bytes):
    header = cuda.ptx_header(ptx)
    assert header["target"] == "sm_87" and header["address_size"] == "64"
    assert b".entry" in ptx


def elf_machine(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF"
    return ELF_MACHINE.get(head[18:20], repr(head[18:20]))


def test_mlp_step_builds_for_jetson_orin(mlp_build, tmp_path):
    assert_all_gpu(mlp_build)
    assert_ptx_for_sm87(mlp_build.ptx)
    # One arena on the GPU and every parameter/momentum updated in place (nothing returned beside
    # the loss and the step counter but the scalars).
    pool, storages, unplanned = planned_storage(mlp_build.lowered[STEP_FUNC])
    assert storages == 1 and pool > 0 and unplanned <= 16
    if shutil.which(CROSS) is None:
        pytest.skip(f"{CROSS} (Debian g++-aarch64-linux-gnu) is not installed: no aarch64 export")
    paths = cuda.export_cuda(mlp_build.executable, mlp_build.ptx, str(tmp_path / "orin"), cuda.JETSON_ORIN)
    assert elf_machine(paths["library"]) == "aarch64"
    with open(paths["ptx"], "rb") as f:
        assert f.read() == mlp_build.ptx
    with open(paths["library"], "rb") as f:
        assert b"\x50\xed\x55\xba" in f.read()  # the fatbin (sm_87 code + PTX) is embedded


def test_x86_host_variant_exports_a_library_that_loads_back(mlp_build, tmp_path):
    target = {"kind": "cuda", "arch": "sm_87"}  # host: LLVM for this machine
    executable, ptx = cuda.build_cuda(mlp_build.lowered, target)
    assert_ptx_for_sm87(ptx)
    paths = cuda.export_cuda(executable, ptx, str(tmp_path / "x86"), target)
    assert elf_machine(paths["library"]) == "x86_64"
    loaded = tvm.runtime.load_module(paths["library"])
    module = cuda.cuda_module(loaded)
    assert module.is_runnable() and module.implements_function(mlp_build.kernels[0] + "_kernel")


def test_small_mobilenetv2_step_builds_for_jetson_orin():
    result = cuda.compile_step(*derived(small_mobilenetv2_job()), target=cuda.JETSON_ORIN)
    assert_all_gpu(result)
    assert_ptx_for_sm87(result.ptx)
    assert len(result.kernels) > 100
    # dlight's Matmul rule raises on a conv weight-gradient kernel of MobileNetV2: the next rule
    # (Fallback) must take it instead of the whole module failing.
    assert result.schedules.counts().get("Fallback", 0) > 0
    assert planned_storage(result.lowered[STEP_FUNC])[1] == 1


def test_a_kernel_left_on_the_cpu_is_an_error_naming_it(mlp_step):
    target = cuda.cuda_target(cuda.JETSON_ORIN)
    # Without dlight's rules TVM would compile every unscheduled kernel for the host CPU.
    step_mod, signature = mlp_step
    lowered, report = cuda.gpu_lowering_with_report(step_mod, target, signature, schedule_rules=[])
    with pytest.raises(TargetError, match="would run on the host CPU") as caught:
        cuda.gpu_kernels_check(lowered, report)
    left = caught.value.host_kernels
    # the MLP's matmuls (x @ W^T: matmul_nt) are left; TOPI's GPU scatter is bound already
    assert any(name.startswith("matmul") for name in left) and "scatter_elements" not in left
    assert all(name in str(caught.value) for name in left)
    with pytest.raises(TargetError, match="would run on the host CPU"):
        cuda.build_cuda(lowered, target)

    # Only the matmul rule: the elementwise kernels are reported, the matmuls are not.
    from tvm.s_tir import dlight as dl

    lowered = cuda.gpu_lowering(step_mod, target, signature, schedule_rules=[dl.gpu.Matmul()])
    with pytest.raises(TargetError) as caught:
        cuda.gpu_kernels_check(lowered)
    left = caught.value.host_kernels
    assert not any(name.startswith("matmul") for name in left) and any(name.startswith("add") for name in left)


def test_tuning_record_comes_before_dlight(mlp_step, tmp_path):
    from tvm.s_tir import dlight as dl
    from tvm.s_tir import meta_schedule as ms

    target = cuda.cuda_target(cuda.JETSON_ORIN)
    with target:
        fused = tvm.transform.Sequential(cuda.fusion_passes(target))(mlp_step[0])
    kernel = tuning.kernels(fused, target)[0]
    # A record as a GPU tuning run would leave it (no GPU here to measure one): a schedule that is
    # not what dlight's default gives this matmul kernel, so its use is visible.
    db = tuning.open_log(str(tmp_path), create=True)
    schedule = dl.gpu.Fallback().apply(kernel.mod["main"], target, False)
    db.commit_tuning_record(ms.database.TuningRecord(
        schedule.trace, db.commit_workload(kernel.mod), [1e-4], target,
        ms.arg_info.ArgInfo.from_prim_func(kernel.mod["main"])))
    lowered, report = cuda.gpu_lowering_with_report(mlp_step[0], target, mlp_step[1], tuning_logs=[str(tmp_path)])
    assert report.tuning.tuned and set(report.tuning.tuned) <= {k for k, v in report.schedules.items() if v == "tuned"}
    assert report.counts()["tuned"] == 1 and report.counts()["Matmul"] >= 1
    cuda.gpu_kernels_check(lowered)


def test_targets_and_running_without_a_gpu():
    with pytest.raises(TargetError, match="arch"):
        if not cuda.gpu_present():
            cuda.cuda_target({"kind": "cuda"})
        else:
            raise TargetError("arch detected from the device")
    with pytest.raises(TargetError, match="not cuda"):
        cuda.cuda_target({"kind": "llvm"})
    assert cuda.cuda_target({"kind": "cuda", "arch": "sm_87"}).host is not None
    assert str(cuda.cuda_target(None).host.attrs["mtriple"]) == "aarch64-linux-gnu"
    if cuda.gpu_present():
        pytest.skip("a CUDA device is present")
    with pytest.raises(TargetError, match=r"runs on an NVIDIA GPU \(sm_87\) beside an aarch64 CPU"):
        cuda.require_gpu(cuda.JETSON_ORIN)
    with pytest.raises(TargetError, match=r"runs on an NVIDIA GPU \(sm_87\) and this machine has no CUDA device"):
        cuda.require_gpu({"kind": "cuda", "arch": "sm_87"})


def test_pockengine_build_for_jetson_then_run_says_plainly_there_is_no_gpu(tmp_path):
    """The user's path: `pockengine build --target jetson`, `pockengine run`, and the artifact's own
    runner as it would be started on the device."""
    if shutil.which(CROSS) is None:
        pytest.skip(f"{CROSS} (Debian g++-aarch64-linux-gnu) is not installed: no aarch64 host code")
    example = os.path.join(ROOT, "examples", "mlp_digits", "train.py")
    out = str(tmp_path / "orin")
    cli = os.path.join(os.path.dirname(sys.executable), "pockengine")
    built = subprocess.run([cli, "build", example, "--target", "jetson", "-o", out], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert "all bound to GPU threads" in built.stdout and "for sm_87" in built.stdout
    assert sorted(os.listdir(out)) == ["example.npz", "kernels.cu", "kernels.ptx", "manifest.json", "run_step.py",
                                       "state.npz", "train_step.so"]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["family"] == "cuda" and manifest["cuda"]["ptx"]["target"] == "sm_87"
    assert manifest["cuda"]["kernels"] == sum(manifest["cuda"]["schedules"].values()) > 10
    assert "unscheduled" not in manifest["cuda"]["schedules"]
    assert elf_machine(os.path.join(out, "train_step.so")) == "aarch64"
    assert_ptx_for_sm87(open(os.path.join(out, "kernels.ptx"), "rb").read())

    no_arch = subprocess.run([cli, "build", example, "--target", '{"kind": "cuda"}', "-o", str(tmp_path / "x")],
                             capture_output=True, text=True)
    if not cuda.gpu_present():  # TVM would fall back to sm_50, which nvcc 13 no longer knows
        assert no_arch.returncode == 2 and "has no 'arch' and there is no GPU here" in no_arch.stderr

    program = pe.load(out)  # loads anywhere: the state can be read and changed
    assert not hasattr(program, "_vm") and set(program.state_dict()) == set(manifest["state_dict_keys"])
    if cuda.gpu_present():
        pytest.skip("a CUDA device is present: the no-GPU messages do not apply")
    ran = subprocess.run([cli, "run", out, "--steps", "2"], capture_output=True, text=True)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert "cannot run here: it runs on an NVIDIA GPU (sm_87) beside an aarch64 CPU" in ran.stderr
    runner = subprocess.run([sys.executable, os.path.join(out, "run_step.py"), out, "--steps", "1"],
                            capture_output=True, text=True)
    assert runner.returncode == 2 and "Traceback" not in runner.stderr
    assert "runs on an NVIDIA GPU (sm_87) and no CUDA device is visible here" in runner.stderr
