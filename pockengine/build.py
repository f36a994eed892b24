"""A build: TrainingJob -> compiled Program, for the target family of the preset.

    import -> autodiff -> lower -> memory plan -> codegen

pipeline.py owns the passes and the stages; the preset's family (targets/families.py) lowers, plans
and packages the step; this module makes the result a Program (it runs here) or a DeviceProgram (it
runs on the device), keeping the fastest when the family offers alternatives.
"""

from __future__ import annotations

from . import targets
from .autodiff.step import STEP_FUNC
from .errors import TargetError
from .frontend import to_numpy
from .pipeline import STAGES, derive, derive_forward, lower, memory_report
from .runtime import DeviceProgram, InferenceProgram, Program
from .sparse import plan_to_json
from .targets.families import family as family_of
from .targets.family import BuildRequest


def compile(job, target="host", *, tuning_logs=(), backend="tvm", patches=None, progress=None):  # noqa: A001 - the contract's name
    """Compile `job` for `target` (preset name, TVM target dict or tag) -> runtime.Program: the
    pipeline behind `pockengine.compile`, the public entry, which takes the same arguments (and `verbose`).

    tuning_logs: MetaSchedule database directories (see tuning/database.py) whose records replace the
    default schedule of the kernels they match.
    backend: "tvm" (every op a TVM kernel), "library" (every heavy op a library kernel: PyTorch on the
    host) or "auto" (per heavy op, whichever measures faster here, see passes/switch_backend.py;
    kept only if the whole step is faster than with TVM's kernels alone).
    patches: None, "auto" or (module path, grid): run the forward's frozen prefix ending with that
    module's output patch by patch (pipeline.patched_step; "auto" picks the one lowering the peak most).

    For another machine than this one (aarch64, a GPU, a microcontroller) the result is a
    runtime.DeviceProgram: it exports the artifact for that machine but runs no step here."""
    preset = targets.resolve(target)
    preset.check_tools("build")
    family = family_of(preset)
    family.check_options(preset, backend)
    derived = derive(job, progress, patches)
    builds = family.build(BuildRequest(job, preset, derived, tuple(tuning_logs), backend, progress))
    meta = _meta(job, preset, derived)
    programs = [_program(built, meta) for built in builds]
    program = programs[0] if len(programs) == 1 else _fastest(programs, job)
    # The example batch travels with exported artifacts, so `pockengine run` works without --data.
    program.example = dict(zip([s.name for s in derived.signature.batch],
                               [to_numpy(x) for x in job.example_inputs + (job.example_targets,)]))
    return program


def _program(built, meta: dict):
    meta = {**meta, **built.meta}
    if built.library is not None:  # a compile's private copy: removed with the Program
        return Program(built.library, built.signature, built.state, built.report, meta, owns_library=True)
    return DeviceProgram(built.files, built.signature, built.state, built.report, meta, scratch=built.scratch)


def _fastest(programs: list, job):
    """Of a host build with library kernels and one without (`--backend auto`), the one whose whole
    step is faster here; both times go into the manifest."""
    switched, all_tvm = programs
    batch = job.example_inputs + (job.example_targets,)
    step_ms = {"switched": switched.time_step(*batch), "tvm": all_tvm.time_step(*batch)}
    result = all_tvm if step_ms["tvm"] <= step_ms["switched"] else switched
    result.meta["backend"]["step_ms"] = step_ms
    return result


def _meta(job, preset, derived) -> dict:
    meta = _meta_of_import(job.name, preset, derived)
    return {
        **meta,
        "optimizer": job.optimizer.to_json(),
        "state_dict_keys": job.state_dict_keys() or meta["state_dict_keys"],
        "plan": plan_to_json(derived.plan),
        "patches": derived.patches.to_json() if derived.patches is not None else None,
    }


def _meta_of_import(name: str, preset, derived) -> dict:
    imported = derived.imported
    return {
        "name": name,
        "target": preset.name,
        "family": preset.family,
        "tvm_target": dict(preset.target().export()),
        "source": imported.source,
        "state_dict_keys": [s.name for s in imported.params + imported.buffers],
        "non_persistent": sorted(imported.non_persistent),
        "aliases": dict(imported.aliases),  # tied parameters: state_dict() returns them under both names
    }


def memory_plan(job, target="host", *, imported=None):
    """The memory plan (analysis.memory_plan.MemoryReport, without timelines) of `compile(job,
    target)` with TVM's untuned kernels, made without generating code: what the sparse-update search
    compares schemes by. `imported`: the job's model as pipeline.import_model gave it, to import it
    once for many schemes of the same model."""
    preset = targets.resolve(target)
    derived = derive(job, imported=imported)
    lowered = lower(derived.step_mod, derived.signature, preset, family_of(preset).lowering)
    derived.timelines = {}  # the report's timelines derive the full update again: not wanted here
    return memory_report(lowered.mod, derived)


def compile_inference(model, example_inputs, target="host", *, output=None, tuning_logs=(), progress=None,
                      name: str = "inference") -> InferenceProgram:
    """Compile `output(model(*example_inputs))`, the model in eval mode, into an InferenceProgram:
    the pipeline behind `pockengine.compile_inference`, which takes the same arguments (and `verbose`)."""
    preset = targets.resolve(target)
    family = family_of(preset)
    if not family.runs_here({"family": family.name}):
        raise TargetError(f"compile_inference builds for this machine only (target 'host'), not {preset.name}: "
                          "an inference artifact has no runner on a device yet. Build the training step for "
                          f"{preset.name} with pockengine.compile, and run inference here")
    preset.check_tools("build")
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    progress = _without_autodiff(progress)
    derived = derive_forward(model, example_inputs, output, progress)
    built = family.build(BuildRequest(None, preset, derived, tuple(tuning_logs), "tvm", progress))[0]
    out = derived.step_mod[STEP_FUNC].ret_ty.fields[0]
    meta = {**_meta_of_import(name, preset, derived), **built.meta, "kind": InferenceProgram.KIND,
            "state_dict_keys": list(model.state_dict().keys()),
            "output": {"shape": [int(d) for d in out.shape], "dtype": str(out.dtype)}}
    program = InferenceProgram(built.library, built.signature, built.state, built.report, meta, owns_library=True)
    program.example = dict(zip([s.name for s in derived.signature.batch], [to_numpy(x) for x in example_inputs]))
    return program


def _without_autodiff(progress):
    """`progress` counting the stages of an inference build, which has no autodiff stage."""
    if progress is None:
        return None
    stages = [name for name in STAGES if name != "autodiff"]
    return lambda _index, _total, name, seconds: progress(stages.index(name) + 1, len(stages), name, seconds)
