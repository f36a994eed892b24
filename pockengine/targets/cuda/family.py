"""The CUDA family: every kernel a GPU kernel (tuning records, else dlight) and checked to be bound to
GPU threads, the memory planned on the GPU, PTX for the target's arch by nvcc: no GPU is needed to
build. The result runs in this process only on a machine with a GPU and the target's host CPU."""

from __future__ import annotations

from ... import pipeline
from ...artifact_files import LIBRARY, PTX_FILE, RUNNER, SOURCE_FILE
from ...errors import TargetError
from ..aarch64 import runner_source_path
from ..family import BuildRequest, Built, Family, removed_on_error, scratch_directory
from .device import arch_of, cuda_target, gpu_present, host_runs_here, why_not_here
from .kernel_check import gpu_kernels_check
from .nvcc import build_cuda, export_cuda, ptx_header
from .schedules import REPORT, default_schedules_pass


def _dispatch(target) -> list:
    """TVM's CUDA pipeline up to fused, still unscheduled kernels (its legalize list ends with dlight;
    the schedules come after tuning records, in `_schedules`). Reductions over one element become
    assignments in the shared fusion phase: dlight's rules would otherwise inline an epilogue into
    them wrongly (see passes/drop_unit_reductions.py)."""
    from tvm.relax.backend.cuda import pipeline as cuda

    return cuda.library_dispatch_passes(target)


def _schedules(_preset, target, notes: dict) -> list:
    """dlight for every kernel without a tuning record. The CPU schedule passes (inline_elementwise,
    schedule_cpu, fast_math) are not used: dlight only recognises unscheduled kernels, and a kernel
    scheduled for CPU cores has no thread binding."""
    return [default_schedules_pass(target, notes)]


def _dataflow(target) -> list:
    """TVM's CUDA dataflow lowering. The pipeline's memory passes around it stay on the GPU:
    update_in_place only rewires Relax allocations (the kernel test reads the TIR's access pattern,
    which dlight's thread binding does not change), and plan_arena's single storage is allocated on
    virtual device 0 = the GPU (the VM's first device). Its sub-tensors at non-zero offsets go
    through vm.builtin.ensure_zero_offset, which shifts the data pointer without a copy on any device
    whose DeviceAPI supports pointer arithmetic on the host; TVM's CUDA DeviceAPI does, and the
    arena's 64-byte offsets are the runtime's allocation alignment (a copy would only happen otherwise)."""
    from tvm.relax.backend.cuda import pipeline as cuda

    return cuda.dataflow_lower_passes(target)


LOWERING = pipeline.Lowering(dispatch=_dispatch, schedule=_schedules, dataflow=_dataflow,
                             tvm_target=lambda preset: cuda_target(preset.target()))


class CudaFamily(Family):
    name = "cuda"
    lowering = LOWERING

    def build(self, request: BuildRequest) -> list:
        preset, derived = request.preset, request.derived
        target = self.lowering.tvm_target(preset)
        with pipeline.stage("lower", request.progress, request.origins):
            lowered = pipeline.lower(derived.step_mod, derived.signature, preset, self.lowering, request.tuning_logs)
            schedules = lowered.notes[REPORT]
            schedules.tuning = lowered.tuning
            kernels = gpu_kernels_check(lowered.mod, schedules)
        with pipeline.stage("memory plan", request.progress, request.origins):
            report = pipeline.memory_report(lowered.mod, derived)
        with pipeline.stage("codegen", request.progress, request.origins):
            executable, ptx = build_cuda(lowered.mod, target)
            scratch = scratch_directory()
            with removed_on_error(scratch):
                paths = export_cuda(executable, ptx, scratch, target)
        meta = {"tuning": lowered.tuning.to_json(),
                "cuda": {"arch": arch_of(target), "kernels": len(kernels), "schedules": schedules.counts(),
                         "ptx": ptx_header(ptx)}}
        files = {LIBRARY: paths["library"], PTX_FILE: paths["ptx"], SOURCE_FILE: paths["source"],
                 RUNNER: runner_source_path()}
        here = self.runs_here({"tvm_target": dict(target.export())})
        return [Built(files, lowered.signature, derived.state_for(lowered.signature), report, meta, scratch,
                      paths["library"] if here else None)]

    def runs_here(self, manifest: dict) -> bool:
        """On a machine with a GPU whose CPU is the target's host CPU (a Jetson for the jetson presets)."""
        return host_runs_here(manifest.get("tvm_target", {})) and gpu_present()

    def why_not_here(self, manifest: dict) -> str:
        return why_not_here(manifest.get("tvm_target", {}))

    def device(self, manifest: dict):
        import tvm

        device = tvm.cuda(0)
        if not device.exist:
            raise TargetError("this artifact runs on an NVIDIA GPU "
                              f"({manifest.get('tvm_target', {}).get('arch', '?')}); this machine has no CUDA "
                              "device. Copy the artifact to the GPU machine and run it there")
        return device

    def summary(self, meta: dict, detailed: bool = False) -> str | None:
        """Its kernels, which schedule each got, and the PTX it carries."""
        gpu = meta["cuda"]
        how = ", ".join(f"{count} {name}" for name, count in sorted(gpu["schedules"].items()))
        ptx = gpu["ptx"]
        return (f"GPU: {gpu['kernels']} kernels, all bound to GPU threads (schedules: {how}); "
                f"PTX {ptx.get('version', '?')} for {ptx.get('target', '?')} (kernels.ptx), machine code for "
                f"{gpu['arch']}")

    def run_status(self, preset) -> str | None:
        missing = ([] if host_runs_here(preset.tvm_target) else ["its host CPU"]) + (
            [] if gpu_present() else ["a CUDA device"])
        return "run: " + (f"not here (this machine lacks {' and '.join(missing)})" if missing
                          else "ready (a CUDA device is present)")


FAMILY = CudaFamily()
