"""The pipeline: TrainingJob -> compiled Program, stage by stage.

    import (frontend) -> autodiff (prune_backward + train_step) -> lower (legalize, fuse, plan memory) -> memory report
    -> codegen (TIR + VM executable)

Each stage takes the previous stage's value and returns a new one. `progress` receives
(stage index, stage count, name, seconds or None when it starts) so the CLI can show the build.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager

import tvm
from tvm import relax

from . import targets
from .autodiff.step import STEP_FUNC, StepSignature, build_train_step
from .analysis.memory_plan import memory_report
from .analysis.memory_timeline import timeline
from .errors import InternalCompilerError, PockEngineError, TargetError, UnsupportedOpError
from .frontend import FUNC_NAME, to_numpy
from .ir import without_kernel_argument_checks
from .passes.chunk_linear_log_prob import chunk_linear_log_prob
from .passes.drop_saved_activations import drop_saved_activations
from .passes.drop_unit_reductions import drop_unit_reductions
from .passes.fast_math import fast_math
from .passes.fold_broadcasts import fold_broadcasts
from .passes.fuse_linear_log_prob import fuse_linear_log_prob
from .passes.fuse_variance import fuse_variance
from .passes.inline_elementwise import inline_elementwise
from .passes.legalize_ops import legalize_and_fuse
from .passes.pack_frozen_weights import pack_frozen_weights, panel_widths
from .passes.plan_arena import plan_arena
from .passes.prune_backward import prune_backward
from .passes.reorder_updates import reorder_updates
from .passes.schedule_cpu import schedule_cpu
from .passes.schedule_reductions import schedule_reductions
from .passes.transposed_matmuls import transposed_matmuls
from .passes.update_in_place import update_in_place
from .sparse import FULL, Partial, plan_to_json
from .runtime import LIBRARY

STAGES = ("import", "autodiff", "lower", "memory plan", "codegen")


def print_progress(index: int, total: int, name: str, seconds: float | None, stream=sys.stderr) -> None:
    """seconds: None when the stage starts, negative when it failed (the error follows on its own line)."""
    if seconds is None:
        print(f"[{index}/{total}] {name} ...", end="", flush=True, file=stream)
    elif seconds < 0:
        print(" failed", flush=True, file=stream)
    else:
        print(f" {seconds:.1f} s", flush=True, file=stream)


@contextmanager
def _stage(name: str, progress, origins=None):
    """Time a stage; an error that is not one of ours (TVM's C++ checks, a Python bug) becomes an
    InternalCompilerError naming the stage and, from `origins` (binding name -> Origin), the model's
    operations the failure points at."""
    index = STAGES.index(name) + 1
    if progress:
        progress(index, len(STAGES), name, None)
    start = time.perf_counter()
    try:
        yield
    except BaseException as e:
        if progress:
            progress(index, len(STAGES), name, -1.0)
        if isinstance(e, (PockEngineError, OSError)) or not isinstance(e, Exception):
            raise  # ours, the file system's (the CLI names the file), or an interrupt
        raise InternalCompilerError(_internal_error_message(name, e, origins or {})) from e
    if progress:
        progress(index, len(STAGES), name, time.perf_counter() - start)


@contextmanager
def _removed_on_error(scratch: str):
    """The build's temporary directory goes if the build fails (a Program that keeps it removes it
    when it is collected)."""
    try:
        yield
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _internal_error_message(stage: str, error: Exception, origins: dict) -> str:
    """The stage, TVM's own words (its last line, without the C++ trace) and the model's
    operations whose names appear in them (`relax.cumsum`, a kernel `fused_conv2d1_add2`)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if not line.startswith(("File ", "at ", "0:", "1:"))),
                   type(error).__name__)
    words = set(re.findall(r"[a-z][a-z0-9]*", summary.lower()))
    named = {}
    for origin in origins.values():
        op = origin.op.split(".")[1] if origin.op.startswith("aten.") else origin.op
        if op.lower() in words or any(part in words for part in op.lower().split("_") if len(part) > 3):
            named.setdefault(str(origin), None)
    where = "".join(f"\n  {o}" for o in list(named)[:10]) if named else " (no operation of the model is named)"
    return (f"internal error in the {stage} stage: {type(error).__name__}: {summary}\n"
            f"Operations it points at:{where}\n"
            "This is a bug in PockEngine or in TVM, not in your model: please report it with the model (or a "
            "small module that reproduces it). Meanwhile, freezing the named modules (sparse_update) or "
            "replacing the operation may avoid it.")


