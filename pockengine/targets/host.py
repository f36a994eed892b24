"""The host family: this machine's CPU. The step is a shared library the Program loads and runs here.

CPU lowering (shared with aarch64): TVM's CPU pipeline; frozen weights as the panels schedule_cpu's
matmuls read; untuned kernels get schedule_cpu's default schedule (after inline_elementwise), every
kernel fast_math. Only here can heavy ops run on PyTorch's kernels (`--backend library|auto`): the
backend measurement is here too (`measure_backends`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tvm
from tvm import relax

from .. import pipeline, torch_kernels
from ..artifact_files import LIBRARY
from ..autodiff.step import STEP_FUNC
from ..errors import InputError
from ..ir import static_shape, without_kernel_argument_checks
from ..passes.fast_math import fast_math
from ..passes.inline_elementwise import inline_elementwise
from ..passes.schedule_cpu import schedule_cpu
from ..passes.schedule_int8_dot import schedule_int8_dot
from ..passes.switch_backend import MODES, Choice, heavy_ops, library_kernels
from ..timing import median_ms
from ..tuning.database import open_logs
from .family import BuildRequest, Built, Family, note, removed_on_error, scratch_directory


def _cpu_dispatch(target) -> list:
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    return cpu.library_dispatch_passes(target)


def _cpu_dataflow(target) -> list:
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    return cpu.dataflow_lower_passes(target)


def _cpu_schedules(preset, _target, _notes) -> list:
    """The default schedule of every fused kernel not tuned: int8 dot products as VNNI instructions,
    the rest one loop nest with threads and vectors."""
    lanes = preset.vector_lanes(32)
    return [schedule_int8_dot(preset.cores), inline_elementwise(lanes, preset.vector_registers),
            schedule_cpu(lanes, preset.cores, preset.vector_registers)]


def _cpu_finish() -> list:
    """exp/erf/tanh/sigmoid as vectorizable polynomials in every kernel, tuned ones too."""
    return [fast_math()]


CPU_LOWERING = pipeline.Lowering(dispatch=_cpu_dispatch, schedule=_cpu_schedules, dataflow=_cpu_dataflow,
                                 finish_kernels=_cpu_finish, packs_frozen_weights=True)


class CpuFamily(Family):
    """A CPU of the LLVM backend: lowering and build shared by the host and aarch64 families, which
    differ in how the library is linked (`export`) and where it runs."""

    lowering = CPU_LOWERING

    def export(self, executable, scratch: str) -> dict:
        """Write the library (and what the artifact needs beside it) -> {name in the artifact: path}."""
        raise NotImplementedError

    def build(self, request: BuildRequest) -> list:
        preset, derived = request.preset, request.derived
        with pipeline.stage("lower", request.progress, request.origins):
            choices = self.backend_choices(request)
            lowered = pipeline.lower(derived.step_mod, derived.signature, preset, self.lowering,
                                     request.tuning_logs, choices)
        with pipeline.stage("memory plan", request.progress, request.origins):
            report = pipeline.memory_report(lowered.mod, derived)
        with pipeline.stage("codegen", request.progress, request.origins):
            first = self._codegen(request, lowered, report, choices)
        if not (request.backend == "auto" and library_kernels(choices)):
            return [first]
        # Each op was timed alone. In the step a library call also hands the cores from TVM's
        # thread pool to PyTorch's and back, and loses the epilogue fusion would have put in TVM's
        # kernel: measured here, switching can make the whole step slower (MobileNetV2 100 -> 121
        # ms). So the whole step is built without library kernels too, and the build keeps the
        # faster (build.compile times both).
        note(request.progress, "[auto] building the step without library kernels too, timing both ...")
        all_tvm = [dataclasses.replace(c, backend="tvm") for c in choices]
        lowered = pipeline.lower(derived.step_mod, derived.signature, preset, self.lowering, request.tuning_logs,
                                 all_tvm)
        report = pipeline.memory_report(lowered.mod, derived)
        return [first, self._codegen(request, lowered, report, all_tvm)]

    def backend_choices(self, request: BuildRequest) -> list:
        """The heavy ops and the backend each runs on (measured under --backend auto)."""
        return measure_backends(request.derived.step_mod[STEP_FUNC], request.preset, request.backend,
                                request.tuning_logs)

    def _codegen(self, request: BuildRequest, lowered, report, choices) -> Built:
        target = self.lowering.tvm_target(request.preset)
        final = pipeline.finalize(lowered.mod, target)
        with without_kernel_argument_checks():
            executable = relax.build(final, target=target, relax_pipeline=None)
        meta = {"tuning": lowered.tuning.to_json(),
                "backend": {"mode": request.backend, "library_kernels": library_kernels(choices),
                            "choices": [c.to_json() for c in choices]}}
        scratch = scratch_directory()
        with removed_on_error(scratch):
            files = self.export(executable, scratch)
        library = files[LIBRARY] if self.runs_here({"family": self.name}) else None
        return Built(files, lowered.signature, request.derived.state_for(lowered.signature), report, meta, scratch,
                     library)

    def summary(self, meta: dict, detailed: bool = False) -> str | None:
        return backend_summary(meta["backend"], table=detailed) if "backend" in meta else None


class HostFamily(CpuFamily):
    name = "host"

    def check_options(self, preset, backend: str) -> None:
        if backend not in MODES:
            raise InputError(f"backend must be one of {', '.join(MODES)}, got {backend!r}")

    def export(self, executable, scratch: str) -> dict:
        # LLVM emits machine code when the library is written; doing it once here (instead of a JIT
        # link for the VM and again on export) halves the build. The Program owns the file.
        library = os.path.join(scratch, LIBRARY)
        executable.export_library(library)
        return {LIBRARY: library}

    def runs_here(self, manifest: dict) -> bool:
        return True


def backend_summary(backend: dict, table: bool = False) -> str:
    """Which heavy ops run on library kernels (backend switching), with the measured times."""
    choices = backend["choices"]
    on_library = sum(c["calls"] for c in choices if c["backend"] == "library")
    total = sum(c["calls"] for c in choices)
    text = f"backend: {backend['mode']}; {on_library} of {total} heavy op calls on library kernels"
    if "step_ms" in backend:  # auto: the whole step timed with the switched ops and without
        times = backend["step_ms"]
        kept = "switched" if on_library else "all TVM"
        text += f" (whole step: switched {times['switched']:.1f} ms, all TVM {times['tvm']:.1f} ms; kept {kept})"
    if table and any(c["tvm_ms"] is not None for c in choices):
        text += f"\n  {'op':<58}{'shapes':<36}{'calls':>6}{'tvm ms':>9}{'lib ms':>9}  chosen"
        for c in choices:
            shapes = " ".join("x".join(map(str, s)) for s in c["shapes"])
            text += (f"\n  {c['kernel'].split('.', 2)[-1][:56]:<58}{shapes[:34]:<36}{c['calls']:>6}"
                     f"{c['tvm_ms']:>9.3f}{c['library_ms']:>9.3f}  {c['backend']}")
    return text


# ---------------------------------------------------------------------- backend measurement


def measure_backends(func, preset, mode: str = "auto", tuning_logs=(), repeats: int = 10) -> list[Choice]:
    """Choose a backend for every distinct heavy op of `func` (mode "auto": by measuring both;
    "tvm" / "library": forced, nothing measured)."""
    if mode not in MODES:
        raise InputError(f"backend must be one of {', '.join(MODES)}, got {mode!r}")
    database = open_logs(list(tuning_logs)) if mode == "auto" else None
    choices = []
    for (kernel, shapes), calls in heavy_ops(func).items():
        choice = Choice(kernel, [list(s) for s in shapes], len(calls), mode)
        if mode == "auto":
            choice.tvm_ms = _time_tvm(calls[0], preset, database, repeats)
            choice.library_ms = _time_library(calls[0], kernel, repeats)
            choice.backend = "library" if choice.library_ms < choice.tvm_ms else "tvm"
        choices.append(choice)
    return choices


def _time_tvm(call, preset, database, repeats: int) -> float:
    """Build the op alone through the build's own kernel phases (pipeline.kernels) and time it."""
    params = [relax.Var(f"arg{i}", a.ty) for i, a in enumerate(call.args)]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(relax.Call(call.op, params, call.attrs, call.ty_args))
        bb.emit_func_output(out)
    target = CPU_LOWERING.tvm_target(preset)
    mod = pipeline.kernels(bb.get(), preset, CPU_LOWERING, database)
    with without_kernel_argument_checks():  # as the step's kernels are built
        vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal(static_shape(a)).astype(str(a.ty.dtype))) for a in call.args]
    evaluator = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=repeats, min_repeat_ms=0)
    return float(np.median(evaluator(*args).results)) * 1e3


def _time_library(call, kernel: str, repeats: int) -> float:
    import torch

    fn = torch_kernels.implementation(kernel)
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, str(call.ty.dtype))
    args = [torch.randn(static_shape(a), generator=g, dtype=dtype) for a in call.args]
    out = torch.empty(static_shape(call), dtype=dtype)
    return median_ms(lambda: fn(*args, out), repeats, warmup=1)


FAMILY = HostFamily()
