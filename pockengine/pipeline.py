"""The order of every pass, for every target family: this module owns it.

    import    the frontend, then fold_broadcasts
    derive    fuse_linear_log_prob, prune_backward (partially trained weights), autodiff and the optimizer
              (autodiff/step.py), chunk_linear_log_prob, fuse_variance, drop_saved_activations, reorder_updates,
              patch_prefix (when asked: a frozen prefix of the forward run patch by patch)
    switch    switch_backend: heavy ops measured faster as library kernels (host, --backend auto|library)
    pack      transposed_matmuls, pack_frozen_weights, interleave_int8_weights (families whose kernels are
              schedule_cpu's)
    fuse      the family's library dispatch (TVM's), legalize_ops + TVM's fusion, drop_unit_reductions
    records   tuning logs: MetaSchedule records replace the kernels they match (tuning/database.py)
    schedule  the family's default schedules for the rest, then what every kernel gets (fast_math on CPUs)
    lower     recompute_expansions (families short of memory), schedule_reductions, the family's dataflow
              lowering (TVM's), update_in_place, plan_arena
    finalize  TVM's VM lowering (LowerAllocTensor ... AttachGlobalSymbol)

A target family (targets/) contributes only the phases that differ by target, as a `Lowering` of
pass-list factories; every prefix and suffix is written here once. `pockengine tune` tunes the module
`fused` returns, backend measurement builds one op with `kernels`, and every family lowers with
`lower`: a pass added here is added to all of them. `PASSES` names our passes in this order; the
README's pass table is checked against it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

import tvm
from tvm import relax

from .analysis.flops import call_flops
from .analysis.memory_plan import memory_report as plan_report
from .analysis.memory_timeline import timeline
from .autodiff.step import STEP_FUNC, StepSignature, build_train_step
from .errors import InputError, InternalCompilerError, PockEngineError, UnsupportedOpError
from .frontend import FUNC_NAME, quantized_ops
from .frontend.w8_ops import int8_dot
from .ir import static_shape
from .passes.chunk_linear_log_prob import chunk_linear_log_prob
from .passes.drop_saved_activations import drop_saved_activations
from .passes.drop_unit_reductions import drop_unit_reductions
from .passes.fold_broadcasts import fold_broadcasts
from .passes.fuse_linear_log_prob import fuse_linear_log_prob
from .passes.fuse_variance import fuse_variance
from .passes.interleave_int8_weights import int8_dot_weights, interleave_int8_weights
from .passes.legalize_ops import legalize_and_fuse
from .passes.narrow_quantized import narrow_quantized, narrowable_weights
from .passes.pack_frozen_weights import pack_frozen_weights, panel_widths
from .passes.patch_prefix import NotPatchable, Prefixes, is_spatial_op, patch_prefix, plan_patch, tiles
from .passes.plan_arena import plan_arena
from .passes.prune_backward import prune_backward
from .passes.recompute_expansions import recompute_expansions
from .passes.reorder_updates import reorder_updates
from .passes.schedule_reductions import schedule_reductions
from .passes.switch_backend import switch_backend
from .passes.transposed_matmuls import transposed_matmuls
from .passes.update_in_place import update_in_place
from .sparse import FULL, Partial
from .tuning.database import TuningReport, apply_database, apply_logs

# Our passes in the order they run (a family's schedule phase in its place); README's table follows it.
PASSES = ("fold_broadcasts", "fuse_linear_log_prob", "prune_backward", "chunk_linear_log_prob", "fuse_variance",
          "drop_saved_activations", "reorder_updates", "narrow_quantized", "patch_prefix", "switch_backend",
          "transposed_matmuls", "pack_frozen_weights", "interleave_int8_weights", "legalize_ops",
          "drop_unit_reductions", "(tuning logs)", "schedule_int8_dot", "inline_elementwise", "schedule_cpu",
          "fast_math", "recompute_expansions", "schedule_reductions", "update_in_place", "plan_arena")


@dataclasses.dataclass(frozen=True)
class Lowering:
    """A target family's phases of the pipeline, as factories of pass lists (run in this module's order).

    dispatch(target): TVM's library dispatch for the target (the first phase of its backend pipeline).
    schedule(preset, target, notes): default schedules for the kernels no tuning record scheduled; may
        leave what it found in `notes` (a dict) for the build's report.
    finish_kernels(): passes every scheduled kernel gets, tuned or not (a tuning candidate is measured
        with them too).
    dataflow(target): TVM's dataflow lowering for the target.
    packs_frozen_weights: the kernels are schedule_cpu's, whose matmuls can read frozen weights as panels.
    recomputes_expansions: memory is the constraint: a kernel expanding small inputs into a large
        tensor runs inside each of its readers instead (recompute_expansions).
    tvm_target(preset): the TVM target the step is lowered for.
    """
    dispatch: Callable
    schedule: Callable
    dataflow: Callable
    finish_kernels: Callable = list
    packs_frozen_weights: bool = False
    recomputes_expansions: bool = False
    tvm_target: Callable = lambda preset: preset.target()


# ---------------------------------------------------------------------- stages


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
def stage(name: str, progress, origins=None):
    """Time a stage; an error that is not one of ours (TVM's C++ checks, a Python bug) becomes an
    InternalCompilerError naming the stage and, from `origins` (binding name -> Origin), the model's
    operations the failure points at. `progress` receives (stage index, stage count, name, seconds
    or None when it starts) so the CLI can show the build."""
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


def _internal_error_message(stage_name: str, error: Exception, origins: dict) -> str:
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
    return (f"internal error in the {stage_name} stage: {type(error).__name__}: {summary}\n"
            f"Operations it points at:{where}\n"
            "This is a bug in PockEngine or in TVM, not in your model: please report it with the model (or a "
            "small module that reproduces it). Meanwhile, freezing the named modules (sparse_update) or "
            "replacing the operation may avoid it.")


# ---------------------------------------------------------------------- import and derive


def import_model(job):
    imported = job.import_model()
    return dataclasses.replace(imported, mod=fold_broadcasts(FUNC_NAME)(imported.mod))


def derive_step(imported, optimizer, plan):
    """forward_loss -> train_step for a plan: a vocabulary head and its cross-entropy as one operator
    (fuse_linear_log_prob), split partially trained weights (prune_backward), differentiate and add
    the optimizer (autodiff), then compute that operator in chunks of rows (chunk_linear_log_prob),
    batch variances in one reduction (fuse_variance), keep only what the backward needs of the
    forward (drop_saved_activations) and update each parameter once its gradient is complete
    (reorder_updates); a quantized model's integers then take int8 (narrow_quantized)."""
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
    int8_weights = narrowable_weights(step_mod[STEP_FUNC], signature, imported.initial)
    step_mod = narrow_quantized(signature, int8_weights, STEP_FUNC)(step_mod)
    signature = signature.with_state_dtypes(dict.fromkeys(int8_weights, quantized_ops.STORAGE_DTYPE))
    return step_mod, signature, optimizer_state


@dataclasses.dataclass
class Derived:
    """The training step as autodiff left it, before any target-specific lowering."""
    imported: object
    plan: dict
    step_mod: object
    signature: StepSignature
    optimizer_state: dict
    optimizer: object
    patches: PatchChoice | None = None  # the patched prefix, when the build asked for one

    @property
    def initial_state(self) -> dict:
        """{state name: array} as the step reads it (partially trained weights in their two parts)."""
        return self.state_for(self.signature)

    def state_for(self, signature: StepSignature) -> dict:
        """The initial state as a step of `signature` (this one's, or with packed weights) reads it."""
        return signature.split_state({**self.imported.initial, **self.optimizer_state})

    @functools.cached_property
    def timelines(self) -> dict:
        """The step's activation timeline, and the full update's when the plan is sparse (to
        compare): derived once, however many lowerings of the step are planned (--backend auto
        plans two)."""
        step_func, imported = self.step_mod[STEP_FUNC], self.imported
        timelines = {"this step": timeline(step_func, self.signature)}
        if any(rule != FULL for rule in self.plan.values()):
            try:
                full_mod, full_sig, _ = derive_step(imported, self.optimizer, {name: FULL for name in self.plan})
                timelines["full update"] = timeline(full_mod[STEP_FUNC], full_sig)
            except UnsupportedOpError:
                pass  # a frozen part has ops without gradients: there is no full update to compare with
        return timelines


def derive(job, progress=None, patches=None, imported=None) -> Derived:
    """The import and autodiff stages of a build; `patches` as `pockengine.compile` takes it (see
    patched_step); `imported`: the job's model as import_model gave it (the import stage then
    skipped: one import serves many schemes of a model)."""
    with stage("import", progress):
        imported = import_model(job) if imported is None else imported
    with stage("autodiff", progress, imported.origin):
        plan = job.plan(imported)
        step_mod, signature, optimizer_state = derive_step(imported, job.optimizer, plan)
        step_mod, choice = patched_step(step_mod, signature, imported.origin, patches)
    return Derived(imported, plan, step_mod, signature, optimizer_state, job.optimizer, choice)


def derive_forward(model, example_inputs: tuple, output, progress=None) -> Derived:
    """The import stage of an inference build (compile_inference): the model's forward, in eval
    mode, as a step of no training: (inputs..., weights and buffers...) -> (the output,), every
    parameter frozen, nothing written back. It is lowered, planned and built as a training step is."""
    import torch

    from .autodiff.guards import index_ranges
    from .autodiff.step import BUFFER, FROZEN
    from .frontend.torch import eval_mode, import_torch_forward

    if not isinstance(model, torch.nn.Module):
        raise InputError(f"compile_inference takes a torch.nn.Module, got {type(model).__name__}; an ONNX model "
                         "is compiled for training only (pockengine.TrainingJob)")
    with stage("import", progress):
        with eval_mode(model):  # dropout off, BatchNorm on its running statistics: what inference computes
            imported = import_torch_forward(model, example_inputs, output)
        if imported.mutated_buffers or imported.random_sites:
            what = (f"changes buffers ({', '.join(imported.mutated_buffers[:5])})" if imported.mutated_buffers
                    else "samples random numbers")
            raise InputError(f"the model {what} when it runs in eval mode; an inference artifact computes the "
                             "same output every call and changes no state. Make those modules deterministic in "
                             "eval mode")
        # BatchNorm on its running statistics, then LayerNorm as arithmetic, as a training step has it:
        # the same kernels, and TVM's own layer_norm kernel takes only float32 and float16.
        mod = relax.transform.DecomposeOpsForInference(FUNC_NAME)(imported.mod)
        mod = relax.transform.DecomposeOpsForTraining(FUNC_NAME)(mod)
        func = fold_broadcasts(FUNC_NAME)(mod)[FUNC_NAME]
        step_mod = tvm.IRModule({STEP_FUNC: func.with_attr("global_symbol", STEP_FUNC)})
        categories = {**{s.name: FROZEN for s in imported.params}, **{s.name: BUFFER for s in imported.buffers}}
        signature = StepSignature(batch=list(imported.inputs), state=list(imported.params) + list(imported.buffers),
                                  categories=categories, outputs=[], loss_dtype=str(func.ret_ty.fields[0].dtype),
                                  index_ranges=index_ranges(func, [s.name for s in imported.inputs], imported.origin))
    return Derived(imported, {}, step_mod, signature, {}, None)


# ---------------------------------------------------------------------- patch-based prefix

PATCH_GRIDS = (2, 3, 4)
# "auto" accepts a patched prefix computing at most this much more (its halos, recomputed) than the
# unpatched prefix: MCUNetV2 reports 10-20% for the splits it picks.
MAX_PATCH_OVERHEAD = 0.25


@dataclasses.dataclass(frozen=True)
class PatchChoice:
    """A patched prefix: the module whose output ends it (`split`, the step's tensor `tensor`), the
    grid, the extra convolution FLOPs its halos cost (a fraction of the unpatched prefix's) and the
    step's peak bytes before and after, from its activation timeline with elementwise chains fused
    (memory_timeline.py; on MobileNetV2 within 7% of the arena plan_arena lays out)."""
    split: str
    tensor: str
    grid: int
    overhead: float
    peak_before: int
    peak_after: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def patch_overhead(prefix, grid: int) -> float:
    """Extra convolution FLOPs of the prefix computed on a grid x grid patch grid (the halos each
    patch recomputes), as a fraction of the unpatched prefix's."""
    height, width = static_shape(prefix.split)[2:]
    plans = [plan_patch(prefix, tile) for row in tiles(height, width, grid) for tile in row]
    whole = patched = 0
    for b in prefix.bindings:
        flops = call_flops(b.value)
        if flops:  # a convolution: its FLOPs are proportional to the pixels it computes
            pixels = static_shape(b.var)[2] * static_shape(b.var)[3]
            computed = sum((rows[1] - rows[0]) * (cols[1] - cols[0]) for rows, cols in (p.region[b.var] for p in plans))
            whole, patched = whole + flops, patched + flops * computed // pixels
    return patched / whole - 1 if whole else 0.0


def patch_splits(step_func, n_inputs: int, origin: dict) -> dict:
    """{module path: the prefix its output ends}, for the modules (at any depth: `features.3`,
    `features.3.conv.1`) whose last tensor computed in the forward can end a patched prefix, in
    forward order. A tensor no module claims is named by its binding."""
    prefixes = Prefixes(step_func, n_inputs)
    last = {}  # module path -> the last forward activation computed in it (or in a module within it)
    for b in prefixes.bindings[:prefixes.forward_end]:
        # Origins are keyed by the imported forward's names, which the step's own forward values
        # (the batch checks, the backward's masks: booleans and integers) may reuse; an int8
        # model's activations are int8 tensors of its own operators.
        activation = str(b.var.ty.dtype).startswith("float") or quantized_ops.is_quantized_op(b.value)
        if not (is_spatial_op(b.value) and activation):
            continue
        where = origin.get(b.var.name)
        path = where.module_path if where is not None and where.module_path else b.var.name
        parts = path.split(".")
        for depth in range(1, len(parts) + 1):
            last[".".join(parts[:depth])] = b.var
    found = {}
    for module, var in sorted(last.items(), key=lambda item: prefixes.position[item[1]]):
        try:
            found[module] = prefixes.ending_at(var)
        except NotPatchable:
            continue
    return found


def _outermost(modules) -> list:
    """The modules not within another of `modules`: what an error lists of them."""
    return [m for m in modules if not any(m.startswith(other + ".") for other in modules)]


def patched_step(step_mod, signature: StepSignature, origin: dict, patches):
    """(the step with a prefix of its forward computed patch by patch, PatchChoice or None).

    patches: None (unchanged), (module path, grid) — the prefix ends with that module's output —
    or "auto": of the prefixes whose output a module ends, on grids of PATCH_GRIDS, the one that
    lowers the step's peak most (its activation timeline, elementwise chains fused as the kernels
    will be: lowering each candidate would take seconds) within MAX_PATCH_OVERHEAD extra FLOPs,
    the cheapest of those peaking the same; the step is unchanged when none lowers it."""
    if patches is None:
        return step_mod, None
    func, n_inputs = step_mod[STEP_FUNC], len(signature.batch)
    splits = patch_splits(func, n_inputs, origin)
    auto = patches == "auto"
    if auto:
        tried = {}  # one name per tensor, the outermost module's (`features.2`, not `features.2.conv.3`)
        for module, prefix in splits.items():
            if not any(prefix.split.same_as(splits[other].split) for other in tried):
                tried[module] = PATCH_GRIDS
    elif isinstance(patches, (tuple, list)) and len(patches) == 2 and isinstance(patches[1], int) and patches[1] > 1:
        module, grid = patches
        if module not in splits:
            raise InputError(f"patches=({module!r}, {grid}): {module!r} does not end a prefix that can run patch "
                             f"by patch (only convolutions, pooling and elementwise ops, nothing the backward or "
                             f"another branch reads). These modules do: {', '.join(_outermost(splits)) or 'none'} "
                             "(and modules within them)")
        tried = {module: (grid,)}
    else:
        raise InputError(f"patches={patches!r}: give None, \"auto\" or (module path, grid of at least 2), e.g. "
                         "(\"features.3\", 3)")
    before = timeline(func, signature, fused_elementwise=True).peak()[0]
    best = None
    for module, grids in tried.items():
        prefix = splits[module]
        side = min(static_shape(prefix.split)[2:])
        if not auto and grids[0] > side:
            raise InputError(f"patches=({module!r}, {grids[0]}): {module}'s output is smaller than the grid "
                             f"({'x'.join(map(str, static_shape(prefix.split)[2:]))})")
        overheads = {grid: patch_overhead(prefix, grid) for grid in grids if grid <= side}
        if auto:
            overheads = {grid: cost for grid, cost in overheads.items() if cost <= MAX_PATCH_OVERHEAD}
            if not overheads:
                break  # halos only grow with the prefix's depth: the later splits cost more still
        for grid, overhead in overheads.items():
            mod = patch_prefix(prefix.split, grid, n_inputs, STEP_FUNC)(step_mod)
            choice = PatchChoice(module, prefix.split.name, grid, overhead, before,
                                 timeline(mod[STEP_FUNC], signature, fused_elementwise=True).peak()[0])
            if best is None or (choice.peak_after, choice.overhead) < (best[1].peak_after, best[1].overhead):
                best = (mod, choice)
    if best is None or (auto and best[1].peak_after >= before):
        return step_mod, None
    return best


# ---------------------------------------------------------------------- lower


def with_packed_weights(step_mod, signature: StepSignature, preset, lowering: Lowering):
    """The step with its forward-only frozen weights held as the panels its CPU matmuls read
    (passes/pack_frozen_weights.py), and its W8A8 layers' frozen int8 weights in the layout of the
    CPU's int8 dot product where it has one (passes/interleave_int8_weights.py), and the signature
    that says so; unchanged for a family whose kernels are not schedule_cpu's."""
    if not lowering.packs_frozen_weights:
        return step_mod, signature
    step_mod = transposed_matmuls()(step_mod)
    widths = panel_widths(step_mod[STEP_FUNC], signature, preset.vector_lanes(32), preset.cores,
                          preset.vector_registers)
    step_mod, signature = pack_frozen_weights(widths, signature, STEP_FUNC)(step_mod), signature.with_packed(widths)
    form = int8_dot(preset.target())
    if form is None:
        return step_mod, signature
    layouts = int8_dot_weights(step_mod[STEP_FUNC], signature, form)
    return interleave_int8_weights(layouts, signature, STEP_FUNC)(step_mod), signature.with_layouts(layouts)


def fusion_passes(lowering: Lowering, target) -> list:
    """From the training step to fused, unscheduled TIR kernels: the family's library dispatch,
    LegalizeOps legalizing each distinct call once and TVM's fusion (legalize_ops.py), then
    reductions over one element as assignments (drop_unit_reductions). The module tuning logs are
    made for and applied to."""
    return lowering.dispatch(target) + legalize_and_fuse() + [drop_unit_reductions()]


def schedule_passes(lowering: Lowering, preset, target, notes: dict) -> list:
    return lowering.schedule(preset, target, notes) + lowering.finish_kernels()


def kernels(mod, preset, lowering: Lowering, database=None, notes: dict | None = None):
    """`mod` (Relax) as scheduled kernels: fused, the records of `database` (an open MetaSchedule
    database or None) applied, the rest given the family's default schedules. What backend
    measurement builds one operator with."""
    target = lowering.tvm_target(preset)
    with target:
        fused = tvm.transform.Sequential(fusion_passes(lowering, target))(mod)
        fused = apply_database(fused, target, database)
        return tvm.transform.Sequential(schedule_passes(lowering, preset, target,
                                                        {} if notes is None else notes))(fused)


def fused(step_mod, signature: StepSignature, preset, lowering: Lowering):
    """The step as fused kernels for `preset`, with its frozen weights packed where the family does:
    what `pockengine tune` tunes."""
    step_mod = with_packed_weights(step_mod, signature, preset, lowering)[0]
    target = lowering.tvm_target(preset)
    with target:
        return tvm.transform.Sequential(fusion_passes(lowering, target))(step_mod)


def fused_step(job, preset, lowering: Lowering):
    """The job's training step as fused kernels for `preset` (`pockengine tune`)."""
    imported = import_model(job)
    step_mod, signature, _ = derive_step(imported, job.optimizer, job.plan(imported))
    return fused(step_mod, signature, preset, lowering)


@dataclasses.dataclass
class Lowered:
    """A memory-planned step, not finalised, and what its lowering found."""
    mod: object
    signature: StepSignature  # the step's, with packed weights where the family packs them
    tuning: TuningReport
    notes: dict  # what the family's schedule phase left (CUDA: the ScheduleReport)


def lower(step_mod, signature: StepSignature, preset, lowering: Lowering, tuning_logs=(), choices=None,
          plan_memory: bool = True) -> Lowered:
    """The derived step -> memory-planned Relax module: switch (when `choices` put ops on library
    kernels), pack, fuse, tuning records, schedule, dataflow_passes (without plan_arena unless
    `plan_memory`: to compare planners)."""
    if choices:
        step_mod = switch_backend(choices, STEP_FUNC)(step_mod)
    step_mod, signature = with_packed_weights(step_mod, signature, preset, lowering)
    target = lowering.tvm_target(preset)
    notes: dict = {}
    with target:
        mod = tvm.transform.Sequential(fusion_passes(lowering, target))(step_mod)
        mod, tuning_report = apply_logs(mod, target, list(tuning_logs))
        mod = tvm.transform.Sequential(schedule_passes(lowering, preset, target, notes))(mod)
        mod = tvm.transform.Sequential(dataflow_passes(lowering, target, signature, plan_memory))(mod)
    return Lowered(mod, signature, tuning_report, notes)


def dataflow_passes(lowering: Lowering, target, signature: StepSignature, plan_memory: bool = True) -> list:
    """Scheduled kernels -> a memory-planned step: expanding kernels run inside their readers where
    the family asks (recompute_expansions), reductions right after their inputs (schedule_reductions),
    the family's dataflow lowering, new state written over the old (update_in_place) and one arena
    (plan_arena)."""
    return (([recompute_expansions(STEP_FUNC)] if lowering.recomputes_expansions else [])
            + [schedule_reductions(STEP_FUNC)] + lowering.dataflow(target)
            + [update_in_place(signature.state_aliases(), STEP_FUNC)]
            + ([plan_arena(STEP_FUNC)] if plan_memory else []))


def finalize_passes() -> list:
    return [
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


def finalize(lowered_mod, target):
    """The lowered step as the VM builds it (relax.build with relax_pipeline=None)."""
    with target:
        return tvm.transform.Sequential(finalize_passes())(lowered_mod)


# ---------------------------------------------------------------------- the memory plan


def memory_report(lowered_mod, derived: Derived):
    """The planned memory of `lowered_mod`, with the step's activation timelines (Derived.timelines)."""
    return plan_report(lowered_mod, derived.step_mod[STEP_FUNC], derived.signature, derived.imported.origin,
                       derived.timelines, derived.patches.to_json() if derived.patches is not None else None)