def derive_step(imported, optimizer, plan):
    """forward_loss -> train_step for a plan: a vocabulary head and its cross-entropy as one operator
    (fuse_linear_log_prob), split partially trained weights (prune_backward), differentiate and add
    the optimizer (autodiff), then compute that operator in chunks of rows (chunk_linear_log_prob),
    batch variances in one reduction (fuse_variance), keep only what the backward needs of the
    forward (drop_saved_activations) and update each parameter once its gradient is complete
    (reorder_updates)."""
    imported = dataclasses.replace(imported, mod=fuse_linear_log_prob(FUNC_NAME)(imported.mod))
    partial = {name: rule for name, rule in plan.items() if isinstance(rule, Partial)}
    if partial:
        pvars = imported.param_vars
        pruned = prune_backward(FUNC_NAME, {pvars[n]: (p.channels, p.axis) for n, p in partial.items()})(imported.mod)
        imported = dataclasses.replace(imported, mod=pruned)
    step_mod, signature, optimizer_state = build_train_step(imported, optimizer, plan)
    step_mod = tvm.transform.Sequential([chunk_linear_log_prob(STEP_FUNC), fuse_variance(STEP_FUNC),
                                         drop_saved_activations(STEP_FUNC),
                                         reorder_updates(STEP_FUNC)])(step_mod)
    return step_mod, signature, optimizer_state


def fusion_passes(target) -> list:
    """Relax passes from the training step to fused TIR kernels (TVM's CPU pipeline up to FuseTIR,
    its LegalizeOps legalizing each distinct call once, then reductions over one element as
    assignments: see drop_unit_reductions): the module tuning logs are made for and applied to."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    return cpu.library_dispatch_passes(target) + legalize_and_fuse() + [drop_unit_reductions()]


def kernel_schedule_passes(preset) -> list:
    """The default schedule of every fused kernel not tuned (one loop nest, threads and vectors),
    then exp/erf/tanh/sigmoid as vectorizable polynomials in every kernel."""
    lanes = preset.vector_lanes(32)
    return [inline_elementwise(lanes, preset.vector_registers), schedule_cpu(lanes, preset.cores, preset.vector_registers), fast_math()]


def lowering_passes(preset, signature: StepSignature) -> list:
    """Relax passes from fused kernels to a memory-planned function (the rest of TVM's CPU pipeline,
    split before the finalisation passes so the plan can be read): inline_elementwise removes the
    fused kernels' intermediate buffers, schedule_reductions undoes what fusion's re-sorting does to
    gradient lifetimes, schedule_cpu gives untuned kernels threads and vectors, update_in_place
    writes new state over the old, and plan_arena replaces StaticPlanBlockMemory."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    return (kernel_schedule_passes(preset) + [schedule_reductions(STEP_FUNC)]
            + cpu.dataflow_lower_passes(preset.target())
            + [update_in_place(state_aliases(signature), STEP_FUNC), plan_arena(STEP_FUNC)])


def import_model(job):
    imported = job.import_model()
    return dataclasses.replace(imported, mod=fold_broadcasts(FUNC_NAME)(imported.mod))


def with_packed_weights(step_mod, signature: StepSignature, preset):
    """The step with its forward-only frozen weights held as the panels its CPU matmuls read
    (passes/pack_frozen_weights.py) and the signature that says so; unchanged for a target whose
    kernels are not schedule_cpu's."""
    if preset.family not in (targets.HOST, targets.AARCH64):
        return step_mod, signature
    step_mod = transposed_matmuls()(step_mod)
    widths = panel_widths(step_mod[STEP_FUNC], signature, preset.vector_lanes(32), preset.cores,
                          preset.vector_registers)
    return pack_frozen_weights(widths, signature, STEP_FUNC)(step_mod), signature.with_packed(widths)


