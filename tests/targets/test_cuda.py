"""CUDA target without a GPU: the whole training step (MLP and a MobileNetV2-style CNN) becomes GPU
kernels only, compiles to PTX/machine code for the Jetson Orin's sm_87 and exports for its aarch64
host; a kernel left for the host CPU is an error that names it; tuning records come before dlight.
Builds go through the CUDA family (pe.compile); the kernel-level checks lower through the pipeline
with the family's Lowering."""

import dataclasses
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
from pockengine import pipeline
from pockengine.analysis.memory_plan import planned_storage
from pockengine.artifact_files import LIBRARY, PTX_FILE, SOURCE_FILE
from pockengine.autodiff.step import STEP_FUNC
from pockengine.errors import TargetError
from pockengine.job import load_job
from pockengine.targets import resolve
from pockengine.targets.cuda import device, family, kernel_check, nvcc, schedules
from pockengine.targets.families import family as family_of
from pockengine.tuning import database

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not on PATH")

ELF_MACHINE = {b"\xb7\x00": "aarch64", b"\x3e\x00": "x86_64"}
CROSS = "aarch64-linux-gnu-g++"
ORIN = "jetson-orin"
MLP = os.path.join(ROOT, "examples", "mlp_digits", "train.py")


def derived(job):
    imported = pipeline.import_model(job)
    step_mod, signature, _ = pipeline.derive_step(imported, job.optimizer, job.plan(imported))
    return step_mod, signature


def lowered_for(step, rules=None, tuning_logs=()) -> pipeline.Lowered:
    """The step lowered by the CUDA family's Lowering for the Orin (with only `rules` of dlight, if given)."""
    lowering = family.LOWERING
    if rules is not None:
        lowering = dataclasses.replace(
            lowering, schedule=lambda _preset, target, notes: [schedules.default_schedules_pass(target, notes, rules)])
    return pipeline.lower(step[0], step[1], resolve(ORIN), lowering, tuning_logs)


def orin_target():
    return family.LOWERING.tvm_target(resolve(ORIN))


@pytest.fixture(scope="module")
def mlp_step():
    return derived(load_job(MLP))


@pytest.fixture(scope="module")
def mlp_program():
    if shutil.which(CROSS) is None:
        pytest.skip(f"{CROSS} (Debian g++-aarch64-linux-gnu) is not installed: no aarch64 host code")
    return pe.compile(load_job(MLP), ORIN)


def small_mobilenetv2_job():
    # The example's MobileNetV2 cut to its stem and first two stages (one inverted residual with a
    # skip connection among them): every kind of kernel of the full network (conv, depthwise conv,
    # BatchNorm, ReLU6, their gradients) at a build time a test can afford (the full network at
    # 64x64 takes ~70 s to lower and build on 2 cores).
    torch.manual_seed(0)
    model = mobilenetv2(width_mult=0.35, num_classes=10, stages=[(1, 16, 1, 1), (6, 24, 2, 2)], last_channel=128)
    return pe.TrainingJob(model, (torch.randn(2, 3, 32, 32),), torch.randint(0, 10, (2,)), "cross_entropy",
                          pe.optim.SGD(lr=0.05, momentum=0.9, weight_decay=4e-5), name="mobilenetv2_small")


