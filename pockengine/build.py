"""The pipeline: TrainingJob -> compiled Program, stage by stage.

    import (frontend) -> autodiff (prune_backward + train_step) -> lower (legalize, fuse, plan memory) -> memory report
    -> codegen (TIR + VM executable)

Each stage takes the previous stage's value and returns a new one. `progress` receives
(stage index, stage count, name, seconds or None when it starts) so the CLI can show the build.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from contextlib import contextmanager

import tvm
from tvm import relax

from . import targets
from .autodiff.step import STEP_FUNC, StepSignature, build_train_step
from .passes.memory_plan import memory_report
from .passes.memory_timeline import timeline
from .errors import UnsupportedOpError
from .frontend import FUNC_NAME
from .passes.drop_saved_activations import drop_saved_activations
from .passes.fast_math import fast_math
from .passes.fold_broadcasts import fold_broadcasts
from .passes.fuse_variance import fuse_variance
from .passes.inline_elementwise import inline_elementwise
from .passes.plan_arena import plan_arena
from .passes.prune_backward import prune_backward
from .passes.reorder_updates import reorder_updates
from .passes.schedule_cpu import schedule_cpu
from .passes.schedule_reductions import schedule_reductions
from .passes.update_in_place import update_in_place
from .sparse import FULL, Partial
from .runtime import LIBRARY

STAGES = ("import", "autodiff", "lower", "memory plan", "codegen")


def print_progress(index: int, total: int, name: str, seconds: float | None, stream=sys.stderr) -> None:
    if seconds is None:
        print(f"[{index}/{total}] {name} ...", end="", flush=True, file=stream)
    else:
        print(f" {seconds:.1f} s", flush=True, file=stream)


@contextmanager
def _stage(name: str, progress):
    index = STAGES.index(name) + 1
    if progress:
        progress(index, len(STAGES), name, None)
    start = time.perf_counter()
    yield
    if progress:
        progress(index, len(STAGES), name, time.perf_counter() - start)


def derive_step(imported, optimizer, plan):
    """forward_loss -> train_step for a plan: split partially trained weights (prune_backward),
    differentiate and add the optimizer (autodiff), then compute batch variances in one reduction
    (fuse_variance), keep only what the backward needs of the forward (drop_saved_activations) and update each parameter once its gradient is complete
    (reorder_updates)."""
    partial = {name: rule for name, rule in plan.items() if isinstance(rule, Partial)}
    if partial:
        pvars = imported.param_vars
        pruned = prune_backward(FUNC_NAME, {pvars[n]: (p.channels, p.axis) for n, p in partial.items()})(imported.mod)
        imported = dataclasses.replace(imported, mod=pruned)
    step_mod, signature, optimizer_state = build_train_step(imported, optimizer, plan)
    step_mod = tvm.transform.Sequential([fuse_variance(STEP_FUNC), drop_saved_activations(STEP_FUNC),
                                         reorder_updates(STEP_FUNC)])(step_mod)
    return step_mod, signature, optimizer_state


def fusion_passes(target) -> list:
    """Relax passes from the training step to fused TIR kernels (TVM's CPU pipeline up to FuseTIR):
    the module tuning logs are made for and applied to."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    return cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)


def kernel_schedule_passes(preset) -> list:
    """The default schedule of every fused kernel not tuned (one loop nest, threads and vectors),
    then exp/erf/tanh/sigmoid as vectorizable polynomials in every kernel."""
    lanes = preset.vector_lanes(32)
    return [inline_elementwise(lanes), schedule_cpu(lanes, preset.cores), fast_math()]


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


def fused_step(job, preset):
    """The job's training step as fused kernels for `preset`: what `pockengine tune` tunes."""
    imported = import_model(job)
    step_mod = derive_step(imported, job.optimizer, job.plan(imported))[0]
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


def compile(job, target="host", progress=None, tuning_logs=(), backend="tvm"):  # noqa: A001 - the contract's name
    """Compile `job` for `target` (preset name, TVM target dict or tag) -> runtime.Program.

    tuning_logs: MetaSchedule database directories (see tuning.py) whose records replace the default
    schedule of the kernels they match.
    backend: "tvm" (every op a TVM kernel), "library" (every heavy op a library kernel: PyTorch on the
    host) or "auto" (per heavy op, whichever measures faster here, see passes/switch_backend.py;
    kept only if the whole step is faster than with TVM's kernels alone)."""
    from . import tuning
    from .passes import switch_backend as switching
    from .runtime import Program

    preset = targets.resolve(target)
    tvm_target = preset.target()
    with _stage("import", progress):
        imported = import_model(job)
    with _stage("autodiff", progress):
        plan = job.plan(imported)
        step_mod, signature, optimizer_state = derive_step(imported, job.optimizer, plan)

    def lower(choices):
        switched = switching.switch_backend(choices, STEP_FUNC)(step_mod)
        with tvm_target:
            fused = tvm.transform.Sequential(fusion_passes(tvm_target))(switched)
            fused, tuning_report = tuning.apply_logs(fused, tvm_target, list(tuning_logs))
            return tvm.transform.Sequential(lowering_passes(preset, signature))(fused), tuning_report

    def program(choices, lowered, tuning_report, report):
        with tvm_target:
            final = tvm.transform.Sequential(finalize_passes())(lowered)
        executable = relax.build(final, target=tvm_target, relax_pipeline=None)
        # LLVM emits machine code when the library is written; doing it once here (instead of a JIT
        # link for the VM and again on export) halves the build. The Program owns the file.
        library = os.path.join(tempfile.mkdtemp(prefix="pockengine-"), LIBRARY)
        executable.export_library(library)
        meta = {
            "name": job.name,
            "target": preset.name,
            "tvm_target": dict(tvm_target.export()),
            "optimizer": job.optimizer.to_json(),
            "source": imported.source,
            "state_dict_keys": job.state_dict_keys() or [s.name for s in imported.params + imported.buffers],
            "non_persistent": sorted(imported.non_persistent),
            "tuning": tuning_report.to_json(),
            "backend": {"mode": backend, "library_kernels": switching.library_kernels(choices),
                        "choices": [c.to_json() for c in choices]},
        }
        return Program(library, signature, {**imported.initial, **optimizer_state}, report, meta, owns_library=True)

    with _stage("lower", progress):
        choices = switching.measure(step_mod[STEP_FUNC], preset, backend, tuning_logs)
        lowered, tuning_report = lower(choices)
    with _stage("memory plan", progress):
        timelines = {"this step": timeline(step_mod[STEP_FUNC], signature)}
        if any(rule != FULL for rule in plan.values()):  # the same model fully updated, for comparison
            try:
                full_mod, full_sig, _ = derive_step(imported, job.optimizer, {name: FULL for name in plan})
                timelines["full update"] = timeline(full_mod[STEP_FUNC], full_sig)
            except UnsupportedOpError:
                pass  # a frozen part has ops without gradients: there is no full update to compare with
        report = memory_report(lowered, step_mod[STEP_FUNC], signature, imported.origin, timelines)
    with _stage("codegen", progress):
        result = program(choices, lowered, tuning_report, report)
    if backend == "auto" and switching.library_kernels(choices):
        # Each op was timed alone. In the step a library call also hands the cores from TVM's
        # thread pool to PyTorch's and back, and loses the epilogue fusion would have put in TVM's
        # kernel: measured here, switching can make the whole step slower (MobileNetV2 100 -> 121
        # ms). So the whole step is timed both ways as well, and the faster build is kept.
        if progress:
            print("[auto] building the step without library kernels too, timing both ...", file=sys.stderr, flush=True)
        all_tvm = [dataclasses.replace(c, backend="tvm") for c in choices]
        lowered, tuning_report = lower(all_tvm)
        report = memory_report(lowered, step_mod[STEP_FUNC], signature, imported.origin, timelines)
        alternative = program(all_tvm, lowered, tuning_report, report)
        batch = job.example_inputs + (job.example_targets,)
        step_ms = {"switched": result.time_step(*batch), "tvm": alternative.time_step(*batch)}
        if step_ms["tvm"] <= step_ms["switched"]:
            result = alternative
        result.meta["backend"]["step_ms"] = step_ms
    return result