def fused_step(job, preset):
    """The job's training step as fused kernels for `preset`: what `pockengine tune` tunes."""
    imported = import_model(job)
    step_mod, signature, _ = derive_step(imported, job.optimizer, job.plan(imported))
    step_mod = with_packed_weights(step_mod, signature, preset)[0]
    with preset.target() as target:
        return tvm.transform.Sequential(fusion_passes(target))(step_mod)


def state_aliases(signature: StepSignature) -> dict:
    """{position in train_step's returned tuple: index of the parameter holding the old value}."""
    state_index = {spec.name: i for i, spec in enumerate(signature.state)}
    return {1 + k: len(signature.batch) + state_index[name] for k, name in enumerate(signature.outputs)}


def finalize_passes() -> list:
    return [
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


def compile(job, target="host", *, tuning_logs=(), backend="tvm", progress=None):  # noqa: A001 - the contract's name
    """Compile `job` for `target` (preset name, TVM target dict or tag) -> runtime.Program: the
    pipeline behind `pockengine.compile`, the public entry, which takes the same arguments (and `verbose`).

    tuning_logs: MetaSchedule database directories (see tuning.py) whose records replace the default
    schedule of the kernels they match.
    backend: "tvm" (every op a TVM kernel), "library" (every heavy op a library kernel: PyTorch on the
    host) or "auto" (per heavy op, whichever measures faster here, see passes/switch_backend.py;
    kept only if the whole step is faster than with TVM's kernels alone).

    For another machine than this one (aarch64, a GPU, a microcontroller) the result is a
    runtime.DeviceProgram: it exports the artifact for that machine but runs no step here."""
    preset = targets.resolve(target)
    preset.check_tools("build")
    if preset.family != targets.HOST and backend != "tvm":
        raise TargetError(f"--backend {backend} runs heavy ops on PyTorch's kernels in the training process, which "
                          f"only a host build has; build for {preset.name} with --backend tvm")
    with _stage("import", progress):
        imported = import_model(job)
    with _stage("autodiff", progress, imported.origin):
        plan = job.plan(imported)
        step_mod, signature, optimizer_state = derive_step(imported, job.optimizer, plan)
    derived = Derived(imported, plan, step_mod, signature, optimizer_state)
    if preset.family == targets.CORTEX_M:
        program = _compile_cortex_m(job, preset, derived, progress)
    elif preset.family == targets.CUDA:
        program = _compile_cuda(job, preset, derived, progress, tuning_logs)
    else:
        program = _compile_cpu(job, preset, derived, progress, tuning_logs, backend)
    # The example batch travels with exported artifacts, so `pockengine run` works without --data.
    program.example = dict(zip([s.name for s in signature.batch],
                               [to_numpy(x) for x in job.example_inputs + (job.example_targets,)]))
    return program


@dataclasses.dataclass
class Derived:
    """The training step as autodiff left it, before any target-specific lowering."""
    imported: object
    plan: dict
    step_mod: object
    signature: StepSignature
    optimizer_state: dict

    @property
    def initial_state(self) -> dict:
        """{state name: array} as the step reads it (partially trained weights in their two parts)."""
        return self.state_for(self.signature)

    def state_for(self, signature: StepSignature) -> dict:
        """The initial state as a step of `signature` (this one's, or with packed weights) reads it."""
        return signature.split_state({**self.imported.initial, **self.optimizer_state})


def _meta(job, preset, derived: Derived) -> dict:
    imported = derived.imported
    return {
        "name": job.name,
        "target": preset.name,
        "family": preset.family,
        "tvm_target": dict(preset.target().export()),
        "optimizer": job.optimizer.to_json(),
        "source": imported.source,
        "state_dict_keys": job.state_dict_keys() or [s.name for s in imported.params + imported.buffers],
        "non_persistent": sorted(imported.non_persistent),
        "aliases": dict(imported.aliases),  # tied parameters: state_dict() returns them under both names
        "plan": plan_to_json(derived.plan),
    }


def _memory_report(job, lowered, derived: Derived):
    """The planned memory of `lowered`, with the step's activation timeline, and the full update's
    when the plan is sparse (to compare)."""
    step_func, signature, imported = derived.step_mod[STEP_FUNC], derived.signature, derived.imported
    timelines = {"this step": timeline(step_func, signature)}
    if any(rule != FULL for rule in derived.plan.values()):
        try:
            full_mod, full_sig, _ = derive_step(imported, job.optimizer, {name: FULL for name in derived.plan})
            timelines["full update"] = timeline(full_mod[STEP_FUNC], full_sig)
        except UnsupportedOpError:
            pass  # a frozen part has ops without gradients: there is no full update to compare with
    return memory_report(lowered, step_func, signature, imported.origin, timelines)


def _compile_cpu(job, preset, derived: Derived, progress, tuning_logs, backend):
    """This machine's CPU (a Program that runs here) or an aarch64 CPU (a cross-compiled library
    and a runner for the device)."""
    from . import tuning
    from .passes import switch_backend as switching
    from .runtime import DeviceProgram, Program

    tvm_target = preset.target()
    step_mod, signature = derived.step_mod, derived.signature

    def lower(choices):
        switched = switching.switch_backend(choices, STEP_FUNC)(step_mod)
        packed, packed_signature = with_packed_weights(switched, signature, preset)
        with tvm_target:
            fused = tvm.transform.Sequential(fusion_passes(tvm_target))(packed)
            fused, tuning_report = tuning.apply_logs(fused, tvm_target, list(tuning_logs))
            lowered = tvm.transform.Sequential(lowering_passes(preset, packed_signature))(fused)
            return lowered, tuning_report, packed_signature

    def program(choices, lowered, tuning_report, report, step_signature):
        state = derived.state_for(step_signature)
        with tvm_target:
            final = tvm.transform.Sequential(finalize_passes())(lowered)
        with without_kernel_argument_checks():
            executable = relax.build(final, target=tvm_target, relax_pipeline=None)
        meta = {**_meta(job, preset, derived), "tuning": tuning_report.to_json(),
                "backend": {"mode": backend, "library_kernels": switching.library_kernels(choices),
                            "choices": [c.to_json() for c in choices]}}
        scratch = tempfile.mkdtemp(prefix="pockengine-")
        library = os.path.join(scratch, LIBRARY)
        with _removed_on_error(scratch):
            if preset.family == targets.AARCH64:
                from .targets import aarch64

                executable.export_library(library, fcompile=aarch64.cross_compiler())
                files = {LIBRARY: library, aarch64.RUNNER: aarch64.runner_source_path()}
                return DeviceProgram(files, step_signature, state, report, meta, scratch=scratch)
            # LLVM emits machine code when the library is written; doing it once here (instead of a JIT
            # link for the VM and again on export) halves the build. The Program owns the file.
            executable.export_library(library)
            return Program(library, step_signature, state, report, meta, owns_library=True)

    with _stage("lower", progress, derived.imported.origin):
        choices = switching.measure(step_mod[STEP_FUNC], preset, backend, tuning_logs)
        lowered, tuning_report, packed_signature = lower(choices)
    with _stage("memory plan", progress, derived.imported.origin):
        report = _memory_report(job, lowered, derived)
    with _stage("codegen", progress, derived.imported.origin):
        result = program(choices, lowered, tuning_report, report, packed_signature)
    if backend == "auto" and switching.library_kernels(choices):
        # Each op was timed alone. In the step a library call also hands the cores from TVM's
        # thread pool to PyTorch's and back, and loses the epilogue fusion would have put in TVM's
        # kernel: measured here, switching can make the whole step slower (MobileNetV2 100 -> 121
        # ms). So the whole step is timed both ways as well, and the faster build is kept.
        if progress:
            print("[auto] building the step without library kernels too, timing both ...", file=sys.stderr, flush=True)
        all_tvm = [dataclasses.replace(c, backend="tvm") for c in choices]
        lowered, tuning_report, packed_signature = lower(all_tvm)
        alternative = program(all_tvm, lowered, tuning_report, _memory_report(job, lowered, derived), packed_signature)
        batch = job.example_inputs + (job.example_targets,)
        step_ms = {"switched": result.time_step(*batch), "tvm": alternative.time_step(*batch)}
        if step_ms["tvm"] <= step_ms["switched"]:
            result = alternative
        result.meta["backend"]["step_ms"] = step_ms
    return result


def _compile_cortex_m(job, preset, derived: Derived, progress):
    """A C project (kernels, driver on one static arena, state, Makefile, linker script), compiled
    with arm-none-eabi-gcc so its SRAM and Flash are measured, and checked against the device."""
    from .runtime import DeviceProgram
    from .targets import cortex_m

    tvm_target = preset.target()
    signature = derived.signature
    with _stage("lower", progress, derived.imported.origin):
        with tvm_target:
            fused = tvm.transform.Sequential(fusion_passes(tvm_target))(derived.step_mod)
            passes = cortex_m.lowering_passes(preset, signature, state_aliases(signature))
            lowered = tvm.transform.Sequential(passes)(fused)
    with _stage("memory plan", progress, derived.imported.origin):
        report = _memory_report(job, lowered, derived)
    scratch = tempfile.mkdtemp(prefix="pockengine-")
    with _removed_on_error(scratch):  # a refused build (too big for the device) leaves no project behind
        with _stage("codegen", progress, derived.imported.origin):
            directory = os.path.join(scratch, cortex_m.PROJECT)
            os.makedirs(directory)
            batch = [to_numpy(x) for x in job.example_inputs + (job.example_targets,)]
            generated = cortex_m.generate(directory, lowered, signature, derived.initial_state, preset, batches=[batch])
            footprint = cortex_m.build_firmware(directory, preset)
        cortex_m.check_limits(footprint, preset, signature, derived.plan)
    meta = {**_meta(job, preset, derived), "firmware": {**footprint.to_json(), **dataclasses.asdict(generated),
                                                        "sram_limit": preset.sram_bytes, "flash_limit": preset.flash_bytes,
                                                        "board": preset.board}}
    return DeviceProgram({cortex_m.PROJECT: directory}, signature, derived.initial_state, report, meta, scratch=scratch)


def _compile_cuda(job, preset, derived: Derived, progress, tuning_logs):
    """Every kernel scheduled for the GPU (tuning records, else dlight) and checked to be bound to
    GPU threads, the memory planned on the GPU, PTX for the target's arch by nvcc: no GPU is
    needed to build. The result runs here only on a machine with a GPU and the target's host CPU."""
    from .runtime import DeviceProgram, Program, runs_here
    from .targets import aarch64, cuda

    tvm_target = cuda.cuda_target(preset.target())
    with _stage("lower", progress, derived.imported.origin):
        lowered, schedules = cuda.gpu_lowering_with_report(derived.step_mod, tvm_target, derived.signature,
                                                           tuning_logs)
        kernels = cuda.gpu_kernels_check(lowered, schedules)
    with _stage("memory plan", progress, derived.imported.origin):
        report = _memory_report(job, lowered, derived)
    with _stage("codegen", progress, derived.imported.origin):
        executable, ptx = cuda.build_cuda(lowered, tvm_target)
        scratch = tempfile.mkdtemp(prefix="pockengine-")
        with _removed_on_error(scratch):
            paths = cuda.export_cuda(executable, ptx, scratch, tvm_target)
    meta = {**_meta(job, preset, derived), "tuning": schedules.tuning.to_json(),
            "cuda": {"arch": cuda.arch_of(tvm_target), "kernels": len(kernels), "schedules": schedules.counts(),
                     "ptx": cuda.ptx_header(ptx)}}
    if runs_here(meta):
        return Program(paths["library"], derived.signature, derived.initial_state, report, meta, owns_library=True)
    files = {LIBRARY: paths["library"], cuda.PTX_FILE: paths["ptx"], cuda.SOURCE_FILE: paths["source"],
             aarch64.RUNNER: aarch64.runner_source_path()}
    return DeviceProgram(files, derived.signature, derived.initial_state, report, meta, scratch=scratch)