def kernel_names(lowered) -> list:
    return [gv.name_hint for gv, f in lowered.mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


def assert_all_gpu(program, lowered):
    """Every kernel of the lowered step is bound to GPU threads, was scheduled, and is one (at least)
    CUDA __global__ function of the program's kernels.cu; the build counted the same kernels."""
    kernels = kernel_names(lowered)
    assert kernels and program.meta["cuda"]["kernels"] == len(kernels)
    assert kernel_check.host_kernels(lowered.mod) == {}
    assert None not in lowered.notes[schedules.REPORT].schedules.values()
    with open(program.files[SOURCE_FILE]) as f:
        source = f.read()
    for name in kernels:
        assert f" {name}_kernel(" in source or f" {name}_kernel_" in source


def ptx_of(program) -> bytes:
    with open(program.files[PTX_FILE], "rb") as f:
        return f.read()


def assert_ptx_for_sm87(ptx: bytes):
    header = nvcc.ptx_header(ptx)
    assert header["target"] == "sm_87" and header["address_size"] == "64"
    assert b".entry" in ptx


def elf_machine(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF"
    return ELF_MACHINE.get(head[18:20], repr(head[18:20]))


def test_mlp_step_builds_for_jetson_orin(mlp_program, mlp_step, tmp_path):
    lowered = lowered_for(mlp_step)
    assert_all_gpu(mlp_program, lowered)
    assert_ptx_for_sm87(ptx_of(mlp_program))
    # One arena on the GPU and every parameter/momentum updated in place (nothing returned beside
    # the loss and the step counter but the scalars).
    pool, storages, unplanned = planned_storage(lowered.mod[STEP_FUNC])
    assert storages == 1 and pool > 0 and unplanned <= 16
    assert mlp_program.memory_report().n_storages == 1
    out = mlp_program.export(str(tmp_path / "orin"))
    assert elf_machine(os.path.join(out, LIBRARY)) == "aarch64"
    with open(os.path.join(out, PTX_FILE), "rb") as f:
        assert f.read() == ptx_of(mlp_program)
    with open(os.path.join(out, LIBRARY), "rb") as f:
        assert b"\x50\xed\x55\xba" in f.read()  # the fatbin (sm_87 code + PTX) is embedded


def test_x86_host_variant_exports_a_library_that_loads_back(mlp_step, tmp_path):
    target = {"kind": "cuda", "arch": "sm_87"}  # host: LLVM for this machine
    program = pe.compile(load_job(MLP), target)
    assert_ptx_for_sm87(ptx_of(program))
    out = program.export(str(tmp_path / "x86"))
    assert elf_machine(os.path.join(out, LIBRARY)) == "x86_64"
    loaded = tvm.runtime.load_module(os.path.join(out, LIBRARY))
    module = nvcc.cuda_module(loaded)
    assert module.is_runnable()  # compiled kernels, not the CUDA source a runtime-less TVM embeds
    assert module.implements_function(kernel_names(lowered_for(mlp_step))[0] + "_kernel")


def test_small_mobilenetv2_step_builds_for_jetson_orin():
    if shutil.which(CROSS) is None:
        pytest.skip(f"{CROSS} (Debian g++-aarch64-linux-gnu) is not installed: no aarch64 host code")
    program = pe.compile(small_mobilenetv2_job(), ORIN)
    assert_ptx_for_sm87(ptx_of(program))
    gpu = program.meta["cuda"]
    assert gpu["kernels"] > 100 and gpu["kernels"] == sum(gpu["schedules"].values())
    assert "unscheduled" not in gpu["schedules"]
    # dlight's Matmul rule raises on a conv weight-gradient kernel of MobileNetV2: the next rule
    # (Fallback) must take it instead of the whole module failing.
    assert gpu["schedules"].get("Fallback", 0) > 0
    assert program.memory_report().n_storages == 1


def test_a_kernel_left_on_the_cpu_is_an_error_naming_it(mlp_step):
    # Without dlight's rules TVM would compile every unscheduled kernel for the host CPU.
    lowered = lowered_for(mlp_step, rules=[])
    with pytest.raises(TargetError, match="would run on the host CPU") as caught:
        kernel_check.gpu_kernels_check(lowered.mod, lowered.notes[schedules.REPORT])
    left = caught.value.host_kernels
    # the MLP's matmuls (x @ W^T: matmul_nt) are left; TOPI's GPU scatter is bound already
    assert any(name.startswith("matmul") for name in left) and "scatter_elements" not in left
    assert all(name in str(caught.value) for name in left)
    with pytest.raises(TargetError, match="would run on the host CPU"):
        nvcc.build_cuda(lowered.mod, orin_target())

    # Only the matmul rule: the elementwise kernels are reported, the matmuls are not.
    from tvm.s_tir import dlight as dl

    lowered = lowered_for(mlp_step, rules=[dl.gpu.Matmul()])
    with pytest.raises(TargetError) as caught:
        kernel_check.gpu_kernels_check(lowered.mod)
    left = caught.value.host_kernels
    assert not any(name.startswith("matmul") for name in left) and any(name.startswith("add") for name in left)


def test_tuning_record_comes_before_dlight(mlp_step, tmp_path):
    from tvm.s_tir import dlight as dl
    from tvm.s_tir import meta_schedule as ms

    target = orin_target()
    fused = pipeline.fused(mlp_step[0], mlp_step[1], resolve(ORIN), family.LOWERING)
    kernel = database.kernels(fused, target)[0]
    # A record as a GPU tuning run would leave it (no GPU here to measure one): a schedule that is
    # not what dlight's default gives this matmul kernel, so its use is visible.
    db = database.open_log(str(tmp_path), create=True)
    schedule = dl.gpu.Fallback().apply(kernel.mod["main"], target, False)
    db.commit_tuning_record(ms.database.TuningRecord(
        schedule.trace, db.commit_workload(kernel.mod), [1e-4], target,
        ms.arg_info.ArgInfo.from_prim_func(kernel.mod["main"])))
    lowered = lowered_for(mlp_step, tuning_logs=[str(tmp_path)])
    report = lowered.notes[schedules.REPORT]
    assert lowered.tuning.tuned
    assert set(lowered.tuning.tuned) <= {k for k, v in report.schedules.items() if v == "tuned"}
    assert report.counts()["tuned"] == 1 and report.counts()["Matmul"] >= 1
    kernel_check.gpu_kernels_check(lowered.mod)


def test_targets_and_running_without_a_gpu():
    with pytest.raises(TargetError, match="arch"):
        if not device.gpu_present():
            device.cuda_target({"kind": "cuda"})
        else:
            raise TargetError("arch detected from the device")
    with pytest.raises(TargetError, match="not cuda"):
        device.cuda_target({"kind": "llvm"})
    assert device.cuda_target({"kind": "cuda", "arch": "sm_87"}).host is not None
    assert str(orin_target().host.attrs["mtriple"]) == "aarch64-linux-gnu"
    if device.gpu_present():
        pytest.skip("a CUDA device is present")
    cuda = family_of("cuda")
    orin = {"family": "cuda", "tvm_target": resolve(ORIN).tvm_target}
    assert not cuda.runs_here(orin)
    assert "runs on an NVIDIA GPU (sm_87) beside an aarch64 CPU" in cuda.why_not_here(orin)
    here = {"family": "cuda", "tvm_target": {"kind": "cuda", "arch": "sm_87"}}
    assert not cuda.runs_here(here)
    assert "runs on an NVIDIA GPU (sm_87) and this machine has no CUDA device" in cuda.why_not_here(here)


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
    if not device.gpu_present():  # TVM would fall back to sm_50, which nvcc 13 no longer knows
        assert no_arch.returncode == 2 and "has no 'arch' and there is no GPU here" in no_arch.stderr

    program = pe.load(out)  # loads anywhere: the state can be read and changed
    assert not hasattr(program, "_vm") and set(program.state_dict()) == set(manifest["state_dict_keys"])
    if device.gpu_present():
        pytest.skip("a CUDA device is present: the no-GPU messages do not apply")
    ran = subprocess.run([cli, "run", out, "--steps", "2"], capture_output=True, text=True)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert "cannot run here: it runs on an NVIDIA GPU (sm_87) beside an aarch64 CPU" in ran.stderr
    runner = subprocess.run([sys.executable, os.path.join(out, "run_step.py"), out, "--steps", "1"],
                            capture_output=True, text=True)
    assert runner.returncode == 2 and "Traceback" not in runner.stderr
    assert "runs on an NVIDIA GPU (sm_87) and no CUDA device is visible here" in runner.stderr
